//! Thin wrappers over system calls the servers need: poll for a peer's hang-up or first
//! bytes, and the open-file limit.

use std::net::TcpStream;

/// Waits up to `wait` for `stream` to have something to read (bytes, or the peer's close);
/// true if it does. Reads nothing.
pub fn readable_within(stream: &TcpStream, wait: std::time::Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let rdhup = PollFlags::from_bits_retain(nix::libc::POLLRDHUP);
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN | rdhup)];
    let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    // A poll error is not "silent": let the caller's read find out what it is.
    !matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(0))
}

/// True while the peer has neither closed nor reset: checked without reading, so a queued
/// connection's bytes stay unread. POLLRDHUP reports a FIN even when data is pending.
pub fn peer_alive(stream: &TcpStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let rdhup = PollFlags::from_bits_retain(nix::libc::POLLRDHUP);
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN | rdhup)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => true,
        Ok(_) => match fds[0].revents() {
            // nix names no POLLRDHUP flag, so it reports revents holding it as `None`; the only
            // unnamed bit we asked for is POLLRDHUP: the peer shut down its side.
            None => false,
            Some(r) => !r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL),
        },
        Err(_) => true,
    }
}

/// Copies what has arrived on `stream` into `buf` without taking it and without waiting
/// (`recv` with `MSG_PEEK | MSG_DONTWAIT`): `WouldBlock` when nothing has.
///
/// # Errors
/// As `recv`.
pub fn peek_now(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    recv(
        stream.as_raw_fd(),
        buf,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(std::io::Error::from)
}

/// SIGTERM and SIGINT, blocked in the calling thread (and so in every thread it starts
/// afterwards) and delivered instead to [`ShutdownSignals::wait`]. Call it first thing in
/// `main`, before any thread exists: a thread started earlier would still take the signal
/// and kill the process the default way.
#[derive(Debug)]
pub struct ShutdownSignals(nix::sys::signal::SigSet);

impl ShutdownSignals {
    /// Blocks SIGTERM and SIGINT.
    ///
    /// # Errors
    /// When the signal mask cannot be changed.
    pub fn block() -> std::io::Result<ShutdownSignals> {
        Self::block_these(false)
    }

    /// Blocks SIGTERM and SIGINT, and SIGHUP too, which [`wait`](Self::wait) then reports
    /// as `"SIGHUP"` (a reload, not a stop).
    ///
    /// # Errors
    /// When the signal mask cannot be changed.
    pub fn block_with_reload() -> std::io::Result<ShutdownSignals> {
        Self::block_these(true)
    }

    fn block_these(hup: bool) -> std::io::Result<ShutdownSignals> {
        use nix::sys::signal::{SigSet, Signal};
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        if hup {
            set.add(Signal::SIGHUP);
        }
        set.thread_block().map_err(std::io::Error::from)?;
        Ok(ShutdownSignals(set))
    }

    /// Waits for the next SIGTERM or SIGINT and names it.
    pub fn wait(&self) -> &'static str {
        match self.0.wait() {
            Ok(sig) => sig.as_str(),
            Err(_) => "a signal",
        }
    }

    /// A thread that sends one message on the returned channel per signal, for a caller
    /// that waits on other things too.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn into_channel(self) -> std::io::Result<crossbeam_channel::Receiver<&'static str>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                if tx.send(self.wait()).is_err() {
                    return;
                }
            })?;
        Ok(rx)
    }
}

/// Raises this process's soft open-file limit to its hard limit and returns the new soft
/// limit. Each busy tunnel holds two sockets and up to four pipe ends, so the common default
/// of 1024 would cap a proxy near 170 busy tunnels; servers raise it themselves (nginx's
/// `worker_rlimit_nofile`).
pub fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::tests::pair;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn peer_alive_sees_a_fin_even_behind_unread_bytes() {
        let (mut c, s) = pair();
        assert!(peer_alive(&s));
        c.write_all(b"request bytes nobody has read").unwrap();
        assert!(peer_alive(&s));
        drop(c);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while peer_alive(&s) {
            assert!(std::time::Instant::now() < deadline, "FIN never seen");
            std::thread::yield_now();
        }
    }
}
