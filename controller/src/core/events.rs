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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum EventType {
    /// Something done.
    Normal,
    /// Something wrong.
    Warning,
}

/// The longest note the API server accepts (events.k8s.io/v1 `note`: 1024 bytes); a longer one
/// has the whole Event refused with 422.
pub const MAX_NOTE: usize = 1024;

impl Event {
    pub(super) fn normal(reason: &'static str, note: String) -> Self {
        Self {
            type_: EventType::Normal,
            reason,
            note: clamp_note(note),
        }
    }

    pub(super) fn warning(reason: Reason, note: String) -> Self {
        Self {
            type_: EventType::Warning,
            reason: reason.as_str(),
            note: clamp_note(note),
        }
    }
}

/// `note` cut to [`MAX_NOTE`] bytes on a character boundary, ending in `...` when cut.
pub fn clamp_note(mut note: String) -> String {
    if note.len() > MAX_NOTE {
        let mut end = MAX_NOTE - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}

/// `head`, then as many of `items` (comma-separated) as fit with `tail` in [`MAX_NOTE`] bytes,
/// then `... and N more` for the rest: `launched 50 t2.micro: i-1 (slot 0), ... and 41 more`.
fn listed<S: AsRef<str>>(head: &str, items: &[S], tail: &str) -> String {
    let mut note = String::from(head);
    for (i, item) in items.iter().map(AsRef::as_ref).enumerate() {
        let more = items.len() - i;
        // Room left for this item, its separator, and a "... and N more" should others follow.
        let reserve = if more > 1 { 24 } else { 0 };
        let sep = if i == 0 { "" } else { ", " };
        if note.len() + sep.len() + item.len() + reserve + tail.len() > MAX_NOTE {
            note.push_str(&format!(", ... and {more} more"));
            break;
        }
        note.push_str(sep);
        note.push_str(item);
    }
    note.push_str(tail);
    note
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
    applied: &super::execute::Applied,
    interrupted: &std::collections::HashMap<String, crate::interruption::Kind>,
) -> Vec<Event> {
    let super::execute::Applied {
        launched,
        retired,
        terminated,
        skipped,
        ..
    } = applied;
    let mut out = Vec::new();
    // The instances the interruption queue named, each with what it said, before the
    // launches that replace them.
    let (noticed, retired): (Vec<&String>, Vec<&String>) =
        retired.iter().partition(|id| interrupted.contains_key(*id));
    for id in noticed {
        out.push(Event {
            type_: EventType::Warning,
            reason: "Interrupted",
            note: clamp_note(format!(
                "{id}: {}; it left the endpoint set (requests in flight finish) and is being replaced",
                interrupted[id].describe()
            )),
        });
    }
    if !skipped.is_empty() {
        // Why a type, market or zone was passed over (its shortage is remembered 3 minutes).
        out.push(Event::normal(
            "CapacitySkipped",
            listed("moved on from ", skipped, ""),
        ));
    }
    if !launched.is_empty() {
        let list: Vec<String> = launched
            .iter()
            .map(|(id, slot)| format!("{id} (slot {slot})"))
            .collect();
        out.push(Event::normal(
            "Launched",
            listed(
                &format!(
                    "launched {} {}: ",
                    list.len(),
                    bc.spec.instance_types_joined()
                ),
                &list,
                "",
            ),
        ));
    }
    if !retired.is_empty() {
        out.push(Event::normal(
            "Retiring",
            listed(
                "",
                &retired,
                " left the endpoint set; terminating after the drain period",
            ),
        ));
    }
    if !terminated.is_empty() {
        out.push(Event::normal(
            "Terminated",
            listed("terminated ", terminated, ""),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_list_fits_the_note_limit_and_says_how_many_are_left_out() {
        let ids: Vec<String> = (0..50).map(|i| format!("i-{i:017x} (slot {i})")).collect();
        let note = listed("launched 50 t2.micro: ", &ids, "");
        assert!(note.len() <= MAX_NOTE, "{} bytes", note.len());
        assert!(note.starts_with("launched 50 t2.micro: i-00000000000000000 (slot 0), "));
        let shown = note.matches("(slot").count();
        assert!(
            note.ends_with(&format!(", ... and {} more", 50 - shown)),
            "{note}"
        );
        // A short list is whole.
        assert_eq!(
            listed("terminated ", &ids[..2], ""),
            format!("terminated {}, {}", ids[0], ids[1])
        );
        // With a tail, the tail survives the cut.
        let note = listed("", &ids, " left the endpoint set");
        assert!(
            note.len() <= MAX_NOTE && note.ends_with("more left the endpoint set"),
            "{note}"
        );
    }

    #[test]
    fn any_note_is_cut_to_the_limit_on_a_character_boundary() {
        let note = clamp_note("é".repeat(1000));
        assert!(
            note.len() <= MAX_NOTE && note.ends_with("..."),
            "{}",
            note.len()
        );
        assert_eq!(clamp_note("short".into()), "short");
    }
}
