//! `shoal demo`: a local cluster and demo backends in one process, on loopback.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::Peer;

/// Bind the preferred port, or any free one if it is taken.
async fn bind_near(port: u16) -> std::io::Result<TcpListener> {
    match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind(("127.0.0.1", 0)).await,
    }
}

/// A demo backend: answers every path with its name, `/healthz` with 200; stops (listener and
/// open connections) when `stop` is cancelled.
pub fn spawn_backend(listener: TcpListener, name: String, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => match a {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                },
            };
            let (name, stop) = (name.clone(), stop.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let body = if req.uri().path() == "/healthz" {
                        "ok\n".to_string()
                    } else {
                        format!(
                            "hello from {name} ({} {})\n",
                            req.method(),
                            req.uri().path()
                        )
                    };
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
}

/// One of the demo's backends, which the demo can kill and start again on the same port.
struct DemoBackend {
    name: String,
    addr: SocketAddr,
    running: Option<CancellationToken>,
}

impl DemoBackend {
    async fn start(&mut self) -> std::io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let l = TcpListener::bind(self.addr).await?;
        let stop = CancellationToken::new();
        spawn_backend(l, self.name.clone(), stop.clone());
        self.running = Some(stop);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(stop) = self.running.take() {
            stop.cancel();
        }
    }
}

/// A demo command from standard input: `kill NAME`, `start NAME`; the answer to print.
async fn command(line: &str, backends: &mut [DemoBackend]) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (verb, name) = match words.as_slice() {
        [] => return String::new(),
        [verb, name] => (*verb, *name),
        _ => return "commands: kill NAME | start NAME (e.g. kill backend-2)".into(),
    };
    let Some(b) = backends.iter_mut().find(|b| b.name == name) else {
        let names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
        return format!("no backend {name:?} (have: {})", names.join(", "));
    };
    match verb {
        "kill" => {
            b.kill();
            format!("killed {name}: its port refuses connections; watch the peers react")
        }
        "start" => match b.start().await {
            Ok(()) => format!("started {name} on {}", b.addr),
            Err(e) => format!("cannot start {name} on {}: {e}", b.addr),
        },
        _ => "commands: kill NAME | start NAME (e.g. kill backend-2)".into(),
    }
}

/// `shoal demo-backend`: one demo backend on `listen`, until SIGTERM or Ctrl-C (for containers).
pub async fn run_backend(listen: SocketAddr, name: String) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    println!("demo backend {name} on http://{}", l.local_addr()?);
    let stop = CancellationToken::new();
    spawn_backend(l, name, stop.clone());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

fn print_event(e: &serde_json::Value) {
    let at = e["at"].as_str().unwrap_or("");
    let time = at.get(11..23).unwrap_or(at);
    println!(
        "{time}  [{}] {:<15} {}",
        e["peer"].as_str().unwrap_or("?"),
        e["kind"].as_str().unwrap_or("?"),
        e["message"].as_str().unwrap_or("")
    );
}

/// Start `backends` demo backends and `peers` peers, print where they are, serve until Ctrl-C.
pub async fn run(peers: usize, backends: usize) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .try_init();
    let (mut demo_backends, backend_addrs, api_addr) = start_backends(backends).await?;
    let running = start_peers(peers, &backend_addrs, api_addr).await?;
    print_intro(&running, backends, &backend_addrs, api_addr);
    follow_events(&running);
    // Standard input is read on a thread of its own: a blocking read must not hold up the
    // runtime's shutdown.
    let (line_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stdin_open = true;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => { r?; break; }
            _ = term.recv() => break,
            line = lines.recv(), if stdin_open => match line {
                Some(line) => {
                    let answer = command(&line, &mut demo_backends).await;
                    if !answer.is_empty() {
                        println!("> {answer}");
                    }
                }
                // No terminal (or it closed): keep serving.
                None => stdin_open = false,
            },
        }
    }
    for p in &running {
        p.drain().await;
    }
    // The demo's Paxos state is throwaway.
    for p in &running {
        let _ = std::fs::remove_dir_all(&p.config.node.data_dir);
    }
    Ok(())
}

