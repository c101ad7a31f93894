//! This peer's own view of one backend: rise/fall counters for probes and a consecutive-failure
//! count for live traffic. Pure: `record` takes an outcome and says when the view flips.

/// Up or down, as this peer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    Up,
    Down,
}

/// Thresholds, from `[health]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive probe passes to come back up.
    pub rise: u32,
    /// Consecutive probe failures to go down.
    pub fall: u32,
    /// Consecutive failed live requests to go down; 0 = passive detection off.
    pub passive_failures: u32,
}

/// Where an observation came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Probe,
    Traffic,
}

/// The local view of one backend. Seeded backends start up (as in HAProxy and Pingora).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalHealth {
    state: Local,
    /// What took it down: only that source's evidence brings it back early (a backend that
    /// fails its health check but answers traffic stays down until `rise` probe passes).
    down_by: Option<Source>,
    /// Consecutive probe passes (while down) or failures (while up).
    probe_streak: u32,
    /// Consecutive failed live requests.
    traffic_failures: u32,
}

impl Default for LocalHealth {
    fn default() -> Self {
        Self {
            state: Local::Up,
            down_by: None,
            probe_streak: 0,
            traffic_failures: 0,
        }
    }
}

impl LocalHealth {
    pub fn state(&self) -> Local {
        self.state
    }

    /// Which source took it down (None while up).
    pub fn down_by(&self) -> Option<Source> {
        self.down_by
    }

    /// Record one outcome; returns the new state when it flips.
    ///
    /// A probe pass counts toward `rise` only while down; a probe failure toward `fall` only while
    /// up. Live traffic can take a backend down (`passive_failures` in a row); if traffic took
    /// it down, a successful live request (a trial) brings it back at once: it answered. If
    /// probes took it down, only `rise` probe passes do.
    pub fn record(&mut self, source: Source, ok: bool, t: &Thresholds) -> Option<Local> {
        match (source, ok, self.state) {
            (Source::Probe, true, Local::Up) | (Source::Probe, false, Local::Down) => {
                self.probe_streak = 0;
                None
            }
            (Source::Probe, true, Local::Down) => {
                self.probe_streak += 1;
                (self.probe_streak >= t.rise.max(1)).then(|| self.flip(Local::Up))
            }
            (Source::Probe, false, Local::Up) => {
                self.probe_streak += 1;
                (self.probe_streak >= t.fall.max(1)).then(|| {
                    self.down_by = Some(Source::Probe);
                    self.flip(Local::Down)
                })
            }
            (Source::Traffic, true, Local::Up) => {
                self.traffic_failures = 0;
                None
            }
            (Source::Traffic, true, Local::Down) => {
                (self.down_by == Some(Source::Traffic)).then(|| self.flip(Local::Up))
            }
            (Source::Traffic, false, Local::Up) => {
                self.traffic_failures += 1;
                (t.passive_failures > 0 && self.traffic_failures >= t.passive_failures).then(|| {
                    self.down_by = Some(Source::Traffic);
                    self.flip(Local::Down)
                })
            }
            (Source::Traffic, false, Local::Down) => None,
        }
    }

    fn flip(&mut self, to: Local) -> Local {
        self.state = to;
        if to == Local::Up {
            self.down_by = None;
        }
        self.probe_streak = 0;
        self.traffic_failures = 0;
        to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        rise: 2,
        fall: 3,
        passive_failures: 5,
    };

    #[test]
    fn probes_fall_and_rise() {
        let mut h = LocalHealth::default();
        assert_eq!(h.record(Source::Probe, false, &T), None);
        assert_eq!(h.record(Source::Probe, false, &T), None);
        assert_eq!(h.record(Source::Probe, false, &T), Some(Local::Down));
        assert_eq!(h.record(Source::Probe, true, &T), None);
        assert_eq!(h.record(Source::Probe, false, &T), None); // streak broken
        assert_eq!(h.record(Source::Probe, true, &T), None);
        assert_eq!(h.record(Source::Probe, true, &T), Some(Local::Up));
    }

    #[test]
    fn a_pass_resets_the_fall_streak() {
        let mut h = LocalHealth::default();
        h.record(Source::Probe, false, &T);
        h.record(Source::Probe, false, &T);
        h.record(Source::Probe, true, &T);
        h.record(Source::Probe, false, &T);
        assert_eq!(h.record(Source::Probe, false, &T), None);
        assert_eq!(h.state(), Local::Up);
    }

    #[test]
    fn traffic_failures_in_a_row() {
        let mut h = LocalHealth::default();
        for _ in 0..4 {
            assert_eq!(h.record(Source::Traffic, false, &T), None);
        }
        h.record(Source::Traffic, true, &T);
        for _ in 0..4 {
            assert_eq!(h.record(Source::Traffic, false, &T), None);
        }
        assert_eq!(h.record(Source::Traffic, false, &T), Some(Local::Down));
        assert_eq!(h.record(Source::Traffic, true, &T), Some(Local::Up));
    }

    #[test]
    fn traffic_cannot_undo_a_failed_health_check() {
        let mut h = LocalHealth::default();
        for _ in 0..3 {
            h.record(Source::Probe, false, &T);
        }
        assert_eq!(h.down_by(), Some(Source::Probe));
        assert_eq!(h.record(Source::Traffic, true, &T), None);
        assert_eq!(h.state(), Local::Down);
        h.record(Source::Probe, true, &T);
        assert_eq!(h.record(Source::Probe, true, &T), Some(Local::Up));
        assert_eq!(h.down_by(), None);
    }

    #[test]
    fn passive_off() {
        let t = Thresholds {
            passive_failures: 0,
            ..T
        };
        let mut h = LocalHealth::default();
        for _ in 0..100 {
            assert_eq!(h.record(Source::Traffic, false, &t), None);
        }
    }
}
