//! Events and the sink a driver supplies for status and Events.

use fleetlb_crds::{BackendCluster, BackendClusterStatus};
use futures::future::BoxFuture;
use serde::Serialize;

use crate::error::Reason;

/// One Event, as Kubernetes Events and the standalone `/status` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: EventType,
    /// Why (`Launched`, `Throttled`, ...).
    pub reason: &'static str,
    /// What happened.
    pub note: String,
}

/// Event types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum EventType {
    /// Something done.
    Normal,
    /// Something wrong.
    Warning,
}

impl Event {
    pub(super) fn normal(reason: &'static str, note: String) -> Self {
        Self {
            type_: EventType::Normal,
            reason,
            note,
        }
    }

    pub(super) fn warning(reason: Reason, note: String) -> Self {
        Self {
            type_: EventType::Warning,
            reason: reason.as_str(),
            note,
        }
    }
}

/// Where a driver keeps what the core decides.
pub trait Sink: Send + Sync {
    /// Records `status` as `bc`'s (Kubernetes: a server-side apply of `/status`). Also called
    /// with the launch intents before any launch: an error launches nothing.
    fn write_status<'a>(
        &'a self,
        bc: &'a BackendCluster,
        status: BackendClusterStatus,
    ) -> BoxFuture<'a, Result<(), String>>;

    /// Publishes an Event about `bc`.
    fn event<'a>(&'a self, bc: &'a BackendCluster, event: Event) -> BoxFuture<'a, ()>;
}

/// The Normal Events of one reconcile.
pub(super) fn applied_events(
    bc: &BackendCluster,
    launched: &[(String, u32)],
    retired: &[String],
    terminated: &[String],
) -> Vec<Event> {
    let mut out = Vec::new();
    if !launched.is_empty() {
        let list: Vec<String> = launched
            .iter()
            .map(|(id, slot)| format!("{id} (slot {slot})"))
            .collect();
        out.push(Event::normal(
            "Launched",
            format!(
                "launched {} {}: {}",
                list.len(),
                bc.spec.instance_type,
                list.join(", ")
            ),
        ));
    }
    if !retired.is_empty() {
        out.push(Event::normal(
            "Retiring",
            format!(
                "{} left the endpoint set; terminating after the drain period",
                retired.join(", ")
            ),
        ));
    }
    if !terminated.is_empty() {
        out.push(Event::normal(
            "Terminated",
            format!("terminated {}", terminated.join(", ")),
        ));
    }
    out
}
