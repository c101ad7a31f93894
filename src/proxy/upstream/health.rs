//! This peer's local view of one backend, shared by the requests that feed it and read it: the
//! pure `LocalHealth` behind a lock, with lock-free fast paths for the common case (up, no
//! failure streak) and trial gating for a backend that traffic took down.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::core::health::{Local, LocalHealth, Source, Thresholds};
use crate::sync::MutexExt;

pub struct LocalView {
    health: Mutex<LocalHealth>,
    /// False only while the view is clean (up, no failure streak): successes skip the lock.
    dirty: AtomicBool,
    up: AtomicBool,
    /// Down because of traffic (not probes): trial requests may bring it back.
    trial_ok: AtomicBool,
    /// When the last trial request was let through while down (ms since `epoch`).
    last_trial_ms: AtomicU64,
    epoch: Instant,
}

impl Default for LocalView {
    fn default() -> Self {
        Self {
            health: Mutex::new(LocalHealth::default()),
            dirty: AtomicBool::new(false),
            up: AtomicBool::new(true),
            trial_ok: AtomicBool::new(false),
            last_trial_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl LocalView {
    /// Up in this peer's view, without side effects.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Which source took it down (None while up).
    pub fn down_by(&self) -> Option<Source> {
        self.health.locked().down_by()
    }

    /// Usable for a new request: up, or taken down by traffic and due a trial request (at most
    /// one per `trial_every`), so a backend that recovered is found again between probes.
    pub fn usable(&self, trial_every: Duration) -> bool {
        if self.is_up() {
            return true;
        }
        if !self.trial_ok.load(Ordering::Relaxed) {
            return false;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_trial_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= trial_every.as_millis() as u64
            && self
                .last_trial_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Record an outcome; returns the new state when it flips.
    pub fn record(&self, source: Source, ok: bool, t: &Thresholds) -> Option<Local> {
        if ok && source == Source::Traffic && !self.dirty.load(Ordering::Relaxed) {
            return None;
        }
        self.update(!ok, |h| h.record(source, ok, t))
    }

    /// Forget what probes said (`LocalHealth::forget_probes`); returns the new state on a flip.
    pub fn forget_probes(&self) -> Option<Local> {
        self.update(false, LocalHealth::forget_probes)
    }

    fn update(
        &self,
        failed: bool,
        f: impl FnOnce(&mut LocalHealth) -> Option<Local>,
    ) -> Option<Local> {
        let mut h = self.health.locked();
        let flip = f(&mut h);
        self.dirty
            .store(failed || h.state() == Local::Down, Ordering::Relaxed);
        self.trial_ok
            .store(h.down_by() == Some(Source::Traffic), Ordering::Relaxed);
        if let Some(state) = flip {
            self.up.store(state == Local::Up, Ordering::Relaxed);
        }
        flip
    }
}
