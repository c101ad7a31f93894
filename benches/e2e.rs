//! End to end, in one run: Shoal, nginx and HAProxy, each proxying round robin to the same three
//! nginx backends on loopback (keep-alive upstream, one worker or thread each), loaded by the same
//! client. Tables: idle keep-alive connections (memory each), small answers, 1 MiB responses,
//! HTTP/2 clients (h2load), TLS handshakes (resumed by wrk, and full ones from `openssl s_time
//! -new`) and keep-alive over TLS, and a pool change under load (10 changes per second), and
//! small answers under consistent hashing (`hash`: nginx `hash $request_uri consistent`,
//! HAProxy `balance uri` + `hash-type consistent`, Shoal `consistent_hash` on the path). Each
//! gives requests/s, p50/p99 latency and requests per proxy CPU-second, as ratios to nginx and to
//! the better of nginx and HAProxy, and where each proxy's CPU went: the kernel's share of it
//! (`sys %`) and its context switches per request (`cs/req`; the times it slept and was woken).
//!
//!     cargo build --profile dist
//!     SHOAL_BIN=target/dist/shoal cargo bench --bench e2e
//!
//! Needs nginx, haproxy and wrk (h2load from nghttp2-client for the HTTP/2 table, openssl for
//! full TLS handshakes; Debian packages). Env: E2E_SECONDS (default 10), E2E_CONNECTIONS
//! (default 64), E2E_ROUNDS (default 5; medians), E2E_IDLE (default 10,000), E2E_TABLES (default
//! all: small,hash,close,big,h2,tls,idle,change,abuse,services; `close`: small answers with a new
//! connection per request). `services`: Shoal alone, one service
//! against 1,000. `abuse`: eight clients each sending part of a 2 MB
//! upload to a backend that answers at once and waits for the rest, then resetting, while wrk
//! runs beside them: every proxy's peak and settled memory and descriptors, and wrk's requests
//! per proxy CPU-second. E2E_FLAME=DIR: a flame graph of Shoal per table (perf and inferno).

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, http_call, shoal_run, wait_port, Proc};

/// Whether table `name` is to run: E2E_TABLES lists them (small, hash, close, big, h2, tls, idle,
/// change, abuse, services; default all).
fn wanted(name: &str) -> bool {
    std::env::var("E2E_TABLES").map_or(true, |v| v.split(',').any(|t| t.trim() == name))
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Clock ticks per second for /proc/<pid>/stat.
fn ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    }
}

/// What a set of processes has used so far: CPU seconds (user and system), the system part,
/// and context switches (voluntary and not, every thread).
#[derive(Clone, Copy, Default)]
struct Usage {
    cpu: f64,
    sys: f64,
    switches: f64,
}

impl std::ops::Sub for Usage {
    type Output = Usage;
    fn sub(self, o: Usage) -> Usage {
        Usage {
            cpu: self.cpu - o.cpu,
            sys: self.sys - o.sys,
            switches: self.switches - o.switches,
        }
    }
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage {
            cpu: self.cpu + o.cpu,
            sys: self.sys + o.sys,
            switches: self.switches + o.switches,
        }
    }
}

/// `/proc/<pid>/stat`'s fields after the command name (which is in parentheses), from `state`.
fn stat_fields(pid: u32) -> Vec<f64> {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Vec::new();
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Vec::new();
    };
    rest.split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect()
}

/// Context switches of every thread of `pid`, voluntary and not.
fn switches(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
                .map(|key| status_value(&s, key).unwrap_or(0.0))
        })
        .sum()
}

/// What `pid` (all its threads) has used so far; `exited` adds what its waited-for children
/// used (an nginx master's reloaded workers).
fn usage_of(pid: u32, exited: bool) -> Usage {
    let f = stat_fields(pid);
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0) / ticks();
    // utime, stime, cutime, cstime are fields 14 - 17 of stat: 11 - 14 after the name.
    let (user, sys) = if exited {
        (at(11) + at(13), at(12) + at(14))
    } else {
        (at(11), at(12))
    };
    Usage {
        cpu: user + sys,
        sys,
        switches: switches(pid),
    }
}

