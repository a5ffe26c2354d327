//! Moving bytes both ways between two connected sockets until both are done.
//!
//! In scope: the two-direction pump, passing half-closes on, charging a user's bucket, the
//! idle timeout, and byte counts. Out of scope: handshakes (proto/, net/handshake.rs)
//! and which bucket applies (remote/).
//!
//! Each direction is a loop: read a chunk, wait for the bucket to allow those bytes, write.
//! Reading first and paying after means a relay never holds tokens while its socket is idle;
//! the read size is capped by the bucket's fair share, so one grant never exceeds the burst.
//! Normally one thread serves both directions (poll + splice, see [`relay`]); the copying
//! fallback runs one direction on the caller's thread and the other on a pool job.

mod copy;
mod pipes;
mod splice;
mod tls;

use crate::limit::bucket::SharedBucket;
use crate::limit::meter::{Direction, Meter};
use crate::net::hop::Hop;
use crate::net::workers::Workers;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use copy::relay_threaded;
pub use copy::{INITIAL_BUFFER, MAX_BUFFER};
pub use pipes::{MAX_PIPE, MAX_SPARE_PIPE_FDS};
use splice::relay_spliced;

/// What a finished relay did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes from the client side to the target side.
    pub up: u64,
    /// Bytes from the target side to the client side.
    pub down: u64,
    /// True when the tunnel was closed for being idle.
    pub idle_closed: bool,
    /// True when the tunnel was closed because the meter's allowance ran out: the user's
    /// volume quota is used up, or the user was deleted (which sets the allowance to 0).
    pub quota_closed: bool,
}

/// Options for one relay.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The user's bucket, charged for both directions; `None` relays unmetered.
    pub bucket: Option<Arc<SharedBucket>>,
    /// Close when neither direction moved a byte for this long.
    pub idle_timeout: Option<Duration>,
    /// Where the bytes are counted as they move; its quota, when it has one, ends the
    /// relay once used up (no read takes more than is left).
    pub meter: Option<Arc<Meter>>,
}

/// What one chunk pays: the bucket's wait and the meter's count. Both directions of every
/// relay go through this, so a new kind of relay cannot forget one of them.
#[derive(Clone, Copy)]
struct Payer<'a> {
    bucket: Option<&'a Arc<SharedBucket>>,
    meter: Option<&'a Arc<Meter>>,
}

impl<'a> Payer<'a> {
    fn of(opts: &'a Options) -> Payer<'a> {
        Payer {
            bucket: opts.bucket.as_ref(),
            meter: opts.meter.as_ref(),
        }
    }

    /// How much the next read may take of `want`: the bucket's fair share, no more than the
    /// quota has left. 0 means the quota is used up and the relay must end.
    fn limit(&self, want: usize) -> usize {
        let share = self.bucket.map_or(want, |b| b.chunk_limit(want));
        self.meter.map_or(share, |m| m.allowance(share))
    }

    /// Waits for the bucket to allow `n` bytes just read, and counts them.
    fn pay(&self, dir: Direction, n: usize) {
        if let Some(b) = self.bucket {
            b.acquire(n as u64);
        }
        if let Some(m) = self.meter {
            m.moved(dir, n as u64);
        }
    }

    /// Registers both directions with the bucket, for its fair shares.
    fn register(
        &self,
    ) -> Option<(
        crate::limit::bucket::PumpGuard,
        crate::limit::bucket::PumpGuard,
    )> {
        self.bucket.map(|b| (b.register(), b.register()))
    }
}

/// Shared between the two directions of one tunnel.
struct Activity {
    start: Instant,
    // Milliseconds since `start` of the last byte moved in either direction.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// How long a polling relay sleeps at most: a few times per idle period, so an idle
    /// tunnel closes close to on time.
    fn tick(idle: Option<Duration>) -> nix::poll::PollTimeout {
        use nix::poll::PollTimeout;
        match idle {
            Some(idle) => PollTimeout::try_from((idle / 4).max(Duration::from_millis(50)))
                .unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        }
    }

