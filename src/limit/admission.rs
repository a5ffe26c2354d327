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
use std::net::IpAddr;
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
    /// Most items of one key (a client address) admitted whose handshake is not over; more
    /// from that key wait, holding no slot, while other keys' items pass them. `None`: no cap.
    pub max_handshakes_per_key: Option<usize>,
    /// Most idle (parked) connections of one key; past it a warm one is closed and a new
    /// one is served on a worker instead. `None`: no cap.
    pub max_idle_per_key: Option<usize>,
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

/// Slots plus a FIFO queue, with an optional cap per key (a client address) on items
/// admitted whose handshake is not over yet: past it, that key's items wait and other keys'
/// items pass them, so one address's silent sockets cannot hold every slot.
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
    // Waiting items, oldest first. Invariant: while a slot is free, no waiter could take
    // it (each is held back by its key's cap), so an arrival that may start takes it.
    queue: VecDeque<Waiter<T>>,
    // Per key with items in a handshake or waiting; keys at zero are forgotten.
    keys: HashMap<IpAddr, KeyCount>,
}

#[derive(Debug)]
struct Waiter<T> {
    item: T,
    since: Instant,
    key: Option<IpAddr>,
}

#[derive(Debug, Default)]
struct KeyCount {
    // Admitted, handshake not over.
    handshaking: usize,
    waiting: usize,
}

impl<T> Inner<T> {
    /// May an item of `key` start its handshake now, as far as its key goes?
    fn key_may_start(&self, key: Option<IpAddr>) -> bool {
        match (key, self.limits.max_handshakes_per_key) {
            (Some(k), Some(cap)) => self.keys.get(&k).map_or(0, |c| c.handshaking) < cap,
            _ => true,
        }
    }

    /// Most waiters one key may have: a quarter of the queue, so one address cannot fill it.
    fn key_queue_cap(&self) -> usize {
        (self.limits.max_queued / 4).max(1)
    }

    fn count(&mut self, key: Option<IpAddr>) -> Option<&mut KeyCount> {
        key.map(|k| self.keys.entry(k).or_default())
    }

    fn forget_if_idle(&mut self, key: Option<IpAddr>) {
        if let Some(k) = key {
            if self
                .keys
                .get(&k)
                .is_some_and(|c| c.handshaking == 0 && c.waiting == 0)
            {
                self.keys.remove(&k);
            }
        }
    }

    /// A waiter of `key` left the queue, served or not.
    fn left_queue(&mut self, key: Option<IpAddr>, to_handshake: bool) {
        if let Some(c) = self.count(key) {
            c.waiting = c.waiting.saturating_sub(1);
            if to_handshake {
                c.handshaking += 1;
            }
        }
        self.forget_if_idle(key);
    }

