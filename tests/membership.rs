//! Membership from outside: real `shoal run` processes on loopback growing from 3 to 5 voters and
//! back, a dead voter replaced on a new host, a removed voter refused, and learners that follow,
//! route and propose but never count (SPEC sections 1-5, Membership; DESIGN section 3.1).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// One peer's ports.
type Ports = PeerPorts;

/// A peer that lists `known` as its `cluster.peers` (to form or to find the cluster).
fn peer(p: &Ports, known: &[&Ports], role: &str, extra: &str) -> Shoal {
    peer_env(p, known, role, extra, &[])
}

fn peer_env(p: &Ports, known: &[&Ports], role: &str, extra: &str, env: &[(&str, &str)]) -> Shoal {
    let mut s = prepare_peer(p, known, role, "dead_after = \"2s\"", extra);
    s.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s.spawn();
    s
}

/// Ports for `ids`, and the first three started as the voters that form the cluster (each with
/// `extra(id)` in its config), ready.
async fn form(ids: &[&str], extra: impl Fn(&str) -> String) -> (Vec<Ports>, Vec<Shoal>) {
    let ports: Vec<Ports> = ids.iter().map(|id| Ports::new(id)).collect();
    let first: Vec<&Ports> = ports[..3].iter().collect();
    let nodes: Vec<Shoal> = ports[..3]
        .iter()
        .map(|p| peer(p, &first, "voter", &extra(&p.id)))
        .collect();
    for n in &nodes {
        n.wait_ready().await;
    }
    (ports, nodes)
}

async fn admin_json(s: &Shoal, path: &str) -> serde_json::Value {
    match get_text(s.admin, path).await {
        Ok((200, text)) => serde_json::from_str(&text).unwrap_or_default(),
        _ => serde_json::Value::Null,
    }
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().or_else(|| x["id"].as_str()).map(str::to_string))
        .collect()
}

/// Every peer in `peers` reports `voters` as the agreed voters.
async fn all_see_voters(peers: &[&Shoal], voters: &[&str], within: Duration) {
    for s in peers {
        eventually(
            within,
            &format!("voters {voters:?} at {}", s.admin),
            || async {
                let st = admin_json(s, "/status").await;
                (ids(&st["members"]) == voters).then_some(())
            },
        )
        .await;
    }
}

/// `shoal ARGS --admin http://ADDR`; returns (exit ok, stdout, stderr).
fn cli(admin: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(shoal_bin())
        .args(args)
        .args(["--admin", &format!("http://{admin}")])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Traffic through every proxy in turn and a client that keeps changing the pool through
/// every admin API in turn, until stopped; counts what failed.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    changes: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(proxies: Vec<SocketAddr>, admins: Vec<SocketAddr>, backend: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, failed, changes) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let mut tasks = Vec::new();
        {
            let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let addr = proxies[i % proxies.len()];
                    i += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                    match get_text(addr, "/load").await {
                        Ok((200, _)) => {}
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("request through {addr} failed: {other:?}");
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        {
            let (stop, changes) = (stop.clone(), changes.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let admin = admins[i as usize % admins.len()];
                    i += 1;
                    let (code, _) = admin_call(
                        admin,
                        "PUT",
                        &format!("/pool/backends/{backend}"),
                        Some(json!({"weight": 1 + i % 3})),
                    )
                    .await;
                    if code == 200 {
                        changes.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }));
        }
        Load {
            stop,
            sent,
            failed,
            changes,
            tasks,
        }
    }

    /// Stop; returns (requests sent, failed, pool changes committed).
    async fn stop(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.changes.load(Ordering::Relaxed),
        )
    }
}

async fn backends(n: usize) -> (Vec<Backend>, String) {
    let mut bs = Vec::new();
    for i in 0..n {
        bs.push(Backend::start(&format!("web-{i}"), Behavior::Echo).await);
    }
    let toml = backends_toml(&bs.iter().collect::<Vec<_>>());
    (bs, toml)
}

