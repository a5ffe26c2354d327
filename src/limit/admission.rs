//! Admission control: a fixed number of slots, a bounded FIFO queue of connections waiting
//! (paused, unread) for one, and per-user caps whose extra tunnels wait without holding a
//! slot.
//!
//! In scope: who goes next and who is turned away, as pure bookkeeping over an item type `T`
//! (a socket in production, a number in tests) with time from a [`Clock`]. Out of scope:
//! sockets: the caller says whether an item's client is still there (`is_alive`), and answers
//! the ones turned away in their own protocol (net/server.rs, remote/).

use crate::limit::clock::{Clock, SystemClock};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Limits of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Items served at once.
    pub max_active: usize,
    /// Items waiting at most; one more is turned away at once.
    pub max_queued: usize,
    /// Longest wait in the queue before an item is turned away.
    pub timeout: Duration,
}

/// What happened to an arriving item.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival<T> {
    /// A slot was free: serve it now.
    Admitted(T),
    /// Waiting in the queue.
    Queued,
    /// The queue is full: answer "busy" and close.
    Full(T),
}

/// Items removed from a queue without being served.
#[derive(Debug, PartialEq, Eq)]
pub struct Removed<T> {
    /// Waited longer than the timeout: answer "busy" and close.
    pub expired: Vec<T>,
    /// The client left while waiting: just drop.
    pub gone: Vec<T>,
}

impl<T> Default for Removed<T> {
    fn default() -> Self {
        Removed {
            expired: Vec::new(),
            gone: Vec::new(),
        }
    }
}

impl<T> Removed<T> {
    /// True when nothing was removed.
    pub fn is_empty(&self) -> bool {
        self.expired.is_empty() && self.gone.is_empty()
    }
}

/// Sorts a waiter out: a client that left goes to `gone`, one that waited `timeout` or more
/// to `expired`; a waiter still good comes back.
fn keep_if_waiting<T>(
    item: T,
    since: Instant,
    now: Instant,
    timeout: Duration,
    is_alive: &mut dyn FnMut(&T) -> bool,
    out: &mut Removed<T>,
) -> Option<T> {
    if !is_alive(&item) {
        out.gone.push(item);
        None
    } else if now.saturating_duration_since(since) >= timeout {
        out.expired.push(item);
        None
    } else {
        Some(item)
    }
}

/// Takes expired and departed items out of `queue`, wherever they are.
fn sweep_queue<T>(
    queue: &mut VecDeque<(T, Instant)>,
    now: Instant,
    timeout: Duration,
    is_alive: &mut dyn FnMut(&T) -> bool,
    out: &mut Removed<T>,
) {
    let mut kept = VecDeque::with_capacity(queue.len());
    for (item, since) in queue.drain(..) {
        if let Some(item) = keep_if_waiting(item, since, now, timeout, is_alive, out) {
            kept.push_back((item, since));
        }
    }
    *queue = kept;
}

/// Pops the first live, unexpired item; dead and expired ones on the way go to `out`.
fn pop_live<T>(
    queue: &mut VecDeque<(T, Instant)>,
    now: Instant,
    timeout: Duration,
    is_alive: &mut dyn FnMut(&T) -> bool,
    out: &mut Removed<T>,
) -> Option<T> {
    while let Some((item, since)) = queue.pop_front() {
        if let Some(item) = keep_if_waiting(item, since, now, timeout, is_alive, out) {
            return Some(item);
        }
    }
    None
}

/// Slots plus a FIFO queue.
#[derive(Debug)]
pub struct Admission<T> {
    inner: Mutex<Inner<T>>,
    clock: Arc<dyn Clock>,
}

#[derive(Debug)]
struct Inner<T> {
    limits: Limits,
    // Slots in use.
    active: usize,
    // Waiting items with their arrival time, oldest first.
    queue: VecDeque<(T, Instant)>,
}

impl<T> Admission<T> {
    /// Slots and queue per `limits`, on the system clock.
    pub fn new(limits: Limits) -> Self {
        Self::with_clock(limits, Arc::new(SystemClock))
    }

    /// Slots and queue per `limits`, reading time from `clock`.
    pub fn with_clock(limits: Limits, clock: Arc<dyn Clock>) -> Self {
        Admission {
            inner: Mutex::new(Inner {
                limits: Limits {
                    max_active: limits.max_active.max(1),
                    ..limits
                },
                active: 0,
                queue: VecDeque::new(),
            }),
            clock,
        }
    }

