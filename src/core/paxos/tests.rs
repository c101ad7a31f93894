//! Unit tests of the acceptor and proposer rules; section numbers cite the CASPaxos paper
//! (arXiv 1802.07000v3).

use super::*;
use crate::core::pool::{Backend, BackendId, ChangeError, PoolChange, Rules};

fn n(s: &str) -> NodeId {
    NodeId::new(s)
}

fn b(c: u64, node: &str) -> Ballot {
    Ballot::new(c, n(node))
}

/// §2.2 (acceptor, prepare): a promise only for a ballot above everything seen; a conflict
/// returns the highest ballot seen.
#[test]
fn acceptor_prepare_rules() {
    let mut a = Acceptor::default();
    let (changed, reply) = a.handle(&Msg::Prepare { ballot: b(2, "a") }).unwrap();
    assert!(changed);
    assert!(matches!(reply, Msg::Promise { .. }));
    // Equal or lower: conflict with the promise.
    for low in [b(2, "a"), b(1, "z"), b(2, "0")] {
        let (changed, reply) = a
            .handle(&Msg::Prepare {
                ballot: low.clone(),
            })
            .unwrap();
        assert!(!changed);
        assert_eq!(
            reply,
            Msg::Conflict {
                ballot: low,
                seen: b(2, "a")
            }
        );
    }
    assert_eq!(a.state().promised, b(2, "a"));
}

/// §2.2 (acceptor, accept): refuse below the promise or at/below the accepted ballot.
#[test]
fn acceptor_accept_rules() {
    let mut a = Acceptor::default();
    a.handle(&Msg::Prepare { ballot: b(5, "a") });
    let v = Pool {
        version: 1,
        ..Pool::default()
    };
    let (_, r) = a
        .handle(&Msg::Accept {
            ballot: b(4, "z"),
            value: v.clone(),
        })
        .unwrap();
    assert_eq!(
        r,
        Msg::Conflict {
            ballot: b(4, "z"),
            seen: b(5, "a")
        }
    );
    let (changed, r) = a
        .handle(&Msg::Accept {
            ballot: b(5, "a"),
            value: v.clone(),
        })
        .unwrap();
    assert!(changed);
    assert_eq!(r, Msg::Accepted { ballot: b(5, "a") });
    // A duplicate accept of the same ballot is refused (ballots are unique).
    let (changed, _) = a
        .handle(&Msg::Accept {
            ballot: b(5, "a"),
            value: v.clone(),
        })
        .unwrap();
    assert!(!changed);
    // A prepare must now beat the accepted ballot too.
    let (_, r) = a.handle(&Msg::Prepare { ballot: b(5, "a") }).unwrap();
    assert!(matches!(r, Msg::Conflict { .. }));
    // An accept with a higher ballot and no prepare raises the promise with it.
    a.handle(&Msg::Accept {
        ballot: b(9, "c"),
        value: v,
    });
    assert_eq!(a.state().promised, b(9, "c"));
    assert_eq!(a.state().accepted, b(9, "c"));
}

/// Deliver every message in `out` synchronously to in-memory acceptors; return the outcome.
fn run(
    p: &mut Proposer,
    accs: &mut BTreeMap<NodeId, Acceptor>,
    mut out: Vec<Action>,
) -> Option<Outcome> {
    let mut saved = Vec::new();
    while let Some(a) = (!out.is_empty()).then(|| out.remove(0)) {
        match a {
            Action::Send(to, msg) => {
                if let Some(acc) = accs.get_mut(&to) {
                    if let Some((_, reply)) = acc.handle(&msg) {
                        let mut more = Vec::new();
                        p.on_message(&to, &reply, 0, &mut more);
                        out.extend(more);
                    }
                }
            }
            Action::SaveCounter(c) => saved.push(c),
            Action::Done(o) => return Some(o),
            Action::Moved(p) => panic!("no membership change here, yet moved to {}", p.epoch),
        }
    }
    None
}

use std::collections::BTreeMap;

fn cluster() -> (Proposer, BTreeMap<NodeId, Acceptor>) {
    let ids = vec![n("a"), n("b"), n("c")];
    let accs = ids
        .iter()
        .map(|i| (i.clone(), Acceptor::default()))
        .collect();
    (
        Proposer::new(n("a"), ids, ProposerConfig::default(), 0, 1),
        accs,
    )
}

