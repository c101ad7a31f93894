//! The config file: TOML plus `SHOAL__SECTION__KEY` environment overrides, read with the `config`
//! crate, shaped by serde into the typed structures below (defaults in their `Default`), then
//! checked by one pass of rules over the typed values.
//!
//! Every problem is reported at once, each naming its key as a path, e.g.
//! `backends[1].weight: must be 1..=1000, got 0`: every unknown key, every broken rule, and the
//! first wrong-typed value of each section and list entry (each is read on its own). The backend
//! rules (address, id, weight) are the core's, shared with the admin API.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{DeserializeOwned, Deserializer, Error as _, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::core::balance::{Algorithm, BalanceSpec, HashMethod};
use crate::core::health::Thresholds;
use crate::core::pool::{self, Backend, NodeId, Overrides, Rules, ServiceDef, ServiceSeed};

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
    /// Backends found by DNS and agreed by the peers.
    pub discovery: Vec<DiscoveryConfig>,
    /// `[[services]]`: the services besides `default` (the top-level one).
    pub services: Vec<ServiceConfig>,
    /// The top-level `[balance]` and `[health]` tables as read, defaults filled in: what a
    /// service's own keys are laid over.
    pub base: BaseTables,
}

/// The top-level `[balance]` and `[health]` tables, as values.
#[derive(Clone, Debug, Default)]
pub struct BaseTables {
    pub balance: Value,
    pub health: Value,
}

/// One `[[services]]` entry.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub name: String,
    /// Hosts, prefix, strip, and the balance and health keys it sets (agreed state).
    pub def: ServiceDef,
    /// Seeds its pool when the agreed state has none.
    pub backends: Vec<Backend>,
    /// This peer's discovery sources for it.
    pub discovery: Vec<DiscoveryConfig>,
    /// Its effective settings: the top-level ones with its own keys laid over.
    pub balance: BalanceConfig,
    pub health: HealthConfig,
}

/// The raw `[[services]]` entry; its tables and lists are read on their own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    #[serde(deserialize_with = "text")]
    name: String,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default, deserialize_with = "text")]
    path_prefix: Option<String>,
    #[serde(default)]
    strip_prefix: bool,
    #[serde(default)]
    balance: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    health: Option<serde_json::Map<String, Value>>,
    #[serde(default, deserialize_with = "elsewhere")]
    #[allow(dead_code)]
    backends: (),
    #[serde(default, deserialize_with = "elsewhere")]
    #[allow(dead_code)]
    discovery: (),
}

/// What a `[[discovery]]` source resolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryKind {
    /// A and AAAA records, with `port`.
    A,
    /// SRV records: target and port from each record.
    Srv,
}

/// One `[[discovery]]` source.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    #[serde(deserialize_with = "text")]
    pub name: String,
    #[serde(rename = "type", default = "kind_a")]
    pub kind: DiscoveryKind,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(with = "humantime_serde", default = "five_s")]
    pub interval: Duration,
    #[serde(with = "humantime_serde", default = "thirty_s")]
    pub remove_after: Duration,
    #[serde(default, deserialize_with = "opt_addr")]
    pub resolver: Option<SocketAddr>,
    #[serde(default = "one32")]
    pub weight: u32,
    /// "http1" (default) or "h2", for the backends it finds (checked by `discovery_rules`).
    #[serde(default, deserialize_with = "text")]
    pub protocol: Option<String>,
}

impl DiscoveryConfig {
    /// The protocol the found backends are spoken to with.
    pub fn protocol(&self) -> pool::Protocol {
        self.protocol
            .as_deref()
            .and_then(|p| p.parse().ok())
            .unwrap_or_default()
    }
}

fn kind_a() -> DiscoveryKind {
    DiscoveryKind::A
}
fn five_s() -> Duration {
    Duration::from_secs(5)
}
fn thirty_s() -> Duration {
    Duration::from_secs(30)
}
fn one32() -> u32 {
    1
}

