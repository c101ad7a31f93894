//! Lost disks and foreign peers, from outside: real `shoal run` processes on loopback whose
//! `data_dir` is wiped between runs (SPEC section 5, Agreement; DESIGN section 3.1).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// A JSON answer of the admin API, or null while it does not answer (a peer starting).
async fn admin_json(s: &Shoal, path: &str) -> serde_json::Value {
    match get_text(s.admin, path).await {
        Ok((200, text)) => serde_json::from_str(&text).unwrap_or_default(),
        _ => serde_json::Value::Null,
    }
}

async fn status(s: &Shoal) -> serde_json::Value {
    admin_json(s, "/status").await
}

async fn pool(s: &Shoal) -> serde_json::Value {
    admin_json(s, "/pool").await
}

fn has(pool: &serde_json::Value, id: &str) -> bool {
    pool["backends"]
        .as_array()
        .is_some_and(|bs| bs.iter().any(|b| b["id"] == id))
}

/// Kill the process and empty its data_dir: a lost volume coming back under the same name.
fn wipe(s: &mut Shoal) {
    s.kill9();
    let data = s.dir.path().join("data");
    std::fs::remove_dir_all(&data).unwrap();
}

/// Start again, without waiting for readiness (a peer catching up may have no pool yet).
fn restart(s: &mut Shoal, args: &[&str]) {
    s.spawn_with(args);
}

async fn add(s: &Shoal, id: &str, addr: &str) -> (u16, serde_json::Value) {
    add_backend(s, id, addr).await
}

async fn consensus_is(s: &Shoal, want: &str, within: Duration) {
    eventually(within, &format!("consensus {want}"), || async {
        (status(s).await["consensus"] == want).then_some(())
    })
    .await;
}

/// The operator's scenario that used to lose a commit: c is down; X is committed by a and b;
/// a goes down; b comes back with an empty data_dir and c comes back. b and c are a majority of
/// the configured peers, but b does not vote until it caught up through a majority of the other
/// voters (a and c), so nothing commits without X; once a is back, everyone has X.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_voter_and_a_stale_one_cannot_commit_over_a_change() {
    let web = Backend::start("web-1", Behavior::Echo).await;
    let mut nodes = start_cluster(3, |_| String::new(), |_| backends_toml(&[&web])).await;
    let cluster_id = status(&nodes[0]).await["cluster_id"].clone();
    assert!(
        cluster_id.as_str().is_some_and(|s| s.len() == 32),
        "{cluster_id}"
    );

    nodes[2].kill9();
    let change = (
        "POST",
        "/pool/backends",
        serde_json::json!({"addr": "127.0.0.1:9", "id": "x"}),
    );
    let (code, p) = commit_eventually(&nodes[0], &nodes, change, Duration::from_secs(30)).await;
    assert_eq!(code, 201, "{p}");
    let with_x = p["version"].as_u64().unwrap();
    nodes[0].kill9();
    wipe(&mut nodes[1]);
    restart(&mut nodes[1], &[]);
    restart(&mut nodes[2], &[]);

    nodes[2].wait_ready().await;
    // Give them every chance to form a quorum of their own.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, n) in nodes.iter().enumerate().skip(1) {
        let (code, body) = add(n, "y", "127.0.0.1:10").await;
        assert_ne!(
            code, 201,
            "peer {i} committed without a majority that saw X: {body}"
        );
        let p = pool(n).await;
        assert!(
            p["version"].as_u64().is_none_or(|v| v < with_x) || has(&p, "x"),
            "peer {i} holds version {} without X",
            p["version"]
        );
    }
    assert_eq!(status(&nodes[1]).await["consensus"], "catching_up");

    // a comes back: b catches up through a and c, and everyone has X.
    restart(&mut nodes[0], &[]);
    consensus_is(&nodes[1], "voting", Duration::from_secs(15)).await;
    for n in &nodes {
        eventually(Duration::from_secs(10), "X everywhere", || async {
            has(&pool(n).await, "x").then_some(())
        })
        .await;
        assert_eq!(status(n).await["cluster_id"], cluster_id);
    }
    let (code, p) = add(&nodes[1], "y", "127.0.0.1:10").await;
    assert_eq!(code, 201, "{p}");
    assert!(has(&p, "x") && has(&p, "y"), "{p}");
}

