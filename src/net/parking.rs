//! Parking: connections idle between two steps (a warm connection that has announced itself
//! and waits for an app to take it) wait in an epoll set, holding no thread and no slot,
//! until their next byte arrives or their deadline passes. An idle connection costs a
//! descriptor, not a thread.
//!
//! In scope: the set, per-address caps on it, deadlines, and waiting for readiness. Out of
//! scope: what happens to a connection that wakes (net/server.rs admits it again like a new
//! one) or expires (the service closes it in its own protocol).

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use parking_lot::Mutex;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// A parked item that woke: bytes arrived (or its client closed), or its deadline passed.
#[derive(Debug, PartialEq, Eq)]
pub enum Woke<T> {
    /// Readable: take it up again.
    Ready(T),
    /// Its deadline passed first.
    Expired(T),
}

/// The set of parked items of one listener.
pub struct Parking<T> {
    epoll: Epoll,
    // Most parked items per key (`None`: no cap).
    max_per_key: Option<usize>,
    inner: Mutex<Inner<T>>,
}

impl<T> std::fmt::Debug for Parking<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parking")
            .field("parked", &self.inner.lock().items.len())
            .finish()
    }
}

struct Inner<T> {
    next_token: u64,
    items: HashMap<u64, Entry<T>>,
    per_key: HashMap<IpAddr, usize>,
    // Deadlines, soonest first; entries whose item already left are skipped when met.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
}

struct Entry<T> {
    item: T,
    key: Option<IpAddr>,
}

impl<T> Inner<T> {
    fn take(&mut self, token: u64) -> Option<T> {
        let e = self.items.remove(&token)?;
        if let Some(k) = e.key {
            if let Some(n) = self.per_key.get_mut(&k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_key.remove(&k);
                }
            }
        }
        Some(e.item)
    }
}

impl<T: AsFd> Parking<T> {
    /// An empty set allowing `max_per_key` items per key.
    ///
    /// # Errors
    /// When the kernel gives no epoll instance (out of descriptors).
    pub fn new(max_per_key: Option<usize>) -> io::Result<Parking<T>> {
        Ok(Parking {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            max_per_key,
            inner: Mutex::new(Inner {
                next_token: 0,
                items: HashMap::new(),
                per_key: HashMap::new(),
                deadlines: BinaryHeap::new(),
            }),
        })
    }

    /// Parks `item` until it is readable or `until`. Its key's cap reached (or no room in
    /// the kernel's set), it comes back: the caller closes it.
    ///
    /// # Errors
    /// The item itself, not parked.
    pub fn park(&self, item: T, key: Option<IpAddr>, until: Instant) -> Result<(), T> {
        let mut st = self.inner.lock();
        if let (Some(k), Some(cap)) = (key, self.max_per_key) {
            if st.per_key.get(&k).copied().unwrap_or(0) >= cap {
                return Err(item);
            }
        }
        let token = st.next_token;
        // One event, then the descriptor is disarmed until it is taken out: a connection
        // wakes its parker once however many bytes arrive.
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT;
        if self
            .epoll
            .add(item.as_fd(), EpollEvent::new(flags, token))
            .is_err()
        {
            return Err(item);
        }
        st.next_token += 1;
        if let Some(k) = key {
            *st.per_key.entry(k).or_default() += 1;
        }
        st.items.insert(token, Entry { item, key });
        st.deadlines.push(Reverse((until, token)));
        Ok(())
    }

    /// Waits until a parked item is readable or expires, at most `max_wait` (a new item's
    /// deadline is seen within that); returns what woke, maybe nothing.
    pub fn wait(&self, max_wait: Duration) -> Vec<Woke<T>> {
        let now = Instant::now();
        let wait = {
            let st = self.inner.lock();
            st.deadlines.peek().map_or(max_wait, |Reverse((at, _))| {
                at.saturating_duration_since(now).min(max_wait)
            })
        };
        let mut events = [EpollEvent::empty(); 64];
        // Round up, so a deadline a fraction of a millisecond away does not spin.
        let ms = u16::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u16::MAX);
        let n = self.epoll.wait(&mut events, ms).unwrap_or(0);
        let mut woke = Vec::new();
        let mut st = self.inner.lock();
        for e in &events[..n] {
            if let Some(item) = st.take(e.data()) {
                let _ = self.epoll.delete(item.as_fd());
                woke.push(Woke::Ready(item));
            }
        }
        let now = Instant::now();
        while let Some(&Reverse((at, token))) = st.deadlines.peek() {
            if at > now {
                break;
            }
            st.deadlines.pop();
            if let Some(item) = st.take(token) {
                let _ = self.epoll.delete(item.as_fd());
                woke.push(Woke::Expired(item));
            }
        }
        woke
    }

    /// Items parked now.
    pub fn len(&self) -> usize {
        self.inner.lock().items.len()
    }

    /// True when nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes every item out (at shutdown).
    pub fn drain(&self) -> Vec<T> {
        let mut st = self.inner.lock();
        let tokens: Vec<u64> = st.items.keys().copied().collect();
        st.deadlines.clear();
        tokens
            .into_iter()
            .filter_map(|t| st.take(t))
            .inspect(|item| {
                let _ = self.epoll.delete(item.as_fd());
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::tests::pair;
    use std::io::Write;
    use std::net::TcpStream;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, last]))
    }

    #[test]
    fn a_parked_socket_wakes_when_its_peer_writes_and_not_before() {
        let p = Parking::new(None).unwrap();
        let (mut c, s) = pair();
        let far = Instant::now() + Duration::from_secs(60);
        p.park(s, ip(1), far).unwrap();
        assert!(p.wait(Duration::from_millis(50)).is_empty());
        assert_eq!(p.len(), 1);
        c.write_all(b"x").unwrap();
        let woke = p.wait(Duration::from_secs(5));
        assert!(matches!(woke.as_slice(), [Woke::Ready(_)]), "{woke:?}");
        assert!(p.is_empty());
    }

    #[test]
    fn a_parked_socket_expires_at_its_deadline() {
        let p = Parking::new(None).unwrap();
        let (_c, s) = pair();
        let t = Instant::now();
        p.park(s, None, t + Duration::from_millis(100)).unwrap();
        let mut woke = Vec::new();
        while woke.is_empty() {
            woke = p.wait(Duration::from_secs(1));
        }
        assert!(matches!(woke.as_slice(), [Woke::Expired(_)]));
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_secs(1),
            "{took:?}"
        );
    }

    #[test]
    fn an_address_may_park_at_most_its_cap_and_gets_room_back() {
        let p: Parking<TcpStream> = Parking::new(Some(2)).unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let pairs: Vec<_> = (0..4).map(|_| pair()).collect();
        let mut clients = Vec::new();
        let mut refused = 0;
        for (c, s) in pairs {
            clients.push(c);
            if p.park(s, ip(2), far).is_err() {
                refused += 1;
            }
        }
        assert_eq!(refused, 2);
        // Another address is not held back.
        let (_c, s) = pair();
        p.park(s, ip(3), far).unwrap();
        // One of 127.0.0.2's wakes: there is room for one more.
        clients[0].write_all(b"x").unwrap();
        let mut woke = Vec::new();
        while woke.is_empty() {
            woke = p.wait(Duration::from_secs(5));
        }
        let (_c, s) = pair();
        p.park(s, ip(2), far).unwrap();
        assert_eq!(p.drain().len(), 3);
    }
}
