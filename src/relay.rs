//! Moving bytes both ways between two connected sockets until both are done.
//!
//! In scope: the two-direction pump, passing half-closes on, charging a user's bucket, the
//! idle timeout, and byte counts. Out of scope: handshakes (socks5.rs, http_connect.rs,
//! tunnel.rs) and which bucket applies (remote.rs).
//!
//! Each direction is a loop: read a chunk, wait for the bucket to allow those bytes, write.
//! Reading first and paying after means a relay never holds tokens while its socket is idle;
//! the read size is capped by the bucket's fair share, so one grant never exceeds the burst.
//! Normally one thread serves both directions (poll + splice, see [`relay`]); the copying
//! fallback runs one direction on the caller's thread and the other on a pool job.

use crate::bucket::SharedBucket;
use crate::server::Workers;
use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First read buffer of a direction, in bytes; small so idle tunnels stay cheap.
pub const INITIAL_BUFFER: usize = 16 * 1024;
/// Largest read buffer, in bytes: PERF-NOTES measured 256 KiB as the knee for bulk copies.
pub const MAX_BUFFER: usize = 256 * 1024;

/// What a finished relay did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes from the client side to the target side.
    pub up: u64,
    /// Bytes from the target side to the client side.
    pub down: u64,
    /// True when the tunnel was closed for being idle.
    pub idle_closed: bool,
}

/// Options for one relay.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The user's bucket, charged for both directions; `None` relays unmetered.
    pub bucket: Option<Arc<SharedBucket>>,
    /// Close when neither direction moved a byte for this long.
    pub idle_timeout: Option<Duration>,
}

/// Shared between the two directions of one tunnel.
struct Activity {
    start: Instant,
    // Milliseconds since `start` of the last byte moved in either direction.
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

enum End {
    /// EOF read and passed on as a half-close.
    Eof,
    /// Closed for idleness.
    Idle,
    /// A read or write failed; both sockets were shut down.
    Failed,
}

/// Relays between `client` and `target` until both directions end; returns the byte counts.
///
/// A FIN in one direction becomes `shutdown(Write)` on the other socket; the opposite
/// direction keeps flowing. An error in either direction (a reset, a failed write) shuts
/// both sockets down so the other direction ends too.
///
/// Normally both directions run on the calling thread with splice(2) ([`relay_spliced`]);
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

/// One direction of [`relay_spliced`].
struct Dir<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    // The pipe (read end, write end, capacity), made when the first byte arrives.
    pipe: Option<Pipe>,
    // Bytes in the pipe, paid for, not yet written to `dst`.
    pending: usize,
    // `src` reached EOF.
    eof: bool,
    // EOF seen, everything written, FIN passed on.
    done: bool,
    total: u64,
}

/// How a step of one direction went.
enum Step {
    /// Moved bytes or reached EOF; look again.
    Progress,
    /// Nothing to do until poll says so.
    Wait,
    /// A read or write failed: tear the tunnel down.
    Failed,
    /// splice(2) does not work here and nothing has moved yet: copy instead.
    Unsupported,
}

