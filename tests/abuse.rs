//! Connections under abuse (the stress test): verifying clients check every byte of their own
//! answers while abusive clients cut uploads short, read part of an answer and reset, send half
//! a head, pipeline and leave, and backends cut their answers. On io_uring and on epoll: no
//! wrong body, no failure, no stuck request; descriptors and memory back near their baseline
//! once the abuse stops.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Byte `i` of the deterministic answer `seed` (what `/bytes/N/SEED` sends).
fn pattern(seed: u64, i: usize) -> u8 {
    ((seed as usize).wrapping_mul(7) + i * 31 % 251) as u8
}

/// A backend by path: `/echo` streams the body back; `/bytes/N/SEED` sends N pattern bytes;
/// `/early` answers at once and finishes only after the whole upload; `/cut` sends part of its
/// answer and breaks the connection.
async fn abuse_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                    let path = req.uri().path().to_string();
                    let parts: Vec<&str> = path.split('/').collect();
                    let resp = match parts.get(1).copied() {
                        Some("echo") => {
                            http::Response::new(req.into_body().map_err(BoxError::from).boxed())
                        }
                        Some("bytes") => {
                            let n: usize = parts.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
                            let seed: u64 = parts.get(3).and_then(|v| v.parse().ok()).unwrap_or(0);
                            let data: Vec<u8> = (0..n).map(|i| pattern(seed, i)).collect();
                            http::Response::new(full(data).map_err(BoxError::from).boxed())
                        }
                        Some("early") => {
                            let (mut tx, rx) =
                                http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
                            let mut body = req.into_body();
                            tokio::spawn(async move {
                                while let Some(Ok(_)) = body.frame().await {}
                                let _ = tx.send_data(Bytes::from_static(b"ok")).await;
                            });
                            let mut r = http::Response::new(rx.boxed());
                            r.headers_mut()
                                .insert("content-length", http::HeaderValue::from_static("2"));
                            r
                        }
                        _ => {
                            // /cut: a promised length, part of it, then the connection breaks.
                            let (mut tx, rx) =
                                http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
                            tokio::spawn(async move {
                                let _ = tx.send_data(Bytes::from(vec![b'x'; 1000])).await;
                                tx.abort("cut".into());
                            });
                            let mut r = http::Response::new(rx.boxed());
                            r.headers_mut()
                                .insert("content-length", http::HeaderValue::from_static("100000"));
                            r
                        }
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    wrong: AtomicU64,
    failed: AtomicU64,
    stuck: AtomicU64,
}

/// A verifying client: keep-alive requests whose answers it checks byte by byte.
async fn verify(proxy: SocketAddr, id: u64, until: Instant, tally: Arc<Tally>) {
    let mut sender = client(proxy).await;
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let seed = id * 1_000_000 + n;
        let (req, want): (http::Request<Body>, Vec<u8>) = if n.is_multiple_of(2) {
            let len = (seed as usize * 7919) % 40_000;
            let data: Vec<u8> = (0..len).map(|i| pattern(seed, i)).collect();
            let req = request("POST", proxy, "/echo")
                .body(full(data.clone()))
                .unwrap();
            (req, data)
        } else {
            let len = (seed as usize * 104_729) % 70_000;
            let req = request("GET", proxy, &format!("/bytes/{len}/{seed}"))
                .body(empty())
                .unwrap();
            (req, (0..len).map(|i| pattern(seed, i)).collect())
        };
        let exchange = async {
            sender.ready().await.map_err(|e| e.to_string())?;
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((status, body.to_bytes()))
        };
        match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Ok(Ok((status, body))) if status == 200 && body[..] == want[..] => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok((status, body))) => {
                eprintln!(
                    "client {id} request {n}: {status}, {} bytes, want {}",
                    body.len(),
                    want.len()
                );
                tally.wrong.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                eprintln!("client {id} request {n}: {e}");
                tally.failed.fetch_add(1, Ordering::Relaxed);
                sender = client(proxy).await;
            }
            Err(_) => {
                eprintln!("client {id} request {n}: stuck");
                tally.stuck.fetch_add(1, Ordering::Relaxed);
                sender = client(proxy).await;
            }
        }
    }
}