    /// True once nothing has moved for the idle limit.
    fn expired(&self, idle: Option<Duration>) -> bool {
        idle.is_some_and(|limit| self.idle_for() >= limit)
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Relays between `client` and `target` until both directions end; returns the byte counts.
///
/// A FIN in one direction becomes `shutdown(Write)` on the other socket; the opposite
/// direction keeps flowing. An error in either direction (a reset, a failed write) shuts
/// both sockets down so the other direction ends too.
///
/// Normally both directions run on the calling thread with splice(2) (`relay_spliced`);
/// where the kernel cannot splice these sockets, each direction copies on its own thread.
pub fn relay(client: TcpStream, target: TcpStream, opts: &Options, workers: &Workers) -> Stats {
    match relay_spliced(&client, &target, opts) {
        Some(stats) => stats,
        None => {
            let _ = client.set_nonblocking(false);
            let _ = target.set_nonblocking(false);
            relay_threaded(client, target, opts, workers)
        }
    }
}

/// Which end of a relay is the hop between the proxies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopEnd {
    /// The hop is the client side (remote-proxy: local-proxy is its client).
    Client,
    /// The hop is the target side (local-proxy: the tunnel goes to remote-proxy).
    Target,
}

/// Relays between the hop (TLS or plain) and a plain socket; `end` says which side the hop
/// is on, so `Stats::up` is always client to target. A plain hop takes the splice path of
/// [`relay`]; a TLS hop copies through rustls on this one thread.
pub fn relay_hop(
    hop: Hop,
    end: HopEnd,
    plain: TcpStream,
    opts: &Options,
    workers: &Workers,
) -> Stats {
    match (hop.into_parts(), end) {
        ((sock, None), HopEnd::Client) => relay(sock, plain, opts, workers),
        ((sock, None), HopEnd::Target) => relay(plain, sock, opts, workers),
        ((sock, Some(mut conn)), end) => {
            let from_tls = match end {
                HopEnd::Client => Direction::Up,
                HopEnd::Target => Direction::Down,
            };
            let m = tls::relay_tls(&mut conn, &sock, &plain, opts, from_tls);
            let (up, down) = match end {
                HopEnd::Client => (m.from_tls, m.to_tls),
                HopEnd::Target => (m.to_tls, m.from_tls),
            };
            Stats {
                up,
                down,
                idle_closed: m.idle_closed,
                quota_closed: m.quota_closed,
            }
        }
    }
}

fn shutdown_both(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::rate::Bandwidth;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn test_workers() -> Workers {
        Workers::new(
            "test",
            crate::net::workers::PoolConfig {
                max_workers: 8,
                idle_timeout: Duration::from_secs(10),
            },
        )
    }

    /// Two connected pairs: (app, proxy's client side) and (proxy's target side, target).
    fn sockets() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (d, _) = l.accept().unwrap();
        (a, b, c, d)
    }

    /// Sends `n` bytes each way, half-closing after each, through `run`; checks both arrive.
    fn carries_both_ways_with_half_close(run: fn(TcpStream, TcpStream, &Options) -> Stats) {
        let (mut app, client, target, mut origin) = sockets();
        let opts = Options {
            bucket: Some(Arc::new(SharedBucket::new(Bandwidth::UNLIMITED))),
            idle_timeout: Some(Duration::from_secs(30)),
            meter: None,
        };
        let relay = std::thread::spawn(move || run(client, target, &opts));
        let n = 3_000_000usize;
        let sender = {
            let mut app = app.try_clone().unwrap();
            std::thread::spawn(move || {
                app.write_all(&vec![1u8; n]).unwrap();
                app.shutdown(Shutdown::Write).unwrap();
            })
        };
        let mut got = Vec::new();
        origin.read_to_end(&mut got).unwrap(); // ends at the app's FIN, passed on
        assert_eq!(got.len(), n);
        origin.write_all(&vec![2u8; n]).unwrap();
        origin.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).unwrap();
        assert_eq!(back.len(), n);
        assert!(back.iter().all(|&b| b == 2));
        sender.join().unwrap();
        let stats = relay.join().unwrap();
        assert_eq!((stats.up, stats.down), (n as u64, n as u64));
        assert!(!stats.idle_closed);
    }

