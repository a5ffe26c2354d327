//! Per-user token bucket: the pure core and the shared, blocking wrapper.
//!
//! In scope: how many bytes a user may forward and when. Out of scope: sockets (net/relay/
//! reads, asks this module, then writes). One [`SharedBucket`] serves every connection of a
//! user, both directions counted together.
//!
//! Burst: the bucket holds at most 100 ms of the rate (never less than [`MIN_CHUNK`]), so over
//! any window `w` a user gets at most `rate * w + rate * 100 ms`: 1.1x the rate over one
//! second, and with steady demand the long-run average is the rate itself. Relays read at most
//! what the bucket can hold, so a grant never has to exceed the burst.
//!
//! Fairness: waiters are served strictly in arrival order (a ticket queue), and each relay
//! reads at most its share of the burst ([`SharedBucket::chunk_limit`]), so parallel
//! connections of one user take turns in equal slices.

use crate::limit::clock::{Clock, SystemClock};
use crate::limit::rate::Bandwidth;
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Smallest burst and smallest read a relay makes under a limit, in bytes.
pub const MIN_CHUNK: u64 = 64;

/// Largest grant one relay takes per turn, in bytes. Grants go one per turn in FIFO order,
/// and a relay asks for what its socket holds up to its share, so a connection whose
/// receive window is small (TCP autotuning grows windows only for fast readers) got smaller
/// grants than its siblings, and less bandwidth (docs/benchmarks.md). Every connection holds at least this much when it is backlogged. A user with a single
/// tunnel is not capped.
pub const MAX_TURN: u64 = 32 * 1024;
/// How much of the rate the bucket may hold: 100 ms worth.
pub const BURST_WINDOW: Duration = Duration::from_millis(100);

const NANOS: u128 = 1_000_000_000;

/// A token bucket that works on a caller-supplied `now`; no locking, no waiting.
///
/// Tokens are kept in byte-nanoseconds, so refill is exact integer arithmetic.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Bytes per second; `None` is unlimited.
    rate: Option<u64>,
    /// Most bytes the bucket can hold.
    capacity: u64,
    /// Tokens available, scaled by 1e9.
    tokens: u128,
    /// When `tokens` was last brought up to date.
    last: Instant,
}

/// The burst a rate allows, in bytes: 100 ms of the rate, at least [`MIN_CHUNK`].
pub fn burst_for(rate: Bandwidth) -> u64 {
    match rate.limit() {
        None => u64::MAX,
        Some(r) => ((r as u128 * BURST_WINDOW.as_nanos() / NANOS) as u64).max(MIN_CHUNK),
    }
}

impl TokenBucket {
    /// A full bucket for `rate` with the default burst ([`burst_for`]).
    pub fn new(rate: Bandwidth, now: Instant) -> Self {
        Self::with_burst(rate, burst_for(rate), now)
    }

    /// A full bucket for `rate` holding at most `burst` bytes (at least 1).
    pub fn with_burst(rate: Bandwidth, burst: u64, now: Instant) -> Self {
        let capacity = burst.max(1);
        TokenBucket {
            rate: rate.limit(),
            capacity,
            tokens: capacity as u128 * NANOS,
            last: now,
        }
    }

    /// The configured rate.
    pub fn rate(&self) -> Bandwidth {
        match self.rate {
            Some(r) => Bandwidth::bytes_per_sec(r),
            None => Bandwidth::UNLIMITED,
        }
    }

    /// Largest single grant: the bucket's capacity (unbounded when unlimited).
    pub fn max_grant(&self) -> u64 {
        match self.rate {
            None => u64::MAX,
            Some(_) => self.capacity,
        }
    }

    /// Changes the rate; tokens earned so far at the old rate are kept, up to the new burst.
    pub fn set_rate(&mut self, rate: Bandwidth, now: Instant) {
        self.refill(now);
        self.rate = rate.limit();
        self.capacity = burst_for(rate).max(1);
        let cap = self.capacity as u128 * NANOS;
        self.tokens = if self.rate.is_none() {
            cap
        } else {
            self.tokens.min(cap)
        };
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        let cap = self.capacity as u128 * NANOS;
        self.tokens = match self.rate {
            None => cap,
            Some(r) => (self.tokens + elapsed * r as u128).min(cap),
        };
    }

