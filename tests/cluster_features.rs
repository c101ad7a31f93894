//! The cluster features no other proxy has (SPEC 2.2), from outside: real `shoal run` processes
//! on loopback. Split probing (`health.probers`): each backend probed by exactly k voters, a
//! dead prober replaced, ejection by the assigned probers; lockstep slow start
//! (`health.slow_start`): a new backend's share ramps the same through three peers from the
//! instant the agreed pool records; autopilot (`[cluster.autopilot]`): a dead voter replaced by a
//! ready learner, with events naming autopilot and why.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use serde_json::json;

async fn status(s: &Shoal) -> serde_json::Value {
    get_json(s.admin, "/status").await.1
}

/// Each backend's `probers` in a peer's `/status`.
async fn probers_shown(s: &Shoal) -> BTreeMap<String, BTreeSet<String>> {
    let st = status(s).await;
    st["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let who = b["probers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect();
            (b["id"].as_str().unwrap_or_default().to_string(), who)
        })
        .collect()
}

/// The peers that probed `b` in the last `window`.
fn recent_probers(b: &Backend, window: Duration) -> BTreeSet<String> {
    b.probers_since(Instant::now() - window)
        .into_keys()
        .collect()
}

/// Five voters and a learner, `health.probers = 3`, four backends: every backend is probed by
/// exactly three voters (its `/status` `probers`, the same on every peer), every probe names
/// its peer; a killed prober is replaced within `cluster.dead_after` + one interval (with room
/// for a loaded machine); a backend that fails its checks is ejected by its probers' votes alone
/// and restored by them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_probing_keeps_three_probers_per_backend() {
    let mut bs = Vec::new();
    for i in 0..4 {
        bs.push(Backend::start(&format!("web-{i}"), Behavior::Echo).await);
    }
    let ids = ["a", "b", "c", "d", "e"];
    let ports: Vec<PeerPorts> = ids.iter().map(|id| PeerPorts::new(id)).collect();
    let known: Vec<&PeerPorts> = ports.iter().collect();
    let seeds = backends_toml(&bs.iter().collect::<Vec<_>>());
    let health = "[health]\ninterval = \"300ms\"\nfall = 2\nrise = 2\nprobers = 3\n";
    let extra = format!("{health}\n{seeds}");
    let cluster = "dead_after = \"1500ms\"";
    let mut nodes: Vec<Shoal> = ports
        .iter()
        .map(|p| spawn_peer(p, &known, "voter", cluster, &extra))
        .collect();
    let lp = PeerPorts::new("l");
    nodes.push(spawn_peer(&lp, &known, "learner", cluster, &extra));
    for n in &nodes {
        n.wait_ready().await;
    }

    // Settled: three voters per backend, the ones every peer's /status names.
    let window = Duration::from_millis(1_200);
    let shown = eventually(
        Duration::from_secs(20),
        "three probers per backend, as /status shows on every peer",
        || async {
            let first = probers_shown(&nodes[0]).await;
            for n in &nodes[1..] {
                if probers_shown(n).await != first {
                    return None;
                }
            }
            let ok = bs.iter().all(|b| {
                let seen = recent_probers(b, window);
                first.get(&b.name) == Some(&seen) && seen.len() == 3
            });
            ok.then_some(first)
        },
    )
    .await;
    println!("probers: {shown:?}");
    for b in &bs {
        let who = &shown[&b.name];
        assert!(
            who.iter().all(|p| ids.contains(&p.as_str())),
            "only voters probe: {who:?}"
        );
        let all = b.probers_since(Instant::now() - Duration::from_secs(60));
        assert!(!all.contains_key(""), "every probe carries X-Shoal-Peer");
    }
    // Probe traffic: three per interval per backend, whatever the number of peers.
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for b in &bs {
        let n: usize = b.probers_since(t0).values().sum();
        let per_second = n as f64 / t0.elapsed().as_secs_f64();
        println!("{}: {per_second:.1} probes/s (3 probers at 300 ms)", b.name);
        assert!(
            (6.0..=13.0).contains(&per_second),
            "{}: {per_second}",
            b.name
        );
    }

    // Kill one of web-0's probers: another voter takes its place.
    let victim = shown["web-0"].iter().next().unwrap().clone();
    let vi = ids.iter().position(|i| *i == victim).unwrap();
    nodes[vi].kill9();
    let killed = Instant::now();
    let live = |i: usize| i != vi && i < 5;
    let replaced = eventually(
        Duration::from_secs(15),
        "a new third prober of web-0",
        || async {
            let seen = recent_probers(&bs[0], Duration::from_millis(700));
            (seen.len() == 3 && !seen.contains(&victim)).then_some(seen)
        },
    )
    .await;
    let took = killed.elapsed();
    println!("prober {victim} killed: replaced in {took:?} by {replaced:?} (dead_after 1.5 s + 0.3 s interval)");
    // dead_after (1.5 s) and one interval (0.3 s), from its last heartbeat; 2 s of room for a
    // loaded machine.
    assert!(
        took <= Duration::from_millis(1_500 + 300 + 2_000),
        "{took:?}"
    );
    eventually(
        Duration::from_secs(5),
        "/status names the new probers",
        || async {
            let shown = probers_shown(&nodes[(vi + 1) % 5]).await;
            (shown.get("web-0") == Some(&replaced)).then_some(())
        },
    )
    .await;

    // web-1 fails its checks: ejected by its probers' votes, and only theirs.
    let via = (0..5).find(|&i| live(i)).unwrap();
    bs[1].health_ok.store(false, Ordering::SeqCst);
    let row = eventually(Duration::from_secs(15), "web-1 ejected", || async {
        let st = status(&nodes[via]).await;
        let row = st["backends"]
            .as_array()?
            .iter()
            .find(|b| b["id"] == "web-1")?
            .clone();
        (row["state"] == "ejected").then_some(row)
    })
    .await;
    let probers: BTreeSet<&str> = row["probers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    for v in row["down_votes"].as_array().unwrap() {
        assert!(
            probers.contains(v.as_str().unwrap()),
            "a vote from a peer not assigned: {row}"
        );
    }
    bs[1].health_ok.store(true, Ordering::SeqCst);
    eventually(Duration::from_secs(15), "web-1 restored", || async {
        let (_, pool) = get_json(nodes[via].admin, "/pool").await;
        let row = pool["backends"]
            .as_array()?
            .iter()
            .find(|b| b["id"] == "web-1")?
            .clone();
        (row["state"] == "active").then_some(())
    })
    .await;
}

