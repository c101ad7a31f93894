//! Agreed DNS discovery against a real DNS server on loopback: dnsmasq (Debian's dnsmasq-base)
//! on a high port, its records changed while three `shoal run` peers resolve them. Without
//! dnsmasq a test prints why and passes, except under `CI=true`.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const NAME: &str = "web.shoal.test";

fn have_dnsmasq() -> bool {
    have_tool("dnsmasq", &["--version"])
}

/// A dnsmasq answering `NAME` from a hosts file it re-reads on SIGHUP.
struct Dns {
    child: Child,
    port: u16,
    hosts: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dns {
    fn start(ips: &[&str]) -> Dns {
        Self::start_with(ips, &[])
    }

    fn start_with(ips: &[&str], extra: &[String]) -> Dns {
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let hosts = dir.path().join("hosts");
        let port = free_udp_port();
        let mut d = Dns {
            child: Command::new("true").spawn().unwrap(),
            port,
            hosts,
            _dir: dir,
        };
        d.set(ips);
        d.child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--local-ttl=0",
                "--user=root",
                "--pid-file",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", d.hosts.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq");
        d.wait_answering();
        d
    }

    fn set(&self, ips: &[&str]) {
        let text: String = ips.iter().map(|ip| format!("{ip} {NAME}\n")).collect();
        std::fs::write(&self.hosts, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.hosts, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    /// New records, and dnsmasq told to read them.
    fn change(&self, ips: &[&str]) {
        self.set(ips);
        let st = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn wait_answering(&self) {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // A minimal query for NAME/A.
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in NAME.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        for _ in 0..50 {
            let _ = sock.send_to(&q, ("127.0.0.1", self.port));
            let mut buf = [0u8; 512];
            if sock.recv(&mut buf).is_ok() {
                return;
            }
        }
        panic!("dnsmasq does not answer on port {}", self.port);
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_udp_port() -> u16 {
    loop {
        let p = free_port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// A demo-like backend on `ip:port` (loopback has every 127.x address).
async fn backend_on(ip: &str, port: u16) -> Backend {
    let l = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    Backend::start_on(l, ip, Behavior::Echo)
}

fn discovery_toml(dns_port: u16, port: u16) -> String {
    format!(
        "[health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\n[[discovery]]\nname = \"{NAME}\"\ntype = \"a\"\nport = {port}\ninterval = \"200ms\"\nremove_after = \"1500ms\"\nresolver = \"127.0.0.1:{dns_port}\"\n"
    )
}

async fn pool_ids(admin: SocketAddr) -> BTreeSet<String> {
    let (_, p) = get_json(admin, "/pool").await;
    p["backends"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| b["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn ids(port: u16, ips: &[&str]) -> BTreeSet<String> {
    ips.iter().map(|ip| format!("{NAME}/{ip}:{port}")).collect()
}

async fn all_see(nodes: &[Shoal], want: &BTreeSet<String>, within: Duration) {
    for n in nodes {
        eventually(within, &format!("pool {want:?}"), || async {
            (pool_ids(n.admin).await == *want).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_join_and_leave_by_majority_and_odd_or_dead_resolvers_change_nothing() {
    if !have_dnsmasq() {
        return;
    }
    let port = free_port();
    let _b: Vec<Backend> = futures_join(
        ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"],
        port,
    )
    .await;
    let dns = Dns::start(&["127.0.0.11", "127.0.0.12"]);
    // Peer c asks another server, which answers differently (an extra address, one missing).
    let mut odd = Dns::start(&["127.0.0.11", "127.0.0.14"]);
    let nodes = start_cluster(
        3,
        |_| String::new(),
        |i| discovery_toml(if i == 2 { odd.port } else { dns.port }, port),
    )
    .await;
    all_see(
        &nodes,
        &ids(port, &["127.0.0.11", "127.0.0.12"]),
        Duration::from_secs(5),
    )
    .await;
    // Traffic reaches both discovered backends.
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        let (code, body) = get_text(nodes[0].proxy, "/").await.unwrap();
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        seen.insert(v["name"].as_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // /status shows each peer's own latest answer; the odd one's holds .14, which never joins.
    let (_, st) = get_json(nodes[2].admin, "/status").await;
    let addrs = &st["discovery"][NAME]["addrs"];
    assert!(addrs.to_string().contains("127.0.0.14"), "{st}");

    // A new address appears on every peer.
    dns.change(&["127.0.0.11", "127.0.0.12", "127.0.0.13"]);
    all_see(
        &nodes,
        &ids(port, &["127.0.0.11", "127.0.0.12", "127.0.0.13"]),
        Duration::from_secs(5),
    )
    .await;

    // An address removed from DNS leaves after remove_after (1.5 s), not before.
    dns.change(&["127.0.0.11", "127.0.0.13"]);
    let removed = Instant::now();
    let gone = ids(port, &["127.0.0.11", "127.0.0.13"]);
    for n in &nodes {
        eventually(Duration::from_secs(6), "12 gone", || async {
            (pool_ids(n.admin).await == gone).then_some(())
        })
        .await;
    }
    let took = removed.elapsed();
    assert!(
        took >= Duration::from_millis(1300),
        "left after {took:?}, before remove_after"
    );
    println!("an address removed from DNS left the pool after {took:?} (remove_after 1.5 s)");

    // The odd resolver going down changes nothing, nor does the main one: no peer votes empty.
    // (First let the last votes on .12 land: the pool dropped it at the second vote.)
    tokio::time::sleep(Duration::from_millis(1000)).await;
    odd.stop();
    let mut dns = dns;
    dns.stop();
    let before: Vec<u64> = {
        let mut v = Vec::new();
        for n in &nodes {
            v.push(
                get_json(n.admin, "/status").await.1["pool_version"]
                    .as_u64()
                    .unwrap(),
            );
        }
        v
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(pool_ids(n.admin).await, gone);
        let (_, st) = get_json(n.admin, "/status").await;
        assert_eq!(st["pool_version"].as_u64().unwrap(), before[i], "{st}");
        assert!(st["discovery"][NAME]["error"].is_string(), "{st}");
        let m = n.metrics().await;
        let failed = metric(
            &m,
            &format!("shoal_discovery_resolutions_total{{source=\"{NAME}\",result=\"failed\"}}"),
        )
        .unwrap_or(0.0);
        assert!(failed >= 3.0, "{m}");
    }
}

async fn futures_join<const N: usize>(ips: [&str; N], port: u16) -> Vec<Backend> {
    let mut out = Vec::new();
    for ip in ips {
        out.push(backend_on(ip, port).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_that_replaces_every_address_under_load_fails_no_request() {
    if !have_dnsmasq() {
        return;
    }
    let port = free_port();
    let mut backends = vec![
        backend_on("127.0.0.21", port).await,
        backend_on("127.0.0.22", port).await,
    ];
    let dns = Dns::start(&["127.0.0.21", "127.0.0.22"]);
    let nodes = start_cluster(3, |_| String::new(), |_| discovery_toml(dns.port, port)).await;
    all_see(
        &nodes,
        &ids(port, &["127.0.0.21", "127.0.0.22"]),
        Duration::from_secs(5),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for n in &nodes {
        let (stop, ok, failed, proxy) = (stop.clone(), ok.clone(), failed.clone(), n.proxy);
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match get_text(proxy, "/").await {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::SeqCst),
                    other => {
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // As a Kubernetes rollout does: a new pod is ready before an old one leaves the Service,
    // and the old one stops once it left (here: once every peer stopped routing to it).
    let mut current = vec!["127.0.0.21", "127.0.0.22"];
    for (new, old) in [("127.0.0.23", "127.0.0.21"), ("127.0.0.24", "127.0.0.22")] {
        backends.push(backend_on(new, port).await);
        current.push(new);
        dns.change(&current);
        all_see(&nodes, &ids(port, &current), Duration::from_secs(5)).await;
        current.retain(|ip| *ip != old);
        dns.change(&current);
        all_see(&nodes, &ids(port, &current), Duration::from_secs(6)).await;
        let i = backends.iter().position(|b| b.name == old).unwrap();
        backends.remove(i).kill();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    println!("rollout: {ok} requests served, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 200, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_targets_and_ports() {
    if !have_dnsmasq() {
        return;
    }
    let (p1, p2) = (free_port(), free_port());
    let _b1 = backend_on("127.0.0.31", p1).await;
    let _b2 = backend_on("127.0.0.32", p2).await;
    let srv = "_http._tcp.api.shoal.test";
    let dns = Dns::start_with(
        &[],
        &[
            format!("--srv-host={srv},one.shoal.test,{p1}"),
            format!("--srv-host={srv},two.shoal.test,{p2}"),
            "--host-record=one.shoal.test,127.0.0.31".to_string(),
            "--host-record=two.shoal.test,127.0.0.32".to_string(),
        ],
    );
    let s = Shoal::start(
        "",
        &format!(
            "[[discovery]]\nname = \"{srv}\"\ntype = \"srv\"\ninterval = \"200ms\"\nremove_after = \"1s\"\nresolver = \"127.0.0.1:{}\"\nweight = 2\n",
            dns.port
        ),
    )
    .await;
    let want: BTreeSet<String> = [
        format!("{srv}/127.0.0.31:{p1}"),
        format!("{srv}/127.0.0.32:{p2}"),
    ]
    .into_iter()
    .collect();
    eventually(Duration::from_secs(5), "both SRV targets", || async {
        (pool_ids(s.admin).await == want).then_some(())
    })
    .await;
    let (_, pool) = get_json(s.admin, "/pool").await;
    assert!(
        pool["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["weight"] == 2),
        "{pool}"
    );
    // A discovered backend is drained through the admin API (its id's slash as %2F).
    let id = format!("{srv}%2F127.0.0.31:{p1}");
    let (code, body) =
        admin_call(s.admin, "POST", &format!("/pool/backends/{id}/drain"), None).await;
    assert_eq!(code, 200, "{body}");
    let (_, pool) = get_json(s.admin, "/pool").await;
    let b = pool["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == format!("127.0.0.31:{p1}"))
        .cloned()
        .unwrap();
    assert_eq!(b["state"], "draining", "{pool}");
    // And through the CLI, with the id as the pool lists it.
    let out = Command::new(shoal_bin())
        .args([
            "pool",
            "undrain",
            &format!("{srv}/127.0.0.31:{p1}"),
            "--admin",
        ])
        .arg(format!("http://{}", s.admin))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An HTTP/2-only (h2c) backend on `ip:port` that answers every request with the HTTP version
/// it came in.
async fn h2_only_backend_on(ip: &str, port: u16) {
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let l = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let version = format!("{:?}", req.version());
                    Ok::<_, std::convert::Infallible>(http::Response::new(full(version)))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

/// A source with `protocol = "h2"` adds backends spoken to over HTTP/2 (this backend speaks
/// nothing else), shown as such in the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sources_protocol_goes_to_the_backends_it_finds() {
    if !have_dnsmasq() {
        return;
    }
    let port = free_port();
    h2_only_backend_on("127.0.0.33", port).await;
    let dns = Dns::start(&["127.0.0.33"]);
    let s = Shoal::start(
        "",
        &format!("{}protocol = \"h2\"\n", discovery_toml(dns.port, port)),
    )
    .await;
    let want = ids(port, &["127.0.0.33"]);
    all_see(std::slice::from_ref(&s), &want, Duration::from_secs(5)).await;
    let (_, pool) = get_json(s.admin, "/pool").await;
    assert_eq!(pool["backends"][0]["protocol"], "h2", "{pool}");
    let (code, body) = get_text(s.proxy, "/").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "HTTP/2.0"));
}