    /// Takes `n` bytes' worth of tokens if they are there, or says how long until they are.
    /// `n` above [`max_grant`](Self::max_grant) is charged as `max_grant`.
    pub fn try_take(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let need = n.min(self.capacity) as u128 * NANOS;
        if self.tokens >= need {
            self.tokens -= need;
            Ok(())
        } else {
            // Round up so the waiter does not wake a nanosecond early and spin.
            let missing = need - self.tokens;
            let nanos = missing.div_ceil(rate as u128);
            Err(Duration::from_nanos(nanos.min(u64::MAX as u128) as u64))
        }
    }
}

/// Mutable state behind the [`SharedBucket`] lock.
#[derive(Debug)]
struct State {
    bucket: TokenBucket,
    /// Next ticket to hand out; tickets give strict FIFO order among waiters.
    next_ticket: u64,
    /// The ticket allowed to take tokens now.
    serving: u64,
    /// Relay directions currently drawing on this bucket (for per-connection read sizes).
    pumps: usize,
}

/// One user's bucket, shared by all of that user's relays.
///
/// Blocks on a Condvar with a deadline, never sleep-polls; [`set_rate`](Self::set_rate) wakes
/// every waiter so a live rate change applies at once.
#[derive(Debug)]
pub struct SharedBucket {
    state: Mutex<State>,
    // One condvar per ticket slot (ticket % WAKE_SLOTS): a grant wakes only the next ticket's
    // holder instead of every waiter; notify_all on one condvar woke every waiting
    // connection per grant, which held fast users well below their rate.
    conds: Box<[Condvar]>,
    clock: Arc<dyn Clock>,
    // Nanoseconds relays spent blocked in `acquire`, for the metrics.
    waited_ns: std::sync::atomic::AtomicU64,
}

/// Condvars a bucket spreads its waiters over.
const WAKE_SLOTS: usize = 64;

impl SharedBucket {
    /// A bucket for `rate` on the system clock.
    pub fn new(rate: Bandwidth) -> Self {
        Self::with_clock(rate, Arc::new(SystemClock))
    }