/// The backend an echo answer names.
fn served_by(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["name"].as_str().map(str::to_string)
}

/// Three peers with `health.slow_start = 6s`: a backend added through one of them carries the
/// same `usable_since` in every peer's `GET /pool`, and its share of round robin through each
/// peer ramps from about 10% of its weight (3 of 63 requests with two others of weight 1) to
/// its whole third, in step on all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_new_backend_in_lockstep_on_every_peer() {
    let old = [
        Backend::start("old-0", Behavior::Echo).await,
        Backend::start("old-1", Behavior::Echo).await,
    ];
    let new = Backend::start("new", Behavior::Echo).await;
    let seeds = backends_toml(&old.iter().collect::<Vec<_>>());
    let nodes = start_cluster(
        3,
        |_| String::new(),
        |_| format!("[health]\nslow_start = \"6s\"\n\n{seeds}"),
    )
    .await;
    let before = shoal::clock::unix_ms();
    let (code, p) = admin_call(
        nodes[1].admin,
        "POST",
        "/pool/backends",
        Some(json!({"id": "new", "addr": new.addr.to_string()})),
    )
    .await;
    assert_eq!(code, 201, "{p}");
    let after = shoal::clock::unix_ms();
    let added = Instant::now();
    let since = |pool: &serde_json::Value| {
        pool["backends"]
            .as_array()
            .and_then(|bs| bs.iter().find(|b| b["id"] == "new"))
            .and_then(|b| b["usable_since"].as_u64())
    };
    let at = since(&p).expect("usable_since in the pool");
    assert!(
        (before..=after).contains(&at),
        "{before} <= {at} <= {after}"
    );
    for n in &nodes {
        let got = eventually(Duration::from_secs(5), "the pool on every peer", || async {
            since(&get_json(n.admin, "/pool").await.1)
        })
        .await;
        assert_eq!(got, at, "the same instant on every peer");
    }

    // Traffic through all three peers for eight seconds; per peer, per second: new's share.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for n in &nodes {
        let (addr, stop) = (n.proxy, stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut seconds: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
            let mut c = client(addr).await;
            while !stop.load(Ordering::Relaxed) {
                let req = request("GET", addr, "/").body(empty()).unwrap();
                let Ok(resp) = c.send_request(req).await else {
                    c = client(addr).await;
                    continue;
                };
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                let s = added.elapsed().as_secs();
                let e = seconds.entry(s).or_default();
                e.0 += 1;
                e.1 += u64::from(served_by(&body).as_deref() == Some("new"));
            }
            seconds
        }));
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    let mut per_peer = Vec::new();
    for t in tasks {
        per_peer.push(t.await.unwrap());
    }
    for (i, seconds) in per_peer.iter().enumerate() {
        let shares: Vec<String> = seconds
            .iter()
            .map(|(s, (all, new))| format!("{s}s {:.0}%", 100.0 * *new as f64 / *all as f64))
            .collect();
        println!("peer {i}: new's share per second: {}", shares.join(", "));
        let share = |s: u64| {
            let (all, new) = seconds.get(&s).copied().unwrap_or_default();
            assert!(all >= 20, "peer {i}: only {all} requests in second {s}");
            new as f64 / all as f64
        };
        // Elapsed 0-1 s: 10% of the weight (0.1/2.1 = 5%); 3-4 s: about 55% (22%); 7 s: whole.
        assert!(share(0) <= 0.12, "peer {i}: {}", share(0));
        let mid = share(3);
        assert!((0.12..=0.30).contains(&mid), "peer {i}: {mid}");
        assert!((0.27..=0.40).contains(&share(7)), "peer {i}: {}", share(7));
    }
}

