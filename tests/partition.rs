//! Partitions in Linux network namespaces with iptables: three peers, each in a namespace of its
//! own, and the backends in a fourth, joined by a bridge; every address lives inside namespaces
//! this test creates and deletes. Needs root, `ip` and `iptables`; elsewhere the test says why
//! it cannot run and returns.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::shoal_bin;

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn ok(args: &[&str]) {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Why this machine cannot run the test, if it cannot.
fn unsupported() -> Option<String> {
    if Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() != "0")
        .unwrap_or(true)
    {
        return Some("not root".into());
    }
    for tool in ["ip", "iptables", "curl", "python3"] {
        if Command::new("which")
            .arg(tool)
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Some(format!("{tool} not installed"));
        }
    }
    let probe = format!("shoalprobe{}", std::process::id());
    if !sh(&["ip", "netns", "add", &probe]).status.success() {
        return Some("cannot create network namespaces here".into());
    }
    let ipt = sh(&["ip", "netns", "exec", &probe, "iptables", "-L", "-n"]);
    let _ = sh(&["ip", "netns", "del", &probe]);
    if !ipt.status.success() {
        return Some(format!(
            "iptables does not work in a namespace: {}",
            String::from_utf8_lossy(&ipt.stderr)
        ));
    }
    None
}

/// The namespaces, deleted (with everything in them) on drop.
struct Net {
    prefix: String,
    procs: Vec<Child>,
}