fn opt_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    parse_addr::<D::Error>(&s).map(Some)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    #[serde(deserialize_with = "text")]
    pub id: NodeId,
    /// Defaults to `data/<id>`.
    #[serde(default)]
    pub data_dir: PathBuf,
    /// `shoal run --force-new-cluster` (never from the file).
    #[serde(skip)]
    pub force_new_cluster: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(deserialize_with = "addrs")]
    pub listen: Vec<SocketAddr>,
    pub workers: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    pub max_connections: usize,
    pub retries: u32,
    pub max_header_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub tunnel_idle_timeout: Duration,
    /// Plain-TCP client and backend connections through one io_uring per worker.
    pub io_uring: bool,
    #[serde(default)]
    pub tls: Option<ProxyTls>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyTls {
    #[serde(deserialize_with = "addrs")]
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

impl std::str::FromStr for HashKey {
    type Err = String;

    /// `header:NAME | cookie:NAME | query:NAME | path | client_ip`.
    fn from_str(s: &str) -> Result<HashKey, String> {
        let bad = || {
            format!("unknown source {s:?} (expected header:NAME, cookie:NAME, query:NAME, path or client_ip)")
        };
        let (kind, name) = match s {
            "path" => return Ok(HashKey::Path),
            "client_ip" => return Ok(HashKey::ClientIp),
            _ => s.split_once(':').ok_or_else(bad)?,
        };
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
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmName {
    RoundRobin,
    ConsistentHash,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceConfig {
    pub algorithm: AlgorithmName,
    pub hash_key: HashKey,
    #[serde(with = "hash_method")]
    pub hash_method: HashMethod,
    pub bounded_load: f64,
}

impl BalanceConfig {
    /// The keys as the config file and the admin API write them.
    pub fn shown(&self) -> Value {
        serde_json::json!({
            "algorithm": match self.algorithm {
                AlgorithmName::RoundRobin => "round_robin",
                AlgorithmName::ConsistentHash => "consistent_hash",
            },
            "hash_key": self.hash_key.to_string(),
            "hash_method": match self.hash_method {
                HashMethod::Maglev => "maglev",
                HashMethod::Ring => "ring",
            },
            "bounded_load": self.bounded_load,
        })
    }

    pub fn spec(&self) -> BalanceSpec {
        BalanceSpec {
            algorithm: match self.algorithm {
                AlgorithmName::RoundRobin => Algorithm::RoundRobin,
                AlgorithmName::ConsistentHash => Algorithm::ConsistentHash(self.hash_method),
            },
            bounded_load: self.bounded_load,
        }
    }
}

/// `hash_method` by name (the core's `HashMethod` knows nothing of serde).
mod hash_method {
    use super::*;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HashMethod, D::Error> {
        match String::deserialize(d)?.as_str() {
            "maglev" => Ok(HashMethod::Maglev),
            "ring" => Ok(HashMethod::Ring),
            other => Err(D::Error::custom(format!(
                "unknown method {other:?} (expected \"maglev\" or \"ring\")"
            ))),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    pub path: String,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub passive_failures: u32,
    pub max_ejected_percent: u8,
    pub panic_below_percent: u8,
    /// Each backend is actively probed by this many voters (rendezvous-hashed); 0 = every peer.
    pub probers: u32,
    /// A backend that becomes usable ramps from 10% to 100% of its weight over this long.
    #[serde(with = "humantime_serde")]
    pub slow_start: Duration,
}

impl HealthConfig {
    /// The keys as the config file and the admin API write them.
    pub fn shown(&self) -> Value {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        serde_json::json!({
            "path": self.path,
            "interval": d(self.interval),
            "timeout": d(self.timeout),
            "rise": self.rise,
            "fall": self.fall,
            "passive_failures": self.passive_failures,
            "max_ejected_percent": self.max_ejected_percent,
            "panic_below_percent": self.panic_below_percent,
            "probers": self.probers,
            "slow_start": d(self.slow_start),
        })
    }

    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            rise: self.rise,
            fall: self.fall,
            passive_failures: self.passive_failures,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    #[serde(deserialize_with = "text")]
    pub id: NodeId,
    pub addr: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    #[serde(deserialize_with = "addr")]
    pub listen: SocketAddr,
    /// Read entry by entry (see `from_value`).
    #[serde(deserialize_with = "elsewhere")]
    pub peers: Vec<PeerConfig>,
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    pub phi_threshold: f64,
    #[serde(with = "humantime_serde")]
    pub dead_after: Duration,
    #[serde(default)]
    pub tls: Option<ClusterTls>,
    /// `voter` (an acceptor, counted in quorums) or `learner` (routes, probes and learns the
    /// pool; proposes through the voters; never in a quorum).
    #[serde(default)]
    pub role: Role,
    /// The address other peers dial for this peer (empty: `listen`).
    pub advertise: String,
    pub autopilot: AutopilotConfig,
}

/// `[cluster.autopilot]`: keep `voters` voters by replacing dead ones with ready learners.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutopilotConfig {
    pub enabled: bool,
    pub voters: usize,
    #[serde(with = "humantime_serde")]
    pub dead_after: Duration,
    #[serde(with = "humantime_serde")]
    pub stabilization: Duration,
}

/// A peer's part in consensus, from `cluster.role`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    #[default]
    Voter,
    Learner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Voter => "voter",
            Role::Learner => "learner",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(deserialize_with = "addr")]
    pub listen: SocketAddr,
    #[serde(default, deserialize_with = "text")]
    pub token: Option<String>,
    /// The token read from a file (a mounted secret); trailing whitespace is dropped.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub access_log: bool,
}

/// One `[[backends]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendEntry {
    addr: String,
    #[serde(default = "one")]
    weight: u64,
    #[serde(default, deserialize_with = "text")]
    id: Option<String>,
    #[serde(default, deserialize_with = "text")]
    protocol: Option<String>,
}

fn one() -> u64 {
    1
}

/// Durations as "250ms", "2s", "1m".
mod humantime_serde {
    use super::*;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            D::Error::custom(format!(
                "bad duration {s:?} ({e}; expected e.g. \"250ms\", \"2s\", \"1m\")"
            ))
        })
    }
}

/// A string, also from a number (an environment override turns `7` into one).
fn text<'de, D: Deserializer<'de>, T: From<String>>(d: D) -> Result<T, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(T::from(s)),
        Value::Number(n) => Ok(T::from(n.to_string())),
        v => Err(D::Error::custom(format!(
            "expected a string, got {}",
            type_name(&v)
        ))),
    }
}

/// A key read elsewhere (a list read entry by entry): accepted here, its value skipped.
fn elsewhere<'de, D: Deserializer<'de>, T: Default>(d: D) -> Result<T, D::Error> {
    serde::de::IgnoredAny::deserialize(d)?;
    Ok(T::default())
}

fn parse_addr<E: serde::de::Error>(s: &str) -> Result<SocketAddr, E> {
    s.parse().map_err(|_| {
        E::custom(format!(
            "bad address {s:?} (expected IP:PORT, e.g. 127.0.0.1:8080)"
        ))
    })
}

fn addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    parse_addr(&String::deserialize(d)?)
}

/// One address or a list of them.
fn addrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let list = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    if list.is_empty() {
        return Err(D::Error::custom("must list at least one address"));
    }
    list.iter().map(|s| parse_addr(s)).collect()
}

impl Config {
    /// The services' definitions and seed backends, as the register holds them.
    pub fn service_seeds(&self) -> Vec<ServiceSeed> {
        self.services
            .iter()
            .map(|s| ServiceSeed {
                name: s.name.clone(),
                def: s.def.clone(),
                backends: s.backends.clone(),
            })
            .collect()
    }

    /// The effective settings of a service defined `def`: this config's top-level `[balance]`
    /// and `[health]` with the service's own keys laid over, checked by the same rules. An
    /// error names each bad key (`balance.algorithm: ...`).
    pub fn effective(&self, def: &ServiceDef) -> Result<(BalanceConfig, HealthConfig), String> {
        let mut c = Checker::default();
        let read = service_tables(&mut c, "", &self.base, &def.balance, &def.health);
        match read {
            Some(t) if c.errors.is_empty() => Ok(t),
            _ => Err(c.errors.join("; ")),
        }
    }