/// What the processes `pids` have used so far, together.
fn usage(pids: &[u32]) -> Usage {
    pids.iter()
        .fold(Usage::default(), |u, p| u + usage_of(*p, false))
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

fn nginx(dir: &Path, name: &str, body: &str) -> Proc {
    nginx_with(dir, name, body, false)
}

/// The config of an nginx instance: one worker, with or without a master process (a master is
/// what reloads on SIGHUP).
fn nginx_conf(dir: &Path, name: &str, body: &str, master: bool) -> PathBuf {
    let conf = dir.join(format!("{name}.conf"));
    std::fs::create_dir_all(dir.join(name)).unwrap();
    let text = format!(
        "daemon off;\nmaster_process {m};\nworker_processes 1;\nworker_rlimit_nofile {nofile};\npid {d}/{name}/nginx.pid;\nerror_log {d}/{name}/error.log crit;\nevents {{ worker_connections {conns}; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/{name};\n  proxy_temp_path {d}/{name};\n  fastcgi_temp_path {d}/{name};\n  uwsgi_temp_path {d}/{name};\n  scgi_temp_path {d}/{name};\n  keepalive_requests 1000000;\n{body}\n}}\n",
        d = dir.display(),
        m = if master { "on" } else { "off" },
        nofile = nofile_limit(),
        conns = nofile_limit() - 1000,
    );
    std::fs::write(&conf, text).unwrap();
    conf
}

fn nginx_with(dir: &Path, name: &str, body: &str, master: bool) -> Proc {
    let conf = nginx_conf(dir, name, body, master);
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
    status_mib(pids, "VmHWM:")
}

/// The number after `key` (its name and colon) in the text of a /proc status file.
fn status_value(status: &str, key: &str) -> Option<f64> {
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A memory field of /proc/PID/status (in kB there), summed over the processes, in MiB.
fn status_mib(pids: &[u32], field: &str) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| status_value(&s, field))
        .sum::<f64>()
        / 1024.0
}

/// This process's hard limit on open files (what every proxy started here may raise its own to).
fn nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        r.rlim_max
    } else {
        4096
    }
}

/// Resident memory now (VmRSS) of the processes, in MiB.
fn rss_mib(pids: &[u32]) -> f64 {
    status_mib(pids, "VmRSS:")
}

/// What a master process and every worker it ever had used: its own time, the time of workers
/// it has reaped (cutime, cstime) and that of the live ones. What nginx costs across reloads,
/// which replace its workers. Context switches are not given (NaN): a reaped worker's are lost.
fn usage_tree(master: u32) -> Usage {
    let used = children(master)
        .into_iter()
        .filter(|p| *p != master)
        .fold(usage_of(master, true), |u, p| u + usage_of(p, false));
    Usage {
        switches: f64::NAN,
        ..used
    }
}

/// Open `n` client connections to `port`, one keep-alive request answered on each, and leave
/// them idle. Returns the connections and how many got a 200.
fn open_idle(port: u16, n: usize) -> (Vec<std::net::TcpStream>, usize) {
    use std::io::{Read, Write};
    let mut conns = Vec::with_capacity(n);
    let mut ok = 0;
    let mut buf = [0u8; 4096];
    for _ in 0..n {
        let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            continue;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        if c.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            .is_ok()
        {
            if let Ok(k) = c.read(&mut buf) {
                if buf[..k].starts_with(b"HTTP/1.1 200") {
                    ok += 1;
                }
            }
        }
        conns.push(c);
    }
    (conns, ok)
}

/// One HTTP/1.1 request on a new connection (`Connection: close`); the status code.
/// One HAProxy runtime API command; true when it answered nothing but a blank line (success).
fn haproxy_cmd(sock: &Path, cmd: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = std::os::unix::net::UnixStream::connect(sock) else {
        return false;
    };
    let mut out = String::new();
    c.write_all(format!("{cmd}\n").as_bytes()).is_ok()
        && c.read_to_string(&mut out).is_ok()
        && out.trim().is_empty()
}

/// `change(i)` every 100 ms (10 per second) until `stop`; how many of them succeeded, of how many.
fn changer(
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    change: impl Fn(u64) -> bool + Send + 'static,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let (mut ok, mut all) = (0, 0);
        let start = Instant::now();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            all += 1;
            ok += u64::from(change(all));
            let next = start + Duration::from_millis(100 * all);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        (ok, all)
    })
}

struct Result {
    name: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    per_cpu_s: f64,
    /// The system (kernel) part of the proxy's CPU time.
    sys_share: f64,
    /// The proxy's context switches per request.
    switches: f64,
}

impl Result {
    /// `done` requests (streams, connections) served at `rps`, the proxy using `used` meanwhile.
    fn of(name: &str, rps: f64, (p50_ms, p99_ms): (f64, f64), done: f64, used: Usage) -> Result {
        let per = |x: f64, n: f64| if n > 0.0 { x / n } else { 0.0 };
        Result {
            name: name.to_string(),
            rps,
            p50_ms,
            p99_ms,
            per_cpu_s: per(done, used.cpu),
            sys_share: per(used.sys, used.cpu),
            switches: per(used.switches, done),
        }
    }
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
    let used0 = usage(pids);
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
    let used = usage(pids) - used0;
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
    Result::of(name, rps, (mean, max), done, used)
}

fn wrk(name: &str, port: u16, path: &str, pids: &[u32], secs: u64, conns: u64) -> Result {
    let url = format!("http://127.0.0.1:{port}{path}");
    wrk_with(name, &url, &[], &|| usage(pids), secs, conns)
}

/// `wrk_with` on `/` over `scheme` with `extra` arguments, as a `table_of` load.
fn wrk_load(
    scheme: &'static str,
    extra: &'static [&'static str],
    secs: u64,
    conns: u64,
) -> impl Fn(&str, u16, &[u32]) -> Result {
    move |name, port, pids| {
        let url = format!("{scheme}://127.0.0.1:{port}/");
        wrk_with(name, &url, extra, &|| usage(pids), secs, conns)
    }
}