/// The demo backends of `default` (`backend-N`, from port 9001) and the one of `api`
/// (`api-1`, from 9101).
async fn start_backends(
    backends: usize,
) -> anyhow::Result<(Vec<DemoBackend>, Vec<SocketAddr>, SocketAddr)> {
    let mut backend_addrs: Vec<SocketAddr> = Vec::new();
    let mut demo_backends = Vec::new();
    for i in 0..backends {
        let l = bind_near(9001 + i as u16).await?;
        let addr = l.local_addr()?;
        let (name, stop) = (format!("backend-{}", i + 1), CancellationToken::new());
        spawn_backend(l, name.clone(), stop.clone());
        backend_addrs.push(addr);
        demo_backends.push(DemoBackend {
            name,
            addr,
            running: Some(stop),
        });
    }
    // A second service, `api` (Host api.localhost), with a backend of its own.
    let api_listener = bind_near(9101).await?;
    let api_addr = api_listener.local_addr()?;
    let api_stop = CancellationToken::new();
    spawn_backend(api_listener, "api-1".into(), api_stop.clone());
    demo_backends.push(DemoBackend {
        name: "api-1".into(),
        addr: api_addr,
        running: Some(api_stop),
    });
    Ok((demo_backends, backend_addrs, api_addr))
}

/// `peers` peers (ids a, b, c, ...) that list each other, seeded with the demo backends and the
/// service `api`.
async fn start_peers(
    peers: usize,
    backend_addrs: &[SocketAddr],
    api_addr: SocketAddr,
) -> anyhow::Result<Vec<Peer>> {
    let ids: Vec<String> = (0..peers)
        .map(|i| ((b'a' + i as u8) as char).to_string())
        .collect();
    // Reserve cluster ports first, so every peer can list the others.
    let mut cluster_ports = Vec::new();
    for i in 0..peers {
        let l = bind_near(7001 + i as u16).await?;
        cluster_ports.push(l.local_addr()?.port());
    }
    let mut running = Vec::new();
    for i in 0..peers {
        let proxy = bind_near(8080 + i as u16).await?.local_addr()?;
        let admin = bind_near(9901 + i as u16).await?.local_addr()?;
        let others: Vec<_> = (0..peers)
            .filter(|&j| j != i)
            .map(|j| json!({ "id": ids[j], "addr": format!("127.0.0.1:{}", cluster_ports[j]) }))
            .collect();
        let raw = json!({
            "node": { "id": ids[i], "data_dir": std::env::temp_dir().join(format!("shoal-demo-{}-{}", std::process::id(), ids[i])).to_string_lossy() },
            "proxy": { "listen": [proxy.to_string()] },
            "admin": { "listen": admin.to_string() },
            "cluster": { "listen": format!("127.0.0.1:{}", cluster_ports[i]), "peers": others },
            "health": { "interval": "500ms" },
            "backends": backend_addrs.iter().enumerate().map(|(k, a)| json!({ "id": format!("backend-{}", k + 1), "addr": a.to_string() })).collect::<Vec<_>>(),
            "services": [{
                "name": "api",
                "hosts": ["api.localhost"],
                "backends": [{ "id": "api-1", "addr": api_addr.to_string() }],
            }],
        });
        let config =
            crate::config::from_value(&raw).map_err(|e| anyhow::anyhow!("demo config: {e}"))?;
        running.push(Peer::start(config).await?);
    }
    Ok(running)
}

/// Where everything is, and what to try.
fn print_intro(
    running: &[Peer],
    backends: usize,
    backend_addrs: &[SocketAddr],
    api_addr: SocketAddr,
) {
    let peers = running.len();
    println!(
        "shoal demo: {peers} peer(s), {backends} backend(s) for service default and 1 for service api (Host api.localhost), on loopback; Ctrl-C to stop"
    );
    for p in running {
        println!(
            "peer {}  proxy http://{}  admin http://{}  metrics http://{}/metrics",
            p.config.node.id, p.proxy_addrs[0], p.admin_addr, p.admin_addr
        );
    }
    let backends_line: Vec<String> = backend_addrs.iter().map(|a| a.to_string()).collect();
    println!("backends {}  api-1 {api_addr}", backends_line.join(" "));
    println!(
        "try: curl http://{0}/  |  curl -H 'Host: api.localhost' http://{0}/  |  shoal services --admin http://{1}",
        running[0].proxy_addrs[0], running[0].admin_addr
    );
    println!(
        "type `kill backend-2` or `start backend-2` and Enter to watch the cluster react; events follow:"
    );
}

/// Every peer's events, one line each, as they happen.
fn follow_events(running: &[Peer]) {
    for p in running {
        let (backlog, mut live) = p.events.follow();
        tokio::spawn(async move {
            for e in backlog {
                print_event(&e);
            }
            while let Ok(e) = live.recv().await {
                print_event(&e);
            }
        });
    }
}