impl Net {
    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn setup() -> Net {
        let prefix = format!("sh{}", std::process::id() % 100_000);
        let net = Net {
            prefix,
            procs: Vec::new(),
        };
        // Leftovers of a crashed run that had the same process id.
        for n in ["a", "b", "c", "h"] {
            let _ = sh(&["ip", "netns", "del", &net.ns(n)]);
            let _ = sh(&["ip", "link", "del", &format!("{}v{n}", net.prefix)]);
        }
        let hub = net.ns("h");
        ok(&["ip", "netns", "add", &hub]);
        ok(&["ip", "-n", &hub, "link", "set", "lo", "up"]);
        ok(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ok(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
        ok(&[
            "ip",
            "-n",
            &hub,
            "addr",
            "add",
            "10.99.0.10/24",
            "dev",
            "br0",
        ]);
        for (i, p) in ["a", "b", "c"].iter().enumerate() {
            let ns = net.ns(p);
            let (v, e) = (format!("{}v{p}", net.prefix), format!("{}e{p}", net.prefix));
            ok(&["ip", "netns", "add", &ns]);
            ok(&["ip", "link", "add", &v, "type", "veth", "peer", "name", &e]);
            ok(&["ip", "link", "set", &v, "netns", &hub]);
            ok(&["ip", "link", "set", &e, "netns", &ns]);
            ok(&["ip", "-n", &ns, "link", "set", &e, "name", "eth0"]);
            ok(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.99.0.{}/24", i + 1),
                "dev",
                "eth0",
            ]);
            ok(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            ok(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            ok(&["ip", "-n", &hub, "link", "set", &v, "master", "br0"]);
            ok(&["ip", "-n", &hub, "link", "set", &v, "up"]);
        }
        net
    }

    fn spawn(&mut self, ns: &str, args: &[&str], log: &Path) {
        let ns = self.ns(ns);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns]).args(args);
        let f = std::fs::File::create(log).unwrap();
        self.procs
            .push(cmd.stdout(Stdio::null()).stderr(f).spawn().unwrap());
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let ns = self.ns(ns);
        let mut all = vec!["ip", "netns", "exec", &ns];
        all.extend_from_slice(args);
        sh(&all)
    }

    /// GET through curl inside `ns`: (status, body).
    fn get(&self, ns: &str, url: &str) -> (u16, String) {
        let o = self.exec(ns, &["curl", "-s", "-m", "3", "-w", "\n%{http_code}", url]);
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn post_json(&self, ns: &str, url: &str, body: &str) -> u16 {
        let o = self.exec(
            ns,
            &[
                "curl",
                "-s",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-d",
                body,
                url,
            ],
        );
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    fn json(&self, ns: &str, url: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(ns, url).1).unwrap_or(serde_json::Value::Null)
    }

    fn iptables(&self, ns: &str, rule: &[&str]) {
        let mut args = vec!["iptables"];
        args.extend_from_slice(rule);
        let o = self.exec(ns, &args);
        assert!(
            o.status.success(),
            "iptables {rule:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        for n in ["a", "b", "c", "h"] {
            let _ = sh(&["ip", "netns", "del", &self.ns(n)]);
        }
    }
}

fn wait_for(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < within {
        if f() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {within:?}: {what}");
}

fn certs(dir: &Path) -> (PathBuf, Vec<(PathBuf, PathBuf)>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "partition test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = p.self_signed(&ca_key).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let mut out = Vec::new();
    for id in ["a", "b", "c"] {
        let mut p = CertificateParams::new(vec![id.to_string()]).unwrap();
        p.subject_alt_names = vec![SanType::DnsName(id.try_into().unwrap())];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        let (c, k) = (
            dir.join(format!("{id}.pem")),
            dir.join(format!("{id}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        out.push((c, k));
    }
    (ca_path, out)
}

fn backend_state(v: &serde_json::Value, id: &str) -> String {
    v["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["id"] == id))
        .and_then(|b| b["state"].as_str())
        .unwrap_or("")
        .to_string()
}

#[test]
fn partitions_in_network_namespaces() {
    if let Some(why) = unsupported() {
        println!("partition test not run: {why} (it needs root, ip and iptables)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut net = Net::setup();
    // Backends: small HTTP servers in the hub namespace, each with /healthz (the fourth is
    // added through the admin API later).
    for i in 1..=4 {
        let root = dir.path().join(format!("web{i}"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), format!("web-{i}\n")).unwrap();
        std::fs::write(root.join("healthz"), "ok\n").unwrap();
        let port = format!("{}", 9000 + i);
        let log = dir.path().join(format!("web{i}.log"));
        net.spawn(
            "h",
            &[
                "python3",
                "-m",
                "http.server",
                &port,
                "--bind",
                "10.99.0.10",
                "--directory",
                root.to_str().unwrap(),
            ],
            &log,
        );
    }
    let (ca, pairs) = certs(dir.path());
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        let peers: Vec<String> = ["a", "b", "c"]
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, p)| format!("{{ id = \"{p}\", addr = \"10.99.0.{}:7001\" }}", j + 1))
            .collect();
        let cfg = format!(
            "[node]\nid = \"{id}\"\ndata_dir = \"{data}\"\n[proxy]\nlisten = [\"127.0.0.1:8080\"]\n[admin]\nlisten = \"127.0.0.1:9901\"\n[cluster]\nlisten = \"10.99.0.{n}:7001\"\npeers = [{peers}]\nheartbeat_interval = \"100ms\"\ndead_after = \"2s\"\n[cluster.tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n[health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfall = 2\nrise = 2\n[[backends]]\nid = \"web-1\"\naddr = \"10.99.0.10:9001\"\n[[backends]]\nid = \"web-2\"\naddr = \"10.99.0.10:9002\"\n[[backends]]\nid = \"web-3\"\naddr = \"10.99.0.10:9003\"\n",
            data = dir.path().join(format!("data-{id}")).display(),
            n = i + 1,
            peers = peers.join(", "),
            ca = ca.display(),
            cert = pairs[i].0.display(),
            key = pairs[i].1.display(),
        );
        let path = dir.path().join(format!("{id}.toml"));
        std::fs::write(&path, cfg).unwrap();
        let log = dir.path().join(format!("{id}.log"));
        net.spawn(
            id,
            &[
                shoal_bin().to_str().unwrap(),
                "run",
                "--config",
                path.to_str().unwrap(),
            ],
            &log,
        );
    }
    for id in ["a", "b", "c"] {
        wait_for(Duration::from_secs(15), &format!("peer {id} ready"), || {
            net.get(id, "http://127.0.0.1:9901/readyz").0 == 200
        });
    }
    wait_for(Duration::from_secs(5), "all peers alive", || {
        ["a", "b", "c"].iter().all(|p| {
            net.json(p, "http://127.0.0.1:9901/peers")
                .as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(|x| x["state"] == "alive"))
        })
    });

    // 1. Cut peer c off from backend web-2: c routes around it; the agreed pool keeps it active.
    net.iptables(
        "c",
        &[
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.99.0.10",
            "--dport",
            "9002",
            "-j",
            "DROP",
        ],
    );
    wait_for(Duration::from_secs(3), "c sees web-2 down", || {
        let st = net.json("c", "http://127.0.0.1:9901/status");
        st["backends"]
            .as_array()
            .is_some_and(|b| b.iter().any(|x| x["id"] == "web-2" && x["local"] == "down"))
    });
    for _ in 0..12 {
        let (code, body) = net.get("c", "http://127.0.0.1:8080/");
        assert_eq!(code, 200);
        assert_ne!(
            body.trim(),
            "web-2",
            "c routed to a backend it cannot reach"
        );
    }
    let mut saw_web2 = false;
    for _ in 0..9 {
        let (code, body) = net.get("a", "http://127.0.0.1:8080/");
        assert_eq!(code, 200);
        saw_web2 |= body.trim() == "web-2";
    }
    assert!(saw_web2, "a still routes to web-2");
    std::thread::sleep(Duration::from_secs(1));
    for p in ["a", "b", "c"] {
        let pool = net.json(p, "http://127.0.0.1:9901/pool");
        assert_eq!(
            backend_state(&pool, "web-2"),
            "active",
            "one peer's view ejected web-2: {pool}"
        );
    }
    net.iptables("c", &["-F"]);
    wait_for(Duration::from_secs(3), "c sees web-2 up again", || {
        let st = net.json("c", "http://127.0.0.1:9901/status");
        st["backends"]
            .as_array()
            .is_some_and(|b| b.iter().any(|x| x["id"] == "web-2" && x["local"] == "up"))
    });

    // 2. Cut peer c off from the other peers for a minute (packets dropped, so its links die
    //    silently): a and b keep committing, c keeps serving, and it catches up within 2 s of
    //    healing (links silent for `dead_after` are torn down and dialed again).
    let cut = std::time::Instant::now();
    for other in ["10.99.0.1", "10.99.0.2"] {
        net.iptables("c", &["-A", "INPUT", "-s", other, "-j", "DROP"]);
        net.iptables("c", &["-A", "OUTPUT", "-d", other, "-j", "DROP"]);
    }
    let code = net.post_json(
        "a",
        "http://127.0.0.1:9901/pool/backends",
        r#"{"addr": "10.99.0.10:9004", "id": "late"}"#,
    );
    assert_eq!(code, 201, "a and b commit without c");
    let version = net.json("b", "http://127.0.0.1:9901/pool")["version"]
        .as_u64()
        .unwrap();
    let code = net.post_json(
        "c",
        "http://127.0.0.1:9901/pool/backends",
        r#"{"addr": "10.99.0.10:9010", "id": "lonely"}"#,
    );
    assert_eq!(code, 503, "the cut-off peer cannot commit alone");
    for _ in 0..6 {
        assert_eq!(
            net.get("c", "http://127.0.0.1:8080/").0,
            200,
            "the cut-off peer keeps serving"
        );
    }
    assert!(
        net.json("c", "http://127.0.0.1:9901/pool")["version"]
            .as_u64()
            .unwrap()
            < version
    );
    std::thread::sleep(Duration::from_secs(60).saturating_sub(cut.elapsed()));
    net.iptables("c", &["-F"]);
    let took = wait_for(Duration::from_secs(10), "c catches up", || {
        net.json("c", "http://127.0.0.1:9901/pool")["version"].as_u64() >= Some(version)
    });
    println!("after a 60 s partition, the healed peer caught up in {took:?}");
    assert!(
        took <= Duration::from_secs(2),
        "caught up only after {took:?}"
    );
    let pool = net.json("c", "http://127.0.0.1:9901/pool");
    assert_eq!(backend_state(&pool, "late"), "active");
    assert_eq!(
        backend_state(&pool, "lonely"),
        "",
        "a change refused for lack of quorum stays refused"
    );
}
