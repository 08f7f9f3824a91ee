//! Which clients deserve a metric series of their own: the `cap` heaviest
//! by tokens charged, found in bounded memory with the Space-Saving
//! algorithm (Metwally et al., 2005), so a flood of identities (JWT
//! subjects) cannot grow the series or this table. Pure: no metrics here.

use std::collections::{HashMap, HashSet};

/// Entries tracked per named slot: the more, the fewer heavy clients
/// a flood of light ones can hide.
const TRACKED_PER_SLOT: usize = 4;

/// Space-Saving's estimate for one tracked client.
#[derive(Debug, Clone, Copy)]
struct Count {
    /// An upper bound of the weight the client was charged.
    count: u64,
    /// How much of `count` may belong to the client it replaced.
    error: u64,
}

impl Count {
    /// The weight the client was certainly charged.
    fn floor(self) -> u64 {
        self.count - self.error
    }
}

/// What a charge decided: the label to count it under, and the named
/// client that lost its series to make room, if one did.
#[derive(Debug, PartialEq, Eq)]
pub struct Placement {
    pub named: bool,
    pub demoted: Option<String>,
}

impl Placement {
    const NAMED: Self = Self {
        named: true,
        demoted: None,
    };
    const OTHER: Self = Self {
        named: false,
        demoted: None,
    };
}

pub struct TopClients {
    cap: usize,
    tracked: HashMap<String, Count>,
    named: HashSet<String>,
}

impl TopClients {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            tracked: HashMap::new(),
            named: HashSet::new(),
        }
    }

    fn capacity(&self) -> usize {
        self.cap.saturating_mul(TRACKED_PER_SLOT).max(16)
    }

    /// Charges `weight` to `who` and says whether it has a series of its
    /// own. A client is named while there is room; after that it takes the
    /// slot of the lightest named client once the weight it was certainly
    /// charged passes that client's estimate, which is then demoted. A
    /// named client is never dropped from the tracking table, so it is
    /// never demoted on a guess.
    pub fn charge(&mut self, who: &str, weight: u64) -> Placement {
        if self.cap == 0 {
            return Placement::OTHER;
        }
        self.track(who, weight);
        if self.named.contains(who) {
            return Placement::NAMED;
        }
        if self.named.len() < self.cap {
            self.named.insert(who.to_string());
            return Placement::NAMED;
        }
        let mine = self.tracked.get(who).map_or(0, |c| c.floor());
        let lightest = self
            .named
            .iter()
            .map(|n| (self.tracked.get(n).map_or(0, |c| c.count), n))
            .min();
        match lightest {
            Some((theirs, name)) if mine > theirs => {
                let name = name.clone();
                self.named.remove(&name);
                self.named.insert(who.to_string());
                Placement {
                    named: true,
                    demoted: Some(name),
                }
            }
            _ => Placement::OTHER,
        }
    }

    /// Space-Saving's update: count `who`, replacing the smallest
    /// unnamed entry when the table is full (its count becomes the new
    /// entry's error).
    fn track(&mut self, who: &str, weight: u64) {
        if let Some(c) = self.tracked.get_mut(who) {
            c.count = c.count.saturating_add(weight);
            return;
        }
        let mut error = 0;
        if self.tracked.len() >= self.capacity() {
            let smallest = self
                .tracked
                .iter()
                .filter(|(k, _)| !self.named.contains(*k))
                .min_by_key(|(_, c)| c.count)
                .map(|(k, c)| (k.clone(), c.count));
            match smallest {
                Some((k, count)) => {
                    self.tracked.remove(&k);
                    error = count;
                }
                // Every entry is named (only with a capacity of `cap`):
                // not tracked, so it cannot take a slot.
                None => return,
            }
        }
        self.tracked.insert(
            who.to_string(),
            Count {
                count: error.saturating_add(weight),
                error,
            },
        );
    }

    /// Halves every count, so the ranking follows recent use rather than
    /// a process's whole life.
    pub fn decay(&mut self) {
        for c in self.tracked.values_mut() {
            c.count /= 2;
            c.error /= 2;
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.tracked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(p: &Placement) -> bool {
        p.named
    }

    #[test]
    fn a_heavy_client_takes_the_slot_of_the_lightest_named_one() {
        let mut t = TopClients::new(2);
        assert!(named(&t.charge("a", 10)));
        assert!(named(&t.charge("b", 100)));
        // Lighter than both named clients: counted as other.
        assert!(!named(&t.charge("c", 5)));
        assert!(!named(&t.charge("c", 5)));
        // Certainly past a's 10: c takes a's slot, and a is demoted.
        let p = t.charge("c", 1);
        assert_eq!(
            p,
            Placement {
                named: true,
                demoted: Some("a".into()),
            }
        );
        assert!(!named(&t.charge("a", 0)));
        assert!(named(&t.charge("b", 0)));
    }

    #[test]
    fn a_flood_of_light_clients_neither_grows_the_table_nor_takes_a_slot() {
        let mut t = TopClients::new(3);
        for who in ["a", "b", "c"] {
            assert!(named(&t.charge(who, 1_000)));
        }
        for i in 0..10_000 {
            let p = t.charge(&format!("jwt:{i}"), 1);
            assert!(!p.named, "light client {i} was named");
        }
        assert!(t.tracked() <= 16, "{} entries", t.tracked());
        for who in ["a", "b", "c"] {
            assert!(named(&t.charge(who, 0)));
        }
    }

    #[test]
    fn a_heavy_newcomer_hidden_in_a_flood_is_found() {
        let mut t = TopClients::new(1);
        assert!(named(&t.charge("old", 50)));
        let mut took = false;
        for i in 0..2_000 {
            t.charge(&format!("light{i}"), 1);
            took |= t.charge("heavy", 1).named;
        }
        assert!(took, "the heavy client never got a series");
        assert!(!named(&t.charge("old", 0)));
    }

    #[test]
    fn decay_lets_todays_heavy_client_pass_yesterdays() {
        let mut t = TopClients::new(1);
        assert!(named(&t.charge("yesterday", 1_000)));
        for _ in 0..4 {
            t.decay();
        }
        // 1,000 / 16 = 62: a client with 100 now ranks above it.
        assert!(t.charge("today", 100).named);
    }

    #[test]
    fn no_cap_names_no_one() {
        let mut t = TopClients::new(0);
        assert!(!named(&t.charge("a", 1_000)));
    }
}
