//! Keyed request-rate limiting with a sliding log (Django REST framework's
//! `SimpleRateThrottle`): a key may make at most N requests in any window of the rate's
//! length.
//!
//! Why a sliding log and not a fixed window or GCRA: a fixed window (balancebeam) lets 2N
//! through around a window edge; GCRA spreads N over the window (after a burst of 3 at `3/m`
//! it admits the 4th after 20 s), which is not what operators mean by "3 per minute". The log
//! keeps at most N instants per key, and keys whose newest request is older than the window
//! are forgotten, so memory is bounded by the keys active in the last window.
//! Out of scope: what a key is (remote/ uses client IPs and user names).

use crate::limit::clock::{Clock, SystemClock};
use crate::limit::rate::RequestRate;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The pure sliding-log state for many keys; time comes from the caller.
#[derive(Debug)]
pub struct SlidingLog<K> {
    // Requests allowed per window, and the window.
    rate: RequestRate,
    // For each key, the instants of its requests in the current window, oldest first.
    log: HashMap<K, VecDeque<Instant>>,
    // When stale keys were last dropped.
    last_prune: Option<Instant>,
}

impl<K: Hash + Eq + Clone> SlidingLog<K> {
    /// An empty log for `rate`.
    pub fn new(rate: RequestRate) -> Self {
        SlidingLog {
            rate,
            log: HashMap::new(),
            last_prune: None,
        }
    }

    /// How long `key` must wait before a request would be allowed, or `None` if it would be
    /// allowed now. Records nothing.
    pub fn wait(&mut self, key: &K, now: Instant) -> Option<Duration> {
        self.maybe_prune(now);
        let per = self.rate.per;
        let q = self.log.get_mut(key)?;
        while q
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= per)
        {
            q.pop_front();
        }
        if q.len() < self.rate.count as usize {
            return None;
        }
        // Allowed again when the oldest request in the window leaves it (DRF's wait()).
        let oldest = *q.front()?;
        Some(per.saturating_sub(now.saturating_duration_since(oldest)))
    }

    /// Records a request for `key` at `now` without checking.
    pub fn record(&mut self, key: K, now: Instant) {
        let cap = self.rate.count as usize;
        let q = self.log.entry(key).or_default();
        q.push_back(now);
        while q.len() > cap {
            q.pop_front();
        }
    }

    /// Allows and records a request, or says how long to wait (recording nothing).
    pub fn check(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        match self.wait(key, now) {
            Some(d) => Err(d),
            None => {
                self.record(key.clone(), now);
                Ok(())
            }
        }
    }

    /// Takes back the entry recorded at `at` for `key` (a reservation that turned out not to
    /// count, say a login that succeeded).
    pub fn refund(&mut self, key: &K, at: Instant) {
        if let Some(q) = self.log.get_mut(key) {
            if let Some(pos) = q.iter().rposition(|&t| t == at) {
                q.remove(pos);
            }
        }
    }

    /// Keys currently remembered.
    pub fn len(&self) -> usize {
        self.log.len()
    }

    /// True when no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.log.is_empty()
    }

    /// Forgets keys with no request inside the window.
    pub fn prune(&mut self, now: Instant) {
        let per = self.rate.per;
        self.log.retain(|_, q| {
            q.back()
                .is_some_and(|&t| now.saturating_duration_since(t) < per)
        });
        self.last_prune = Some(now);
    }

    fn maybe_prune(&mut self, now: Instant) {
        // At most once a second (and never more often than the window), so the amortised
        // cost per request stays constant while a flood of new keys cannot accumulate.
        let every = self.rate.per.min(Duration::from_secs(1));
        if self
            .last_prune
            .is_none_or(|t| now.saturating_duration_since(t) >= every)
        {
            self.prune(now);
        }
    }
}

/// A [`SlidingLog`] behind a lock, reading a clock: what the servers share between workers.
#[derive(Debug)]
pub struct Throttle<K> {
    log: Mutex<SlidingLog<K>>,
    clock: Arc<dyn Clock>,
}

impl<K: Hash + Eq + Clone> Throttle<K> {
    /// A throttle for `rate` on the system clock.
    pub fn new(rate: RequestRate) -> Self {
        Self::with_clock(rate, Arc::new(SystemClock))
    }

    /// A throttle for `rate` reading time from `clock`.
    pub fn with_clock(rate: RequestRate, clock: Arc<dyn Clock>) -> Self {
        Throttle {
            log: Mutex::new(SlidingLog::new(rate)),
            clock,
        }
    }

    /// The rate it holds keys to.
    pub fn rate(&self) -> RequestRate {
        self.log.lock().rate
    }