/// §2.2 (proposer): prepare, take the highest accepted value, apply, accept.
#[test]
fn proposer_commits_and_reads_back() {
    let (mut p, mut accs) = cluster();
    let rules = Rules {
        cluster_size: 3,
        max_ejected_percent: 50,
        ..Rules::default()
    };
    let mut out = Vec::new();
    let add = PoolChange::AddBackend {
        backend: Backend::new("w", "127.0.0.1:1", 1),
    };
    assert!(p.propose(add.clone(), rules, 0, &mut out));
    assert_eq!(out[0], Action::SaveCounter(1 + 1000));
    let Some(Outcome::Committed(pool)) = run(&mut p, &mut accs, out) else {
        panic!()
    };
    assert_eq!(pool.version, 1);
    let mut out = Vec::new();
    p.propose(add, rules, 0, &mut out);
    let Some(Outcome::Rejected(ChangeError::Exists(_), pool)) = run(&mut p, &mut accs, out) else {
        panic!()
    };
    assert_eq!(pool.version, 1);
    let mut out = Vec::new();
    p.propose(PoolChange::Read, rules, 0, &mut out);
    assert_eq!(run(&mut p, &mut accs, out), Some(Outcome::Committed(pool)));
}

/// §2.2.1: on a conflict the proposer fast-forwards its counter past the ballot that beat it.
#[test]
fn conflict_fast_forwards() {
    let (mut p, mut accs) = cluster();
    for a in accs.values_mut() {
        a.handle(&Msg::Prepare { ballot: b(50, "z") });
    }
    let mut out = Vec::new();
    p.propose(PoolChange::Read, Rules::default(), 0, &mut out);
    assert_eq!(run(&mut p, &mut accs, out), None, "conflicts, backs off");
    let mut out = Vec::new();
    let wake = p.next_wakeup().unwrap();
    p.tick(wake, &mut out);
    let Some(Action::Send(_, Msg::Prepare { ballot })) =
        out.iter().find(|a| matches!(a, Action::Send(..))).cloned()
    else {
        panic!("{out:?}")
    };
    assert_eq!(ballot, b(51, "a"));
    assert!(matches!(
        run(&mut p, &mut accs, out),
        Some(Outcome::Committed(_))
    ));
}

/// A restarted proposer resumes above its persisted reservation: ballots are never reused.
#[test]
fn restart_never_reuses_a_ballot() {
    let p = Proposer::new(n("a"), vec![n("a")], ProposerConfig::default(), 1_001, 7);
    let mut p = p;
    let mut out = Vec::new();
    p.propose(PoolChange::Read, Rules::default(), 0, &mut out);
    let prepare = out.iter().find_map(|a| match a {
        Action::Send(_, Msg::Prepare { ballot }) => Some(ballot.clone()),
        _ => None,
    });
    assert_eq!(prepare, Some(b(1_002, "a")));
    assert_eq!(out[0], Action::SaveCounter(2_002));
}

/// A timeout after a real change was sent to acceptors leaves the outcome unknown; one before
/// gives "not applied" once the deadline passes.
#[test]
fn timeouts_report_unknown_or_not_applied() {
    let (mut p, _) = cluster();
    let mut out = Vec::new();
    let change = PoolChange::AddBackend {
        backend: Backend::new("w", "127.0.0.1:1", 1),
    };
    p.propose(change.clone(), Rules::default(), 0, &mut out);
    let mut t;
    let outcome = loop {
        t = p.next_wakeup().unwrap();
        let mut out = Vec::new();
        p.tick(t, &mut out);
        if let Some(Action::Done(o)) = out.into_iter().find(|a| matches!(a, Action::Done(_))) {
            break o;
        }
    };
    assert_eq!(outcome, Outcome::NotApplied);
    assert!(t >= ProposerConfig::default().deadline);

    // Promises arrive, accepts go out, then silence.
    let (mut p, _) = cluster();
    let mut out = Vec::new();
    p.propose(change, Rules::default(), 0, &mut out);
    let Some(Action::Send(_, Msg::Prepare { ballot })) = out.get(1).cloned() else {
        panic!()
    };
    let mut out = Vec::new();
    for who in ["a", "b"] {
        p.on_message(
            &n(who),
            &Msg::Promise {
                ballot: ballot.clone(),
                accepted: Ballot::zero(),
                value: Pool::default(),
            },
            0,
            &mut out,
        );
    }
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::Send(_, Msg::Accept { .. }))));
    // Retries (the change is tagged, so a retry cannot apply it twice) until the deadline.
    let outcome = loop {
        let mut out = Vec::new();
        p.tick(p.next_wakeup().unwrap(), &mut out);
        if let Some(Action::Done(o)) = out.into_iter().find(|a| matches!(a, Action::Done(_))) {
            break o;
        }
    };
    assert_eq!(outcome, Outcome::Unknown);
}

