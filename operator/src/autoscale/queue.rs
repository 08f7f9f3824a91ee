//! The async queue as a scaling signal (pure): how many replicas absorb the
//! jobs arriving and drain the waiting ones within `maxQueueDelaySeconds`.
//!
//! Three corrections over reading the consumer lag as the backlog:
//! - The lag counts jobs that are **running** (a job's offset is committed
//!   when it ends), so the waiting jobs are the lag less the running ones,
//!   estimated by Little's law (jobs finished per second × mean run time,
//!   at most every reporting pod's workers). At steady state with nothing
//!   waiting the need is the arrivals' alone.
//! - A replica's rate (workers / mean run time) is only **credible** while
//!   the forwarder, not the upstream, sets the run time: with upstream
//!   errors (429s, timeouts) over the SLO, or runs that take longer than
//!   1.5× the shortest mean run seen over the stabilization window, more
//!   replicas would only add callers of a saturated upstream. The need
//!   then holds (never up, never down on the queue).
//! - After a scale-up the need **settles** (the policy's `settle`): a
//!   Kafka rebalance redelivers uncommitted jobs and inflates the lag
//!   until the new replicas run.

use std::time::Duration;

/// The async queue's SLO: jobs wait at most `max_delay_s` for a worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueSlo {
    pub max_delay_s: f64,
    /// Jobs one replica runs at once (`async.workers`).
    pub workers_per_replica: f64,
    /// The depth counts running jobs too (Kafka's consumer lag: an offset
    /// is committed when its job ends); the embedded queue's does not.
    pub lag_includes_running: bool,
}

/// Runs longer than this multiple of the window's shortest are the
/// upstream's doing.
pub const RUN_TIME_RISE: f64 = 1.5;

/// What the queue signal reads (a subset of the policy's observations).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueObserved {
    /// The consumer lag summed over the pods: waiting and running jobs.
    pub lag: Option<f64>,
    /// Runs entering the queue per second.
    pub arrivals: Option<f64>,
    /// Jobs finished (succeeded or failed) per second.
    pub finished: Option<f64>,
    /// Mean run time in seconds; `None` when no run ended in the window.
    pub run_s: Option<f64>,
    /// Live pods whose series were present.
    pub reporting: u32,
    /// The upstream is failing or slow (request errors over the SLO, or a
    /// breach that is not the forwarder's).
    pub upstream_troubled: bool,
}

/// Why a replica's job rate is not believed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Doubt {
    /// Upstream errors or an upstream-caused breach.
    Upstream,
    /// Runs take longer than [`RUN_TIME_RISE`]× the window's shortest
    /// (the mean run time now, and that shortest).
    SlowerRuns { run_s: f64, shortest_s: f64 },
}

/// What the queue SLO asks for (see [`queue_need`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QueueNeed {
    /// No queue SLO.
    Off,
    /// The backlog or arrival series are missing: hold.
    Missing,
    /// Jobs are queued or arriving, but no job ended in the window, so a
    /// replica's job rate is unknown: hold.
    UnknownCapacity { backlog: f64 },
    /// A replica's job rate is not credible: hold.
    NotCredible { backlog: f64, doubt: Doubt },
    /// Replicas the queue needs (0: nothing queued or arriving).
    Sized {
        replicas: u32,
        /// Jobs waiting (the lag less the running ones).
        backlog: f64,
        /// Jobs per second one replica runs; `None` when idle and unknown.
        per_replica: Option<f64>,
        /// Seconds the current replicas need to drain the backlog while
        /// jobs keep arriving (infinite: it grows).
        delay_s: f64,
    },
}

impl QueueNeed {
    /// The need cannot be sized: hold the count.
    pub fn holds(&self) -> bool {
        matches!(
            self,
            Self::Missing | Self::UnknownCapacity { .. } | Self::NotCredible { .. }
        )
    }
}

/// The shortest mean run time seen over the stabilization window, and when
/// it was seen; kept in the policy's history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunFloor {
    pub at: Duration,
    pub run_s: f64,
}

impl RunFloor {
    /// The floor after observing `run_s` at `now`: a shorter run, or a
    /// floor older than `window`, replaces it.
    pub fn next(
        floor: Option<RunFloor>,
        run_s: Option<f64>,
        window: Duration,
        now: Duration,
    ) -> Option<RunFloor> {
        let Some(run_s) = clean(run_s).filter(|t| *t > 0.0) else {
            return floor;
        };
        match floor {
            Some(f) if f.run_s <= run_s && now.saturating_sub(f.at) <= window => Some(f),
            _ => Some(RunFloor { at: now, run_s }),
        }
    }
}