impl Dir<'_> {
    fn wants_read(&self) -> bool {
        !self.eof && self.pending == 0
    }

    fn wants_write(&self) -> bool {
        self.pending > 0
    }

    /// A splice filled the pipe: this direction carries bulk, so give it [`MAX_PIPE`] at
    /// once (growing in steps was measured slower: on loopback a socket seldom holds a whole
    /// 256 KiB at once, so the next step came late or never). Starting at the kernel's
    /// default keeps small and rate-limited tunnels cheap; unprivileged users share a budget
    /// of pipe pages (fs.pipe-user-pages-soft).
    fn grow_pipe(&mut self) {
        if let Some((r, _, size)) = self.pipe.as_mut() {
            *size = match fcntl(&*r, FcntlArg::F_SETPIPE_SZ(MAX_PIPE as i32)) {
                Ok(got) => got as usize,
                // Refused (the pipe-page budget is spent): stop asking. The larger figure is
                // only a cap on each splice, which moves what the pipe holds.
                Err(_) => MAX_PIPE,
            };
        }
    }

    /// Writes what the pipe holds; passes the FIN on once drained after EOF.
    fn flush(&mut self) -> Step {
        let Some((pr, _, _)) = self.pipe.as_ref() else {
            return Step::Wait;
        };
        while self.pending > 0 {
            match splice(pr, None, self.dst, None, self.pending, flags()) {
                Ok(0) => return Step::Failed,
                Ok(k) => self.pending -= k,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Step::Wait,
                Err(e) => {
                    log::trace!("relay splice out failed: {e}");
                    return Step::Failed;
                }
            }
        }
        if self.eof && !self.done {
            let _ = self.dst.shutdown(Shutdown::Write);
            self.done = true;
        }
        Step::Progress
    }

    /// Moves the next chunk from `src` into the pipe, pays for it, and writes it out.
    fn fill(
        &mut self,
        bucket: Option<&Arc<SharedBucket>>,
        activity: &Activity,
        nothing_moved: bool,
    ) -> Step {
        if self.pipe.is_none() {
            match take_pipe() {
                Ok(p) => self.pipe = Some(p),
                Err(e) if nothing_moved => {
                    log::debug!("cannot make a relay pipe ({e}); copying instead");
                    return Step::Unsupported;
                }
                Err(e) => {
                    log::warn!("cannot make a relay pipe: {e} (raise the open-file limit)");
                    return Step::Failed;
                }
            }
        }
        let Some((_, pw, size)) = self.pipe.as_ref() else {
            return Step::Failed;
        };
        let limit = bucket.map_or(*size, |b| b.chunk_limit(*size));
        match splice(self.src, None, pw, None, limit, flags()) {
            Ok(0) => {
                self.eof = true;
                self.flush()
            }
            Ok(n) => {
                if n == *size && *size < MAX_PIPE {
                    self.grow_pipe();
                }
                if let Some(b) = bucket {
                    b.acquire(n as u64);
                }
                self.pending = n;
                self.total += n as u64;
                activity.touch();
                match self.flush() {
                    Step::Wait => Step::Progress, // the rest goes when dst drains
                    other => other,
                }
            }
            Err(Errno::EINTR) => Step::Progress,
            Err(Errno::EAGAIN) => Step::Wait,
            Err(Errno::EINVAL) if nothing_moved => Step::Unsupported,
            Err(e) => {
                log::trace!("relay splice in failed: {e}");
                Step::Failed
            }
        }
    }
}

/// Empty pipes kept for the next tunnels, at most this many. Making a pipe is `pipe2` plus
/// `F_SETPIPE_SZ`, and dropping it two `close`s: per direction per tunnel that was a sixth of
/// the system calls a small request cost each proxy. An empty pipe holds no data pages (they
/// are freed as they are read), so a spare costs two descriptors and its slot array.
const SPARE_PIPES: usize = 64;

type Pipe = (OwnedFd, OwnedFd, usize);

static SPARES: parking_lot::Mutex<Vec<Pipe>> = parking_lot::const_mutex(Vec::new());

/// Capacity of a new pipe: the kernel's default, 16 pages.
const DEFAULT_PIPE: usize = 64 * 1024;

/// A spare pipe, or a new one of the default size.
fn take_pipe() -> nix::Result<Pipe> {
    if let Some(p) = SPARES.lock().pop() {
        return Ok(p);
    }
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    Ok((r, w, DEFAULT_PIPE))
}

impl Drop for Dir<'_> {
    fn drop(&mut self) {
        // Only a pipe known to be empty may serve another tunnel: one with bytes left in it
        // (a failed write) would hand them to the wrong connection.
        if let Some(p) = self.pipe.take() {
            // Grown pipes are closed: they belonged to bulk tunnels, which are few and long,
            // and a spare would hold pipe pages of the user's budget.
            if self.pending == 0 && p.2 <= DEFAULT_PIPE {
                let mut spares = SPARES.lock();
                if spares.len() < SPARE_PIPES {
                    spares.push(p);
                }
            }
        }
    }
}

