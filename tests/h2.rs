//! HTTP/2, tried from outside: clients over h2c, heads over the limit, and HTTP/2 backends
//! (multiplexing, trailers, TLS by ALPN, refused streams and GOAWAY).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::dataplane::*;
use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        .header("te", "trailers")
        .header("x-forwarded-for", "9.9.9.9")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "spoofed")
        .header("x-kept", "yes")
        .body(empty())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    // One Cookie field (the echo joins repeated fields with ", "), the target's authority as
    // Host, the proxy's X-Forwarded-*, TE (hop-by-hop to an HTTP/1 backend) gone, the rest as
    // sent.
    let h = &v["headers"];
    assert_eq!(h["cookie"], "a=1; b=2; session=xyz", "{v}");
    assert_eq!(h["host"], "x", "{v}");
    assert_eq!(h["x-forwarded-host"], "x", "{v}");
    assert_eq!(h["x-forwarded-proto"], "http", "{v}");
    assert_eq!(h["x-forwarded-for"], "9.9.9.9, 127.0.0.1", "{v}");
    assert_eq!(h["x-kept"], "yes", "{v}");
    assert!(h.get("te").is_none(), "{v}");
    assert_eq!(v["version"], "HTTP/1.1", "{v}");
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
            "shoal_upstream_errors_total{backend=\"down\",kind=\"connect\",service=\"default\"}"
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
            "shoal_upstream_errors_total{backend=\"refuser\",kind=\"reset\",service=\"default\"}"
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
