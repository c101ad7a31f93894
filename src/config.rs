//! The config file: TOML plus `SHOAL__SECTION__KEY` environment overrides, read with the `config`
//! crate, then checked key by key into a typed `Config`.
//!
//! Every problem is collected (not just the first) and each names its key as a path, e.g.
//! `backends[1].weight: must be 1..=1000, got 0`. Unknown keys are errors.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::core::balance::{Algorithm, BalanceSpec, HashMethod};
use crate::core::health::Thresholds;
use crate::core::pool::{Backend, NodeId, Rules};

/// A validated config.
#[derive(Clone, Debug)]
pub struct Config {
    pub node: NodeConfig,
    pub proxy: ProxyConfig,
    pub balance: BalanceConfig,
    pub health: HealthConfig,
    pub cluster: ClusterConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    /// Seeds for the agreed pool, used only when the cluster has none yet.
    pub backends: Vec<Backend>,
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub listen: Vec<SocketAddr>,
    pub workers: usize,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub client_idle_timeout: Duration,
    pub max_connections: usize,
    pub retries: u32,
    pub max_header_bytes: usize,
    pub shutdown_grace: Duration,
    pub tls: Option<ProxyTls>,
}

#[derive(Clone, Debug)]
pub struct ProxyTls {
    pub listen: Vec<SocketAddr>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
    Query(String),
    Path,
    ClientIp,
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::Header(h) => write!(f, "header:{h}"),
            HashKey::Cookie(c) => write!(f, "cookie:{c}"),
            HashKey::Query(q) => write!(f, "query:{q}"),
            HashKey::Path => f.write_str("path"),
            HashKey::ClientIp => f.write_str("client_ip"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BalanceConfig {
    pub algorithm: Algorithm,
    pub hash_key: HashKey,
    pub bounded_load: f64,
}

impl BalanceConfig {
    pub fn spec(&self) -> BalanceSpec {
        BalanceSpec {
            algorithm: self.algorithm,
            bounded_load: self.bounded_load,
        }
    }
}

#[derive(Clone, Debug)]
pub struct HealthConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub passive_failures: u32,
    pub max_ejected_percent: u8,
    pub panic_below_percent: u8,
}

impl HealthConfig {
    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            rise: self.rise,
            fall: self.fall,
            passive_failures: self.passive_failures,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub id: NodeId,
    pub addr: String,
}

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub listen: SocketAddr,
    pub peers: Vec<PeerConfig>,
    pub heartbeat_interval: Duration,
    pub phi_threshold: f64,
    pub dead_after: Duration,
    pub tls: Option<ClusterTls>,
}

#[derive(Clone, Debug)]
pub struct ClusterTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub access_log: bool,
}

impl Config {
    /// The rules pool changes are applied under.
    pub fn rules(&self) -> Rules {
        Rules {
            cluster_size: self.cluster.peers.len() + 1,
            max_ejected_percent: self.health.max_ejected_percent,
        }
    }

    /// A short human summary, printed by `shoal check`.
    pub fn summary(&self) -> String {
        let alg = match self.balance.algorithm {
            Algorithm::RoundRobin => "round_robin".to_string(),
            Algorithm::ConsistentHash(m) => format!(
                "consistent_hash ({}, key {})",
                match m {
                    HashMethod::Maglev => "maglev",
                    HashMethod::Ring => "ring",
                },
                self.balance.hash_key
            ),
        };
        let listen: Vec<String> = self.proxy.listen.iter().map(|a| a.to_string()).collect();
        format!(
            "node {}: proxy on {}{}, admin on {}, cluster on {} with {} other peer(s), {} seed backend(s), {}",
            self.node.id,
            listen.join(", "),
            if self.proxy.tls.is_some() { " (+TLS)" } else { "" },
            self.admin.listen,
            self.cluster.listen,
            self.cluster.peers.len(),
            self.backends.len(),
            alg
        )
    }
}

/// Every problem found in a config, each naming its key.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Keys whose environment override is a comma-separated list.
const LIST_KEYS: [&str; 2] = ["proxy.listen", "proxy.tls.listen"];

/// Load `path` with the `SHOAL__*` environment overrides and validate it.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let raw = read_raw(path, std::env::vars())?;
    from_value(&raw)
}