/// 3 voters grow to 5 (one through the CLI, one through the API) and shrink back to 3 while
/// traffic flows through every proxy and a client changes the pool through every admin API:
/// no request fails, changes keep committing, the new voters count in quorums (two of five
/// down and changes still commit), and a removed voter that comes back is refused as a voter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_three_to_five_and_shrink_back_while_serving() {
    let (_bs, seeds) = backends(3).await;
    let (ports, mut nodes) = form(&["a", "b", "c", "d", "e"], |_| seeds.clone()).await;
    let first: Vec<&Ports> = ports[..3].iter().collect();
    all_see_voters(
        &nodes.iter().collect::<Vec<_>>(),
        &["a", "b", "c"],
        Duration::from_secs(10),
    )
    .await;

    // New hosts d and e know the first voters; they start outside the membership.
    for p in &ports[3..] {
        nodes.push(peer(p, &first, "voter", ""));
    }
    nodes[3].wait_ready().await;
    nodes[4].wait_ready().await;
    let st = admin_json(&nodes[3], "/status").await;
    assert_eq!(st["role"], "learner", "not yet a member: {st}");

    // Traffic through c, d and e (a and b are killed on the way), changes through a, b, c.
    let load = Load::start(
        ports[2..].iter().map(|p| p.proxy).collect(),
        ports[..3].iter().map(|p| p.admin).collect(),
        "web-0".into(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Grow: d through the CLI (at a), e through the API (at b).
    let d_addr = ports[3].cluster.to_string();
    let (ok, out, err) = cli(ports[0].admin, &["peers", "add", "d", &d_addr]);
    assert!(ok, "peers add d: {out}{err}");
    println!("$ shoal peers add d {d_addr}\n{out}");
    assert!(out.contains("d ") && out.contains("voter"), "{out}");
    let (code, m) = admin_call(
        ports[1].admin,
        "POST",
        "/peers",
        Some(json!({"id": "e", "addr": ports[4].cluster.to_string(), "role": "voter"})),
    )
    .await;
    assert_eq!(code, 201, "{m}");
    assert_eq!(ids(&m["voters"]), ["a", "b", "c", "d", "e"], "{m}");
    all_see_voters(
        &nodes.iter().collect::<Vec<_>>(),
        &["a", "b", "c", "d", "e"],
        Duration::from_secs(10),
    )
    .await;
    for n in &nodes[3..] {
        eventually(Duration::from_secs(10), "the new voter votes", || async {
            (admin_json(n, "/status").await["consensus"] == "voting").then_some(())
        })
        .await;
    }
    // Adding a member twice is a conflict; a bad address a bad request.
    let (code, _) = admin_call(
        ports[0].admin,
        "POST",
        "/peers",
        Some(json!({"id": "d", "addr": d_addr})),
    )
    .await;
    assert_eq!(code, 409);
    let (code, _) = admin_call(
        ports[0].admin,
        "POST",
        "/peers",
        Some(json!({"id": "f", "addr": "nowhere"})),
    )
    .await;
    assert_eq!(code, 400);
    // Every peer's table shows the new voters as voters, with their addresses.
    for n in &nodes {
        eventually(
            Duration::from_secs(5),
            "peer tables show five voters",
            || async {
                let rows = admin_json(n, "/peers").await;
                let rows = rows.as_array()?;
                (rows.len() == 4
                    && rows.iter().all(|r| {
                        r["role"] == "voter" && r["addr"].as_str().is_some_and(|a| !a.is_empty())
                    }))
                .then_some(())
            },
        )
        .await;
    }
    let (ok, out, _) = cli(ports[2].admin, &["peers"]);
    assert!(ok);
    println!("$ shoal peers   (at c, five voters)\n{out}");

    // The new voters count: with a and b down, c, d and e (3 of 5) commit.
    nodes[0].kill9();
    nodes[1].kill9();
    let (code, p) = add_backend(&nodes[4], "while-two-down", "127.0.0.1:1").await;
    assert_eq!(code, 201, "3 of 5 voters must commit: {p}");
    nodes[0].spawn();
    nodes[1].spawn();
    nodes[0].wait_ready().await;
    nodes[1].wait_ready().await;
    let (code, _) = admin_call(
        ports[0].admin,
        "DELETE",
        "/pool/backends/while-two-down",
        None,
    )
    .await;
    assert_eq!(code, 200);

    // Shrink back: d through the CLI, e through the API.
    let (ok, out, err) = cli(ports[0].admin, &["peers", "remove", "d"]);
    assert!(ok, "peers remove d: {out}{err}");
    println!("$ shoal peers remove d\n{out}");
    let (code, m) = admin_call(ports[2].admin, "DELETE", "/peers/e", None).await;
    assert_eq!(code, 200, "{m}");
    assert_eq!(ids(&m["voters"]), ["a", "b", "c"], "{m}");
    let (code, _) = admin_call(ports[2].admin, "DELETE", "/peers/e", None).await;
    assert_eq!(code, 404, "not a member any more");
    all_see_voters(
        &nodes[..3].iter().collect::<Vec<_>>(),
        &["a", "b", "c"],
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (sent, failed, changes) = load.stop().await;
    println!("grow 3->5 and shrink 5->3 under load: {sent} requests, {failed} failed; {changes} pool changes committed meanwhile");
    assert_eq!(failed, 0);
    assert!(changes >= 10, "the pool kept changing: {changes}");
    let (ok, out, _) = cli(ports[0].admin, &["peers"]);
    assert!(ok);
    println!("$ shoal peers   (at a, after the shrink)\n{out}");

    // d, removed, stops and comes back with its state: it learns it is no voter, and it does
    // not count: with b and c down, a and d cannot commit.
    nodes[3].kill9();
    nodes[4].kill9();
    nodes[3].spawn();
    nodes[3].wait_ready().await;
    eventually(
        Duration::from_secs(10),
        "d knows it was removed",
        || async {
            let st = admin_json(&nodes[3], "/status").await;
            (st["role"] == "learner" && ids(&st["members"]) == ["a", "b", "c"]).then_some(())
        },
    )
    .await;
    nodes[1].kill9();
    nodes[2].kill9();
    let (code, p) = add_backend(&nodes[0], "no-quorum", "127.0.0.1:2").await;
    assert_eq!(code, 503, "a removed voter must not make a quorum: {p}");
    let (code, p) = add_backend(&nodes[3], "no-quorum", "127.0.0.1:2").await;
    assert_eq!(code, 503, "nor propose one: {p}");
    nodes[1].spawn();
    nodes[1].wait_ready().await;
    let (code, p) = add_backend(&nodes[0], "quorum-again", "127.0.0.1:3").await;
    assert_eq!(code, 201, "a and b are a majority of a, b, c: {p}");
    eventually(
        Duration::from_secs(5),
        "the removed peer still learns",
        || async {
            let p = admin_json(&nodes[3], "/pool").await;
            p["backends"]
                .as_array()
                .is_some_and(|b| b.iter().any(|b| b["id"] == "quorum-again"))
                .then_some(())
        },
    )
    .await;
}

/// A voter's host dies for good: it is removed while the others serve, a new host is added in
/// its place with an empty disk, catches up, votes, and carries quorums.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_a_dead_voter_on_a_new_host() {
    let (_bs, seeds) = backends(2).await;
    let (ports, mut nodes) = form(&["a", "b", "c", "d"], |_| seeds.clone()).await;
    let (code, _) = add_backend(&nodes[0], "before", "127.0.0.1:1").await;
    assert_eq!(code, 201);
    let load = Load::start(
        ports[..2].iter().map(|p| p.proxy).collect(),
        ports[..2].iter().map(|p| p.admin).collect(),
        "web-0".into(),
    );
    // c's host is gone for good.
    nodes[2].kill9();
    let (ok, out, err) = cli(ports[0].admin, &["peers", "remove", "c"]);
    assert!(ok, "{out}{err}");
    // The new host: an empty disk, knows a and b.
    let known: Vec<&Ports> = ports[..2].iter().collect();
    nodes.push(peer(&ports[3], &known, "voter", ""));
    nodes[3].wait_ready().await;
    let (ok, out, err) = cli(
        ports[1].admin,
        &["peers", "add", "d", &ports[3].cluster.to_string()],
    );
    assert!(ok, "{out}{err}");
    println!("$ shoal peers add d (replacing c)\n{out}");
    let live = [&nodes[0], &nodes[1], &nodes[3]];
    all_see_voters(&live, &["a", "b", "d"], Duration::from_secs(10)).await;
    eventually(Duration::from_secs(10), "d votes", || async {
        (admin_json(&nodes[3], "/status").await["consensus"] == "voting").then_some(())
    })
    .await;
    let (sent, failed, changes) = load.stop().await;
    println!("replace c by d under load: {sent} requests, {failed} failed; {changes} pool changes committed");
    assert_eq!(failed, 0);
    // d carries quorums: with a down, b and d commit, and d has everything from before.
    nodes[0].kill9();
    let (code, p) = add_backend(&nodes[3], "after", "127.0.0.1:2").await;
    assert_eq!(code, 201, "{p}");
    let ids: Vec<String> = p["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&"before".to_string()), "{p}");
    nodes[0].spawn();
    nodes[0].wait_ready().await;
}

/// Learners (cluster.role = "learner", never added): they learn the pool, route, and propose
/// through the voters; they never count in a quorum, and their health views never eject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learners_follow_route_and_never_count() {
    let (bs, seeds) = backends(3).await;
    let ports: Vec<Ports> = ["a", "b", "c", "l1", "l2"]
        .iter()
        .map(|id| Ports::new(id))
        .collect();
    let voters: Vec<&Ports> = ports[..3].iter().collect();
    let health =
        "[health]\ninterval = \"200ms\"\ntimeout = \"100ms\"\npassive_failures = 2\nrise = 50\n";
    let mut nodes: Vec<Shoal> = Vec::new();
    for p in &ports[..3] {
        nodes.push(peer(p, &voters, "voter", &format!("{seeds}\n{health}")));
    }
    for p in &ports[3..] {
        nodes.push(peer(p, &voters, "learner", health));
    }
    for n in &nodes {
        n.wait_ready().await;
    }
    for n in &nodes[3..] {
        let st = admin_json(n, "/status").await;
        assert_eq!(st["role"], "learner", "{st}");
        assert_eq!(st["consensus"], "learner", "{st}");
        assert_eq!(ids(&st["members"]), ["a", "b", "c"], "{st}");
    }
    // A change through a voter reaches the learners; one through a learner commits through
    // the voters.
    let (code, _) = add_backend(&nodes[0], "via-voter", "127.0.0.1:1").await;
    assert_eq!(code, 201);
    let (code, p) = add_backend(&nodes[3], "via-learner", "127.0.0.1:2").await;
    assert_eq!(code, 201, "{p}");
    for n in &nodes {
        eventually(Duration::from_secs(5), "every peer has both", || async {
            let p = admin_json(n, "/pool").await;
            let b = p["backends"].as_array().cloned().unwrap_or_default();
            (b.iter().any(|b| b["id"] == "via-voter") && b.iter().any(|b| b["id"] == "via-learner"))
                .then_some(())
        })
        .await;
    }
    for id in ["via-voter", "via-learner"] {
        let (code, _) = admin_call(
            ports[0].admin,
            "DELETE",
            &format!("/pool/backends/{id}"),
            None,
        )
        .await;
        assert_eq!(code, 200);
    }
    // Learners route.
    for n in &nodes[3..] {
        let (code, _) = get_text(n.proxy, "/hello").await.unwrap();
        assert_eq!(code, 200);
    }
    // The voters see the learners, and count them.
    eventually(Duration::from_secs(5), "a counts two learners", || async {
        let m = nodes[0].metrics().await;
        (metric(&m, "shoal_members{role=\"learner\"}") == Some(2.0)
            && metric(&m, "shoal_members{role=\"voter\"}") == Some(3.0))
        .then_some(())
    })
    .await;
    let peers = admin_json(&nodes[0], "/peers").await;
    let learners: Vec<String> = peers
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "learner")
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(learners, ["l1", "l2"], "{peers}");

    // web-0 fails for the learners and for a (their live requests see 503s): 3 of 5 peers see
    // it down, but only 1 of 3 voters: it stays active.
    bs[0].set(Behavior::Status(503));
    let hammer = |addrs: Vec<SocketAddr>, until: Instant| async move {
        while Instant::now() < until {
            for a in &addrs {
                let _ = get_text(*a, "/x").await;
            }
        }
    };
    let until = Instant::now() + Duration::from_secs(3);
    hammer(vec![ports[0].proxy, ports[3].proxy, ports[4].proxy], until).await;
    for n in &nodes[3..] {
        let st = admin_json(n, "/status").await;
        let web0 = st["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == "web-0")
            .unwrap()
            .clone();
        assert_eq!(web0["local"], "down", "the learner saw it fail: {st}");
    }
    let st = admin_json(&nodes[1], "/status").await;
    let web0 = st["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == "web-0")
        .unwrap()
        .clone();
    assert_eq!(
        web0["state"], "active",
        "learners' views must not eject: {web0}"
    );
    assert_eq!(ids(&web0["down_votes"]), ["a"], "only voters vote: {web0}");
    // b sees it fail too: 2 of 3 voters, ejected. The mechanism works; learners just don't count.
    let until = Instant::now() + Duration::from_secs(3);
    hammer(vec![ports[0].proxy, ports[1].proxy], until).await;
    eventually(Duration::from_secs(5), "ejected by two voters", || async {
        let st = admin_json(&nodes[2], "/status").await;
        let web0 = st["backends"]
            .as_array()?
            .iter()
            .find(|b| b["id"] == "web-0")?
            .clone();
        (web0["state"] == "ejected").then_some(())
    })
    .await;
    bs[0].set(Behavior::Echo);

    // Learners never count in a quorum: with two voters down, nothing commits, through a
    // voter or a learner, though both learners are up.
    nodes[1].kill9();
    nodes[2].kill9();
    let (code, _) = add_backend(&nodes[0], "x", "127.0.0.1:3").await;
    assert_eq!(code, 503);
    let (code, _) = add_backend(&nodes[3], "x", "127.0.0.1:3").await;
    assert_eq!(code, 503);
    // ... and they keep routing.
    let (code, _) = get_text(nodes[4].proxy, "/still").await.unwrap();
    assert_eq!(code, 200);

    // A learner that goes away for good leaves the voters' tables after 10 x dead_after (20 s).
    nodes[3].kill9();
    eventually(Duration::from_secs(40), "l1 forgotten by a", || async {
        let rows = admin_json(&nodes[0], "/peers").await;
        let ids: Vec<String> = rows
            .as_array()?
            .iter()
            .filter_map(|r| r["id"].as_str().map(str::to_string))
            .collect();
        (!ids.contains(&"l1".to_string()) && ids.contains(&"l2".to_string())).then_some(())
    })
    .await;
}

/// CPU time (user + system) of a process from /proc, and the bytes its open TCP connections
/// have sent (`ss -ti`: while idle, that is its peer traffic).
fn cpu_and_written(s: &Shoal) -> (f64, u64) {
    let pid = s.child.as_ref().unwrap().id();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    let out = std::process::Command::new("ss")
        .args(["-tinpH"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let owner = format!("pid={pid},");
    let mut sent = 0u64;
    let mut mine = false;
    for line in out.lines() {
        if !line.starts_with(char::is_whitespace) {
            mine = line.contains(&owner);
        } else if mine {
            sent += line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("bytes_sent:"))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (ticks / 100.0, sent)
}

/// Mean CPU milliseconds per second and kilobytes sent per second of `peers` over `d`.
async fn idle_cost(peers: &[&Shoal], d: Duration) -> (f64, f64) {
    let before: Vec<(f64, u64)> = peers.iter().map(|s| cpu_and_written(s)).collect();
    tokio::time::sleep(d).await;
    let secs = d.as_secs_f64();
    let (mut cpu, mut kb) = (0.0, 0.0);
    for (s, b) in peers.iter().zip(&before) {
        let a = cpu_and_written(s);
        cpu += (a.0 - b.0) * 1000.0 / secs;
        kb += (a.1 - b.1) as f64 / 1024.0 / secs;
    }
    let n = peers.len() as f64;
    (cpu / n, kb / n)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// 3 voters and 20 learner processes: every pool change is committed and learned by all 23
/// (p50/p99 printed), and the idle cost of heartbeats per peer (CPU from /proc, bytes sent on
/// its connections from `ss`) with no learners and with twenty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_and_twenty_learners() {
    let (_bs, seeds) = backends(3).await;
    let ports: Vec<Ports> = (0..23)
        .map(|i| {
            Ports::new(&if i < 3 {
                format!("v{i}")
            } else {
                format!("l{:02}", i - 3)
            })
        })
        .collect();
    let voters: Vec<&Ports> = ports[..3].iter().collect();
    let mut nodes: Vec<Shoal> = Vec::new();
    // Logs at warn, so that what the processes write is their peer traffic.
    let quiet = [("SHOAL__LOG__LEVEL", "warn")];
    for p in &ports[..3] {
        nodes.push(peer_env(p, &voters, "voter", &seeds, &quiet));
    }
    for n in &nodes {
        n.wait_ready().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let window = Duration::from_secs(5);
    let (v0_cpu, v0_kb) = idle_cost(&nodes.iter().collect::<Vec<_>>(), window).await;

    for p in &ports[3..] {
        nodes.push(peer(p, &voters, "learner", ""));
    }
    for n in &nodes[3..] {
        n.wait_ready().await;
    }
    eventually(
        Duration::from_secs(10),
        "the voters see twenty learners",
        || async {
            let m = nodes[0].metrics().await;
            (metric(&m, "shoal_members{role=\"learner\"}") == Some(20.0)).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all: Vec<&Shoal> = nodes.iter().collect();
    let (v_cpu, v_kb) = idle_cost(&all[..3], window).await;
    let (l_cpu, l_kb) = idle_cost(&all[3..], window).await;

    // Twenty changes through a voter: time from the request to each peer having the version.
    let mut learned: Vec<Duration> = Vec::new();
    let mut slowest_all: Vec<Duration> = Vec::new();
    for i in 0..20 {
        let start = Instant::now();
        let (code, p) = admin_call(
            nodes[i % 3].admin,
            "PUT",
            "/pool/backends/web-0",
            Some(json!({"weight": 1 + i % 5})),
        )
        .await;
        assert_eq!(code, 200, "{p}");
        let version = p["version"].as_u64().unwrap();
        let mut set = tokio::task::JoinSet::new();
        for n in &nodes {
            let admin = n.admin;
            set.spawn(async move {
                let deadline = start + Duration::from_secs(5);
                loop {
                    if let Ok((200, text)) = get_text(admin, "/pool").await {
                        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                        if v["version"].as_u64().is_some_and(|v| v >= version) {
                            return Some(start.elapsed());
                        }
                    }
                    if Instant::now() > deadline {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            });
        }
        let mut worst = Duration::ZERO;
        while let Some(r) = set.join_next().await {
            let t = r.unwrap().expect("every peer learns the change within 5 s");
            worst = worst.max(t);
            learned.push(t);
        }
        slowest_all.push(worst);
    }
    learned.sort();
    slowest_all.sort();
    println!(
        "3 voters + 20 learners: a change committed and learned, per peer: p50 {:?}, p99 {:?}; by all 23: p50 {:?}, p99 {:?} (20 changes)",
        percentile(&learned, 0.5),
        percentile(&learned, 0.99),
        percentile(&slowest_all, 0.5),
        percentile(&slowest_all, 0.99),
    );
    println!(
        "idle cost per voter (heartbeats every 100 ms): {v0_cpu:.2} ms CPU/s, {v0_kb:.1} KiB/s sent with no learners; {v_cpu:.2} ms CPU/s, {v_kb:.1} KiB/s with 20 ({:.3} ms CPU/s and {:.2} KiB/s per learner); per learner: {l_cpu:.2} ms CPU/s, {l_kb:.1} KiB/s",
        (v_cpu - v0_cpu) / 20.0,
        (v_kb - v0_kb) / 20.0,
    );
}

/// Under mutual TLS, a learner with a certificate from the cluster's CA joins without any
/// membership change, learns and routes; one whose certificate comes from another CA is refused
/// (and counted) and learns nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learners_join_under_mutual_tls_with_the_clusters_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    shoal_cert(&["ca", "--out", d]);
    for id in ["a", "b", "c", "l1"] {
        shoal_cert(&["issue", id, "--ca", d, "--out", d]);
    }
    let other = dir.path().join("other");
    let o = other.to_str().unwrap();
    shoal_cert(&["ca", "--out", o]);
    shoal_cert(&["issue", "l2", "--ca", o, "--out", o]);
    let tls = |ca: &str, certs: &str, id: &str| {
        format!("[cluster.tls]\nca = \"{ca}/ca.pem\"\ncert = \"{certs}/{id}.pem\"\nkey = \"{certs}/{id}-key.pem\"\n")
    };
    let (_bs, seeds) = backends(2).await;
    let ports: Vec<Ports> = ["a", "b", "c", "l1", "l2"]
        .iter()
        .map(|id| Ports::new(id))
        .collect();
    let voters: Vec<&Ports> = ports[..3].iter().collect();
    let mut nodes: Vec<Shoal> = Vec::new();
    for p in &ports[..3] {
        nodes.push(peer(
            p,
            &voters,
            "voter",
            &format!("{}\n{seeds}", tls(d, d, &p.id)),
        ));
    }
    for n in &nodes {
        n.wait_ready().await;
    }
    let good = peer(&ports[3], &voters, "learner", &tls(d, d, "l1"));
    good.wait_ready().await;
    let (code, _) = get_text(good.proxy, "/via-learner").await.unwrap();
    assert_eq!(code, 200);
    let st = admin_json(&good, "/status").await;
    assert_eq!(st["role"], "learner", "{st}");
    assert_eq!(ids(&st["members"]), ["a", "b", "c"], "{st}");
    // A stranger: its own CA trusts nothing of ours and ours nothing of it.
    let stranger = peer(&ports[4], &voters, "learner", &tls(o, o, "l2"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        get_text(stranger.admin, "/readyz").await.map(|r| r.0).ok(),
        Some(503),
        "it knows no pool"
    );
    let failures: f64 = {
        let mut sum = 0.0;
        for n in &nodes {
            let m = n.metrics().await;
            sum += m
                .lines()
                .filter(|l| l.starts_with("shoal_peer_auth_failures_total{"))
                .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                .sum::<f64>();
        }
        sum
    };
    assert!(failures >= 1.0, "the stranger's attempts are counted");
    nodes[0]
        .metric_reaches(
            "shoal_members{role=\"learner\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
}

/// Kill a peer and remove its data dir (a lost disk).
fn wipe(s: &mut Shoal) {
    s.kill9();
    std::fs::remove_dir_all(s.dir.path().join("data")).unwrap();
}

/// SPEC "No stray cluster": z started alone (no peers: a one-node cluster) and was grown to
/// three voters with `shoal peers add`. It loses its disk and restarts with its unchanged
/// config: it must not go on serving a one-node cluster of its own. With nothing but its seed
/// committed, it abandons that cluster and catches up into the one that lists it as a voter,
/// with the change it committed through a while b was down. A stray that committed more than its
/// seed is not thrown away: it stops serving (`/readyz` 503) and says why, naming the cluster
/// that claims it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_founder_rejoins_its_cluster_instead_of_forming_a_stray() {
    let (_bs, seeds) = backends(1).await;
    let (z, a, b) = (Ports::new("z"), Ports::new("a"), Ports::new("b"));
    let mut zn = peer(&z, &[], "voter", &seeds);
    zn.wait_ready().await;
    let mut an = peer(&a, &[&z], "voter", "");
    let mut bn = peer(&b, &[&z], "voter", "");
    an.wait_ready().await;
    bn.wait_ready().await;
    // One at a time: each new voter votes before the next is added (a change needs a majority
    // of the voters that can vote).
    for (p, node) in [(&a, &an), (&b, &bn)] {
        let (ok, out, err) = cli(z.admin, &["peers", "add", &p.id, &p.cluster.to_string()]);
        assert!(ok, "peers add {}: {out}{err}", p.id);
        eventually(Duration::from_secs(15), "the new voter votes", || async {
            (admin_json(node, "/status").await["consensus"] == "voting").then_some(())
        })
        .await;
    }
    all_see_voters(&[&zn, &an, &bn], &["a", "b", "z"], Duration::from_secs(15)).await;
    let cluster_id = admin_json(&an, "/status").await["cluster_id"].clone();

    // X commits through z and a while b is down.
    bn.kill9();
    let (code, p) = add_backend(&zn, "x", "127.0.0.1:9").await;
    assert_eq!(code, 201, "{p}");

    // z loses its disk and restarts with its unchanged config (no peers).
    wipe(&mut zn);
    zn.spawn();
    // b comes back: a wiped voter votes again only after a majority of all voters answer.
    bn.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = admin_json(&zn, "/status").await;
        let pool = admin_json(&zn, "/pool").await;
        let has_x = ids(&pool["backends"]).contains(&"x".to_string());
        if st["cluster_id"] == cluster_id && has_x && st["consensus"] == "voting" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "z not back in its cluster, with x, voting: {st}\n{pool}\nb: {}\n{}",
            admin_json(&bn, "/status").await,
            zn.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        zn.log().contains("abandoning"),
        "no word of the abandoned one-node cluster:\n{}",
        zn.log()
    );
    let (code, _) = get_text(zn.admin, "/readyz").await.unwrap();
    assert_eq!(code, 200);
    // Changes commit through it again.
    let (code, p) = add_backend(&zn, "x2", "127.0.0.1:10").await;
    assert_eq!(code, 201, "{p}");

    // A stray that committed more than its seed: a and b down, z wiped, z commits y alone; a
    // comes back and claims it. z stops serving and names the cluster that claims it.
    an.kill9();
    bn.kill9();
    wipe(&mut zn);
    zn.spawn();
    zn.wait_ready().await;
    let (code, p) = add_backend(&zn, "y", "127.0.0.1:11").await;
    assert_eq!(code, 201, "{p}");
    an.spawn();
    let waiting = eventually(Duration::from_secs(20), "z refusing to serve", || async {
        let st = admin_json(&zn, "/status").await;
        let ready = get_text(zn.admin, "/readyz")
            .await
            .map(|r| r.0)
            .unwrap_or(0);
        (ready == 503)
            .then(|| st["waiting"].as_str().map(str::to_string))
            .flatten()
    })
    .await;
    let claimed_by = cluster_id.as_str().unwrap();
    assert!(waiting.contains(claimed_by), "{waiting}");
    let r = send(
        zn.proxy,
        request("GET", zn.proxy, "/").body(empty()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 503, "a claimed stray routed a request");
    drop(bn);
}
