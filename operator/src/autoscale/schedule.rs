//! When each resource is evaluated next (pure: times are passed in).
//!
//! Every resource has its own due time, one interval after its previous
//! evaluation started, so a slow evaluation delays only its own resource.
//! New resources are spread over the first interval by a hash of their key
//! rather than all evaluated at once. An alert moves one resource's next
//! evaluation to now, at most once per interval: alerts advance
//! evaluations, they never add decisions beyond one extra per interval.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher;
use std::time::Duration;

use tokio::time::Instant;

use super::alerts::Key;

#[derive(Debug, Default)]
struct Slot {
    due: Option<Instant>,
    /// Started and not finished: never started twice at once.
    running: bool,
    /// When an alert last advanced this resource's evaluation.
    advanced_at: Option<Instant>,
}

#[derive(Debug)]
pub struct Schedule {
    interval: Duration,
    slots: HashMap<Key, Slot>,
    /// (due, key) of the slots not running, in order.
    queue: BTreeSet<(Instant, Key)>,
    spread: std::hash::RandomState,
}

impl Schedule {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            slots: HashMap::new(),
            queue: BTreeSet::new(),
            spread: std::hash::RandomState::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.slots.contains_key(key)
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn set_due(&mut self, key: &Key, at: Instant) {
        if let Some(slot) = self.slots.get_mut(key) {
            if let Some(old) = slot.due.replace(at) {
                self.queue.remove(&(old, key.clone()));
            }
            self.queue.insert((at, key.clone()));
        }
    }

    /// Makes the scheduled set the given keys: new ones are due within the
    /// first interval (spread by their hash), gone ones are dropped.
    /// Returns the keys dropped.
    pub fn sync<'a>(&mut self, keys: impl IntoIterator<Item = &'a Key>, now: Instant) -> Vec<Key> {
        let present: HashSet<&Key> = keys.into_iter().collect();
        let gone: Vec<Key> = self
            .slots
            .keys()
            .filter(|k| !present.contains(k))
            .cloned()
            .collect();
        for k in &gone {
            if let Some(slot) = self.slots.remove(k) {
                if let Some(due) = slot.due {
                    self.queue.remove(&(due, k.clone()));
                }
            }
        }
        for k in present {
            if !self.slots.contains_key(k) {
                let offset = self.spread.hash_one(k) % self.interval.as_millis().max(1) as u64;
                self.slots.insert(k.clone(), Slot::default());
                self.set_due(k, now + Duration::from_millis(offset));
            }
        }
        gone
    }

    /// The earliest due time of a resource not running.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.first().map(|(at, _)| *at)
    }

    /// Takes the resources due at `now`, marking them running.
    pub fn take_due(&mut self, now: Instant) -> Vec<Key> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.queue.first() {
            if *at > now {
                break;
            }
            let Some((_, key)) = self.queue.pop_first() else {
                break;
            };
            if let Some(slot) = self.slots.get_mut(&key) {
                slot.due = None;
                slot.running = true;
            }
            out.push(key);
        }
        out
    }

    /// An evaluation that started at `started` ended: the next one is an
    /// interval after that start (never in the past).
    pub fn finished(&mut self, key: &Key, started: Instant, now: Instant) {
        if let Some(slot) = self.slots.get_mut(key) {
            slot.running = false;
            let at = (started + self.interval).max(now);
            self.set_due(key, at);
        }
    }

    /// An alert names `key`: its next evaluation moves to now, unless one
    /// is running or an alert already advanced it within the interval.
    /// Returns whether it moved.
    pub fn alert(&mut self, key: &Key, now: Instant) -> bool {
        let Some(slot) = self.slots.get_mut(key) else {
            return false;
        };
        let recent = slot
            .advanced_at
            .is_some_and(|t| now.saturating_duration_since(t) < self.interval);
        if slot.running || recent || slot.due.is_some_and(|d| d <= now) {
            return false;
        }
        slot.advanced_at = Some(now);
        self.set_due(key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(name: &str) -> Key {
        Key {
            namespace: "ai".into(),
            name: name.into(),
        }
    }

    const I: Duration = Duration::from_secs(15);

    #[test]
    fn new_resources_are_spread_over_the_first_interval_and_gone_ones_dropped() {
        let t0 = Instant::now();
        let mut s = Schedule::new(I);
        let keys: Vec<Key> = (0..100).map(|i| k(&format!("r{i}"))).collect();
        assert!(s.sync(&keys, t0).is_empty());
        assert_eq!(s.len(), 100);
        let due = s.take_due(t0 + I);
        assert_eq!(due.len(), 100, "all due within one interval");
        // Not all at once: the first half-interval holds some, not all.
        let mut s2 = Schedule::new(I);
        s2.sync(&keys, t0);
        let early = s2.take_due(t0 + I / 2).len();
        assert!(early > 10 && early < 90, "{early} of 100 in the first half");
        let gone = s.sync(&keys[..99], t0 + I);
        assert_eq!(gone, vec![k("r99")]);
        assert_eq!(s.len(), 99);
    }

    #[test]
    fn each_resource_keeps_its_own_cadence_whatever_the_others_take() {
        let t0 = Instant::now();
        let mut s = Schedule::new(I);
        s.sync(&[k("fast"), k("hung")], t0);
        let both = s.take_due(t0 + I);
        assert_eq!(both.len(), 2);
        // `fast` finishes at once; `hung` is still running.
        s.finished(&k("fast"), t0 + I, t0 + I);
        assert_eq!(s.next_due(), Some(t0 + 2 * I));
        assert_eq!(
            s.take_due(t0 + 2 * I),
            vec![k("fast")],
            "hung is not restarted"
        );
        s.finished(
            &k("fast"),
            t0 + 2 * I,
            t0 + 2 * I + Duration::from_millis(5),
        );
        // `hung` ends after two intervals: due again at once (never in the past).
        s.finished(&k("hung"), t0 + I, t0 + 3 * I);
        assert_eq!(s.take_due(t0 + 3 * I), vec![k("fast"), k("hung")]);
    }

    #[test]
    fn an_alert_advances_one_evaluation_per_interval_and_never_a_running_one() {
        let t0 = Instant::now();
        let mut s = Schedule::new(I);
        s.sync(&[k("a"), k("b")], t0);
        let _ = s.take_due(t0 + I);
        s.finished(&k("a"), t0 + I, t0 + I);
        assert!(!s.alert(&k("b"), t0 + I), "b is running");
        let t = t0 + I + Duration::from_secs(1);
        assert!(s.alert(&k("a"), t));
        assert!(!s.alert(&k("a"), t), "coalesced: already due");
        assert_eq!(s.take_due(t), vec![k("a")]);
        s.finished(&k("a"), t, t);
        // A burst of alerts within the interval adds nothing.
        for i in 1..10 {
            assert!(!s.alert(&k("a"), t + Duration::from_secs(i)));
        }
        assert_eq!(s.next_due(), Some(t + I));
        assert!(!s.alert(&k("unknown"), t), "not a resource");
        assert!(!s.alert(&k("a"), t + I - Duration::from_millis(1)));
        assert_eq!(s.take_due(t + I), vec![k("a")]);
        s.finished(&k("a"), t + I, t + I);
        // An interval after the last advance, an alert may advance again.
        assert!(s.alert(&k("a"), t + I + Duration::from_secs(1)));
    }
}
