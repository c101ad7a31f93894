//! End to end, in one run: Shoal, nginx and HAProxy, each proxying round robin to the same three
//! nginx backends on loopback (keep-alive upstream, one worker or thread each), loaded by the same
//! wrk command. Prints requests/s, p50/p99 latency and requests per proxy CPU-second, as ratios
//! to nginx.
//!
//!     cargo build --profile dist
//!     SHOAL_BIN=target/dist/shoal cargo bench --bench e2e
//!
//! Needs nginx, haproxy and wrk (Debian packages). Env: E2E_SECONDS (default 10),
//! E2E_CONNECTIONS (default 64), E2E_ROUNDS (default 5; medians).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Clock ticks per second for /proc/<pid>/stat.
fn ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().ok();
    out.and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) used so far by `pid` and its children threads/processes.
fn cpu_seconds(pids: &[u32]) -> f64 {
    let mut total = 0.0;
    for pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the command name, which is in parentheses.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let utime: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
                let stime: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
                total += (utime + stime) / ticks();
            }
        }
    }
    total
}

fn children(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output();
    let mut v = vec![pid];
    if let Ok(o) = out {
        v.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok()),
        );
    }
    v
}

fn wait_port(what: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what}: nothing listening on {port} after 10 s (did it start? is the port taken?)");
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nginx(dir: &Path, name: &str, body: &str) -> Proc {
    let conf = dir.join(format!("{name}.conf"));
    std::fs::create_dir_all(dir.join(name)).unwrap();
    let text = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/{name}/nginx.pid;\nerror_log {d}/{name}/error.log crit;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/{name};\n  proxy_temp_path {d}/{name};\n  fastcgi_temp_path {d}/{name};\n  uwsgi_temp_path {d}/{name};\n  scgi_temp_path {d}/{name};\n  keepalive_requests 1000000;\n{body}\n}}\n",
        d = dir.display()
    );
    std::fs::write(&conf, text).unwrap();
    let child = Command::new("nginx")
        .args(["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (apt-get install nginx)");
    Proc(child)
}

/// Peak resident memory (VmHWM) of the processes, in MiB.
fn peak_rss_mib(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .sum::<f64>()
        / 1024.0
}

struct Result {
    name: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    per_cpu_s: f64,
}

fn parse_ms(s: &str) -> f64 {
    let s = s.trim();
    if let Some(v) = s.strip_suffix("us") {
        v.parse::<f64>().unwrap_or(0.0) / 1000.0
    } else if let Some(v) = s.strip_suffix("ms") {
        v.parse().unwrap_or(0.0)
    } else if let Some(v) = s.strip_suffix('s') {
        v.parse::<f64>().unwrap_or(0.0) * 1000.0
    } else {
        0.0
    }
}

