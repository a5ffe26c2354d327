//! Moving bytes both ways between two connected sockets until both are done.
//!
//! In scope: the two-direction pump, passing half-closes on, charging a user's bucket, the
//! idle timeout, and byte counts. Out of scope: handshakes (socks5.rs, http_connect.rs,
//! tunnel.rs) and which bucket applies (remote.rs).
//!
//! Each direction is a blocking loop: read, wait for the bucket to allow those bytes, write.
//! Reading first and paying after means a relay never holds tokens while its socket is idle;
//! the read size is capped by the bucket's fair share, so one grant never exceeds the burst.
//! One direction runs on the caller's thread, the other on a pool job.

use crate::bucket::SharedBucket;
use crate::server::Workers;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
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
pub fn relay(client: TcpStream, target: TcpStream, opts: &Options, workers: &Workers) -> Stats {
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
            let r = pump_any(&src, &dst, bucket.as_ref(), idle, &act);
            let _ = done_tx.send(r);
        });
    }
    let (down, down_end) = pump_any(
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

/// Largest pipe a splicing direction grows to, in bytes (PERF-NOTES: 256 KiB).
pub const MAX_PIPE: usize = 256 * 1024;

/// What a splice attempt says about whether to go on splicing.
enum Spliced {
    /// The direction ended (EOF, idle, failure) after `n` bytes.
    Ended(u64, End),
    /// splice(2) cannot be used on these sockets; copy instead, `n` bytes already moved.
    Unsupported(u64),
}

/// One direction with splice(2): socket → pipe → socket, no copy through user space.
///
/// The pipe is made on the first byte, so an idle tunnel holds no pipe (two descriptors and
/// up to 64 KiB of kernel pages each); it starts at the kernel's default size and doubles, up
/// to [`MAX_PIPE`], whenever one splice fills it. No `SPLICE_F_MORE`: with it the kernel corks
/// the last chunk for 200 ms (PERF-NOTES). Metering is as in [`pump`]: move at most the fair
/// share into the pipe, pay for what arrived, then move it out.
fn pump_splice(
    src: &TcpStream,
    dst: &TcpStream,
    bucket: Option<&Arc<SharedBucket>>,
    idle: Option<Duration>,
    activity: &Activity,
) -> Spliced {
    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;

    let mut pipe: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd, usize)> = None;
    let mut total = 0u64;
    let poll_timeout = match idle {
        Some(limit) => PollTimeout::try_from((limit / 4).max(Duration::from_millis(50)))
            .unwrap_or(PollTimeout::MAX),
        None => PollTimeout::NONE,
    };
    loop {
        if pipe.is_none() {
            // Wait for the first byte (or EOF) without a pipe.
            let mut fds = [PollFd::new(src.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, poll_timeout) {
                Ok(0) => {
                    if idle.is_some_and(|limit| activity.idle_for() >= limit) {
                        shutdown_both(src, dst);
                        return Spliced::Ended(total, End::Idle);
                    }
                    continue;
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return Spliced::Unsupported(total),
            }
            match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
                Ok((r, w)) => {
                    let _ = fcntl(&r, FcntlArg::F_SETPIPE_SZ(MAX_PIPE as i32));
                    let size = fcntl(&r, FcntlArg::F_GETPIPE_SZ).map_or(65536, |n| n as usize);
                    pipe = Some((r, w, size));
                }
                Err(_) => return Spliced::Unsupported(total),
            }
        }
        let Some((pr, pw, size)) = pipe.as_mut() else {
            continue;
        };
        let limit = match bucket {
            Some(b) => b.chunk_limit(*size),
            None => *size,
        };
        let n = match splice(src, None, &*pw, None, limit, SpliceFFlags::SPLICE_F_MOVE) {
            Ok(0) => {
                let _ = dst.shutdown(Shutdown::Write);
                return Spliced::Ended(total, End::Eof);
            }
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => {
                if idle.is_some_and(|limit| activity.idle_for() >= limit) {
                    shutdown_both(src, dst);
                    return Spliced::Ended(total, End::Idle);
                }
                continue;
            }
            Err(nix::errno::Errno::EINVAL) if total == 0 => return Spliced::Unsupported(0),
            Err(e) => {
                log::trace!("relay splice in failed: {e}");
                shutdown_both(src, dst);
                return Spliced::Ended(total, End::Failed);
            }
        };
        if let Some(b) = bucket {
            b.acquire(n as u64);
        }
        let mut left = n;
        while left > 0 {
            match splice(&*pr, None, dst, None, left, SpliceFFlags::SPLICE_F_MOVE) {
                Ok(0) => {
                    shutdown_both(src, dst);
                    return Spliced::Ended(total, End::Failed);
                }
                Ok(k) => left -= k,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    log::trace!("relay splice out failed: {e}");
                    shutdown_both(src, dst);
                    return Spliced::Ended(total, End::Failed);
                }
            }
        }
        total += n as u64;
        activity.touch();
        if n == *size && *size < MAX_PIPE {
            if let Ok(new) = fcntl(&*pr, FcntlArg::F_SETPIPE_SZ((*size * 2) as i32)) {
                *size = new as usize;
            }
        }
    }
}

/// One direction, splicing when the kernel can and copying otherwise.
fn pump_any(
    src: &TcpStream,
    dst: &TcpStream,
    bucket: Option<&Arc<SharedBucket>>,
    idle: Option<Duration>,
    activity: &Activity,
) -> (u64, End) {
    let _registered = bucket.map(|b| b.register());
    match pump_splice(src, dst, bucket, idle, activity) {
        Spliced::Ended(n, end) => (n, end),
        Spliced::Unsupported(done) => {
            let (n, end) = pump(src, dst, bucket, idle, activity);
            (done + n, end)
        }
    }
}

/// One direction: read from `src`, pay the bucket, write to `dst`, until EOF or error.
fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    bucket: Option<&Arc<SharedBucket>>,
    idle: Option<Duration>,
    activity: &Activity,
) -> (u64, End) {
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
