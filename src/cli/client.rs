//! The admin client behind `shoal pool` and `shoal peers`: one request, JSON back.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// One admin API call.
pub struct Request {
    method: &'static str,
    path: String,
    body: Option<Value>,
}

impl Request {
    pub fn get(path: &str) -> Self {
        Self::new("GET", path)
    }
    pub fn new(method: &'static str, path: &str) -> Self {
        Self {
            method,
            path: path.to_string(),
            body: None,
        }
    }
    pub fn with_body(method: &'static str, path: &str, body: Value) -> Self {
        Self {
            method,
            path: path.to_string(),
            body: Some(body),
        }
    }
}

/// Send `req` to the admin API at `base` (`http://host:port`); returns status and JSON body.
pub async fn call(base: &str, token: Option<&str>, req: Request) -> Result<(u16, Value), String> {
    let authority = base
        .strip_prefix("http://")
        .map(|s| s.trim_end_matches('/'))
        .filter(|s| !s.is_empty() && !s.contains('/'))
        .ok_or_else(|| format!("bad --admin {base:?} (expected http://host:port)"))?;
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(authority),
    )
    .await
    .map_err(|_| format!("cannot reach {base}: timed out"))?
    .map_err(|e| format!("cannot reach {base}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("cannot talk to {base}: {e}"))?;
    tokio::spawn(conn);
    let body = req.body.map(|b| b.to_string()).unwrap_or_default();
    let mut builder = http::Request::builder()
        .method(req.method)
        .uri(&req.path)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let request = builder
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        sender.send_request(request),
    )
    .await
    .map_err(|_| format!("{base} did not answer in 30s"))?
    .map_err(|e| format!("{base}: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{base}: {e}"))?
        .to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, json))
}

/// The pool as a table.
pub fn print_pool(v: &Value) -> String {
    let mut out = format!("pool version {}\n", v["version"]);
    out.push_str(&format!(
        "{:<24} {:<28} {:>6}  {:<9} {}\n",
        "ID", "ADDR", "WEIGHT", "STATE", "PROTOCOL"
    ));
    for b in v["backends"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<24} {:<28} {:>6}  {:<9} {}\n",
            b["id"].as_str().unwrap_or("?"),
            b["addr"].as_str().unwrap_or("?"),
            b["weight"].as_u64().unwrap_or(0),
            b["state"].as_str().unwrap_or("?"),
            b["protocol"].as_str().unwrap_or("http1"),
        ));
    }
    out
}

/// The services (`GET /services`) as a table, with each one's backends.
pub fn print_services(v: &Value) -> String {
    let mut out = format!("pool version {}\n", v["version"]);
    out.push_str(&format!(
        "{:<20} {:<36} {:<16} {:<16} {}\n",
        "SERVICE", "HOSTS", "PREFIX", "BALANCE", "BACKENDS"
    ));
    for s in v["services"].as_array().into_iter().flatten() {
        let hosts: Vec<&str> = s["hosts"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let backends: Vec<String> = s["backends"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|b| {
                        format!(
                            "{} ({})",
                            b["id"].as_str().unwrap_or("?"),
                            b["state"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut prefix = s["path_prefix"].as_str().unwrap_or("/").to_string();
        if s["strip_prefix"].as_bool() == Some(true) {
            prefix.push_str(" (strip)");
        }
        out.push_str(&format!(
            "{:<20} {:<36} {:<16} {:<16} {}\n",
            s["name"].as_str().unwrap_or("?"),
            if hosts.is_empty() {
                "*".to_string()
            } else {
                hosts.join(",")
            },
            prefix,
            s["balance"]["algorithm"].as_str().unwrap_or("?"),
            if backends.is_empty() {
                "-".to_string()
            } else {
                backends.join(", ")
            },
        ));
    }
    out
}

/// The peer table.
pub fn print_peers(v: &Value) -> String {
    let mut out = format!(
        "{:<12} {:<24} {:<8} {:<8} {:>8} {:>12}\n",
        "ID", "ADDR", "ROLE", "STATE", "PHI", "LAST SEEN"
    );
    for p in v.as_array().into_iter().flatten() {
        let seen = p["last_seen_ms"]
            .as_u64()
            .map(|ms| format!("{ms} ms ago"))
            .unwrap_or_else(|| "never".into());
        out.push_str(&format!(
            "{:<12} {:<24} {:<8} {:<8} {:>8.2} {:>12}\n",
            p["id"].as_str().unwrap_or("?"),
            p["addr"].as_str().unwrap_or("?"),
            p["role"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
            p["phi"].as_f64().unwrap_or(0.0),
            seen
        ));
    }
    out
}

/// A membership (the answer of `peers add` / `peers remove`).
pub fn print_membership(v: &Value) -> String {
    let mut out = format!(
        "membership epoch {} (pool version {})\n{:<12} {:<8} {}\n",
        v["epoch"], v["version"], "ID", "ROLE", "ADDR"
    );
    for (role, key) in [("voter", "voters"), ("learner", "learners")] {
        for m in v[key].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "{:<12} {:<8} {}\n",
                m["id"].as_str().unwrap_or("?"),
                role,
                m["addr"].as_str().unwrap_or("-"),
            ));
        }
    }
    out
}

/// `GET /status` as a short report.
pub fn print_status(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("?").to_string();
    let members: Vec<&str> = v["members"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let mut out = format!(
        "node {} ({}), consensus {}, quorum {}, cluster {}\nvoters: {}\npool version {}\n",
        s("node"),
        s("role"),
        s("consensus"),
        v["quorum"],
        s("cluster_id"),
        members.join(", "),
        v["pool_version"]
    );
    if let Some(w) = v["waiting"].as_str() {
        out.push_str(&format!("waiting: {w}\n"));
    }
    out.push_str(&format!(
        "{:<12} {:<24} {:<10} {:<6} {}\n",
        "SERVICE", "BACKEND", "STATE", "LOCAL", "DOWN VOTES"
    ));
    // Every service's backends (`services`), or default's alone from an older peer.
    let services: Vec<(String, &Value)> = match v["services"].as_array() {
        Some(list) => list
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap_or("?").to_string(),
                    &s["backends"],
                )
            })
            .collect(),
        None => vec![("default".to_string(), &v["backends"])],
    };
    for (service, backends) in services {
        for b in backends.as_array().into_iter().flatten() {
            let votes: Vec<&str> = b["down_votes"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            out.push_str(&format!(
                "{:<12} {:<24} {:<10} {:<6} {}\n",
                service,
                b["id"].as_str().unwrap_or("?"),
                b["state"].as_str().unwrap_or("?"),
                b["local"].as_str().unwrap_or("?"),
                votes.join(",")
            ));
        }
    }
    out
}
