//! Ketama consistent hash ring: 160 points per unit of weight, as nginx and Pingora place them.
//!
//! Points are hashed from the member's stable id and the point number with a fixed seed; a key
//! goes to the first point at or after its hash (wrapping). The total number of points is capped
//! at `MAX_POINTS`, scaling every member down proportionally, so huge weighted pools stay bounded.

use super::hash::{hash_bytes, RING_SEED};

pub const POINTS_PER_WEIGHT: u64 = 160;
pub const MAX_POINTS: u64 = 1 << 21;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    /// Sorted by (hash, member), so ties resolve the same everywhere.
    points: Vec<(u64, u32)>,
}

impl Ring {
    pub fn build<'a>(members: impl ExactSizeIterator<Item = (&'a [u8], u32)>) -> Self {
        let members: Vec<(&[u8], u64)> = members.map(|(id, w)| (id, u64::from(w.max(1)))).collect();
        let total: u64 = members.iter().map(|(_, w)| w * POINTS_PER_WEIGHT).sum();
        let mut points = Vec::with_capacity(total.min(MAX_POINTS) as usize + members.len());
        let mut buf = Vec::with_capacity(64);
        for (i, (id, w)) in members.iter().enumerate() {
            let mut n = w * POINTS_PER_WEIGHT;
            if total > MAX_POINTS {
                n = (n * MAX_POINTS / total).max(1);
            }
            for p in 0..n {
                buf.clear();
                buf.extend_from_slice(id);
                buf.push(b'-');
                // No allocation per point: digits straight into the buffer.
                let _ = std::io::Write::write_fmt(&mut buf, format_args!("{p}"));
                points.push((hash_bytes(&buf, RING_SEED), i as u32));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// Rewrite member indexes; `f` must be increasing so tie order is kept.
    pub(crate) fn remap(&mut self, f: impl Fn(u32) -> u32) {
        for p in &mut self.points {
            p.1 = f(p.1);
        }
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Index of the first point at or after `key` (wrapping to 0).
    pub fn slot(&self, key: u64) -> usize {
        let i = self.points.partition_point(|&(h, _)| h < key);
        if i == self.points.len() {
            0
        } else {
            i
        }
    }

    /// Member at point `slot` (wrapping).
    pub fn at(&self, slot: usize) -> u32 {
        self.points[slot % self.points.len()].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_follow_weights() {
        let names = ["a", "b", "c"];
        let r = Ring::build(
            names
                .iter()
                .zip([1u32, 2, 1])
                .map(|(s, w)| (s.as_bytes(), w)),
        );
        assert_eq!(r.len(), 160 * 4);
        let b = (0..r.len()).filter(|&s| r.at(s) == 1).count();
        assert_eq!(b, 320);
    }

    #[test]
    fn wraps() {
        let r = Ring::build([(&b"a"[..], 1u32)].into_iter());
        assert_eq!(r.at(r.slot(u64::MAX)), 0);
    }
}
