//! Phi-accrual failure detection over peer heartbeats (Hayashibara et al., 2004; as in Akka and
//! Cassandra).
//!
//! Each heartbeat's arrival is recorded; phi is how unlikely the current silence is given the
//! recent inter-arrival times (normal approximation): phi = -log10(P(a gap at least this long)).
//! A peer is `suspect` while phi is at or above the threshold and `dead` once it has been
//! suspect for `dead_after`. Time is milliseconds, passed in.

use std::collections::VecDeque;

/// How many intervals the estimate keeps.
const WINDOW: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    Alive,
    Suspect,
    Dead,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Alive => "alive",
            PeerState::Suspect => "suspect",
            PeerState::Dead => "dead",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetectorConfig {
    /// Expected heartbeat interval (ms): seeds the estimate before real samples exist.
    pub interval_ms: u64,
    pub phi_threshold: f64,
    pub dead_after_ms: u64,
}

/// One peer's detector.
#[derive(Clone, Debug)]
pub struct Detector {
    cfg: DetectorConfig,
    intervals: VecDeque<f64>,
    last: Option<u64>,
    /// When phi first reached the threshold in the current silence.
    suspect_since: Option<u64>,
    /// When the detector started (a peer never heard from is measured from here).
    started: u64,
}

impl Detector {
    pub fn new(cfg: DetectorConfig, now: u64) -> Self {
        Self {
            cfg,
            intervals: VecDeque::with_capacity(WINDOW),
            last: None,
            suspect_since: None,
            started: now,
        }
    }

    /// A heartbeat arrived at `now`.
    pub fn heartbeat(&mut self, now: u64) {
        if let Some(last) = self.last {
            if now > last {
                if self.intervals.len() == WINDOW {
                    self.intervals.pop_front();
                }
                self.intervals.push_back((now - last) as f64);
            }
        }
        self.last = Some(now.max(self.last.unwrap_or(0)));
        self.suspect_since = None;
    }

    pub fn last_seen(&self) -> Option<u64> {
        self.last
    }

    /// How long (ms) nothing has been heard at `now` (since the start, before any heartbeat).
    pub fn silent_for(&self, now: u64) -> u64 {
        now.saturating_sub(self.last.unwrap_or(self.started))
    }

    /// Phi at `now`.
    pub fn phi(&self, now: u64) -> f64 {
        let since = self.last.unwrap_or(self.started);
        let elapsed = now.saturating_sub(since) as f64;
        let interval = self.cfg.interval_ms.max(1) as f64;
        let (mean, std) = if self.intervals.len() < 2 {
            (interval, interval / 4.0)
        } else {
            let n = self.intervals.len() as f64;
            let mean = self.intervals.iter().sum::<f64>() / n;
            let var = self
                .intervals
                .iter()
                .map(|x| (x - mean).powi(2))
                .sum::<f64>()
                / n;
            (mean, var.sqrt())
        };
        // A floor on the deviation keeps a very regular peer from being suspected over a few
        // milliseconds of scheduling jitter.
        let std = std.max(interval / 4.0).max(10.0);
        let y = (elapsed - mean) / std;
        // Logistic approximation of the normal tail (as Akka does).
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        let p_later = if elapsed > mean {
            e / (1.0 + e)
        } else {
            1.0 - 1.0 / (1.0 + e)
        };
        -p_later.max(1e-300).log10()
    }

    /// Update and return the state at `now`.
    pub fn state(&mut self, now: u64) -> PeerState {
        if self.phi(now) < self.cfg.phi_threshold {
            self.suspect_since = None;
            return PeerState::Alive;
        }
        let since = *self.suspect_since.get_or_insert(now);
        if now.saturating_sub(since) >= self.cfg.dead_after_ms {
            PeerState::Dead
        } else {
            PeerState::Suspect
        }
    }
}

/// One other peer as this peer's detector sees it: a row of `GET /peers`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeerView {
    pub id: String,
    pub addr: String,
    /// "voter" (among the agreed voters) or "learner".
    pub role: String,
    pub state: String,
    pub phi: f64,
    pub last_seen_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: DetectorConfig = DetectorConfig {
        interval_ms: 250,
        phi_threshold: 8.0,
        dead_after_ms: 5_000,
    };

    #[test]
    fn regular_heartbeats_stay_alive_and_silence_turns_suspect_then_dead() {
        let mut d = Detector::new(CFG, 0);
        let mut t = 0;
        for _ in 0..50 {
            t += 250;
            d.heartbeat(t);
            assert_eq!(d.state(t + 100), PeerState::Alive);
        }
        assert!(d.phi(t + 300) < 1.0);
        assert_eq!(d.state(t + 400), PeerState::Alive);
        // About a second of silence: suspect.
        let suspect_at = (t..t + 5_000)
            .step_by(10)
            .find(|&x| d.phi(x) >= 8.0)
            .unwrap();
        assert!(suspect_at - t < 1_500, "{}", suspect_at - t);
        assert_eq!(d.state(suspect_at), PeerState::Suspect);
        assert_eq!(d.state(suspect_at + 4_999), PeerState::Suspect);
        assert_eq!(d.state(suspect_at + 5_000), PeerState::Dead);
        d.heartbeat(suspect_at + 6_000);
        assert_eq!(d.state(suspect_at + 6_001), PeerState::Alive);
    }

    #[test]
    fn phi_grows_with_silence() {
        let mut d = Detector::new(CFG, 0);
        for i in 1..20 {
            d.heartbeat(i * 250);
        }
        let mut prev = 0.0;
        for gap in [100, 300, 500, 800, 1200] {
            let p = d.phi(19 * 250 + gap);
            assert!(p >= prev, "{gap}: {p} < {prev}");
            prev = p;
        }
    }

    #[test]
    fn a_peer_never_heard_from_becomes_suspect() {
        let mut d = Detector::new(CFG, 1_000);
        assert_eq!(d.state(1_100), PeerState::Alive);
        assert_eq!(d.state(10_000), PeerState::Suspect);
        assert_eq!(d.state(16_000), PeerState::Dead);
    }
}
