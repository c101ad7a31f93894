//! Selector tests: golden key-to-backend vectors, spread, minimal remapping, skipping.

use proptest::prelude::*;

use super::*;
use crate::core::pool::{Backend, Pool, PoolChange, Rules};

fn pool(n: usize) -> Pool {
    let backends = (0..n)
        .map(|i| Backend::new(format!("web-{i}"), format!("10.0.0.{i}:80"), 1))
        .collect();
    Pool::default()
        .apply(&PoolChange::seed(backends), &Rules::default())
        .unwrap()
}

fn spec(algorithm: Algorithm) -> BalanceSpec {
    BalanceSpec {
        algorithm,
        bounded_load: 0.0,
    }
}

const MAGLEV: Algorithm = Algorithm::ConsistentHash(HashMethod::Maglev);
const RING: Algorithm = Algorithm::ConsistentHash(HashMethod::Ring);

/// Everything usable, no load.
struct AllUp;
impl Usable for AllUp {
    fn usable(&self, _: u32) -> bool {
        true
    }
    fn inflight(&self, _: u32) -> u64 {
        0
    }
    fn total_inflight(&self) -> u64 {
        0
    }
}

struct Down(Vec<u32>);
impl Usable for Down {
    fn usable(&self, m: u32) -> bool {
        !self.0.contains(&m)
    }
    fn inflight(&self, _: u32) -> u64 {
        0
    }
    fn total_inflight(&self) -> u64 {
        0
    }
}

fn first(sel: &Selector, key: &str) -> String {
    let m = sel
        .route(Some(hash::hash_key(key.as_bytes())), false, &AllUp)
        .next()
        .unwrap();
    sel.members()[m as usize].id.to_string()
}

/// Golden vectors: a change here remaps keys in running clusters, which must be deliberate.
#[test]
fn golden_vectors() {
    let p = pool(5);
    let maglev = Selector::build(&p, spec(MAGLEV));
    let ring = Selector::build(&p, spec(RING));
    let keys = ["alice", "bob", "carol", "dave", "/cart", "10.1.2.3"];
    let got_m: Vec<String> = keys.iter().map(|k| first(&maglev, k)).collect();
    let got_r: Vec<String> = keys.iter().map(|k| first(&ring, k)).collect();
    assert_eq!(got_m, GOLDEN_MAGLEV, "maglev golden vector changed");
    assert_eq!(got_r, GOLDEN_RING, "ring golden vector changed");
}

const GOLDEN_MAGLEV: [&str; 6] = ["web-4", "web-3", "web-3", "web-0", "web-2", "web-2"];
const GOLDEN_RING: [&str; 6] = ["web-4", "web-4", "web-4", "web-3", "web-2", "web-1"];

#[test]
fn round_robin_rotates_and_retries_elsewhere() {
    let sel = Selector::build(&pool(3), spec(Algorithm::RoundRobin));
    let firsts: Vec<u32> = (0..6)
        .map(|_| sel.route(None, false, &AllUp).next().unwrap())
        .collect();
    assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
    let all: Vec<u32> = sel.route(None, false, &AllUp).collect();
    assert_eq!(all.len(), 3, "each member once: {all:?}");
}

#[test]
fn same_pool_same_tables_on_every_peer() {
    for alg in [MAGLEV, RING, Algorithm::RoundRobin] {
        let a = Selector::build(&pool(9), spec(alg));
        let b = Selector::build(&pool(9), spec(alg));
        assert_eq!(a.active, b.active);
    }
}

#[test]
fn draining_is_not_a_member_and_ejected_only_in_panic() {
    let mut p = pool(4);
    let r = Rules {
        cluster_size: 1,
        max_ejected_percent: 50,
        ..Rules::default()
    };
    p = p
        .apply(
            &PoolChange::SetState {
                id: BackendId::new("web-0"),
                draining: true,
            },
            &r,
        )
        .unwrap();
    p = p
        .apply(
            &PoolChange::VoteDown {
                id: BackendId::new("web-1"),
                peer: crate::core::pool::NodeId::new("a"),
            },
            &r,
        )
        .unwrap();
    let sel = Selector::build(&p, spec(MAGLEV));
    let ids: Vec<&str> = sel.members().iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, vec!["web-1", "web-2", "web-3"]);
    let normal: Vec<u32> = sel.route(Some(1), false, &AllUp).collect();
    assert_eq!(normal.len(), 2);
    assert!(!normal.contains(&0), "ejected web-1 skipped");
    let panic: Vec<u32> = sel.route(Some(1), true, &AllUp).collect();
    assert_eq!(panic.len(), 3);
    // 1 of 3 usable (web-1 ejected, web-2 down): below 50% -> panic.
    assert!(sel.in_panic(50, |m| m != 1));
    assert!(!sel.in_panic(50, |_| true));
}

#[test]
fn bounded_load_skips_the_hot_backend() {
    struct Hot;
    impl Usable for Hot {
        fn usable(&self, _: u32) -> bool {
            true
        }
        fn inflight(&self, m: u32) -> u64 {
            if m == 0 {
                10
            } else {
                0
            }
        }
        fn total_inflight(&self) -> u64 {
            10
        }
    }
    let mut s = spec(MAGLEV);
    s.bounded_load = 1.25;
    let sel = Selector::build(&pool(3), s);
    for k in 0..200u64 {
        let key = hash::hash_key(&k.to_le_bytes());
        assert_ne!(sel.route(Some(key), false, &Hot).next(), Some(0));
        // ...but it is still the last resort.
        assert_eq!(sel.route(Some(key), false, &Hot).count(), 3);
    }
}

