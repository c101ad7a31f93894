//! Test harness: real backends on loopback, real `shoal` processes, a small HTTP client.
#![allow(dead_code)]

pub mod dataplane;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub type Body = BoxBody<Bytes, hyper::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// What a test backend does with a request (health probes on /healthz always pass unless
/// `health_ok` is false).
#[derive(Clone, Debug)]
pub enum Behavior {
    /// JSON describing the request: name, method, path, query, headers, body length.
    Echo,
    /// Stream the request body straight back.
    Mirror,
    /// Wait, then echo.
    Slow(Duration),
    /// Answer this status.
    Status(u16),
    /// Send `n` chunks, `gap` apart.
    Drip(usize, Duration),
}

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    pub behavior: Arc<Mutex<Behavior>>,
    pub health_ok: Arc<std::sync::atomic::AtomicBool>,
    /// Each health probe: the `X-Shoal-Peer` it carried ("" for none) and when it came.
    pub probes: Probes,
    stop: CancellationToken,
}

/// The health probes a test backend received.
pub type Probes = Arc<Mutex<Vec<(String, Instant)>>>;

impl Backend {
    pub async fn start(name: &str, behavior: Behavior) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(l, name, behavior)
    }

    pub fn start_on(l: TcpListener, name: &str, behavior: Behavior) -> Backend {
        let addr = l.local_addr().unwrap();
        let b = Backend {
            name: name.to_string(),
            addr,
            hits: Arc::new(AtomicU64::new(0)),
            behavior: Arc::new(Mutex::new(behavior)),
            health_ok: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            probes: Probes::default(),
            stop: CancellationToken::new(),
        };
        let (name, hits, beh, health, probes, stop) = (
            b.name.clone(),
            b.hits.clone(),
            b.behavior.clone(),
            b.health_ok.clone(),
            b.probes.clone(),
            b.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = l.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                };
                let (name, hits, beh, health, probes, stop) = (
                    name.clone(),
                    hits.clone(),
                    beh.clone(),
                    health.clone(),
                    probes.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (name, hits, beh, health, probes) = (
                            name.clone(),
                            hits.clone(),
                            beh.clone(),
                            health.clone(),
                            probes.clone(),
                        );
                        async move {
                            Ok::<_, Infallible>(
                                serve(req, &name, &hits, &beh, (&health, &probes)).await,
                            )
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades();
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        b
    }

    pub fn set(&self, b: Behavior) {
        *self.behavior.lock().unwrap() = b;
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// The peers whose probes came since `since`, with how many each sent.
    pub fn probers_since(&self, since: Instant) -> std::collections::BTreeMap<String, usize> {
        let mut out = std::collections::BTreeMap::new();
        for (peer, at) in self.probes.lock().unwrap().iter() {
            if *at >= since {
                *out.entry(peer.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    /// Like a killed process: the port closes and every open connection drops.
    pub fn kill(&self) {
        self.stop.cancel();
    }
}

async fn serve(
    mut req: Request<Incoming>,
    name: &str,
    hits: &AtomicU64,
    beh: &Mutex<Behavior>,
    (health, probes): (&std::sync::atomic::AtomicBool, &Probes),
) -> Response<Body> {
    if req.uri().path() == "/healthz" {
        let peer = req
            .headers()
            .get("x-shoal-peer")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        probes.lock().unwrap().push((peer, Instant::now()));
        let ok = health.load(Ordering::SeqCst);
        let mut r = Response::new(full(if ok { "ok" } else { "sick" }));
        *r.status_mut() = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return r;
    }
    hits.fetch_add(1, Ordering::SeqCst);
    if req.headers().contains_key(http::header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(http::header::UPGRADE, "echo".parse().unwrap());
        r.headers_mut()
            .insert(http::header::CONNECTION, "upgrade".parse().unwrap());
        return r;
    }
    let behavior = beh.lock().unwrap().clone();
    match behavior {
        Behavior::Echo => echo(req, name).await,
        Behavior::Slow(d) => {
            tokio::time::sleep(d).await;
            echo(req, name).await
        }
        Behavior::Mirror => Response::new(req.into_body().boxed()),
        Behavior::Status(s) => {
            let mut r = Response::new(full(format!("{name} says {s}")));
            *r.status_mut() = StatusCode::from_u16(s).unwrap();
            r
        }
        Behavior::Drip(n, gap) => {
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(1);
            tokio::spawn(async move {
                for i in 0..n {
                    if tx
                        .send_data(Bytes::from(format!("chunk {i}\n")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(gap).await;
                }
            });
            Response::new(body.boxed())
        }
    }
}

async fn echo(req: Request<Incoming>, name: &str) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let len = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let mut headers = serde_json::Map::new();
    // Repeated fields combined as RFC 9110 §5.3 says a recipient may (so a duplicate shows).
    for (k, v) in &parts.headers {
        let v = v.to_str().unwrap_or("");
        let joined = match headers.get(k.as_str()).and_then(|p| p.as_str()) {
            Some(prior) => format!("{prior}, {v}"),
            None => v.to_string(),
        };
        headers.insert(k.to_string(), joined.into());
    }
    let v = serde_json::json!({
        "name": name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": len,
    });
    Response::new(full(v.to_string()))
}

/// A backend that reads a request head and then closes the connection without answering.
pub async fn resetting_backend() -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        if !got.starts_with(b"GET /healthz") {
                            h.fetch_add(1, Ordering::SeqCst);
                        }
                        // RST rather than FIN: linger 0.
                        #[allow(deprecated)]
                        let _ = s.set_linger(Some(Duration::ZERO));
                        return;
                    }
                }
            });
        }
    });
    (addr, hits)
}