    #[test]
    fn spliced_relay_carries_both_ways_with_half_close() {
        carries_both_ways_with_half_close(|c, t, o| relay_spliced(&c, &t, o).expect("splice"));
    }

    #[test]
    fn copying_relay_carries_both_ways_with_half_close() {
        carries_both_ways_with_half_close(|c, t, o| relay_threaded(c, t, o, &test_workers()));
    }

    #[test]
    fn recycled_pipes_carry_only_their_own_tunnels_bytes() {
        // Tunnel i sends bytes of value i. Some end with the target hanging up mid-transfer,
        // which can leave bytes in the pipe: such a pipe must not serve a later tunnel.
        for i in 1..=12u8 {
            let (mut app, client, target, mut origin) = sockets();
            let opts = Options {
                bucket: None,
                idle_timeout: Some(Duration::from_secs(30)),
                meter: None,
            };
            let relay =
                std::thread::spawn(move || relay_spliced(&client, &target, &opts).expect("splice"));
            if i % 4 == 1 {
                let writer = std::thread::spawn(move || {
                    let _ = app.write_all(&vec![i; 8_000_000]);
                });
                let mut first = [0u8; 1000];
                origin.read_exact(&mut first).unwrap();
                assert!(first.iter().all(|&b| b == i));
                drop(origin); // unread bytes: a reset, and the relay's write fails
                writer.join().unwrap();
                relay.join().unwrap();
                continue;
            }
            let n = if i % 3 == 0 {
                2_000_000
            } else {
                1000 + i as usize
            };
            let writer = std::thread::spawn(move || {
                app.write_all(&vec![i; n]).unwrap();
                app.shutdown(Shutdown::Write).unwrap();
                app
            });
            let mut got = Vec::new();
            origin.read_to_end(&mut got).unwrap();
            assert_eq!(got.len(), n, "tunnel {i}");
            assert!(
                got.iter().all(|&b| b == i),
                "tunnel {i} got another's bytes"
            );
            drop(origin);
            drop(writer.join().unwrap());
            relay.join().unwrap();
        }
    }

    /// Sends more than the quota through `run`; the relay must end having moved exactly it.
    fn stops_at_the_quota(run: fn(TcpStream, TcpStream, &Options) -> Stats) {
        let (mut app, client, target, mut origin) = sockets();
        let meter = Arc::new(Meter::default());
        meter.set_left(Some(300_000));
        let opts = Options {
            bucket: None,
            idle_timeout: Some(Duration::from_secs(30)),
            meter: Some(Arc::clone(&meter)),
        };
        let relay = std::thread::spawn(move || run(client, target, &opts));
        let writer = std::thread::spawn(move || {
            let _ = app.write_all(&vec![7u8; 2_000_000]);
        });
        let mut got = Vec::new();
        let _ = origin.read_to_end(&mut got); // the relay passed a FIN on at the quota
        drop(origin);
        let stats = relay.join().unwrap();
        writer.join().unwrap();
        assert!(stats.quota_closed);
        assert_eq!(stats.up, 300_000);
        assert_eq!(got.len(), 300_000, "the target got exactly the quota");
        assert_eq!(meter.totals(), (300_000, 0));
    }

    #[test]
    fn spliced_relay_stops_at_the_quota() {
        stops_at_the_quota(|c, t, o| relay_spliced(&c, &t, o).expect("splice"));
    }

    #[test]
    fn copying_relay_stops_at_the_quota() {
        stops_at_the_quota(|c, t, o| relay_threaded(c, t, o, &test_workers()));
    }

    #[test]
    fn an_idle_tunnel_is_closed() {
        let (mut app, client, target, _origin) = sockets();
        let opts = Options {
            bucket: None,
            idle_timeout: Some(Duration::from_millis(300)),
            meter: None,
        };
        let t = Instant::now();
        let stats = relay(client, target, &opts, &test_workers());
        assert!(stats.idle_closed);
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "took {:?}",
            t.elapsed()
        );
        let mut buf = [0u8; 1];
        assert!(matches!(app.read(&mut buf), Ok(0) | Err(_)));
    }
}
