//! The data plane, tried from outside: a real `shoal run` process, real backends, real sockets.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn three() -> (Backend, Backend, Backend) {
    (
        Backend::start("b1", Behavior::Echo).await,
        Backend::start("b2", Behavior::Echo).await,
        Backend::start("b3", Behavior::Echo).await,
    )
}

async fn echo_of(addr: std::net::SocketAddr, req: http::Request<Body>) -> serde_json::Value {
    let r = send(addr, req).await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.body());
    serde_json::from_slice(r.body()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly_and_by_weight() {
    let (a, b, c) = three().await;
    let rest = format!(
        "[[backends]]\nid = \"b1\"\naddr = \"{}\"\nweight = 2\n{}",
        a.addr,
        backends_toml(&[&b, &c])
    );
    let s = Shoal::start("", &rest).await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..40 {
        let v = echo_of(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap()).await;
        *seen
            .entry(v["name"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(seen["b1"], 20, "{seen:?}");
    assert_eq!(seen["b2"], 10, "{seen:?}");
    assert_eq!(seen["b3"], 10, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keys_stick() {
    let (a, b, c) = three().await;
    for (key, make) in [
        ("header:x-user", 0),
        ("cookie:sid", 1),
        ("query:u", 2),
        ("path", 3),
    ] {
        let rest = format!(
            "[balance]\nalgorithm = \"consistent_hash\"\nhash_key = \"{key}\"\n{}",
            backends_toml(&[&a, &b, &c])
        );
        let s = Shoal::start("", &rest).await;
        let mut owners: HashMap<u32, String> = HashMap::new();
        let mut distinct = std::collections::HashSet::new();
        for round in 0..3 {
            for user in 0..30u32 {
                let (path, hdr, val) = match make {
                    0 => ("/p".to_string(), "x-user", format!("u{user}")),
                    1 => ("/p".to_string(), "cookie", format!("a=1; sid=u{user}; z=2")),
                    2 => (format!("/p?x=1&u=u{user}&r={round}"), "x-other", "1".into()),
                    // The path key ignores the query.
                    _ => (format!("/user/{user}?r={round}"), "x-other", "1".into()),
                };
                let req = request("GET", s.proxy, &path)
                    .header(hdr, val)
                    .body(empty())
                    .unwrap();
                let name = echo_of(s.proxy, req).await["name"]
                    .as_str()
                    .unwrap()
                    .to_string();
                distinct.insert(name.clone());
                let prev = owners.entry(user).or_insert_with(|| name.clone());
                assert_eq!(*prev, name, "key {key}: user {user} moved");
            }
        }
        assert_eq!(
            distinct.len(),
            3,
            "key {key}: 30 keys should use all 3 backends"
        );
    }
}

/// The forwarded request's fields: hop-by-hop ones (and those Connection names) gone,
/// X-Forwarded-For appended to, X-Forwarded-Proto and -Host set (a client's own replaced), Host
/// kept, one Host required. The same whether the fields pass as they came (no access log) or
/// through a map (the access log reads them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let wire = Shoal::start("", &backends_toml(&[&a])).await;
    let logged = Shoal::start(
        "",
        &format!("[log]\naccess_log = true\n{}", backends_toml(&[&a])),
    )
    .await;
    for s in [&wire, &logged] {
        let req = http::Request::builder()
            .uri("/x?y=1")
            .header("host", "shop.example:8080")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "spoofed.example")
            .header("connection", "keep-alive, x-secret, host")
            .header("x-secret", "drop me")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("proxy-connection", "keep-alive")
            .header("x-kept", "yes")
            .body(empty())
            .unwrap();
        let v = echo_of(s.proxy, req).await;
        let h = &v["headers"];
        assert_eq!(h["host"], "shop.example:8080");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example:8080");
        assert_eq!(h["x-kept"], "yes");
        for gone in [
            "x-secret",
            "keep-alive",
            "te",
            "proxy-connection",
            "connection",
        ] {
            assert!(h.get(gone).is_none(), "{gone} was forwarded: {h}");
        }
        assert_eq!(v["path"], "/x");
        assert_eq!(v["query"], "y=1");

        // Two X-Forwarded-For fields are joined before the client is appended.
        let (got, v) = raw_echo(
            s.proxy,
            b"GET /xff HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(
            v["headers"]["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.1",
            "{got}"
        );

        // An absolute-form target without Host: its authority becomes the Host.
        let (got, v) = raw_echo(
            s.proxy,
            b"GET http://abs.example:81/p HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(v["headers"]["host"], "abs.example:81", "{got}");
        assert_eq!(v["headers"]["x-forwarded-host"], "abs.example:81", "{got}");
        assert_eq!(v["path"], "/p");

        // HTTP/1.1 needs exactly one Host: none, or two, is refused before any backend.
        let before = a.hits();
        for head in [
            &b"GET /nohost HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
            b"GET /twohosts HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        ] {
            let got = raw(s.proxy, head, Duration::from_secs(3)).await;
            assert!(got.starts_with("HTTP/1.1 400"), "{got}");
        }
        assert_eq!(a.hits(), before, "a refused request reached the backend");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways() {
    let m = Backend::start("m", Behavior::Mirror).await;
    let s = Shoal::start("", &backends_toml(&[&m])).await;
    assert_streams_both_ways(s.proxy, &m).await;
}

/// Through `proxy` to the mirror `m`: 8 MiB up and back (chunked), byte for byte; then `m` drips
/// an answer (5 chunks 300 ms apart) whose first chunk must arrive long before the last is sent.
/// Leaves `m` dripping.
async fn assert_streams_both_ways(proxy: std::net::SocketAddr, m: &Backend) {
    m.set(Behavior::Mirror);
    let big: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let req = request("POST", proxy, "/upload")
        .body(full(big.clone()))
        .unwrap();
    let r = send(proxy, req).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.body().len(), big.len());
    assert!(r.body()[..] == big[..], "the mirrored body differs");

    m.set(Behavior::Drip(5, Duration::from_millis(300)));
    let mut tx = client(proxy).await;
    let start = Instant::now();
    let resp = tx
        .send_request(request("GET", proxy, "/drip").body(empty()).unwrap())
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first_at = start.elapsed();
    assert_eq!(&first[..], b"chunk 0\n");
    let rest = body.collect().await.unwrap().to_bytes();
    let all_at = start.elapsed();
    assert!(rest.ends_with(b"chunk 4\n"));
    assert!(all_at >= Duration::from_millis(1200), "{all_at:?}");
    assert!(
        first_at < Duration::from_millis(600),
        "first chunk came after {first_at:?}: buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_style_upgrade_passes_through() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("", &backends_toml(&[&a])).await;
    let mut c = open_tunnel(s.proxy).await;
    for msg in [&b"hello"[..], b"through the tunnel"] {
        c.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
    }
}

/// A raw request (closing its connection) to an echo backend: the answer, and what the backend saw.
async fn raw_echo(proxy: std::net::SocketAddr, head: &[u8]) -> (String, serde_json::Value) {
    let got = raw(proxy, head, Duration::from_secs(3)).await;
    let body = got.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {got}"));
    (got, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_without_host_is_forwarded_with_one() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("", &backends_toml(&[&a])).await;
    let (got, v) = raw_echo(s.proxy, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(
        got.starts_with("HTTP/1.0 200") || got.starts_with("HTTP/1.1 200"),
        "{got}"
    );
    assert_eq!(v["headers"]["host"], a.addr.to_string());
    assert!(v["headers"].get("x-forwarded-host").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("", &backends_toml(&[&a])).await;
    let stream = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = http::Request::builder()
            .uri("http://app.example:81/h2?q=1")
            .body(empty())
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let v: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(v["version"], "HTTP/1.1", "backends get HTTP/1.1");
        assert_eq!(v["headers"]["host"], "app.example:81");
        assert_eq!(v["headers"]["x-forwarded-host"], "app.example:81");
        assert_eq!(v["path"], "/h2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_retried_for_any_method() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let dead = format!("127.0.0.1:{}", free_port());
    let rest = format!(
        "[health]\npassive_failures = 0\ninterval = \"60s\"\n[[backends]]\nid = \"dead\"\naddr = \"{dead}\"\n{}",
        backends_toml(&[&a])
    );
    let s = Shoal::start("", &rest).await;
    for i in 0..6 {
        let req = request("POST", s.proxy, "/order")
            .body(full(format!("item {i}")))
            .unwrap();
        let v = echo_of(s.proxy, req).await;
        assert_eq!(v["name"], "b1");
        assert_eq!(v["body_len"], 6);
    }
    let m = s.metrics().await;
    assert!(
        metric(
            &m,
            "shoal_upstream_errors_total{backend=\"dead\",kind=\"connect\"}"
        )
        .unwrap()
            >= 3.0,
        "{m}"
    );
    assert!(metric(&m, "shoal_retries_total").unwrap() >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_retries_idempotent_only() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let (reset_addr, reset_hits) = resetting_backend().await;
    let rest = format!(
        "[health]\npassive_failures = 0\ninterval = \"60s\"\n[[backends]]\nid = \"a-reset\"\naddr = \"{reset_addr}\"\n{}",
        backends_toml(&[&a])
    );
    let s = Shoal::start("", &rest).await;
    let mut gets_ok = 0;
    for _ in 0..6 {
        let r = send(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        gets_ok += 1;
    }
    assert_eq!(gets_ok, 6);
    assert!(
        reset_hits.load(Ordering::SeqCst) >= 3,
        "the resetting backend was tried"
    );
    // A POST that the resetting backend received is not replayed: 502.
    let mut codes = Vec::new();
    for _ in 0..4 {
        let r = send(
            s.proxy,
            request("POST", s.proxy, "/").body(full("x")).unwrap(),
        )
        .await
        .unwrap();
        codes.push(r.status().as_u16());
    }
    assert!(codes.contains(&502), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
    // A PUT with a body is idempotent: its body was taped as it went out and is sent again.
    for i in 0..6 {
        let body = format!("payload {i} {}", "x".repeat(2000));
        let r = send(
            s.proxy,
            request("PUT", s.proxy, "/doc")
                .body(full(body.clone()))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.body());
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["body_len"], body.len(), "the replayed body arrived whole");
    }
    // Over the 64 KiB replay limit a PUT is not replayed after a send.
    let mut big_codes = Vec::new();
    for _ in 0..4 {
        let big = vec![b'y'; 100 * 1024];
        let r = send(
            s.proxy,
            request("PUT", s.proxy, "/big").body(full(big)).unwrap(),
        )
        .await
        .unwrap();
        big_codes.push(r.status().as_u16());
    }
    assert!(big_codes.contains(&502), "{big_codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_gives_504() {
    let slow = Backend::start("slow", Behavior::Slow(Duration::from_secs(3))).await;
    let s = Shoal::start(
        "request_timeout = \"300ms\"\nretries = 0",
        &backends_toml(&[&slow]),
    )
    .await;
    let start = Instant::now();
    let r = send(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(String::from_utf8_lossy(r.body()).contains("504"));
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "shoal_upstream_errors_total{backend=\"slow\",kind=\"timeout\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_gives_503() {
    let s = Shoal::start("", "").await;
    let r = send(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_never_reach_a_backend() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("max_header_bytes = 8192", &backends_toml(&[&a])).await;
    let wait = Duration::from_secs(2);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), "400"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n".to_vec(), "400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(), "400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec(), "400"),
        (b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "400"),
        (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n".to_vec(), "400"),
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(), "400"),
        (
            format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(10_000)).into_bytes(),
            "431",
        ),
    ];
    for (bytes, want) in &cases {
        let got = raw(s.proxy, bytes, wait).await;
        assert!(
            got.starts_with(&format!("HTTP/1.1 {want}")),
            "request {:?} got {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(80)]),
            got
        );
    }
    // A smuggling attempt hidden behind a clean first request on the same connection.
    let got = raw(
        s.proxy,
        b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nPOST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        wait,
    )
    .await;
    assert!(got.contains("HTTP/1.1 400"), "{got}");
    assert!(
        a.hits() <= 1,
        "only the clean request may reach the backend"
    );
    let before = a.hits();
    for (bytes, _) in &cases {
        raw(s.proxy, bytes, Duration::from_millis(300)).await;
    }
    assert_eq!(a.hits(), before, "a malformed request reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backend_under_load_fails_no_get() {
    let (a, b, c) = three().await;
    let s = Shoal::start("", &backends_toml(&[&a, &b, &c])).await;
    let (ok, failed) = gets_while_killing(s.proxy, &b).await;
    assert_eq!(failed, 0, "ok: {ok}");
    assert!(ok > 200);
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "shoal_backend_up{backend=\"b2\"}"),
        Some(0.0),
        "passive detection: {m}"
    );
}

/// 8 keep-alive clients sending GETs for 2.5 s through `proxy`, `victim` killed 0.8 s in: how
/// many answered 200, and how many did not.
async fn gets_while_killing(proxy: std::net::SocketAddr, victim: &Backend) -> (u64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_millis(2500);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (ok, failed) = (ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut tx = client(proxy).await;
            while Instant::now() < stop_at {
                let req = request("GET", proxy, "/load").body(empty()).unwrap();
                match tx.send_request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => {
                        eprintln!("failed: {:?}", other.map(|r| r.status()));
                        failed.fetch_add(1, Ordering::SeqCst);
                        tx = client(proxy).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    victim.kill();
    for t in tasks {
        t.await.unwrap();
    }
    (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_failures_take_a_backend_out_and_panic_routes_to_all() {
    let (a, b, c) = three().await;
    let rest = format!(
        "[health]\npassive_failures = 2\ninterval = \"30s\"\n{}",
        backends_toml(&[&a, &b, &c])
    );
    let s = Shoal::start("", &rest).await;
    b.set(Behavior::Status(503));
    for _ in 0..12 {
        send(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap())
            .await
            .unwrap();
    }
    assert_eq!(
        b.hits(),
        2,
        "after 2 failures in a row b2 gets no more traffic"
    );
    let (_, st) = get_json(s.admin, "/status").await;
    let b2 = st["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "b2")
        .unwrap();
    assert_eq!(b2["local"], "down");
    // A one-node cluster is its own majority: its vote ejects (a cluster needs a majority; see
    // tests/health.rs).
    eventually(Duration::from_secs(2), "b2 ejected", || async {
        let (_, p) = get_json(s.admin, "/pool").await;
        p["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == "b2" && x["state"] == "ejected")
            .then_some(())
    })
    .await;

    // Two of three down locally: below panic_below_percent (50), so all get traffic again.
    a.set(Behavior::Status(503));
    for _ in 0..12 {
        send(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap())
            .await
            .unwrap();
    }
    let before = b.hits();
    for _ in 0..9 {
        send(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap())
            .await
            .unwrap();
    }
    assert!(b.hits() > before, "panic mode routes to every backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_and_counts() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("max_connections = 2", &backends_toml(&[&a])).await;
    let mut c1 = client(s.proxy).await;
    let mut c2 = client(s.proxy).await;
    for c in [&mut c1, &mut c2] {
        let r = c
            .send_request(request("GET", s.proxy, "/").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let got = raw(
        s.proxy,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(got, "", "the third connection is closed without an answer");
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "shoal_client_connections_refused_total"),
        Some(1.0)
    );
    assert_eq!(metric(&m, "shoal_client_connections"), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_are_closed() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("client_idle_timeout = \"500ms\"", &backends_toml(&[&a])).await;
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(start.elapsed() >= Duration::from_millis(450));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_cut_off() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("client_idle_timeout = \"500ms\"", &backends_toml(&[&a])).await;
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    let start = Instant::now();
    // A byte every 100 ms: never a whole head.
    let mut closed = false;
    for b in
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter()
    {
        if c.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut buf = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), c.read(&mut buf)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "a slowloris head kept the connection open");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(a.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let slow = Backend::start("slow", Behavior::Slow(Duration::from_millis(1500))).await;
    let mut s = Shoal::start("", &backends_toml(&[&slow])).await;
    let proxy = s.proxy;
    let inflight = tokio::spawn(async move {
        send(proxy, request("GET", proxy, "/").body(empty()).unwrap()).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio::net::TcpStream::connect(proxy).await.is_err(),
        "listener still open after SIGTERM"
    );
    let r = inflight.await.unwrap().unwrap();
    assert_eq!(r.status(), 200, "the in-flight request finished");
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reads_metrics_and_token() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start_with_env(
        "",
        &backends_toml(&[&a]),
        &[("SHOAL__ADMIN__TOKEN", "s3cret")],
    )
    .await;
    let (code, err) = get_json(s.admin, "/pool").await;
    assert_eq!(code, 401, "{err}");
    assert!(err["error"].is_string());
    let authed = |path: &str| {
        request("GET", s.admin, path)
            .header("authorization", "Bearer s3cret")
            .body(empty())
            .unwrap()
    };
    let r = send(s.admin, authed("/pool")).await.unwrap();
    let (code, pool): (u16, serde_json::Value) = (
        r.status().as_u16(),
        serde_json::from_slice(r.body()).unwrap(),
    );
    assert_eq!(code, 200);
    assert_eq!(pool["version"], 1);
    assert_eq!(pool["backends"][0]["id"], "b1");
    assert_eq!(pool["backends"][0]["state"], "active");
    assert_eq!(get_text(s.admin, "/livez").await.unwrap().0, 200);
    assert_eq!(get_text(s.admin, "/readyz").await.unwrap().0, 200);
    let r = send(s.admin, authed("/status")).await.unwrap();
    let st: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(st["node"], "t");
    assert_eq!(st["pool_version"], 1);
    assert_eq!(st["backends"][0]["local"], "up");
    // Bad admin input: 400 with a reason, nothing changes.
    let bad = request("POST", s.admin, "/pool/backends")
        .header("authorization", "Bearer s3cret")
        .body(full(r#"{"addr": "nowhere", "weight": 1}"#))
        .unwrap();
    let r = send(s.admin, bad).await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(String::from_utf8_lossy(r.body()).contains("addr"));
    let bad = request("PUT", s.admin, "/pool/backends/b1")
        .header("authorization", "Bearer s3cret")
        .body(full(r#"{"weight": 0}"#))
        .unwrap();
    assert_eq!(send(s.admin, bad).await.unwrap().status(), 400);
    let r = send(s.admin, authed("/pool")).await.unwrap();
    let again: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(again["version"], 1);
    send(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap())
        .await
        .unwrap();
    let m = s.metrics().await;
    for family in [
        "shoal_requests_total",
        "shoal_request_duration_seconds",
        "shoal_upstream_errors_total",
        "shoal_retries_total",
        "shoal_client_connections",
        "shoal_backend_up",
        "shoal_backend_state",
        "shoal_pool_version",
        "shoal_pool_fingerprint",
        "shoal_client_connections_refused_total",
        "shoal_ejections_total",
        "shoal_paxos_rounds_total",
        "shoal_paxos_commit_duration_seconds",
        "shoal_peer_auth_failures_total",
    ] {
        assert!(
            m.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{m}"
        );
    }
    assert_eq!(
        metric(&m, "shoal_requests_total{backend=\"b1\",code=\"2xx\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "shoal_backend_state{backend=\"b1\",state=\"active\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&m, "shoal_pool_version"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_with_alpn() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = write_file(dir.path(), "proxy.pem", &ck.cert.pem());
    let key = write_file(dir.path(), "proxy-key.pem", &ck.key_pair.serialize_pem());
    let tls_port = free_port();
    let keys = format!(
        "[proxy.tls]\nlisten = [\"127.0.0.1:{tls_port}\"]\ncert = \"{}\"\nkey = \"{}\"",
        cert.display(),
        key.display()
    );
    let _s = Shoal::start(&keys, &backends_toml(&[&a])).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    for (alpn, h2) in [(b"h2".to_vec(), true), (b"http/1.1".to_vec(), false)] {
        let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        cfg.alpn_protocols = vec![alpn];
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
            .await
            .unwrap();
        let tls = connector
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let req = http::Request::builder()
            .uri("https://localhost/secure")
            .header("host", "localhost")
            .body(empty())
            .unwrap();
        let resp = if h2 {
            let (mut tx, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = http::Request::builder()
                .uri("https://localhost/secure")
                .body(empty())
                .unwrap();
            tx.send_request(req).await.unwrap()
        } else {
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            tx.send_request(req).await.unwrap()
        };
        assert_eq!(resp.status(), 200);
        let v: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(v["headers"]["x-forwarded-proto"], "https");
        assert_eq!(v["path"], "/secure");
    }

    // Cipher suites: AES-128-GCM (SHA-256) over the client's AES-256-GCM (SHA-384) first
    // choice, in TLS 1.3 and 1.2; a client that puts ChaCha20 first gets it.
    use rustls::CipherSuite as S;
    let default = rustls::crypto::ring::default_provider();
    let first = |suite: S| {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites.sort_by_key(|s| s.suite() != suite);
        p
    };
    for (provider, versions, want) in [
        (
            default.clone(),
            &[&rustls::version::TLS13][..],
            S::TLS13_AES_128_GCM_SHA256,
        ),
        (
            default,
            &[&rustls::version::TLS12][..],
            S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            first(S::TLS13_CHACHA20_POLY1305_SHA256),
            &[&rustls::version::TLS13][..],
            S::TLS13_CHACHA20_POLY1305_SHA256,
        ),
    ] {
        let offered: Vec<S> = provider.cipher_suites.iter().map(|s| s.suite()).collect();
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
            .await
            .unwrap();
        let mut tls = connector
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let got = tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
        assert_eq!(got, Some(want), "client offering {offered:?}");
        tls.write_all(b"GET /suite HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_live_settings_and_keeps_the_old_config_when_invalid() {
    let slow = Backend::start("slow", Behavior::Slow(Duration::from_millis(700))).await;
    let s = Shoal::start("retries = 0", &backends_toml(&[&slow])).await;
    let r = send(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "30 s request timeout by default");

    // A shorter request timeout, live.
    let text = std::fs::read_to_string(&s.config).unwrap();
    // A shorter request timeout and client idle timeout, live; a new worker count is kept for
    // the restart, and said so.
    let shorter = text.replace(
        "retries = 0",
        "retries = 0\nrequest_timeout = \"200ms\"\nclient_idle_timeout = \"300ms\"\nworkers = 3",
    );
    std::fs::write(&s.config, &shorter).unwrap();
    s.signal("-HUP");
    eventually(
        Duration::from_secs(3),
        "the new timeout in force",
        || async {
            let r = send(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap())
                .await
                .unwrap();
            (r.status() == 504).then_some(())
        },
    )
    .await;
    assert!(
        s.log()
            .contains("proxy.workers changes only on restart; kept the old value"),
        "{}",
        s.log()
    );
    let mut idle = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(3), idle.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection outlived the reloaded 300 ms idle timeout"
    );
    // The same file again: the worker count is still not the running one, and is said again.
    let warned = || {
        s.log()
            .matches("proxy.workers changes only on restart")
            .count()
    };
    s.signal("-HUP");
    eventually(Duration::from_secs(3), "the second warning", || async {
        (warned() == 2).then_some(())
    })
    .await;

    // An invalid file is refused: the running config stays, and the process stays up.
    std::fs::write(&s.config, shorter.replace("retries = 0", "retries = -1")).unwrap();
    s.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = send(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(s.log().contains("reload failed"), "{}", s.log());
    assert_eq!(get_text(s.admin, "/livez").await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_backends() {
    use hyper::service::service_fn;
    // A backend speaking TLS with a certificate for "localhost" from a test CA.
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca = write_file(dir.path(), "ca.pem", &ck.cert.pem());
    let certs = vec![ck.cert.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.key_pair.serialize_der()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let body = format!("tls backend saw {}", req.uri().path());
                    Ok::<_, std::convert::Infallible>(http::Response::new(full(body)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let rest = format!(
        "[health]\ninterval = \"100ms\"\nfall = 1\n[[backends]]\nid = \"secure\"\naddr = \"https://localhost:{port}\"\n"
    );
    // The proxy trusts the test CA through SSL_CERT_FILE (read with the system roots).
    let s = Shoal::start_with_env("", &rest, &[("SSL_CERT_FILE", ca.to_str().unwrap())]).await;
    for _ in 0..3 {
        let r = send(
            s.proxy,
            request("GET", s.proxy, "/over-tls").body(empty()).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.body());
        assert_eq!(&r.body()[..], b"tls backend saw /over-tls");
    }
    // Health probes go over TLS too, and pass.
    probes_pass(&s, "secure").await;
}

/// Wait for three passed probes of `backend`, and none failed.
async fn probes_pass(s: &Shoal, backend: &str) {
    let pass = format!("shoal_health_checks_total{{backend=\"{backend}\",result=\"pass\"}}");
    let fail = format!("shoal_health_checks_total{{backend=\"{backend}\",result=\"fail\"}}");
    let m = eventually(Duration::from_secs(3), "a few probes", || async {
        let m = s.metrics().await;
        (metric(&m, &pass).unwrap_or(0.0) >= 3.0).then_some(m)
    })
    .await;
    assert_eq!(metric(&m, &fail), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delay_fails_readyz_first_and_serves_until_it_ends() {
    let a = Backend::start("a", Behavior::Echo).await;
    let mut s = Shoal::start("shutdown_delay = \"1500ms\"", &backends_toml(&[&a])).await;
    s.signal("-TERM");
    let sent = Instant::now();
    eventually(Duration::from_millis(500), "readyz 503 at once", || async {
        matches!(get_text(s.admin, "/readyz").await, Ok((503, _))).then_some(())
    })
    .await;
    // Still serving new connections during the delay.
    let mut served = 0;
    while sent.elapsed() < Duration::from_millis(1100) {
        let r = send(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap())
            .await
            .expect("served during shutdown_delay");
        assert_eq!(r.status(), 200);
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served >= 5, "{served}");
    // Then the listeners close and the process exits 0.
    eventually(Duration::from_secs(3), "listener closed", || async {
        tokio::net::TcpStream::connect(s.proxy)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(
        sent.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notify_ready_reloading_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let a = Backend::start("a", Behavior::Echo).await;
    let mut s = Shoal::start_with_env(
        "",
        &backends_toml(&[&a]),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    )
    .await;
    let recv = |sock: &std::os::unix::net::UnixDatagram| {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(recv(&sock), "READY=1");
    s.signal("-HUP");
    let reloading = recv(&sock);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    let usec: u64 = reloading.rsplit('=').next().unwrap().parse().unwrap();
    assert!(usec > 0);
    assert_eq!(recv(&sock), "READY=1");
    s.signal("-TERM");
    assert_eq!(recv(&sock), "STOPPING=1");
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates_and_the_ejection_cap_and_counts_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    shoal_cert(&["ca", "--out", d]);
    shoal_cert(&["issue", "t", "--ca", d, "--out", d, "--days", "30"]);
    let up = Backend::start("up", Behavior::Echo).await;
    let dead = Backend::start("dead", Behavior::Echo).await;
    dead.health_ok.store(false, Ordering::SeqCst);
    let tls_port = free_port();
    let proxy_keys = format!(
        "[proxy.tls]\nlisten = [\"127.0.0.1:{tls_port}\"]\ncert = \"{d}/t.pem\"\nkey = \"{d}/t-key.pem\"\n"
    );
    let rest = format!(
        "[cluster.tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/t.pem\"\nkey = \"{d}/t-key.pem\"\n\n\
         [health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfall = 2\nrise = 2\nmax_ejected_percent = 0\n\n{}",
        backends_toml(&[&up, &dead])
    );
    let s = Shoal::start(&proxy_keys, &rest).await;
    let expiry = |m: &str, cert: &str| {
        metric(
            m,
            &format!("shoal_certificate_expiry_timestamp_seconds{{cert=\"{cert}\"}}"),
        )
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let m = s.metrics().await;
    for cert in ["proxy", "cluster"] {
        let at = expiry(&m, cert).unwrap_or_else(|| panic!("{cert} expiry missing: {m}"));
        assert!((at - (now + 30.0 * 86_400.0)).abs() < 120.0, "{cert}: {at}");
    }
    assert_eq!(
        metric(&m, "shoal_config_reloads_total{result=\"ok\"}"),
        Some(0.0)
    );
    // The cap is 0: the failing backend is down locally but never ejected.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, pool) = get_json(s.admin, "/pool").await;
    let state = |pool: &serde_json::Value, id: &str| {
        pool["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == id)
            .map(|b| b["state"].clone())
    };
    assert_eq!(state(&pool, "dead"), Some("active".into()), "{pool}");
    let (_, status) = get_json(s.admin, "/status").await;
    let dead_view = &status["backends"].as_array().unwrap()[0];
    assert_eq!(dead_view["id"], "dead");
    assert_eq!(dead_view["local"], "down", "{status}");
    assert_eq!(
        dead_view["down_votes"],
        serde_json::json!(["t"]),
        "{status}"
    );

    // New certificates and a cap of 50%, live.
    shoal_cert(&[
        "issue", "t", "--ca", d, "--out", d, "--days", "90", "--force",
    ]);
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace("max_ejected_percent = 0", "max_ejected_percent = 50"),
    )
    .unwrap();
    s.signal("-HUP");
    eventually(
        Duration::from_secs(5),
        "the cap raised: ejected",
        || async {
            let (_, pool) = get_json(s.admin, "/pool").await;
            (state(&pool, "dead") == Some("ejected".into())).then_some(())
        },
    )
    .await;
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "shoal_config_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );
    for cert in ["proxy", "cluster"] {
        let at = expiry(&m, cert).unwrap();
        assert!((at - (now + 90.0 * 86_400.0)).abs() < 120.0, "{cert}: {at}");
    }

    // A broken certificate file: the reload fails, nothing changes, and it is counted.
    std::fs::write(dir.path().join("t.pem"), "not a certificate").unwrap();
    s.signal("-HUP");
    s.metric_reaches(
        "shoal_config_reloads_total{result=\"failed\"}",
        1.0,
        Duration::from_secs(3),
    )
    .await;
    let m = s.metrics().await;
    assert!((expiry(&m, "proxy").unwrap() - (now + 90.0 * 86_400.0)).abs() < 120.0);
    assert!(s.log().contains("reload failed"), "{}", s.log());
    // The proxy still serves (over TLS too: the old certificate stays in use).
    let r = send(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_is_flat_json_with_the_whole_exchange() {
    let a = Backend::start("a", Behavior::Mirror).await;
    let s = Shoal::start_with_env(
        "",
        &backends_toml(&[&a]),
        &[
            ("SHOAL__LOG__ACCESS_LOG", "true"),
            ("SHOAL__LOG__FORMAT", "json"),
        ],
    )
    .await;
    let body = vec![b'z'; 5000];
    let r = send(
        s.proxy,
        request("POST", s.proxy, "/upload?x=1")
            .header("user-agent", "shoal-test/1")
            .header("x-request-id", "req-42")
            .body(full(body.clone()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.body().len(), 5000);
    // Without an id, one is made and forwarded to the backend.
    let r = send(
        s.proxy,
        request("GET", s.proxy, "/plain").body(empty()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let lines = eventually(Duration::from_secs(3), "two access lines", || async {
        let log = s.log();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "shoal::access")
            .collect();
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    let post = &lines[0];
    // Flat: the fields at the top level, next to the time and level.
    assert!(
        post["timestamp"].is_string() && post["fields"].is_null(),
        "{post}"
    );
    assert_eq!(post["method"], "POST");
    assert_eq!(post["path"], "/upload?x=1");
    assert_eq!(post["host"], s.proxy.to_string());
    assert_eq!(post["protocol"], "HTTP/1.1");
    assert_eq!(post["status"], 200);
    assert_eq!(post["request_bytes"], 5000);
    assert_eq!(post["response_bytes"], 5000);
    assert_eq!(post["backend"], "a");
    assert_eq!(post["attempts"], 1);
    assert_eq!(post["request_id"], "req-42");
    assert_eq!(post["user_agent"], "shoal-test/1");
    assert_eq!(post["client"], "127.0.0.1");
    assert_eq!(post["complete"], true);
    assert!(post["duration_ms"].as_f64().unwrap() > 0.0, "{post}");
    let get = &lines[1];
    let id = get["request_id"].as_str().unwrap();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{get}"
    );
    assert_eq!(get["request_bytes"], 0);
}

/// Open an upgraded tunnel through the proxy (the test backend echoes after a 101).
async fn open_tunnel(proxy: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut c = tokio::net::TcpStream::connect(proxy).await.unwrap();
    c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the 101");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    c
}

async fn echoes(c: &mut tokio::net::TcpStream) -> bool {
    if c.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut got = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(3), c.read_exact(&mut got)).await,
        Ok(Ok(_))
    ) && &got == b"ping"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_count_as_connections_close_when_idle_and_end_with_the_grace() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let mut s = Shoal::start(
        "max_connections = 2\nworkers = 1\ntunnel_idle_timeout = \"1500ms\"\nshutdown_grace = \"1s\"",
        &backends_toml(&[&a]),
    )
    .await;
    let mut t1 = open_tunnel(s.proxy).await;
    let mut t2 = open_tunnel(s.proxy).await;
    assert!(echoes(&mut t1).await && echoes(&mut t2).await);
    let m = s.metrics().await;
    assert_eq!(metric(&m, "shoal_client_connections"), Some(2.0), "{m}");
    // A third client is refused: the two tunnels hold the two connections.
    let third = raw(
        s.proxy,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(1),
    )
    .await;
    assert!(
        !third.starts_with("HTTP/1.1 200"),
        "served beyond max_connections: {third}"
    );
    let m = s.metrics().await;
    assert!(
        metric(&m, "shoal_client_connections_refused_total").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    // t2 stays busy, t1 goes quiet: t1 is closed after tunnel_idle_timeout, t2 is not.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(echoes(&mut t2).await, "a busy tunnel was closed");
    }
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(2), t1.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the idle tunnel is still open"
    );
    s.metric_reaches("shoal_client_connections", 1.0, Duration::from_secs(3))
        .await;
    // A drain waits for the open tunnel up to the grace, then closes it and exits 0.
    s.signal("-TERM");
    let start = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), t2.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "tunnel open after the grace"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_field_the_backend_does_not_take_leaves_the_framing_check_on() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("", &backends_toml(&[&a])).await;
    // Upgrade without Connection: upgrade is no upgrade: the backend answers 200 and the
    // connection stays HTTP/1, so a smuggling attempt after it on the same connection gets 400
    // and never reaches the backend.
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"path\"") {
        let n = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
    assert_eq!(a.hits(), 1);
    c.write_all(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest).to_string();
    assert!(rest.starts_with("HTTP/1.1 400"), "{rest}");
    assert_eq!(a.hits(), 1, "the smuggled request reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_heads_over_the_limit_get_431_and_cookies_are_joined() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("max_header_bytes = 8192", &backends_toml(&[&a])).await;
    let stream = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let big = http::Request::builder()
        .uri("http://x/big")
        .header("x-big", "a".repeat(20_000))
        .body(empty())
        .unwrap();
    let resp = tx.send_request(big).await.unwrap();
    assert_eq!(resp.status(), 431);
    assert_eq!(a.hits(), 0);
    let req = http::Request::builder()
        .uri("http://x/c")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "session=xyz")
        .body(empty())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["headers"]["cookie"], "a=1; b=2; session=xyz", "{v}");
}

/// One request as an HTTP/2 test backend saw it.
#[derive(Clone, Debug)]
struct H2Seen {
    conn: u64,
    path: String,
    version: http::Version,
    te: Option<String>,
}

/// An HTTP/2-only backend (h2c, or TLS offering only ALPN h2), gRPC-style: `/echo` answers JSON
/// about the request, `/grpc.Echo/Stream` echoes each request frame as it arrives and ends with
/// trailers, `/slow` answers after 3 s, anything else (probes) 200. It records every request
/// and the connection that carried it.
async fn h2_backend(
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<H2Seen>>>) {
    use hyper::service::service_fn;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        for conn in 1u64.. {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let (log, tls) = (log.clone(), tls.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move { Ok::<_, std::convert::Infallible>(h2_serve(req, conn, &log).await) }
                });
                let server = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                match tls {
                    None => {
                        let _ = server.serve_connection(TokioIo::new(s), svc).await;
                    }
                    Some(acceptor) => {
                        if let Ok(t) = acceptor.accept(s).await {
                            let _ = server.serve_connection(TokioIo::new(t), svc).await;
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

async fn h2_serve(
    req: http::Request<hyper::body::Incoming>,
    conn: u64,
    log: &std::sync::Mutex<Vec<H2Seen>>,
) -> http::Response<Body> {
    let te = req
        .headers()
        .get("te")
        .map(|v| v.to_str().unwrap_or("?").to_string());
    log.lock().unwrap().push(H2Seen {
        conn,
        path: req.uri().path().to_string(),
        version: req.version(),
        te,
    });
    match req.uri().path() {
        "/echo" => {
            let v = serde_json::json!({
                "version": format!("{:?}", req.version()),
                "scheme": req.uri().scheme_str(),
                "authority": req.uri().authority().map(|a| a.to_string()),
                "host": req.headers().get("host").map(|h| h.to_str().unwrap().to_string()),
                "xff": req.headers().get("x-forwarded-for").map(|h| h.to_str().unwrap().to_string()),
            });
            http::Response::new(full(v.to_string()))
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            http::Response::new(full("late"))
        }
        "/grpc.Echo/Stream" => {
            let (mut tx, body) =
                http_body_util::channel::Channel::<bytes::Bytes, hyper::Error>::new(4);
            let mut incoming = req.into_body();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = incoming.frame().await {
                    if let Some(d) = frame.into_data().ok().filter(|d| !d.is_empty()) {
                        let mut echo = b"echo:".to_vec();
                        echo.extend_from_slice(&d);
                        if tx.send_data(echo.into()).await.is_err() {
                            return;
                        }
                    }
                }
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                trailers.insert("grpc-message", http::HeaderValue::from_static("done"));
                let _ = tx.send_trailers(trailers).await;
            });
            http::Response::builder()
                .header("content-type", "application/grpc")
                .body(body.boxed())
                .unwrap()
        }
        _ => http::Response::new(full("ok")),
    }
}

/// An h2c connection to the proxy (prior knowledge).
async fn h2c_client(proxy: std::net::SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    tx
}

/// One GET over a fresh h2c connection to `proxy`.
async fn h2c_get(proxy: std::net::SocketAddr, path: &str) -> http::Response<hyper::body::Incoming> {
    let mut h2 = h2c_client(proxy).await;
    h2.send_request(
        http::Request::builder()
            .uri(format!("http://{proxy}{path}"))
            .body(empty())
            .unwrap(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_backends_multiplex_stream_both_ways_and_pass_trailers() {
    let (addr, seen) = h2_backend(None).await;
    let rest = format!(
        "[health]\ninterval = \"100ms\"\npath = \"/healthz\"\n\
         [[backends]]\nid = \"grpc\"\naddr = \"{addr}\"\nprotocol = \"h2\"\n"
    );
    let s = Shoal::start("workers = 2\nrequest_timeout = \"1s\"", &rest).await;

    // HTTP/1.1 clients reach it over HTTP/2, with :authority from their Host.
    let v = echo_of(
        s.proxy,
        http::Request::get("/echo")
            .header("host", "app.example:81")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(v["version"], "HTTP/2.0", "{v}");
    assert_eq!(v["scheme"], "http", "{v}");
    assert_eq!(v["authority"], "app.example:81", "{v}");
    assert_eq!(v["xff"], "127.0.0.1", "{v}");

    // Multiplexed: 200 requests from 50 concurrent client connections ride on at most one
    // backend connection per data-plane worker.
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let proxy = s.proxy;
        tasks.push(tokio::spawn(async move {
            let mut c = client(proxy).await;
            for _ in 0..4 {
                let req = request("GET", proxy, "/echo").body(empty()).unwrap();
                let r = c.send_request(req).await.unwrap();
                assert_eq!(r.status(), 200);
                r.into_body().collect().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let data: Vec<H2Seen> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path == "/echo")
        .cloned()
        .collect();
    assert_eq!(data.len(), 201);
    let conns: std::collections::BTreeSet<u64> = data.iter().map(|r| r.conn).collect();
    assert!(
        conns.len() <= 2,
        "201 requests over {} connections",
        conns.len()
    );

    // gRPC-style bidirectional streaming over h2c: each message's echo comes back before the
    // next is sent, and the backend's trailers reach the client.
    let mut h2 = h2c_client(s.proxy).await;
    let (mut tx, body) = http_body_util::channel::Channel::<bytes::Bytes, hyper::Error>::new(4);
    let req = http::Request::builder()
        .method("POST")
        .uri("http://app.example/grpc.Echo/Stream")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body.boxed())
        .unwrap();
    tx.send_data("one".into()).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), h2.send_request(req))
        .await
        .expect("response headers while the request still streams")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let mut rb = resp.into_body();
    // The next non-empty data frame, or the trailers (as text).
    let mut next_data = async || loop {
        let f = tokio::time::timeout(Duration::from_secs(5), rb.frame())
            .await
            .expect("a frame in time")
            .expect("body not ended")
            .unwrap();
        match f.into_data() {
            Ok(d) if d.is_empty() => continue,
            Ok(d) => return Some(d),
            Err(f) => {
                return f
                    .into_trailers()
                    .ok()
                    .map(|t| bytes::Bytes::from(format!("trailers:{t:?}")))
            }
        }
    };
    assert_eq!(&next_data().await.unwrap()[..], b"echo:one");
    tx.send_data("two".into()).await.unwrap();
    assert_eq!(&next_data().await.unwrap()[..], b"echo:two");
    drop(tx);
    let trailers = next_data().await.unwrap();
    let trailers = String::from_utf8_lossy(&trailers).to_string();
    assert!(trailers.contains("\"grpc-status\": \"0\""), "{trailers}");
    assert!(
        trailers.contains("\"grpc-message\": \"done\""),
        "{trailers}"
    );
    let grpc = seen
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.path == "/grpc.Echo/Stream")
        .cloned()
        .unwrap();
    assert_eq!(grpc.version, http::Version::HTTP_2);
    assert_eq!(grpc.te.as_deref(), Some("trailers"));

    // The same timeout rule: no response headers within request_timeout is 504.
    let r = send(
        s.proxy,
        request("GET", s.proxy, "/slow").body(empty()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 504);

    // Health probes speak HTTP/2 too (this backend speaks nothing else), and pass.
    probes_pass(&s, "grpc").await;
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path == "/healthz")
        .all(|r| r.version == http::Version::HTTP_2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_backends_over_tls_by_alpn_and_retried_like_any_other() {
    // A TLS backend that offers only h2 (ALPN), with a certificate from a test CA.
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca = write_file(dir.path(), "ca.pem", &ck.cert.pem());
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.key_pair.serialize_der()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let (addr, seen) = h2_backend(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))).await;
    // And an h2 backend that is down: connect failures go to the next backend, for any method.
    let dead = free_port();
    let rest = format!(
        "[balance]\nalgorithm = \"round_robin\"\n[health]\ninterval = \"1h\"\n\
         [[backends]]\nid = \"tls-h2\"\naddr = \"https://localhost:{}\"\nprotocol = \"h2\"\n\
         [[backends]]\nid = \"down\"\naddr = \"127.0.0.1:{dead}\"\nprotocol = \"h2\"\n",
        addr.port()
    );
    let s = Shoal::start_with_env("", &rest, &[("SSL_CERT_FILE", ca.to_str().unwrap())]).await;
    for _ in 0..6 {
        let r = send(
            s.proxy,
            request("POST", s.proxy, "/echo").body(full("x")).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.body());
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["version"], "HTTP/2.0", "{v}");
        assert_eq!(v["scheme"], "https", "{v}");
    }
    assert_eq!(
        seen.lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == "/echo")
            .count(),
        6
    );
    let m = s.metrics().await;
    assert!(
        metric(
            &m,
            "shoal_upstream_errors_total{backend=\"down\",kind=\"connect\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "the dead backend was tried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_protocol_is_checked_and_shown() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("", &backends_toml(&[&a])).await;
    let (status, body) = admin_call(
        s.admin,
        "POST",
        "/pool/backends",
        Some(serde_json::json!({"addr": "127.0.0.1:9", "protocol": "h3"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("protocol"), "{body}");
    let (status, body) = admin_call(
        s.admin,
        "POST",
        "/pool/backends",
        Some(serde_json::json!({"addr": "127.0.0.1:9", "id": "g", "protocol": "h2"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let g = body["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == "g")
        .unwrap()
        .clone();
    assert_eq!(g["protocol"], "h2");
    // `shoal pool list` shows it too.
    let out = std::process::Command::new(shoal_bin())
        .args(["pool", "list", "--admin", &format!("http://{}", s.admin)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("g "))
        .unwrap_or_default();
    assert!(line.trim_end().ends_with("h2"), "{text}");
}

/// A raw HTTP/1.1 backend that answers "ok" on keep-alive connections and closes each one after
/// `idle` without a request (as Node.js does after 5 s). Counts the connections whose first
/// request was a POST (health probes, GETs on connections of their own, are left out).
async fn closing_backend(idle: Duration) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let mut first = true;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // A whole head and its Content-Length body, or close when idle too long.
                    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n");
                    if let Some(end) = head_end {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        if buf.len() >= end + 4 + len {
                            if std::mem::take(&mut first) && head.starts_with("post ") {
                                count.fetch_add(1, Ordering::SeqCst);
                            }
                            buf.drain(..end + 4 + len);
                            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            if c.write_all(answer).await.is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                    match tokio::time::timeout(idle, c.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return, // idle too long, or the proxy closed: close
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// Pooled backend connections are reused, and one the backend closed while it sat idle is
/// noticed before a request goes on it: a POST after each close is answered (not 502, which a
/// POST written into a closed connection would get, as it is never sent twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_are_reused_and_one_closed_while_idle_costs_no_post() {
    let (addr, accepted) = closing_backend(Duration::from_millis(150)).await;
    let s = Shoal::start(
        "retries = 0\nworkers = 1",
        &format!("[[backends]]\nid = \"closer\"\naddr = \"{addr}\"\n"),
    )
    .await;
    let mut tx = client(s.proxy).await;
    let post = |n: usize| {
        request("POST", s.proxy, "/form")
            .body(full(format!("field={n}")))
            .unwrap()
    };
    for n in 0..20 {
        tx.ready().await.unwrap();
        let r = tx.send_request(post(n)).await.unwrap();
        assert_eq!(r.status(), 200, "request {n}");
        assert_eq!(
            &r.into_body().collect().await.unwrap().to_bytes()[..],
            b"ok"
        );
    }
    // Back to back on one client connection: the same backend connection each time.
    let reused = accepted.load(Ordering::SeqCst);
    assert!(reused <= 2, "{reused} backend connections for 20 requests");
    for n in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        tx.ready().await.unwrap();
        let r = tx.send_request(post(n)).await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "POST after the backend closed its connection ({n})"
        );
    }
    assert!(accepted.load(Ordering::SeqCst) >= reused + 5);
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "shoal_upstream_errors_total{backend=\"closer\",kind=\"reset\"}"
        )
        .unwrap_or(0.0),
        0.0,
        "{m}"
    );
}

/// An h2c backend (the h2 crate's server) that refuses every stream with REFUSED_STREAM, as a
/// busy or restarting HTTP/2 server does; counts the streams it refused.
async fn refusing_h2_backend() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let refused = Arc::new(AtomicU64::new(0));
    let count = refused.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, refused)
}

/// Six POSTs through round robin over `id` at `addr`, an HTTP/2 backend that processes no
/// stream (counting them in `tried`), and a good HTTP/2 backend: each is answered 200 by the good
/// one, and about half went to `id` first.
async fn posts_pass_an_h2_backend_that_did_not_process_them(
    id: &str,
    addr: std::net::SocketAddr,
    tried: &AtomicU64,
) -> Shoal {
    let (good, seen) = h2_backend(None).await;
    let rest = format!(
        "[balance]\nalgorithm = \"round_robin\"\n[health]\ninterval = \"1h\"\n\
         [[backends]]\nid = \"{id}\"\naddr = \"{addr}\"\nprotocol = \"h2\"\n\
         [[backends]]\nid = \"good\"\naddr = \"{good}\"\nprotocol = \"h2\"\n"
    );
    let s = Shoal::start("", &rest).await;
    for n in 0..6 {
        let r = send(
            s.proxy,
            request("POST", s.proxy, "/echo")
                .body(full(format!("order {n}")))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200, "POST {n}: {:?}", r.body());
    }
    assert!(tried.load(Ordering::SeqCst) >= 2, "{id} was tried");
    let echoed = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path == "/echo")
        .count();
    assert_eq!(echoed, 6);
    s
}

/// A stream an HTTP/2 backend refuses (RFC 9113 §8.7: not processed) goes to the next backend
/// whatever its method, body included; a reset after processing still does not (POST).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_h2_stream_is_sent_elsewhere_for_any_method() {
    let (refuser, refused) = refusing_h2_backend().await;
    let s = posts_pass_an_h2_backend_that_did_not_process_them("refuser", refuser, &refused).await;
    // Refusals are counted, but do not take the backend down in this peer's view.
    let m = s.metrics().await;
    assert!(
        metric(
            &m,
            "shoal_upstream_errors_total{backend=\"refuser\",kind=\"reset\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{m}"
    );
}

/// An h2c backend going away (written frame by frame): it answers every request's HEADERS with
/// a GOAWAY (NO_ERROR) and closes its side. With `covers` false the GOAWAY's last stream id is 0,
/// so the stream was not processed (RFC 9113 §6.8); with `covers` true it is the request's own
/// stream, which may have been processed. Counts the streams it was sent.
async fn going_away_h2_backend(covers: bool) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let streams = Arc::new(AtomicU64::new(0));
    let count = streams.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if c.read_exact(&mut preface).await.is_err()
                    || &preface[..] != b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                {
                    return;
                }
                // Our SETTINGS (none changed).
                if c.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.is_err() {
                    return;
                }
                loop {
                    let mut head = [0u8; 9];
                    if c.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let (kind, flags) = (head[3], head[4]);
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    let mut payload = vec![0u8; len];
                    if c.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    match kind {
                        // SETTINGS, not an ACK: acknowledge it (a failed write ends the next read).
                        4 if flags & 1 == 0 => {
                            let _ = c.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await;
                        }
                        // HEADERS: a request. Go away, then read what comes until the client closes.
                        1 => {
                            count.fetch_add(1, Ordering::SeqCst);
                            let last = if covers { stream } else { 0 };
                            let mut goaway = vec![0, 0, 8, 7, 0, 0, 0, 0, 0];
                            goaway.extend_from_slice(&last.to_be_bytes());
                            goaway.extend_from_slice(&0u32.to_be_bytes());
                            if c.write_all(&goaway).await.is_err() {
                                return;
                            }
                            let _ = c.shutdown().await;
                            let mut sink = [0u8; 4096];
                            while matches!(c.read(&mut sink).await, Ok(n) if n > 0) {}
                            return;
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, streams)
}

/// A stream an HTTP/2 backend's GOAWAY leaves out (above its last stream id: not processed)
/// goes to the next backend whatever its method, body included; one the GOAWAY covers, and
/// that then dies with the connection, may have been processed: a POST is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_left_out_by_an_h2_goaway_is_sent_elsewhere_for_any_method() {
    let (leaving, left_out) = going_away_h2_backend(false).await;
    posts_pass_an_h2_backend_that_did_not_process_them("leaving", leaving, &left_out).await;

    // A GOAWAY that covers the stream: the backend may have acted on the POST before it closed.
    let (covering, covered) = going_away_h2_backend(true).await;
    let rest = format!(
        "[health]\ninterval = \"1h\"\n\
         [[backends]]\nid = \"covering\"\naddr = \"{covering}\"\nprotocol = \"h2\"\n"
    );
    let s = Shoal::start("", &rest).await;
    let before = covered.load(Ordering::SeqCst);
    let r = send(
        s.proxy,
        request("POST", s.proxy, "/echo")
            .body(full("once"))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 502, "{:?}", r.body());
    assert_eq!(
        covered.load(Ordering::SeqCst) - before,
        1,
        "a POST the GOAWAY covered was sent again"
    );
}

/// A raw HTTP/1.1 backend that answers each request with the bytes scripted for its path (and
/// closes after the answers marked so); `/upload` answers with the request's raw body. Counts
/// the connections it accepted.
async fn scripted_backend(
    script: Vec<(&'static str, Vec<u8>, bool)>,
) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    let script = Arc::new(script);
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let script = script.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match c.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    if head.starts_with("post /reject ") {
                        // Refuse the upload at once, read none of it, and hold the connection.
                        let answer =
                            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo long";
                        let _ = c.write_all(answer).await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    }
                    let len: Option<usize> = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap());
                    let chunked = head.contains("transfer-encoding: chunked");
                    // The body: by length, or up to the last chunk (no trailers sent here).
                    let body_end = loop {
                        let rest = &buf[end + 4..];
                        if let Some(n) = len {
                            if rest.len() >= n {
                                break end + 4 + n;
                            }
                        } else if !chunked {
                            break end + 4;
                        } else if let Some(p) = rest.windows(5).position(|w| w == b"0\r\n\r\n") {
                            break end + 4 + p + 5;
                        }
                        match c.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    };
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let body: Vec<u8> = buf[end + 4..body_end].to_vec();
                    buf.drain(..body_end);
                    let (answer, close) = if path == "/upload" {
                        let mut a = format!(
                            "HTTP/1.1 200 OK\r\nX-Request-Head: {}\r\nContent-Length: {}\r\n\r\n",
                            head.lines().skip(1).collect::<Vec<_>>().join("|"),
                            body.len()
                        )
                        .into_bytes();
                        a.extend_from_slice(&body);
                        (a, false)
                    } else {
                        match script.iter().find(|(p, _, _)| *p == path) {
                            Some((_, a, close)) => (a.clone(), *close),
                            None => (
                                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                                false,
                            ),
                        }
                    };
                    if c.write_all(&answer).await.is_err() || close {
                        return;
                    }
                    if answer.starts_with(b"HTTP/1.1 101") {
                        // Switched: echo whatever comes.
                        let (mut r, mut w) = c.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// The upstream HTTP/1.1 client against a backend's raw bytes: chunked answers (with
/// extensions and trailers), interim 1xx answers skipped, bodies read to the close, Content-Length
/// beside Transfer-Encoding (body by chunks, connection not reused), HEAD answers without a body
/// (connection reused), conflicting lengths and an endless head refused with 502, bytes behind a
/// 101 passed into the tunnel, request bodies without a length sent chunked, and an answer that
/// comes before the request body was taken passed on at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_client_reads_every_framing_a_backend_may_send() {
    let huge = format!(
        "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let (addr, accepted) = scripted_backend(vec![
        ("/chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n".to_vec(), false),
        ("/interim", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone".to_vec(), false),
        ("/to-end", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close".to_vec(), true),
        ("/both", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(), false),
        ("/head", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec(), false),
        ("/plain", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(), false),
        ("/conflict", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(), true),
        ("/huge", huge.into_bytes(), true),
        ("/switch", b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x-test\r\n\r\nEARLY".to_vec(), false),
    ])
    .await;
    let s = Shoal::start(
        "retries = 0\nworkers = 1",
        &format!("[[backends]]\nid = \"raw\"\naddr = \"{addr}\"\n"),
    )
    .await;
    let get = |path: &str| {
        send(
            s.proxy,
            request("GET", s.proxy, path).body(empty()).unwrap(),
        )
    };

    let r = get("/chunked").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), &r.body()[..]),
        (200, &b"hello world"[..])
    );
    assert_eq!(r.headers()["content-type"], "text/plain");
    // Trailers reach a client that takes them (an HTTP/2 one here).
    let resp = h2c_get(s.proxy, "/chunked").await;
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
    assert_eq!(&collected.to_bytes()[..], b"hello world");

    let r = get("/interim").await.unwrap();
    assert_eq!((r.status().as_u16(), &r.body()[..]), (200, &b"done"[..]));

    let r = get("/to-end").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), &r.body()[..]),
        (200, &b"until the close"[..])
    );

    // Both Content-Length and Transfer-Encoding: ambiguous (SPEC: 502), and that connection is
    // not used again.
    let before = accepted.load(Ordering::SeqCst);
    let r = get("/both").await.unwrap();
    assert_eq!(r.status().as_u16(), 502);
    let r = get("/plain").await.unwrap();
    assert_eq!((r.status().as_u16(), &r.body()[..]), (200, &b"ok"[..]));
    // Two new connections: the one before ended with `/to-end`, and `/both` left its own.
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        before + 2,
        "a connection that carried both lengths was reused"
    );

    // HEAD: the length is the GET's, no body follows, and the connection carries on.
    let before = accepted.load(Ordering::SeqCst);
    let r = send(
        s.proxy,
        request("HEAD", s.proxy, "/head").body(empty()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "1000");
    assert!(r.body().is_empty());
    let r = get("/plain").await.unwrap();
    assert_eq!((r.status().as_u16(), &r.body()[..]), (200, &b"ok"[..]));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        before,
        "the HEAD's connection was not reused"
    );

    // An upgrade: what the backend sent right behind its 101 reaches the client first.
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    c.write_all(
        b"GET /switch HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: x-test\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.ends_with(b"EARLY") {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk))
            .await
            .expect("the 101 and the early bytes")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    c.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping");
    drop(c);

    for bad in ["/conflict", "/huge"] {
        let r = get(bad).await.unwrap();
        assert_eq!(r.status(), 502, "{bad}");
    }

    // A body without a length (an HTTP/2 client's) goes out chunked; one with a length as is.
    let (mut tx, rx) = http_body_util::channel::Channel::<bytes::Bytes, hyper::Error>::new(4);
    let sending = tokio::spawn(async move {
        tx.send_data(bytes::Bytes::from_static(b"abc"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send_data(bytes::Bytes::from_static(b"defg"))
            .await
            .unwrap();
    });
    let mut h2 = h2c_client(s.proxy).await;
    let resp = h2
        .send_request(
            http::Request::builder()
                .method("POST")
                .uri(format!("http://{}/upload", s.proxy))
                .body(rx.boxed())
                .unwrap(),
        )
        .await
        .unwrap();
    sending.await.unwrap();
    let head = resp.headers()["x-request-head"]
        .to_str()
        .unwrap()
        .to_string();
    let raw = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        head.contains("transfer-encoding: chunked") && !head.contains("content-length"),
        "{head}"
    );
    assert_eq!(&raw[..], b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n");
    let r = send(
        s.proxy,
        request("POST", s.proxy, "/upload")
            .body(full("field=1"))
            .unwrap(),
    )
    .await
    .unwrap();
    let head = r.headers()["x-request-head"].to_str().unwrap().to_string();
    assert!(
        head.contains("content-length: 7") && !head.contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(&r.body()[..], b"field=1");

    // An answer before the body is taken ends the upload: the client gets the 413 (not a 504
    // after the request timeout, with 16 MiB stuck behind full socket buffers).
    let (mut tx, rx) = http_body_util::channel::Channel::<bytes::Bytes, hyper::Error>::new(4);
    tokio::spawn(async move {
        for _ in 0..256 {
            if tx
                .send_data(bytes::Bytes::from(vec![b'x'; 64 * 1024]))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let resp = tokio::time::timeout(
        Duration::from_secs(4),
        h2.send_request(
            http::Request::builder()
                .method("POST")
                .uri(format!("http://{}/reject", s.proxy))
                .body(rx.boxed())
                .unwrap(),
        ),
    )
    .await
    .expect("the backend's early answer")
    .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(
        &resp.into_body().collect().await.unwrap().to_bytes()[..],
        b"too long"
    );
}

/// Read one answer (head and a Content-Length or chunked body) off a raw connection.
async fn read_answer(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    read_answer_to(s, buf, false).await
}

/// `read_answer`, for the answer to a HEAD when `head` (no body, whatever the fields say).
async fn read_answer_to(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    head_req: bool,
) -> (String, Vec<u8>) {
    let deadline = Duration::from_secs(5);
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let lower = head.to_ascii_lowercase();
            let rest = buf[end + 4..].to_vec();
            let head_only = head.starts_with("HTTP/1.1 100") || head_req;
            if head_only {
                *buf = rest;
                return (head, Vec::new());
            }
            if let Some(n) = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                if rest.len() >= n {
                    *buf = rest[n..].to_vec();
                    return (head, rest[..n].to_vec());
                }
            } else if lower.contains("transfer-encoding: chunked") {
                if let Some((used, data)) = dechunk(&rest) {
                    *buf = rest[used..].to_vec();
                    return (head, data);
                }
            } else {
                *buf = rest;
                return (head, Vec::new());
            }
        }
        let n = tokio::time::timeout(deadline, s.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(
            n > 0,
            "closed early; had {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A whole chunked body at the start of `b`: bytes used (trailers included) and the data.
fn dechunk(b: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut at = 0;
    let mut data = Vec::new();
    loop {
        let eol = at + b[at..].windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&b[at..eol]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        at = eol + 2;
        if size == 0 {
            let end = at + b[at..].windows(2).position(|w| w == b"\r\n")?;
            if end == at {
                return Some((at + 2, data));
            }
            // Trailer fields, then an empty line.
            let end = at + b[at..].windows(4).position(|w| w == b"\r\n\r\n")?;
            return Some((end + 4, data));
        }
        if b.len() < at + size + 2 {
            return None;
        }
        data.extend_from_slice(&b[at..at + size]);
        at += size + 2;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http1_server_answers_what_clients_send() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let m = Backend::start("m1", Behavior::Mirror).await;
    let s = Shoal::start("", &backends_toml(&[&a])).await;
    let sm = Shoal::start("", &backends_toml(&[&m])).await;
    let json = |b: &[u8]| -> serde_json::Value { serde_json::from_slice(b).unwrap() };

    // Pipelined: three requests in one write, three answers in order on one connection, each
    // with a Date.
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    c.write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\nHEAD /3 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    for path in ["/1", "/2"] {
        let (head, body) = read_answer(&mut c, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.to_ascii_lowercase().contains("\r\ndate: "), "{head}");
        assert_eq!(json(&body)["path"], path);
    }
    // HEAD: the length a GET would get, and no body (the next answer starts right after).
    let (head, _) = read_answer_to(&mut c, &mut buf, true).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    c.write_all(b"GET /4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut c, &mut buf).await;
    assert!(buf.is_empty(), "bytes after a HEAD answer: {buf:?}");
    assert_eq!(json(&body)["path"], "/4");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "the connection closes after Connection: close");

    // HTTP/1.0: kept alive only when asked, and told so.
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..2 {
        c.write_all(
            format!("GET /old{i} HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let (head, body) = read_answer(&mut c, &mut buf).await;
        assert!(
            head.to_ascii_lowercase().contains("connection: keep-alive"),
            "{head}"
        );
        assert_eq!(json(&body)["path"], format!("/old{i}"));
    }
    let got = raw(
        s.proxy,
        b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.to_ascii_lowercase().contains("connection: close"),
        "{got}"
    );

    // A chunked upload with a trailer and an Expect: 100-continue upload, mirrored back.
    let mut c = tokio::net::TcpStream::connect(sm.proxy).await.unwrap();
    let mut buf = Vec::new();
    c.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-sum: 1\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut c, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"hello world");
    c.write_all(
        b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, _) = read_answer(&mut c, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 100 Continue"), "{head}");
    c.write_all(b"data").await.unwrap();
    let (head, body) = read_answer(&mut c, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"data");

    // A body whose bytes look like a smuggled head is a body: the request after it is the next
    // one, answered in turn.
    let body = "a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    c.write_all(
        format!(
            "POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (head, echoed) = read_answer(&mut c, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(echoed, body.as_bytes());
    let (head, _) = read_answer(&mut c, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Refused before any backend: a coding that is not chunked (501), and one in HTTP/1.0.
    let before = a.hits();
    for (bad, want) in [
        (
            &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"[..],
            "HTTP/1.1 501",
        ),
        (
            b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 400",
        ),
    ] {
        let got = raw(s.proxy, bad, Duration::from_secs(3)).await;
        assert!(got.starts_with(want), "{bad:?}: {got}");
    }
    assert_eq!(a.hits(), before);
}

/// A backend's answer goes to the client without its hop-by-hop fields (RFC 9110 §7.6.1):
/// Connection and the fields it names, Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade (not
/// a 101), Transfer-Encoding (the client's own framing is used); every other field goes on with
/// its value and repeats. The same for an HTTP/1.1 client (the fields are written as they came)
/// and an HTTP/2 one (they are made into a map).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_hop_by_hop_fields_never_reach_the_client() {
    let (addr, _) = scripted_backend(vec![
        ("/hop", b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal\r\nX-Internal: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nTrailer: x-sum\r\nTE: trailers\r\nX-Kept: one\r\nSet-Cookie: a=1\r\nx-kept: two\r\nSet-Cookie: b=2\r\nContent-Length: 2\r\n\r\nok".to_vec(), false),
        ("/coded", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kept: three\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(), true),
    ])
    .await;
    let s = Shoal::start(
        "retries = 0",
        &format!("[[backends]]\nid = \"raw\"\naddr = \"{addr}\"\n"),
    )
    .await;
    let gone = [
        "connection",
        "x-internal",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "trailer",
        "te",
        "transfer-encoding",
    ];

    // HTTP/1.1, read off the socket as it comes.
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    let mut buf = Vec::new();
    c.write_all(b"GET /hop HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut c, &mut buf).await;
    assert_eq!(body, b"ok", "{head}");
    let lines: Vec<(String, String)> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    for name in gone {
        assert!(
            lines.iter().all(|(n, _)| n != name),
            "{name} reached the client:\n{head}"
        );
    }
    let values = |name: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(values("x-kept"), ["one", "two"], "{head}");
    assert_eq!(values("set-cookie"), ["a=1", "b=2"], "{head}");
    assert_eq!(values("content-length"), ["2"], "{head}");
    // The connection is kept (the backend's Connection said nothing to the client).
    c.write_all(b"GET /coded HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut c, &mut buf).await;
    assert_eq!(body, b"abc", "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("x-kept: three"), "{head}");

    // HTTP/2: the same fields, none of the hop-by-hop ones (which HTTP/2 forbids).
    let resp = h2c_get(s.proxy, "/hop").await;
    assert_eq!(resp.status(), 200);
    for name in gone {
        assert!(
            !resp.headers().contains_key(name),
            "{name} reached the HTTP/2 client: {:?}",
            resp.headers()
        );
    }
    let all = |name: &str| -> Vec<&str> {
        resp.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert_eq!(all("x-kept"), ["one", "two"]);
    assert_eq!(all("set-cookie"), ["a=1", "b=2"]);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
}

/// How many io_uring instances process `pid` holds (its workers' rings).
fn rings_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().contains("io_uring"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Whether this kernel gives this process an io_uring at all (containers may forbid it).
fn kernel_allows_io_uring() -> bool {
    io_uring::IoUring::new(8).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_workers_forward_stream_and_recover() {
    if !kernel_allows_io_uring() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "this kernel refuses io_uring, under CI"
        );
        eprintln!("skipped: this kernel refuses io_uring");
        return;
    }
    forward_stream_and_recover(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoll_workers_forward_stream_and_recover() {
    forward_stream_and_recover(false).await;
}

/// Forwarding, framing errors, streaming both ways, a tunnel and a backend's death, with the
/// workers' sockets on io_uring or on epoll (`proxy.io_uring`).
async fn forward_stream_and_recover(io_uring: bool) {
    let rings = if io_uring { 2 } else { 0 };
    let (a, b, c) = three().await;
    let m = Backend::start("m", Behavior::Mirror).await;
    let keys = format!("io_uring = {io_uring}\nworkers = 2");
    let s = Shoal::start(&keys, &backends_toml(&[&a, &b, &c])).await;
    let pid = s.child.as_ref().unwrap().id();
    assert_eq!(rings_of(pid), rings, "one ring per worker: {}", s.log());

    // Round robin over new connections, then over one keep-alive connection.
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..30 {
        let v = echo_of(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap()).await;
        *seen
            .entry(v["name"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        vec![10; 3],
        "{seen:?}"
    );
    let mut tx = client(s.proxy).await;
    for i in 0..300 {
        tx.ready().await.unwrap();
        let r = tx
            .send_request(
                request("GET", s.proxy, &format!("/k/{i}"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value =
            serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(v["path"], format!("/k/{i}"));
    }

    // A request head that is not HTTP never reaches a backend.
    let before = a.hits() + b.hits() + c.hits();
    let got = raw(
        s.proxy,
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert_eq!(a.hits() + b.hits() + c.hits(), before);

    // Bodies both ways through a mirror, on a one-worker proxy of its own.
    let keys = format!("io_uring = {io_uring}\nworkers = 1");
    let s2 = Shoal::start(&keys, &backends_toml(&[&m])).await;
    assert_streams_both_ways(s2.proxy, &m).await;
    // A client that leaves in the middle of a dripping answer: its connection ends (the failed
    // send on its socket is seen), and the next client is served.
    let mut gone = tokio::net::TcpStream::connect(s2.proxy).await.unwrap();
    gone.write_all(b"GET /drip HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    gone.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    drop(gone);
    s2.metric_reaches("shoal_client_connections", 0.0, Duration::from_secs(5))
        .await;
    m.set(Behavior::Mirror);
    let r = send(
        s2.proxy,
        request("POST", s2.proxy, "/after")
            .body(full(&b"next"[..]))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(&r.body()[..], b"next");

    // A WebSocket-style tunnel over a ring's sockets.
    let mut t = open_tunnel(s.proxy).await;
    assert!(echoes(&mut t).await, "the tunnel echoes");

    // Load from 8 keep-alive clients while a backend dies: no GET fails (its pooled
    // connections close under the ring's receives; requests go elsewhere).
    let (ok, failed) = gets_while_killing(s.proxy, &b).await;
    assert_eq!(failed, 0, "ok: {ok}");
    assert!(ok > 200);
    assert_eq!(rings_of(pid), rings, "{}", s.log());
}

/// More requests land at once than a worker's ring has receive buffers (256): the process is
/// stopped while 400 connections each send a request, so their receives all complete in the
/// ring's first turn after it resumes. Those past the ring's buffers read into buffers of their
/// own; every request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_requests_at_once_than_the_ring_has_buffers() {
    // The proxy dials 400 connections to it at once: a backlog to take them.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let a = Backend::start_on(sock.listen(1024).unwrap(), "a", Behavior::Echo);
    let s = Shoal::start_with_env(
        "workers = 1",
        &backends_toml(&[&a]),
        &[("SHOAL__LOG__LEVEL", "info,shoal::net::uring=debug")],
    )
    .await;
    let mut conns = Vec::new();
    for _ in 0..400 {
        conns.push(tokio::net::TcpStream::connect(s.proxy).await.unwrap());
    }
    // Every connection accepted and its receive queued on the ring before the stop.
    s.metric_reaches("shoal_client_connections", 400.0, Duration::from_secs(5))
        .await;
    s.signal("-STOP");
    for (i, c) in conns.iter_mut().enumerate() {
        let req = format!("GET /burst/{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
    }
    s.signal("-CONT");
    for (i, mut c) in conns.into_iter().enumerate() {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "{i}: {got}\n{}", s.log());
        assert!(got.contains(&format!("/burst/{i}")), "{i}: {got}");
    }
    if kernel_allows_io_uring() {
        assert!(
            s.log().contains("no ring buffer left"),
            "no receive ran out of ring buffers: {}",
            s.log()
        );
    }
}
