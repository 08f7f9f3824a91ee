use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

use crate::telemetry::Metrics;

/// The store's series, registered on the forwarder's registry.
#[derive(Clone)]
pub struct StoreMetrics {
    /// Records refused because they failed authentication or decoding.
    pub corrupt: IntCounter,
    /// Records left unread: sealed under a key id not loaded here.
    pub unreadable: IntCounter,
    /// Failed backend calls, by operation.
    pub errors: IntCounterVec,
    /// Records evicted from the memory backend to stay within its bound.
    pub evictions: IntCounter,
    /// Bytes held by the memory backend (keys and records).
    pub bytes: IntGauge,
}

impl StoreMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let m = Self::unregistered();
        for c in [
            Box::new(m.corrupt.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.unreadable.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.evictions.clone()),
            Box::new(m.bytes.clone()),
        ] {
            // A second store on one registry (tests) keeps the first's series.
            let _ = metrics.registry().register(c);
        }
        m
    }

    pub fn unregistered() -> Self {
        Self {
            corrupt: IntCounter::new(
                "forwarder_store_corrupt_records_total",
                "Stored records refused (failed authentication or decoding); served as misses",
            )
            .expect("valid metric"),
            unreadable: IntCounter::new(
                "forwarder_store_unreadable_records_total",
                "Stored records sealed under an encryption key id not loaded here (a rotation in progress); left in place, the call fails as unavailable",
            )
            .expect("valid metric"),
            errors: IntCounterVec::new(
                Opts::new(
                    "forwarder_store_errors_total",
                    "Store calls that failed (unavailable, timed out), by operation",
                ),
                &["op"],
            )
            .expect("valid metric"),
            evictions: IntCounter::new(
                "forwarder_store_evictions_total",
                "Records evicted from the memory store to stay within store.max_bytes",
            )
            .expect("valid metric"),
            bytes: IntGauge::new(
                "forwarder_store_bytes",
                "Bytes held by the memory store (keys and records)",
            )
            .expect("valid metric"),
        }
    }
}
