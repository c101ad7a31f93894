//! Backend selection: built once per pool version, then walked per request.
//!
//! `Selector::build` takes the agreed pool and returns tables over its non-draining backends
//! (the members, sorted by id). Per request, `Selector::route` walks the key's preference order
//! and skips what the caller says is unusable; it never looks at local health itself, so every
//! peer at the same version walks the same order and moves a key to the same next backend.

pub mod hash;
pub mod maglev;
pub mod ring;
pub mod rr;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::core::pool::{BackendId, BackendState, Pool};

pub use maglev::Maglev;
pub use ring::Ring;

/// How requests are spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Smooth weighted round robin.
    RoundRobin,
    /// Consistent hashing on the request's hash key.
    ConsistentHash(HashMethod),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashMethod {
    Maglev,
    Ring,
}

/// The balancing settings a selector is built with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BalanceSpec {
    pub algorithm: Algorithm,
    /// 0 = off; else no backend takes more than `bounded_load` × mean in-flight load.
    pub bounded_load: f64,
}

/// Slow start (`health.slow_start`): a backend usable since less than `slow_start_ms` before
/// `now_ms` takes `weight × max(0.1, elapsed / slow_start)` of round robin's turns, in
/// `RAMP_STEPS` steps. Consistent hashing ignores it (a key's backend does not move with load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ramp {
    /// The wall clock, Unix milliseconds (the pool's `usable_since` is one too).
    pub now_ms: u64,
    pub slow_start_ms: u64,
}

/// A ramp's resolution: the effective weight changes at most this many times.
pub const RAMP_STEPS: u32 = 50;

impl Ramp {
    /// The effective weight, scaled by `RAMP_STEPS` (a full weight is `weight × RAMP_STEPS`).
    fn scaled(&self, weight: u32, usable_since: u64) -> u32 {
        let elapsed = self.now_ms.saturating_sub(usable_since);
        if usable_since == 0 || self.slow_start_ms == 0 || elapsed >= self.slow_start_ms {
            return weight * RAMP_STEPS;
        }
        let step = (elapsed * u64::from(RAMP_STEPS) / self.slow_start_ms) as u32;
        weight * step.clamp(RAMP_STEPS / 10, RAMP_STEPS)
    }

    /// When the effective weight of a backend usable since `usable_since` next changes (None
    /// once it is whole).
    fn next_step(&self, usable_since: u64) -> Option<u64> {
        let elapsed = self.now_ms.saturating_sub(usable_since);
        if usable_since == 0 || self.slow_start_ms == 0 || elapsed >= self.slow_start_ms {
            return None;
        }
        let step = elapsed * u64::from(RAMP_STEPS) / self.slow_start_ms + 1;
        let step = step.max(u64::from(RAMP_STEPS / 10) + 1);
        Some(usable_since + step * self.slow_start_ms / u64::from(RAMP_STEPS))
    }
}

/// One member: a non-draining backend of the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: BackendId,
    /// The agreed weight (round robin's, scaled by a ramp, is in its table).
    pub weight: u32,
    /// Agreed down (`ejected`): in the table only when routing in panic.
    pub ejected: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Table {
    Empty,
    Cycle(Vec<u32>),
    Maglev(Maglev),
    Ring(Ring),
}