/// TLS full handshakes: `clients` `openssl s_time -new` processes at once, each opening one
/// connection after another with a new session every time (no resumption) and fetching `/` over
/// HTTP/1.0, for `secs`. s_time gives no latencies: p50 and p99 are 0.
fn s_time(name: &str, port: u16, pids: &[u32], secs: u64, clients: u64) -> Result {
    let target = format!("127.0.0.1:{port}");
    let time = secs.to_string();
    let used0 = usage(pids);
    let start = Instant::now();
    let children: Vec<_> = (0..clients)
        .map(|_| {
            Command::new("openssl")
                .args([
                    "s_time", "-connect", &target, "-new", "-time", &time, "-www", "/",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("openssl s_time")
        })
        .collect();
    let mut done = 0.0;
    for child in children {
        let out = child.wait_with_output().expect("openssl s_time");
        // "N connections in T real seconds, B bytes read per connection"
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.contains("real seconds") {
                done += line
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let used = usage(pids) - used0;
    Result::of(name, done / elapsed, (0.0, 0.0), done, used)
}

/// wrk on `url` with `extra` arguments (e.g. a header), what the proxy used read by `used`.
fn wrk_with(
    name: &str,
    url: &str,
    extra: &[&str],
    used: &dyn Fn() -> Usage,
    secs: u64,
    conns: u64,
) -> Result {
    // Warm up connections and caches.
    let _ = Command::new("wrk")
        .args(["-t1", "-c16", "-d1s"])
        .args(extra)
        .arg(url)
        .output();
    let used0 = used();
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
        ])
        .args(extra)
        .arg(url)
        .output()
        .expect("wrk (apt-get install wrk)");
    let used = used() - used0;
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
    Result::of(name, rps, (p50, p99), total, used)
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
    // Idle connections to hold: 10,000, or what HAProxy (two descriptors reserved per
    // connection) can hold under this machine's open-file limit.
    let idle = (env_u64("E2E_IDLE", 10_000)).min(nofile_limit().saturating_sub(200) / 2) as usize;

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

    // One certificate (ECDSA P-256, for "localhost") for every proxy's TLS listener.
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.join("proxy.pem");
    let key = dir.join("proxy-key.pem");
    let combined = dir.join("proxy-combined.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    std::fs::write(
        &combined,
        format!("{}{}", ck.cert.pem(), ck.key_pair.serialize_pem()),
    )
    .unwrap();

    // nginx as the proxy: round robin, keep-alive upstream; plain and TLS listeners.
    let nginx_port = free_port();
    let nginx_tls_port = free_port();
    let servers: String = backend_ports
        .iter()
        .map(|p| format!("    server 127.0.0.1:{p};\n"))
        .collect();
    let location = "location / { proxy_pass http://pool; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }";
    // nginx's TLS listener with TLS 1.3 on (the default from nginx 1.23.4).
    let nginx_tls13_port = free_port();
    // Consistent hashing on the request target, on a port of its own.
    let nginx_hash_port = free_port();
    let hash_location = location.replace("http://pool", "http://hashed");
    let nginx_proxy = nginx(dir, "proxy", &format!(
        "  upstream pool {{\n{servers}    keepalive 128;\n  }}\n  upstream hashed {{\n    hash $request_uri consistent;\n{servers}    keepalive 128;\n  }}\n  server {{ listen 127.0.0.1:{nginx_port}; {location} }}\n  server {{ listen 127.0.0.1:{nginx_hash_port}; {hash_location} }}\n  server {{ listen 127.0.0.1:{nginx_tls_port} ssl; ssl_certificate {}; ssl_certificate_key {}; {location} }}\n  server {{ listen 127.0.0.1:{nginx_tls13_port} ssl; ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate {}; ssl_certificate_key {}; {location} }}",
        cert.display(),
        key.display(),
        cert.display(),
        key.display()
    ));
    wait_port("nginx proxy", nginx_port);
    // The same proxy for HTTP/2 clients (cleartext, prior knowledge).
    let nginx_h2_port = free_port();
    let nginx_h2 = nginx(dir, "proxy-h2", &format!(
        "  upstream pool {{\n{servers}    keepalive 128;\n  }}\n  http2_max_concurrent_streams 128;\n  server {{ listen 127.0.0.1:{nginx_h2_port} http2; location / {{ proxy_pass http://pool; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }}"
    ));
    wait_port("nginx h2 proxy", nginx_h2_port);

    // HAProxy: one thread, round robin, connection reuse (and h2c and TLS frontends, and the
    // runtime API on a socket).
    let haproxy_port = free_port();
    let haproxy_h2_port = free_port();
    let haproxy_tls_port = free_port();
    let haproxy_hash_port = free_port();
    let haproxy_sock = dir.join("haproxy.sock");
    let hcfg = dir.join("haproxy.cfg");
    let hservers: String = backend_ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("  server b{i} 127.0.0.1:{p}\n"))
        .collect();
    // Room for the idle table's connections, and never less than a thousand where the open-file
    // limit allows (HAProxy sizes its descriptors from it; HTTP/2's 400 streams each take a
    // backend connection).
    let haproxy_maxconn =
        (idle as u64 + 50).max((nofile_limit() / 2).saturating_sub(100).min(1000));
    std::fs::write(
        &hcfg,
        format!(
            "global\n  nbthread 1\n  maxconn {}\n  stats socket {} mode 600 level admin\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n  option forwardfor\nfrontend fe\n  bind 127.0.0.1:{haproxy_port}\n  default_backend be\nfrontend fe2\n  bind 127.0.0.1:{haproxy_h2_port} proto h2\n  default_backend be\nfrontend fe3\n  bind 127.0.0.1:{haproxy_tls_port} ssl crt {}\n  default_backend be\nfrontend fe4\n  bind 127.0.0.1:{haproxy_hash_port}\n  default_backend beh\nbackend be\n  balance roundrobin\n{hservers}backend beh\n  balance uri\n  hash-type consistent\n{hservers}",
            haproxy_maxconn,
            haproxy_sock.display(),
            combined.display()
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

    // Shoal: one worker thread, a one-node cluster; plain and TLS listeners.
    let shoal_port = free_port();
    let shoal_tls_port = free_port();
    let shoal_admin = free_port();
    let scfg = dir.join("shoal.toml");
    let sbackends: String = backend_ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("[[backends]]\nid = \"b{i}\"\naddr = \"127.0.0.1:{p}\"\n"))
        .collect();
    std::fs::write(
        &scfg,
        format!(
            "[node]\nid = \"bench\"\ndata_dir = \"{}\"\n[proxy]\nlisten = [\"127.0.0.1:{shoal_port}\"]\nworkers = 1\nmax_connections = {}\n[proxy.tls]\nlisten = [\"127.0.0.1:{shoal_tls_port}\"]\ncert = \"{}\"\nkey = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{shoal_admin}\"\n[cluster]\nlisten = \"127.0.0.1:{}\"\n[log]\nlevel = \"warn\"\n{sbackends}",
            dir.join("shoal-data").display(),
            idle + 50,
            cert.display(),
            key.display(),
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
    // A second Shoal for consistent hashing (the algorithm is one per cluster).
    let shoal_hash = wanted("hash").then(|| {
        let port = free_port();
        let p = shoal_run(
            &shoal,
            dir,
            "shoal-hash",
            &format!(
                "[node]\nid = \"bench-hash\"\ndata_dir = \"{}\"\n[proxy]\nlisten = [\"127.0.0.1:{port}\"]\nworkers = 1\n[balance]\nalgorithm = \"consistent_hash\"\nhash_key = \"path\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n[cluster]\nlisten = \"127.0.0.1:{}\"\n[log]\nlevel = \"warn\"\n{sbackends}",
                dir.join("shoal-hash-data").display(),
                free_port(),
                free_port()
            ),
        );
        wait_port("shoal (hashing)", port);
        (p, port)
    });
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
    if wanted("idle") {
        // 10,000 idle keep-alive client connections, first, while every proxy is fresh (memory
        // freed after a load stays resident and would hide what new connections take): resident
        // memory before, with them open, and the difference per connection. nginx allocates its
        // connection table at start, so its difference is what each connection costs beyond that.
        println!("\nidle keep-alive client connections ({idle}, one request answered on each)");
        println!(
            "{:<8} {:>10} {:>14} {:>14} {:>12}",
            "proxy", "answered", "RSS before MiB", "RSS with MiB", "KiB / conn"
        );
        for (name, port, pids) in &targets {
            let before = rss_mib(pids);
            let (open, ok) = open_idle(*port, idle);
            std::thread::sleep(Duration::from_millis(500));
            let with = rss_mib(pids);
            drop(open);
            println!(
                "{name:<8} {ok:>10} {before:>14.1} {with:>14.1} {:>12.2}",
                (with - before) * 1024.0 / idle as f64
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    if wanted("small") {
        table(
            "small answers, keep-alive",
            "/",
            None,
            &targets,
            (secs, conns, rounds),
        );
    }
    if let Some((p, port)) = &shoal_hash {
        let hash_targets: Vec<(&str, u16, Vec<u32>)> = vec![
            ("nginx", nginx_hash_port, targets[0].2.clone()),
            ("haproxy", haproxy_hash_port, targets[1].2.clone()),
            ("shoal", *port, vec![p.0.id()]),
        ];
        table(
            "small answers, consistent hashing on the path",
            "/",
            None,
            &hash_targets,
            (secs, conns, rounds),
        );
    }
    if wanted("close") {
        // Plain HTTP/1.1 with a new connection per request (`Connection: close`): accepting,
        // answering and closing cost what keep-alive spares.
        table_of(
            "small answers, a new connection per request (Connection: close)",
            "/",
            None,
            &targets,
            rounds,
            conns,
            wrk_load("http", &["-H", "Connection: close"], secs, conns),
        );
    }
    if wanted("big") {
        table(
            "1 MiB responses, keep-alive",
            "/big",
            Some(1 << 20),
            &targets,
            (secs, conns.min(16), rounds),
        );
    }
    if wanted("h2") {
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
            eprintln!(
                "e2e: h2load not installed (apt-get install nghttp2-client); no HTTP/2 table"
            );
        }
    }
    if wanted("tls") {
        // TLS termination: the same certificate everywhere, each proxy's own TLS defaults (rustls;
        // OpenSSL for nginx and HAProxy). With `Connection: close` every request is a handshake
        // on a new connection; wrk resumes its session on each. nginx before 1.23.4 leaves TLS
        // 1.3 off by default, so `nginx` resumes TLS 1.2 sessions (no key exchange at all) where
        // HAProxy and Shoal resume TLS 1.3 ones (an x25519 exchange each, both sides);
        // `nginx-1.3` is the same nginx with TLS 1.3 on, as nginx 1.23.4 and later have it.
        let tls_targets: Vec<(&str, u16, Vec<u32>)> = vec![
            ("nginx", nginx_tls_port, targets[0].2.clone()),
            ("nginx-1.3", nginx_tls13_port, targets[0].2.clone()),
            ("haproxy", haproxy_tls_port, targets[1].2.clone()),
            ("shoal", shoal_tls_port, targets[2].2.clone()),
        ];
        table_of(
            "TLS handshakes (a new connection per request, each resuming wrk's session; req/CPU-s = handshakes per CPU-second)",
            "/",
            None,
            &tls_targets,
            rounds,
            conns,
            wrk_load("https", &["-H", "Connection: close"], secs, conns),
        );
        // Full handshakes, no session resumed: what a first visit costs (an ECDHE exchange and a
        // signature each, for every proxy and version).
        table_of(
            "TLS full handshakes (8 `openssl s_time -new`, no resumption, HTTP/1.0 GET /; p50/p99 not measured)",
            "/",
            None,
            &tls_targets,
            rounds,
            8,
            |name: &str, port: u16, pids: &[u32]| s_time(name, port, pids, secs, 8),
        );
        table_of(
            "keep-alive requests over TLS",
            "/",
            None,
            &tls_targets,
            rounds,
            conns,
            wrk_load("https", &[], secs, conns),
        );
    }
    if wanted("abuse") {
        abuse_table(dir, &shoal, secs);
    }
    if wanted("services") {
        services_table(dir, &shoal, &backend_ports, (secs, conns, rounds));
    }
    if wanted("change") {
        // A pool change under load: 10 weight changes per second while wrk runs. nginx has no
        // runtime API in its open-source build: its way is a new config and a reload (SIGHUP to a
        // master process, which starts a new worker); HAProxy's runtime API sets the weight; Shoal
        // commits each change through its (one-node) Paxos register via the admin API.
        let reload_port = free_port();
        let reload_body = |w: u64| {
            let servers: String = backend_ports
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    format!(
                        "    server 127.0.0.1:{p} weight={};\n",
                        if i == 2 { w } else { 1 }
                    )
                })
                .collect();
            format!(
                "  upstream pool {{\n{servers}    keepalive 128;\n  }}\n  server {{ listen 127.0.0.1:{reload_port}; {location} }}"
            )
        };
        let nginx_reload = nginx_with(dir, "proxy-reload", &reload_body(1), true);
        wait_port("nginx reload proxy", reload_port);
        std::thread::sleep(Duration::from_millis(300));
        let master = nginx_reload.0.id();
        let change_targets: Vec<(&str, u16, Vec<u32>)> = vec![
            ("nginx", reload_port, vec![master]),
            ("haproxy", haproxy_port, targets[1].2.clone()),
            ("shoal", shoal_port, targets[2].2.clone()),
        ];
        let applied = std::sync::Mutex::new(Vec::<String>::new());
        table_of(
            "a pool change under load (10 weight changes per second)",
            "/",
            None,
            &change_targets,
            rounds,
            conns,
            |name, port, pids| {
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let weight = |i: u64| 1 + i % 2;
                let handle = match name {
                    "nginx" => {
                        let (dir, body) = (dir.to_path_buf(), reload_body);
                        let bodies: Vec<String> = (1..=2).map(body).collect();
                        changer(stop.clone(), move |i| {
                            nginx_conf(
                                &dir,
                                "proxy-reload",
                                &bodies[(weight(i) - 1) as usize],
                                true,
                            );
                            Command::new("kill")
                                .args(["-HUP", &master.to_string()])
                                .status()
                                .is_ok_and(|s| s.success())
                        })
                    }
                    "haproxy" => {
                        let sock = haproxy_sock.clone();
                        changer(stop.clone(), move |i| {
                            haproxy_cmd(&sock, &format!("set weight be/b2 {}", weight(i)))
                        })
                    }
                    _ => changer(stop.clone(), move |i| {
                        let body = format!("{{\"weight\": {}}}", weight(i));
                        http_call(shoal_admin, "PUT", "/pool/backends/b2", &body) == 200
                    }),
                };
                let url = format!("http://127.0.0.1:{port}/");
                let used = |pids: &[u32]| {
                    if name == "nginx" {
                        usage_tree(pids[0])
                    } else {
                        usage(pids)
                    }
                };
                let r = wrk_with(name, &url, &[], &|| used(pids), secs, conns);
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let (ok, all) = handle.join().unwrap();
                applied
                    .lock()
                    .unwrap()
                    .push(format!("{name}: {ok} of {all} changes applied"));
                r
            },
        );
        for line in applied.lock().unwrap().iter() {
            println!("  {line}");
        }
    }
}

/// One comparison: every proxy on `path`, in interleaved rounds; medians, and ratios to nginx
/// and to the better of nginx and HAProxy; the kernel's share of each proxy's CPU and its
/// context switches per request. With `bytes`, throughput is also given in MiB per
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
    if let Ok(out) = std::env::var("E2E_FLAME") {
        if let Some((name, port, pids)) = targets.iter().find(|t| t.0 == "shoal") {
            flame(Path::new(&out), &slug(title), pids, || {
                run(name, *port, pids);
            });
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
            sys_share: median(rs.iter().map(|r| r.sys_share).collect()),
            switches: median(rs.iter().map(|r| r.switches).collect()),
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
        "{:<8} {:>10} {:>9} {:>9} {:>12} {:>8} {:>8} {:>10} {:>10} {:>9} {:>6} {:>7}{}",
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
        "sys %",
        "cs/req",
        if bytes.is_some() { "  MiB/CPU-s" } else { "" }
    );
    for (r, mib) in results.iter().zip(&rss) {
        let per_byte = bytes
            .map(|b| format!("  {:>10.0}", r.per_cpu_s * b as f64 / (1 << 20) as f64))
            .unwrap_or_default();
        println!(
            "{:<8} {:>10.0} {:>9.3} {:>9.3} {:>12.0} {:>8.2} {:>8.2} {:>10.2} {:>10.2} {:>9.1} {:>6.1} {:>7.3}{per_byte}",
            r.name,
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.per_cpu_s,
            r.rps / base.0,
            // No latency measured (s_time): 0, not 0/0.
            if base.1 > 0.0 { r.p99_ms / base.1 } else { 0.0 },
            r.per_cpu_s / base.2,
            r.per_cpu_s / best,
            mib,
            r.sys_share * 100.0,
            r.switches
        );
    }
}

/// A short file name for a table, from its title.
fn slug(title: &str) -> String {
    let named = [
        ("small answers, keep-alive", "small"),
        ("small answers, consistent", "hash"),
        ("small answers, a new connection", "close"),
        ("1 MiB", "big"),
        ("HTTP/2", "h2"),
        ("TLS handshakes", "tls"),
        ("TLS full handshakes", "tls-full"),
        ("keep-alive requests over TLS", "tls-keepalive"),
        ("a pool change", "change"),
    ];
    named
        .iter()
        .find(|(p, _)| title.starts_with(p))
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| {
            title
                .split(|c: char| !c.is_ascii_alphanumeric())
                .filter(|w| !w.is_empty())
                .take(3)
                .collect::<Vec<_>>()
                .join("-")
                .to_lowercase()
        })
}

/// With `E2E_FLAME=DIR`: one more run of `load` with Shoal under `perf record` (DWARF call
/// graphs), folded by inferno into `DIR/flame-NAME.svg` (`cargo install inferno`); with
/// `E2E_FLAME_KEEP` the perf data stays in the temporary directory.
fn flame(dir: &Path, name: &str, pids: &[u32], load: impl FnOnce()) {
    std::fs::create_dir_all(dir).unwrap();
    let data = std::env::temp_dir().join(format!("shoal-{name}.perf"));
    let list: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
    let perf = Command::new("perf")
        .args([
            "record",
            "-q",
            "-F",
            "499",
            "--call-graph",
            "dwarf,16384",
            "-o",
        ])
        .arg(&data)
        .args(["-p", &list.join(",")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut perf) = perf else {
        // The table's rounds are measured already: a run with nothing recording it is no use.
        eprintln!("e2e: perf not installed (apt-get install linux-perf); no flame graph");
        return;
    };
    std::thread::sleep(Duration::from_millis(300));
    load();
    let _ = Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let _ = perf.wait();
    let svg = dir.join(format!("flame-{name}.svg"));
    let folded = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "perf script -i '{}' 2>/dev/null | inferno-collapse-perf | inferno-flamegraph --title 'Shoal: {name}' > '{}'",
            data.display(),
            svg.display()
        ))
        .status();
    if std::env::var_os("E2E_FLAME_KEEP").is_none() {
        let _ = std::fs::remove_file(&data);
    }
    match folded {
        Ok(s) if s.success() => println!("e2e: flame graph {}", svg.display()),
        _ => {
            // The shell made the file before the pipe failed: leave none rather than an empty one.
            let _ = std::fs::remove_file(&svg);
            eprintln!("e2e: no flame graph for {name} (perf script or inferno failed)")
        }
    }
}

/// Small answers through a Shoal with one service against one with 1,000 (each with the three
/// backends; exact hosts, wildcards and path prefixes), in interleaved rounds: what routing by a
/// table costs as services grow. The request names one of the 1,000 by Host; the one-service
/// Shoal sends the same request to `default`.
fn services_table(
    dir: &Path,
    shoal: &Path,
    backend_ports: &[u16],
    (secs, conns, rounds): (u64, u64, u64),
) {
    let backends = |indent: &str| -> String {
        backend_ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!("[[{indent}backends]]\nid = \"b{i}\"\naddr = \"127.0.0.1:{p}\"\n")
            })
            .collect()
    };
    // Probes every 5 minutes in both: the table measures routing, and 3,000 backends (1,000
    // services of three) probed every second would be a load of their own (100 probes a second
    // at a 30 s interval cost the 1,000-service peer about 1% of a core on this machine).
    let head = |name: &str, port: u16| {
        format!(
            "[node]\nid = \"{name}\"\ndata_dir = \"{}\"\n[proxy]\nlisten = [\"127.0.0.1:{port}\"]\nworkers = 1\n[health]\ninterval = \"5m\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n[cluster]\nlisten = \"127.0.0.1:{}\"\n[log]\nlevel = \"warn\"\n{}",
            dir.join(format!("{name}-data")).display(),
            free_port(),
            free_port(),
            backends(""),
        )
    };
    let one_port = free_port();
    let one = shoal_run(shoal, dir, "svc-one", &head("svc-one", one_port));
    let many_port = free_port();
    let mut many_cfg = head("svc-many", many_port);
    for i in 0..1_000 {
        let route = match i % 4 {
            0 => format!("hosts = [\"svc-{i}.bench\"]"),
            1 => format!("hosts = [\"svc-{i}.bench\", \"*.svc-{i}.bench\"]"),
            2 => format!("hosts = [\"svc-{i}.bench\"]\npath_prefix = \"/v{i}/\""),
            _ => format!("hosts = []\npath_prefix = \"/p{i}/\""),
        };
        many_cfg.push_str(&format!(
            "[[services]]\nname = \"svc-{i}\"\n{route}\n{}",
            backends("services.")
        ));
    }
    let many = shoal_run(shoal, dir, "svc-many", &many_cfg);
    wait_port("shoal (1 service)", one_port);
    wait_port("shoal (1,000 services)", many_port);
    // Ready: the one with 1,000 services routes the bench's Host.
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_call_host(many_port, "svc-500.bench") != 200 {
        assert!(
            Instant::now() < deadline,
            "the 1,000-service Shoal never routed svc-500.bench"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let runs: [(&str, u16, u32); 2] = [
        ("1 service", one_port, one.0.id()),
        ("1,000 services", many_port, many.0.id()),
    ];
    let mut results: Vec<Vec<Result>> = vec![Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, (name, port, pid)) in runs.iter().enumerate() {
            let url = format!("http://127.0.0.1:{port}/");
            let pids = [*pid];
            results[i].push(wrk_with(
                name,
                &url,
                &["-H", "Host: svc-500.bench"],
                &|| usage(&pids),
                secs,
                conns,
            ));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!("\nservices: small answers, keep-alive, Host svc-500.bench (-c{conns}; Shoal only, one worker)");
    println!(
        "{:<16} {:>10} {:>9} {:>9} {:>12} {:>10} {:>9}",
        "shoal with", "req/s", "p50 ms", "p99 ms", "req/CPU-s", "cpu/one", "peak MiB"
    );
    let mut one_cpu = 0.0;
    for (i, (name, _, pid)) in runs.iter().enumerate() {
        let rs = &results[i];
        let per_cpu = median(rs.iter().map(|r| r.per_cpu_s).collect());
        if i == 0 {
            one_cpu = per_cpu;
        }
        println!(
            "{name:<16} {:>10.0} {:>9.3} {:>9.3} {:>12.0} {:>10.3} {:>9.1}",
            median(rs.iter().map(|r| r.rps).collect()),
            median(rs.iter().map(|r| r.p50_ms).collect()),
            median(rs.iter().map(|r| r.p99_ms).collect()),
            per_cpu,
            per_cpu / one_cpu,
            peak_rss_mib(&[*pid]),
        );
    }
}

/// GET / with `host` as Host; the status (0 when it fails).
fn http_call_host(port: u16, host: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// A backend that answers a request with a body at once (`200`, `Content-Length: 2`) and sends
/// the `ok` only once the whole body came: what an aborted upload leaves a proxy waiting on.
fn early_backend() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let Some(head) = support::read_head(&mut s, &mut buf) else {
                        return;
                    };
                    let mut left: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
                        .is_err()
                    {
                        return;
                    }
                    let had = buf.len().min(left);
                    buf.drain(..had);
                    left -= had;
                    while left > 0 {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                let used = n.min(left);
                                left -= used;
                                buf.extend_from_slice(&chunk[used..n]);
                            }
                        }
                    }
                    if s.write_all(b"ok").is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn open_fds(pids: &[u32]) -> usize {
    pids.iter()
        .map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).map_or(0, |d| d.count()))
        .sum()
}

