//! Keep-alive connections to one backend, one idle list per data-plane worker, so a connection
//! is only ever used by the thread whose runtime drives it. An HTTP/2 backend has one shared
//! connection per worker instead: every request of the worker is a stream on it.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::net::Target;
use crate::proxy::body::RequestBody;

/// Idle connections kept per backend and worker.
const MAX_IDLE: usize = 256;
/// Idle connections older than this are not reused (backends commonly close at 60-75 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection ready to carry one request (or, for HTTP/2, a handle on the shared one).
pub type Sender = crate::net::Sender<RequestBody>;

struct Idle {
    sender: Sender,
    since: Instant,
}

/// Idle connections of one backend, by worker (slot 0: off the data plane).
pub struct ConnPool {
    idle: Box<[Mutex<Vec<Idle>>]>,
    /// HTTP/2: held while a worker dials its shared connection, so requests arriving meanwhile
    /// wait for it instead of each dialing their own.
    dialing: Box<[tokio::sync::Mutex<()>]>,
}

impl ConnPool {
    pub fn new(workers: usize) -> Self {
        Self {
            idle: (0..=workers).map(|_| Mutex::new(Vec::new())).collect(),
            dialing: (0..=workers).map(|_| tokio::sync::Mutex::new(())).collect(),
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
        if target.is_h2() {
            return self.shared(worker, target, connect_timeout).await;
        }
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
        connect(target, connect_timeout).await
    }

    /// The worker's HTTP/2 connection to the backend, made when there is none open.
    async fn shared(
        &self,
        worker: usize,
        target: &Target,
        connect_timeout: Duration,
    ) -> io::Result<Sender> {
        let open = || {
            let mut slot = self.slot(worker).lock().unwrap_or_else(|e| e.into_inner());
            slot.retain(|i| !i.sender.is_closed());
            slot.last().and_then(|i| i.sender.share())
        };
        if let Some(s) = open() {
            return Ok(s);
        }
        let _dialing = self.dialing[worker % self.dialing.len()].lock().await;
        if let Some(s) = open() {
            return Ok(s);
        }
        let sender = connect(target, connect_timeout).await?;
        if let Some(s) = sender.share() {
            let mut slot = self.slot(worker).lock().unwrap_or_else(|e| e.into_inner());
            slot.clear();
            slot.push(Idle {
                sender: s,
                since: Instant::now(),
            });
        }
        Ok(sender)
    }

    /// Park a connection whose exchange completed.
    pub fn checkin(&self, worker: usize, sender: Sender) {
        if sender.is_closed() || sender.is_shared() {
            // A shared (HTTP/2) connection stays in its slot; this handle just goes.
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

async fn connect(target: &Target, connect_timeout: Duration) -> io::Result<Sender> {
    match tokio::time::timeout(connect_timeout, target.connect()).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}