impl Table {
    fn build(
        algorithm: Algorithm,
        members: &[Member],
        ramped: Option<&[u32]>,
        subset: &[u32],
    ) -> Table {
        if subset.is_empty() {
            return Table::Empty;
        }
        let iter = || {
            subset.iter().map(|&i| {
                let m = &members[i as usize];
                (m.id.as_str().as_bytes(), m.weight)
            })
        };
        let remap = |v: u32| subset[v as usize];
        match algorithm {
            Algorithm::RoundRobin => {
                let weights: Vec<u32> = subset
                    .iter()
                    .map(|&i| ramped.map_or(members[i as usize].weight, |r| r[i as usize]))
                    .collect();
                Table::Cycle(rr::build_cycle(&weights).into_iter().map(remap).collect())
            }
            Algorithm::ConsistentHash(HashMethod::Maglev) => {
                let mut t = Maglev::build(iter());
                t.remap(remap);
                Table::Maglev(t)
            }
            Algorithm::ConsistentHash(HashMethod::Ring) => {
                let mut r = Ring::build(iter());
                r.remap(remap);
                Table::Ring(r)
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Table::Empty => 0,
            Table::Cycle(c) => c.len(),
            Table::Maglev(m) => m.len(),
            Table::Ring(r) => r.len(),
        }
    }

    fn start(&self, key: u64) -> usize {
        match self {
            Table::Empty => 0,
            Table::Cycle(c) => (key % c.len() as u64) as usize,
            Table::Maglev(m) => m.slot(key),
            Table::Ring(r) => r.slot(key),
        }
    }

    fn at(&self, pos: usize) -> u32 {
        match self {
            Table::Empty => u32::MAX,
            Table::Cycle(c) => c[pos % c.len()],
            Table::Maglev(m) => m.at(pos),
            Table::Ring(r) => r.at(pos),
        }
    }
}

/// Tables for one pool version.
#[derive(Debug)]
pub struct Selector {
    spec: BalanceSpec,
    members: Vec<Member>,
    /// Over active members only: what normal routing walks.
    active: Table,
    active_count: usize,
    /// Over every member (active and ejected), for panic routing; `None` when none is ejected.
    all: Option<Table>,
    cursor: AtomicU64,
    /// While a member ramps: when its effective weight next changes (Unix ms).
    next_step: Option<u64>,
}

/// What the caller knows about members at request time (local health, load).
pub trait Usable {
    /// This peer's own view: false when it has seen the member fail.
    fn usable(&self, member: u32) -> bool;
    /// Requests in flight to `member` (only asked when bounded load is on).
    fn inflight(&self, member: u32) -> u64;
    /// Requests in flight to all members.
    fn total_inflight(&self) -> u64;
}

impl Selector {
    /// Build the tables for `pool`: members are its non-draining backends in id order.
    pub fn build(pool: &Pool, spec: BalanceSpec) -> Selector {
        Self::build_ramped(pool, spec, None)
    }

    /// As `build`, with round robin's weights ramped where a member is still in its slow start
    /// at `ramp.now_ms`; `next_step` says when to build again.
    pub fn build_ramped(pool: &Pool, spec: BalanceSpec, ramp: Option<Ramp>) -> Selector {
        let ramp = ramp.filter(|r| r.slow_start_ms > 0);
        let mut ramped: Option<Vec<u32>> = None;
        let mut next_step = None;
        if let (Some(r), Algorithm::RoundRobin) = (ramp, spec.algorithm) {
            let members = pool
                .backends
                .values()
                .filter(|b| b.state != BackendState::Draining);
            for b in members.clone() {
                if let Some(at) = r.next_step(b.usable_since) {
                    next_step = Some(next_step.map_or(at, |n: u64| n.min(at)));
                }
            }
            if next_step.is_some() {
                ramped = Some(
                    members
                        .map(|b| r.scaled(b.weight, b.usable_since))
                        .collect(),
                );
            }
        }
        let members: Vec<Member> = pool
            .backends
            .values()
            .filter(|b| b.state != BackendState::Draining)
            .map(|b| Member {
                id: b.id.clone(),
                weight: b.weight,
                ejected: b.state == BackendState::Ejected,
            })
            .collect();
        let active: Vec<u32> = (0..members.len() as u32)
            .filter(|&i| !members[i as usize].ejected)
            .collect();
        let all: Vec<u32> = (0..members.len() as u32).collect();
        let ramped = ramped.as_deref();
        let active_table = Table::build(spec.algorithm, &members, ramped, &active);
        let all_table = if active.len() == all.len() {
            None
        } else {
            Some(Table::build(spec.algorithm, &members, ramped, &all))
        };
        Selector {
            spec,
            active_count: active.len(),
            members,
            active: active_table,
            all: all_table,
            cursor: AtomicU64::new(0),
            next_step,
        }
    }

    /// While some member is in its slow start: when its share next grows (Unix ms).
    pub fn next_step(&self) -> Option<u64> {
        self.next_step
    }

    pub fn spec(&self) -> BalanceSpec {
        self.spec
    }