/// A free loopback port for a process started later. Taken below the kernel's ephemeral range
/// (32768+), so no outgoing connection can grab it in the meantime, and spread by process id so
/// that test processes running side by side pick different ones.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = 20_000 + (u64::from(std::process::id()) * 131) % 12_000;
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = (20_000 + (base - 20_000 + n) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn shoal_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shoal"))
}

/// A `shoal run` process with its own config and data dir.
pub struct Shoal {
    pub child: Option<Child>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Shoal {
    /// Write `extra` after a [node]/[proxy]/[admin]/[cluster] head with fresh ports, start, and
    /// wait for /readyz. `extra` may hold more keys of [proxy] (it is appended to that table
    /// first) — see `proxy_keys`.
    pub async fn start(proxy_keys: &str, rest: &str) -> Shoal {
        Self::start_with_env(proxy_keys, rest, &[]).await
    }

    pub async fn start_with_env(proxy_keys: &str, rest: &str, env: &[(&str, &str)]) -> Shoal {
        let dir = tempfile::tempdir().unwrap();
        let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let cluster = free_port();
        let text = format!(
            "[node]\nid = \"t\"\ndata_dir = \"{}\"\n\n[proxy]\nlisten = [\"{proxy}\"]\n{proxy_keys}\n\n[admin]\nlisten = \"{admin}\"\n\n[cluster]\nlisten = \"127.0.0.1:{cluster}\"\n\n{rest}\n",
            dir.path().join("data").display()
        );
        let config = dir.path().join("shoal.toml");
        std::fs::write(&config, text).unwrap();
        let mut s = Shoal {
            child: None,
            proxy,
            admin,
            dir,
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        s.spawn();
        s.wait_ready().await;
        s
    }

    /// A process for `text` (a whole config) in its own temp dir, not yet started.
    pub fn prepare(
        text: &str,
        proxy: SocketAddr,
        admin: SocketAddr,
        dir: tempfile::TempDir,
    ) -> Shoal {
        let config = dir.path().join("shoal.toml");
        std::fs::write(&config, text).unwrap();
        Shoal {
            child: None,
            proxy,
            admin,
            dir,
            config,
            env: Vec::new(),
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    /// Start `shoal run` with extra arguments (e.g. `--force-new-cluster`).
    pub fn spawn_with(&mut self, args: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join("shoal.log")).unwrap();
        let child = Command::new(shoal_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .args(args)
            .env("SHOAL__LOG__LEVEL", "debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("shoal.log")).unwrap_or_default()
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_ref() {
                // A process that exited (a zombie until waited for) will never be ready.
                let stat =
                    std::fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap_or_default();
                let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
                if matches!(state, None | Some('Z') | Some('X')) {
                    panic!("shoal exited before it was ready; log:\n{}", self.log());
                }
            }
            if let Ok((200, _)) = get_text(self.admin, "/readyz").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        panic!("shoal did not become ready; log:\n{}", self.log());
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        let st = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Wait for exit (up to `timeout`); returns the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub async fn metrics(&self) -> String {
        get_text(self.admin, "/metrics").await.unwrap().1
    }

    /// Waits (up to `within`) until the series (name and labels as printed) reads `value`.
    pub async fn metric_reaches(&self, series: &str, value: f64, within: Duration) {
        eventually(within, &format!("{series} = {value}"), || async {
            (metric(&self.metrics().await, series) == Some(value)).then_some(())
        })
        .await
    }
}

impl Drop for Shoal {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Value of a metric line (exact name + labels as printed), if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn send(addr: SocketAddr, req: Request<Body>) -> Result<Response<Bytes>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Response::from_parts(parts, body))
}

pub fn request(method: &str, addr: SocketAddr, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
}

pub async fn get_text(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let r = send(addr, request("GET", addr, path).body(empty()).unwrap()).await?;
    Ok((
        r.status().as_u16(),
        String::from_utf8_lossy(r.body()).into_owned(),
    ))
}

pub async fn get_json(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let (s, t) = get_text(addr, path).await.unwrap();
    (
        s,
        serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)),
    )
}

/// Write raw bytes, read until the peer closes or `wait` passes; return what came back.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A keep-alive client connection for load loops.
pub async fn client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Ports and config of one peer of a test cluster.
#[derive(Clone)]
pub struct PeerPorts {
    pub id: String,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub cluster: SocketAddr,
}

impl PeerPorts {
    /// Fresh loopback ports for peer `id`.
    pub fn new(id: &str) -> PeerPorts {
        let port = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
        PeerPorts {
            id: id.to_string(),
            proxy: port(),
            admin: port(),
            cluster: port(),
        }
    }
}

/// Peer `p`, not started: `known` as its `cluster.peers`, `role`, the keys `cluster_keys` inside
/// [cluster] (heartbeats every 100 ms unless they say otherwise) and `extra` after it.
pub fn prepare_peer(
    p: &PeerPorts,
    known: &[&PeerPorts],
    role: &str,
    cluster_keys: &str,
    extra: &str,
) -> Shoal {
    let dir = tempfile::tempdir().unwrap();
    let peers: Vec<String> = known
        .iter()
        .map(|q| format!("{{ id = \"{}\", addr = \"{}\" }}", q.id, q.cluster))
        .collect();
    let beat = if cluster_keys.contains("heartbeat_interval") {
        ""
    } else {
        "heartbeat_interval = \"100ms\"\n"
    };
    let text = format!(
        "[node]\nid = \"{}\"\ndata_dir = \"{}\"\n\n[proxy]\nlisten = [\"{}\"]\n\n[admin]\nlisten = \"{}\"\n\n[cluster]\nlisten = \"{}\"\nrole = \"{role}\"\npeers = [{}]\n{beat}{cluster_keys}\n\n{extra}\n",
        p.id,
        dir.path().join("data").display(),
        p.proxy,
        p.admin,
        p.cluster,
        peers.join(", "),
    );
    Shoal::prepare(&text, p.proxy, p.admin, dir)
}

/// `prepare_peer`, started (not waited for).
#[allow(dead_code)]
pub fn spawn_peer(
    p: &PeerPorts,
    known: &[&PeerPorts],
    role: &str,
    cluster_keys: &str,
    extra: &str,
) -> Shoal {
    let mut s = prepare_peer(p, known, role, cluster_keys, extra);
    s.spawn();
    s
}

/// Start `n` peers (ids a, b, c, ...) that list each other; `extra(i)` is appended to each
/// config (tables after [cluster], e.g. [balance], [[backends]]); `cluster_extra(i)` goes inside
/// [cluster]. Waits until all are ready and every voter votes.
pub async fn start_cluster(
    n: usize,
    cluster_extra: impl Fn(usize) -> String,
    extra: impl Fn(usize) -> String,
) -> Vec<Shoal> {
    let ports: Vec<PeerPorts> = (0..n)
        .map(|i| PeerPorts::new(&((b'a' + i as u8) as char).to_string()))
        .collect();
    let mut nodes = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let others: Vec<&PeerPorts> = ports.iter().filter(|q| q.id != p.id).collect();
        nodes.push(spawn_peer(
            p,
            &others,
            "voter",
            &cluster_extra(i),
            &extra(i),
        ));
    }
    for s in &nodes {
        s.wait_ready().await;
    }
    // Formed means every voter votes: a voter that found the cluster formed without it (the
    // others were quicker) votes only after an identity round through both others, so a test
    // that then kills one would be testing a cluster that never had three voters.
    for s in &nodes {
        eventually(
            Duration::from_secs(20),
            "every peer voting (or a learner)",
            || async {
                let (code, st) = get_json(s.admin, "/status").await;
                (code == 200 && st["consensus"] != "catching_up").then_some(())
            },
        )
        .await;
    }
    nodes
}

/// Whether this kernel gives this process an io_uring (containers may forbid one). Under CI a
/// refusal fails the test; elsewhere the caller skips the ring's part, and this says so.
pub fn io_uring_here() -> bool {
    if io_uring::IoUring::new(8).is_ok() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "this kernel refuses io_uring, under CI"
    );
    eprintln!("skipped on io_uring: this kernel refuses it");
    false
}

/// Poll `f` every 20 ms until it returns Some, or panic after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A change through `via`'s admin API, sent again while it answers 503 (no quorum: as an
/// operator would, while peers on a loaded machine find each other), for up to `within`. Any
/// other status fails the test; so does no commit in time, with every peer's log printed.
pub async fn commit_eventually(
    via: &Shoal,
    all: &[Shoal],
    (method, path, body): (&str, &str, serde_json::Value),
    within: Duration,
) -> (u16, serde_json::Value) {
    let start = Instant::now();
    loop {
        let (code, p) = admin_call(via.admin, method, path, Some(body.clone())).await;
        if code != 503 {
            if start.elapsed() > Duration::from_secs(3) {
                println!("{method} {path} committed after {:?}", start.elapsed());
            }
            return (code, p);
        }
        if start.elapsed() > within {
            for (i, s) in all.iter().enumerate() {
                eprintln!("--- log of peer {i} ---\n{}", s.log());
            }
            panic!("{method} {path}: still 503 after {within:?}: {p}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// POST/PUT/DELETE a JSON body to an admin API; returns status and JSON.
pub async fn admin_call(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let b = body.map(|v| full(v.to_string())).unwrap_or_else(empty);
    let req = request(method, admin, path)
        .header("content-type", "application/json")
        .body(b)
        .unwrap();
    match send(admin, req).await {
        Ok(r) => (
            r.status().as_u16(),
            serde_json::from_slice(r.body()).unwrap_or(serde_json::Value::Null),
        ),
        Err(e) => (0, serde_json::Value::String(e)),
    }
}

/// `POST /pool/backends` with an id and an address.
#[allow(dead_code)]
pub async fn add_backend(s: &Shoal, id: &str, addr: &str) -> (u16, serde_json::Value) {
    admin_call(
        s.admin,
        "POST",
        "/pool/backends",
        Some(serde_json::json!({"addr": addr, "id": id})),
    )
    .await
}

/// `[[backends]]` tables seeding these backends (id = name).
pub fn backends_toml(bs: &[&Backend]) -> String {
    bs.iter()
        .map(|b| format!("[[backends]]\nid = \"{}\"\naddr = \"{}\"\n", b.name, b.addr))
        .collect()
}

/// `[[services]]` with one backend each: `(name, the keys of the table, backends)`.
#[allow(dead_code)]
pub fn service_toml(name: &str, keys: &str, backends: &[&Backend]) -> String {
    let mut out = format!("[[services]]\nname = \"{name}\"\n{keys}\n");
    for b in backends {
        out.push_str(&format!(
            "[[services.backends]]\nid = \"{}\"\naddr = \"{}\"\n",
            b.name, b.addr
        ));
    }
    out
}

/// `shoal cert ARGS...`, which must succeed: the one way the tests make certificates.
#[allow(dead_code)]
pub fn shoal_cert(args: &[&str]) {
    let out = Command::new(shoal_bin())
        .arg("cert")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shoal cert {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether an outside tool runs (`probe`: arguments that succeed when it does). Without it a
/// test prints why and passes on a developer's machine; under `CI=true` it fails.
#[allow(dead_code)]
pub fn have_tool(tool: &str, probe: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but {tool} is missing: .ci/run must install it"
        );
        eprintln!("skipped: {tool} is not installed (or does not run)");
    }
    ok
}