fn spread(alg: Algorithm, n: usize) -> Vec<usize> {
    let sel = Selector::build(&pool(n), spec(alg));
    let mut c = vec![0usize; n];
    for k in 0..20_000u32 {
        let m = sel
            .route(Some(hash::hash_key(&k.to_le_bytes())), false, &AllUp)
            .next()
            .unwrap();
        c[m as usize] += 1;
    }
    c
}

#[test]
fn spread_is_even() {
    for (alg, tol) in [(MAGLEV, 0.15), (RING, 0.35)] {
        for n in [3usize, 10] {
            let c = spread(alg, n);
            let mean = 20_000.0 / n as f64;
            for &x in &c {
                assert!((x as f64 - mean).abs() / mean < tol, "{alg:?} {n}: {c:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Removing one backend moves only (about) the keys it had; adding one moves about 1/(n+1).
    #[test]
    fn minimal_remapping(n in 3usize..12, victim in 0usize..12, maglev in any::<bool>()) {
        let alg = if maglev { MAGLEV } else { RING };
        let victim = victim % n;
        let full = pool(n);
        let mut less = full.clone();
        less.backends.remove(&BackendId::new(format!("web-{victim}")));
        let a = Selector::build(&full, spec(alg));
        let b = Selector::build(&less, spec(alg));
        let mut moved_other = 0;
        let keys = 4000u32;
        for k in 0..keys {
            let key = hash::hash_key(&k.to_be_bytes());
            let before = first_id(&a, key);
            let after = first_id(&b, key);
            if before != format!("web-{victim}") && before != after {
                moved_other += 1;
            }
        }
        // Maglev moves a few extra keys by design; the ring moves none.
        let bound = if maglev { keys / 10 } else { 0 };
        prop_assert!(moved_other <= bound, "{} keys of surviving backends moved", moved_other);
    }

    /// A down backend's keys go to their next preference, and nobody else's keys move.
    #[test]
    fn skip_moves_only_the_down_backends_keys(n in 2usize..10, down in 0u32..10, alg in 0u8..3) {
        let alg = [MAGLEV, RING, Algorithm::RoundRobin][alg as usize];
        let down = down % n as u32;
        let sel = Selector::build(&pool(n), spec(alg));
        if alg != Algorithm::RoundRobin {
            for k in 0..500u32 {
                let key = hash::hash_key(&k.to_le_bytes());
                let pref: Vec<u32> = sel.route(Some(key), false, &AllUp).collect();
                let with_down: Vec<u32> = sel.route(Some(key), false, &Down(vec![down])).collect();
                let expect: Vec<u32> = pref.iter().copied().filter(|&m| m != down).collect();
                prop_assert_eq!(with_down, expect);
            }
        } else {
            let got: Vec<u32> = sel.route(None, false, &Down(vec![down])).collect();
            prop_assert_eq!(got.len(), n - 1);
            prop_assert!(!got.contains(&down));
        }
    }
}

fn first_id(sel: &Selector, key: u64) -> String {
    let m = sel.route(Some(key), false, &AllUp).next().unwrap();
    sel.members()[m as usize].id.to_string()
}

#[test]
fn empty_pool_routes_nowhere() {
    for alg in [MAGLEV, RING, Algorithm::RoundRobin] {
        let sel = Selector::build(&Pool::default(), spec(alg));
        assert_eq!(sel.route(Some(7), false, &AllUp).next(), None);
        assert_eq!(sel.route(Some(7), true, &AllUp).next(), None);
    }
}

/// Slow start: round robin gives a backend in its ramp `max(0.1, elapsed / slow_start)` of its
/// weight's turns, in steps, and says when to rebuild; consistent hashing ignores the ramp.
#[test]
fn slow_start_ramps_round_robin_only() {
    let mut p = pool(3);
    for (i, b) in p.backends.values_mut().enumerate() {
        b.usable_since = if i == 2 { 10_000 } else { 0 };
    }
    let share = |now_ms: u64| {
        let ramp = Ramp {
            now_ms,
            slow_start_ms: 10_000,
        };
        let sel = Selector::build_ramped(&p, spec(Algorithm::RoundRobin), Some(ramp));
        let n = 2_000;
        let hits = (0..n)
            .filter(|_| sel.route(None, false, &AllUp).next() == Some(2))
            .count();
        (hits as f64 / n as f64, sel.next_step())
    };
    // Just usable: 10% of a weight of 1 against two of 1: 0.1 / 2.1.
    let (s, next) = share(10_000);
    assert!((s - 0.1 / 2.1).abs() < 0.01, "{s}");
    assert_eq!(next, Some(11_200));
    // Half way: 0.5 / 2.5.
    let (s, next) = share(15_000);
    assert!((s - 0.2).abs() < 0.01, "{s}");
    assert_eq!(next, Some(15_200));
    // Done: a third, nothing more to rebuild for.
    let (s, next) = share(20_000);
    assert!((s - 1.0 / 3.0).abs() < 0.01, "{s}");
    assert_eq!(next, None);
    // Consistent hashing: the same table as without a ramp.
    let ramp = Some(Ramp {
        now_ms: 10_000,
        slow_start_ms: 10_000,
    });
    let ramped = Selector::build_ramped(&p, spec(MAGLEV), ramp);
    let plain = Selector::build(&p, spec(MAGLEV));
    for k in 0..500u64 {
        let key = format!("user-{k}");
        assert_eq!(first(&ramped, &key), first(&plain, &key));
    }
    assert_eq!(ramped.next_step(), None);
}
