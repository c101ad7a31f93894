//! DNS discovery's I/O edge: resolve a `[[discovery]]` source (A/AAAA with a port, or SRV) with
//! the system's resolver or a configured one, uncached, into `IP:PORT` addresses. What to vote
//! with the answers is `core::discovery`; `app` runs the loop.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::error::ResolveErrorKind;
use hickory_resolver::TokioAsyncResolver;

/// How a source is looked up.
#[derive(Clone, Debug)]
pub enum Lookup {
    /// A and AAAA records of `name`, each with `port`.
    Addresses { name: String, port: u16 },
    /// SRV records of `name`: each target's addresses with the record's port.
    Srv { name: String },
}

pub struct Resolver {
    inner: TokioAsyncResolver,
}

fn options(timeout: Duration) -> ResolverOpts {
    let mut o = ResolverOpts::default();
    // Every interval asks again: the answer of the moment is the vote.
    o.cache_size = 0;
    o.positive_max_ttl = Some(Duration::ZERO);
    o.negative_max_ttl = Some(Duration::ZERO);
    o.timeout = timeout;
    o.attempts = 1;
    o
}

impl Resolver {
    /// The configured server (plain DNS over UDP, then TCP), or the system's resolv.conf.
    pub fn new(server: Option<SocketAddr>, timeout: Duration) -> Result<Resolver, String> {
        let inner = match server {
            Some(addr) => {
                let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
                TokioAsyncResolver::tokio(
                    ResolverConfig::from_parts(None, vec![], group),
                    options(timeout),
                )
            }
            None => {
                let (config, mut opts) = hickory_resolver::system_conf::read_system_conf()
                    .map_err(|e| format!("cannot read the system's resolver config: {e}"))?;
                let o = options(timeout);
                opts.cache_size = o.cache_size;
                opts.positive_max_ttl = o.positive_max_ttl;
                opts.negative_max_ttl = o.negative_max_ttl;
                opts.timeout = timeout;
                TokioAsyncResolver::tokio(config, opts)
            }
        };
        Ok(Resolver { inner })
    }

    /// The addresses the name has now (empty when it has no records), or why it could not be
    /// resolved (then the caller votes nothing).
    pub async fn resolve(&self, lookup: &Lookup) -> Result<Vec<String>, String> {
        let mut out = match lookup {
            Lookup::Addresses { name, port } => match self.inner.lookup_ip(fqdn(name)).await {
                Ok(ips) => ips.iter().map(|ip| join(ip, *port)).collect(),
                Err(e) if no_records(e.kind()) => Vec::new(),
                Err(e) => return Err(e.to_string()),
            },
            Lookup::Srv { name } => {
                let records = match self.inner.srv_lookup(fqdn(name)).await {
                    Ok(r) => r,
                    Err(e) if no_records(e.kind()) => return Ok(Vec::new()),
                    Err(e) => return Err(e.to_string()),
                };
                let mut out = Vec::new();
                for srv in records.iter() {
                    let target = srv.target().to_utf8();
                    match self.inner.lookup_ip(target.as_str()).await {
                        Ok(ips) => out.extend(ips.iter().map(|ip| join(ip, srv.port()))),
                        Err(e) if no_records(e.kind()) => {}
                        Err(e) => return Err(format!("{target}: {e}")),
                    }
                }
                out
            }
        };
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// Absolute names: no search-list suffixes.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

fn no_records(kind: &ResolveErrorKind) -> bool {
    matches!(kind, ResolveErrorKind::NoRecordsFound { .. })
}

fn join(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}
