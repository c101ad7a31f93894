//! Smooth weighted round robin, precomputed once per pool version.
//!
//! nginx's smooth weighting spreads a heavy backend's turns evenly through the cycle
//! (weights 5,1,1 give `a a b a c a a`, not `a a a a a b c`). We compute one whole cycle up front
//! so the request path needs only an atomic cursor: no lock, no per-request state. The cycle is
//! the sequence nginx's algorithm produces (exactly, for cycles up to `EXACT_LIMIT` steps × backends
//! of work); larger pools use earliest-deadline-first with mid-point deadlines, which has the same
//! smoothness bound. Weights are first divided by their gcd and, if the cycle would still exceed
//! `MAX_CYCLE` entries, scaled down proportionally.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Longest cycle we store (entries are u32 member indexes: 4 MiB).
pub const MAX_CYCLE: u64 = 1 << 20;
/// Largest cycle_len × backends for which we run nginx's O(n) step exactly.
const EXACT_LIMIT: u64 = 1 << 22;

/// Build one cycle over members with the given weights (index i has weight `weights[i]`).
pub fn build_cycle(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let g = weights.iter().fold(0u32, |g, &w| gcd(g, w)).max(1);
    let mut w: Vec<u64> = weights.iter().map(|&x| u64::from((x / g).max(1))).collect();
    let mut total: u64 = w.iter().sum();
    if total > MAX_CYCLE {
        for x in w.iter_mut() {
            *x = (*x * MAX_CYCLE / total).max(1);
        }
        total = w.iter().sum();
    }
    if total * w.len() as u64 <= EXACT_LIMIT {
        nginx_cycle(&w, total)
    } else {
        edf_cycle(&w, total)
    }
}

/// nginx's smooth weighted round robin, run for one whole cycle.
fn nginx_cycle(w: &[u64], total: u64) -> Vec<u32> {
    let total = total as i64;
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0usize;
        for (i, c) in current.iter_mut().enumerate() {
            *c += w[i] as i64;
        }
        for i in 1..current.len() {
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

/// Earliest deadline first: member i's k-th turn is due at (2k+1) / (2 w_i), compared exactly
/// as fractions; ties go to the lower index, so every peer builds the same cycle.
fn edf_cycle(w: &[u64], total: u64) -> Vec<u32> {
    // Deadline (2k+1)/(2w) compared by cross-multiplication through a sort key: we store
    // (numerator, denominator) and order with u128 products.
    #[derive(PartialEq, Eq)]
    struct Due {
        num: u64,
        den: u64,
        idx: u32,
    }
    impl Ord for Due {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            let a = u128::from(self.num) * u128::from(o.den);
            let b = u128::from(o.num) * u128::from(self.den);
            a.cmp(&b).then(self.idx.cmp(&o.idx))
        }
    }
    impl PartialOrd for Due {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    let mut heap: BinaryHeap<Reverse<Due>> = w
        .iter()
        .enumerate()
        .map(|(i, &wi)| {
            Reverse(Due {
                num: 1,
                den: 2 * wi,
                idx: i as u32,
            })
        })
        .collect();
    let mut out = Vec::with_capacity(total as usize);
    while (out.len() as u64) < total {
        let Some(Reverse(d)) = heap.pop() else { break };
        out.push(d.idx);
        heap.push(Reverse(Due {
            num: d.num + 2,
            ..d
        }));
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_example() {
        // The example from nginx's commit introducing smooth weighting.
        let c = build_cycle(&[5, 1, 1]);
        assert_eq!(c, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn equal_weights_rotate() {
        assert_eq!(build_cycle(&[3, 3, 3]), vec![0, 1, 2]);
    }

    fn counts(c: &[u32], n: usize) -> Vec<u64> {
        let mut v = vec![0; n];
        for &i in c {
            v[i as usize] += 1;
        }
        v
    }

    #[test]
    fn proportions_exact_and_smooth_in_both_modes() {
        let weights = [7u32, 3, 1, 5];
        let total: u64 = weights.iter().map(|&w| w as u64).sum();
        let w64: Vec<u64> = weights.iter().map(|&w| w as u64).collect();
        for cycle in [nginx_cycle(&w64, total), edf_cycle(&w64, total)] {
            assert_eq!(counts(&cycle, 4), w64);
            // Smooth: in any window of length L, member i gets within 2 of L*w_i/total.
            for len in 1..=cycle.len() {
                for start in 0..cycle.len() {
                    let win: Vec<u32> =
                        (0..len).map(|k| cycle[(start + k) % cycle.len()]).collect();
                    for (i, &w) in w64.iter().enumerate() {
                        let got = win.iter().filter(|&&x| x as usize == i).count() as f64;
                        let want = len as f64 * w as f64 / total as f64;
                        assert!((got - want).abs() <= 2.0, "window {start}+{len} member {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn huge_pools_are_bounded() {
        let weights = vec![1000u32; 5000];
        let c = build_cycle(&weights); // gcd divides to all-ones: 5000 entries
        assert_eq!(c.len(), 5000);
        let mut weights = vec![999u32; 5000];
        weights[0] = 1000;
        let c = build_cycle(&weights);
        assert!(c.len() as u64 <= MAX_CYCLE + 5000);
        assert!(counts(&c, 5000).iter().all(|&n| n >= 1));
    }
}
