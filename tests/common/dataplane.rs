//! Helpers shared by the data-plane test files.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub async fn three() -> (Backend, Backend, Backend) {
    (
        Backend::start("b1", Behavior::Echo).await,
        Backend::start("b2", Behavior::Echo).await,
        Backend::start("b3", Behavior::Echo).await,
    )
}

pub async fn echo_of(addr: std::net::SocketAddr, req: http::Request<Body>) -> serde_json::Value {
    let r = send(addr, req).await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.body());
    serde_json::from_slice(r.body()).unwrap()
}

/// Through `proxy` to the mirror `m`: 8 MiB up and back (chunked), byte for byte; then `m` drips
/// an answer (5 chunks 300 ms apart) whose first chunk must arrive long before the last is sent.
/// Leaves `m` dripping.
pub async fn assert_streams_both_ways(proxy: std::net::SocketAddr, m: &Backend) {
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

/// 8 keep-alive clients sending GETs for 2.5 s through `proxy`, `victim` killed 0.8 s in: how
/// many answered 200, and how many did not.
pub async fn gets_while_killing(proxy: std::net::SocketAddr, victim: &Backend) -> (u64, u64) {
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

/// Wait for three passed probes of `backend`, and none failed.
pub async fn probes_pass(s: &Shoal, backend: &str) {
    let pass = format!(
        "shoal_health_checks_total{{backend=\"{backend}\",result=\"pass\",service=\"default\"}}"
    );
    let fail = format!(
        "shoal_health_checks_total{{backend=\"{backend}\",result=\"fail\",service=\"default\"}}"
    );
    let m = eventually(Duration::from_secs(3), "a few probes", || async {
        let m = s.metrics().await;
        (metric(&m, &pass).unwrap_or(0.0) >= 3.0).then_some(m)
    })
    .await;
    assert_eq!(metric(&m, &fail), Some(0.0));
}

/// Open an upgraded tunnel through the proxy (the test backend echoes after a 101).
pub async fn open_tunnel(proxy: std::net::SocketAddr) -> tokio::net::TcpStream {
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

pub async fn echoes(c: &mut tokio::net::TcpStream) -> bool {
    if c.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut got = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(3), c.read_exact(&mut got)).await,
        Ok(Ok(_))
    ) && &got == b"ping"
}

/// An h2c connection to the proxy (prior knowledge).
pub async fn h2c_client(
    proxy: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<Body> {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    tx
}

/// One GET over a fresh h2c connection to `proxy`.
pub async fn h2c_get(
    proxy: std::net::SocketAddr,
    path: &str,
) -> http::Response<hyper::body::Incoming> {
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