/// Read the file and overrides into one JSON tree (no validation yet).
pub fn read_raw(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Value, ConfigErrors> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(ConfigErrors(vec![format!(
            "{}: cannot read config file: {e}",
            path.display()
        )]));
    }
    let env: std::collections::HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("SHOAL__"))
        .collect();
    let mut source = config::Environment::with_prefix("SHOAL")
        .prefix_separator("__")
        .separator("__")
        .list_separator(",")
        .try_parsing(true)
        .source(Some(env));
    for k in LIST_KEYS {
        source = source.with_list_parse_key(k);
    }
    let built = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(source)
        .build()
        .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))?;
    built
        .try_deserialize::<Value>()
        .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))
}

/// Validate a raw tree into a `Config`, collecting every problem.
pub fn from_value(raw: &Value) -> Result<Config, ConfigErrors> {
    let mut c = Checker::default();
    let root = c.table(
        Some(raw),
        "",
        &[
            "node", "proxy", "balance", "health", "cluster", "admin", "log", "backends",
        ],
    );
    let node = node(&mut c, root.get("node").1);
    let proxy = proxy(&mut c, root.get("proxy").1);
    let balance = balance(&mut c, root.get("balance").1);
    let health = health(&mut c, root.get("health").1);
    let cluster = cluster(&mut c, root.get("cluster").1, node.as_ref().map(|n| &n.id));
    let admin = admin(&mut c, root.get("admin").1);
    let log = log(&mut c, root.get("log").1);
    let backends = backends(&mut c, root.get("backends").1);
    match (node, proxy, balance, health, cluster, admin, log, backends) {
        (
            Some(node),
            Some(proxy),
            Some(balance),
            Some(health),
            Some(cluster),
            Some(admin),
            Some(log),
            Some(backends),
        ) if c.errors.is_empty() => Ok(Config {
            node,
            proxy,
            balance,
            health,
            cluster,
            admin,
            log,
            backends,
        }),
        _ => Err(ConfigErrors(c.errors)),
    }
}

/// Collects problems while reading typed values out of the raw tree.
#[derive(Default)]
struct Checker {
    errors: Vec<String>,
}

/// A table being read: its path for messages, and its map (empty when absent).
struct Table<'a> {
    path: String,
    map: Option<&'a Map<String, Value>>,
}

impl<'a> Table<'a> {
    fn key(&self, k: &str) -> String {
        if self.path.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.path)
        }
    }
    fn get(&self, k: &str) -> (String, Option<&'a Value>) {
        (self.key(k), self.map.and_then(|m| m.get(k)))
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a table",
    }
}

impl Checker {
    fn err(&mut self, key: &str, msg: impl fmt::Display) {
        self.errors.push(format!("{key}: {msg}"));
    }

