//! The cluster features of SPEC 2.2, measured with real `shoal run` processes on loopback (no
//! other proxy has them, so Shoal runs alone):
//!
//! - `probes`: health probe requests per backend per second with 3, 5 and 7 voters plus two
//!   learners, `health.probers = 3` against 0 (every peer probes), 1 s interval, four backends
//!   that count the probes they receive and who sent them (`X-Shoal-Peer`).
//! - `slow_start`: three peers with `health.slow_start = 10s` and two backends; a third is
//!   added through one peer while a client per peer sends requests on one keep-alive
//!   connection: the new backend's share of each peer's requests, per half second, written to
//!   `benches/results/slow_start.csv` and drawn to `slow_start.svg` (and `slow_start.png` by
//!   headless chromium when it is installed).
//!
//! Run: `cargo build --profile dist`, then
//! `SHOAL_BIN=target/dist/shoal cargo bench --bench cluster_features`.
//! Env: FEATURES_SECONDS (default 10: each probe measurement), FEATURES_TABLES (default
//! `probes,slow_start`).

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{free_port, http_call, read_head, shoal_run, wait_port, Proc};

fn wanted(name: &str) -> bool {
    std::env::var("FEATURES_TABLES").map_or(true, |v| v.split(',').any(|t| t.trim() == name))
}

/// A backend that answers `name` to every request on kept-alive connections and counts the
/// health probes it gets, by the peer each names.
struct Backend {
    port: u16,
    probes: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Backend {
    fn start(name: &'static str) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let probes: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let counts = probes.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let counts = counts.clone();
                std::thread::spawn(move || serve(s, name, &counts));
            }
        });
        Backend { port, probes }
    }

    fn probes(&self) -> u64 {
        self.probes.lock().unwrap().values().sum()
    }
}

fn serve(mut s: TcpStream, name: &str, probes: &Mutex<BTreeMap<String, u64>>) {
    let mut buf = Vec::new();
    loop {
        let Some(head) = read_head(&mut s, &mut buf) else {
            return;
        };
        if head.starts_with("get /healthz") {
            let peer = head
                .lines()
                .find_map(|l| l.strip_prefix("x-shoal-peer:"))
                .map_or(String::new(), |p| p.trim().to_string());
            *probes.lock().unwrap().entry(peer).or_insert(0) += 1;
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
            name.len()
        );
        if s.write_all(answer.as_bytes()).is_err() || head.contains("connection: close") {
            return;
        }
    }
}

/// One peer's config: voters `voters` (their cluster ports), `role`, `extra` after [cluster].
fn peer_config(
    dir: &Path,
    id: &str,
    ports: (u16, u16, u16),
    voters: &[(String, u16)],
    role: &str,
    extra: &str,
) -> String {
    let (proxy, admin, cluster) = ports;
    let peers: Vec<String> = voters
        .iter()
        .map(|(id, port)| format!("{{ id = \"{id}\", addr = \"127.0.0.1:{port}\" }}"))
        .collect();
    format!(
        "[node]\nid = \"{id}\"\ndata_dir = \"{}\"\n[proxy]\nlisten = [\"127.0.0.1:{proxy}\"]\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[cluster]\nlisten = \"127.0.0.1:{cluster}\"\nrole = \"{role}\"\npeers = [{}]\n[log]\nlevel = \"warn\"\n{extra}",
        dir.join(format!("{id}-data")).display(),
        peers.join(", "),
    )
}

