//! Which offset a consumer may commit: the jobs of one partition run in
//! parallel and finish out of order, and an offset is committed only when
//! every message before it is done, so a crash never skips an unfinished job.
//! Only for partitions this consumer holds: a partition revoked is
//! forgotten, so a job that finishes after its partition moved to another
//! replica commits nothing there. (It once did: a stale high mark moved the
//! group's offset past messages the new owner had not read yet, and when
//! that owner died they were never delivered again.)

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<i32, Part>,
}

#[derive(Debug, Default)]
struct Part {
    in_flight: BTreeSet<i64>,
    /// One past the highest finished offset.
    high: i64,
    /// The last offset returned for commit.
    committed: i64,
}

impl OffsetTracker {
    /// A message was fetched and is being worked on.
    pub fn fetched(&mut self, partition: i32, offset: i64) {
        // A partition's first message marks where its reading started.
        self.parts
            .entry(partition)
            .or_insert_with(|| Part {
                committed: offset,
                ..Part::default()
            })
            .in_flight
            .insert(offset);
    }

    /// A message is done with. Returns the offset to commit for its
    /// partition (the next message to read after a restart) if it advanced.
    pub fn done(&mut self, partition: i32, offset: i64) -> Option<i64> {
        let p = self.parts.get_mut(&partition)?;
        if !p.in_flight.remove(&offset) {
            return None;
        }
        p.high = p.high.max(offset + 1);
        let next = p.in_flight.first().copied().unwrap_or(p.high);
        (next > p.committed).then(|| {
            p.committed = next;
            next
        })
    }

    /// The partitions were revoked (a rebalance): their in-flight messages
    /// are redelivered to whoever holds them next, and their late `done`s
    /// commit nothing here.
    pub fn forget(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.parts.remove(p);
        }
    }

    /// The offsets committed so far, per partition.
    pub fn committed(&self) -> Vec<(i32, i64)> {
        self.parts
            .iter()
            .filter(|(_, p)| p.committed > 0)
            .map(|(k, p)| (*k, p.committed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_below_the_oldest_unfinished_message() {
        let mut t = OffsetTracker::default();
        for o in 10..14 {
            t.fetched(0, o);
        }
        assert_eq!(t.done(0, 12), None, "10 and 11 still run");
        assert_eq!(t.done(0, 10), Some(11));
        assert_eq!(t.done(0, 13), None, "11 still runs");
        assert_eq!(t.done(0, 11), Some(14), "everything up to 13 is done");
        assert_eq!(t.committed(), vec![(0, 14)]);
    }

    #[test]
    fn partitions_are_independent_and_unknown_offsets_ignored() {
        let mut t = OffsetTracker::default();
        t.fetched(0, 5);
        t.fetched(1, 7);
        assert_eq!(t.done(1, 7), Some(8));
        assert_eq!(t.done(1, 7), None, "twice");
        assert_eq!(t.done(2, 1), None, "never fetched");
        assert_eq!(t.done(0, 5), Some(6));
    }

    #[test]
    fn a_revoked_partition_commits_nothing_and_starts_afresh_when_back() {
        let mut t = OffsetTracker::default();
        for o in 100..=200 {
            t.fetched(0, o);
        }
        for o in 101..=200 {
            assert_eq!(t.done(0, o), None, "100 still runs");
        }
        // Revoked while 100 runs; another replica reads on from 100.
        t.forget(&[0]);
        assert_eq!(
            t.done(0, 100),
            None,
            "not ours any more: no commit past 100..200"
        );
        // Back here from the group's offset, 150: commits from there only.
        t.fetched(0, 150);
        t.fetched(0, 151);
        assert_eq!(t.done(0, 150), Some(151));
        assert!(t.committed().contains(&(0, 151)));
    }
}