    /// An item arrives: admitted if a slot is free and nobody waits, else queued, else full.
    pub fn arrive(&self, item: T) -> Arrival<T> {
        let now = self.clock.now();
        let mut st = self.inner.lock();
        if st.active < st.limits.max_active && st.queue.is_empty() {
            st.active += 1;
            return Arrival::Admitted(item);
        }
        if st.queue.len() >= st.limits.max_queued {
            return Arrival::Full(item);
        }
        st.queue.push_back((item, now));
        Arrival::Queued
    }

    /// An admitted item is done. Its slot passes to the oldest live waiter, returned here to
    /// be served by the caller; waiters found dead or expired on the way are in `removed`.
    pub fn finish(
        &self,
        is_alive: &mut dyn FnMut(&T) -> bool,
        removed: &mut Removed<T>,
    ) -> Option<T> {
        let now = self.clock.now();
        let mut st = self.inner.lock();
        let timeout = st.limits.timeout;
        match pop_live(&mut st.queue, now, timeout, is_alive, removed) {
            Some(next) => Some(next),
            None => {
                st.active = st.active.saturating_sub(1);
                None
            }
        }
    }

    /// Removes waiters that expired or left. Run it periodically (see [`next_deadline`]).
    ///
    /// [`next_deadline`]: Self::next_deadline
    pub fn sweep(&self, is_alive: &mut dyn FnMut(&T) -> bool) -> Removed<T> {
        let now = self.clock.now();
        let mut st = self.inner.lock();
        let timeout = st.limits.timeout;
        let mut out = Removed::default();
        sweep_queue(&mut st.queue, now, timeout, is_alive, &mut out);
        out
    }

    /// Takes out every waiter `pred` says is done with (answered without a slot).
    pub fn take_where(&self, pred: &mut dyn FnMut(&T) -> bool) -> Vec<T> {
        let mut st = self.inner.lock();
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(st.queue.len());
        for (item, since) in st.queue.drain(..) {
            if pred(&item) {
                taken.push(item);
            } else {
                kept.push_back((item, since));
            }
        }
        st.queue = kept;
        taken
    }

    /// When the oldest waiter expires, if anyone waits.
    pub fn next_deadline(&self) -> Option<Instant> {
        let st = self.inner.lock();
        st.queue
            .front()
            .map(|(_, since)| *since + st.limits.timeout)
    }

    /// Slots in use.
    pub fn active(&self) -> usize {
        self.inner.lock().active
    }

    /// Items waiting.
    pub fn queued(&self) -> usize {
        self.inner.lock().queue.len()
    }

    /// Takes every waiter out (at shutdown).
    pub fn drain(&self) -> Vec<T> {
        self.inner.lock().queue.drain(..).map(|(t, _)| t).collect()
    }
}

/// Per-user caps on tunnels at once; a user's extra tunnels wait in FIFO order, holding no
/// slot, until one of that user's own tunnels ends.
#[derive(Debug)]
pub struct UserGate<P> {
    inner: Mutex<HashMap<String, UserState<P>>>,
    clock: Arc<dyn Clock>,
    // Longest wait, and most waiters per user.
    timeout: Duration,
    max_waiting: usize,
}

#[derive(Debug)]
struct UserState<P> {
    active: usize,
    waiting: VecDeque<(P, Instant)>,
}

/// What happened to a tunnel entering its user's gate.
#[derive(Debug, PartialEq, Eq)]
pub enum Enter<P> {
    /// Under the cap: go on.
    Go(P),
    /// At the cap: parked until one of the user's tunnels ends.
    Parked,
    /// At the cap with too many already waiting: answer "busy".
    Full(P),
}

impl<P> UserGate<P> {
    /// A gate whose waiters expire after `timeout`, at most `max_waiting` per user.
    pub fn new(timeout: Duration, max_waiting: usize) -> Self {
        Self::with_clock(timeout, max_waiting, Arc::new(SystemClock))
    }

    /// As [`new`](Self::new), reading time from `clock`.
    pub fn with_clock(timeout: Duration, max_waiting: usize, clock: Arc<dyn Clock>) -> Self {
        UserGate {
            inner: Mutex::new(HashMap::new()),
            clock,
            timeout,
            max_waiting,
        }
    }

