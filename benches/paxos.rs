//! The consensus core in memory: commit throughput of one proposer with three acceptors, and
//! message rounds per commit with and without contention (from the deterministic simulation with
//! no faults).

use std::collections::BTreeMap;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use shoal::core::paxos::{Acceptor, Action, Outcome, Proposer, ProposerConfig};
use shoal::core::pool::{NodeId, PoolChange, Rules};
use shoal::sim::{run, SimConfig};

fn commit(p: &mut Proposer, accs: &mut BTreeMap<NodeId, Acceptor>, change: PoolChange) -> Outcome {
    let mut out = Vec::new();
    p.propose(
        change,
        Rules {
            cluster_size: 3,
            max_ejected_percent: 50,
            ..Rules::default()
        },
        0,
        &mut out,
    );
    let mut i = 0;
    while i < out.len() {
        match out[i].clone() {
            Action::Send(to, msg) => {
                if let Some((_, reply)) = accs.get_mut(&to).and_then(|a| a.handle(&msg)) {
                    p.on_message(&to, &reply, 0, &mut out);
                }
            }
            Action::Done(o) => return o,
            // No membership change in this bench.
            Action::SaveCounter(_) | Action::Moved(_) => {}
        }
        i += 1;
    }
    Outcome::Unknown
}

fn throughput(c: &mut Criterion) {
    let ids: Vec<NodeId> = ["a", "b", "c"].iter().map(|s| NodeId::new(*s)).collect();
    let mut accs: BTreeMap<NodeId, Acceptor> = ids
        .iter()
        .map(|i| (i.clone(), Acceptor::default()))
        .collect();
    let mut p = Proposer::new(ids[0].clone(), ids.clone(), ProposerConfig::default(), 0, 1);
    let backend = shoal::core::pool::Backend::new("w", "10.0.0.1:80", 1);
    commit(&mut p, &mut accs, PoolChange::AddBackend { backend });
    let mut w = 1;
    c.bench_function("commit (3 acceptors, in memory, set weight)", |b| {
        b.iter(|| {
            w = w % 999 + 1;
            black_box(commit(
                &mut p,
                &mut accs,
                PoolChange::SetWeight {
                    id: shoal::core::pool::BackendId::new("w"),
                    weight: w,
                },
            ))
        })
    });
}

fn rounds(_: &mut Criterion) {
    for (label, clients) in [
        (
            "no contention (1 client; each change through a random peer)",
            1usize,
        ),
        (
            "contention (3 clients on 3 peers, plus every peer's periodic read)",
            3,
        ),
    ] {
        let mut cfg = SimConfig::new(3);
        cfg.clients = clients;
        cfg.drop = 0.0;
        cfg.duplicate = 0.0;
        cfg.partitions = false;
        cfg.crashes = false;
        // Only the clients propose: peers' periodic catch-up reads would add contention.
        cfg.periodic_reads = clients > 1;
        let (mut commits, mut prepares, mut messages) = (0, 0, 0);
        for seed in 0..200 {
            let r = run(seed, &cfg).expect("no faults, no failures");
            commits += r.commits;
            prepares += r.prepares;
            messages += r.messages;
        }
        println!(
            "paxos rounds, {label}: {:.2} prepare rounds per commit, {:.1} messages per commit incl. learn pushes ({commits} commits)",
            prepares as f64 / 3.0 / commits as f64,
            messages as f64 / commits as f64
        );
    }
}

criterion_group!(benches, throughput, rounds);
criterion_main!(benches);