/// One voter wiped and restarted while the others serve: it routes at once from what it learns,
/// votes again within seconds, and commits keep flowing through every peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_voter_catches_up_while_the_others_serve() {
    let web = Backend::start("web-1", Behavior::Echo).await;
    let mut nodes = start_cluster(3, |_| String::new(), |_| backends_toml(&[&web])).await;
    assert_eq!(add(&nodes[0], "x", "127.0.0.1:9").await.0, 201);
    wipe(&mut nodes[1]);
    // The others keep committing while b is gone.
    assert_eq!(add(&nodes[2], "y", "127.0.0.1:10").await.0, 201);
    restart(&mut nodes[1], &[]);
    nodes[1].wait_ready().await;
    consensus_is(&nodes[1], "voting", Duration::from_secs(10)).await;
    let st = status(&nodes[1]).await;
    assert_eq!(st["members"], json!(["a", "b", "c"]), "{st}");
    let p = pool(&nodes[1]).await;
    assert!(has(&p, "x") && has(&p, "y"), "{p}");
    let (code, p) = add(&nodes[1], "z", "127.0.0.1:11").await;
    assert_eq!(code, 201, "{p}");
    // Traffic flows through the wiped peer.
    let (code, _) = get_text(nodes[1].proxy, "/").await.unwrap();
    assert_eq!(code, 200);
    // Everyone agrees on the final pool.
    let want = p["version"].clone();
    for n in &nodes {
        eventually(Duration::from_secs(5), "same version", || async {
            (pool(n).await["version"] == want).then_some(())
        })
        .await;
    }
}