/// Three voters with autopilot (`voters = 3`, `dead_after = 2s`, `stabilization = 1s`) and a
/// learner that advertises its address: killing voter c gets c removed and the learner promoted
/// (it then votes), each step a `membership_changed` event naming autopilot and why; with
/// voter b killed as well, the new majority (a and d) commits. Without autopilot nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autopilot_replaces_a_dead_voter_with_a_ready_learner() {
    let web = Backend::start("web", Behavior::Echo).await;
    let seeds = backends_toml(&[&web]);
    let ports: Vec<PeerPorts> = ["a", "b", "c"].iter().map(|i| PeerPorts::new(i)).collect();
    let known: Vec<&PeerPorts> = ports.iter().collect();
    let autopilot = "[cluster.autopilot]\nenabled = true\nvoters = 3\ndead_after = \"2s\"\nstabilization = \"1s\"\n";
    let cluster = "dead_after = \"1s\"";
    let mut nodes: Vec<Shoal> = ports
        .iter()
        .map(|p| {
            spawn_peer(
                p,
                &known,
                "voter",
                cluster,
                &format!("{autopilot}\n{seeds}"),
            )
        })
        .collect();
    let dp = PeerPorts::new("d");
    let learner_keys = format!("{cluster}\nadvertise = \"{}\"", dp.cluster);
    nodes.push(spawn_peer(&dp, &known, "learner", &learner_keys, &seeds));
    for n in &nodes {
        n.wait_ready().await;
    }
    assert_eq!(status(&nodes[3]).await["role"], "learner");
    // Alive voters: nothing to do (a learner is not promoted while the voters are whole).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(status(&nodes[0]).await["members"], json!(["a", "b", "c"]));

    nodes[2].kill9();
    let killed = Instant::now();
    eventually(Duration::from_secs(30), "c replaced by d", || async {
        let st = status(&nodes[0]).await;
        (st["members"] == json!(["a", "b", "d"])).then_some(())
    })
    .await;
    println!(
        "voter c killed: replaced by learner d in {:?}",
        killed.elapsed()
    );
    eventually(Duration::from_secs(20), "d votes", || async {
        (status(&nodes[3]).await["consensus"] == "voting").then_some(())
    })
    .await;
    let (_, events) = get_json(nodes[1].admin, "/events").await;
    let steps: Vec<&serde_json::Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "membership_changed" && e["by"] == "autopilot")
        .collect();
    println!("{steps:#?}");
    assert!(
        steps.iter().any(|e| e["why"]
            .as_str()
            .is_some_and(|w| w.contains("voter c dead"))),
        "{events}"
    );
    assert!(
        steps
            .iter()
            .any(|e| e["why"].as_str().is_some_and(|w| w.contains("learner d"))),
        "{events}"
    );

    // b goes too: a and d are the majority of a, b, d, and commit.
    nodes[1].kill9();
    let (code, p) = add_backend(&nodes[0], "after", "127.0.0.1:2").await;
    assert_eq!(code, 201, "{p}");
}
