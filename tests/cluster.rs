//! The cluster from outside: several real `shoal run` processes on loopback agreeing on the pool.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

async fn pool_of(s: &Shoal) -> serde_json::Value {
    get_json(s.admin, "/pool").await.1
}

async fn owner(proxy: std::net::SocketAddr, key: &str) -> String {
    let req = request("GET", proxy, "/k")
        .header("x-user", key)
        .body(empty())
        .unwrap();
    let r = send(proxy, req).await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.body());
    let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    v["name"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_agree_route_alike_and_learn_changes_fast() {
    let (a, b, c) = (
        Backend::start("web-1", Behavior::Echo).await,
        Backend::start("web-2", Behavior::Echo).await,
        Backend::start("web-3", Behavior::Echo).await,
    );
    let seeds = backends_toml(&[&a, &b, &c]);
    let nodes = start_cluster(
        3,
        |_| String::new(),
        |_| {
            format!(
                "[balance]\nalgorithm = \"consistent_hash\"\nhash_key = \"header:x-user\"\n{seeds}"
            )
        },
    )
    .await;

    // Same version, same pool, same fingerprint everywhere.
    let pools = eventually(Duration::from_secs(5), "equal pools", || async {
        let mut ps = Vec::new();
        for n in &nodes {
            ps.push(pool_of(n).await);
        }
        (ps.iter().all(|p| *p == ps[0]) && ps[0]["version"].as_u64() >= Some(1)).then_some(ps)
    })
    .await;
    assert_eq!(pools[0]["backends"].as_array().unwrap().len(), 3);
    let mut prints = Vec::new();
    for n in &nodes {
        prints.push(metric(&n.metrics().await, "shoal_pool_fingerprint").unwrap());
    }
    assert!(prints.iter().all(|p| *p == prints[0]), "{prints:?}");

    // 500 hash keys: every peer picks the same backend.
    let mut by_peer: Vec<BTreeMap<String, String>> = vec![BTreeMap::new(); 3];
    for k in 0..500 {
        let key = format!("user-{k}");
        for (i, n) in nodes.iter().enumerate() {
            by_peer[i].insert(key.clone(), owner(n.proxy, &key).await);
        }
    }
    assert_eq!(by_peer[0], by_peer[1]);
    assert_eq!(by_peer[0], by_peer[2]);

    // A backend added through peer b is routed to by all three within a second.
    let d = Backend::start("web-4", Behavior::Echo).await;
    let (code, pool) = admin_call(
        nodes[1].admin,
        "POST",
        "/pool/backends",
        Some(json!({"addr": d.addr.to_string(), "id": "web-4"})),
    )
    .await;
    assert_eq!(code, 201, "{pool}");
    let committed = Instant::now();
    let version = pool["version"].as_u64().unwrap();
    // The answering peer shows the change at once, not eventually.
    assert_eq!(pool_of(&nodes[1]).await["version"].as_u64(), Some(version));
    for n in &nodes {
        eventually(
            Duration::from_secs(1),
            "the new backend in every peer's routing",
            || async {
                for k in 0..200 {
                    if owner(n.proxy, &format!("probe-{k}")).await == "web-4" {
                        return Some(());
                    }
                }
                None
            },
        )
        .await;
        assert_eq!(pool_of(n).await["version"].as_u64(), Some(version));
    }
    println!(
        "all three peers routed to the new backend {:?} after the commit",
        committed.elapsed()
    );
    // And the 500 keys still agree across peers.
    for k in (0..500).step_by(5) {
        let key = format!("user-{k}");
        let first = owner(nodes[0].proxy, &key).await;
        for n in &nodes[1..] {
            assert_eq!(owner(n.proxy, &key).await, first);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_down_changes_commit_majority_down_gives_503_and_traffic_flows() {
    let a = Backend::start("web-1", Behavior::Echo).await;
    let seeds = backends_toml(&[&a]);
    let mut nodes = start_cluster(3, |_| String::new(), |_| seeds.clone()).await;

    // kill -9 one peer: changes still commit.
    nodes[2].kill9();
    let change = (
        "POST",
        "/pool/backends",
        json!({"addr": "127.0.0.1:1", "id": "x1"}),
    );
    let (code, p) = commit_eventually(&nodes[0], &nodes, change, Duration::from_secs(30)).await;
    assert_eq!(code, 201, "{p}");
    let v = p["version"].as_u64().unwrap();
    let (code, _) = admin_call(
        nodes[1].admin,
        "PUT",
        "/pool/backends/x1",
        Some(json!({"weight": 7})),
    )
    .await;
    assert_eq!(code, 200);

    // It restarts and catches up.
    nodes[2].spawn();
    nodes[2].wait_ready().await;
    eventually(
        Duration::from_secs(5),
        "the restarted peer to catch up",
        || async {
            let p = pool_of(&nodes[2]).await;
            (p["version"].as_u64() == Some(v + 1)).then_some(())
        },
    )
    .await;

    // Two down: changes get 503 (with Retry-After), the survivor still proxies.
    nodes[1].kill9();
    nodes[2].kill9();
    let req = request("POST", nodes[0].admin, "/pool/backends")
        .body(full(json!({"addr": "127.0.0.1:2", "id": "x2"}).to_string()))
        .unwrap();
    let r = send(nodes[0].admin, req).await.unwrap();
    assert_eq!(r.status(), 503, "{:?}", r.body());
    assert!(r.headers().contains_key("retry-after"));
    let p = pool_of(&nodes[0]).await;
    assert!(p["backends"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["id"] != "x2"));
    for _ in 0..5 {
        let r = send(
            nodes[0].proxy,
            request("GET", nodes[0].proxy, "/").body(empty()).unwrap(),
        )
        .await
        .unwrap();
        // x1 (127.0.0.1:1) refuses connections; retries go to web-1.
        assert_eq!(r.status(), 200);
    }
    let (_, st) = get_json(nodes[0].admin, "/status").await;
    assert_eq!(st["quorum"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_survives_restarting_every_peer() {
    let mut nodes = start_cluster(3, |_| String::new(), |_| String::new()).await;
    let (code, _) = admin_call(
        nodes[0].admin,
        "POST",
        "/pool/backends",
        Some(json!({"addr": "127.0.0.1:9", "id": "keep", "weight": 3})),
    )
    .await;
    assert_eq!(code, 201);
    for n in nodes.iter_mut() {
        n.kill9();
    }
    for n in nodes.iter_mut() {
        n.spawn();
    }
    for n in &nodes {
        n.wait_ready().await;
    }
    for n in &nodes {
        let p = eventually(Duration::from_secs(5), "the pool after restart", || async {
            let p = pool_of(n).await;
            (p["backends"].as_array().map(|b| b.len()) == Some(1)).then_some(p)
        })
        .await;
        assert_eq!(p["backends"][0]["id"], "keep");
        assert_eq!(p["backends"][0]["weight"], 3);
    }
    // Seeds are not re-applied to an existing pool.
    let (code, p) = admin_call(nodes[1].admin, "DELETE", "/pool/backends/keep", None).await;
    assert_eq!(code, 200);
    assert_eq!(p["backends"].as_array().unwrap().len(), 0);
    let (code, _) = admin_call(nodes[1].admin, "DELETE", "/pool/backends/keep", None).await;
    assert_eq!(code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_through_different_peers_all_land() {
    let nodes = start_cluster(3, |_| String::new(), |_| String::new()).await;
    let v0 = pool_of(&nodes[0]).await["version"].as_u64().unwrap();
    let mut answered = 0;
    for round in 0..8 {
        let calls: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let admin = n.admin;
                tokio::spawn(async move {
                    let id = format!("r{round}-p{i}");
                    let addr = format!("127.0.0.{}:{}", i + 1, 1000 + round);
                    let (code, p) = admin_call(
                        admin,
                        "POST",
                        "/pool/backends",
                        Some(json!({"addr": addr, "id": id})),
                    )
                    .await;
                    assert_eq!(code, 201, "{p}");
                    // The answer is a pool that holds the change, committed after it.
                    assert!(
                        p["backends"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|b| b["id"] == id.as_str()),
                        "{p}"
                    );
                    p["version"].as_u64().unwrap()
                })
            })
            .collect();
        for c in calls {
            assert!(c.await.unwrap() > v0);
            answered += 1;
        }
    }
    assert_eq!(answered, 24);
    // Each change bumped the version exactly once: versions strictly increase, none is shared.
    for n in &nodes {
        let p = eventually(
            Duration::from_secs(3),
            "every peer at the final version",
            || async {
                let p = pool_of(n).await;
                (p["version"].as_u64() == Some(v0 + 24)).then_some(p)
            },
        )
        .await;
        assert_eq!(
            p["backends"].as_array().unwrap().len(),
            24,
            "every change landed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_pool_and_peers_commands() {
    let nodes = start_cluster(3, |_| String::new(), |_| String::new()).await;
    let admin = format!("http://{}", nodes[0].admin);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(shoal_bin())
            .args(args)
            .env("SHOAL_ADMIN", &admin)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&[
        "pool",
        "add",
        "127.0.0.1:9100",
        "--weight",
        "4",
        "--id",
        "cli-1",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("cli-1") && out.contains("127.0.0.1:9100"),
        "{out}"
    );
    let (code, _, err) = run(&["pool", "add", "127.0.0.1:9101", "--id", "cli-1"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("409") && err.contains("already exists"),
        "{err}"
    );
    let (code, out, _) = run(&["pool", "drain", "cli-1", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["backends"][0]["state"], "draining");
    let (code, _, err) = run(&["pool", "remove", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
    let (code, out, _) = run(&["peers"]);
    assert_eq!(code, 0);
    assert!(
        ["b", "c"].iter().all(|id| out
            .lines()
            .any(|l| l.starts_with(&format!("{id} ")) && l.contains(" alive "))),
        "{out}"
    );
    let (code, out, _) = run(&["peers", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["state"], "alive");
    assert_eq!(v[0]["role"], "voter");
    // status and health, as an operator and a container health check use them.
    let (code, out, _) = run(&["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("consensus voting")
            && out.contains("voters: a, b, c")
            && out.contains("cli-1"),
        "{out}"
    );
    let (code, _, _) = run(&["health"]);
    assert_eq!(code, 0);
    let (code, _, err) = run(&["health", "--admin", "http://127.0.0.1:1"]);
    assert_eq!(code, 1, "{err}");
}

mod tls {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn pair(dir: &std::path::Path, id: &str) -> (String, String) {
        let read = |f: String| std::fs::read_to_string(dir.join(f)).unwrap();
        (read(format!("{id}.pem")), read(format!("{id}-key.pem")))
    }

    /// Connect to a peer's cluster port with `cert`, claim to be `claim`, send a hello and a
    /// prepare; true if the peer kept the connection open afterwards.
    async fn intrude(
        addr: std::net::SocketAddr,
        ca_pem: &str,
        cert: (String, String),
        server_id: &str,
        claim: &str,
    ) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let chain: Vec<_> = rustls_pemfile::certs(&mut cert.0.as_bytes())
            .map(|c| c.unwrap())
            .collect();
        let key = rustls_pemfile::private_key(&mut cert.1.as_bytes())
            .unwrap()
            .unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(server_id.to_string()).unwrap();
        let Ok(mut s) = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(name, tcp)
            .await
        else {
            return false;
        };
        for body in [json!({"kind": "hello"}), json!({"kind": "heartbeat"})] {
            let frame = json!({"from": claim, "body": body}).to_string();
            let mut buf = (frame.len() as u32).to_be_bytes().to_vec();
            buf.extend_from_slice(frame.as_bytes());
            if s.write_all(&buf).await.is_err() || s.flush().await.is_err() {
                return false;
            }
        }
        // A refused peer is disconnected: reading sees EOF or an error soon.
        let mut b = [0u8; 1];
        use tokio::io::AsyncReadExt;
        !matches!(
            tokio::time::timeout(Duration::from_millis(800), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mutual_tls_admits_peers_and_refuses_strangers() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        shoal_cert(&["ca", "--out", d]);
        for id in ["a", "b", "c", "x"] {
            shoal_cert(&["issue", id, "--ca", d, "--out", d]);
        }
        let other = dir.path().join("other");
        let o = other.to_str().unwrap();
        shoal_cert(&["ca", "--out", o]);
        shoal_cert(&["issue", "b", "--ca", o, "--out", o]);
        // A CA is never overwritten by accident.
        let again = std::process::Command::new(shoal_bin())
            .args(["cert", "ca", "--out", d])
            .output()
            .unwrap();
        assert_eq!(again.status.code(), Some(2));
        let ca_path = dir.path().join("ca.pem");
        let ca_pem = std::fs::read_to_string(&ca_path).unwrap();
        let files: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| {
                (
                    dir.path().join(format!("{id}.pem")),
                    dir.path().join(format!("{id}-key.pem")),
                )
            })
            .collect();
        let nodes = start_cluster(
            3,
            |i| {
                format!(
                    "\n[cluster.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                    ca_path.display(),
                    files[i].0.display(),
                    files[i].1.display()
                )
            },
            |_| String::new(),
        )
        .await;
        // The peers found each other over mTLS: a change commits through every peer.
        for (i, n) in nodes.iter().enumerate() {
            let (code, p) = admin_call(
                n.admin,
                "POST",
                "/pool/backends",
                Some(json!({"addr": format!("127.0.0.1:{}", 100 + i), "id": format!("t{i}")})),
            )
            .await;
            assert_eq!(code, 201, "{p}");
        }
        let (_, peers) = get_json(nodes[0].admin, "/peers").await;
        assert!(
            peers
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["state"] == "alive"),
            "{peers}"
        );

        // Find a's cluster port from its config.
        let text = std::fs::read_to_string(&nodes[0].config).unwrap();
        let cluster_addr: std::net::SocketAddr = text
            .lines()
            .skip_while(|l| *l != "[cluster]")
            .find_map(|l| l.strip_prefix("listen = \""))
            .map(|l| l.trim_end_matches('"').parse().unwrap())
            .unwrap();

        // A certificate from another CA: the handshake fails.
        assert!(!intrude(cluster_addr, &ca_pem, pair(&other, "b"), "a", "b").await);
        // A good CA but a certificate naming another id ("x" claiming to be "b").
        assert!(!intrude(cluster_addr, &ca_pem, pair(dir.path(), "x"), "a", "b").await);
        // The real b certificate is accepted (the connection stays open).
        assert!(intrude(cluster_addr, &ca_pem, pair(dir.path(), "b"), "a", "b").await);

        let m = nodes[0].metrics().await;
        assert!(
            metric(&m, "shoal_peer_auth_failures_total{peer=\"unknown\"}").unwrap_or(0.0) >= 1.0,
            "{m}"
        );
        assert!(
            metric(&m, "shoal_peer_auth_failures_total{peer=\"b\"}").unwrap_or(0.0) >= 1.0,
            "{m}"
        );
    }
}

/// A lone voter runs no read round while idle: every pool chosen passes through its own
/// acceptor, so a read could learn nothing, and it would write its acceptor's file every 2 s.
/// Changes still commit at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_idle_voter_runs_no_read_rounds() {
    let a = Backend::start("web-1", Behavior::Echo).await;
    let s = Shoal::start("", &backends_toml(&[&a])).await;
    let committed = "shoal_paxos_rounds_total{result=\"committed\"}";
    // Formed (the seed round, and the read a start queues, are over).
    s.metric_reaches("shoal_pool_version", 1.0, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = s.dir.path().join("data").join("accepted.json");
    let (rounds, written) = (
        metric(&s.metrics().await, committed).expect("the rounds' counter"),
        std::fs::read(&accepted).expect("the acceptor's file"),
    );
    let modified = std::fs::metadata(&accepted).unwrap().modified().unwrap();
    // Three read periods.
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    assert_eq!(metric(&s.metrics().await, committed), Some(rounds));
    assert_eq!(std::fs::read(&accepted).unwrap(), written);
    assert_eq!(
        std::fs::metadata(&accepted).unwrap().modified().unwrap(),
        modified,
        "the acceptor's file was written again"
    );
    let (code, p) = admin_call(
        s.admin,
        "PUT",
        "/pool/backends/web-1",
        Some(json!({"weight": 3})),
    )
    .await;
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["version"], 2);
    assert_eq!(metric(&s.metrics().await, committed), Some(rounds + 1.0));
}
