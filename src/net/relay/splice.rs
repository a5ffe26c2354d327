//! The splicing relay: both directions of a tunnel on one thread, poll(2) plus splice(2)
//! through a pipe taken from the pool (pipes.rs) for each chunk.

use super::pipes::{self, Pipe, MAX_PIPE};
use super::{shutdown_both, Activity, Options, Payer, Stats};
use crate::limit::meter::Direction;
use nix::errno::Errno;
use nix::fcntl::{splice, SpliceFFlags};
use nix::poll::{poll, PollFd, PollFlags};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;

/// One direction of [`relay_spliced`].
struct Dir<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    dir: Direction,
    // The pipe holding this direction's chunk in flight; `None` while nothing is in flight.
    pipe: Option<Pipe>,
    // A chunk once filled a pipe: take grown pipes from the pool.
    bulk: bool,
    // Bytes in the pipe, paid for, not yet written to `dst`.
    pending: usize,
    // `src` reached EOF.
    eof: bool,
    // EOF seen, everything written, FIN passed on.
    done: bool,
    total: u64,
    // Reading stopped because the user's quota is used up.
    quota_used_up: bool,
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

    /// Writes what the pipe holds; once it is empty, gives the pipe back to the pool and,
    /// after EOF, passes the FIN on.
    fn flush(&mut self) -> Step {
        while self.pending > 0 {
            let Some(pipe) = self.pipe.as_ref() else {
                return Step::Failed; // cannot happen: bytes are pending only in a pipe
            };
            match splice(&pipe.read, None, self.dst, None, self.pending, flags()) {
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
        if let Some(empty) = self.pipe.take() {
            pipes::give_back(empty);
        }
        if self.eof && !self.done {
            let _ = self.dst.shutdown(Shutdown::Write);
            self.done = true;
        }
        Step::Progress
    }

    /// Moves the next chunk from `src` into the pipe, pays for it, and writes it out.
    fn fill(&mut self, payer: Payer<'_>, activity: &Activity, nothing_moved: bool) -> Step {
        if self.pipe.is_none() {
            match pipes::take(self.bulk) {
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
        let Some(pipe) = self.pipe.as_mut() else {
            return Step::Failed;
        };
        let size = pipe.capacity;
        let limit = payer.limit(size);
        if limit == 0 {
            // The quota is used up: read no more, as at EOF, so what is in flight the
            // other way still arrives before the FIN.
            self.eof = true;
            self.quota_used_up = true;
            return self.flush();
        }
        match splice(self.src, None, &pipe.write, None, limit, flags()) {
            Ok(0) => {
                self.eof = true;
                self.flush()
            }
            Ok(n) => {
                if n == size && size < MAX_PIPE {
                    pipe.grow();
                    self.bulk = true;
                }
                payer.pay(self.dir, n);
                self.pending = n;
                self.total += n as u64;
                activity.touch();
                match self.flush() {
                    Step::Wait => Step::Progress, // the rest goes when dst drains
                    other => other,
                }
            }
            Err(Errno::EINTR) => Step::Progress,
            Err(Errno::EAGAIN) => {
                // Nothing to read after all: the pipe is still empty, so it goes back.
                if let Some(empty) = self.pipe.take() {
                    pipes::give_back(empty);
                }
                Step::Wait
            }
            Err(Errno::EINVAL) if nothing_moved => Step::Unsupported,
            Err(e) => {
                log::trace!("relay splice in failed: {e}");
                Step::Failed
            }
        }
    }
}

impl Drop for Dir<'_> {
    fn drop(&mut self) {
        // Only a pipe known to be empty may serve another tunnel: one with bytes left in it
        // (a failed write) would hand them to the wrong connection.
        if let Some(p) = self.pipe.take() {
            if self.pending == 0 {
                pipes::give_back(p);
            }
        }
    }
}

fn flags() -> SpliceFFlags {
    // No SPLICE_F_MORE: with it the kernel corks a tunnel's last chunk for 200 ms.
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Both directions on this thread: poll(2) on the two sockets, splice(2) socket → pipe →
/// socket, no copy through user space and no second thread.
///
/// Each direction takes a pipe from the pool for each chunk (64 KiB; 1 MiB once a splice
/// fills one) and gives it back once the chunk is written, so an idle tunnel holds one thread
/// and two sockets, nothing else. Metering is as
/// in the copying relay: move at most the fair share into the pipe, pay for what arrived,
/// then write it. While a direction waits for tokens the other waits too; both draw on the
/// same budget anyway.
/// Returns `None`, having moved nothing, when these sockets cannot be spliced.
pub(super) fn relay_spliced(
    client: &TcpStream,
    target: &TcpStream,
    opts: &Options,
) -> Option<Stats> {
    if client.set_nonblocking(true).is_err() || target.set_nonblocking(true).is_err() {
        return None;
    }
    let payer = Payer::of(opts);
    let _guards = payer.register();
    let activity = Activity::new();
    let new_dir = |src, dst, dir| Dir {
        src,
        dst,
        dir,
        pipe: None,
        bulk: false,
        pending: 0,
        eof: false,
        done: false,
        total: 0,
        quota_used_up: false,
    };
    let mut up = new_dir(client, target, Direction::Up);
    let mut down = new_dir(target, client, Direction::Down);
    let tick = Activity::tick(opts.idle_timeout);
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
                    if activity.expired(opts.idle_timeout) {
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
            steps[2] = up.fill(payer, &activity, nothing_moved);
        }
        if down.wants_read() && t_in {
            steps[3] = down.fill(payer, &activity, nothing_moved);
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
        quota_closed: up.quota_used_up || down.quota_used_up,
    })
}