    /// A bucket for `rate` reading time from `clock`.
    pub fn with_clock(rate: Bandwidth, clock: Arc<dyn Clock>) -> Self {
        let now = clock.now();
        SharedBucket {
            state: Mutex::new(State {
                bucket: TokenBucket::new(rate, now),
                next_ticket: 0,
                serving: 0,
                pumps: 0,
            }),
            conds: (0..WAKE_SLOTS).map(|_| Condvar::new()).collect(),
            clock,
            waited_ns: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The current rate.
    pub fn rate(&self) -> Bandwidth {
        self.state.lock().bucket.rate()
    }

    /// Changes the rate for every connection of the user, waking blocked relays.
    pub fn set_rate(&self, rate: Bandwidth) {
        let mut st = self.state.lock();
        if st.bucket.rate() != rate {
            let now = self.clock.now();
            st.bucket.set_rate(rate, now);
            // Only the head waits with a deadline; it must recompute at the new rate.
            self.wake(st.serving);
        }
    }

    /// Time relays have spent waiting for this bucket so far.
    pub fn waited(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.waited_ns.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Registers a relay direction; the returned guard unregisters it when dropped.
    pub fn register(self: &Arc<Self>) -> PumpGuard {
        self.state.lock().pumps += 1;
        PumpGuard(Arc::clone(self))
    }

    /// How many bytes a relay should read next: its equal share of the burst, at least
    /// [`MIN_CHUNK`], at most `buf_len`, and at most [`MAX_TURN`] when several tunnels share
    /// the bucket.
    pub fn chunk_limit(&self, buf_len: usize) -> usize {
        let st = self.state.lock();
        let max = st.bucket.max_grant();
        if max == u64::MAX {
            return buf_len;
        }
        let mut share = (max / st.pumps.max(1) as u64).max(MIN_CHUNK).min(max);
        // One tunnel (two directions) shares turns with nobody: keep its reads large.
        if st.pumps > 2 {
            share = share.min(MAX_TURN);
        }
        (share.min(buf_len as u64) as usize).max(1)
    }

    /// Wakes the holder of `ticket` (and any other waiter sharing its slot; they re-check).
    fn wake(&self, ticket: u64) {
        self.conds[slot(ticket)].notify_all();
    }

    /// Blocks until `n` bytes may be forwarded, in FIFO order with the user's other relays.
    pub fn acquire(&self, n: u64) {
        let mut st = self.state.lock();
        if st.bucket.rate.is_none() && st.serving == st.next_ticket {
            return; // unlimited and nobody queued: nothing to wait for
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        let entered = self.clock.now();
        loop {
            if st.serving == ticket {
                let now = self.clock.now();
                match st.bucket.try_take(n, now) {
                    Ok(()) => {
                        let waited = now.saturating_duration_since(entered).as_nanos();
                        self.waited_ns.fetch_add(
                            u64::try_from(waited).unwrap_or(u64::MAX),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        st.serving += 1;
                        if st.serving != st.next_ticket {
                            self.wake(st.serving);
                        }
                        return;
                    }
                    Err(wait) => {
                        self.conds[slot(ticket)].wait_for(&mut st, wait);
                    }
                }
            } else {
                self.conds[slot(ticket)].wait(&mut st);
            }
        }
    }
}

fn slot(ticket: u64) -> usize {
    (ticket % WAKE_SLOTS as u64) as usize
}

/// Keeps a relay direction counted in its bucket's fair share; see [`SharedBucket::register`].
#[derive(Debug)]
pub struct PumpGuard(Arc<SharedBucket>);

impl Drop for PumpGuard {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.pumps = st.pumps.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::clock::ManualClock;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn full_bucket_grants_burst_then_waits_for_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Bandwidth::bytes_per_sec(10_000), t0);
        assert_eq!(b.max_grant(), 1_000);
        assert_eq!(b.try_take(1_000, t0), Ok(()));
        assert_eq!(b.try_take(500, t0), Err(ms(50)));
        assert_eq!(b.try_take(500, t0 + ms(50)), Ok(()));
        assert_eq!(b.try_take(1, t0 + ms(50)), Err(Duration::from_micros(100)));
    }

    #[test]
    fn burst_never_exceeds_100ms_of_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Bandwidth::bytes_per_sec(1_000_000), t0);
        // Idle for an hour: still only 100 ms worth available.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.try_take(100_000, later), Ok(()));
        assert!(b.try_take(1, later).is_err());
    }

    #[test]
    fn burst_has_a_floor_for_tiny_rates() {
        assert_eq!(burst_for(Bandwidth::bytes_per_sec(100)), MIN_CHUNK);
        assert_eq!(burst_for(Bandwidth::bytes_per_sec(1_000_000)), 100_000);
    }

    #[test]
    fn any_window_gets_at_most_rate_times_window_plus_burst() {
        // Greedy taker on a manual clock, 1 ms steps for 5 s; check every 1 s sliding window.
        let rate = 50_000u64;
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Bandwidth::bytes_per_sec(rate), t0);
        let mut sent = vec![0u64; 5_000];
        for (i, slot) in sent.iter_mut().enumerate() {
            let now = t0 + ms(i as u64);
            while b.try_take(1_000, now).is_ok() {
                *slot += 1_000;
            }
        }
        let burst = burst_for(Bandwidth::bytes_per_sec(rate));
        for start in 0..4_000 {
            let w: u64 = sent[start..start + 1_000].iter().sum();
            assert!(w <= rate + burst, "window at {start} ms carried {w}");
        }
        // Long-run average within 2% of the rate (the burst is amortised over 5 s).
        let total: u64 = sent.iter().sum();
        let avg = total as f64 / 5.0;
        assert!(
            (avg - rate as f64).abs() / (rate as f64) < 0.03,
            "avg {avg}"
        );
    }