/// An accept that went unanswered but was in fact chosen: the retry finds the change in the
/// pool and reports it committed instead of applying it again (an add would otherwise fail
/// with "exists").
#[test]
fn a_retry_never_applies_a_change_twice() {
    let (mut p, mut accs) = cluster();
    let rules = Rules {
        cluster_size: 3,
        max_ejected_percent: 50,
        ..Rules::default()
    };
    let add = PoolChange::AddBackend {
        backend: Backend::new("w", "127.0.0.1:1", 1),
    };
    let mut out = Vec::new();
    p.propose(add, rules, 0, &mut out);
    // Deliver prepares and promises, then let the accepts reach a and b but drop the replies.
    let prepares: Vec<_> = out
        .drain(..)
        .filter(|a| matches!(a, Action::Send(..)))
        .collect();
    let mut accepts = Vec::new();
    for a in prepares {
        let Action::Send(to, msg) = a else { continue };
        let (_, reply) = accs.get_mut(&to).unwrap().handle(&msg).unwrap();
        p.on_message(&to, &reply, 0, &mut accepts);
    }
    for a in accepts {
        if let Action::Send(to, msg @ Msg::Accept { .. }) = a {
            if to != n("c") {
                accs.get_mut(&to).unwrap().handle(&msg);
            }
        }
    }
    // The phase times out; the retry reads the pool that already holds the change.
    let mut outcome = None;
    for _ in 0..20 {
        let mut out = Vec::new();
        p.tick(p.next_wakeup().unwrap(), &mut out);
        if let Some(o) = run(&mut p, &mut accs, out) {
            outcome = Some(o);
            break;
        }
    }
    let Some(Outcome::AlreadyCommitted(pool)) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(pool.version, 1);
    assert_eq!(pool.backends.len(), 1);
}

// ---- The Node: persistence carried by the type, lost disks, forming, forcing ----

const CFG: ProposerConfig = ProposerConfig {
    phase_timeout: 100,
    deadline: 1_000,
    backoff_base: 10,
    backoff_cap: 50,
};

/// A pool formed by its seed (one backend).
fn formed_pool() -> Pool {
    Pool::default()
        .apply(
            &PoolChange::seed(vec![Backend::new("w", "10.0.0.1:80", 1)]),
            &Rules::default(),
        )
        .unwrap()
}

fn ids(names: &[&str]) -> Vec<NodeId> {
    names.iter().map(|s| n(s)).collect()
}

/// A voting node with state (a formed cluster's voter after a restart).
fn voter(id: &str) -> Node {
    Node::new(
        n(id),
        ids(&["a", "b", "c"]),
        CFG,
        Some(Durable::default()),
        Pool::default(),
        1,
    )
}

/// Drive `ready` and an always-successful write; everything that came out.
fn flush(node: &mut Node) -> Effects {
    let mut ready = node.ready();
    if let Some(w) = ready.write.take() {
        let held = node.written(w, true);
        ready.now.messages.extend(held.messages);
        ready.now.outcomes.extend(held.outcomes);
        ready.now.learned = held.learned.or(ready.now.learned);
    }
    ready.now
}

/// §2.2: a promise leaves only after the promised state is written; nothing is sent at once.
#[test]
fn node_replies_only_after_its_state_is_written() {
    let mut a = voter("a");
    a.step(&n("b"), Msg::Prepare { ballot: b(5, "b") }, 0);
    let ready = a.ready();
    assert!(
        ready.now.messages.is_empty(),
        "nothing leaves before the write"
    );
    let write = ready.write.expect("the promise must be written");
    assert_eq!(write.state.acceptor.promised, b(5, "b"));
    let out = a.written(write, true);
    assert!(matches!(out.messages.as_slice(), [(to, Msg::Promise { .. })] if *to == n("b")));
    // An answer that changes nothing (a conflict) needs no write and leaves at once.
    a.step(&n("c"), Msg::Prepare { ballot: b(4, "c") }, 0);
    let ready = a.ready();
    assert!(ready.write.is_none());
    assert!(matches!(
        ready.now.messages.as_slice(),
        [(_, Msg::Conflict { .. })]
    ));
}

/// A failed write sends nothing, rolls back to the disk's state, and the next round reserves its
/// counter again before any ballot leaves.
#[test]
fn a_failed_write_sends_nothing_and_rolls_back() {
    let mut a = voter("a");
    assert!(a.propose(PoolChange::Read, Rules::default(), 0));
    let ready = a.ready();
    let write = ready
        .write
        .expect("the counter reservation and own promise");
    assert!(write.state.counter_reserved > 0);
    let lost = a.written(write, false);
    assert!(
        lost.messages.is_empty(),
        "no prepare leaves without its reservation"
    );
    assert_eq!(lost.outcomes, vec![Outcome::NotApplied]);
    // The node is as its disk: its own earlier promise is gone, and a new round saves again.
    a.step(&n("b"), Msg::Prepare { ballot: b(1, "b") }, 0);
    let out = flush(&mut a);
    assert!(matches!(
        out.messages.as_slice(),
        [(_, Msg::Promise { .. })]
    ));
    assert!(a.propose(PoolChange::Read, Rules::default(), 10));
    let write = a.ready().write.expect("a new reservation");
    assert!(write.state.counter_reserved > 0);
}