    /// The rules pool changes are applied under.
    pub fn rules(&self) -> Rules {
        Rules {
            cluster_size: self.cluster.peers.len() + 1,
            max_ejected_percent: self.health.max_ejected_percent,
            probers: self.health.probers as usize,
            now_unix_ms: 0,
        }
    }

    /// A short human summary, printed by `shoal check`.
    pub fn summary(&self) -> String {
        let alg = match self.balance.spec().algorithm {
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
            "node {} ({}): proxy on {}{}, admin on {}, cluster on {} with {} other peer(s), {} seed backend(s){}{}, {}",
            self.node.id,
            self.cluster.role.as_str(),
            listen.join(", "),
            if self.proxy.tls.is_some() { " (+TLS)" } else { "" },
            self.admin.listen,
            self.cluster.listen,
            self.cluster.peers.len(),
            self.backends.len(),
            match self.discovery.len() {
                0 => String::new(),
                n => format!(", {n} discovery source(s)"),
            },
            match self.services.len() {
                0 => String::new(),
                n => format!(", {n} more service(s)"),
            },
            alg
        )
    }
}

/// Every problem found in a config, each naming its key.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

/// The shipped defaults (SPEC section 2), under every config: the one place they are written.
const DEFAULTS: &str = r#"
[proxy]
listen = ["127.0.0.1:8080"]
workers = 0
connect_timeout = "1s"
request_timeout = "30s"
client_idle_timeout = "60s"
max_connections = 10000
retries = 2
max_header_bytes = 65536
shutdown_grace = "10s"
shutdown_delay = "0s"
tunnel_idle_timeout = "1h"
io_uring = true
[balance]
algorithm = "round_robin"
hash_key = "client_ip"
hash_method = "maglev"
bounded_load = 0.0
[health]
path = "/healthz"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 3
passive_failures = 5
max_ejected_percent = 50
panic_below_percent = 50
probers = 0
slow_start = "0s"
[cluster]
listen = "127.0.0.1:7001"
peers = []
heartbeat_interval = "250ms"
phi_threshold = 8.0
dead_after = "5s"
advertise = ""
[cluster.autopilot]
enabled = false
voters = 3
dead_after = "5m"
stabilization = "10s"
[admin]
listen = "127.0.0.1:9901"
[log]
level = "info"
format = "text"
access_log = false
"#;

/// Defaults of tables that exist only when configured.
const TLS_LISTEN: &str = "0.0.0.0:8443";