/// Start `voters` voters and `learners` learners with `extra`; the peers' proxy and admin ports.
fn start_peers(
    shoal: &Path,
    dir: &Path,
    voters: usize,
    learners: usize,
    extra: &str,
) -> (Vec<Proc>, Vec<(u16, u16)>) {
    let ports: Vec<(u16, u16, u16)> = (0..voters + learners)
        .map(|_| (free_port(), free_port(), free_port()))
        .collect();
    let voter_ids: Vec<(String, u16)> =
        (0..voters).map(|i| (format!("v{i}"), ports[i].2)).collect();
    let mut procs = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let (id, role) = if i < voters {
            (format!("v{i}"), "voter")
        } else {
            (format!("l{}", i - voters), "learner")
        };
        let text = peer_config(dir, &id, *p, &voter_ids, role, extra);
        procs.push(shoal_run(shoal, dir, &id, &text));
    }
    for p in &ports {
        wait_port("shoal admin", p.1);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for p in &ports {
        while http_call(p.1, "GET", "/readyz", "") != 200 {
            assert!(Instant::now() < deadline, "a peer never got ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    (procs, ports.iter().map(|p| (p.0, p.1)).collect())
}

fn probes_table(shoal: &Path, secs: u64) {
    let backends: Vec<Backend> = (0..4).map(|_| Backend::start("web")).collect();
    let seeds: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "[[backends]]\nid = \"web-{i}\"\naddr = \"127.0.0.1:{}\"\n",
                b.port
            )
        })
        .collect();
    println!("\nprobes: health probe requests per backend per second (1 s interval, 4 backends, 2 learners, {secs} s)");
    println!(
        "{:<8} {:>9} {:>14} {:>14} {:>10}",
        "voters", "learners", "probers = 0", "probers = 3", "saved"
    );
    for voters in [3, 5, 7] {
        let mut rates = Vec::new();
        for k in [0, 3] {
            let tmp = tempfile::tempdir().unwrap();
            let extra = format!("[health]\ninterval = \"1s\"\nprobers = {k}\n{seeds}");
            let (procs, _) = start_peers(shoal, tmp.path(), voters, 2, &extra);
            // Let every probe loop start and the views settle.
            std::thread::sleep(Duration::from_secs(4));
            let before: u64 = backends.iter().map(Backend::probes).sum();
            let t0 = Instant::now();
            std::thread::sleep(Duration::from_secs(secs));
            let after: u64 = backends.iter().map(Backend::probes).sum();
            let rate = (after - before) as f64 / t0.elapsed().as_secs_f64() / 4.0;
            drop(procs);
            rates.push(rate);
        }
        println!(
            "{voters:<8} {:>9} {:>14.2} {:>14.2} {:>9.0}%",
            2,
            rates[0],
            rates[1],
            100.0 * (1.0 - rates[1] / rates[0])
        );
    }
    let unnamed: u64 = backends
        .iter()
        .map(|b| b.probes.lock().unwrap().get("").copied().unwrap_or(0))
        .sum();
    println!("probes without X-Shoal-Peer: {unnamed}");
}

/// GET / on a kept-alive connection; the answer's body (the backend's name).
fn get(c: &mut TcpStream) -> Option<String> {
    c.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    let head = read_head(c, &mut buf)?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())?;
    let mut chunk = [0u8; 1024];
    while buf.len() < len {
        let n = c.read(&mut chunk).ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}

const BUCKET_MS: u64 = 500;

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Backend `id`'s `usable_since` in a peer's `GET /pool`.
fn usable_since(admin: u16, id: &str) -> u64 {
    let mut c = TcpStream::connect(("127.0.0.1", admin)).unwrap();
    c.write_all(b"GET /pool HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    let pool: serde_json::Value = serde_json::from_str(body).unwrap();
    pool["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["id"] == id))
        .and_then(|b| b["usable_since"].as_u64())
        .expect("usable_since of the added backend")
}

fn slow_start_table(shoal: &Path) {
    let olds = [Backend::start("old-0"), Backend::start("old-1")];
    let new = Backend::start("new");
    let seeds: String = olds
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "[[backends]]\nid = \"old-{i}\"\naddr = \"127.0.0.1:{}\"\n",
                b.port
            )
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let extra = format!("[health]\nslow_start = \"10s\"\n{seeds}");
    let (_procs, ports) = start_peers(shoal, tmp.path(), 3, 0, &extra);
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let t0_unix = unix_ms();
    let mut clients = Vec::new();
    for (proxy, _) in &ports {
        let (proxy, stop) = (*proxy, stop.clone());
        clients.push(std::thread::spawn(move || {
            let mut buckets: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
            let mut c = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let Some(name) = get(&mut c) else {
                    c = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
                    continue;
                };
                let at = t0.elapsed().as_millis() as u64 / BUCKET_MS;
                let e = buckets.entry(at).or_default();
                e.0 += 1;
                e.1 += u64::from(name == "new");
            }
            buckets
        }));
    }
    std::thread::sleep(Duration::from_secs(2));
    let body = format!("{{\"id\": \"new\", \"addr\": \"127.0.0.1:{}\"}}", new.port);
    let code = http_call(ports[1].1, "POST", "/pool/backends", &body);
    assert_eq!(code, 201, "adding the backend");
    // The ramp runs from the instant the pool recorded, on every peer: time is counted from it.
    let since = usable_since(ports[1].1, "new");
    let added_ms = since.saturating_sub(t0_unix);
    std::thread::sleep(Duration::from_secs(13));
    stop.store(true, Ordering::Relaxed);
    let per_peer: Vec<BTreeMap<u64, (u64, u64)>> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();

    // Seconds since the add, per bucket, per peer: the share; and the formula's.
    let mut csv = String::from("seconds,expected,peer_a,peer_b,peer_c\n");
    let mut series: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 3];
    let mut expected = Vec::new();
    let first = added_ms / BUCKET_MS;
    let last = per_peer
        .iter()
        .filter_map(|b| b.keys().last())
        .min()
        .copied()
        .unwrap_or(0);
    println!("\nslow_start: the new backend's share of each peer's requests (slow_start = 10s; two others of the same weight)");
    println!(
        "{:>8} {:>9} {:>8} {:>8} {:>8}",
        "seconds", "expected", "peer a", "peer b", "peer c"
    );
    for b in first.saturating_sub(2)..last {
        // The bucket's middle, in seconds since usable_since.
        let t = ((b * BUCKET_MS) as f64 + BUCKET_MS as f64 / 2.0 - added_ms as f64) / 1000.0;
        let f = if t < 0.0 {
            0.0
        } else {
            (t / 10.0).clamp(0.1, 1.0)
        };
        let want = f / (2.0 + f);
        expected.push((t, want));
        let mut row = format!("{t:.1},{want:.4}");
        let mut shown = Vec::new();
        for (i, peer) in per_peer.iter().enumerate() {
            let (all, hit) = peer.get(&b).copied().unwrap_or_default();
            let share = if all == 0 {
                0.0
            } else {
                hit as f64 / all as f64
            };
            series[i].push((t, share));
            row.push_str(&format!(",{share:.4}"));
            shown.push(share);
        }
        csv.push_str(&row);
        csv.push('\n');
        if b % 2 == first % 2 {
            println!(
                "{t:>8.1} {:>8.1}% {:>7.1}% {:>7.1}% {:>7.1}%",
                100.0 * want,
                100.0 * shown[0],
                100.0 * shown[1],
                100.0 * shown[2]
            );
        }
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("slow_start.csv"), csv).unwrap();
    let svg = plot(&series, &expected);
    let svg_path = out.join("slow_start.svg");
    std::fs::write(&svg_path, svg).unwrap();
    let png = out.join("slow_start.png");
    let shot = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=800,480",
        ])
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", svg_path.display()))
        .output();
    match shot {
        Ok(o) if o.status.success() => println!("wrote {}", png.display()),
        _ => println!("chromium not installed: {} only", svg_path.display()),
    }
}