    /// Takes the first live waiter whose key may start; dead and expired ones met on the
    /// way go to `out`, ones held back by their key stay in place.
    fn pop_startable(
        &mut self,
        now: Instant,
        is_alive: &mut dyn FnMut(&T) -> bool,
        out: &mut Removed<T>,
    ) -> Option<T> {
        let timeout = self.limits.timeout;
        let mut i = 0;
        while let Some(w) = self.queue.get(i) {
            let (key, since) = (w.key, w.since);
            let gone = !is_alive(&w.item);
            let expired = now.saturating_duration_since(since) >= timeout;
            if !gone && !expired && !self.key_may_start(key) {
                i += 1;
                continue;
            }
            let Some(w) = self.queue.remove(i) else {
                break;
            };
            let served = !gone && !expired;
            self.left_queue(key, served);
            if served {
                return Some(w.item);
            }
            if gone {
                out.gone.push(w.item);
            } else {
                out.expired.push(w.item);
            }
        }
        None
    }
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
                    max_handshakes_per_key: limits.max_handshakes_per_key.map(|c| c.max(1)),
                    ..limits
                },
                active: 0,
                queue: VecDeque::new(),
                keys: HashMap::new(),
            }),
            clock,
        }
    }

    /// An item arrives, from `key` (its client's address; `None` to count it under no
    /// key): admitted if a slot is free and its key is under its cap, else queued, else
    /// full. An admitted keyed item counts against its key until [`handshake_over`].
    ///
    /// [`handshake_over`]: Self::handshake_over
    pub fn arrive(&self, item: T, key: Option<IpAddr>) -> Arrival<T> {
        let now = self.clock.now();
        let mut st = self.inner.lock();
        let key = key.filter(|_| st.limits.max_handshakes_per_key.is_some());
        if st.active < st.limits.max_active && st.key_may_start(key) {
            st.active += 1;
            if let Some(c) = st.count(key) {
                c.handshaking += 1;
            }
            return Arrival::Admitted(item);
        }
        let key_full = key
            .and_then(|k| st.keys.get(&k))
            .is_some_and(|c| c.waiting >= st.key_queue_cap());
        if st.queue.len() >= st.limits.max_queued || key_full {
            st.forget_if_idle(key);
            return Arrival::Full(item);
        }
        if let Some(c) = st.count(key) {
            c.waiting += 1;
        }
        st.queue.push_back(Waiter {
            item,
            since: now,
            key,
        });
        Arrival::Queued
    }

    /// An admitted item is done. Its slot passes to the oldest live waiter that may start,
    /// returned here to be served by the caller; waiters found dead or expired on the way
    /// are in `removed`.
    pub fn finish(
        &self,
        is_alive: &mut dyn FnMut(&T) -> bool,
        removed: &mut Removed<T>,
    ) -> Option<T> {
        let now = self.clock.now();
        let mut st = self.inner.lock();
        match st.pop_startable(now, is_alive, removed) {
            Some(next) => Some(next),
            None => {
                st.active = st.active.saturating_sub(1);
                None
            }
        }
    }

    /// The handshake of an item admitted under `key` is over (authenticated, or the
    /// connection ended): the key has room again, and a waiter it held back takes a free
    /// slot, returned here to be served by the caller.
    pub fn handshake_over(
        &self,
        key: IpAddr,
        is_alive: &mut dyn FnMut(&T) -> bool,
        removed: &mut Removed<T>,
    ) -> Option<T> {
        let now = self.clock.now();
        let mut st = self.inner.lock();
        if let Some(c) = st.keys.get_mut(&key) {
            c.handshaking = c.handshaking.saturating_sub(1);
        }
        st.forget_if_idle(Some(key));
        if st.active >= st.limits.max_active {
            return None;
        }
        let next = st.pop_startable(now, is_alive, removed)?;
        st.active += 1;
        Some(next)
    }

    /// Removes waiters that expired or left. Run it periodically (see [`next_deadline`]).
    ///
    /// [`next_deadline`]: Self::next_deadline
    pub fn sweep(&self, is_alive: &mut dyn FnMut(&T) -> bool) -> Removed<T> {
        let now = self.clock.now();
        let mut st = self.inner.lock();
        let timeout = st.limits.timeout;
        let mut out = Removed::default();
        let queue = std::mem::take(&mut st.queue);
        for w in queue {
            match keep_if_waiting(w.item, w.since, now, timeout, is_alive, &mut out) {
                Some(item) => st.queue.push_back(Waiter { item, ..w }),
                None => st.left_queue(w.key, false),
            }
        }
        out
    }

    /// Takes out every waiter `pred` says is done with (answered without a slot).
    pub fn take_where(&self, pred: &mut dyn FnMut(&T) -> bool) -> Vec<T> {
        let mut st = self.inner.lock();
        let mut taken = Vec::new();
        let queue = std::mem::take(&mut st.queue);
        for w in queue {
            if pred(&w.item) {
                st.left_queue(w.key, false);
                taken.push(w.item);
            } else {
                st.queue.push_back(w);
            }
        }
        taken
    }

    /// When the oldest waiter expires, if anyone waits.
    pub fn next_deadline(&self) -> Option<Instant> {
        let st = self.inner.lock();
        st.queue.front().map(|w| w.since + st.limits.timeout)
    }

    /// Slots in use.
    pub fn active(&self) -> usize {
        self.inner.lock().active
    }

    /// Items waiting.
    pub fn queued(&self) -> usize {
        self.inner.lock().queue.len()
    }

    /// Items of `key` admitted whose handshake is not over.
    pub fn handshaking(&self, key: IpAddr) -> usize {
        self.inner
            .lock()
            .keys
            .get(&key)
            .map_or(0, |c| c.handshaking)
    }

    /// Takes every waiter out (at shutdown).
    pub fn drain(&self) -> Vec<T> {
        let mut st = self.inner.lock();
        let queue = std::mem::take(&mut st.queue);
        queue
            .into_iter()
            .map(|w| {
                st.left_queue(w.key, false);
                w.item
            })
            .collect()
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
            max_handshakes_per_key: None,
            max_idle_per_key: None,
        }
    }

    fn per_key(active: usize, queued: usize, cap: usize) -> Limits {
        Limits {
            max_handshakes_per_key: Some(cap),
            ..limits(active, queued, 30)
        }
    }

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, last]))
    }

    fn alive(_: &u32) -> bool {
        true
    }

    #[test]
    fn third_connection_waits_for_a_slot_then_is_served_in_order() {
        let a = Admission::new(limits(2, 10, 30));
        assert_eq!(a.arrive(1, None), Arrival::Admitted(1));
        assert_eq!(a.arrive(2, None), Arrival::Admitted(2));
        assert_eq!(a.arrive(3, None), Arrival::Queued);
        assert_eq!(a.arrive(4, None), Arrival::Queued);
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
        assert_eq!(a.arrive(1, None), Arrival::Admitted(1));
        assert_eq!(a.arrive(2, None), Arrival::Queued);
        // Even with a slot momentarily free, 3 waits behind 2.
        let mut r = Removed::default();
        assert_eq!(a.finish(&mut alive, &mut r), Some(2));
        assert_eq!(a.arrive(3, None), Arrival::Queued);
    }

    #[test]
    fn full_queue_turns_away_at_once() {
        let a = Admission::new(limits(1, 2, 30));
        assert_eq!(a.arrive(1, None), Arrival::Admitted(1));
        assert_eq!(a.arrive(2, None), Arrival::Queued);
        assert_eq!(a.arrive(3, None), Arrival::Queued);
        assert_eq!(a.arrive(4, None), Arrival::Full(4));
    }

    #[test]
    fn waiters_expire_after_the_timeout() {
        let clock = Arc::new(ManualClock::new());
        let a = Admission::with_clock(limits(1, 10, 5), clock.clone());
        assert_eq!(a.arrive(1, None), Arrival::Admitted(1));
        assert_eq!(a.arrive(2, None), Arrival::Queued);
        clock.advance(Duration::from_secs(3));
        assert_eq!(a.arrive(3, None), Arrival::Queued);
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
        assert_eq!(a.arrive(1, None), Arrival::Admitted(1));
        assert_eq!(a.arrive(2, None), Arrival::Queued);
        assert_eq!(a.arrive(3, None), Arrival::Queued);
        assert_eq!(a.arrive(4, None), Arrival::Queued);
        assert_eq!(a.arrive(5, None), Arrival::Queued);
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
        assert_eq!(a.arrive(1, None), Arrival::Admitted(1));
        for i in 2..=5 {
            assert_eq!(a.arrive(i, None), Arrival::Queued);
        }
        assert_eq!(a.take_where(&mut |&i| i % 2 == 1), vec![3, 5]);
        let mut r = Removed::default();
        assert_eq!(a.finish(&mut alive, &mut r), Some(2));
        assert_eq!(a.finish(&mut alive, &mut r), Some(4));
        assert_eq!(a.queued(), 0);
    }

    #[test]
    fn an_address_at_its_handshake_cap_waits_while_others_pass() {
        let a = Admission::new(per_key(100, 100, 2));
        assert_eq!(a.arrive(1, ip(2)), Arrival::Admitted(1));
        assert_eq!(a.arrive(2, ip(2)), Arrival::Admitted(2));
        assert_eq!(a.arrive(3, ip(2)), Arrival::Queued);
        // Another address is not held back by 127.0.0.2's waiter, and neither is an item
        // counted under no key.
        assert_eq!(a.arrive(4, ip(1)), Arrival::Admitted(4));
        assert_eq!(a.arrive(5, None), Arrival::Admitted(5));
        assert_eq!(a.handshaking(ip(2).unwrap()), 2);
        // One of 127.0.0.2's handshakes ends: its waiter takes a free slot at once.
        let mut r = Removed::default();
        let ip2 = ip(2).unwrap();
        assert_eq!(a.handshake_over(ip2, &mut alive, &mut r), Some(3));
        assert_eq!((a.active(), a.queued()), (5, 0));
        assert_eq!(a.handshaking(ip2), 2);
        assert_eq!(a.handshake_over(ip2, &mut alive, &mut r), None);
        assert_eq!(a.handshake_over(ip2, &mut alive, &mut r), None);
        assert_eq!(a.handshaking(ip2), 0);
        assert!(r.is_empty());
    }

    #[test]
    fn a_freed_slot_skips_waiters_their_address_holds_back() {
        let a = Admission::new(per_key(1, 100, 1));
        assert_eq!(a.arrive(1, ip(2)), Arrival::Admitted(1));
        assert_eq!(a.arrive(2, ip(2)), Arrival::Queued);
        assert_eq!(a.arrive(3, ip(1)), Arrival::Queued);
        // 1 ends while still in its handshake (its client left): 2 may not start yet, 3 may.
        let mut r = Removed::default();
        assert_eq!(a.finish(&mut alive, &mut r), Some(3));
        // The handshake ends with every slot taken: 2 still waits, for the next slot.
        assert_eq!(a.handshake_over(ip(2).unwrap(), &mut alive, &mut r), None);
        assert_eq!(a.queued(), 1);
        assert_eq!(a.finish(&mut alive, &mut r), Some(2));
        assert_eq!(a.finish(&mut alive, &mut r), None);
        assert_eq!(a.active(), 0);
    }

    #[test]
    fn one_address_may_fill_at_most_a_quarter_of_the_queue() {
        let a = Admission::new(per_key(100, 8, 1));
        assert_eq!(a.arrive(1, ip(2)), Arrival::Admitted(1));
        assert_eq!(a.arrive(2, ip(2)), Arrival::Queued);
        assert_eq!(a.arrive(3, ip(2)), Arrival::Queued);
        assert_eq!(a.arrive(4, ip(2)), Arrival::Full(4));
        // Others still queue behind their own cap.
        assert_eq!(a.arrive(5, ip(3)), Arrival::Admitted(5));
        assert_eq!(a.arrive(6, ip(3)), Arrival::Queued);
        // Waiters that leave, expire or are answered give their address room again.
        let swept = a.sweep(&mut |&i| i != 2);
        assert_eq!(swept.gone, vec![2]);
        assert_eq!(a.take_where(&mut |&i| i == 3), vec![3]);
        assert_eq!(a.arrive(7, ip(2)), Arrival::Queued);
        assert_eq!(a.drain(), vec![6, 7]);
        assert_eq!(a.arrive(8, ip(2)), Arrival::Queued);
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