/// Two of three voters wiped: they refuse to vote (a majority without state cannot be told
/// from a new cluster), say so naming --force-new-cluster, and nothing commits. The survivor,
/// restarted with --force-new-cluster, is the only voter of a new epoch with every change it
/// had, commits alone under a new cluster id, and the wiped peers, wiped again, learn its pool
/// and route from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_wiped_voters_are_refused_and_force_new_cluster_recovers() {
    let web = Backend::start("web-1", Behavior::Echo).await;
    let mut nodes = start_cluster(3, |_| String::new(), |_| backends_toml(&[&web])).await;
    let (code, p) = add(&nodes[0], "x", "127.0.0.1:9").await;
    assert_eq!(code, 201, "{p}");
    let cluster_id = status(&nodes[0]).await["cluster_id"].clone();
    wipe(&mut nodes[1]);
    wipe(&mut nodes[2]);
    restart(&mut nodes[1], &[]);
    restart(&mut nodes[2], &[]);
    let waiting = eventually(Duration::from_secs(15), "a refusal", || async {
        status(&nodes[1]).await["waiting"]
            .as_str()
            .map(str::to_string)
    })
    .await;
    assert!(waiting.contains("--force-new-cluster"), "{waiting}");
    assert!(nodes[1].log().contains("--force-new-cluster"));
    for n in &nodes {
        let (code, body) = add(n, "y", "127.0.0.1:10").await;
        assert_eq!(code, 503, "{body}");
    }

    nodes[0].kill9();
    restart(&mut nodes[0], &["--force-new-cluster"]);
    nodes[0].wait_ready().await;
    let st = status(&nodes[0]).await;
    assert_eq!(st["members"], json!(["a"]), "{st}");
    assert_eq!(st["consensus"], "voting");
    // A new cluster id (SPEC: the old majority's peers are refused rather than merged).
    assert_ne!(
        st["cluster_id"], cluster_id,
        "the forced cluster kept the old id"
    );
    let p = pool(&nodes[0]).await;
    assert!(has(&p, "x"), "nothing committed is lost: {p}");
    let (code, p) = add(&nodes[0], "y", "127.0.0.1:10").await;
    assert_eq!(code, 201, "{p}");
    // b and c learned the old cluster's id: they are another cluster now. Wiped again (they
    // hold nothing the new cluster needs) they learn the new epoch's pool and route from it
    // (voters again only once added back).
    for n in nodes[1..].iter_mut() {
        wipe(n);
        restart(n, &[]);
    }
    for n in &nodes[1..] {
        eventually(Duration::from_secs(10), "the new pool learned", || async {
            let p = pool(n).await;
            (has(&p, "x") && has(&p, "y")).then_some(())
        })
        .await;
        let st = status(n).await;
        assert_eq!(st["members"], json!(["a"]), "{st}");
        assert_eq!(st["role"], "learner", "{st}");
    }
    assert_eq!(status(&nodes[0]).await["role"], "voter");

    // `shoal peers add` brings the cluster back: b and c become voters again, catch up, vote,
    // and with nothing committed by the survivor lost.
    for n in &nodes[1..] {
        let id = if std::ptr::eq(n, &nodes[1]) { "b" } else { "c" };
        let out = std::process::Command::new(shoal_bin())
            .args(["peers", "add", id, &cluster_addr(n)])
            .args(["--admin", &format!("http://{}", nodes[0].admin)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "peers add {id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        consensus_is(n, "voting", Duration::from_secs(10)).await;
    }
    for n in &nodes {
        eventually(Duration::from_secs(10), "three voters again", || async {
            (status(n).await["members"] == json!(["a", "b", "c"])).then_some(())
        })
        .await;
    }
    // b and c carry quorums without the survivor, and hold everything it had.
    nodes[0].kill9();
    let (code, p) = add(&nodes[1], "z", "127.0.0.1:11").await;
    assert_eq!(code, 201, "{p}");
    assert!(has(&p, "x") && has(&p, "y") && has(&p, "z"), "{p}");
}

/// A peer's cluster address, from its config file.
fn cluster_addr(s: &Shoal) -> String {
    let text = std::fs::read_to_string(&s.config).unwrap();
    text.lines()
        .skip_while(|l| *l != "[cluster]")
        .find_map(|l| l.strip_prefix("listen = \""))
        .map(|l| l.trim_end_matches('"').to_string())
        .unwrap()
}

/// A peer of another cluster (another cluster id) under a configured id and address is refused
/// and counted, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_another_cluster_is_refused_and_counted() {
    let web = Backend::start("web-1", Behavior::Echo).await;
    let mut one = start_cluster(3, |_| String::new(), |_| backends_toml(&[&web])).await;
    let two = start_cluster(3, |_| String::new(), |_| backends_toml(&[&web])).await;
    let id_one = status(&one[0]).await["cluster_id"].clone();
    let id_two = status(&two[2]).await["cluster_id"].clone();
    assert_ne!(id_one, id_two);
    // Cluster two's c, with its state, takes the place of cluster one's c.
    let c_one = std::fs::read_to_string(&one[2].config).unwrap();
    let c_two = std::fs::read_to_string(&two[2].config).unwrap();
    // The first lines of [cluster]: its listen address, then its peers.
    let line = |text: &str, n: usize| {
        let cluster = text.split("[cluster]\n").nth(1).unwrap();
        cluster.lines().nth(n).unwrap().to_string()
    };
    let mut two = two;
    two[2].kill9();
    one[2].kill9();
    let moved = c_two
        .replace(&line(&c_two, 0), &line(&c_one, 0))
        .replace(&line(&c_two, 1), &line(&c_one, 1));
    std::fs::write(&two[2].config, moved).unwrap();
    let before = pool(&one[0]).await;
    restart(&mut two[2], &[]);
    // Up, not ready: once cluster one claims it, it serves nothing (SPEC 5, no stray cluster),
    // and that may come before a poll of /readyz sees it ready.
    eventually(Duration::from_secs(20), "c answering /livez", || async {
        matches!(get_text(two[2].admin, "/livez").await, Ok((200, _))).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "refusals counted", || async {
        let m = two[2].metrics().await;
        let refused = ["a", "b"].iter().any(|p| {
            metric(
                &m,
                &format!("shoal_peer_auth_failures_total{{peer=\"{p}\"}}"),
            )
            .is_some_and(|v| v >= 1.0)
        });
        refused.then_some(())
    })
    .await;
    assert!(two[2].log().contains("another cluster"));
    // Nothing crossed: each side keeps its own cluster and pool.
    assert_eq!(status(&two[2]).await["cluster_id"], id_two);
    assert_eq!(status(&one[0]).await["cluster_id"], id_one);
    assert_eq!(pool(&one[0]).await, before);
    // Cluster one still commits with a and b.
    let (code, p) = add(&one[0], "y", "127.0.0.1:10").await;
    assert_eq!(code, 201, "{p}");
}

/// Bad backends are refused by the admin API with 400, by the core's one set of rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_backends_are_refused_with_400_and_change_nothing() {
    let nodes = start_cluster(1, |_| String::new(), |_| String::new()).await;
    let before = pool(&nodes[0]).await;
    for body in [
        json!({"addr": "not an address"}),
        json!({"addr": "127.0.0.1:9", "weight": 0}),
        json!({"addr": "127.0.0.1:9", "id": "a/b"}),
    ] {
        let (code, resp) = admin_call(nodes[0].admin, "POST", "/pool/backends", Some(body)).await;
        assert_eq!(code, 400, "{resp}");
    }
    assert_eq!(pool(&nodes[0]).await, before);
}

/// A peer at an older epoch learns the newer pool from the Hello exchange alone, whichever side
/// of the link dials: here the survivor is c, which accepts the others' links, and nothing
/// commits after it forced the new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_epoch_learns_the_newer_pool_from_the_hello() {
    let web = Backend::start("web-1", Behavior::Echo).await;
    let mut nodes = start_cluster(3, |_| String::new(), |_| backends_toml(&[&web])).await;
    let (code, p) = add(&nodes[2], "x", "127.0.0.1:9").await;
    assert_eq!(code, 201, "{p}");
    wipe(&mut nodes[0]);
    wipe(&mut nodes[1]);
    nodes[2].kill9();
    restart(&mut nodes[2], &["--force-new-cluster"]);
    nodes[2].wait_ready().await;
    restart(&mut nodes[0], &[]);
    restart(&mut nodes[1], &[]);
    for n in &nodes[..2] {
        eventually(
            Duration::from_secs(10),
            "the forced pool learned",
            || async {
                let st = status(n).await;
                (st["members"] == json!(["c"]) && has(&pool(n).await, "x")).then_some(())
            },
        )
        .await;
    }
}
