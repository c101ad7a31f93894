//! The access log: one line per request at info (target `shoal::access`), written when the last
//! byte of the response went out (or the client went away), so its duration and byte counts
//! are the whole exchange's.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderName, HeaderValue, Request, Version};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What one access log line says, gathered as the request goes.
pub struct AccessRecord {
    start: Instant,
    client: SocketAddr,
    method: String,
    host: String,
    path: String,
    protocol: &'static str,
    user_agent: String,
    request_id: String,
    /// Request body bytes read from the client (counted by the request body).
    pub request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    status: u16,
    service: String,
    backend: String,
    attempts: u32,
    logged: bool,
}

impl AccessRecord {
    /// Start a record for `req`; a request without `X-Request-Id` gets one (forwarded to the
    /// backend too, so both logs name the request alike).
    pub fn begin<B>(req: &mut Request<B>, client: SocketAddr, start: Instant) -> AccessRecord {
        let request_id = match req
            .headers()
            .get(&X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
        {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => {
                let id = format!("{:016x}", rand::random::<u64>());
                if let Ok(v) = HeaderValue::from_str(&id) {
                    req.headers_mut().insert(&X_REQUEST_ID, v);
                }
                id
            }
        };
        let text = |name: &HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let host = match req.uri().authority() {
            Some(a) => a.to_string(),
            None => text(&header::HOST),
        };
        AccessRecord {
            start,
            client,
            method: req.method().to_string(),
            host,
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
            protocol: match req.version() {
                Version::HTTP_09 => "HTTP/0.9",
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_11 => "HTTP/1.1",
                Version::HTTP_2 => "HTTP/2.0",
                Version::HTTP_3 => "HTTP/3.0",
                _ => "-",
            },
            user_agent: text(&header::USER_AGENT),
            request_id,
            request_bytes: Arc::default(),
            response_bytes: 0,
            status: 0,
            service: "-".into(),
            backend: "-".into(),
            attempts: 0,
            logged: false,
        }
    }

    /// The response head: its status, the service it was routed to ("none": no service took
    /// it), the backend that answered ("-" for a local answer) and how many backends were tried.
    pub fn respond(&mut self, status: u16, service: &str, backend: Option<&str>, attempts: u32) {
        self.status = status;
        self.service = service.to_string();
        self.backend = backend.unwrap_or("-").to_string();
        self.attempts = attempts;
    }

    pub fn add_response_bytes(&mut self, n: usize) {
        self.response_bytes += n as u64;
    }

    /// Write the line (once): `complete` false when the client left before the last byte.
    pub fn finish(&mut self, complete: bool) {
        if self.logged {
            return;
        }
        self.logged = true;
        tracing::info!(
            target: "shoal::access",
            client = %self.client.ip(),
            method = %self.method,
            host = %self.host,
            path = %self.path,
            protocol = self.protocol,
            status = self.status,
            request_bytes = self.request_bytes.load(Ordering::Relaxed),
            response_bytes = self.response_bytes,
            duration_ms = (self.start.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            service = %self.service,
            backend = %self.backend,
            attempts = self.attempts,
            request_id = %self.request_id,
            user_agent = %self.user_agent,
            complete,
            "{} {} {}",
            self.method,
            self.path,
            self.status
        );
    }
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        self.finish(false);
    }
}