/// The shares as lines (one per peer) over the expected ramp (dashed), seconds on x.
fn plot(series: &[Vec<(f64, f64)>], expected: &[(f64, f64)]) -> String {
    let (w, h, left, right, top, bottom) = (800.0, 480.0, 60.0, 20.0, 40.0, 50.0);
    let (x0, x1) = (
        expected.first().map_or(0.0, |p| p.0),
        expected.last().map_or(1.0, |p| p.0),
    );
    let x = |t: f64| left + (t - x0) / (x1 - x0) * (w - left - right);
    let y = |s: f64| h - bottom - s / 0.4 * (h - top - bottom);
    let line = |pts: &[(f64, f64)]| {
        pts.iter()
            .map(|(t, s)| format!("{:.1},{:.1}", x(*t), y(*s)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"24\" font-size=\"15\">A new backend's share of each peer's requests (health.slow_start = 10s, two others of weight 1)</text>\n"
    );
    for pct in [0, 10, 20, 30, 40] {
        let yy = y(pct as f64 / 100.0);
        out.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{pct}%</text>\n",
            w - right,
            left - 6.0,
            yy + 4.0
        ));
    }
    let mut t = x0.ceil();
    while t <= x1 {
        let xx = x(t);
        out.push_str(&format!(
            "<line x1=\"{xx:.1}\" x2=\"{xx:.1}\" y1=\"{top}\" y2=\"{}\" stroke=\"#eee\"/><text x=\"{xx:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            h - bottom,
            h - bottom + 18.0,
            t.round() as i64
        ));
        t += 1.0;
    }
    out.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">seconds since the backend was added (its usable_since)</text>\n",
        (left + w - right) / 2.0,
        h - 12.0
    ));
    out.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"#888\" stroke-width=\"2\" stroke-dasharray=\"6,4\" points=\"{}\"/>\n",
        line(expected)
    ));
    let colors = ["#d62728", "#1f77b4", "#2ca02c"];
    for (i, s) in series.iter().enumerate() {
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            colors[i],
            line(s)
        ));
        let ly = h - bottom - 90.0 + 18.0 * i as f64;
        out.push_str(&format!(
            "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">peer {}</text>\n",
            w - 170.0,
            w - 145.0,
            colors[i],
            w - 138.0,
            ly + 4.0,
            ["a", "b", "c"][i]
        ));
    }
    let ly = h - bottom - 90.0 + 54.0;
    out.push_str(&format!(
        "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"#888\" stroke-width=\"2\" stroke-dasharray=\"6,4\"/><text x=\"{}\" y=\"{}\">w·max(0.1, t/10 s)</text>\n</svg>\n",
        w - 170.0,
        w - 145.0,
        w - 138.0,
        ly + 4.0
    ));
    out
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let shoal: PathBuf = std::env::var("SHOAL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_shoal")));
    let secs: u64 = std::env::var("FEATURES_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    if wanted("probes") {
        probes_table(&shoal, secs);
    }
    if wanted("slow_start") {
        slow_start_table(&shoal);
    }
}
