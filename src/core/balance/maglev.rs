//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted.
//!
//! Each member fills table slots in the order of its own permutation (offset + j*skip mod M);
//! members take turns in id order, and a member with weight w gets w turns for every `max_w`
//! credit, so slot counts follow the weights. Same member list in, same table out, on every peer.

use super::hash::{hash_bytes, MAGLEV_OFFSET_SEED, MAGLEV_SKIP_SEED};

/// Table size: prime, as in the paper and in Envoy.
pub const TABLE_SIZE: usize = 65537;

/// A built Maglev table: each slot holds a member index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// `members[i]` is (stable id bytes, weight). An empty list gives an empty table.
    pub fn build<'a>(members: impl ExactSizeIterator<Item = (&'a [u8], u32)>) -> Self {
        Self::build_with_size(members, TABLE_SIZE)
    }

    pub(crate) fn build_with_size<'a>(
        members: impl ExactSizeIterator<Item = (&'a [u8], u32)>,
        m: usize,
    ) -> Self {
        let n = members.len();
        if n == 0 {
            return Self { table: Vec::new() };
        }
        let m64 = m as u64;
        let mut offset = Vec::with_capacity(n);
        let mut skip = Vec::with_capacity(n);
        let mut weight = Vec::with_capacity(n);
        for (id, w) in members {
            offset.push(hash_bytes(id, MAGLEV_OFFSET_SEED) % m64);
            skip.push(hash_bytes(id, MAGLEV_SKIP_SEED) % (m64 - 1) + 1);
            weight.push(u64::from(w.max(1)));
        }
        let max_w = weight.iter().copied().max().unwrap_or(1);
        let mut next = vec![0u64; n]; // j: how far along its permutation each member is
        let mut credit = vec![0u64; n];
        let mut table = vec![u32::MAX; m];
        let mut filled = 0usize;
        while filled < m {
            for i in 0..n {
                credit[i] += weight[i];
                while credit[i] >= max_w {
                    credit[i] -= max_w;
                    // Walk this member's permutation to its next free slot.
                    loop {
                        let slot = ((offset[i] + next[i] * skip[i]) % m64) as usize;
                        next[i] += 1;
                        if table[slot] == u32::MAX {
                            table[slot] = i as u32;
                            filled += 1;
                            break;
                        }
                    }
                    if filled == m {
                        return Self { table };
                    }
                }
            }
        }
        Self { table }
    }

    /// Rewrite member indexes (from the build order to the caller's numbering).
    pub(crate) fn remap(&mut self, f: impl Fn(u32) -> u32) {
        for x in &mut self.table {
            *x = f(*x);
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The slot a key lands in.
    pub fn slot(&self, key: u64) -> usize {
        (key % self.table.len().max(1) as u64) as usize
    }

    /// Member at `slot` (wrapping).
    pub fn at(&self, slot: usize) -> u32 {
        self.table[slot % self.table.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("backend-{i}")).collect()
    }

    fn build(ids: &[String], w: &[u32]) -> Maglev {
        Maglev::build(ids.iter().zip(w).map(|(s, &w)| (s.as_bytes(), w)))
    }

    #[test]
    fn balanced_and_weighted() {
        let names = ids(5);
        let t = build(&names, &[1, 1, 1, 1, 1]);
        let mut c = [0usize; 5];
        for s in 0..t.len() {
            c[t.at(s) as usize] += 1;
        }
        let mean = TABLE_SIZE / 5;
        assert!(c.iter().all(|&x| x.abs_diff(mean) <= 1), "{c:?}");

        let t = build(&names, &[4, 1, 1, 1, 1]);
        let mut c = [0usize; 5];
        for s in 0..t.len() {
            c[t.at(s) as usize] += 1;
        }
        let ratio = c[0] as f64 / c[1] as f64;
        assert!((ratio - 4.0).abs() < 0.05, "{c:?}");
    }

    #[test]
    fn deterministic() {
        let names = ids(7);
        assert_eq!(build(&names, &[1; 7]), build(&names, &[1; 7]));
    }
}
