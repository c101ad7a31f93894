//! Commit latency of pool changes on loopback: three real `shoal run` peers; 1,000 weight changes
//! through one peer's admin API (p50, p99), and how long the other two take to learn each change.
//!
//!     cargo bench --bench cluster_commit          (COMMIT_CHANGES=1000, LEARN_CHANGES=200)

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use shoal::cli::client::{call, Request};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn version(admin: &str) -> u64 {
    match call(admin, None, Request::get("/pool")).await {
        Ok((200, v)) => v["version"].as_u64().unwrap_or(0),
        _ => 0,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let changes: usize = std::env::var("COMMIT_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let learn_changes: usize = std::env::var("LEARN_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let bin = std::env::var("SHOAL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_shoal")));
    let tmp = tempfile::tempdir().unwrap();
    let ids = ["a", "b", "c"];
    let cluster: Vec<u16> = ids.iter().map(|_| free_port()).collect();
    let admin: Vec<String> = ids
        .iter()
        .map(|_| format!("http://127.0.0.1:{}", free_port()))
        .collect();
    let mut procs = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let peers: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| {
                format!(
                    "{{ id = \"{}\", addr = \"127.0.0.1:{}\" }}",
                    ids[j], cluster[j]
                )
            })
            .collect();
        let cfg = tmp.path().join(format!("{id}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[node]\nid = \"{id}\"\ndata_dir = \"{}\"\n[proxy]\nlisten = [\"127.0.0.1:{}\"]\n[admin]\nlisten = \"{}\"\n[cluster]\nlisten = \"127.0.0.1:{}\"\npeers = [{}]\n[log]\nlevel = \"warn\"\n[[backends]]\nid = \"w\"\naddr = \"127.0.0.1:9\"\n",
                tmp.path().join(id).display(),
                free_port(),
                admin[i].trim_start_matches("http://"),
                cluster[i],
                peers.join(", ")
            ),
        )
        .unwrap();
        procs.push(Proc(
            Command::new(&bin)
                .args(["run", "--config", cfg.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(15);
        for a in &admin {
            while version(a).await == 0 {
                assert!(Instant::now() < deadline, "cluster did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut lat = Vec::with_capacity(changes);
        let mut failed = 0;
        for i in 0..changes {
            let body = json!({ "weight": 1 + (i % 500) as u32 });
            let t = Instant::now();
            match call(&admin[0], None, Request::with_body("PUT", "/pool/backends/w", body)).await {
                Ok((200, _)) => lat.push(t.elapsed()),
                _ => failed += 1,
            }
        }
        lat.sort();
        println!(
            "commit latency over {} changes through peer a (3 peers, loopback): p50 {:?}, p99 {:?}, max {:?}, failed {failed}",
            lat.len(),
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            lat.last().unwrap()
        );
        let mut learn = Vec::with_capacity(learn_changes);
        for i in 0..learn_changes {
            let body = json!({ "weight": 1 + ((i + 7) % 500) as u32 });
            let t = Instant::now();
            let Ok((200, p)) = call(&admin[0], None, Request::with_body("PUT", "/pool/backends/w", body)).await else { continue };
            let v = p["version"].as_u64().unwrap();
            for other in &admin[1..] {
                while version(other).await < v {}
            }
            learn.push(t.elapsed());
        }
        learn.sort();
        println!(
            "change committed and learned by all three peers, over {} changes: p50 {:?}, p99 {:?}",
            learn.len(),
            pct(&learn, 0.5),
            pct(&learn, 0.99)
        );
    });
    drop(procs);
}