/// `over` laid over `under`, table by table (other values replace).
fn merge(under: &mut Value, over: &Value) {
    match (under, over) {
        (Value::Object(u), Value::Object(o)) => {
            for (k, v) in o {
                merge(u.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (u, o) => *u = o.clone(),
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
    let fail = |e: &dyn fmt::Display| ConfigErrors(vec![format!("{}: {e}", path.display())]);
    std::fs::metadata(path).map_err(|e| fail(&format_args!("cannot read config file: {e}")))?;
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
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(source)
        .build()
        .and_then(|c| c.try_deserialize::<Value>())
        .map_err(|e| fail(&e))
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

/// The keys a config structure accepts, as serde's derive lists them (it hands them to
/// `deserialize_struct`, where this deserializer catches them).
fn keys_of<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Catch<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Catch<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Self::Error::custom("caught"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut keys: &'static [&'static str] = &[];
    let _ = T::deserialize(Catch(&mut keys));
    keys
}

/// Collects problems; each names its key.
#[derive(Default)]
struct Checker {
    errors: Vec<String>,
}

impl Checker {
    fn err(&mut self, key: &str, msg: impl fmt::Display) {
        self.errors.push(format!("{key}: {msg}"));
    }

    /// The table at `path` as `T`: unknown keys are each reported (and set aside so the rest
    /// still reads); a value of the wrong type is reported with its key.
    fn read<T: DeserializeOwned>(&mut self, path: &str, v: Option<&Value>) -> Option<T> {
        let mut v = v.cloned().unwrap_or(Value::Object(Default::default()));
        if let Value::Object(map) = &mut v {
            let known = keys_of::<T>();
            map.retain(|k, _| {
                let ok = known.contains(&k.as_str());
                if !ok {
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
                ok
            });
        }
        match serde_path_to_error::deserialize::<_, T>(v) {
            Ok(t) => Some(t),
            Err(e) => {
                let inner = e.path().to_string();
                let key = match (path, inner.as_str()) {
                    (p, ".") => p.to_string(),
                    ("", i) => i.to_string(),
                    (p, i) => format!("{p}.{i}"),
                };
                let msg = e.into_inner().to_string();
                // serde names a missing key in its message; the key is the table's.
                self.err(&key, msg.replace("missing field", "missing key"));
                None
            }
        }
    }

    /// The list at `key`, each entry read on its own as `T`.
    fn entries<T: DeserializeOwned>(&mut self, key: &str, v: Option<&Value>) -> Option<Vec<T>> {
        let list = match v {
            None => return Some(Vec::new()),
            Some(Value::Array(a)) => a,
            Some(v) => {
                self.err(
                    key,
                    format!("expected a list of tables, got {}", type_name(v)),
                );
                return None;
            }
        };
        let read: Vec<Option<T>> = list
            .iter()
            .enumerate()
            .map(|(i, e)| self.read(&format!("{key}[{i}]"), Some(e)))
            .collect();
        read.into_iter().collect()
    }

    /// A rule: report `msg` at `key` unless `ok`.
    fn rule(&mut self, ok: bool, key: &str, msg: impl FnOnce() -> String) {
        if !ok {
            self.err(key, msg());
        }
    }

    fn range<T: PartialOrd + fmt::Display>(&mut self, key: &str, v: T, lo: T, hi: T) {
        let ok = lo <= v && v <= hi;
        self.rule(ok, key, || format!("must be {lo}..={hi}, got {v}"));
    }

    fn positive(&mut self, key: &str, d: Duration) {
        self.rule(!d.is_zero(), key, || "must be greater than zero".into());
    }

    fn readable(&mut self, key: &str, p: &Path) {
        if let Err(e) = std::fs::metadata(p) {
            self.err(key, format!("cannot read {}: {e}", p.display()));
        }
    }
}

/// Validate a raw tree into a `Config`, collecting every problem.
pub fn from_value(raw: &Value) -> Result<Config, ConfigErrors> {
    let tree = with_defaults(raw)?;
    let mut c = Checker::default();
    unknown_sections(&mut c, &tree);
    let mut read = Sections::read(&mut c, &tree);
    read.check(&mut c);
    match read.config() {
        Some(config) if c.errors.is_empty() => Ok(config),
        _ => Err(ConfigErrors(c.errors)),
    }
}

/// The built-in defaults with `raw` laid over them (and the TLS listener's default address
/// when `[proxy.tls]` is set).
fn with_defaults(raw: &Value) -> Result<Value, ConfigErrors> {
    let mut tree = config::Config::builder()
        .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
        .build()
        .and_then(|d| d.try_deserialize::<Value>())
        .map_err(|e| ConfigErrors(vec![format!("built-in defaults: {e}")]))?;
    merge(&mut tree, raw);
    if let Some(tls) = tree
        .pointer_mut("/proxy/tls")
        .and_then(Value::as_object_mut)
    {
        tls.entry("listen").or_insert_with(|| TLS_LISTEN.into());
    }
    Ok(tree)
}

/// Every top-level key that names no section is an error; the sections are read one by one.
fn unknown_sections(c: &mut Checker, tree: &Value) {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // only its keys are used
    struct Root {
        node: Value,
        proxy: Value,
        balance: Value,
        health: Value,
        cluster: Value,
        admin: Value,
        log: Value,
        backends: Value,
        discovery: Value,
        services: Value,
    }
    let known = keys_of::<Root>();
    for k in tree.as_object().into_iter().flat_map(|m| m.keys()) {
        if !known.contains(&k.as_str()) {
            c.err(
                k,
                format!("unknown key (expected one of: {})", known.join(", ")),
            );
        }
    }
}

/// Each section read into its type (None where it could not be: the problem is recorded).
struct Sections {
    node: Option<NodeConfig>,
    proxy: Option<ProxyConfig>,
    balance: Option<BalanceConfig>,
    health: Option<HealthConfig>,
    cluster: Option<ClusterConfig>,
    admin: Option<AdminConfig>,
    log: Option<LogConfig>,
    backends: Option<Vec<Backend>>,
    discovery: Option<Vec<DiscoveryConfig>>,
    services: Option<Vec<ServiceConfig>>,
    base: BaseTables,
}

impl Sections {
    /// Read every section of `tree`, each list entry by entry.
    fn read(c: &mut Checker, tree: &Value) -> Sections {
        let section = |name: &str| tree.get(name);
        let node: Option<NodeConfig> = match section("node") {
            None => {
                c.err(
                    "node.id",
                    "required (a unique id for this peer, [a-z0-9-]{1,32})",
                );
                None
            }
            v => c.read("node", v),
        };
        let node = node.map(|mut n| {
            if n.data_dir.as_os_str().is_empty() {
                n.data_dir = PathBuf::from(format!("data/{}", n.id));
            }
            n
        });
        let proxy = c.read("proxy", section("proxy"));
        let balance = c.read("balance", section("balance"));
        let health = c.read("health", section("health"));
        let mut cluster: Option<ClusterConfig> = c.read("cluster", section("cluster"));
        let peers = c.entries::<PeerConfig>(
            "cluster.peers",
            section("cluster").and_then(|v| v.get("peers")),
        );
        if let (Some(cl), Some(peers)) = (cluster.as_mut(), peers) {
            cl.peers = peers;
        }
        let admin = c.read("admin", section("admin"));
        let log = c.read("log", section("log"));
        let entries = c.entries::<BackendEntry>("backends", section("backends"));
        let discovery = c.entries::<DiscoveryConfig>("discovery", section("discovery"));
        if let Some(list) = &discovery {
            discovery_rules(c, "discovery", list);
        }
        let base = BaseTables {
            balance: section("balance").cloned().unwrap_or_default(),
            health: section("health").cloned().unwrap_or_default(),
        };
        let services = services(c, section("services"), &base);
        let backends = entries.and_then(|e| backends(c, "backends", e));
        Sections {
            node,
            proxy,
            balance,
            health,
            cluster,
            admin,
            log,
            backends,
            discovery,
            services,
            base,
        }
    }

    /// The whole config, when every section could be read.
    fn config(self) -> Option<Config> {
        Some(Config {
            node: self.node?,
            proxy: self.proxy?,
            balance: self.balance?,
            health: self.health?,
            cluster: self.cluster?,
            admin: self.admin?,
            log: self.log?,
            backends: self.backends?,
            discovery: self.discovery?,
            services: self.services?,
            base: self.base,
        })
    }

    /// The rules over the typed sections (ranges, files, rules across keys); the admin token
    /// is read from its file here, and this peer is taken out of its own peer list.
    fn check(&mut self, c: &mut Checker) {
        if let Some(n) = &self.node {
            let id = n.id.as_str();
            c.rule(pool::valid_node_id(id), "node.id", || {
                format!("bad id {id:?} (expected [a-z0-9-]{{1,32}})")
            });
        }
        if let Some(p) = &self.proxy {
            proxy_rules(c, p);
        }
        if let Some(b) = &self.balance {
            balance_rules(c, "balance", b);
        }
        if let Some(h) = &self.health {
            health_rules(c, "health", h);
        }
        if let (Some(cl), Some(n)) = (&mut self.cluster, &self.node) {
            cluster_rules(c, cl, &n.id);
            cl.peers.retain(|p| p.id != n.id);
        }
        if let Some(a) = &mut self.admin {
            admin_rules(c, a);
        }
        if let Some(l) = &self.log {
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(&l.level) {
                c.err("log.level", format!("bad filter {:?}: {e}", l.level));
            }
        }
    }
}

/// The `[proxy]` ranges and timeouts, and its TLS certificate and key when set.
fn proxy_rules(c: &mut Checker, p: &ProxyConfig) {
    c.range("proxy.workers", p.workers, 0, 1024);
    c.range("proxy.max_connections", p.max_connections, 1, 1_000_000);
    c.range("proxy.retries", p.retries, 0, 16);
    c.range(
        "proxy.max_header_bytes",
        p.max_header_bytes,
        8_192,
        1_048_576,
    );
    for (k, d) in [
        ("connect_timeout", p.connect_timeout),
        ("request_timeout", p.request_timeout),
        ("client_idle_timeout", p.client_idle_timeout),
        ("shutdown_grace", p.shutdown_grace),
        ("tunnel_idle_timeout", p.tunnel_idle_timeout),
    ] {
        c.positive(&format!("proxy.{k}"), d);
    }
    if let Some(t) = &p.tls {
        c.readable("proxy.tls.cert", &t.cert);
        c.readable("proxy.tls.key", &t.key);
        if c.errors.is_empty() {
            if let Err(e) = crate::net::tls::load_termination(&t.cert, &t.key) {
                c.err("proxy.tls", e);
            }
        }
    }
}

/// The admin token (from `token_file` when set there) and the rule that a non-loopback admin
/// listener needs one.
fn admin_rules(c: &mut Checker, a: &mut AdminConfig) {
    if let Some(f) = &a.token_file {
        if a.token.is_some() {
            c.err(
                "admin.token_file",
                "set admin.token or admin.token_file, not both",
            );
        } else {
            match std::fs::read_to_string(f) {
                Ok(t) => a.token = Some(t.trim_end().to_string()),
                Err(e) => c.err(
                    "admin.token_file",
                    format!("cannot read {}: {e}", f.display()),
                ),
            }
        }
    }
    c.rule(
        a.token.as_ref().is_none_or(|t| !t.is_empty()),
        "admin.token",
        || "must not be empty".into(),
    );
    let l = a.listen;
    c.rule(
        a.token.is_some() || l.ip().is_loopback(),
        "admin.listen",
        || format!("{l} is not a loopback address: admin.token is required"),
    );
}

fn balance_rules(c: &mut Checker, key: &str, b: &BalanceConfig) {
    let x = b.bounded_load;
    c.rule(
        x == 0.0 || (1.0..=100.0).contains(&x),
        &format!("{key}.bounded_load"),
        || format!("must be 0 (off) or 1.0..=100.0, got {x}"),
    );
}

fn health_rules(c: &mut Checker, key: &str, h: &HealthConfig) {
    let k = |f: &str| format!("{key}.{f}");
    let path = &h.path;
    let ok = path.starts_with('/') && path.parse::<http::uri::PathAndQuery>().is_ok();
    c.rule(ok, &k("path"), || {
        format!("bad path {path:?} (expected an absolute path like /healthz)")
    });
    c.positive(&k("interval"), h.interval);
    c.positive(&k("timeout"), h.timeout);
    c.range(&k("rise"), h.rise, 1, 100);
    c.range(&k("fall"), h.fall, 1, 100);
    c.range(&k("passive_failures"), h.passive_failures, 0, 10_000);
    c.range(&k("max_ejected_percent"), h.max_ejected_percent, 0, 100);
    c.range(&k("panic_below_percent"), h.panic_below_percent, 0, 100);
    c.range(&k("probers"), h.probers, 0, 1_000);
    let ramp = h.slow_start;
    c.rule(
        ramp <= Duration::from_secs(86_400),
        &k("slow_start"),
        || format!("must be at most 24h, got {ramp:?}"),
    );
}

/// A service's effective `[balance]` and `[health]`: `base` with its own keys laid over, read
/// and checked as the top-level ones are (keys named under `prefix`, e.g. `services[1].`).
fn service_tables(
    c: &mut Checker,
    prefix: &str,
    base: &BaseTables,
    balance: &Overrides,
    health: &Overrides,
) -> Option<(BalanceConfig, HealthConfig)> {
    let over = |base: &Value, own: &Overrides| {
        let mut v = base.clone();
        if !v.is_object() {
            v = Value::Object(Default::default());
        }
        merge(&mut v, &Value::Object(own.0.clone().into_iter().collect()));
        v
    };
    let (bk, hk) = (format!("{prefix}balance"), format!("{prefix}health"));
    let b: Option<BalanceConfig> = c.read(&bk, Some(&over(&base.balance, balance)));
    let h: Option<HealthConfig> = c.read(&hk, Some(&over(&base.health, health)));
    if let Some(b) = &b {
        balance_rules(c, &bk, b);
    }
    if let Some(h) = &h {
        health_rules(c, &hk, h);
    }
    Some((b?, h?))
}

/// `[[services]]`: each entry's definition, tables, backends and discovery, every problem
/// named by its key; then the rules across services (names, routes).
fn services(c: &mut Checker, v: Option<&Value>, base: &BaseTables) -> Option<Vec<ServiceConfig>> {
    let list = match v {
        None => return Some(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(v) => {
            c.err(
                "services",
                format!("expected a list of tables, got {}", type_name(v)),
            );
            return None;
        }
    };
    if list.len() > pool::MAX_SERVICES {
        c.err(
            "services",
            format!(
                "at most {} services, got {}",
                pool::MAX_SERVICES,
                list.len()
            ),
        );
        return None;
    }
    let before = c.errors.len();
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    let mut routes: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (i, raw) in list.iter().enumerate() {
        let key = format!("services[{i}]");
        let Some(e) = c.read::<ServiceEntry>(&key, Some(raw)) else {
            continue;
        };
        let name = e.name.clone();
        service_name(c, &key, &name, &mut names);
        let def = service_def(c, &key, e);
        claim_routes(c, &key, i, &def, &mut routes);
        let tables = service_tables(c, &format!("{key}."), base, &def.balance, &def.health);
        let entries = c.entries::<BackendEntry>(&format!("{key}.backends"), raw.get("backends"));
        let backends = entries.and_then(|b| backends(c, &format!("{key}.backends"), b));
        let discovery =
            c.entries::<DiscoveryConfig>(&format!("{key}.discovery"), raw.get("discovery"));
        if let Some(d) = &discovery {
            discovery_rules(c, &format!("{key}.discovery"), d);
        }
        if let (Some((balance, health)), Some(backends), Some(discovery)) =
            (tables, backends, discovery)
        {
            out.push(ServiceConfig {
                name,
                def,
                backends,
                discovery,
                balance,
                health,
            });
        }
    }
    (c.errors.len() == before).then_some(out)
}

/// A service's name: valid, not `default`'s, and not another service's.
fn service_name(c: &mut Checker, key: &str, name: &str, names: &mut BTreeSet<String>) {
    if !pool::valid_service_name(name) {
        c.err(
            &format!("{key}.name"),
            format!("bad name {name:?} (expected [a-z0-9-]{{1,32}})"),
        );
    } else if name == pool::DEFAULT_SERVICE {
        c.err(
            &format!("{key}.name"),
            "\"default\" is the top-level service ([[backends]], [balance], [health])",
        );
    } else if !names.insert(name.to_string()) {
        c.err(
            &format!("{key}.name"),
            format!("duplicate service name {name:?}"),
        );
    }
}

/// A service's routing (its host patterns, path prefix, prefix stripping) and its own
/// `[balance]` and `[health]` keys, each checked.
fn service_def(c: &mut Checker, key: &str, e: ServiceEntry) -> ServiceDef {
    let mut hosts = Vec::new();
    for (j, h) in e.hosts.iter().enumerate() {
        match pool::check_host_pattern(h) {
            Ok(h) if hosts.contains(&h) => c.err(
                &format!("{key}.hosts[{j}]"),
                format!("{h:?} is listed twice"),
            ),
            Ok(h) => hosts.push(h),
            Err(err) => c.err(&format!("{key}.hosts[{j}]"), err),
        }
    }
    if let Some(p) = &e.path_prefix {
        if let Err(err) = pool::check_path_prefix(p) {
            c.err(&format!("{key}.path_prefix"), err);
        }
    }
    c.rule(
        !e.strip_prefix || e.path_prefix.is_some(),
        &format!("{key}.strip_prefix"),
        || "needs a path_prefix".into(),
    );
    ServiceDef {
        hosts,
        path_prefix: e.path_prefix,
        strip_prefix: e.strip_prefix,
        balance: Overrides(e.balance.unwrap_or_default().into_iter().collect()),
        health: Overrides(e.health.unwrap_or_default().into_iter().collect()),
    }
}

/// Each (host, path prefix) a service routes is claimed by service `i`, or is an error naming
/// the service that claimed it first.
fn claim_routes(
    c: &mut Checker,
    key: &str,
    i: usize,
    def: &ServiceDef,
    routes: &mut BTreeMap<(String, String), usize>,
) {
    for (j, (host, prefix)) in def.routes().into_iter().enumerate() {
        let pair = (host.to_string(), prefix.to_string());
        if let Some(k) = routes.get(&pair) {
            let at = if host.is_empty() {
                format!("{key}.path_prefix")
            } else {
                format!("{key}.hosts[{j}]")
            };
            let shown = if host.is_empty() { "any host" } else { host };
            c.err(
                &at,
                format!("{shown} with path prefix {prefix:?} is already services[{k}]'s"),
            );
        } else {
            routes.insert(pair, i);
        }
    }
}

fn discovery_rules(c: &mut Checker, at: &str, list: &[DiscoveryConfig]) {
    let mut names = BTreeSet::new();
    for (i, d) in list.iter().enumerate() {
        let key = |f: &str| format!("{at}[{i}].{f}");
        let name_ok = !d.name.is_empty()
            && d.name.len() <= 253
            && d.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        c.rule(name_ok, &key("name"), || {
            format!("bad DNS name {:?}", d.name)
        });
        c.rule(names.insert(d.name.as_str()), &key("name"), || {
            format!("duplicate discovery source {:?}", d.name)
        });
        match (d.kind, d.port) {
            (DiscoveryKind::A, None) => {
                c.err(&key("port"), "required for type \"a\" (the backends' port)")
            }
            (DiscoveryKind::A, Some(0)) => c.err(&key("port"), "must be 1..=65535, got 0"),
            (DiscoveryKind::Srv, Some(_)) => c.err(
                &key("port"),
                "not for type \"srv\" (the records give the port)",
            ),
            _ => {}
        }
        c.positive(&key("interval"), d.interval);
        c.rule(d.remove_after >= d.interval, &key("remove_after"), || {
            format!(
                "must be at least the interval ({:?}), got {:?}",
                d.interval, d.remove_after
            )
        });
        c.range(&key("weight"), d.weight, 1, pool::MAX_WEIGHT);
        if let Some(Err(e)) = d.protocol.as_deref().map(str::parse::<pool::Protocol>) {
            c.err(&key("protocol"), e);
        }
    }
}

fn cluster_rules(c: &mut Checker, cl: &ClusterConfig, me: &NodeId) {
    c.positive("cluster.heartbeat_interval", cl.heartbeat_interval);
    c.positive("cluster.dead_after", cl.dead_after);
    let advertise = &cl.advertise;
    c.rule(
        advertise.is_empty() || pool::valid_peer_addr(advertise),
        "cluster.advertise",
        || format!("bad address {advertise:?} (expected host:port)"),
    );
    let ap = &cl.autopilot;
    c.rule(
        ap.voters % 2 == 1 && (1..=9).contains(&ap.voters),
        "cluster.autopilot.voters",
        || format!("must be odd, 1..=9 (3 or 5 is usual), got {}", ap.voters),
    );
    c.positive("cluster.autopilot.dead_after", ap.dead_after);
    let phi = cl.phi_threshold;
    c.rule(phi > 0.0 && phi <= 100.0, "cluster.phi_threshold", || {
        format!("must be above 0 and at most 100, got {phi}")
    });
    let others = cl.peers.iter().filter(|p| p.id != *me).count();
    c.rule(
        cl.role == Role::Voter || others > 0,
        "cluster.peers",
        || {
            "a learner (cluster.role = \"learner\") needs the voters to follow in cluster.peers"
                .into()
        },
    );
    let mut seen = BTreeSet::new();
    for (i, p) in cl.peers.iter().enumerate() {
        let (key, id) = (format!("cluster.peers[{i}]"), p.id.as_str());
        if !pool::valid_node_id(id) {
            c.err(
                &format!("{key}.id"),
                format!("bad id {id:?} (expected [a-z0-9-]{{1,32}})"),
            );
        } else if p.id == *me {
            // This node's own entry: skipped (one list serves every peer).
        } else if !seen.insert(id) {
            c.err(&format!("{key}.id"), format!("duplicate peer id {id:?}"));
        }
        let port_ok = p
            .addr
            .rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_ok());
        c.rule(port_ok, &format!("{key}.addr"), || {
            format!("bad address {:?} (expected host:port)", p.addr)
        });
    }
    match &cl.tls {
        Some(t) => {
            for (k, p) in [("ca", &t.ca), ("cert", &t.cert), ("key", &t.key)] {
                c.readable(&format!("cluster.tls.{k}"), p);
            }
            // With TLS, ids are the DNS names in the peers' certificates.
            for id in cl.peers.iter().map(|p| &p.id).chain([me]) {
                let ok = rustls::pki_types::ServerName::try_from(id.as_str()).is_ok()
                    && !id.as_str().bytes().all(|b| b.is_ascii_digit());
                c.rule(ok, "cluster.tls", || format!("node id {:?} is not a valid DNS name, which TLS needs (certificates name peers by id)", id.as_str()));
            }
        }
        None => {
            let l = cl.listen;
            c.rule(l.ip().is_loopback(), "cluster.listen", || format!("{l} is not a loopback address: [cluster.tls] (mutual TLS between peers) is required"));
        }
    }
}

/// The seed backends, each checked by the core's rules (every problem of every entry).
fn backends(c: &mut Checker, at: &str, entries: Vec<BackendEntry>) -> Option<Vec<Backend>> {
    if entries.len() > pool::MAX_BACKENDS {
        c.err(
            at,
            format!(
                "at most {} backends, got {}",
                pool::MAX_BACKENDS,
                entries.len()
            ),
        );
        return None;
    }
    let (mut out, mut ids, mut addrs) = (Vec::new(), BTreeSet::new(), BTreeSet::new());
    let before = c.errors.len();
    for (i, e) in entries.into_iter().enumerate() {
        let key = |field: &str| format!("{at}[{i}].{field}");
        let weight = pool::check_weight(u32::try_from(e.weight).unwrap_or(u32::MAX));
        let addr = pool::normalize_addr(&e.addr);
        for err in [weight.as_ref().err(), addr.as_ref().err()]
            .into_iter()
            .flatten()
        {
            c.err(&key(err.field()), err);
        }
        let protocol = match e.protocol.as_deref().map(str::parse::<pool::Protocol>) {
            None => pool::Protocol::Http1,
            Some(Ok(p)) => p,
            Some(Err(err)) => {
                c.err(&key("protocol"), err);
                continue;
            }
        };
        let (Ok(weight), Ok(addr)) = (weight, addr) else {
            continue;
        };
        let id = match pool::check_backend_id(e.id.as_deref().unwrap_or(&addr)) {
            Ok(id) => id,
            Err(err) => {
                c.err(&key("id"), err);
                continue;
            }
        };
        c.rule(ids.insert(id.clone()), &key("id"), || {
            format!("duplicate backend id {:?}", id.as_str())
        });
        c.rule(addrs.insert(addr.clone()), &key("addr"), || {
            format!("duplicate backend address {addr:?}")
        });
        out.push(Backend::new(id.0, addr, weight).with_protocol(protocol));
    }
    (c.errors.len() == before).then_some(out)
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
    fn one_peer_list_serves_every_peer() {
        let toml = r#"
            [node]
            id = "b"
            [cluster]
            peers = [{ id = "a", addr = "shoal-a:7001" }, { id = "b", addr = "shoal-b:7001" },
                     { id = "c", addr = "shoal-c:7001" }]
        "#;
        for me in ["a", "b", "c"] {
            let c = parse_env(toml, &[("SHOAL__NODE__ID", me)]).unwrap();
            let ids: Vec<&str> = c.cluster.peers.iter().map(|p| p.id.as_str()).collect();
            assert_eq!(ids.len(), 2, "{me}: {ids:?}");
            assert!(!ids.contains(&me), "{me}: {ids:?}");
            assert_eq!(c.rules().cluster_size, 3);
        }
    }

    #[test]
    fn discovery_sources_are_checked() {
        let ok = parse(
            "[node]\nid = \"a\"\n[[discovery]]\nname = \"web.internal\"\nport = 8080\n[[discovery]]\nname = \"_http._tcp.api.internal\"\ntype = \"srv\"\nresolver = \"127.0.0.1:5353\"\nweight = 3\nprotocol = \"h2\"\n",
        )
        .unwrap();
        assert_eq!(ok.discovery.len(), 2);
        assert_eq!(ok.discovery[0].protocol(), pool::Protocol::Http1);
        assert_eq!(ok.discovery[1].protocol(), pool::Protocol::H2);
        assert_eq!(ok.discovery[0].kind, DiscoveryKind::A);
        assert_eq!(ok.discovery[0].interval, Duration::from_secs(5));
        assert_eq!(ok.discovery[0].remove_after, Duration::from_secs(30));
        assert_eq!(
            ok.discovery[1].resolver,
            Some("127.0.0.1:5353".parse().unwrap())
        );
        let errs = parse(
            "[node]\nid = \"a\"\n[[discovery]]\nname = \"web\"\n[[discovery]]\nname = \"bad name!\"\ntype = \"srv\"\nport = 80\ninterval = \"10s\"\nremove_after = \"5s\"\nweight = 0\nprotocol = \"h3\"\n",
        )
        .unwrap_err()
        .0
        .join("\n");
        for want in [
            "discovery[0].port: required for type \"a\"",
            "discovery[1].name: bad DNS name \"bad name!\"",
            "discovery[1].port: not for type \"srv\"",
            "discovery[1].remove_after: must be at least the interval",
            "discovery[1].weight: must be 1..=1000, got 0",
            r#"discovery[1].protocol: unknown protocol "h3" (expected "http1" or "h2")"#,
        ] {
            assert!(errs.contains(want), "{want}: {errs}");
        }
        let errs = parse(
            "[node]\nid = \"a\"\n[[discovery]]\nname = \"x\"\ntype = \"mx\"\nresolver = \"nope\"\n",
        )
        .unwrap_err()
        .0
        .join("\n");
        assert!(errs.contains("discovery[0]"), "{errs}");
    }

    #[test]
    fn admin_token_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cret\n").unwrap();
        let toml = format!(
            "[node]\nid = \"a\"\n[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = {:?}\n",
            f.display().to_string()
        );
        let c = parse(&toml).unwrap();
        assert_eq!(c.admin.token.as_deref(), Some("s3cret"));
        let missing = toml.replace(&f.display().to_string(), "/nonexistent/token");
        let errs = parse(&missing).unwrap_err().0.join("\n");
        assert!(
            errs.contains("admin.token_file: cannot read /nonexistent/token"),
            "{errs}"
        );
        let both = format!("{toml}token = \"x\"\n");
        let errs = parse(&both).unwrap_err().0.join("\n");
        assert!(
            errs.contains("admin.token_file: set admin.token or admin.token_file"),
            "{errs}"
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("[node]\nid = \"a\"\n").unwrap();
        assert_eq!(c.node.data_dir, PathBuf::from("data/a"));
        assert_eq!(c.proxy.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(c.proxy.retries, 2);
        assert_eq!(c.health.interval, Duration::from_secs(1));
        assert_eq!(c.health.timeout, Duration::from_millis(500));
        assert_eq!(c.balance.spec().algorithm, Algorithm::RoundRobin);
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
            [[backends]]
            addr = "127.0.0.1:9003"
            protocol = "h3"
            "#,
        )
        .unwrap_err()
        .0;
        let all = errs.join("\n");
        assert!(
            all.contains(
                r#"backends[2].protocol: unknown protocol "h3" (expected "http1" or "h2")"#
            ),
            "{all}"
        );
        assert!(all.contains("node.colour: unknown key"), "{all}");
        assert!(all.contains(r#"balance.hash_key: unknown source "foo" (expected header:NAME, cookie:NAME, query:NAME, path or client_ip)"#), "{all}");
        assert!(all.contains("health.interval: bad duration"), "{all}");
        assert!(
            all.contains("backends[1].weight: must be 1..=1000, got 0"),
            "{all}"
        );
        assert_eq!(errs.len(), 5, "{all}");
    }

    #[test]
    fn cluster_feature_keys_default_off_and_are_checked() {
        let c = parse("[node]\nid = \"a\"\n").unwrap();
        assert_eq!((c.health.probers, c.health.slow_start), (0, Duration::ZERO));
        assert!(!c.cluster.autopilot.enabled && c.cluster.advertise.is_empty());
        assert_eq!(c.cluster.autopilot.voters, 3);
        let c = parse(
            "[node]\nid = \"a\"\n[health]\nprobers = 3\nslow_start = \"30s\"\n[cluster]\nadvertise = \"10.0.0.4:7001\"\n[cluster.autopilot]\nenabled = true\nvoters = 5\n",
        )
        .unwrap();
        assert_eq!(c.rules().probers, 3);
        assert_eq!(c.health.slow_start, Duration::from_secs(30));
        assert_eq!(c.cluster.autopilot.voters, 5);
        for (bad, key) in [
            ("[health]\nprobers = -1", "health.probers"),
            ("[health]\nslow_start = \"2d\"", "health.slow_start"),
            ("[cluster]\nadvertise = \"nowhere\"", "cluster.advertise"),
            (
                "[cluster.autopilot]\nvoters = 4",
                "cluster.autopilot.voters",
            ),
            (
                "[cluster.autopilot]\nturbo = true",
                "cluster.autopilot.turbo",
            ),
        ] {
            let all = parse(&format!("[node]\nid = \"a\"\n{bad}\n"))
                .unwrap_err()
                .0
                .join("\n");
            assert!(all.contains(&format!("{key}:")), "{key} in {all}");
        }
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
    fn a_learner_needs_voters() {
        let errs = parse(
            r#"
            [node]
            id = "l"
            [cluster]
            role = "learner"
            "#,
        )
        .unwrap_err()
        .0
        .join("\n");
        assert!(errs.contains("cluster.peers: a learner"), "{errs}");
        let errs = parse("[node]\nid = \"l\"\n[cluster]\nrole = \"boss\"\n")
            .unwrap_err()
            .0
            .join("\n");
        assert!(errs.contains("cluster.role"), "{errs}");
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
        assert_eq!("path".parse::<HashKey>().unwrap(), HashKey::Path);
        assert_eq!(
            "cookie:sid".parse::<HashKey>().unwrap(),
            HashKey::Cookie("sid".into())
        );
        assert_eq!(
            "query:u".parse::<HashKey>().unwrap(),
            HashKey::Query("u".into())
        );
        assert!(matches!(
            "header:X-User".parse::<HashKey>().unwrap(),
            HashKey::Header(_)
        ));
        assert!("header:".parse::<HashKey>().is_err());
        assert!("body".parse::<HashKey>().is_err());
    }
}