/// DESIGN 3.1: a voter without state answers no prepare or accept until an identity round
/// through the other voters committed; then it promises above that round and votes.
#[test]
fn a_voter_without_state_catches_up_before_it_votes() {
    let mut fresh = Node::new(n("b"), ids(&["a", "b", "c"]), CFG, None, Pool::default(), 7);
    assert_eq!(fresh.consensus(), Consensus::CatchingUp);
    fresh.step(&n("a"), Msg::Prepare { ballot: b(3, "a") }, 0);
    let out = flush(&mut fresh);
    assert!(
        matches!(
            out.messages.as_slice(),
            [(_, Msg::NotVoting { formed: false, .. })]
        ),
        "{out:?}"
    );
    // While catching up, it takes no change but the catch-up round, which goes to the other
    // voters only.
    let change = PoolChange::RemoveBackend {
        id: crate::core::pool::BackendId::new("x"),
    };
    assert!(!fresh.propose(change, Rules::default(), 0));
    assert!(flush(&mut fresh).messages.is_empty());
    assert!(fresh.propose(PoolChange::Read, Rules::default(), 0));
    let out = flush(&mut fresh);
    let prepares: Vec<_> = out
        .messages
        .iter()
        .filter_map(|(to, m)| match m {
            Msg::Prepare { ballot } => Some((to.clone(), ballot.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        prepares
            .iter()
            .map(|(to, _)| to.clone())
            .collect::<Vec<_>>(),
        ids(&["a", "c"])
    );
    let round = prepares[0].1.clone();
    // a and c hold a formed pool; they promise, then accept the write-back.
    let formed = formed_pool();
    for from in ["a", "c"] {
        fresh.step(
            &n(from),
            Msg::Promise {
                ballot: round.clone(),
                accepted: b(2, "a"),
                value: formed.clone(),
            },
            1,
        );
    }
    let out = flush(&mut fresh);
    assert!(out
        .messages
        .iter()
        .any(|(_, m)| matches!(m, Msg::Accept { .. })));
    for from in ["a", "c"] {
        fresh.step(
            &n(from),
            Msg::Accepted {
                ballot: round.clone(),
            },
            2,
        );
    }
    let ready = fresh.ready();
    let write = ready.write.expect("voting is written before it counts");
    assert!(write.state.voting);
    assert!(write.state.acceptor.promised >= round);
    let out = fresh.written(write, true);
    // The round committed the fence: what it read, one epoch and one version up.
    let [Outcome::Committed(fenced)] = out.outcomes.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(fenced.backends, formed.backends);
    assert_eq!(
        (fenced.epoch, fenced.version),
        (formed.epoch + 1, formed.version + 1)
    );
    assert_eq!(fresh.consensus(), Consensus::Voting);
    // It refuses every ballot up to the one it caught up with, and votes above it.
    fresh.step(&n("a"), Msg::Prepare { ballot: b(2, "z") }, 3);
    let replies = flush(&mut fresh).messages;
    assert!(
        replies
            .iter()
            .any(|(_, m)| matches!(m, Msg::Conflict { .. })),
        "{replies:?}"
    );
    fresh.step(
        &n("a"),
        Msg::Prepare {
            ballot: b(round.counter + 1, "a"),
        },
        3,
    );
    let replies = flush(&mut fresh).messages;
    assert!(
        replies
            .iter()
            .any(|(_, m)| matches!(m, Msg::Promise { .. })),
        "{replies:?}"
    );
}

/// A caught-up voter holds the value its catch-up wrote back, under the round's ballot: the
/// write-back then reached a majority of all the voters (here 2 of the other 3 and itself, of 4).
/// Were it to hold nothing, a second wipe could lose a commit: n0 commits v via {n0, n2, n3}
/// (n1 missed it); n3 wiped catches up via {n0, n2}; n2 wiped; n2 catching up via {n1, n3}
/// would read only the value before v and write it back at v's version. With n3 holding v, n2
/// reads v from it.
#[test]
fn a_caught_up_voter_holds_what_it_caught_up_with() {
    let mut fresh = Node::new(
        n("d"),
        ids(&["a", "b", "c", "d"]),
        CFG,
        None,
        Pool::default(),
        3,
    );
    assert!(fresh.propose(PoolChange::Read, Rules::default(), 0));
    let out = flush(&mut fresh);
    let Some((_, Msg::Prepare { ballot })) = out.messages.first().cloned() else {
        panic!("{out:?}")
    };
    let formed = formed_pool();
    // n1 (here b) missed the commit: it still holds nothing; a and c hold the value.
    for from in ["a", "c"] {
        fresh.step(
            &n(from),
            Msg::Promise {
                ballot: ballot.clone(),
                accepted: b(2, "a"),
                value: formed.clone(),
            },
            1,
        );
    }
    let out = flush(&mut fresh);
    // The write-back is the fence: what a and c hold, one epoch up.
    let fenced = out
        .messages
        .iter()
        .find_map(|(_, m)| match m {
            Msg::Accept { value, .. } => Some(value.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{out:?}"));
    assert_eq!(
        (fenced.backends.clone(), fenced.epoch),
        (formed.backends.clone(), formed.epoch + 1)
    );
    for from in ["a", "c"] {
        fresh.step(
            &n(from),
            Msg::Accepted {
                ballot: ballot.clone(),
            },
            2,
        );
    }
    let ready = fresh.ready();
    let write = ready
        .write
        .expect("the caught-up state is written before it votes");
    assert!(write.state.voting);
    assert_eq!(
        write.state.acceptor.value, fenced,
        "the caught-up voter holds nothing"
    );
    assert_eq!(write.state.acceptor.accepted, ballot);
    let out = fresh.written(write, true);
    assert_eq!(out.outcomes, vec![Outcome::Committed(fenced.clone())]);
    // A later catch-up that reads it gets the value, not the one before.
    fresh.step(
        &n("b"),
        Msg::Prepare {
            ballot: b(ballot.counter + 5, "b"),
        },
        3,
    );
    let out = flush(&mut fresh);
    assert!(
        out.messages
            .iter()
            .any(|(_, m)| matches!(m, Msg::Promise { value, .. } if *value == fenced)),
        "{out:?}"
    );
}

/// A brand-new cluster: every other voter says it knows no formed pool, so the node votes.
/// One voter with state among them keeps it catching up.
#[test]
fn a_brand_new_cluster_forms_and_a_formed_one_is_not_mistaken_for_new() {
    let start = |seed| {
        Node::new(
            n("a"),
            ids(&["a", "b", "c"]),
            CFG,
            None,
            Pool::default(),
            seed,
        )
    };
    let mut a = start(1);
    assert!(a.propose(PoolChange::Read, Rules::default(), 0));
    let out = flush(&mut a);
    let Some((_, Msg::Prepare { ballot })) = out.messages.first() else {
        panic!("{out:?}")
    };
    let mut b2 = start(2);
    assert!(b2.propose(PoolChange::Read, Rules::default(), 0));
    let Some((_, Msg::Prepare { ballot: ballot2 })) = flush(&mut b2).messages.first().cloned()
    else {
        panic!()
    };
    for from in ["b", "c"] {
        a.step(
            &n(from),
            Msg::NotVoting {
                ballot: ballot.clone(),
                formed: false,
            },
            1,
        );
    }
    assert_eq!(a.consensus(), Consensus::Voting);
    // The same answers but one with state: still catching up.
    b2.step(
        &n("b"),
        Msg::NotVoting {
            ballot: ballot2.clone(),
            formed: false,
        },
        1,
    );
    b2.step(
        &n("c"),
        Msg::NotVoting {
            ballot: ballot2.clone(),
            formed: true,
        },
        1,
    );
    assert_eq!(b2.consensus(), Consensus::CatchingUp);
}

/// `--force-new-cluster` keeps everything the survivor had, one version and one epoch up, with
/// the survivor the only voter, under a ballot above any it has seen and a new cluster id.
#[test]
fn force_new_cluster_recovers_from_the_survivors_own_state() {
    let pool = Pool::default()
        .apply(
            &PoolChange::seed(vec![Backend::new("w", "10.0.0.1:80", 1)]),
            &Rules::default(),
        )
        .unwrap();
    let d = Durable {
        acceptor: AcceptorState {
            promised: b(9, "b"),
            accepted: b(8, "a"),
            value: pool.clone(),
        },
        counter_reserved: 3_000,
        voting: true,
        incarnation: 5,
    };
    let (forced, new) = d
        .force_new_cluster(&n("a"), &Pool::default(), "forced".into())
        .unwrap();
    assert_eq!(new.backends, pool.backends);
    // A new cluster id: the old majority's peers are another cluster now.
    assert_eq!(new.cluster_id, "forced");
    assert_ne!(new.cluster_id, pool.cluster_id);
    assert_eq!((new.version, new.epoch), (pool.version + 1, pool.epoch + 1));
    assert_eq!(new.voters.iter().cloned().collect::<Vec<_>>(), ids(&["a"]));
    assert!(forced.acceptor.accepted > b(3_000, "z"));
    assert_eq!(forced.acceptor.value, new);
    // A single voter commits alone from it.
    let mut a = Node::new(
        n("a"),
        ids(&["a", "b", "c"]),
        CFG,
        Some(forced),
        new.clone(),
        1,
    );
    assert_eq!(a.voters(), ids(&["a"]));
    assert!(a.propose(PoolChange::Read, Rules::default(), 0));
    let out = flush(&mut a);
    assert!(
        matches!(out.outcomes.as_slice(), [Outcome::AlreadyCommitted(p) | Outcome::Committed(p)] if p.backends == new.backends)
    );
    assert!(Durable::default()
        .force_new_cluster(&n("a"), &Pool::default(), "forced".into())
        .is_err());
}

/// The pool a cluster of `names` formed with (one backend, epoch 1).
fn seeded_by(names: &[&str]) -> Pool {
    Pool::default()
        .apply(
            &PoolChange::Seed {
                backends: vec![Backend::new("w", "10.0.0.1:80", 1)],
                cluster_id: "c1".into(),
                voters: ids(names).into_iter().collect(),
                services: Vec::new(),
            },
            &Rules::default(),
        )
        .unwrap()
}

/// A hand-driven network of nodes for schedules the random simulation reaches rarely: every
/// message waits on the wire until a step delivers it, time moves only for the nodes a step
/// names, and every pool any node reports committed or learned is checked for agreement.
struct Net {
    nodes: BTreeMap<NodeId, Node>,
    wire: Vec<(NodeId, NodeId, Msg)>,
    now: u64,
    chosen: BTreeMap<u64, Pool>,
    outcomes: BTreeMap<NodeId, Vec<Outcome>>,
}

impl Net {
    /// `names` voting at `pool`, each holding it as accepted under a ballot of its epoch;
    /// `counters` start some proposers' ballots higher.
    fn formed(names: &[&str], pool: &Pool, counters: &[(&str, u64)]) -> Net {
        let mut nodes = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            let at = Ballot {
                epoch: pool.epoch,
                counter: 1,
                node: n(names[0]),
                incarnation: 0,
            };
            let durable = Durable {
                acceptor: AcceptorState {
                    promised: at.clone(),
                    accepted: at,
                    value: pool.clone(),
                },
                counter_reserved: counters
                    .iter()
                    .find(|(c, _)| c == name)
                    .map_or(0, |(_, at)| *at),
                voting: true,
                incarnation: i as u64 + 1,
            };
            nodes.insert(
                n(name),
                Node::new(
                    n(name),
                    ids(names),
                    CFG,
                    Some(durable),
                    pool.clone(),
                    i as u64,
                ),
            );
        }
        Net {
            nodes,
            wire: Vec::new(),
            now: 0,
            chosen: BTreeMap::from([(pool.version, pool.clone())]),
            outcomes: BTreeMap::new(),
        }
    }

    fn note(&mut self, p: &Pool) {
        if let Some(q) = self.chosen.get(&p.version) {
            assert_eq!(q, p, "two different pools chosen as version {}", p.version);
        }
        self.chosen.insert(p.version, p.clone());
    }

    fn pump(&mut self, id: &NodeId) {
        let out = flush(self.nodes.get_mut(id).unwrap());
        if let Some(p) = &out.learned {
            self.note(p);
        }
        for o in &out.outcomes {
            if let Outcome::Committed(p) | Outcome::AlreadyCommitted(p) | Outcome::Rejected(_, p) =
                o
            {
                self.note(p);
            }
        }
        self.outcomes
            .entry(id.clone())
            .or_default()
            .extend(out.outcomes);
        for (to, msg) in out.messages {
            self.wire.push((id.clone(), to, msg));
        }
    }

    fn propose(&mut self, id: &str, change: PoolChange) {
        let now = self.now;
        assert!(self
            .nodes
            .get_mut(&n(id))
            .unwrap()
            .propose(change, Rules::default(), now));
        self.pump(&n(id));
    }

    /// The node loses its disk and starts again, empty: what it sent before stays on the wire.
    fn wipe(&mut self, id: &str, voters: &[&str]) {
        let node = Node::new(n(id), ids(voters), CFG, None, Pool::default(), 99);
        self.nodes.insert(n(id), node);
    }

    /// Deliver every message `pass` lets through, and what they cause, until none is left;
    /// then let `ms` milliseconds pass for the nodes in `clock` (their retries), and again.
    fn run(&mut self, pass: impl Fn(&NodeId, &NodeId, &Msg) -> bool, clock: &[&str], ms: u64) {
        let end = self.now + ms;
        loop {
            while let Some(i) = self.wire.iter().position(|(f, t, m)| pass(f, t, m)) {
                let (from, to, msg) = self.wire.remove(i);
                let now = self.now;
                // A node taken away (shut down for good) gets nothing.
                let Some(node) = self.nodes.get_mut(&to) else {
                    continue;
                };
                node.step(&from, msg, now);
                self.pump(&to);
            }
            if self.now >= end {
                return;
            }
            self.now += 5;
            for c in clock {
                let now = self.now;
                self.nodes.get_mut(&n(c)).unwrap().tick(now);
                self.pump(&n(c));
            }
        }
    }

    /// Lose every message on the wire that `lost` picks.
    fn lose(&mut self, lost: impl Fn(&NodeId, &NodeId, &Msg) -> bool) {
        self.wire.retain(|(f, t, m)| !lost(f, t, m));
    }

    fn committed(&self, id: &str) -> Option<&Pool> {
        self.outcomes
            .get(&n(id))?
            .iter()
            .rev()
            .find_map(|o| match o {
                Outcome::Committed(p) | Outcome::AlreadyCommitted(p) => Some(p),
                _ => None,
            })
    }
}

/// A promise a node made before it lost its disk, still counted by a proposer after the node
/// caught up, must not let that proposer overwrite what was chosen since (issue 29, item 3).
/// Five voters: e's Prepare reaches d (which promises) but is held on its way to a, b and c;
/// d loses its disk and catches up through a, b and c at a lower ballot; a commits v through
/// a, b and d; then e's old Prepare reaches c. e has its majority (e, d's promise from its
/// earlier life, c) and must not commit a value that lacks v at v's version.
#[test]
fn a_promise_from_before_a_lost_disk_cannot_overwrite_a_later_commit() {
    let names = ["a", "b", "c", "d", "e"];
    let u = seeded_by(&names);
    // e's ballot is far above the others' (they have not heard from it for a while).
    let mut net = Net::formed(&names, &u, &[("e", 99)]);
    let is_prepare_from_e = |f: &NodeId, m: &Msg| *f == n("e") && matches!(m, Msg::Prepare { .. });
    // e prepares; only d's copy arrives, and d's promise reaches e.
    net.propose(
        "e",
        PoolChange::AddBackend {
            backend: Backend::new("x", "10.0.0.9:80", 1),
        },
    );
    net.run(
        |f, t, m| (is_prepare_from_e(f, m) && *t == n("d")) || (*f == n("d") && *t == n("e")),
        &[],
        0,
    );
    // d loses its disk and catches up through a, b and c while e is cut off (and paused).
    net.wipe("d", &names);
    net.propose("d", PoolChange::Read);
    let away = |f: &NodeId, t: &NodeId| *f == n("e") || *t == n("e");
    net.run(|f, t, _| !away(f, t), &["a", "b", "c", "d"], 400);
    assert_eq!(net.nodes[&n("d")].consensus(), Consensus::Voting);
    // a commits v through a, b and d (c and e cut off).
    net.propose(
        "a",
        PoolChange::AddBackend {
            backend: Backend::new("v", "10.0.0.7:80", 1),
        },
    );
    let cut = |f: &NodeId, t: &NodeId| away(f, t) || *f == n("c") || *t == n("c");
    net.run(|f, t, _| !cut(f, t), &["a", "b", "d"], 400);
    let v = net.committed("a").expect("a commits v").clone();
    assert!(v.backends.contains_key(&BackendId::new("v")));
    // e's old Prepare reaches c; c's answer reaches e; then the network heals.
    net.run(
        |f, t, m| (is_prepare_from_e(f, m) && *t == n("c")) || (*f == n("c") && *t == n("e")),
        &[],
        0,
    );
    net.run(|_, _, _| true, &names, 2_000);
    // Whatever e committed holds v (agreement per version is checked on every report).
    let x = net
        .committed("e")
        .expect("e's change commits once the network heals");
    assert!(x.backends.contains_key(&BackendId::new("x")));
    assert!(
        x.backends.contains_key(&BackendId::new("v")),
        "e's change lost v: {x:?}"
    );
}

/// A seal known only to a node that then loses its disk must not stall the cluster (issue 29,
/// item 4). Four voters; d commits the removal of y (a seal: epoch 2, voters a, d, x) through
/// d, x and y, and its learn pushes are lost; d's next round, in epoch 2, reaches x; d loses
/// its disk and y is shut down. a knows only epoch 1, and x holds the seal as an accepted
/// value. Had x promised d's epoch-2 ballot without knowing the seal, it would refuse every
/// epoch-1 ballot and could not tell anyone where epoch 2 came from: nothing could commit
/// again without `--force-new-cluster`.
#[test]
fn a_seal_known_only_to_a_wiped_node_does_not_stall_the_cluster() {
    let names = ["a", "d", "x", "y"];
    let u = seeded_by(&names);
    let mut net = Net::formed(&names, &u, &[]);
    let in_dxy = |p: &NodeId| ["d", "x", "y"].iter().any(|q| *p == n(q));
    net.propose("d", PoolChange::RemovePeer { id: n("y") });
    net.run(
        |f, t, m| in_dxy(f) && in_dxy(t) && !matches!(m, Msg::Learn { .. }),
        &["d"],
        0,
    );
    let sealed = net.committed("d").expect("d commits the seal").clone();
    assert_eq!(sealed.epoch, u.epoch + 1);
    net.lose(|_, _, m| matches!(m, Msg::Learn { .. }));
    // d's next round, in the new epoch, reaches x alone; nothing x sends d back arrives.
    net.propose(
        "d",
        PoolChange::AddBackend {
            backend: Backend::new("z", "10.0.0.3:80", 1),
        },
    );
    net.run(
        |f, t, m| *f == n("d") && *t == n("x") && matches!(m, Msg::Prepare { .. }),
        &[],
        0,
    );
    // d loses its disk (its config now lists a, d and x); y is shut down.
    net.lose(|f, t, _| *f == n("d") || *t == n("d"));
    net.wipe("d", &["a", "d", "x"]);
    net.nodes.remove(&n("y"));
    net.propose("d", PoolChange::Read);
    net.propose(
        "a",
        PoolChange::AddBackend {
            backend: Backend::new("v", "10.0.0.7:80", 1),
        },
    );
    net.run(|_, _, _| true, &["a", "d", "x"], 3_000);
    let v = net
        .committed("a")
        .expect("a's change commits: the cluster is not stalled");
    assert!(v.backends.contains_key(&BackendId::new("v")));
    assert_eq!(net.nodes[&n("d")].consensus(), Consensus::Voting);
}

/// A lone voter votes from its start; a failed first write does not leave it catching up from
/// no one (found by the simulation with one voter: seed 241).
#[test]
fn a_lone_voter_whose_first_write_fails_still_votes() {
    let mut a = Node::new(n("a"), ids(&["a"]), CFG, None, Pool::default(), 1);
    let w = a.ready().write.expect("the vote is written");
    a.written(w, false);
    assert_eq!(a.consensus(), Consensus::Voting);
    let w = a.ready().write.expect("written again");
    assert!(w.state.voting);
    a.written(w, true);
    assert!(a.propose(PoolChange::Read, Rules::default(), 0));
}

/// A peer's periodic read yields: at its first conflict it ends (not applied) instead of
/// retrying, so reads by every peer cannot keep preempting a change that waits in backoff. A
/// client's read retries as before.
#[test]
fn a_background_read_yields_at_its_first_conflict() {
    let mut a = voter("a");
    assert!(a.propose_background(Rules::default(), 0));
    let out = flush(&mut a);
    let Some((_, Msg::Prepare { ballot })) = out.messages.first().cloned() else {
        panic!("{out:?}")
    };
    let seen = b(ballot.counter + 10, "b");
    a.step(
        &n("b"),
        Msg::Conflict {
            ballot: ballot.clone(),
            seen: seen.clone(),
        },
        1,
    );
    assert_eq!(flush(&mut a).outcomes, vec![Outcome::NotApplied]);
    assert!(!a.is_busy());
    // A client's read backs off and tries again.
    assert!(a.propose(PoolChange::Read, Rules::default(), 2));
    let out = flush(&mut a);
    let Some((_, Msg::Prepare { ballot })) = out.messages.first().cloned() else {
        panic!("{out:?}")
    };
    a.step(&n("b"), Msg::Conflict { ballot, seen }, 3);
    assert!(flush(&mut a).outcomes.is_empty());
    assert!(a.is_busy());
}

/// The periodic read is skipped only where it could learn nothing: the lone voter holding, as
/// accepted and written, the pool it learned. A later value its acceptor took from another
/// peer's proposal (whose commit it did not hear of), a write pending, or other voters to hear
/// from, and it reads.
#[test]
fn only_a_lone_voter_holding_what_it_learned_has_nothing_to_read() {
    let pool = seeded_by(&["a"]);
    let mut net = Net::formed(&["a"], &pool, &[]);
    assert!(!net.nodes[&n("a")].may_lag(), "formed, holding its pool");
    net.propose(
        "a",
        PoolChange::AddBackend {
            backend: Backend::new("x", "10.0.0.9:80", 1),
        },
    );
    net.run(|_, _, _| true, &["a"], 100);
    let learned = net.committed("a").expect("a commits alone").clone();
    assert_eq!(net.nodes[&n("a")].learned(), &learned);
    assert!(!net.nodes[&n("a")].may_lag(), "after its own commit");
    // Another peer's accept of a later value reaches a; that peer's Learn never does.
    let later = learned
        .apply(
            &PoolChange::AddBackend {
                backend: Backend::new("y", "10.0.0.8:80", 1),
            },
            &Rules::default(),
        )
        .unwrap();
    let ballot = Ballot {
        epoch: learned.epoch,
        counter: 1_000,
        node: n("l"),
        incarnation: 7,
    };
    let a = net.nodes.get_mut(&n("a")).unwrap();
    a.step(
        &n("l"),
        Msg::Accept {
            ballot,
            value: later,
        },
        0,
    );
    assert!(a.may_lag(), "the accept is not written yet");
    let out = flush(a);
    assert!(matches!(
        out.messages.as_slice(),
        [(_, Msg::Accepted { .. })]
    ));
    assert_eq!(a.learned(), &learned);
    assert!(a.may_lag(), "its acceptor holds a value it has not learned");
    // Among three voters, anyone may have missed a push.
    let three = Net::formed(&["a", "b", "c"], &seeded_by(&["a", "b", "c"]), &[]);
    assert!(three.nodes.values().all(Node::may_lag));
}