    /// Open a table at `path`, reporting keys not in `known`.
    fn table<'a>(&mut self, v: Option<&'a Value>, path: &str, known: &[&str]) -> Table<'a> {
        let map = match v {
            None => None,
            Some(Value::Object(m)) => {
                for k in m.keys() {
                    if !known.contains(&k.as_str()) {
                        let key = if path.is_empty() {
                            k.clone()
                        } else {
                            format!("{path}.{k}")
                        };
                        self.err(
                            &key,
                            format!("unknown key (expected one of: {})", known.join(", ")),
                        );
                    }
                }
                Some(m)
            }
            Some(other) => {
                self.err(path, format!("expected a table, got {}", type_name(other)));
                None
            }
        };
        Table {
            path: path.to_string(),
            map,
        }
    }

    fn sub<'a>(&mut self, t: &Table<'a>, k: &str, known: &[&str]) -> Table<'a> {
        let (key, v) = t.get(k);
        self.table(v, &key, known)
    }

    fn string(&mut self, t: &Table, k: &str) -> Option<Option<String>> {
        match t.get(k) {
            (_, None) => Some(None),
            (_, Some(Value::String(s))) => Some(Some(s.clone())),
            // Environment overrides may parse "7" as a number; ids like that are still strings.
            (_, Some(Value::Number(n))) => Some(Some(n.to_string())),
            (key, Some(v)) => {
                self.err(&key, format!("expected a string, got {}", type_name(v)));
                None
            }
        }
    }

    fn str_or(&mut self, t: &Table, k: &str, default: &str) -> Option<String> {
        self.string(t, k)
            .map(|s| s.unwrap_or_else(|| default.to_string()))
    }

    fn int(
        &mut self,
        t: &Table,
        k: &str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Option<u64> {
        let (key, v) = t.get(k);
        let n = match v {
            None => return Some(default),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(n) => n,
                None => {
                    self.err(
                        &key,
                        format!("must be {}..={}, got {n}", range.start(), range.end()),
                    );
                    return None;
                }
            },
            Some(Value::String(s)) if s.parse::<u64>().is_ok() => s.parse().unwrap_or_default(),
            Some(v) => {
                self.err(&key, format!("expected an integer, got {}", type_name(v)));
                return None;
            }
        };
        if range.contains(&n) {
            Some(n)
        } else {
            self.err(
                &key,
                format!("must be {}..={}, got {n}", range.start(), range.end()),
            );
            None
        }
    }

    fn float(&mut self, t: &Table, k: &str, default: f64) -> Option<f64> {
        let (key, v) = t.get(k);
        match v {
            None => Some(default),
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) if s.parse::<f64>().is_ok() => s.parse().ok(),
            Some(v) => {
                self.err(&key, format!("expected a number, got {}", type_name(v)));
                None
            }
        }
    }

    fn boolean(&mut self, t: &Table, k: &str, default: bool) -> Option<bool> {
        let (key, v) = t.get(k);
        match v {
            None => Some(default),
            Some(Value::Bool(b)) => Some(*b),
            Some(Value::String(s)) if s == "true" || s == "false" => Some(s == "true"),
            Some(v) => {
                self.err(
                    &key,
                    format!("expected true or false, got {}", type_name(v)),
                );
                None
            }
        }
    }

    fn duration(&mut self, t: &Table, k: &str, default: &str) -> Option<Duration> {
        let key = t.key(k);
        let s = self.str_or(t, k, default)?;
        match humantime::parse_duration(&s) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.err(&key, "must be greater than zero");
                None
            }
            Err(e) => {
                self.err(
                    &key,
                    format!("bad duration {s:?} ({e}; expected e.g. \"250ms\", \"2s\", \"1m\")"),
                );
                None
            }
        }
    }

    fn addr(&mut self, key: &str, s: &str) -> Option<SocketAddr> {
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    key,
                    format!("bad address {s:?} (expected IP:PORT, e.g. 127.0.0.1:8080)"),
                );
                None
            }
        }
    }

    fn addr_or(&mut self, t: &Table, k: &str, default: &str) -> Option<SocketAddr> {
        let key = t.key(k);
        let s = self.str_or(t, k, default)?;
        self.addr(&key, &s)
    }

    fn addr_list(&mut self, t: &Table, k: &str, default: &[&str]) -> Option<Vec<SocketAddr>> {
        let (key, v) = t.get(k);
        let items: Vec<(String, String)> = match v {
            None => default
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("{key}[{i}]"), s.to_string()))
                .collect(),
            Some(Value::String(s)) => vec![(key.clone(), s.clone())],
            Some(Value::Array(a)) => {
                let mut out = Vec::new();
                for (i, v) in a.iter().enumerate() {
                    match v {
                        Value::String(s) => out.push((format!("{key}[{i}]"), s.clone())),
                        v => self.err(
                            &format!("{key}[{i}]"),
                            format!("expected a string, got {}", type_name(v)),
                        ),
                    }
                }
                out
            }
            Some(v) => {
                self.err(
                    &key,
                    format!("expected a list of addresses, got {}", type_name(v)),
                );
                return None;
            }
        };
        if items.is_empty() {
            self.err(&key, "must list at least one address");
            return None;
        }
        let n = items.len();
        let out: Vec<SocketAddr> = items.iter().filter_map(|(k, s)| self.addr(k, s)).collect();
        (out.len() == n).then_some(out)
    }

    fn required_file(&mut self, t: &Table, k: &str) -> Option<PathBuf> {
        let key = t.key(k);
        match self.string(t, k)? {
            None => {
                self.err(&key, "required");
                None
            }
            Some(p) => {
                let p = PathBuf::from(p);
                if let Err(e) = std::fs::metadata(&p) {
                    self.err(&key, format!("cannot read {}: {e}", p.display()));
                    return None;
                }
                Some(p)
            }
        }
    }
}