    /// A tunnel of `user` wants to start; `cap` is the user's limit (`None`: no limit).
    pub fn enter(&self, user: &str, cap: Option<usize>, item: P) -> Enter<P> {
        let now = self.clock.now();
        let mut map = self.inner.lock();
        let st = map.entry(user.to_string()).or_insert_with(|| UserState {
            active: 0,
            waiting: VecDeque::new(),
        });
        let cap = cap.unwrap_or(usize::MAX).max(1);
        if st.active < cap && st.waiting.is_empty() {
            st.active += 1;
            return Enter::Go(item);
        }
        if st.waiting.len() >= self.max_waiting {
            return Enter::Full(item);
        }
        st.waiting.push_back((item, now));
        Enter::Parked
    }

    /// A tunnel of `user` ended. Its place passes to the user's oldest live waiter, returned
    /// here to be resumed by the caller (on the slot the ended tunnel held).
    pub fn exit(
        &self,
        user: &str,
        is_alive: &mut dyn FnMut(&P) -> bool,
        removed: &mut Removed<P>,
    ) -> Option<P> {
        let now = self.clock.now();
        let mut map = self.inner.lock();
        let st = map.get_mut(user)?;
        if let Some(next) = pop_live(&mut st.waiting, now, self.timeout, is_alive, removed) {
            return Some(next);
        }
        st.active = st.active.saturating_sub(1);
        if st.active == 0 && st.waiting.is_empty() {
            map.remove(user);
        }
        None
    }

    /// Removes waiters that expired or left.
    pub fn sweep(&self, is_alive: &mut dyn FnMut(&P) -> bool) -> Removed<P> {
        let now = self.clock.now();
        let mut out = Removed::default();
        let mut map = self.inner.lock();
        for st in map.values_mut() {
            sweep_queue(&mut st.waiting, now, self.timeout, is_alive, &mut out);
        }
        map.retain(|_, st| st.active > 0 || !st.waiting.is_empty());
        out
    }

    /// Tunnels of `user` running now.
    pub fn active(&self, user: &str) -> usize {
        self.inner.lock().get(user).map_or(0, |s| s.active)
    }