/// HTTP/2 clients: `h2load` over cleartext HTTP/2 (prior knowledge), `conns` connections with
/// 100 streams each, for `secs`. h2load gives no percentiles: p50 is its mean, p99 its max.
fn h2load(name: &str, port: u16, pids: &[u32], secs: u64, conns: u64) -> Result {
    let url = format!("http://127.0.0.1:{port}/");
    let _ = Command::new("h2load")
        .args(["-c4", "-m100", "-D", "1", &url])
        .output();
    let cpu0 = cpu_seconds(pids);
    let out = Command::new("h2load")
        .args([
            &format!("-c{conns}"),
            "-m100",
            "-D",
            &secs.to_string(),
            &url,
        ])
        .output()
        .expect("h2load (apt-get install nghttp2-client)");
    let cpu = cpu_seconds(pids) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (mut rps, mut done, mut mean, mut max) = (0.0, 0.0, 0.0, 0.0);
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("finished in") {
            rps = rest
                .split(',')
                .nth(1)
                .and_then(|v| v.trim().strip_suffix(" req/s"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0);
        } else if let Some(rest) = l.strip_prefix("requests:") {
            // "N total, N started, N done, N succeeded, ..."
            done = rest
                .split(',')
                .find_map(|f| f.trim().strip_suffix(" succeeded"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0);
            let failed: u64 = rest
                .split(',')
                .find_map(|f| f.trim().strip_suffix(" failed"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if failed > 0 {
                eprintln!("{name}: {l}");
            }
        } else if let Some(rest) = l.strip_prefix("time for request:") {
            let f: Vec<&str> = rest.split_whitespace().collect();
            max = f.get(1).map(|v| parse_ms(v)).unwrap_or(0.0);
            mean = f.get(2).map(|v| parse_ms(v)).unwrap_or(0.0);
        }
    }
    Result {
        name: name.to_string(),
        rps,
        p50_ms: mean,
        p99_ms: max,
        per_cpu_s: if cpu > 0.0 { done / cpu } else { 0.0 },
    }
}

fn wrk(name: &str, port: u16, path: &str, pids: &[u32], secs: u64, conns: u64) -> Result {
    // Warm up connections and caches.
    let _ = Command::new("wrk")
        .args([
            "-t1",
            "-c16",
            "-d1s",
            &format!("http://127.0.0.1:{port}{path}"),
        ])
        .output();
    let cpu0 = cpu_seconds(pids);
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            &format!("http://127.0.0.1:{port}{path}"),
        ])
        .output()
        .expect("wrk (apt-get install wrk)");
    let cpu = cpu_seconds(pids) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut rps = 0.0;
    let mut p50 = 0.0;
    let mut p99 = 0.0;
    let mut total = 0.0;
    let mut errors = 0u64;
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = l.strip_prefix("50%") {
            p50 = parse_ms(v);
        } else if let Some(v) = l.strip_prefix("99%") {
            p99 = parse_ms(v);
        } else if l.contains("requests in") {
            total = l
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
        } else if l.starts_with("Non-2xx") || l.starts_with("Socket errors") {
            errors += 1;
            eprintln!("{name}: {l}");
        }
    }
    let _ = errors;
    Result {
        name: name.to_string(),
        rps,
        p50_ms: p50,
        p99_ms: p99,
        per_cpu_s: if cpu > 0.0 { total / cpu } else { 0.0 },
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for tool in ["nginx", "haproxy", "wrk"] {
        if Command::new("which")
            .arg(tool)
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            eprintln!("e2e: {tool} not installed (apt-get install nginx haproxy wrk); skipping");
            return;
        }
    }
    let secs = env_u64("E2E_SECONDS", 10);
    let conns = env_u64("E2E_CONNECTIONS", 64);
    let rounds = env_u64("E2E_ROUNDS", 5).max(1);
    let shoal: PathBuf = std::env::var("SHOAL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_shoal")));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // Three backends: nginx, one worker each, a small fixed answer at /, a 1 MiB file at /big.
    let big = dir.join("big.bin");
    std::fs::write(&big, vec![b'x'; 1 << 20]).unwrap();
    let backend_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let _backends: Vec<Proc> = backend_ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            nginx(dir, &format!("backend{i}"), &format!(
                "  server {{ listen 127.0.0.1:{p}; location / {{ return 200 \"hello from backend {i}\\n\"; }} location = /big {{ alias {}; }} }}",
                big.display()
            ))
        })
        .collect();
    for p in &backend_ports {
        wait_port("nginx backend", *p);
    }

    // nginx as the proxy: round robin, keep-alive upstream.
    let nginx_port = free_port();
    let servers: String = backend_ports
        .iter()
        .map(|p| format!("    server 127.0.0.1:{p};\n"))
        .collect();
    let nginx_proxy = nginx(dir, "proxy", &format!(
        "  upstream pool {{\n{servers}    keepalive 128;\n  }}\n  server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://pool; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }}"
    ));
    wait_port("nginx proxy", nginx_port);
    // The same proxy for HTTP/2 clients (cleartext, prior knowledge).
    let nginx_h2_port = free_port();
    let nginx_h2 = nginx(dir, "proxy-h2", &format!(
        "  upstream pool {{\n{servers}    keepalive 128;\n  }}\n  http2_max_concurrent_streams 128;\n  server {{ listen 127.0.0.1:{nginx_h2_port} http2; location / {{ proxy_pass http://pool; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }}"
    ));
    wait_port("nginx h2 proxy", nginx_h2_port);

    // HAProxy: one thread, round robin, connection reuse (and an h2c frontend).
    let haproxy_port = free_port();
    let haproxy_h2_port = free_port();
    let hcfg = dir.join("haproxy.cfg");
    let hservers: String = backend_ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("  server b{i} 127.0.0.1:{p}\n"))
        .collect();
    std::fs::write(
        &hcfg,
        format!(
            "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n  option forwardfor\nfrontend fe\n  bind 127.0.0.1:{haproxy_port}\n  default_backend be\nfrontend fe2\n  bind 127.0.0.1:{haproxy_h2_port} proto h2\n  default_backend be\nbackend be\n  balance roundrobin\n{hservers}"
        ),
    )
    .unwrap();
    let haproxy = Proc(
        Command::new("haproxy")
            .args(["-f", hcfg.to_str().unwrap(), "-db"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port("haproxy", haproxy_port);

    // Shoal: one worker thread, a one-node cluster.
    let shoal_port = free_port();
    let scfg = dir.join("shoal.toml");
    let sbackends: String = backend_ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("[[backends]]\nid = \"b{i}\"\naddr = \"127.0.0.1:{p}\"\n"))
        .collect();
    std::fs::write(
        &scfg,
        format!(
            "[node]\nid = \"bench\"\ndata_dir = \"{}\"\n[proxy]\nlisten = [\"127.0.0.1:{shoal_port}\"]\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:{}\"\n[cluster]\nlisten = \"127.0.0.1:{}\"\n[log]\nlevel = \"warn\"\n{sbackends}",
            dir.join("shoal-data").display(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let shoal_proc = Proc(
        Command::new(&shoal)
            .args(["run", "--config", scfg.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port("shoal", shoal_port);
    std::thread::sleep(Duration::from_millis(500));

    let targets: Vec<(&str, u16, Vec<u32>)> = vec![
        ("nginx", nginx_port, children(nginx_proxy.0.id())),
        ("haproxy", haproxy_port, children(haproxy.0.id())),
        ("shoal", shoal_port, vec![shoal_proc.0.id()]),
    ];
    println!(
        "e2e: wrk -t1 -c{conns} -d{secs}s, 3 nginx backends, median of {rounds} interleaved rounds per proxy; shoal binary {}",
        shoal.display()
    );
    table(
        "small answers, keep-alive",
        "/",
        None,
        &targets,
        (secs, conns, rounds),
    );
    table(
        "1 MiB responses, keep-alive",
        "/big",
        Some(1 << 20),
        &targets,
        (secs, conns.min(16), rounds),
    );
    let have_h2load = Command::new("h2load")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have_h2load {
        let h2_targets: Vec<(&str, u16, Vec<u32>)> = vec![
            ("nginx", nginx_h2_port, children(nginx_h2.0.id())),
            ("haproxy", haproxy_h2_port, targets[1].2.clone()),
            ("shoal", targets[2].1, targets[2].2.clone()),
        ];
        let h2_conns = 4;
        table_of(
            "HTTP/2 clients (h2load, h2c, 4 connections x 100 streams; p50 = mean, p99 = max)",
            "/",
            None,
            &h2_targets,
            rounds,
            h2_conns,
            |name, port, pids| h2load(name, port, pids, secs, h2_conns),
        );
    } else {
        eprintln!("e2e: h2load not installed (apt-get install nghttp2-client); no HTTP/2 table");
    }
}

/// One comparison: every proxy on `path`, in interleaved rounds; medians, and ratios to nginx
/// and to the better of nginx and HAProxy. With `bytes`, throughput is also given in MiB per
/// CPU-second (each response is that long).
fn table(
    title: &str,
    path: &str,
    bytes: Option<u64>,
    targets: &[(&str, u16, Vec<u32>)],
    (secs, conns, rounds): (u64, u64, u64),
) {
    let run = |name: &str, port: u16, pids: &[u32]| wrk(name, port, path, pids, secs, conns);
    table_of(title, path, bytes, targets, rounds, conns, run);
}

/// `table` with any load generator (`run` measures one proxy once).
fn table_of(
    title: &str,
    path: &str,
    bytes: Option<u64>,
    targets: &[(&str, u16, Vec<u32>)],
    rounds: u64,
    conns: u64,
    run: impl Fn(&str, u16, &[u32]) -> Result,
) {
    // Rounds interleave the proxies (nginx, haproxy, shoal, nginx, ...) so that drift in the
    // machine's state hits all alike; each figure is the median of its rounds.
    let mut runs: Vec<Vec<Result>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, (name, port, pids)) in targets.iter().enumerate() {
            runs[i].push(run(name, *port, pids));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let results: Vec<Result> = runs
        .into_iter()
        .zip(targets)
        .map(|(rs, (name, _, _))| Result {
            name: name.to_string(),
            rps: median(rs.iter().map(|r| r.rps).collect()),
            p50_ms: median(rs.iter().map(|r| r.p50_ms).collect()),
            p99_ms: median(rs.iter().map(|r| r.p99_ms).collect()),
            per_cpu_s: median(rs.iter().map(|r| r.per_cpu_s).collect()),
        })
        .collect();
    let rss: Vec<f64> = targets
        .iter()
        .map(|(_, _, pids)| peak_rss_mib(pids))
        .collect();
    let base = results
        .iter()
        .find(|r| r.name == "nginx")
        .map(|r| (r.rps, r.p99_ms, r.per_cpu_s))
        .unwrap();
    let best = results
        .iter()
        .filter(|r| r.name != "shoal")
        .map(|r| r.per_cpu_s)
        .fold(0.0, f64::max);
    println!("\n{title} ({path}, -c{conns})");
    println!(
        "{:<8} {:>10} {:>9} {:>9} {:>12} {:>8} {:>8} {:>10} {:>10} {:>9}{}",
        "proxy",
        "req/s",
        "p50 ms",
        "p99 ms",
        "req/CPU-s",
        "rps/ng",
        "p99/ng",
        "cpu-eff/ng",
        "cpu/best",
        "peak MiB",
        if bytes.is_some() { "  MiB/CPU-s" } else { "" }
    );
    for (r, mib) in results.iter().zip(&rss) {
        let per_byte = bytes
            .map(|b| format!("  {:>10.0}", r.per_cpu_s * b as f64 / (1 << 20) as f64))
            .unwrap_or_default();
        println!(
            "{:<8} {:>10.0} {:>9.3} {:>9.3} {:>12.0} {:>8.2} {:>8.2} {:>10.2} {:>10.2} {:>9.1}{per_byte}",
            r.name,
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.per_cpu_s,
            r.rps / base.0,
            r.p99_ms / base.1,
            r.per_cpu_s / base.2,
            r.per_cpu_s / best,
            mib
        );
    }
}