    /// Non-draining backends of the pool, in id order; route() yields indexes into this.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// True when fewer than `panic_below_percent` of the members are usable (active and up
    /// here). The caller evaluates it when health or the pool changes, not per request.
    pub fn in_panic(&self, panic_below_percent: u8, usable: impl Fn(u32) -> bool) -> bool {
        if self.members.is_empty() || panic_below_percent == 0 {
            return false;
        }
        let ok = (0..self.members.len() as u32)
            .filter(|&i| !self.members[i as usize].ejected && usable(i))
            .count();
        ok * 100 < self.members.len() * usize::from(panic_below_percent)
    }

    /// The preference order for one request. `key` is the hash of the request's hash key
    /// (ignored by round robin; `None` spreads like round robin). In panic, every member is a
    /// candidate regardless of health and ejection.
    pub fn route<'a, U: Usable>(
        &'a self,
        key: Option<u64>,
        panic: bool,
        usable: &'a U,
    ) -> Route<'a, U> {
        let table = if panic {
            self.all.as_ref().unwrap_or(&self.active)
        } else {
            &self.active
        };
        let distinct = if panic {
            self.members.len()
        } else {
            self.active_count
        };
        let key = match (self.spec.algorithm, key) {
            (Algorithm::ConsistentHash(_), Some(k)) => k,
            _ => self.cursor.fetch_add(1, Ordering::Relaxed),
        };
        let cap = if self.spec.bounded_load > 0.0 && !panic && self.active_count > 0 {
            let total = usable.total_inflight() + 1;
            let cap = (self.spec.bounded_load * total as f64 / self.active_count as f64).ceil();
            Some(cap.max(1.0) as u64)
        } else {
            None
        };
        Route {
            walk: Walk {
                table,
                pos: table.start(key),
                steps: 0,
                distinct,
                yielded: 0,
                seen: Seen::default(),
            },
            panic,
            usable,
            cap,
            overloaded: Vec::new(),
        }
    }
}

/// A walk of a table from a key's slot, yielding each member once.
struct Walk<'a> {
    table: &'a Table,
    pos: usize,
    steps: usize,
    distinct: usize,
    yielded: usize,
    seen: Seen,
}

impl Iterator for Walk<'_> {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        let len = self.table.len();
        while self.yielded < self.distinct && self.steps < len {
            let m = self.table.at(self.pos);
            self.pos += 1;
            self.steps += 1;
            if self.seen.insert(m) {
                self.yielded += 1;
                return Some(m);
            }
        }
        None
    }
}

/// Members already yielded: inline for the usual handful, a bitset beyond.
#[derive(Default)]
struct Seen {
    inline: [u32; 8],
    n: usize,
    bits: Vec<u64>,
}

impl Seen {
    fn insert(&mut self, m: u32) -> bool {
        if self.bits.is_empty() {
            if self.inline[..self.n].contains(&m) {
                return false;
            }
            if self.n < self.inline.len() {
                self.inline[self.n] = m;
                self.n += 1;
                return true;
            }
            // Spill to a bitset.
            let mut bits = Vec::new();
            for &x in &self.inline[..self.n] {
                set_bit(&mut bits, x);
            }
            self.bits = bits;
        }
        let word = (m / 64) as usize;
        if word < self.bits.len() && self.bits[word] & (1 << (m % 64)) != 0 {
            return false;
        }
        set_bit(&mut self.bits, m);
        true
    }
}

fn set_bit(bits: &mut Vec<u64>, m: u32) {
    let word = (m / 64) as usize;
    if bits.len() <= word {
        bits.resize(word + 1, 0);
    }
    bits[word] |= 1 << (m % 64);
}

/// Candidates for one request, best first, each at most once.
pub struct Route<'a, U> {
    walk: Walk<'a>,
    panic: bool,
    usable: &'a U,
    cap: Option<u64>,
    /// Usable members skipped for load: tried last, in preference order.
    overloaded: Vec<u32>,
}

impl<U: Usable> Iterator for Route<'_, U> {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        for m in self.walk.by_ref() {
            if self.panic {
                return Some(m);
            }
            if !self.usable.usable(m) {
                continue;
            }
            if let Some(cap) = self.cap {
                if self.usable.inflight(m) + 1 > cap {
                    self.overloaded.push(m);
                    continue;
                }
            }
            return Some(m);
        }
        if self.overloaded.is_empty() {
            None
        } else {
            Some(self.overloaded.remove(0))
        }
    }
}

#[cfg(test)]
mod tests;
