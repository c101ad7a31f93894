//! What happened at one peer, recently: a bounded ring (`GET /events`), a live feed
//! (`GET /events?follow=1`, server-sent events), and the same events as log lines at info.
//!
//! Each event is a flat JSON object: `at` (RFC 3339), `seq` (per peer, rising), `kind`, `peer`
//! (where it was seen), `message` (one readable line), and the kind's own fields.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::sync::MutexExt;

/// How many events a peer keeps.
pub const CAPACITY: usize = 1000;

/// One peer's events (cheap to clone; clones share the ring).
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    peer: String,
    seq: AtomicU64,
    ring: Mutex<VecDeque<Arc<Value>>>,
    live: broadcast::Sender<Arc<Value>>,
}

impl Events {
    pub fn new(peer: &str) -> Events {
        let (live, _) = broadcast::channel(256);
        Events {
            inner: Arc::new(Inner {
                peer: peer.to_string(),
                seq: AtomicU64::new(0),
                ring: Mutex::new(VecDeque::with_capacity(64)),
                live,
            }),
        }
    }

    /// Record an event: `fields` (a JSON object) go next to `at`, `seq`, `kind`, `peer` and
    /// `message`.
    pub fn emit(&self, kind: &str, message: String, fields: Value) {
        let mut obj = Map::new();
        obj.insert(
            "at".into(),
            humantime::format_rfc3339_millis(SystemTime::now())
                .to_string()
                .into(),
        );
        let mut ring = self.inner.ring.locked();
        // Under the lock: sequence numbers follow ring order.
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
        obj.insert("seq".into(), seq.into());
        obj.insert("kind".into(), kind.into());
        obj.insert("peer".into(), self.inner.peer.clone().into());
        obj.insert("message".into(), message.clone().into());
        if let Value::Object(f) = fields {
            obj.extend(f);
        }
        let event = Arc::new(Value::Object(obj));
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(event.clone());
        let _ = self.inner.live.send(event);
        drop(ring);
        tracing::info!(target: "shoal::ops::events", kind, peer = %self.inner.peer, "{message}");
    }

    /// The events kept, oldest first.
    pub fn recent(&self) -> Vec<Arc<Value>> {
        let ring = self.inner.ring.locked();
        ring.iter().cloned().collect()
    }

    /// The events kept and a receiver of every later one, with nothing lost or repeated between.
    pub fn follow(&self) -> (Vec<Arc<Value>>, broadcast::Receiver<Arc<Value>>) {
        let ring = self.inner.ring.locked();
        let rx = self.inner.live.subscribe();
        (ring.iter().cloned().collect(), rx)
    }

    pub fn peer(&self) -> &str {
        &self.inner.peer
    }
}

/// Server-sent-event framing of one event.
pub fn sse_frame(event: &Value) -> String {
    let id = event["seq"].as_u64().unwrap_or(0);
    let kind = event["kind"].as_str().unwrap_or("event");
    format!("id: {id}\nevent: {kind}\ndata: {event}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_ring_keeps_the_latest_in_order() {
        let ev = Events::new("a");
        for i in 0..CAPACITY + 5 {
            ev.emit("test", format!("n{i}"), json!({ "n": i }));
        }
        let r = ev.recent();
        assert_eq!(r.len(), CAPACITY);
        assert_eq!(r[0]["n"], 5);
        assert_eq!(r[CAPACITY - 1]["n"], CAPACITY + 4);
        assert_eq!(r[0]["peer"], "a");
        assert_eq!(r[0]["kind"], "test");
        assert!(r
            .windows(2)
            .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
        assert!(r[0]["at"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn follow_misses_nothing_between_backlog_and_live() {
        let ev = Events::new("a");
        ev.emit("x", "one".into(), json!({}));
        let (backlog, mut rx) = ev.follow();
        ev.emit("x", "two".into(), json!({}));
        assert_eq!(backlog.len(), 1);
        assert_eq!(rx.try_recv().unwrap()["message"], "two");
        let frame = sse_frame(&backlog[0]);
        assert!(frame.starts_with("id: 1\nevent: x\ndata: {"), "{frame}");
        assert!(frame.ends_with("}\n\n"));
    }
}
