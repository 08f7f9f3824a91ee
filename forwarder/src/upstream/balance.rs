//! Choosing an endpoint among the eligible ones: pure functions, no I/O.

/// One eligible endpoint as the balancer sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub index: usize,
    pub outstanding: usize,
    pub weight: u32,
}

/// The candidate with the fewest in-flight requests per unit of weight
/// (counting the one about to be sent). Ties go to the first candidate at or
/// after `tie_offset` in rotation, so equal endpoints share the load.
pub fn least_outstanding(candidates: &[Candidate], tie_offset: usize) -> Option<usize> {
    let n = candidates.len();
    (0..n)
        .map(|k| &candidates[(k + tie_offset) % n])
        .min_by(|a, b| {
            // (a.out+1)/a.w vs (b.out+1)/b.w without floats.
            let lhs = (a.outstanding as u128 + 1) * u128::from(b.weight.max(1));
            let rhs = (b.outstanding as u128 + 1) * u128::from(a.weight.max(1));
            lhs.cmp(&rhs)
        })
        .map(|c| c.index)
}

/// Smooth weighted round robin (as nginx does it): over any window of
/// sum(weights) picks, each endpoint is chosen `weight` times, interleaved.
#[derive(Debug, Clone, Default)]
pub struct SmoothWrr {
    current: Vec<i64>,
}

impl SmoothWrr {
    /// Picks among `eligible` endpoints, given every endpoint's weight.
    pub fn next(&mut self, weights: &[u32], eligible: &[bool]) -> Option<usize> {
        self.current.resize(weights.len(), 0);
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for i in 0..weights.len() {
            if !eligible[i] {
                continue;
            }
            let w = i64::from(weights[i].max(1));
            self.current[i] += w;
            total += w;
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.current[b] -= total;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(index: usize, outstanding: usize, weight: u32) -> Candidate {
        Candidate {
            index,
            outstanding,
            weight,
        }
    }

    #[test]
    fn least_outstanding_prefers_the_idle_endpoint() {
        let c = [cand(0, 5, 1), cand(1, 1, 1), cand(2, 3, 1)];
        assert_eq!(least_outstanding(&c, 0), Some(1));
    }

    #[test]
    fn least_outstanding_accounts_for_weight() {
        // 4 in flight on weight 3 ⇒ 5/3 < 2 in flight on weight 1 ⇒ 3/1
        let c = [cand(0, 2, 1), cand(1, 4, 3)];
        assert_eq!(least_outstanding(&c, 0), Some(1));
    }

    #[test]
    fn ties_rotate_with_the_offset() {
        let c = [cand(0, 0, 1), cand(1, 0, 1), cand(2, 0, 1)];
        assert_eq!(least_outstanding(&c, 0), Some(0));
        assert_eq!(least_outstanding(&c, 1), Some(1));
        assert_eq!(least_outstanding(&c, 5), Some(2));
        assert_eq!(least_outstanding(&[], 3), None);
    }

    #[test]
    fn smooth_wrr_follows_weights_and_interleaves() {
        let mut rr = SmoothWrr::default();
        let weights = [5, 1, 1];
        let picks: Vec<usize> = (0..7)
            .map(|_| rr.next(&weights, &[true; 3]).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn smooth_wrr_skips_ineligible() {
        let mut rr = SmoothWrr::default();
        for _ in 0..10 {
            assert_eq!(rr.next(&[1, 1], &[false, true]), Some(1));
        }
        assert_eq!(rr.next(&[1, 1], &[false, false]), None);
    }
}