    /// Allows and records a request for `key`, or returns the wait.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let now = self.clock.now();
        self.log.lock().check(key, now)
    }

    /// The wait before `key` may go, without recording anything.
    pub fn wait(&self, key: &K) -> Option<Duration> {
        let now = self.clock.now();
        self.log.lock().wait(key, now)
    }

    /// As [`check`](Self::check), returning when the place was taken, for [`refund`](Self::refund).
    ///
    /// # Errors
    /// How long until a place frees when the key is at its rate.
    pub fn reserve(&self, key: &K) -> Result<Instant, Duration> {
        let now = self.clock.now();
        self.log.lock().check(key, now).map(|()| now)
    }

    /// Gives back a place [`reserve`](Self::reserve) took at `at`.
    pub fn refund(&self, key: &K, at: Instant) {
        self.log.lock().refund(key, at);
    }

    /// Records an event for `key` (a failed login, say).
    pub fn record(&self, key: K) {
        let now = self.clock.now();
        self.log.lock().record(key, now);
    }
}

/// Seconds for a `Retry-After`: the wait rounded up, at least 1, at most `u16::MAX`.
pub fn retry_after_secs(wait: Duration) -> u16 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.clamp(1, u16::MAX as u64) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::clock::ManualClock;

    fn rate(s: &str) -> RequestRate {
        s.parse().unwrap()
    }

    #[test]
    fn three_per_minute_lets_exactly_three_in_and_tells_the_fourth_when() {
        let clock = Arc::new(ManualClock::new());
        let t = Throttle::with_clock(rate("3/m"), clock.clone());
        for _ in 0..3 {
            assert_eq!(t.check(&"alice"), Ok(()), "Now: {:?}", clock.now());
        }
        clock.advance(Duration::from_secs(10));
        assert_eq!(t.check(&"alice"), Err(Duration::from_secs(50)));
        // A refused request does not count.
        clock.advance(Duration::from_secs(49));
        assert_eq!(t.check(&"alice"), Err(Duration::from_secs(1)));
        clock.advance(Duration::from_secs(1));
        // All three left the window together, so three more fit, and no fourth.
        for _ in 0..3 {
            assert_eq!(t.check(&"alice"), Ok(()), "Now: {:?}", clock.now());
        }
        assert_eq!(t.check(&"alice"), Err(Duration::from_secs(60)));
    }

    #[test]
    fn a_reservation_counts_until_refunded() {
        let clock = Arc::new(ManualClock::new());
        let t = Throttle::with_clock(rate("2/m"), clock.clone());
        let a = t.reserve(&"k").unwrap();
        clock.advance(Duration::from_secs(1));
        let b = t.reserve(&"k").unwrap();
        // Both places are taken while their checks run: a third waits.
        assert_eq!(t.reserve(&"k"), Err(Duration::from_secs(59)));
        t.refund(&"k", b);
        let c = t.reserve(&"k").unwrap();
        assert_eq!(c, b, "the freed place is taken again at the same instant");
        t.refund(&"k", a);
        assert!(t.reserve(&"k").is_ok());
        assert!(t.reserve(&"k").is_err());
    }

    #[test]
    fn sliding_window_never_lets_2n_through_around_an_edge() {
        // Fixed windows admit N at 0:59 and N more at 1:00; a sliding log must not.
        let clock = Arc::new(ManualClock::new());
        let t = Throttle::with_clock(rate("5/m"), clock.clone());
        clock.advance(Duration::from_secs(59));
        for _ in 0..5 {
            assert!(t.check(&1).is_ok());
        }
        clock.advance(Duration::from_secs(2));
        assert!(t.check(&1).is_err(), "Now: {:?}", clock.now());
        // Over every 60 s window, at most 5 pass: step through 3 minutes second by second.
        let mut passed = vec![];
        for s in 0..180u64 {
            if t.check(&1).is_ok() {
                passed.push(s);
            }
            clock.advance(Duration::from_secs(1));
        }
        for (i, &s) in passed.iter().enumerate() {
            let in_window = passed[i..].iter().take_while(|&&x| x < s + 60).count();
            assert!(in_window <= 5, "{in_window} in window starting {s}s");
        }
    }

    #[test]
    fn keys_are_independent() {
        let clock = Arc::new(ManualClock::new());
        let t = Throttle::with_clock(rate("1/m"), clock);
        assert!(t.check(&"10.0.0.1").is_ok());
        assert!(t.check(&"10.0.0.1").is_err());
        assert!(t.check(&"10.0.0.2").is_ok());
    }

    #[test]
    fn wait_and_record_count_failures_without_consuming_on_check() {
        let clock = Arc::new(ManualClock::new());
        let t = Throttle::with_clock(rate("2/m"), clock.clone());
        assert_eq!(t.wait(&"ip"), None);
        t.record("ip");
        assert_eq!(t.wait(&"ip"), None);
        t.record("ip");
        assert_eq!(t.wait(&"ip"), Some(Duration::from_secs(60)));
        clock.advance(Duration::from_secs(60));
        assert_eq!(t.wait(&"ip"), None);
    }

    #[test]
    fn idle_keys_are_forgotten_so_a_flood_of_addresses_stays_bounded() {
        let t0 = Instant::now();
        let mut log = SlidingLog::new(rate("10/s"));
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_millis(i as u64);
            assert!(log.check(&i, now).is_ok());
        }
        // Only keys seen in the last second (plus at most one prune interval) remain.
        assert!(log.len() <= 2_000, "{} keys kept", log.len());
        log.prune(t0 + Duration::from_secs(20));
        assert!(log.is_empty());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(50)), 50);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
