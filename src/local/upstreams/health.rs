//! Whether one remote-proxy may take new tunnels: a small state machine fed by health
//! probes and by tunnels that failed to open, with HAProxy's rise and fall thresholds.
//!
//! Down after `fall` consecutive failed probes, or at once after a tunnel could not reach it
//! (a refused connect is not worth two more tries by apps). Up again after `rise`
//! consecutive good probes. The first probe at start-up decides on its own, so a remote that
//! is down at start gets no tunnels. A remote that answers `draining` is up but takes no new
//! tunnels. Pure: the caller probes and logs the changes returned here.

/// Thresholds, in consecutive events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Good probes that bring a down remote back.
    pub rise: u32,
    /// Failed probes that take an up remote down.
    pub fall: u32,
}

/// A change worth one log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Now down; `failures` in a row, the last one `reason`.
    Down {
        /// What failed last.
        reason: String,
        /// Consecutive failures counted.
        failures: u32,
    },
    /// Now up, after `probes` good probes in a row.
    Up {
        /// Consecutive good probes counted.
        probes: u32,
    },
    /// Answering `draining`: no new tunnels.
    Draining,
    /// Serving again after draining.
    Serving,
}

/// The state of one remote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    up: bool,
    draining: bool,
    // Consecutive failures while up, or consecutive good probes while down.
    streak: u32,
    // Whether a probe has decided the state yet.
    known: bool,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    /// Not probed yet: treated as up, until the first probe says otherwise.
    pub fn new() -> Health {
        Health {
            up: true,
            draining: false,
            streak: 0,
            known: false,
        }
    }

    /// May take new tunnels: up and not draining.
    pub fn usable(&self) -> bool {
        self.up && !self.draining
    }

    /// Up (draining or not).
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// A probe was answered; `draining` when the answer said so.
    pub fn probe_ok(&mut self, draining: bool, t: Thresholds) -> Option<Change> {
        let first = !std::mem::replace(&mut self.known, true);
        let drain_change = match (self.draining, draining) {
            (false, true) => Some(Change::Draining),
            (true, false) => Some(Change::Serving),
            _ => None,
        };
        self.draining = draining;
        if self.up {
            self.streak = 0;
            return if first { None } else { drain_change };
        }
        self.streak += 1;
        if first || self.streak >= t.rise.max(1) {
            let probes = self.streak;
            self.up = true;
            self.streak = 0;
            return Some(Change::Up { probes });
        }
        None
    }

    /// A probe failed (no connection, no answer in time, not our protocol).
    pub fn probe_failed(&mut self, reason: &str, t: Thresholds) -> Option<Change> {
        let first = !std::mem::replace(&mut self.known, true);
        if !self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        if first || self.streak >= t.fall.max(1) {
            return Some(self.go_down(reason));
        }
        None
    }

    /// A tunnel could not reach the remote: down at once for new tunnels.
    pub fn tunnel_failed(&mut self, reason: &str) -> Option<Change> {
        self.known = true;
        if !self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        Some(self.go_down(reason))
    }

    fn go_down(&mut self, reason: &str) -> Change {
        let failures = self.streak;
        self.up = false;
        self.streak = 0;
        Change::Down {
            reason: reason.to_string(),
            failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds { rise: 2, fall: 3 };

    #[test]
    fn the_first_probe_decides_alone() {
        let mut h = Health::new();
        assert!(h.usable());
        assert!(matches!(
            h.probe_failed("refused", T),
            Some(Change::Down { .. })
        ));
        assert!(!h.usable());
        let mut h = Health::new();
        assert_eq!(h.probe_ok(false, T), None);
        assert!(h.usable());
    }

    #[test]
    fn down_after_fall_failed_probes_up_after_rise_good_ones() {
        let mut h = Health::new();
        h.probe_ok(false, T);
        assert_eq!(h.probe_failed("timeout", T), None);
        assert_eq!(h.probe_failed("timeout", T), None);
        // A good probe in between resets the count.
        assert_eq!(h.probe_ok(false, T), None);
        assert_eq!(h.probe_failed("timeout", T), None);
        assert_eq!(h.probe_failed("timeout", T), None);
        assert_eq!(
            h.probe_failed("timeout", T),
            Some(Change::Down {
                reason: "timeout".into(),
                failures: 3
            })
        );
        assert!(!h.usable());
        assert_eq!(h.probe_ok(false, T), None);
        assert_eq!(h.probe_ok(false, T), Some(Change::Up { probes: 2 }));
        assert!(h.usable());
    }

    #[test]
    fn a_failed_tunnel_takes_it_down_at_once() {
        let mut h = Health::new();
        h.probe_ok(false, T);
        assert!(matches!(
            h.tunnel_failed("connect refused"),
            Some(Change::Down { failures: 1, .. })
        ));
        assert_eq!(h.tunnel_failed("connect refused"), None);
        assert!(!h.usable());
    }

    #[test]
    fn draining_is_up_but_takes_no_tunnels() {
        let mut h = Health::new();
        h.probe_ok(false, T);
        assert_eq!(h.probe_ok(true, T), Some(Change::Draining));
        assert!(h.is_up() && !h.usable());
        assert_eq!(h.probe_ok(false, T), Some(Change::Serving));
        assert!(h.usable());
    }
}
