//! Backend selection: per-request cost of round robin, Maglev and the ketama ring, and the
//! cost of building their tables, from 3 to 10,000 backends.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use shoal::core::balance::{hash, Algorithm, BalanceSpec, HashMethod, Selector, Usable};
use shoal::core::pool::{Backend, Pool, PoolChange, Rules};

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

fn pool(n: usize) -> Pool {
    let backends = (0..n)
        .map(|i| {
            Backend::new(
                format!("backend-{i}"),
                format!("10.0.{}.{}:80", i / 250, i % 250),
                1 + (i % 3) as u32,
            )
        })
        .collect();
    Pool::default()
        .apply(&PoolChange::seed(backends), &Rules::default())
        .unwrap()
}

const ALGS: [(&str, Algorithm); 3] = [
    ("round_robin", Algorithm::RoundRobin),
    ("maglev", Algorithm::ConsistentHash(HashMethod::Maglev)),
    ("ring", Algorithm::ConsistentHash(HashMethod::Ring)),
];

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for n in [3usize, 100, 10_000] {
        let p = pool(n);
        for (name, alg) in ALGS {
            let sel = Selector::build(
                &p,
                BalanceSpec {
                    algorithm: alg,
                    bounded_load: 0.0,
                },
            );
            let mut k = 0u64;
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    k = k.wrapping_add(1);
                    let key = hash::hash_key(&k.to_le_bytes());
                    black_box(sel.route(Some(key), false, &AllUp).next())
                })
            });
        }
    }
    g.finish();
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("build");
    g.sample_size(10);
    for n in [3usize, 100, 1_000, 10_000] {
        let p = pool(n);
        for (name, alg) in ALGS {
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    black_box(Selector::build(
                        &p,
                        BalanceSpec {
                            algorithm: alg,
                            bounded_load: 0.0,
                        },
                    ))
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, pick, build);
criterion_main!(benches);