/// `[a-z0-9-]{1,32}`.
pub fn valid_node_id(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Backend ids: 1..=64 printable ASCII characters without spaces or `/`.
pub fn valid_backend_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

/// `host:port` or `https://host:port` (an `http://` prefix is accepted and dropped).
pub fn normalize_backend_addr(s: &str) -> Result<String, String> {
    let (scheme, rest) = if let Some(r) = s.strip_prefix("https://") {
        ("https://", r)
    } else if let Some(r) = s.strip_prefix("http://") {
        ("", r)
    } else {
        ("", s)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let bad = || {
        format!("bad address {s:?} (expected host:port or https://host:port, e.g. 127.0.0.1:9001)")
    };
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && !host.contains('/')
        && (host.parse::<std::net::IpAddr>().is_ok()
            || (host.starts_with('[') && host.ends_with(']'))
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(format!("{scheme}{rest}")),
        _ => Err(bad()),
    }
}

fn node(c: &mut Checker, v: Option<&Value>) -> Option<NodeConfig> {
    let t = c.table(v, "node", &["id", "data_dir"]);
    let id = match c.string(&t, "id")? {
        None => {
            c.err(
                "node.id",
                "required (a unique id for this peer, [a-z0-9-]{1,32})",
            );
            return None;
        }
        Some(id) if !valid_node_id(&id) => {
            c.err(
                "node.id",
                format!("bad id {id:?} (expected [a-z0-9-]{{1,32}})"),
            );
            return None;
        }
        Some(id) => id,
    };
    let data_dir = c.str_or(&t, "data_dir", &format!("data/{id}"))?;
    Some(NodeConfig {
        id: NodeId::new(id),
        data_dir: data_dir.into(),
    })
}

fn proxy(c: &mut Checker, v: Option<&Value>) -> Option<ProxyConfig> {
    let t = c.table(
        v,
        "proxy",
        &[
            "listen",
            "workers",
            "connect_timeout",
            "request_timeout",
            "client_idle_timeout",
            "max_connections",
            "retries",
            "max_header_bytes",
            "shutdown_grace",
            "tls",
        ],
    );
    let listen = c.addr_list(&t, "listen", &["127.0.0.1:8080"]);
    let workers = c.int(&t, "workers", 0, 0..=1024);
    let connect_timeout = c.duration(&t, "connect_timeout", "1s");
    let request_timeout = c.duration(&t, "request_timeout", "30s");
    let client_idle_timeout = c.duration(&t, "client_idle_timeout", "60s");
    let max_connections = c.int(&t, "max_connections", 10_000, 1..=1_000_000);
    let retries = c.int(&t, "retries", 2, 0..=16);
    let max_header_bytes = c.int(&t, "max_header_bytes", 65_536, 8_192..=1_048_576);
    let shutdown_grace = c.duration(&t, "shutdown_grace", "10s");
    let tls = match t.get("tls").1 {
        None => Some(None),
        Some(_) => {
            let tt = c.sub(&t, "tls", &["listen", "cert", "key"]);
            let listen = c.addr_list(&tt, "listen", &["0.0.0.0:8443"]);
            let cert = c.required_file(&tt, "cert");
            let key = c.required_file(&tt, "key");
            match (listen, cert, key) {
                (Some(listen), Some(cert), Some(key)) => {
                    if let Err(e) = crate::tls::load_server_config(&cert, &key) {
                        c.err("proxy.tls", e);
                        None
                    } else {
                        Some(Some(ProxyTls { listen, cert, key }))
                    }
                }
                _ => None,
            }
        }
    };
    Some(ProxyConfig {
        listen: listen?,
        workers: workers? as usize,
        connect_timeout: connect_timeout?,
        request_timeout: request_timeout?,
        client_idle_timeout: client_idle_timeout?,
        max_connections: max_connections? as usize,
        retries: retries? as u32,
        max_header_bytes: max_header_bytes? as usize,
        shutdown_grace: shutdown_grace?,
        tls: tls?,
    })
}

/// Parse `header:NAME | cookie:NAME | query:NAME | path | client_ip`.
pub fn parse_hash_key(s: &str) -> Result<HashKey, String> {
    let bad = || {
        format!("unknown source {s:?} (expected header:NAME, cookie:NAME, query:NAME, path or client_ip)")
    };
    match s {
        "path" => return Ok(HashKey::Path),
        "client_ip" => return Ok(HashKey::ClientIp),
        _ => {}
    }
    let (kind, name) = s.split_once(':').ok_or_else(bad)?;
    if name.is_empty() {
        return Err(format!("{kind}: needs a name, e.g. {kind}:x-user"));
    }
    match kind {
        "header" => http::HeaderName::from_bytes(name.as_bytes())
            .map(HashKey::Header)
            .map_err(|_| format!("bad header name {name:?}")),
        "cookie" => Ok(HashKey::Cookie(name.to_string())),
        "query" => Ok(HashKey::Query(name.to_string())),
        _ => Err(bad()),
    }
}

fn balance(c: &mut Checker, v: Option<&Value>) -> Option<BalanceConfig> {
    let t = c.table(
        v,
        "balance",
        &["algorithm", "hash_key", "hash_method", "bounded_load"],
    );
    let method = match c.str_or(&t, "hash_method", "maglev")?.as_str() {
        "maglev" => Some(HashMethod::Maglev),
        "ring" => Some(HashMethod::Ring),
        other => {
            c.err(
                "balance.hash_method",
                format!("unknown method {other:?} (expected \"maglev\" or \"ring\")"),
            );
            None
        }
    };
    let algorithm = match c.str_or(&t, "algorithm", "round_robin")?.as_str() {
        "round_robin" => Some(Algorithm::RoundRobin),
        "consistent_hash" => method.map(Algorithm::ConsistentHash),
        other => {
            c.err(
                "balance.algorithm",
                format!(
                    "unknown algorithm {other:?} (expected \"round_robin\" or \"consistent_hash\")"
                ),
            );
            None
        }
    };
    let hash_key = match parse_hash_key(&c.str_or(&t, "hash_key", "client_ip")?) {
        Ok(k) => Some(k),
        Err(e) => {
            c.err("balance.hash_key", e);
            None
        }
    };
    let bounded_load = match c.float(&t, "bounded_load", 0.0)? {
        x if x == 0.0 || (1.0..=100.0).contains(&x) => Some(x),
        x => {
            c.err(
                "balance.bounded_load",
                format!("must be 0 (off) or 1.0..=100.0, got {x}"),
            );
            None
        }
    };
    method?;
    Some(BalanceConfig {
        algorithm: algorithm?,
        hash_key: hash_key?,
        bounded_load: bounded_load?,
    })
}

fn health(c: &mut Checker, v: Option<&Value>) -> Option<HealthConfig> {
    let t = c.table(
        v,
        "health",
        &[
            "path",
            "interval",
            "timeout",
            "rise",
            "fall",
            "passive_failures",
            "max_ejected_percent",
            "panic_below_percent",
        ],
    );
    let path = c.str_or(&t, "path", "/healthz")?;
    if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
        c.err(
            "health.path",
            format!("bad path {path:?} (expected an absolute path like /healthz)"),
        );
    }
    let interval = c.duration(&t, "interval", "1s");
    let timeout = c.duration(&t, "timeout", "500ms");
    let rise = c.int(&t, "rise", 2, 1..=100);
    let fall = c.int(&t, "fall", 3, 1..=100);
    let passive = c.int(&t, "passive_failures", 5, 0..=10_000);
    let max_ej = c.int(&t, "max_ejected_percent", 50, 0..=100);
    let panic = c.int(&t, "panic_below_percent", 50, 0..=100);
    Some(HealthConfig {
        path,
        interval: interval?,
        timeout: timeout?,
        rise: rise? as u32,
        fall: fall? as u32,
        passive_failures: passive? as u32,
        max_ejected_percent: max_ej? as u8,
        panic_below_percent: panic? as u8,
    })
}

fn cluster(c: &mut Checker, v: Option<&Value>, me: Option<&NodeId>) -> Option<ClusterConfig> {
    let t = c.table(
        v,
        "cluster",
        &[
            "listen",
            "peers",
            "heartbeat_interval",
            "phi_threshold",
            "dead_after",
            "tls",
        ],
    );
    let listen = c.addr_or(&t, "listen", "127.0.0.1:7001");
    let heartbeat_interval = c.duration(&t, "heartbeat_interval", "250ms");
    let phi = match c.float(&t, "phi_threshold", 8.0)? {
        x if x > 0.0 && x <= 100.0 => Some(x),
        x => {
            c.err(
                "cluster.phi_threshold",
                format!("must be above 0 and at most 100, got {x}"),
            );
            None
        }
    };
    let dead_after = c.duration(&t, "dead_after", "5s");
    let mut peers = Some(Vec::new());
    match t.get("peers") {
        (_, None) => {}
        (key, Some(Value::Array(list))) => {
            let mut seen = BTreeSet::new();
            for (i, p) in list.iter().enumerate() {
                let path = format!("{key}[{i}]");
                let pt = c.table(Some(p), &path, &["id", "addr"]);
                let id = c.string(&pt, "id").flatten();
                let addr = c.string(&pt, "addr").flatten();
                match (id, addr) {
                    (Some(id), Some(addr)) => {
                        if !valid_node_id(&id) {
                            c.err(
                                &format!("{path}.id"),
                                format!("bad id {id:?} (expected [a-z0-9-]{{1,32}})"),
                            );
                            peers = None;
                        } else if Some(&NodeId::new(id.clone())) == me {
                            c.err(
                                &format!("{path}.id"),
                                format!("{id:?} is this node's own id; list only the other peers"),
                            );
                            peers = None;
                        } else if !seen.insert(id.clone()) {
                            c.err(&format!("{path}.id"), format!("duplicate peer id {id:?}"));
                            peers = None;
                        }
                        if addr
                            .rsplit_once(':')
                            .and_then(|(_, p)| p.parse::<u16>().ok())
                            .is_none()
                        {
                            c.err(
                                &format!("{path}.addr"),
                                format!("bad address {addr:?} (expected host:port)"),
                            );
                            peers = None;
                        }
                        if let Some(ps) = peers.as_mut() {
                            ps.push(PeerConfig {
                                id: NodeId::new(id),
                                addr,
                            });
                        }
                    }
                    (id, addr) => {
                        if id.is_none() {
                            c.err(&format!("{path}.id"), "required");
                        }
                        if addr.is_none() {
                            c.err(&format!("{path}.addr"), "required");
                        }
                        peers = None;
                    }
                }
            }
        }
        (key, Some(v)) => {
            c.err(
                &key,
                format!(
                    "expected a list of {{ id, addr }} tables, got {}",
                    type_name(v)
                ),
            );
            peers = None;
        }
    }
    let tls = match t.get("tls").1 {
        None => Some(None),
        Some(_) => {
            let tt = c.sub(&t, "tls", &["ca", "cert", "key"]);
            let ca = c.required_file(&tt, "ca");
            let cert = c.required_file(&tt, "cert");
            let key = c.required_file(&tt, "key");
            match (ca, cert, key) {
                (Some(ca), Some(cert), Some(key)) => Some(Some(ClusterTls { ca, cert, key })),
                _ => None,
            }
        }
    };
    if let (Some(Some(_)), Some(ps)) = (&tls, &peers) {
        // With TLS, ids are the DNS names in the peers' certificates.
        let mut ids: Vec<String> = ps.iter().map(|p| p.id.to_string()).collect();
        if let Some(me) = me {
            ids.push(me.to_string());
        }
        for id in ids {
            if rustls::pki_types::ServerName::try_from(id.as_str()).is_err()
                || id.bytes().all(|b| b.is_ascii_digit())
            {
                c.err("cluster.tls", format!("node id {id:?} is not a valid DNS name, which TLS needs (certificates name peers by id)"));
            }
        }
    }
    if let (Some(l), Some(None)) = (listen, &tls) {
        if !l.ip().is_loopback() {
            c.err(
                "cluster.listen",
                format!("{l} is not a loopback address: [cluster.tls] (mutual TLS between peers) is required"),
            );
        }
    }
    Some(ClusterConfig {
        listen: listen?,
        peers: peers?,
        heartbeat_interval: heartbeat_interval?,
        phi_threshold: phi?,
        dead_after: dead_after?,
        tls: tls?,
    })
}

fn admin(c: &mut Checker, v: Option<&Value>) -> Option<AdminConfig> {
    let t = c.table(v, "admin", &["listen", "token"]);
    let listen = c.addr_or(&t, "listen", "127.0.0.1:9901")?;
    let token = c.string(&t, "token")?;
    if matches!(&token, Some(s) if s.is_empty()) {
        c.err("admin.token", "must not be empty");
    }
    if token.is_none() && !listen.ip().is_loopback() {
        c.err(
            "admin.listen",
            format!("{listen} is not a loopback address: admin.token is required"),
        );
    }
    Some(AdminConfig { listen, token })
}

fn log(c: &mut Checker, v: Option<&Value>) -> Option<LogConfig> {
    let t = c.table(v, "log", &["level", "format", "access_log"]);
    let level = c.str_or(&t, "level", "info")?;
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
        c.err("log.level", format!("bad filter {level:?}: {e}"));
    }
    let format = match c.str_or(&t, "format", "text")?.as_str() {
        "text" => Some(LogFormat::Text),
        "json" => Some(LogFormat::Json),
        other => {
            c.err(
                "log.format",
                format!("unknown format {other:?} (expected \"text\" or \"json\")"),
            );
            None
        }
    };
    let access_log = c.boolean(&t, "access_log", false);
    Some(LogConfig {
        level,
        format: format?,
        access_log: access_log?,
    })
}