    /// Tunnels of `user` waiting now.
    pub fn waiting(&self, user: &str) -> usize {
        self.inner.lock().get(user).map_or(0, |s| s.waiting.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::clock::ManualClock;

    fn limits(active: usize, queued: usize, secs: u64) -> Limits {
        Limits {
            max_active: active,
            max_queued: queued,
            timeout: Duration::from_secs(secs),
        }
    }

    fn alive(_: &u32) -> bool {
        true
    }

    #[test]
    fn third_connection_waits_for_a_slot_then_is_served_in_order() {
        let a = Admission::new(limits(2, 10, 30));
        assert_eq!(a.arrive(1), Arrival::Admitted(1));
        assert_eq!(a.arrive(2), Arrival::Admitted(2));
        assert_eq!(a.arrive(3), Arrival::Queued);
        assert_eq!(a.arrive(4), Arrival::Queued);
        let mut r = Removed::default();
        assert_eq!(a.finish(&mut alive, &mut r), Some(3));
        assert_eq!(a.finish(&mut alive, &mut r), Some(4));
        assert_eq!(a.active(), 2);
        assert_eq!(a.finish(&mut alive, &mut r), None);
        assert_eq!(a.active(), 1);
        assert!(r.is_empty());
    }

    #[test]
    fn a_newcomer_does_not_jump_the_queue() {
        let a = Admission::new(limits(1, 10, 30));
        assert_eq!(a.arrive(1), Arrival::Admitted(1));
        assert_eq!(a.arrive(2), Arrival::Queued);
        // Even with a slot momentarily free, 3 waits behind 2.
        let mut r = Removed::default();
        assert_eq!(a.finish(&mut alive, &mut r), Some(2));
        assert_eq!(a.arrive(3), Arrival::Queued);
    }

    #[test]
    fn full_queue_turns_away_at_once() {
        let a = Admission::new(limits(1, 2, 30));
        assert_eq!(a.arrive(1), Arrival::Admitted(1));
        assert_eq!(a.arrive(2), Arrival::Queued);
        assert_eq!(a.arrive(3), Arrival::Queued);
        assert_eq!(a.arrive(4), Arrival::Full(4));
    }

    #[test]
    fn waiters_expire_after_the_timeout() {
        let clock = Arc::new(ManualClock::new());
        let a = Admission::with_clock(limits(1, 10, 5), clock.clone());
        assert_eq!(a.arrive(1), Arrival::Admitted(1));
        assert_eq!(a.arrive(2), Arrival::Queued);
        clock.advance(Duration::from_secs(3));
        assert_eq!(a.arrive(3), Arrival::Queued);
        assert_eq!(
            a.next_deadline(),
            Some(clock.now() + Duration::from_secs(2))
        );
        clock.advance(Duration::from_secs(2));
        let r = a.sweep(&mut alive);
        assert_eq!(r.expired, vec![2], "Now: {:?}", clock.now());
        assert_eq!(a.queued(), 1);
        // At finish, an expired head is not served either.
        clock.advance(Duration::from_secs(3));
        let mut r = Removed::default();
        assert_eq!(a.finish(&mut alive, &mut r), None);
        assert_eq!(r.expired, vec![3]);
        assert_eq!(a.active(), 0);
    }

    #[test]
    fn a_client_that_left_is_never_served() {
        let a = Admission::new(limits(1, 10, 30));
        assert_eq!(a.arrive(1), Arrival::Admitted(1));
        assert_eq!(a.arrive(2), Arrival::Queued);
        assert_eq!(a.arrive(3), Arrival::Queued);
        assert_eq!(a.arrive(4), Arrival::Queued);
        assert_eq!(a.arrive(5), Arrival::Queued);
        let mut r = Removed::default();
        assert_eq!(a.finish(&mut |&i| i != 2, &mut r), Some(3));
        assert_eq!(r.gone, vec![2]);
        // The sweeper finds a departed waiter anywhere in the queue, and keeps the rest.
        let swept = a.sweep(&mut |&i| i != 5);
        assert_eq!((swept.gone, swept.expired), (vec![5], vec![]));
        assert_eq!(a.queued(), 1);
        assert_eq!(a.finish(&mut alive, &mut r), Some(4));
    }

    #[test]
    fn waiters_answered_without_a_slot_leave_the_queue_in_place() {
        let a = Admission::new(limits(1, 10, 30));
        assert_eq!(a.arrive(1), Arrival::Admitted(1));
        for i in 2..=5 {
            assert_eq!(a.arrive(i), Arrival::Queued);
        }
        assert_eq!(a.take_where(&mut |&i| i % 2 == 1), vec![3, 5]);
        let mut r = Removed::default();
        assert_eq!(a.finish(&mut alive, &mut r), Some(2));
        assert_eq!(a.finish(&mut alive, &mut r), Some(4));
        assert_eq!(a.queued(), 0);
    }

    #[test]
    fn per_user_cap_parks_then_hands_over_in_order() {
        let g = UserGate::new(Duration::from_secs(30), 10);
        assert_eq!(g.enter("alice", Some(2), 1), Enter::Go(1));
        assert_eq!(g.enter("alice", Some(2), 2), Enter::Go(2));
        assert_eq!(g.enter("alice", Some(2), 3), Enter::Parked);
        assert_eq!(g.enter("alice", Some(2), 4), Enter::Parked);
        // Other users are not affected by alice's cap.
        assert_eq!(g.enter("bob", Some(2), 9), Enter::Go(9));
        assert_eq!(g.enter("carol", None, 8), Enter::Go(8));
        let mut r = Removed::default();
        assert_eq!(g.exit("alice", &mut alive, &mut r), Some(3));
        assert_eq!(g.active("alice"), 2);
        assert_eq!(g.exit("alice", &mut alive, &mut r), Some(4));
        assert_eq!(g.exit("alice", &mut alive, &mut r), None);
        assert_eq!(g.exit("alice", &mut alive, &mut r), None);
        assert_eq!(g.active("alice"), 0);
        assert_eq!(g.waiting("alice"), 0);
    }

    #[test]
    fn per_user_waiters_expire_and_are_bounded() {
        let clock = Arc::new(ManualClock::new());
        let g = UserGate::with_clock(Duration::from_secs(5), 1, clock.clone());
        assert_eq!(g.enter("alice", Some(1), 1), Enter::Go(1));
        assert_eq!(g.enter("alice", Some(1), 2), Enter::Parked);
        assert_eq!(g.enter("alice", Some(1), 3), Enter::Full(3));
        clock.advance(Duration::from_secs(5));
        let r = g.sweep(&mut alive);
        assert_eq!(r.expired, vec![2]);
        let mut r = Removed::default();
        assert_eq!(g.exit("alice", &mut alive, &mut r), None);
        assert_eq!(g.active("alice"), 0);
    }
}
