//! Operating a peer, tried from outside: the admin API and metrics, TLS termination and upstream
//! TLS, reloads on SIGHUP, shutdown, systemd readiness and the access log.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::dataplane::*;
use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        metric(
            &m,
            "shoal_requests_total{backend=\"b1\",code=\"2xx\",service=\"default\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "shoal_backend_state{backend=\"b1\",state=\"active\",service=\"default\"}"
        ),
        Some(1.0)
    );
    assert_eq!(metric(&m, "shoal_pool_version"), Some(1.0));
}

/// `got` is a whole 200 answer to `head`, with `want` in it, that says the connection closes.
fn closing_answer(got: &[u8], head: &str, want: &str, over: &str) {
    let text = String::from_utf8_lossy(got);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{head:?} over {over}: {text}"
    );
    assert!(text.contains(want), "{head:?} over {over}: {text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{head:?} over {over}: {text}"
    );
}

/// Answers that end their connection, over plain TCP and TLS, on both I/O modes: `Connection:
/// close` (the answer's end and the FIN go together; over TLS with close_notify) and an HTTP/1.0
/// client given a length-less answer (framed by the close). Every byte arrives, and over TLS each
/// ends with close_notify, so the client can tell it whole from cut.
#[tokio::test]
async fn answers_that_close_the_connection_arrive_whole() {
    let echo = Backend::start("b1", Behavior::Echo).await;
    // A backend whose answer has no length and ends with its connection (as HTTP/1.0 servers
    // answer), its last bytes and its end read together.
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw_addr = raw.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = raw.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    match c.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                // Corked: the answer and the FIN in one segment.
                let _ = socket2::SockRef::from(&c).set_tcp_cork(true);
                let _ = c
                    .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nthe body, to the end")
                    .await;
                let _ = c.shutdown().await;
            });
        }
    });
    let raw_toml = format!("[[backends]]\nid = \"raw\"\naddr = \"{raw_addr}\"\n");
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = write_file(dir.path(), "proxy.pem", &ck.cert.pem());
    let key = write_file(dir.path(), "proxy-key.pem", &ck.key_pair.serialize_pem());
    for (io_uring, backends, head, want) in [false, true].into_iter().flat_map(|io_uring| {
        [
            (
                io_uring,
                backends_toml(&[&echo]),
                "GET /closing HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
                "\"path\":\"/closing\"",
            ),
            (
                io_uring,
                raw_toml.clone(),
                "GET /old HTTP/1.0\r\nhost: localhost\r\n\r\n",
                "\r\n\r\nthe body, to the end",
            ),
        ]
    }) {
        if io_uring && !io_uring_here() {
            continue;
        }
        let tls_port = free_port();
        let keys = format!(
            "io_uring = {io_uring}\n[proxy.tls]\nlisten = [\"127.0.0.1:{tls_port}\"]\ncert = \"{}\"\nkey = \"{}\"",
            cert.display(),
            key.display()
        );
        let s = Shoal::start(&keys, &backends).await;
        // Over plain TCP the closing answer's end waits in the socket for the FIN: all of it
        // arrives, then the end.
        let mut plain = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
        plain.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut got))
            .await
            .expect("the plain answer never ended")
            .unwrap_or_else(|e| panic!("{head:?} io_uring={io_uring}, plain: {e}"));
        closing_answer(&got, head, want, "plain");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut got))
            .await
            .expect("the answer never ended");
        closing_answer(&got, head, want, "TLS");
        // A clean end: close_notify came before the FIN (for the HTTP/1.0 answer, framed by the
        // close, what tells it whole from cut).
        end.unwrap_or_else(|e| panic!("{head:?} io_uring={io_uring}: {e}"));
    }
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
    eventually(Duration::from_secs(3), "the reload refused", || async {
        s.log().contains("reload failed").then_some(())
    })
    .await;
    let r = send(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
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
    assert_eq!(post["service"], "default");
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
