//! Health checking and cluster ejection, tried with real processes on loopback.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use tokio::net::TcpListener;

const FAST_HEALTH: &str =
    "[health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfall = 2\nrise = 2\n";

async fn state_of(s: &Shoal, id: &str) -> String {
    let (_, p) = get_json(s.admin, "/pool").await;
    p["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .map(|b| b["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

async fn wait_state(nodes: &[Shoal], id: &str, want: &str, within: Duration) -> Duration {
    let start = Instant::now();
    for n in nodes {
        eventually(within, &format!("{id} {want} on every peer"), || async {
            (state_of(n, id).await == want).then_some(())
        })
        .await;
    }
    start.elapsed()
}

/// Steady GETs through one peer until `stop`; counts ok and failed.
fn load(
    proxy: std::net::SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut tx = client(proxy).await;
            while !stop.load(Ordering::SeqCst) {
                let req = request("GET", proxy, "/steady").body(empty()).unwrap();
                match tx.send_request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => {
                        eprintln!("failed request: {:?}", other.map(|r| r.status()));
                        failed.fetch_add(1, Ordering::SeqCst);
                        tx = client(proxy).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    (ok, failed, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_is_ejected_by_the_cluster_and_comes_back() {
    let b1 = Backend::start("b1", Behavior::Echo).await;
    let b2 = Backend::start("b2", Behavior::Echo).await;
    let b3 = Backend::start("b3", Behavior::Echo).await;
    let a1 = Backend::start("a1", Behavior::Echo).await;
    // A second service: the page shows a table for it too.
    let seeds = format!(
        "{}{}",
        backends_toml(&[&b1, &b2, &b3]),
        service_toml("api", "hosts = [\"api.localhost\"]", &[&a1])
    );
    let nodes = start_cluster(3, |_| String::new(), |_| format!("{FAST_HEALTH}{seeds}")).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed, tasks) = load(nodes[0].proxy, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let addr = b2.addr;
    b2.kill();
    let killed = Instant::now();
    // Off every peer's routing (local view), then ejected by agreement.
    for n in &nodes {
        eventually(
            Duration::from_secs(2),
            "local down on every peer",
            || async {
                let (_, st) = get_json(n.admin, "/status").await;
                let b = st["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|b| b["id"] == "b2")
                    .cloned()
                    .unwrap();
                (b["local"] == "down").then_some(())
            },
        )
        .await;
    }
    let local = killed.elapsed();
    wait_state(&nodes, "b2", "ejected", Duration::from_secs(2)).await;
    let agreed = killed.elapsed();
    println!(
        "detection: kill -> down on every peer {local:?}, kill -> ejected on every peer {agreed:?}"
    );
    let (_, st) = get_json(nodes[1].admin, "/status").await;
    let b = st["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == "b2")
        .cloned()
        .unwrap();
    assert!(b["down_votes"].as_array().unwrap().len() >= 2, "{st}");
    let m = nodes[2].metrics().await;
    assert_eq!(
        metric(
            &m,
            "shoal_ejections_total{backend=\"b2\",service=\"default\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "shoal_backend_state{backend=\"b2\",state=\"ejected\",service=\"default\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "shoal_backend_up{backend=\"b2\",service=\"default\"}"),
        Some(0.0)
    );
    assert!(
        metric(
            &m,
            "shoal_health_checks_total{backend=\"b2\",result=\"fail\",service=\"default\"}"
        )
        .unwrap()
            >= 2.0
    );

    // Restart it on the same port: active again within 2 s.
    let l = TcpListener::bind(addr).await.unwrap();
    let _b2 = Backend::start_on(l, "b2", Behavior::Echo);
    let back = Instant::now();
    wait_state(&nodes, "b2", "active", Duration::from_secs(2)).await;
    println!(
        "recovery: restart -> active on every peer {:?}",
        back.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "ok {}",
        ok.load(Ordering::SeqCst)
    );
    assert!(ok.load(Ordering::SeqCst) > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_check_with_open_port_is_ejected() {
    let b1 = Backend::start("b1", Behavior::Echo).await;
    let b2 = Backend::start("b2", Behavior::Echo).await;
    let b3 = Backend::start("b3", Behavior::Echo).await;
    let seeds = backends_toml(&[&b1, &b2, &b3]);
    let nodes = start_cluster(3, |_| String::new(), |_| format!("{FAST_HEALTH}{seeds}")).await;
    b3.health_ok.store(false, Ordering::SeqCst);
    wait_state(&nodes, "b3", "ejected", Duration::from_secs(3)).await;
    // No traffic goes to it while ejected, although it would answer.
    let before = b3.hits();
    for _ in 0..12 {
        let r = send(
            nodes[1].proxy,
            request("GET", nodes[1].proxy, "/").body(empty()).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(b3.hits(), before);
    b3.health_ok.store(true, Ordering::SeqCst);
    wait_state(&nodes, "b3", "active", Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ejection_cap_holds_and_traffic_still_flows() {
    let b1 = Backend::start("b1", Behavior::Echo).await;
    let b2 = Backend::start("b2", Behavior::Echo).await;
    let b3 = Backend::start("b3", Behavior::Echo).await;
    let seeds = backends_toml(&[&b1, &b2, &b3]);
    let nodes = start_cluster(
        3,
        |_| String::new(),
        |_| format!("{FAST_HEALTH}max_ejected_percent = 50\n{seeds}"),
    )
    .await;
    b1.kill();
    b2.kill();
    // Both get majority down votes; only floor(50% of 3) = 1 may be ejected.
    for n in &nodes {
        eventually(Duration::from_secs(3), "votes against both", || async {
            let (_, st) = get_json(n.admin, "/status").await;
            let full = st["backends"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|b| b["down_votes"].as_array().unwrap().len() >= 2)
                .count();
            (full == 2).then_some(())
        })
        .await;
    }
    for n in &nodes {
        let (_, p) = get_json(n.admin, "/pool").await;
        let ejected = p["backends"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["state"] == "ejected")
            .count();
        assert_eq!(ejected, 1, "{p}");
    }
    for n in &nodes {
        for _ in 0..6 {
            let r = send(n.proxy, request("GET", n.proxy, "/").body(empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejected_and_down_keys_move_to_the_same_next_backend_everywhere() {
    let bs: Vec<Backend> = start_backends(5).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let seeds = backends_toml(&refs);
    let nodes = start_cluster(3, |_| String::new(), |_| {
        format!("{FAST_HEALTH}[balance]\nalgorithm = \"consistent_hash\"\nhash_key = \"header:x-user\"\n{seeds}")
    })
    .await;
    let owners = |n: usize| {
        let proxy = nodes[n].proxy;
        async move {
            let mut v = Vec::new();
            for k in 0..150 {
                let req = request("GET", proxy, "/")
                    .header("x-user", format!("u{k}"))
                    .body(empty())
                    .unwrap();
                let r = send(proxy, req).await.unwrap();
                assert_eq!(r.status(), 200);
                let j: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
                v.push(j["name"].as_str().unwrap().to_string());
            }
            v
        }
    };
    let before = owners(0).await;
    bs[2].kill();
    wait_state(&nodes, "k2", "ejected", Duration::from_secs(3)).await;
    let after: Vec<Vec<String>> = vec![owners(0).await, owners(1).await, owners(2).await];
    assert_eq!(after[0], after[1]);
    assert_eq!(after[0], after[2]);
    for (b, a) in before.iter().zip(&after[0]) {
        if b != "k2" {
            assert_eq!(b, a, "only the ejected backend's keys move");
        } else {
            assert_ne!(a, "k2");
        }
    }
}

async fn start_backends(n: usize) -> Vec<Backend> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Backend::start(&format!("k{i}"), Behavior::Echo).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_takes_no_new_requests_and_finishes_in_flight_ones() {
    let b1 = Backend::start("b1", Behavior::Slow(Duration::from_millis(800))).await;
    let b2 = Backend::start("b2", Behavior::Echo).await;
    let seeds = backends_toml(&[&b1, &b2]);
    let nodes = start_cluster(3, |_| String::new(), |_| seeds.clone()).await;
    let proxy = nodes[0].proxy;
    // Round robin: one of the first two requests goes to the slow b1.
    let r1 = tokio::spawn(async move {
        send(proxy, request("GET", proxy, "/1").body(empty()).unwrap()).await
    });
    let r2 = tokio::spawn(async move {
        send(proxy, request("GET", proxy, "/2").body(empty()).unwrap()).await
    });
    // Drained while b1 holds its request.
    eventually(Duration::from_secs(5), "b1 has its request", || async {
        (b1.hits() == 1).then_some(())
    })
    .await;
    let (code, p) = admin_call(nodes[1].admin, "POST", "/pool/backends/b1/drain", None).await;
    assert_eq!(code, 200, "{p}");
    assert_eq!(r1.await.unwrap().unwrap().status(), 200);
    assert_eq!(r2.await.unwrap().unwrap().status(), 200);
    assert_eq!(b1.hits(), 1);
    for n in &nodes {
        eventually(Duration::from_secs(1), "draining everywhere", || async {
            (state_of(n, "b1").await == "draining").then_some(())
        })
        .await;
        for _ in 0..6 {
            let r = send(n.proxy, request("GET", n.proxy, "/").body(empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    assert_eq!(b1.hits(), 1, "a draining backend got a new request");
    let (code, _) = admin_call(nodes[2].admin, "POST", "/pool/backends/b1/undrain", None).await;
    assert_eq!(code, 200);
}

/// Three peers (a, b, c) that call a silent peer dead after 1 s, over backends b1 – b3 probed
/// every 200 ms.
async fn three_peers_quick_to_call_dead() -> ([Backend; 3], Vec<Shoal>) {
    let b1 = Backend::start("b1", Behavior::Echo).await;
    let b2 = Backend::start("b2", Behavior::Echo).await;
    let b3 = Backend::start("b3", Behavior::Echo).await;
    let seeds = backends_toml(&[&b1, &b2, &b3]);
    let nodes = start_cluster(
        3,
        |_| "dead_after = \"1s\"".to_string(),
        |_| format!("{FAST_HEALTH}{seeds}"),
    )
    .await;
    ([b1, b2, b3], nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_peer_ejects_nobody() {
    let (_backends, nodes) = three_peers_quick_to_call_dead().await;
    let v0 = get_json(nodes[0].admin, "/pool").await.1["version"]
        .as_u64()
        .unwrap();
    nodes[2].signal("-STOP");
    // The others see it dead after a while.
    eventually(Duration::from_secs(5), "peer c dead", || async {
        let (_, peers) = get_json(nodes[0].admin, "/peers").await;
        peers
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == "c" && p["state"] == "dead")
            .then_some(())
    })
    .await;
    nodes[2].signal("-CONT");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in &nodes {
        let (_, p) = get_json(n.admin, "/pool").await;
        assert!(
            p["backends"]
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["state"] == "active"),
            "{p}"
        );
        assert_eq!(
            p["version"].as_u64(),
            Some(v0),
            "the pool did not change: {p}"
        );
        let m = n.metrics().await;
        assert!(
            !m.lines()
                .any(|l| l.starts_with("shoal_ejections_total") && !l.ends_with(" 0")),
            "{m}"
        );
    }
    // And it is alive again for the others.
    eventually(Duration::from_secs(3), "peer c alive", || async {
        let (_, peers) = get_json(nodes[0].admin, "/peers").await;
        peers
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == "c" && p["state"] == "alive")
            .then_some(())
    })
    .await;
}

/// The peers whose down votes on `id` the agreed pool holds, as `s` shows it, sorted.
async fn down_votes(s: &Shoal, id: &str) -> Vec<String> {
    let (_, st) = get_json(s.admin, "/status").await;
    let mut v: Vec<String> = st["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .map(|b| b["down_votes"].as_array().unwrap().clone())
        .unwrap_or_default()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// A health voter with nothing to do waits for a change instead of ticking (a thousand
/// services' voters are mostly idle): a peer's death must still wake the others' voters to
/// expire its votes, and a pool that changed while a peer was stopped must wake that peer's
/// voter to cast its vote again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_voters_expire_a_stopped_peers_votes_and_it_votes_again_when_back() {
    let ([_b1, _b2, b3], nodes) = three_peers_quick_to_call_dead().await;
    b3.health_ok.store(false, Ordering::SeqCst);
    wait_state(&nodes, "b3", "ejected", Duration::from_secs(5)).await;
    let all = vec!["a".to_string(), "b".to_string(), "c".to_string()];
    eventually(
        Duration::from_secs(5),
        "every peer's vote on b3",
        || async { (down_votes(&nodes[0], "b3").await == all).then_some(()) },
    )
    .await;
    // Nothing is left to do: every voter goes idle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    nodes[2].signal("-STOP");
    let (a, b) = ("a".to_string(), "b".to_string());
    eventually(Duration::from_secs(8), "c's vote expired", || async {
        (down_votes(&nodes[0], "b3").await == [a.clone(), b.clone()]).then_some(())
    })
    .await;
    // Two votes of three still hold it out.
    assert_eq!(state_of(&nodes[0], "b3").await, "ejected");
    nodes[2].signal("-CONT");
    eventually(Duration::from_secs(8), "c votes again", || async {
        (down_votes(&nodes[0], "b3").await == all).then_some(())
    })
    .await;
    for n in &nodes {
        assert_eq!(state_of(n, "b3").await, "ejected");
    }
}

/// The events of one peer, oldest first.
async fn events(s: &Shoal) -> Vec<serde_json::Value> {
    let (code, v) = get_json(s.admin, "/events").await;
    assert_eq!(code, 200, "{v}");
    v.as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tell_what_each_peer_saw_and_the_cluster_did() {
    let b1 = Backend::start("b1", Behavior::Echo).await;
    let b2 = Backend::start("b2", Behavior::Echo).await;
    let b3 = Backend::start("b3", Behavior::Echo).await;
    let seeds = backends_toml(&[&b1, &b2, &b3]);
    let mut nodes = start_cluster(
        3,
        |_| "dead_after = \"1s\"\n".to_string(),
        |_| format!("{FAST_HEALTH}{seeds}"),
    )
    .await;
    // Follow b's events live (server-sent events) from now on.
    let follow = {
        let admin = nodes[1].admin;
        tokio::spawn(async move {
            let mut tx = client(admin).await;
            let req = request("GET", admin, "/events?follow=1")
                .body(empty())
                .unwrap();
            let resp = tx.send_request(req).await.unwrap();
            assert_eq!(resp.headers()["content-type"], "text/event-stream");
            let mut body = resp.into_body();
            let mut text = String::new();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(d) = frame.data_ref() {
                    text.push_str(&String::from_utf8_lossy(d));
                }
                if text.contains("event: ejected\n") {
                    return text;
                }
            }
            text
        })
    };
    b2.kill();
    wait_state(&nodes, "b2", "ejected", Duration::from_secs(3)).await;
    let streamed = tokio::time::timeout(Duration::from_secs(5), follow)
        .await
        .expect("the stream delivered the ejection")
        .unwrap();
    assert!(streamed.contains("event: pool_changed\n"), "{streamed}");
    let data = streamed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect::<Vec<_>>();
    assert!(data.iter().all(|e| e["peer"] == "b"), "{streamed}");

    for n in &nodes {
        let local = eventually(Duration::from_secs(3), "backend_local", || async {
            events(n)
                .await
                .into_iter()
                .find(|e| e["kind"] == "backend_local" && e["backend"] == "b2")
        })
        .await;
        let ev = events(n).await;
        assert_eq!(local["state"], "down");
        assert!(local["why"].as_str().unwrap().contains("probes"), "{local}");
        let ejected = ev
            .iter()
            .find(|e| e["kind"] == "ejected")
            .unwrap_or_else(|| panic!("no ejected: {ev:?}"));
        assert_eq!(ejected["backend"], "b2");
        assert!(
            ejected["voters"].as_array().unwrap().len() >= 2,
            "{ejected}"
        );
        let version = ejected["version"].as_u64().unwrap();
        let changed = ev
            .iter()
            .find(|e| e["kind"] == "pool_changed" && e["version"] == version)
            .unwrap();
        assert!(
            changed["change"].as_str().unwrap().contains("b2 ejected"),
            "{changed}"
        );
        assert!(changed["through"].is_string(), "{changed}");
        // Oldest first, RFC 3339 times.
        assert!(ev
            .windows(2)
            .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
        assert!(ev[0]["at"].as_str().unwrap().contains('T'));
    }

    // An admin change names the peer it went through.
    let (code, _) = admin_call(
        nodes[2].admin,
        "PUT",
        "/pool/backends/b1",
        Some(serde_json::json!({"weight": 3})),
    )
    .await;
    assert_eq!(code, 200);
    eventually(
        Duration::from_secs(3),
        "weight change event on a",
        || async {
            events(&nodes[0]).await.into_iter().find(|e| {
                e["kind"] == "pool_changed"
                    && e["through"] == "c"
                    && e["change"]
                        .as_str()
                        .is_some_and(|c| c.contains("b1 weight 1 -> 3"))
            })
        },
    )
    .await;

    // A reload, and a peer that dies.
    nodes[0].signal("-HUP");
    eventually(Duration::from_secs(3), "reload event", || async {
        events(&nodes[0])
            .await
            .into_iter()
            .find(|e| e["kind"] == "reload" && e["result"] == "ok")
    })
    .await;
    nodes[2].kill9();
    eventually(Duration::from_secs(6), "c dead in a's events", || async {
        events(&nodes[0])
            .await
            .into_iter()
            .find(|e| e["kind"] == "peer_state" && e["peer_id"] == "c" && e["state"] == "dead")
    })
    .await;
}

/// Headless chromium (Debian's), if installed: under CI=true it must be.
fn chromium() -> Option<&'static str> {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(c);
        }
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but no chromium: .ci/run must install it"
    );
    eprintln!("skipped: no chromium installed");
    None
}

/// The status page's DOM once its script has run (and a screenshot, if `png` is given).
fn browse(browser: &str, url: &str, png: Option<&std::path::Path>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=3000",
        "--window-size=1400,1000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()));
    match png {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).output().unwrap();
    assert!(
        out.status.success(),
        "{browser}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_peers_pool_votes_and_events_in_a_browser() {
    let Some(browser) = chromium() else {
        return;
    };
    let b1 = Backend::start("b1", Behavior::Echo).await;
    let b2 = Backend::start("b2", Behavior::Echo).await;
    let b3 = Backend::start("b3", Behavior::Echo).await;
    let a1 = Backend::start("a1", Behavior::Echo).await;
    // A second service: the page shows a table for it too.
    let seeds = format!(
        "{}{}",
        backends_toml(&[&b1, &b2, &b3]),
        service_toml("api", "hosts = [\"api.localhost\"]", &[&a1])
    );
    let nodes = start_cluster(3, |_| String::new(), |_| format!("{FAST_HEALTH}{seeds}")).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (_ok, _failed, tasks) = load(nodes[0].proxy, stop.clone());
    let url = format!("http://{}/", nodes[0].admin);
    let (code, html) = get_text(nodes[0].admin, "/").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external assets"
    );

    let browser_dom = {
        let url = url.clone();
        move || browse(browser, &url, None)
    };
    let dom = tokio::task::spawn_blocking(browser_dom.clone())
        .await
        .unwrap();
    for id in ["b1", "b2", "b3"] {
        assert!(
            dom.contains(&format!(
                "data-backend=\"{id}\" data-state=\"active\" data-local=\"up\""
            )),
            "{id} not shown active/up:\n{dom}"
        );
    }
    for p in ["b", "c"] {
        assert!(
            dom.contains(&format!("data-peer=\"{p}\" data-state=\"alive\"")),
            "{dom}"
        );
    }
    assert!(dom.contains("Service api: api.localhost /"), "{dom}");
    assert!(
        dom.contains("data-service=\"api\" data-backend=\"a1\" data-state=\"active\""),
        "{dom}"
    );
    assert!(dom.contains("routing from pool version"), "{dom}");
    assert!(dom.contains("class=\"pill voting\">voting</span>"), "{dom}");

    b2.kill();
    wait_state(&nodes, "b2", "ejected", Duration::from_secs(3)).await;
    let dom = tokio::task::spawn_blocking(browser_dom).await.unwrap();
    assert!(
        dom.contains("data-backend=\"b2\" data-state=\"ejected\" data-local=\"down\""),
        "b2 not shown ejected:\n{dom}"
    );
    assert!(dom.contains("data-kind=\"ejected\""), "{dom}");
    assert!(dom.contains("b2 ejected by the cluster"), "{dom}");
    // Request rates: the page computed a rate for the backends carrying the load.
    assert!(
        dom.contains("class=\"num rate\">") && !dom.contains("class=\"num rate\">-<"),
        "{dom}"
    );

    // A screenshot of the page during the failure, for people to look at.
    let png = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let shot = png.clone();
    tokio::task::spawn_blocking(move || browse(browser, &url, Some(&shot)))
        .await
        .unwrap();
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "screenshot {} is {size} bytes",
        png.display()
    );
    eprintln!("screenshot: {}", png.display());
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_build_quorum_members_bytes_inflight_and_the_process_and_forget_removed_backends(
) {
    let b1 = Backend::start("b1", Behavior::Mirror).await;
    let b2 = Backend::start("b2", Behavior::Mirror).await;
    let seeds = backends_toml(&[&b1, &b2]);
    let nodes = start_cluster(3, |_| String::new(), |_| seeds.clone()).await;
    let s = &nodes[0];
    for _ in 0..6 {
        let r = send(
            s.proxy,
            request("POST", s.proxy, "/upload")
                .body(full(vec![b'x'; 1000]))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
    }
    let m = s.metrics().await;
    let version = std::process::Command::new(shoal_bin())
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    let commit = version
        .split("(commit ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("{version}"));
    assert!(
        m.contains(&format!(
            "shoal_build_info{{version=\"{}\",commit=\"{commit}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{m}"
    );
    assert_eq!(metric(&m, "shoal_quorum"), Some(1.0), "{m}");
    assert_eq!(
        metric(&m, "shoal_members{role=\"voter\"}"),
        Some(3.0),
        "{m}"
    );
    for b in ["b1", "b2"] {
        let sent = metric(
            &m,
            &format!("shoal_request_bytes_total{{backend=\"{b}\",service=\"default\"}}"),
        )
        .unwrap();
        let got = metric(
            &m,
            &format!("shoal_response_bytes_total{{backend=\"{b}\",service=\"default\"}}"),
        )
        .unwrap();
        assert_eq!(
            sent, 3000.0,
            "{b}: 3 bodies of 1000 bytes each way (round robin)"
        );
        assert!(
            got >= 3000.0,
            "{b}: the echo answers with at least the body: {got}"
        );
        assert_eq!(
            metric(
                &m,
                &format!("shoal_backend_inflight{{backend=\"{b}\",service=\"default\"}}")
            ),
            Some(0.0)
        );
    }
    assert!(metric(&m, "process_cpu_seconds_total").is_some(), "{m}");
    for family in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(metric(&m, family).is_some_and(|v| v > 0.0), "{family}: {m}");
    }
    // A removed backend's series leave.
    assert!(m.contains("shoal_backend_up{backend=\"b2\",service=\"default\"}"));
    let (code, _) = admin_call(s.admin, "DELETE", "/pool/backends/b2", None).await;
    assert_eq!(code, 200);
    let m = s.metrics().await;
    assert!(!m.contains("backend=\"b2\""), "{m}");
    assert!(
        m.contains("shoal_backend_up{backend=\"b1\",service=\"default\"}"),
        "{m}"
    );
}

fn repo_file(p: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

#[test]
fn alert_rules_pass_promtool_checks_and_unit_tests() {
    if !have_tool("promtool", &["--version"]) {
        return;
    }
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(&args)
            .current_dir(repo_file("deploy/prometheus"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        assert!(text.contains("SUCCESS"), "{text}");
    }
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(repo_file("deploy/prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(repo_file("deploy/prometheus/alerts_test.yml")).unwrap();
    for name in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "alert {name} has no unit test"
        );
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_live_prometheus() {
    if !have_tool("prometheus", &["--version"]) {
        return;
    }
    // A cluster with TLS on both sides (so certificate expiry is exported), traffic and commits.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    shoal_cert(&["ca", "--out", d]);
    for id in ["a", "b", "c"] {
        shoal_cert(&["issue", id, "--ca", d, "--out", d]);
    }
    let b1 = Backend::start("b1", Behavior::Echo).await;
    let b2 = Backend::start("b2", Behavior::Echo).await;
    let seeds = backends_toml(&[&b1, &b2]);
    let ids = ["a", "b", "c"];
    let nodes = start_cluster(
        3,
        |_| String::new(),
        |i| {
            let id = ids[i];
            format!(
                "[cluster.tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{id}.pem\"\nkey = \"{d}/{id}-key.pem\"\n\n[proxy.tls]\nlisten = [\"127.0.0.1:{}\"]\ncert = \"{d}/{id}.pem\"\nkey = \"{d}/{id}-key.pem\"\n\n{FAST_HEALTH}{seeds}",
                free_port()
            )
        },
    )
    .await;
    let prom_port = free_port();
    let targets: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.admin)).collect();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: shoal\n    static_configs:\n      - targets: [{}]\n",
            repo_file("deploy/prometheus/alerts.yml").display(),
            targets.join(", ")
        ),
    )
    .unwrap();
    let mut prom = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _ = &mut prom;
    let _prom = Kill(prom);
    let prom_addr: std::net::SocketAddr = format!("127.0.0.1:{prom_port}").parse().unwrap();

    // 15 s of traffic through every peer and a pool change every 300 ms.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for n in &nodes {
        tasks.extend(load(n.proxy, stop.clone()).2);
    }
    let start = Instant::now();
    let mut w = 1;
    while start.elapsed() < Duration::from_secs(15) {
        w = w % 5 + 1;
        let (code, _) = admin_call(
            nodes[w % 3].admin,
            "PUT",
            "/pool/backends/b1",
            Some(serde_json::json!({ "weight": w })),
        )
        .await;
        assert_eq!(code, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("deploy/grafana/shoal.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert!(exprs.len() >= 25, "{}", exprs.len());
    let mut empty = Vec::new();
    for (title, expr) in &exprs {
        // What Grafana substitutes: every peer, a rate window of a few scrapes, the time range.
        let q = expr
            .replace("$instance", ".*")
            .replace("$service", ".*")
            .replace("$__rate_interval", "10s")
            .replace("$__range", "5m");
        let (code, v) =
            get_json(prom_addr, &format!("/api/v1/query?query={}", urlencode(&q))).await;
        assert_eq!(code, 200, "{title}: {q}: {v}");
        let n = v["data"]["result"].as_array().map(|r| r.len()).unwrap_or(0);
        if n == 0 {
            empty.push(format!("{title}: {q}"));
        }
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    assert!(
        empty.is_empty(),
        "queries without data:\n{}",
        empty.join("\n")
    );
    eprintln!("{} dashboard queries, each returned data", exprs.len());
}