/// Eight clients, each in a loop: part of a 2 MB upload (256 KiB to 1 MiB of it), a moment,
/// then a reset, until `until`.
fn aborted_uploads(port: u16, until: Instant) -> Vec<std::thread::JoinHandle<u64>> {
    (0..8u64)
        .map(|t| {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut n = 0;
                while Instant::now() < until {
                    n += 1;
                    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                        continue;
                    };
                    let _ = s.write_all(
                        b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 2000000\r\n\r\n",
                    );
                    let part = vec![b'u'; 256 * 1024 * (1 + ((t + n) % 4) as usize)];
                    let _ = s.write_all(&part);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
                    let _ = s.read(&mut [0u8; 256]);
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                }
                n
            })
        })
        .collect()
}

/// The "under abuse" table: each proxy in turn before the same backend.
fn abuse_table(dir: &Path, shoal: &Path, secs: u64) {
    let backend = early_backend();
    let nginx_port = free_port();
    let nginx_proc = nginx(dir, "proxy-abuse", &format!(
        "  upstream early {{ server 127.0.0.1:{backend}; keepalive 128; }}\n  server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://early; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
    ));
    let haproxy_port = free_port();
    let hcfg = dir.join("haproxy-abuse.cfg");
    std::fs::write(
        &hcfg,
        format!("global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\nfrontend fe\n  bind 127.0.0.1:{haproxy_port}\n  default_backend be\nbackend be\n  server b 127.0.0.1:{backend}\n"),
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
    let shoal_port = free_port();
    let shoal_proc = shoal_run(
        shoal,
        dir,
        "shoal-abuse",
        &format!(
            "[node]\nid = \"abuse\"\ndata_dir = \"{}\"\n[proxy]\nlisten = [\"127.0.0.1:{shoal_port}\"]\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:{}\"\n[cluster]\nlisten = \"127.0.0.1:{}\"\n[log]\nlevel = \"warn\"\n[health]\ninterval = \"1h\"\n[[backends]]\nid = \"early\"\naddr = \"127.0.0.1:{backend}\"\n",
            dir.join("shoal-abuse-data").display(),
            free_port(),
            free_port()
        ),
    );
    for p in [nginx_port, haproxy_port, shoal_port] {
        wait_port("abuse proxy", p);
    }
    std::thread::sleep(Duration::from_millis(300));
    let targets: Vec<(&str, u16, Vec<u32>)> = vec![
        ("nginx", nginx_port, children(nginx_proc.0.id())),
        ("haproxy", haproxy_port, vec![haproxy.0.id()]),
        ("shoal", shoal_port, vec![shoal_proc.0.id()]),
    ];
    println!("\nunder abuse: 8 clients abort 2 MB uploads to a backend that answered early, wrk -c16 beside them ({secs} s each)");
    println!(
        "{:<8} {:>9} {:>9} {:>10} {:>10} {:>9} {:>10} {:>10} {:>12}",
        "proxy",
        "RSS0 MiB",
        "fds0",
        "peak MiB",
        "peak fds",
        "uploads",
        "after MiB",
        "after fds",
        "wrk req/CPU-s"
    );
    for (name, port, pids) in &targets {
        let (rss0, fds0) = (rss_mib(pids), open_fds(pids));
        let until = Instant::now() + Duration::from_secs(secs);
        let abusers = aborted_uploads(*port, until);
        let sampler = {
            let pids = pids.clone();
            std::thread::spawn(move || {
                let (mut rss, mut fds) = (0.0f64, 0usize);
                while Instant::now() < until {
                    rss = rss.max(rss_mib(&pids));
                    fds = fds.max(open_fds(&pids));
                    std::thread::sleep(Duration::from_millis(50));
                }
                (rss, fds)
            })
        };
        let url = format!("http://127.0.0.1:{port}/");
        let r = wrk_with(
            name,
            &url,
            &[],
            &|| usage(pids),
            secs.saturating_sub(1).max(1),
            16,
        );
        let uploads: u64 = abusers.into_iter().map(|h| h.join().unwrap_or(0)).sum();
        let (peak_rss, peak_fds) = sampler.join().unwrap();
        std::thread::sleep(Duration::from_secs(1));
        println!(
            "{name:<8} {rss0:>9.1} {fds0:>9} {peak_rss:>10.1} {peak_fds:>10} {uploads:>9} {:>10.1} {:>10} {:>12.0}",
            rss_mib(pids),
            open_fds(pids),
            r.per_cpu_s
        );
    }
}
