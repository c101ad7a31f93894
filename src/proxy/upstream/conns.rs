//! Keep-alive connections to one backend, one idle list per data-plane worker, so a connection
//! is only ever used by the thread whose runtime drives it.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::client::conn::http1;

use crate::net::Target;
use crate::proxy::body::RequestBody;

/// Idle connections kept per backend and worker.
const MAX_IDLE: usize = 256;
/// Idle connections older than this are not reused (backends commonly close at 60-75 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection ready to carry one request.
pub type Sender = http1::SendRequest<RequestBody>;

struct Idle {
    sender: Sender,
    since: Instant,
}

/// Idle connections of one backend, by worker (slot 0: off the data plane).
pub struct ConnPool {
    idle: Box<[Mutex<Vec<Idle>>]>,
}

impl ConnPool {
    pub fn new(workers: usize) -> Self {
        Self {
            idle: (0..=workers).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    fn slot(&self, worker: usize) -> &Mutex<Vec<Idle>> {
        &self.idle[worker % self.idle.len()]
    }

    /// A ready connection for `worker`: a pooled one if any is still open, else a new one.
    pub async fn checkout(
        &self,
        worker: usize,
        target: &Target,
        connect_timeout: Duration,
    ) -> io::Result<Sender> {
        loop {
            let idle = self
                .slot(worker)
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop();
            let Some(mut idle) = idle else { break };
            if idle.since.elapsed() > IDLE_TIMEOUT || idle.sender.is_closed() {
                continue;
            }
            // Normally ready at once; waits only if the previous response is still finishing.
            if idle.sender.ready().await.is_ok() {
                return Ok(idle.sender);
            }
        }
        match tokio::time::timeout(connect_timeout, target.connect()).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        }
    }

    /// Park a connection whose exchange completed.
    pub fn checkin(&self, worker: usize, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.slot(worker).lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}
