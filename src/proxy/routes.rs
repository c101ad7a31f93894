//! Which service a request goes to: a table built once per set of service definitions (a hash
//! on the host, then the longest matching path prefix), never a scan per request. Requests of
//! one connection may go to different services: each request is routed on its own.
//!
//! The rule (SPEC 2.1), the same on every peer: among the services whose hosts match the
//! request's Host, the one with the longest matching path prefix takes the request; between
//! equal prefixes (the only ties: a host and prefix pair is unique), an exact name before a
//! wildcard (the longest suffix first) before a service for any host. When none matches,
//! `default` takes it.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use metrics::Counter;

use super::table::RoutingTable;
use crate::ops::telemetry as names;

/// One service as the lookup sees it.
#[derive(Clone)]
pub struct Entry {
    /// The path prefix ("/" when the service sets none).
    pub prefix: Box<str>,
    /// Remove the prefix before forwarding.
    pub strip: bool,
    pub table: Arc<RoutingTable>,
}

/// A service definition as the route table is built from it.
pub struct RouteDef {
    pub hosts: Vec<String>,
    pub prefix: Option<String>,
    pub strip: bool,
    pub table: Arc<RoutingTable>,
}

/// The route table's maps: keyed per process (a stranger's Host cannot be made to collide), and
/// a fraction of SipHash's cost on a host name.
type Map<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// The services of one host kind (one exact host, one wildcard suffix, or any host) by path
/// prefix, longest first: per prefix length, the one service of that length, compared as it is,
/// or a map when several share it; so a lookup is at most one hash per distinct length, however
/// many services share the host.
#[derive(Default)]
struct Prefixes {
    by_len: Vec<(usize, Bucket)>,
}

enum Bucket {
    One(Entry),
    Many(Map<Entry>),
}

impl Prefixes {
    fn insert(&mut self, e: Entry) {
        let len = e.prefix.len();
        let at = match self.by_len.iter().position(|(l, _)| *l <= len) {
            Some(i) if self.by_len[i].0 == len => i,
            Some(i) => {
                self.by_len.insert(i, (len, Bucket::One(e)));
                return;
            }
            None => {
                self.by_len.push((len, Bucket::One(e)));
                return;
            }
        };
        let bucket = &mut self.by_len[at].1;
        match bucket {
            Bucket::One(one) if one.prefix == e.prefix => *one = e,
            Bucket::One(one) => {
                let mut map = Map::default();
                map.insert(one.prefix.clone(), one.clone());
                map.insert(e.prefix.clone(), e);
                *bucket = Bucket::Many(map);
            }
            Bucket::Many(map) => {
                map.insert(e.prefix.clone(), e);
            }
        }
    }

    /// The entry with the longest prefix `path` starts with.
    fn longest(&self, path: &str) -> Option<&Entry> {
        self.by_len.iter().find_map(|(len, bucket)| {
            let head = path.get(..*len)?;
            match bucket {
                Bucket::One(e) => (*e.prefix == *head).then_some(e),
                Bucket::Many(map) => map.get(head),
            }
        })
    }
}

/// The lookup for one set of service definitions.
#[derive(Default)]
pub struct RouteSet {
    exact: Map<Prefixes>,
    /// By suffix, the dot included (`*.example.org` is `.example.org`).
    wildcard: Map<Prefixes>,
    /// The lengths of the wildcard suffixes, longest first, each once: a host is looked up only
    /// by its suffixes of these lengths that start with a dot.
    wildcard_lens: Vec<usize>,
    any: Prefixes,
}

impl RouteSet {
    pub fn build(defs: impl IntoIterator<Item = RouteDef>) -> RouteSet {
        let mut set = RouteSet::default();
        for d in defs {
            let entry = Entry {
                prefix: d.prefix.unwrap_or_else(|| "/".into()).into(),
                strip: d.strip,
                table: d.table,
            };
            if d.hosts.is_empty() {
                set.any.insert(entry.clone());
            }
            for h in d.hosts {
                let list = match h.strip_prefix('*') {
                    Some(suffix) => set.wildcard.entry(suffix.into()).or_default(),
                    None => set.exact.entry(h.into()).or_default(),
                };
                list.insert(entry.clone());
            }
        }
        set.wildcard_lens = set.wildcard.keys().map(|s| s.len()).collect();
        set.wildcard_lens.sort_unstable_by(|a, b| b.cmp(a));
        set.wildcard_lens.dedup();
        set
    }