/// Close with a reset (SO_LINGER 0), as a client that crashes or gives up does.
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// An abusive client, cycling through its kinds of abuse.
async fn abuse(proxy: SocketAddr, id: u64, until: Instant) {
    let mut n = id;
    while Instant::now() < until {
        n += 1;
        let Ok(mut s) = TcpStream::connect(proxy).await else {
            continue;
        };
        match n % 5 {
            0 => {
                // An upload cut short: part of a 2 MB body, to a backend that answered early
                // and waits for the rest; then a reset.
                let head = "POST /early HTTP/1.1\r\nHost: h\r\nContent-Length: 2000000\r\n\r\n";
                let _ = s.write_all(head.as_bytes()).await;
                let part = vec![b'u'; 64 * 1024 * (1 + (n as usize % 8))];
                let _ = s.write_all(&part).await;
                let mut buf = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await;
                reset(s);
            }
            1 => {
                // Part of a large answer, then a reset.
                let _ = s
                    .write_all(b"GET /bytes/1000000/1 HTTP/1.1\r\nHost: h\r\n\r\n")
                    .await;
                let mut buf = vec![0u8; 16 * 1024];
                let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
                reset(s);
            }
            2 => {
                // Half a head, then gone.
                let _ = s.write_all(b"GET /echo HTTP/1.1\r\nHo").await;
                drop(s);
            }
            3 => {
                // Pipelined requests, then gone before the answers.
                let _ = s
                    .write_all(
                        b"GET /bytes/100/1 HTTP/1.1\r\nHost: h\r\n\r\nGET /bytes/200000/2 HTTP/1.1\r\nHost: h\r\n\r\nPOST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhel",
                    )
                    .await;
                reset(s);
            }
            _ => {
                // A backend that cuts its answer.
                let _ = s.write_all(b"GET /cut HTTP/1.1\r\nHost: h\r\n\r\n").await;
                let mut buf = vec![0u8; 8192];
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                })
                .await;
            }
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn under_abuse(io_uring: bool) {
    let backends = [abuse_backend().await, abuse_backend().await];
    let s = Shoal::start(
        &format!("io_uring = {io_uring}\nworkers = 2\nretries = 1"),
        &format!(
            "[health]\ninterval = \"1h\"\n[[backends]]\nid = \"a\"\naddr = \"{}\"\n[[backends]]\nid = \"b\"\naddr = \"{}\"\n",
            backends[0], backends[1]
        ),
    )
    .await;
    let pid = s.child.as_ref().unwrap().id();
    // A little traffic first, so the baseline has its pools and buffers.
    let warm = Arc::new(Tally::default());
    verify(
        s.proxy,
        999,
        Instant::now() + Duration::from_millis(300),
        warm,
    )
    .await;
    let (fds0, rss0) = (open_fds(pid), rss_kib(pid));

    let secs: u64 = std::env::var("SHOAL_ABUSE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let until = Instant::now() + Duration::from_secs(secs);
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for id in 0..6 {
        tasks.push(tokio::spawn(verify(s.proxy, id, until, tally.clone())));
    }
    for id in 0..8 {
        tasks.push(tokio::spawn(abuse(s.proxy, id, until)));
    }
    let mut peak_fds = 0;
    let mut peak_rss = 0;
    while Instant::now() < until {
        peak_fds = peak_fds.max(open_fds(pid));
        peak_rss = peak_rss.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ok = tally.ok.load(Ordering::Relaxed);
    let (wrong, failed, stuck) = (
        tally.wrong.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
        tally.stuck.load(Ordering::Relaxed),
    );
    eprintln!(
        "io_uring={io_uring}: {ok} verified answers, {wrong} wrong, {failed} failed, {stuck} stuck; \
         descriptors {fds0} -> peak {peak_fds}; RSS {rss0} -> peak {peak_rss} KiB"
    );
    assert!(ok > 100, "too few verified answers to mean anything: {ok}");
    assert_eq!((wrong, failed, stuck), (0, 0, 0), "{}", s.log());
    // Back to the baseline once the abuse stops: every exchange of a client that left ended.
    // What may stay: idle pooled backend connections the verifying clients' exchanges left (one
    // per client and backend at most), and a few in passing.
    let allowed = fds0 + 6 * 2 + 4;
    let mut settled = (0, 0);
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        settled = (open_fds(pid), rss_kib(pid));
        if settled.0 <= allowed {
            break;
        }
    }
    assert!(
        settled.0 <= allowed,
        "descriptors {fds0} before the abuse, {} after it stopped (peak {peak_fds})",
        settled.0
    );
    assert!(
        settled.1 <= rss0 + 64 * 1024,
        "resident memory {rss0} KiB before, {} KiB after (peak {peak_rss})",
        settled.1
    );
    let m = s.metrics().await;
    assert_eq!(metric(&m, "shoal_client_connections"), Some(0.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abuse_on_epoll_loses_and_leaks_nothing() {
    under_abuse(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abuse_on_io_uring_loses_and_leaks_nothing() {
    if !io_uring_here() {
        return;
    }
    under_abuse(true).await;
}
