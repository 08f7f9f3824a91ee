//! Events on a ModelForwarder, one per distinct message.
//!
//! kube-runtime's `Recorder` folds Events with the same type, reason,
//! action and object into one series and keeps the first note: a second
//! `Scaled` within minutes would still read "2 → 6". The action here
//! carries a short digest of the note, so each distinct message is its own
//! Event while an identical repeat still counts up one series.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use sha2::{Digest, Sha256};

/// The Event for a note (pure): `action` is `<action>-<8 hex digits of the
/// note's SHA-256>`, so distinct notes never share a series. The note is
/// cut to the Events API's 1 KiB.
pub fn event(type_: EventType, reason: &str, action: &str, note: &str) -> Event {
    let note: String = note.chars().take(1000).collect();
    let digest = Sha256::digest(note.as_bytes());
    let tag: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: format!("{action}-{tag}"),
        secondary: None,
    }
}

/// Publishes an Event; a failure is logged, never returned (an Event that
/// cannot be written must not fail what it reports).
pub async fn publish(
    recorder: &Recorder,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let ev = event(type_, reason, action, note);
    if let Err(e) = recorder.publish(&ev, regarding).await {
        tracing::warn!(error = %e, reason, "publishing an Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_notes_get_distinct_actions_and_repeats_the_same() {
        let a = event(EventType::Normal, "Scaled", "Autoscale", "2 → 6 (Capacity)");
        let b = event(
            EventType::Normal,
            "Scaled",
            "Autoscale",
            "6 → 3 (ScaleDown)",
        );
        let a2 = event(EventType::Normal, "Scaled", "Autoscale", "2 → 6 (Capacity)");
        assert_ne!(a.action, b.action);
        assert_eq!(a.action, a2.action);
        assert!(a.action.starts_with("Autoscale-") && a.action.len() == "Autoscale-".len() + 8);
        let long = event(EventType::Warning, "X", "Reconcile", &"é".repeat(2000));
        assert_eq!(long.note.unwrap().chars().count(), 1000);
    }
}
