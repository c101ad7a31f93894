//! Forwarding, tried from outside: balancing, forwarded fields, streaming bodies, upgrades,
//! retries and the error statuses, over a real `shoal run` process and real backends.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::dataplane::*;
use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
            "shoal_upstream_errors_total{backend=\"dead\",kind=\"connect\",service=\"default\"}"
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
            "shoal_upstream_errors_total{backend=\"slow\",kind=\"timeout\",service=\"default\"}"
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
        metric(&m, "shoal_backend_up{backend=\"b2\",service=\"default\"}"),
        Some(0.0),
        "passive detection: {m}"
    );
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