    /// The service for `host` (lowercase, no port) and `path`; None: the default one.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Entry> {
        // Each kind's best is its longest prefix; a later kind wins only with a longer one.
        fn consider<'a>(best: &mut Option<&'a Entry>, hit: Option<&'a Entry>) {
            if let Some(e) = hit {
                if best.is_none_or(|b| e.prefix.len() > b.prefix.len()) {
                    *best = Some(e);
                }
            }
        }
        let mut best = None;
        if let Some(l) = self.exact.get(host) {
            consider(&mut best, l.longest(path));
        }
        // The longest suffix first; a wildcard wants a label before its suffix.
        for &len in &self.wildcard_lens {
            let Some(at) = host.len().checked_sub(len).filter(|&at| at > 0) else {
                continue;
            };
            // A dot is one byte of UTF-8: `at` is a boundary. (`get`: a suffix is never empty
            // as the register checks them, but a lookup must not panic on a set built without.)
            if host.as_bytes().get(at) == Some(&b'.') {
                if let Some(l) = self.wildcard.get(&host[at..]) {
                    consider(&mut best, l.longest(path));
                }
            }
        }
        consider(&mut best, self.any.longest(path));
        best
    }
}

/// Where a request goes.
pub enum Route {
    /// A service's table; `strip` is the prefix to remove from the path, if any.
    To {
        table: Arc<RoutingTable>,
        strip: Option<Box<str>>,
    },
    /// No service matched and `default` has no backends: 404.
    Miss,
}

/// The default service's table and the current route set (none while `default` is the only
/// service: then nothing is looked up).
pub struct Routes {
    default: Arc<RoutingTable>,
    set: ArcSwapOption<RouteSet>,
    misses: Counter,
}

impl Routes {
    pub fn new(default: Arc<RoutingTable>) -> Arc<Routes> {
        Arc::new(Routes {
            default,
            set: ArcSwapOption::empty(),
            misses: metrics::counter!(names::ROUTE_MISSES_TOTAL),
        })
    }

    pub fn default_table(&self) -> &Arc<RoutingTable> {
        &self.default
    }

    /// Route by `set` from now on (None: every request to `default`).
    pub fn install(&self, set: Option<RouteSet>) {
        self.set.store(set.map(Arc::new));
    }

    /// Route a request whose Host is `host` (as received: maybe with a port, any case) and
    /// whose path is `path`.
    pub fn route(&self, host: Option<&[u8]>, path: &str) -> Route {
        let set = self.set.load();
        let Some(set) = set.as_ref() else {
            return Route::To {
                table: self.default.clone(),
                strip: None,
            };
        };
        let mut buf = [0u8; 256];
        let host = host.and_then(|h| normalize_host(h, &mut buf)).unwrap_or("");
        match set.lookup(host, path) {
            Some(e) => Route::To {
                table: e.table.clone(),
                strip: (e.strip && &*e.prefix != "/").then(|| e.prefix.clone()),
            },
            None if self.default.pool().backends.is_empty() => {
                self.misses.increment(1);
                Route::Miss
            }
            None => Route::To {
                table: self.default.clone(),
                strip: None,
            },
        }
    }
}

