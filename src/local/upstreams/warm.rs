//! Warm connections: a few connections to each healthy remote, opened ahead of time (TCP
//! connected, TLS done, announced with `WARM`, docs/protocol.md §2.4), so a new tunnel
//! sends its request at once instead of paying a TCP and a TLS handshake first.
//!
//! They carry no user: the tunnel request, with the app's credentials and target, is sent
//! when an app connection takes one, so admission, rates, caps and `user del` apply at
//! remote-proxy exactly as for a fresh connection. remote-proxy parks them without a
//! worker and closes them after its `--warm-idle-timeout`; a closed one is dropped here and
//! replaced in the background. Out of scope: when to refill (mod.rs's warmer thread).

use super::connect::{self, Link, Purpose, TunnelError};
use crate::net::hop::Hop;
use crate::net::sys::peer_alive;
use crate::proto::tunnel::{self, Request};
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A spare that dies sooner than this after it was made may be a refusal (a remote from
/// before warm connections, or one that caps this address's idle connections), or a
/// restart: refilling that remote pauses, 1 s after the first such death, doubling with
/// each one in a row up to [`LONGEST_PAUSE`], so the two sides do not trade connections in
/// a loop. A spare that lives past it ends the run.
const EARLY_DEATH: Duration = Duration::from_secs(2);
/// The longest pause in refilling after spares died early again and again.
const LONGEST_PAUSE: Duration = Duration::from_secs(32);

/// The spare connections of one remote.
#[derive(Debug, Default)]
pub struct Spares {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    spares: Vec<Spare>,
    paused_until: Option<Instant>,
    // Spares in a row that died early.
    early_deaths: u32,
}

#[derive(Debug)]
struct Spare {
    hop: Hop,
    made: Instant,
}

impl Inner {
    /// Drops the spares the remote has closed; pauses refilling when one died early.
    fn prune(&mut self, now: Instant) {
        let (mut early, mut lasted) = (false, false);
        self.spares.retain(|s| {
            let alive = peer_alive(s.hop.socket());
            let young = now.saturating_duration_since(s.made) < EARLY_DEATH;
            early |= !alive && young;
            lasted |= alive && !young;
            alive
        });
        if lasted {
            self.early_deaths = 0;
        }
        if early {
            self.early_deaths = self.early_deaths.saturating_add(1);
            let pause = Duration::from_secs(1 << (self.early_deaths - 1).min(5));
            self.paused_until = Some(now + pause.min(LONGEST_PAUSE));
        }
    }
}

impl Spares {
    /// The newest spare still open, if any. Only the ones looked at are checked (a system
    /// call each): this is on a tunnel's path; the warmer drops the others.
    pub fn take(&self) -> Option<Hop> {
        let mut st = self.inner.lock();
        while let Some(s) = st.spares.pop() {
            if peer_alive(s.hop.socket()) {
                return Some(s.hop);
            }
        }
        None
    }

    /// How many spares are missing to reach `want`, after dropping closed ones; 0 while
    /// refilling is paused.
    pub fn missing(&self, want: usize) -> usize {
        let now = Instant::now();
        let mut st = self.inner.lock();
        st.prune(now);
        if st.paused_until.is_some_and(|t| now < t) {
            return 0;
        }
        want.saturating_sub(st.spares.len())
    }

    /// Adds a spare.
    pub fn put(&self, hop: Hop) {
        self.inner.lock().spares.push(Spare {
            hop,
            made: Instant::now(),
        });
    }

    /// Closes every spare (the remote went down).
    pub fn clear(&self) {
        self.inner.lock().spares.clear();
    }

    /// Spares held now.
    pub fn len(&self) -> usize {
        self.inner.lock().spares.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Opens one warm connection: connect, TLS handshake, and the `WARM` announcement, which
/// also carries the handshake's last flight, so remote-proxy finishes its side and parks
/// the connection.
///
/// # Errors
/// As [`connect::dial`], or `Remote` when the announcement cannot be written.
pub fn open(addrs: &[SocketAddr], link: &Link, timeout: Duration) -> Result<Hop, TunnelError> {
    let (mut hop, _) = connect::dial(addrs, link, Purpose::Tunnel, timeout, timeout)?;
    let bytes = tunnel::encode_request(&Request::warm()).map_err(TunnelError::Request)?;
    let _ = hop.socket().set_write_timeout(Some(timeout));
    hop.send(&bytes).map_err(TunnelError::Remote)?;
    Ok(hop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::tests::pair;

    #[test]
    fn closed_spares_are_dropped_and_an_early_death_pauses_refilling() {
        let s = Spares::default();
        let (c1, srv1) = pair();
        let (c2, _srv2) = pair();
        s.put(Hop::plain(c1));
        s.put(Hop::plain(c2));
        assert_eq!(s.missing(4), 2);
        // The remote closes the older one at once: dropped, and refilling pauses.
        drop(srv1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.len() == 2 && Instant::now() < deadline {
            let _ = s.missing(4);
        }
        assert_eq!(s.len(), 1);
        assert_eq!(
            s.missing(4),
            0,
            "refilling should pause after an early death"
        );
        // The newest live one is taken.
        assert!(s.take().is_some());
        assert!(s.take().is_none());
    }
}
