//! The one place where data-plane failures become HTTP responses.
//!
//! Bodies are short plain text and never carry internal details (addresses, OS errors); the log
//! line and the `fleetlb_proxy_errors_total{reason}` counter do.

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ResponseBody;

/// Why fleetlb answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// No route's prefix matches the path.
    #[error("no route for this path")]
    NoRoute,
    #[error("bad request path")]
    BadPath,
    /// The route's cluster has no endpoint that can take the request.
    #[error("no healthy endpoint")]
    NoHealthyEndpoint,
    /// The endpoint refused or dropped the connection.
    #[error("upstream connection failed")]
    UpstreamConnect,
    /// The connection broke after the request was sent.
    #[error("upstream connection reset")]
    UpstreamReset,
    /// No response headers within the request timeout.
    #[error("upstream timed out")]
    UpstreamTimeout,
}

impl ProxyError {
    /// HTTP status sent to the client.
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadPath => StatusCode::BAD_REQUEST,
            ProxyError::NoHealthyEndpoint => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamConnect | ProxyError::UpstreamReset => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Label for `fleetlb_proxy_errors_total{reason}`.
    pub fn reason(self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::BadPath => "bad_path",
            ProxyError::NoHealthyEndpoint => "no_healthy_endpoint",
            ProxyError::UpstreamConnect => "connect",
            ProxyError::UpstreamReset => "reset",
            ProxyError::UpstreamTimeout => "timeout",
        }
    }

    fn body(self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no route for this path\n",
            ProxyError::BadPath => {
                "bad request path (dot segments above the root or encoded slashes)\n"
            }
            ProxyError::NoHealthyEndpoint => "no healthy endpoint\n",
            ProxyError::UpstreamConnect => "upstream connection failed\n",
            ProxyError::UpstreamReset => "upstream connection reset\n",
            ProxyError::UpstreamTimeout => "upstream timed out\n",
        }
    }

    /// The response for this error.
    pub fn response(self) -> Response<ResponseBody> {
        plain(self.status(), self.body())
    }
}

/// A short `text/plain` response.
pub fn plain(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::message(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
