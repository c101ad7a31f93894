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

use crate::app::Peer;

/// Bind the preferred port, or any free one if it is taken.
async fn bind_near(port: u16) -> std::io::Result<TcpListener> {
    match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind(("127.0.0.1", 0)).await,
    }
}

/// A demo backend: answers every path with its name, `/healthz` with 200.
pub fn spawn_backend(listener: TcpListener, name: String) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let name = name.clone();
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
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// `shoal demo-backend`: one demo backend on `listen`, until SIGTERM or Ctrl-C (for containers).
pub async fn run_backend(listen: SocketAddr, name: String) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    println!("demo backend {name} on http://{}", l.local_addr()?);
    spawn_backend(l, name);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Start `backends` demo backends and `peers` peers, print where they are, serve until Ctrl-C.
pub async fn run(peers: usize, backends: usize) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
    let mut backend_addrs: Vec<SocketAddr> = Vec::new();
    for i in 0..backends {
        let l = bind_near(9001 + i as u16).await?;
        let addr = l.local_addr()?;
        spawn_backend(l, format!("backend-{}", i + 1));
        backend_addrs.push(addr);
    }
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
        });
        let config =
            crate::config::from_value(&raw).map_err(|e| anyhow::anyhow!("demo config: {e}"))?;
        running.push(Peer::start(config).await?);
    }
    println!("shoal demo: {peers} peer(s), {backends} backend(s) on loopback; Ctrl-C to stop");
    for p in &running {
        println!(
            "peer {}  proxy http://{}  admin http://{}  metrics http://{}/metrics",
            p.config.node.id, p.proxy_addrs[0], p.admin_addr, p.admin_addr
        );
    }
    let backends_line: Vec<String> = backend_addrs.iter().map(|a| a.to_string()).collect();
    println!("backends {}", backends_line.join(" "));
    println!(
        "try: curl http://{}/  |  shoal pool list --admin http://{}",
        running[0].proxy_addrs[0], running[0].admin_addr
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
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