fn flags() -> SpliceFFlags {
    // No SPLICE_F_MORE: it corks the last chunk for 200 ms (PERF-NOTES).
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Both directions on this thread: poll(2) on the two sockets, splice(2) socket → pipe →
/// socket, no copy through user space and no second thread.
///
/// Each direction takes a pipe (64 KiB; 1 MiB once a splice fills it) when its first byte
/// arrives, so an idle tunnel holds one thread and two sockets, nothing else. Metering is as
/// in the copying relay: move at most the fair share into the pipe, pay for what arrived,
/// then write it. While a direction waits for tokens the other waits too; both draw on the
/// same budget anyway.
/// Returns `None`, having moved nothing, when these sockets cannot be spliced.
fn relay_spliced(client: &TcpStream, target: &TcpStream, opts: &Options) -> Option<Stats> {
    if client.set_nonblocking(true).is_err() || target.set_nonblocking(true).is_err() {
        return None;
    }
    let _guards = opts.bucket.as_ref().map(|b| (b.register(), b.register()));
    let bucket = opts.bucket.as_ref();
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let new_dir = |src, dst| Dir {
        src,
        dst,
        pipe: None,
        pending: 0,
        eof: false,
        done: false,
        total: 0,
    };
    let mut up = new_dir(client, target);
    let mut down = new_dir(target, client);
    let tick = match opts.idle_timeout {
        Some(idle) => PollTimeout::try_from((idle / 4).max(Duration::from_millis(50)))
            .unwrap_or(PollTimeout::MAX),
        None => PollTimeout::NONE,
    };
    let mut idle_closed = false;
    while !(up.done && down.done) {
        let ev = |read: bool, write: bool| {
            let mut f = PollFlags::empty();
            if read {
                f |= PollFlags::POLLIN;
            }
            if write {
                f |= PollFlags::POLLOUT;
            }
            f
        };
        // Only sockets we want something from are polled: an error or hang-up is reported
        // whether asked for or not, and on a socket nobody acts on it would spin the loop.
        let want_c = ev(up.wants_read(), down.wants_write());
        let want_t = ev(down.wants_read(), up.wants_write());
        if want_c.is_empty() && want_t.is_empty() {
            break; // cannot happen while a direction is unfinished; never spin
        }
        let (c_in, c_out, t_in, t_out) = {
            let mut fds = Vec::with_capacity(2);
            if !want_c.is_empty() {
                fds.push(PollFd::new(client.as_fd(), want_c));
            }
            if !want_t.is_empty() {
                fds.push(PollFd::new(target.as_fd(), want_t));
            }
            match poll(&mut fds, tick) {
                Ok(0) => {
                    if opts
                        .idle_timeout
                        .is_some_and(|limit| activity.idle_for() >= limit)
                    {
                        idle_closed = true;
                        break;
                    }
                    continue;
                }
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
            let revents = |want: PollFlags, i: Option<usize>| -> bool {
                let Some(i) = i else { return false };
                // Unknown bits come back as None: treat as "something happened".
                fds[i].revents().is_none_or(|r| {
                    r.intersects(
                        want | PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL,
                    )
                })
            };
            let ci = (!want_c.is_empty()).then_some(0);
            let ti = (!want_t.is_empty()).then_some(usize::from(ci.is_some()));
            let (c_in, c_out) = (
                revents(PollFlags::POLLIN, ci),
                revents(PollFlags::POLLOUT, ci),
            );
            let (t_in, t_out) = (
                revents(PollFlags::POLLIN, ti),
                revents(PollFlags::POLLOUT, ti),
            );
            drop(fds);
            (c_in, c_out, t_in, t_out)
        };
        let nothing_moved = up.total == 0 && down.total == 0;
        let mut steps = [Step::Wait, Step::Wait, Step::Wait, Step::Wait];
        if up.wants_write() && t_out {
            steps[0] = up.flush();
        }
        if down.wants_write() && c_out {
            steps[1] = down.flush();
        }
        if up.wants_read() && c_in {
            steps[2] = up.fill(bucket, &activity, nothing_moved);
        }
        if down.wants_read() && t_in {
            steps[3] = down.fill(bucket, &activity, nothing_moved);
        }
        if steps.iter().any(|s| matches!(s, Step::Unsupported)) {
            return None;
        }
        if steps.iter().any(|s| matches!(s, Step::Failed)) {
            break;
        }
    }
    if !(up.done && down.done) {
        shutdown_both(client, target);
    }
    Some(Stats {
        up: up.total,
        down: down.total,
        idle_closed,
    })
}

/// The copying relay: each direction on its own thread, for sockets splice(2) cannot serve.
fn relay_threaded(
    client: TcpStream,
    target: TcpStream,
    opts: &Options,
    workers: &Workers,
) -> Stats {
    let client = Arc::new(client);
    let target = Arc::new(target);
    if let Some(idle) = opts.idle_timeout {
        // The read timeout is how a blocked read notices idleness; check a few times per
        // period so an idle tunnel closes close to on time.
        let tick = (idle / 4).max(Duration::from_millis(50));
        let _ = client.set_read_timeout(Some(tick));
        let _ = target.set_read_timeout(Some(tick));
        // A peer that stops reading for the whole idle period is as dead as a silent one.
        let _ = client.set_write_timeout(Some(idle));
        let _ = target.set_write_timeout(Some(idle));
    } else {
        let _ = client.set_read_timeout(None);
        let _ = target.set_read_timeout(None);
    }
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let (done_tx, done_rx) = crossbeam_channel::bounded::<(u64, End)>(1);
    {
        let (src, dst) = (Arc::clone(&client), Arc::clone(&target));
        let (bucket, idle, act) = (
            opts.bucket.clone(),
            opts.idle_timeout,
            Arc::clone(&activity),
        );
        workers.spawn(move || {
            let r = pump(&src, &dst, bucket.as_ref(), idle, &act);
            let _ = done_tx.send(r);
        });
    }
    let (down, down_end) = pump(
        &target,
        &client,
        opts.bucket.as_ref(),
        opts.idle_timeout,
        &activity,
    );
    let (up, up_end) = match done_rx.recv() {
        Ok(r) => r,
        // The job panicked; its socket halves are shut down by the drop below.
        Err(_) => (0, End::Failed),
    };
    let idle_closed = matches!(down_end, End::Idle) || matches!(up_end, End::Idle);
    Stats {
        up,
        down,
        idle_closed,
    }
}

fn shutdown_both(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// Largest pipe a splicing direction grows to, in bytes: the default fs.pipe-max-size. Measured
/// against 256 KiB: CPU per GiB relayed 0.44 -> 0.30 s in each proxy, one stream +20%.
pub const MAX_PIPE: usize = 1024 * 1024;

/// One direction: read from `src`, pay the bucket, write to `dst`, until EOF or error.
fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    bucket: Option<&Arc<SharedBucket>>,
    idle: Option<Duration>,
    activity: &Activity,
) -> (u64, End) {
    let _registered = bucket.map(|b| b.register());
    let mut buf = vec![0u8; INITIAL_BUFFER];
    let mut total = 0u64;
    let mut reader = src;
    let mut writer = dst;
    loop {
        let limit = match bucket {
            Some(b) => b.chunk_limit(buf.len()),
            None => buf.len(),
        };
        let n = match reader.read(&mut buf[..limit]) {
            Ok(0) => {
                // Pass the FIN on; the other direction may still have bytes to carry.
                let _ = dst.shutdown(Shutdown::Write);
                return (total, End::Eof);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => {
                if let Some(limit) = idle {
                    if activity.idle_for() >= limit {
                        shutdown_both(src, dst);
                        return (total, End::Idle);
                    }
                }
                continue;
            }
            Err(e) => {
                log::trace!("relay read failed: {e}");
                shutdown_both(src, dst);
                return (total, End::Failed);
            }
        };
        if let Some(b) = bucket {
            b.acquire(n as u64);
        }
        if let Err(e) = writer.write_all(&buf[..n]) {
            log::trace!("relay write failed: {e}");
            shutdown_both(src, dst);
            return (total, End::Failed);
        }
        total += n as u64;
        activity.touch();
        // Grow when a read filled the whole buffer: the peer has more than we can take.
        if n == buf.len() && buf.len() < MAX_BUFFER {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate::Bandwidth;
    use std::io::{Read, Write};
    use std::net::TcpListener;

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
        carries_both_ways_with_half_close(|c, t, o| relay_threaded(c, t, o, &Workers::new("test")));
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

    #[test]
    fn an_idle_tunnel_is_closed() {
        let (mut app, client, target, _origin) = sockets();
        let opts = Options {
            bucket: None,
            idle_timeout: Some(Duration::from_millis(300)),
        };
        let t = Instant::now();
        let stats = relay(client, target, &opts, &Workers::new("test"));
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
