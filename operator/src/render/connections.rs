//! How many connections a forwarder pod may hold open, from its memory
//! limit (pure).
//!
//! A connection that waits for its request head costs the forwarder about
//! 18 KiB (17.9 KiB measured with 4,000 of them, docs/benchmarks.md). The
//! forwarder's own default, 16,384 per listener, would take about 290 MiB
//! per listener, over the pod's default limit of 256 MiB: a flood of slow
//! heads would get the pod OOM-killed before the header timeout ended them.
//! So the operator sets `server.max_connections` so that every listener
//! full of waiting connections fits in the limit beside a headroom for the
//! process and its requests in flight; beyond the cap, connections wait in
//! the kernel's backlog, which costs the pod nothing.

/// One waiting connection, with a margin over the 17.9 KiB measured.
pub const PER_CONNECTION: u64 = 20 * 1024;
/// What the process keeps for itself (about 15 MiB idle) and the requests
/// it is serving.
pub const HEADROOM: u64 = 64 * 1024 * 1024;
/// The cap is never set lower than this, however small the limit.
pub const FLOOR: u64 = 256;
/// Nor higher than the forwarder's own default.
pub const CEILING: u64 = 16_384;

/// `server.max_connections` for a pod with this memory limit and this many
/// listeners (HTTP, and gRPC when on); `None` without a limit (the
/// forwarder's default stands).
pub fn max_connections(memory_limit: Option<u64>, listeners: u64) -> Option<usize> {
    let limit = memory_limit?;
    let per_listener = limit.saturating_sub(HEADROOM) / PER_CONNECTION / listeners.max(1);
    usize::try_from(per_listener.clamp(FLOOR, CEILING)).ok()
}

/// Bytes of a Kubernetes memory quantity (`256Mi`, `1G`, `512M`, `1.5Gi`,
/// `268435456`, `1e9`); `None` for what this does not read (the forwarder's
/// default then stands).
pub fn bytes(quantity: &str) -> Option<u64> {
    let q = quantity.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    let b = number * scale;
    (b.is_finite() && b >= 0.0 && b < u64::MAX as f64).then_some(b as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_as_kubernetes_reads_them() {
        assert_eq!(bytes("256Mi"), Some(256 << 20));
        assert_eq!(bytes("1Gi"), Some(1 << 30));
        assert_eq!(bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(bytes("512M"), Some(512_000_000));
        assert_eq!(bytes("268435456"), Some(268_435_456));
        assert_eq!(bytes("1e9"), Some(1_000_000_000));
        assert_eq!(bytes("lots"), None);
        assert_eq!(bytes("12Qi"), None);
    }

    #[test]
    fn every_listener_full_of_waiting_connections_fits_the_limit() {
        let mib = 1 << 20;
        // The default limit: 9,830 on HTTP alone, half each with gRPC.
        assert_eq!(max_connections(Some(256 * mib), 1), Some(9_830));
        assert_eq!(max_connections(Some(256 * mib), 2), Some(4_915));
        for (limit, listeners) in [(256 * mib, 1), (512 * mib, 2), (1 << 30, 1)] {
            let cap = max_connections(Some(limit), listeners).unwrap() as u64;
            assert!(HEADROOM + cap * listeners * PER_CONNECTION <= limit);
        }
        // Bounds: a tiny limit keeps a floor, a huge one the default.
        assert_eq!(max_connections(Some(64 * mib), 1), Some(256));
        assert_eq!(max_connections(Some(64 << 30), 1), Some(16_384));
        assert_eq!(max_connections(None, 1), None);
    }
}