fn backends(c: &mut Checker, v: Option<&Value>) -> Option<Vec<Backend>> {
    let list = match v {
        None => return Some(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(v) => {
            c.err(
                "backends",
                format!("expected [[backends]] tables, got {}", type_name(v)),
            );
            return None;
        }
    };
    let mut out = Vec::new();
    let mut ok = true;
    let mut ids = BTreeSet::new();
    let mut addrs = BTreeSet::new();
    for (i, b) in list.iter().enumerate() {
        let path = format!("backends[{i}]");
        let t = c.table(Some(b), &path, &["addr", "weight", "id"]);
        let addr = match c.string(&t, "addr").flatten() {
            None => {
                c.err(&format!("{path}.addr"), "required (host:port)");
                None
            }
            Some(a) => match normalize_backend_addr(&a) {
                Ok(a) => Some(a),
                Err(e) => {
                    c.err(&format!("{path}.addr"), e);
                    None
                }
            },
        };
        let weight = c.int(&t, "weight", 1, 1..=1000);
        let id = c.string(&t, "id").flatten();
        let (Some(addr), Some(weight)) = (addr, weight) else {
            ok = false;
            continue;
        };
        let id = id.unwrap_or_else(|| addr.clone());
        if !valid_backend_id(&id) {
            c.err(
                &format!("{path}.id"),
                format!("bad id {id:?} (1 to 64 printable characters, no spaces or '/')"),
            );
            ok = false;
            continue;
        }
        if !ids.insert(id.clone()) {
            c.err(
                &format!("{path}.id"),
                format!("duplicate backend id {id:?}"),
            );
            ok = false;
        }
        if !addrs.insert(addr.clone()) {
            c.err(
                &format!("{path}.addr"),
                format!("duplicate backend address {addr:?}"),
            );
            ok = false;
        }
        out.push(Backend::new(id, addr, weight as u32));
    }
    ok.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<Config, ConfigErrors> {
        parse_env(toml, &[])
    }

    fn parse_env(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shoal.toml");
        std::fs::write(&p, toml).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        from_value(&read_raw(&p, env)?)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("[node]\nid = \"a\"\n").unwrap();
        assert_eq!(c.node.data_dir, PathBuf::from("data/a"));
        assert_eq!(c.proxy.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(c.proxy.retries, 2);
        assert_eq!(c.health.interval, Duration::from_secs(1));
        assert_eq!(c.health.timeout, Duration::from_millis(500));
        assert_eq!(c.balance.algorithm, Algorithm::RoundRobin);
        assert_eq!(c.balance.hash_key, HashKey::ClientIp);
        assert_eq!(c.cluster.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert!(c.cluster.peers.is_empty());
        assert_eq!(c.rules().cluster_size, 1);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let errs = parse(
            r#"
            [node]
            id = "a"
            colour = "blue"
            [balance]
            hash_key = "foo"
            [health]
            interval = "soon"
            [[backends]]
            addr = "127.0.0.1:9001"
            [[backends]]
            addr = "127.0.0.1:9002"
            weight = 0
            "#,
        )
        .unwrap_err()
        .0;
        let all = errs.join("\n");
        assert!(all.contains("node.colour: unknown key"), "{all}");
        assert!(all.contains(r#"balance.hash_key: unknown source "foo" (expected header:NAME, cookie:NAME, query:NAME, path or client_ip)"#), "{all}");
        assert!(all.contains("health.interval: bad duration"), "{all}");
        assert!(
            all.contains("backends[1].weight: must be 1..=1000, got 0"),
            "{all}"
        );
        assert_eq!(errs.len(), 4, "{all}");
    }

    #[test]
    fn env_overrides_win_and_lists_split() {
        let c = parse_env(
            "[node]\nid = \"a\"\n[admin]\nlisten = \"127.0.0.1:9901\"\n",
            &[
                ("SHOAL__ADMIN__LISTEN", "127.0.0.1:9911"),
                ("SHOAL__PROXY__LISTEN", "127.0.0.1:8080,127.0.0.1:8081"),
                ("SHOAL__PROXY__RETRIES", "4"),
            ],
        )
        .unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:9911".parse().unwrap());
        assert_eq!(c.proxy.listen.len(), 2);
        assert_eq!(c.proxy.retries, 4);
    }

    #[test]
    fn security_rules() {
        let errs = parse(
            "[node]\nid = \"a\"\n[cluster]\nlisten = \"0.0.0.0:7001\"\n[admin]\nlisten = \"0.0.0.0:9901\"\n",
        )
        .unwrap_err()
        .0
        .join("\n");
        assert!(
            errs.contains("cluster.listen: 0.0.0.0:7001 is not a loopback address"),
            "{errs}"
        );
        assert!(
            errs.contains(
                "admin.listen: 0.0.0.0:9901 is not a loopback address: admin.token is required"
            ),
            "{errs}"
        );
    }

    #[test]
    fn peers_and_backends_checked() {
        let errs = parse(
            r#"
            [node]
            id = "a"
            [cluster]
            peers = [{ id = "a", addr = "127.0.0.1:7002" }, { id = "B", addr = "x" }]
            [[backends]]
            addr = "nope"
            [[backends]]
            addr = "127.0.0.1:9001"
            id = "w"
            [[backends]]
            addr = "127.0.0.1:9002"
            id = "w"
            "#,
        )
        .unwrap_err()
        .0
        .join("\n");
        assert!(
            errs.contains("cluster.peers[0].id: \"a\" is this node's own id"),
            "{errs}"
        );
        assert!(errs.contains("cluster.peers[1].id: bad id \"B\""), "{errs}");
        assert!(
            errs.contains("cluster.peers[1].addr: bad address"),
            "{errs}"
        );
        assert!(
            errs.contains("backends[0].addr: bad address \"nope\""),
            "{errs}"
        );
        assert!(
            errs.contains("backends[2].id: duplicate backend id \"w\""),
            "{errs}"
        );
    }

    #[test]
    fn missing_file_and_missing_id() {
        let e = read_raw(Path::new("/nonexistent/shoal.toml"), []).unwrap_err();
        assert!(e.0[0].contains("cannot read config file"));
        let e = parse("[proxy]\nretries = 1\n").unwrap_err();
        assert!(e.0[0].starts_with("node.id: required"), "{e}");
    }

    #[test]
    fn hash_keys() {
        assert_eq!(parse_hash_key("path").unwrap(), HashKey::Path);
        assert_eq!(
            parse_hash_key("cookie:sid").unwrap(),
            HashKey::Cookie("sid".into())
        );
        assert_eq!(
            parse_hash_key("query:u").unwrap(),
            HashKey::Query("u".into())
        );
        assert!(matches!(
            parse_hash_key("header:X-User").unwrap(),
            HashKey::Header(_)
        ));
        assert!(parse_hash_key("header:").is_err());
        assert!(parse_hash_key("body").is_err());
    }

    #[test]
    fn backend_addrs() {
        assert_eq!(
            normalize_backend_addr("127.0.0.1:9001").unwrap(),
            "127.0.0.1:9001"
        );
        assert_eq!(normalize_backend_addr("http://web:80/").unwrap(), "web:80");
        assert_eq!(
            normalize_backend_addr("https://web:443").unwrap(),
            "https://web:443"
        );
        assert_eq!(normalize_backend_addr("[::1]:80").unwrap(), "[::1]:80");
        assert!(normalize_backend_addr("web").is_err());
        assert!(normalize_backend_addr("web:0").is_err());
        assert!(normalize_backend_addr("a b:80").is_err());
    }
}