/// A Host value without its port or a trailing dot, in lowercase (in `buf`); None if it does
/// not fit or is not text.
pub fn normalize_host<'a>(h: &[u8], buf: &'a mut [u8; 256]) -> Option<&'a str> {
    let name = if h.first() == Some(&b'[') {
        // An IPv6 literal: up to the bracket.
        let end = h.iter().position(|&b| b == b']')?;
        &h[..=end]
    } else {
        match h.iter().rposition(|&b| b == b':') {
            Some(i) if h[i + 1..].iter().all(u8::is_ascii_digit) => &h[..i],
            _ => h,
        }
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.len() > buf.len() {
        return None;
    }
    let out = &mut buf[..name.len()];
    for (o, b) in out.iter_mut().zip(name) {
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

/// `path` with `prefix` removed, always starting with "/" ("/v1/x" less "/v1/" is "/x").
pub fn strip(path_and_query: &str, prefix: &str) -> String {
    let rest = path_and_query
        .strip_prefix(prefix)
        .unwrap_or(path_and_query);
    if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::table::Settings;

    fn table(name: &str) -> Arc<RoutingTable> {
        let config = crate::config::from_value(&serde_json::json!({"node": {"id": "a"}})).unwrap();
        RoutingTable::new(name, Settings::from_config(&config), 1)
    }

    fn def(name: &str, hosts: &[&str], prefix: Option<&str>) -> RouteDef {
        RouteDef {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            prefix: prefix.map(str::to_string),
            strip: false,
            table: table(name),
        }
    }

    fn to(set: &RouteSet, host: &str, path: &str) -> String {
        set.lookup(host, path)
            .map_or("default".to_string(), |e| e.table.service().to_string())
    }

    #[test]
    fn the_longest_prefix_wins_and_exact_before_wildcard_before_any_on_a_tie() {
        let set = RouteSet::build([
            def("api", &["api.example.com", "*.example.org"], None),
            def("api-v2", &["api.example.com"], Some("/v2/")),
            def("deep", &["*.b.example.org"], None),
            def("static", &[], Some("/static/")),
            def("admin", &["admin.example.com"], Some("/admin")),
        ]);
        let cases = [
            ("api.example.com", "/", "api"),
            ("api.example.com", "/v2/x", "api-v2"),
            ("api.example.com", "/v2", "api"),
            ("x.example.org", "/", "api"),
            ("a.b.example.org", "/", "deep"),
            ("b.example.org", "/", "api"),
            // The wildcard wants a label before the suffix.
            ("example.org", "/", "default"),
            (".example.org", "/", "default"),
            ("other.com", "/static/app.js", "static"),
            ("other.com", "/", "default"),
            // Among the services the host matches, the longest prefix.
            ("api.example.com", "/static/x", "static"),
            ("admin.example.com", "/static/x", "static"),
            ("admin.example.com", "/admin/x", "admin"),
            ("admin.example.com", "/", "default"),
            ("", "/static/", "static"),
        ];
        for (host, path, want) in cases {
            assert_eq!(to(&set, host, path), want, "{host} {path}");
        }
        // Equal prefixes: exact, then the longest wildcard, then any host.
        let set = RouteSet::build([
            def("any", &[], Some("/x/")),
            def("wild", &["*.example.org"], Some("/x/")),
            def("deeper", &["*.a.example.org"], Some("/x/")),
            def("exact", &["b.a.example.org"], Some("/x/")),
        ]);
        let cases = [
            ("b.a.example.org", "/x/1", "exact"),
            ("c.a.example.org", "/x/1", "deeper"),
            ("c.example.org", "/x/1", "wild"),
            ("c.example.com", "/x/1", "any"),
            ("c.example.com", "/y", "default"),
        ];
        for (host, path, want) in cases {
            assert_eq!(to(&set, host, path), want, "{host} {path}");
        }
    }

    #[test]
    fn a_set_built_with_an_empty_wildcard_suffix_routes_without_panicking() {
        // The register never stores "*" alone; a lookup must not panic on a set that has it.
        let set = RouteSet::build([def("bare", &["*"], None), def("api", &["*.x.org"], None)]);
        assert_eq!(to(&set, "a.x.org", "/"), "api");
        assert_eq!(to(&set, "b.y.org", "/"), "default");
        assert_eq!(to(&set, "", "/"), "default");
    }

    #[test]
    fn hosts_are_matched_without_port_case_or_trailing_dot() {
        let mut buf = [0u8; 256];
        for (raw, want) in [
            (&b"API.Example.com:8080"[..], Some("api.example.com")),
            (b"api.example.com.", Some("api.example.com")),
            (b"[::1]:80", Some("[::1]")),
            (b"10.0.0.1", Some("10.0.0.1")),
            (b"host:port", Some("host:port")),
            (&[b'a'; 300][..], None),
        ] {
            assert_eq!(normalize_host(raw, &mut buf), want, "{raw:?}");
        }
    }

    #[test]
    fn stripping_leaves_a_path() {
        assert_eq!(strip("/v1/x?q=1", "/v1/"), "/x?q=1");
        assert_eq!(strip("/v1/x", "/v1"), "/x");
        assert_eq!(strip("/v1", "/v1"), "/");
        assert_eq!(strip("/v1?q", "/v1"), "/?q");
        assert_eq!(strip("/v1abc", "/v1"), "/abc");
    }

    #[test]
    fn a_miss_is_a_404_only_when_default_has_no_backends() {
        let routes = Routes::new(table("default"));
        // No services: everything goes to default, even with no backends.
        assert!(matches!(routes.route(Some(b"x"), "/"), Route::To { .. }));
        routes.install(Some(RouteSet::build([def("api", &["api.x"], None)])));
        assert!(matches!(routes.route(Some(b"other"), "/"), Route::Miss));
        match routes.route(Some(b"API.x:80"), "/a") {
            Route::To { table, strip } => {
                assert_eq!(table.service(), "api");
                assert!(strip.is_none());
            }
            Route::Miss => panic!("api.x should route to api"),
        }
    }

    /// The rule as the SPEC states it, by a scan of every service: the table must agree.
    fn reference<'a>(
        defs: &'a [(String, Vec<String>, String)],
        host: &str,
        path: &str,
    ) -> Option<&'a str> {
        // Rank of a host match: exact 3, wildcard 2 (longer suffix first), any 1.
        let rank = |hosts: &[String]| -> Option<(u8, usize)> {
            if hosts.is_empty() {
                return Some((1, 0));
            }
            hosts
                .iter()
                .filter_map(|h| match h.strip_prefix('*') {
                    Some(suffix) => (host.len() > suffix.len() && host.ends_with(suffix))
                        .then_some((2, suffix.len())),
                    None => (h == host).then_some((3, 0)),
                })
                .max()
        };
        defs.iter()
            .filter(|(_, _, prefix)| path.starts_with(prefix.as_str()))
            .filter_map(|(name, hosts, prefix)| Some(((prefix.len(), rank(hosts)?), name)))
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, name)| name.as_str())
    }

    proptest::proptest! {
        #[test]
        fn the_table_agrees_with_a_scan_of_every_service(
            raw in proptest::collection::vec(
                (proptest::collection::vec(0usize..6, 0..3), 0usize..5),
                1..30,
            ),
            requests in proptest::collection::vec((0usize..8, 0usize..6), 1..40),
        ) {
            const HOSTS: [&str; 6] = ["a.x.org", "*.x.org", "b.x.org", "*.org", "c.y.com", "*.y.com"];
            const PREFIXES: [&str; 5] = ["/", "/a", "/a/", "/ab/", "/b/c"];
            const ASKED: [&str; 8] = ["a.x.org", "z.x.org", "y.com", "c.y.com", "q.org", ".x.org", "", "a.b.x.org"];
            const PATHS: [&str; 6] = ["/", "/a", "/a/1", "/ab/2", "/b/c/d", "/zz"];
            // Unique (host, prefix) pairs, as the register keeps them.
            let mut taken = std::collections::BTreeSet::new();
            let mut defs = Vec::new();
            for (i, (hosts, p)) in raw.iter().enumerate() {
                let mut hs: Vec<String> = hosts.iter().map(|h| HOSTS[*h].to_string()).collect();
                hs.sort();
                hs.dedup();
                let prefix = PREFIXES[*p].to_string();
                let keys: Vec<String> = if hs.is_empty() { vec![String::new()] } else { hs.clone() };
                if keys.iter().any(|k| taken.contains(&(k.clone(), prefix.clone()))) {
                    continue;
                }
                for k in keys {
                    taken.insert((k, prefix.clone()));
                }
                defs.push((format!("s{i}"), hs, prefix));
            }
            let set = RouteSet::build(defs.iter().map(|(name, hosts, prefix)| RouteDef {
                hosts: hosts.clone(),
                prefix: Some(prefix.clone()),
                strip: false,
                table: table(name),
            }));
            for (h, p) in requests {
                let (host, path) = (ASKED[h], PATHS[p]);
                let got = set.lookup(host, path).map(|e| e.table.service().to_string());
                let want = reference(&defs, host, path).map(str::to_string);
                proptest::prop_assert_eq!(got, want, "{} {}", host, path);
            }
        }
    }
}
