//! What can go wrong talking to a provider, as types: the condition reason a user sees is
//! decided from the class the provider gave the error, never by searching its message.

use std::fmt;

use crate::provider::ProviderKind;

/// A failed provider call: which provider, which operation, what class of failure, and the
/// provider's own words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{provider} provider: {operation} failed: {message}")]
pub struct Error {
    /// The provider that failed.
    pub provider: ProviderKind,
    /// The operation.
    pub operation: Operation,
    /// What kind of failure it was (decides the condition reason and whether waiting helps).
    pub class: ErrorClass,
    /// The provider's message (for EC2: `Code: message`, or the transport error chain).
    pub message: String,
}

impl Error {
    /// An error of `class` from `provider`'s `operation`.
    pub fn new(
        provider: ProviderKind,
        operation: Operation,
        class: ErrorClass,
        message: impl Into<String>,
    ) -> Self {
        Self {
            provider,
            operation,
            class,
            message: message.into(),
        }
    }

    /// The condition reason for this error (`Throttled`, `ProviderUnavailable`, ...).
    pub fn reason(&self) -> Reason {
        match self.class {
            ErrorClass::Throttled => Reason::Throttled,
            ErrorClass::Unavailable => Reason::ProviderUnavailable,
            ErrorClass::Capacity => Reason::InsufficientCapacity,
            ErrorClass::Invalid => Reason::InvalidProviderConfig,
            ErrorClass::Denied => Reason::AccessDenied,
            ErrorClass::NotConfigured => Reason::ProviderNotConfigured,
            ErrorClass::NotLeader | ErrorClass::Other => match self.operation {
                Operation::Launch => Reason::LaunchFailed,
                _ => Reason::ProviderError,
            },
        }
    }
}

/// The provider operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Listing instances.
    List,
    /// Launching one.
    Launch,
    /// Terminating some.
    Terminate,
    /// Dropping ownership (`deletionPolicy: Orphan`).
    Release,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::List => "list",
            Operation::Launch => "launch",
            Operation::Terminate => "terminate",
            Operation::Release => "release",
        })
    }
}

/// Classes of provider failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The provider rate-limited the call (EC2 `RequestLimitExceeded`): back off.
    Throttled,
    /// The provider failed or did not answer (5xx, timeouts, connection failures): retry.
    Unavailable,
    /// No capacity for this instance type here (EC2 `InsufficientInstanceCapacity`).
    Capacity,
    /// The request itself is wrong (EC2 `Invalid*`, `MissingParameter`): fix the spec.
    Invalid,
    /// Not allowed (EC2 `UnauthorizedOperation`, `AuthFailure`): fix the IAM policy.
    Denied,
    /// This process has no provider of that kind (configuration).
    NotConfigured,
    /// This replica stopped leading before the call (nothing was sent).
    NotLeader,
    /// Anything else.
    Other,
}

impl ErrorClass {
    /// The class of an EC2 error code; `None` (no code: a timeout, a connection failure, an
    /// unreadable answer) is [`ErrorClass::Unavailable`].
    pub fn of_ec2_code(code: Option<&str>) -> Self {
        let Some(code) = code else {
            return ErrorClass::Unavailable;
        };
        match code {
            "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => ErrorClass::Throttled,
            "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
                ErrorClass::Unavailable
            }
            "UnauthorizedOperation" | "AuthFailure" | "Blocked" | "OptInRequired" => {
                ErrorClass::Denied
            }
            c if c.starts_with("Insufficient") && c.ends_with("Capacity") => ErrorClass::Capacity,
            c if c.starts_with("Invalid") || c.starts_with("Missing") || c == "Unsupported" => {
                ErrorClass::Invalid
            }
            _ => ErrorClass::Other,
        }
    }
}

/// Condition reasons fleetlb sets, in both drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Provider throttling.
    Throttled,
    /// Provider failing or not answering.
    ProviderUnavailable,
    /// No capacity for the instance type.
    InsufficientCapacity,
    /// The provider refused the request as invalid.
    InvalidProviderConfig,
    /// The provider refused the request as not allowed.
    AccessDenied,
    /// A launch failed otherwise.
    LaunchFailed,
    /// Another provider call failed.
    ProviderError,
    /// The spec's provider is not configured in this process.
    ProviderNotConfigured,
    /// The launch intents could not be recorded, so nothing was launched.
    StatusWriteFailed,
    /// The spec fails validation.
    InvalidSpec,
    /// Another object holds the route.
    RouteConflict,
    /// Deletion in progress.
    Deleting,
}

impl Reason {
    /// The reason as conditions and Events carry it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Throttled => "Throttled",
            Reason::ProviderUnavailable => "ProviderUnavailable",
            Reason::InsufficientCapacity => "InsufficientCapacity",
            Reason::InvalidProviderConfig => "InvalidProviderConfig",
            Reason::AccessDenied => "AccessDenied",
            Reason::LaunchFailed => "LaunchFailed",
            Reason::ProviderError => "ProviderError",
            Reason::ProviderNotConfigured => "ProviderNotConfigured",
            Reason::StatusWriteFailed => "StatusWriteFailed",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::RouteConflict => "RouteConflict",
            Reason::Deleting => "Deleting",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec2_codes_fall_into_their_classes() {
        let c = |code| ErrorClass::of_ec2_code(Some(code));
        assert_eq!(c("RequestLimitExceeded"), ErrorClass::Throttled);
        assert_eq!(c("InternalError"), ErrorClass::Unavailable);
        assert_eq!(ErrorClass::of_ec2_code(None), ErrorClass::Unavailable);
        assert_eq!(c("InsufficientInstanceCapacity"), ErrorClass::Capacity);
        assert_eq!(c("InvalidAMIID.NotFound"), ErrorClass::Invalid);
        assert_eq!(c("UnauthorizedOperation"), ErrorClass::Denied);
        assert_eq!(c("VcpuLimitExceeded"), ErrorClass::Other);
        let launch = |class| Error::new(ProviderKind::Aws, Operation::Launch, class, "x").reason();
        assert_eq!(launch(ErrorClass::Other), Reason::LaunchFailed);
        assert_eq!(launch(ErrorClass::Throttled), Reason::Throttled);
        let list = Error::new(ProviderKind::Aws, Operation::List, ErrorClass::Other, "x");
        assert_eq!(list.reason(), Reason::ProviderError);
    }
}
