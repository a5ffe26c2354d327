//! Time as a dependency, so rate logic can be tested without sleeping (the governor crate's
//! `Clock` / `FakeRelativeClock` idea). Out of scope: waiting (callers use Condvar deadlines).

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// A source of monotonic time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when a test advances it.
#[derive(Debug)]
pub struct ManualClock {
    // The instant the clock reads now; starts at creation time and only moves forward.
    now: Mutex<Instant>,
}

impl ManualClock {
    /// A clock reading the real time of its creation.
    pub fn new() -> Self {
        ManualClock {
            now: Mutex::new(Instant::now()),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        *self.now.lock() += d;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.now.lock()
    }
}