fn clean(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite() && *x >= 0.0)
}

/// A replica's job rate: its workers over the mean run time; without run
/// times (an older forwarder) the jobs finished per reporting pod; else
/// unknown.
fn per_replica_rate(q: &QueueSlo, obs: &QueueObserved) -> Option<f64> {
    let from_runs = clean(obs.run_s)
        .filter(|t| *t > 0.0)
        .map(|t| q.workers_per_replica / t);
    let observed = clean(obs.finished)
        .filter(|f| *f > 0.0 && obs.reporting > 0)
        .map(|f| f / f64::from(obs.reporting));
    from_runs.or(observed).filter(|r| r.is_finite() && *r > 0.0)
}

/// Jobs running now, by Little's law, at most every reporting pod's
/// workers; 0 when unknown (the lag then counts as waiting).
fn running(q: &QueueSlo, obs: &QueueObserved) -> f64 {
    if !q.lag_includes_running {
        return 0.0;
    }
    let (Some(finished), Some(run_s)) = (clean(obs.finished), clean(obs.run_s)) else {
        return 0.0;
    };
    (finished * run_s).min(q.workers_per_replica * f64::from(obs.reporting))
}

/// Replicas that absorb the arrivals and drain the waiting jobs within the
/// SLO: `n × rate ≥ arrivals + waiting / max_delay`. Inside the tolerance
/// band around the current count the count stands, as for QPS.
pub fn queue_need(
    q: &QueueSlo,
    obs: &QueueObserved,
    current: u32,
    tolerance: f64,
    floor: Option<RunFloor>,
) -> QueueNeed {
    let (Some(lag), Some(arrivals)) = (clean(obs.lag), clean(obs.arrivals)) else {
        return QueueNeed::Missing;
    };
    let backlog = (lag - running(q, obs)).max(0.0);
    let rate = per_replica_rate(q, obs);
    if backlog == 0.0 && arrivals == 0.0 {
        return QueueNeed::Sized {
            replicas: 0,
            backlog,
            per_replica: rate,
            delay_s: 0.0,
        };
    }
    let Some(rate) = rate else {
        return QueueNeed::UnknownCapacity { backlog };
    };
    if obs.upstream_troubled {
        return QueueNeed::NotCredible {
            backlog,
            doubt: Doubt::Upstream,
        };
    }
    if let (Some(run_s), Some(f)) = (clean(obs.run_s), floor) {
        if run_s > RUN_TIME_RISE * f.run_s {
            return QueueNeed::NotCredible {
                backlog,
                doubt: Doubt::SlowerRuns {
                    run_s,
                    shortest_s: f.run_s,
                },
            };
        }
    }
    let demand = arrivals + backlog / q.max_delay_s.max(1.0);
    let have = f64::from(current) * rate;
    let replicas = if current > 0 && (demand / have - 1.0).abs() <= tolerance {
        current
    } else {
        // Bounded: a huge backlog is still a finite count (max clamps it).
        (demand / rate).ceil().min(f64::from(u32::MAX)) as u32
    };
    let margin = have - arrivals;
    let delay_s = if backlog == 0.0 {
        0.0
    } else if margin > 0.0 {
        backlog / margin
    } else {
        f64::INFINITY
    };
    QueueNeed::Sized {
        replicas,
        backlog,
        per_replica: Some(rate),
        delay_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// The numbers: 10 workers, 40 s runs, jobs may wait 30 s.
    fn slo() -> QueueSlo {
        QueueSlo {
            max_delay_s: 30.0,
            workers_per_replica: 10.0,
            lag_includes_running: true,
        }
    }

    /// 3 replicas, all 30 workers busy, 0.75 jobs/s arriving and finishing,
    /// nothing waiting: the lag is the 30 running jobs.
    fn steady() -> QueueObserved {
        QueueObserved {
            lag: Some(30.0),
            arrivals: Some(0.75),
            finished: Some(0.75),
            run_s: Some(40.0),
            reporting: 3,
            upstream_troubled: false,
        }
    }

    #[test]
    fn running_jobs_are_not_waiting_ones_three_replicas_not_seven() {
        // 0.25 jobs/s per replica; 0.75 arrive: 3 replicas, no delay.
        let need = queue_need(&slo(), &steady(), 3, 0.1, None);
        assert_eq!(
            need,
            QueueNeed::Sized {
                replicas: 3,
                backlog: 0.0,
                per_replica: Some(0.25),
                delay_s: 0.0,
            }
        );
        // Counting the lag as waiting asked 0.75 + 30/30 = 1.75 jobs/s: 7.
        let unknown_runs = QueueObserved {
            finished: None,
            ..steady()
        };
        let QueueNeed::Sized { replicas, .. } = queue_need(&slo(), &unknown_runs, 3, 0.1, None)
        else {
            panic!("sized");
        };
        assert_eq!(
            replicas, 7,
            "without a running estimate the lag is all waiting"
        );
    }

    #[test]
    fn jobs_waiting_beyond_the_running_ones_are_the_backlog() {
        // 30 running and 45 waiting: 0.75 + 45/30 = 2.25 jobs/s → 9.
        let obs = QueueObserved {
            lag: Some(75.0),
            ..steady()
        };
        let QueueNeed::Sized {
            replicas,
            backlog,
            delay_s,
            ..
        } = queue_need(&slo(), &obs, 3, 0.1, None)
        else {
            panic!("sized");
        };
        assert_eq!((replicas, backlog), (9, 45.0));
        assert!(delay_s.is_infinite(), "3 replicas only keep up: {delay_s}");
        // Running jobs are at most the reporting pods' workers.
        let obs = QueueObserved {
            finished: Some(3.0),
            lag: Some(200.0),
            ..steady()
        };
        let QueueNeed::Sized { backlog, .. } = queue_need(&slo(), &obs, 3, 0.1, None) else {
            panic!("sized");
        };
        assert_eq!(backlog, 170.0);
    }

    #[test]
    fn a_rate_the_upstream_sets_holds_instead_of_scaling() {
        // The upstream answers 429s: the slower runs are its doing.
        let troubled = QueueObserved {
            lag: Some(300.0),
            run_s: Some(120.0),
            upstream_troubled: true,
            ..steady()
        };
        assert!(matches!(
            queue_need(&slo(), &troubled, 3, 0.1, None),
            QueueNeed::NotCredible {
                doubt: Doubt::Upstream,
                ..
            }
        ));
        // No errors, but runs three times the window's shortest (40 s →
        // 120 s): workers / run time would ask for 3× the replicas.
        let floor = Some(RunFloor {
            at: 100 * S,
            run_s: 40.0,
        });
        let slower = QueueObserved {
            upstream_troubled: false,
            ..troubled
        };
        let need = queue_need(&slo(), &slower, 3, 0.1, floor);
        assert_eq!(
            need,
            QueueNeed::NotCredible {
                backlog: 300.0 - 30.0,
                doubt: Doubt::SlowerRuns {
                    run_s: 120.0,
                    shortest_s: 40.0
                }
            }
        );
        assert!(need.holds());
        // Within 1.5× of the floor the rate is believed.
        let a_bit_slower = QueueObserved {
            run_s: Some(55.0),
            ..slower
        };
        assert!(matches!(
            queue_need(&slo(), &a_bit_slower, 3, 0.1, floor),
            QueueNeed::Sized { .. }
        ));
    }

    #[test]
    fn the_run_floor_is_the_windows_shortest_run() {
        let w = 300 * S;
        let f = RunFloor::next(None, Some(40.0), w, Duration::ZERO);
        assert_eq!(
            f,
            Some(RunFloor {
                at: Duration::ZERO,
                run_s: 40.0
            })
        );
        // Longer runs do not raise it within the window; missing ones keep it.
        assert_eq!(RunFloor::next(f, Some(120.0), w, 100 * S), f);
        assert_eq!(RunFloor::next(f, None, w, 100 * S), f);
        assert_eq!(RunFloor::next(f, Some(f64::NAN), w, 100 * S), f);
        // A shorter one replaces it; so does any run once it is older than
        // the window (a lasting change of run time is believed then).
        assert_eq!(
            RunFloor::next(f, Some(30.0), w, 100 * S),
            Some(RunFloor {
                at: 100 * S,
                run_s: 30.0
            })
        );
        assert_eq!(
            RunFloor::next(f, Some(120.0), w, 301 * S),
            Some(RunFloor {
                at: 301 * S,
                run_s: 120.0
            })
        );
    }
}