    #[test]
    fn unlimited_never_waits() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Bandwidth::UNLIMITED, t0);
        for _ in 0..1000 {
            assert_eq!(b.try_take(1 << 30, t0), Ok(()));
        }
    }

    #[test]
    fn lowering_the_rate_caps_saved_tokens() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Bandwidth::bytes_per_sec(1_000_000), t0);
        b.set_rate(Bandwidth::bytes_per_sec(10_000), t0);
        assert_eq!(b.max_grant(), 1_000);
        assert_eq!(b.try_take(1_000, t0), Ok(()));
        assert_eq!(b.try_take(1_000, t0), Err(ms(100)));
        b.set_rate(Bandwidth::bytes_per_sec(20_000), t0 + ms(50));
        // 500 bytes earned at the old rate are kept; the rest comes at the new rate.
        assert_eq!(
            b.try_take(1_000, t0 + ms(50)),
            Err(Duration::from_millis(25))
        );
    }

    #[test]
    fn shared_bucket_splits_the_burst_among_relays() {
        let clock = Arc::new(ManualClock::new());
        let b = Arc::new(SharedBucket::with_clock(
            Bandwidth::bytes_per_sec(400_000),
            clock,
        ));
        assert_eq!(b.chunk_limit(1 << 20), 40_000);
        let g: Vec<_> = (0..4).map(|_| b.register()).collect();
        assert_eq!(b.chunk_limit(1 << 20), 10_000);
        assert_eq!(b.chunk_limit(4_096), 4_096);
        drop(g);
        assert_eq!(b.chunk_limit(1 << 20), 40_000);
    }

    #[test]
    fn several_tunnels_take_turns_of_at_most_max_turn() {
        let clock = Arc::new(ManualClock::new());
        // 100 MB/s: a 10 MB burst.
        let b = Arc::new(SharedBucket::with_clock(
            Bandwidth::bytes_per_sec(100_000_000),
            clock,
        ));
        // One tunnel (two directions): half the burst each, up to the buffer.
        let one: Vec<_> = (0..2).map(|_| b.register()).collect();
        assert_eq!(b.chunk_limit(1 << 20), 1 << 20);
        // A second tunnel: turns are shared, so every grant is at most MAX_TURN.
        let two: Vec<_> = (0..2).map(|_| b.register()).collect();
        assert_eq!(b.chunk_limit(1 << 20), MAX_TURN as usize);
        drop(two);
        assert_eq!(b.chunk_limit(1 << 20), 1 << 20);
        drop(one);
    }

    #[test]
    fn shared_bucket_grants_immediately_when_tokens_are_there() {
        let clock = Arc::new(ManualClock::new());
        let b = Arc::new(SharedBucket::with_clock(
            Bandwidth::bytes_per_sec(10_000),
            clock.clone(),
        ));
        // The manual clock never moves, so a bucket that made this wait would wait for ever:
        // run it on a thread and give up after a deadline instead of hanging the suite.
        let (tx, rx) = std::sync::mpsc::channel();
        let b2 = Arc::clone(&b);
        std::thread::spawn(move || {
            b2.acquire(1_000); // the bucket starts full: 1,000 of its 1,000 bytes
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "acquire blocked on a full bucket. Now: {:?}",
            clock.now()
        );
    }

    #[test]
    fn set_rate_wakes_a_blocked_waiter() {
        let b = Arc::new(SharedBucket::new(Bandwidth::bytes_per_sec(MIN_CHUNK)));
        b.acquire(MIN_CHUNK); // empty it: the next MIN_CHUNK bytes would take 1 s
        let b2 = Arc::clone(&b);
        let start = Instant::now();
        let t = std::thread::spawn(move || b2.acquire(MIN_CHUNK));
        std::thread::sleep(ms(50));
        b.set_rate(Bandwidth::UNLIMITED);
        t.join().unwrap();
        assert!(start.elapsed() < ms(800), "waited {:?}", start.elapsed());
    }
}
