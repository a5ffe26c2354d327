//! Listening sockets and worker threads, shared by local-proxy, remote-proxy and the tests.
//!
//! In scope: binding, the accept loop, admission (slots and the paused queue, via
//! admission.rs), handing each admitted socket through a crossbeam channel to a worker, the
//! worker pool, the sweeper, and shutdown. Out of scope: what a connection says (local.rs,
//! remote.rs implement [`Service`]).
//!
//! Shape: one accept thread asks [`Admission`] about each socket. Admitted sockets go through
//! the channel to "serve" workers, each of which owns one socket for its whole life
//! (handshake, then one relay direction; the other direction runs as a job on the same pool).
//! Sockets beyond `max_active` wait in the admission queue unread, holding no thread; when a
//! tunnel ends, its worker takes the oldest live waiter itself (no hand-off). A sweeper
//! thread answers waiters that time out with "busy" and drops ones whose client left. The
//! pool grows on demand so a relay job never waits for a thread: a tunnel stuck half-relayed
//! would be a deadlock.

use crate::admission::{Admission, Arrival, Limits, Removed};
use parking_lot::Mutex;
use std::any::Any;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use threadpool::ThreadPool;

/// Stack size of every worker thread, in bytes. Relay buffers live on the heap; the deepest
/// stack use is getaddrinfo and argon2's setup, both well under this. The default 2 MiB costs
/// address space per thread, and thousands of tunnels mean thousands of threads; only touched
/// pages become resident, so this bounds the worst case, not the typical one.
pub const WORKER_STACK_SIZE: usize = 256 * 1024;

/// Short per-connection id for log lines (`conn=17`).
pub type ConnId = u64;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A thread pool that runs every job at once: it grows instead of queueing.
#[derive(Clone)]
pub struct Workers {
    inner: Arc<WorkersInner>,
}

struct WorkersInner {
    // The pool; behind a mutex because growing it needs `&mut`.
    pool: Mutex<ThreadPool>,
    // Jobs submitted and not yet finished.
    busy: AtomicUsize,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("busy", &self.inner.busy.load(Ordering::Relaxed))
            .finish()
    }
}

struct BusyGuard(Arc<WorkersInner>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Workers {
    /// An empty pool whose threads are named `name`.
    pub fn new(name: &str) -> Workers {
        let pool = threadpool::Builder::new()
            .num_threads(1)
            .thread_name(name.to_string())
            .thread_stack_size(WORKER_STACK_SIZE)
            .build();
        Workers {
            inner: Arc::new(WorkersInner {
                pool: Mutex::new(pool),
                busy: AtomicUsize::new(0),
            }),
        }
    }

    /// Runs `job` on a pool thread, adding a thread when every one is busy.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let mut pool = self.inner.pool.lock();
        let busy = self.inner.busy.fetch_add(1, Ordering::AcqRel) + 1;
        if busy > pool.max_count() {
            // Grow by a quarter at a time so a burst of tunnels does not add threads one by
            // one under the lock.
            let target = busy.max(pool.max_count() + pool.max_count() / 4);
            pool.set_num_threads(target);
        }
        let guard = BusyGuard(Arc::clone(&self.inner));
        pool.execute(move || {
            let _guard = guard;
            job();
        });
    }
}

/// A running listener. Dropping it stops accepting; tunnels already open run to the end.
pub struct Server {
    local_addr: SocketAddr,
    // Set before waking the accept loop; the loop exits on the next accept it sees.
    stopping: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    // Values whose drop tells helper threads (the sweeper, the user watcher) to stop.
    guards: Vec<Box<dyn Any + Send>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

/// What a handler wants done after it returns: nothing, or more work on the same slot
/// (a tunnel of the same user that was parked waiting for this one to end).
pub enum Next {
    /// The slot is free.
    Done,
    /// Run this on the same slot, then look again.
    Continue(Box<dyn FnOnce(&Workers) -> Next + Send>),
}

/// What a listener does with its connections.
pub trait Service: Send + Sync + 'static {
    /// Serves one admitted connection on a serve worker, start to end.
    fn handle(&self, stream: TcpStream, id: ConnId, workers: &Workers) -> Next;
    /// Tells a connection that was not admitted "server busy, retry after N seconds" in its
    /// own protocol, then closes it. Runs on a short pool job; must bound its reads.
    fn busy(&self, stream: TcpStream, id: ConnId, retry_after: u16);
    /// Called by the sweeper a few times a second (remote.rs expires parked tunnels here).
    fn sweep(&self, _workers: &Workers) {}
}

/// An accepted connection on its way to a slot.
struct Arrived {
    stream: TcpStream,
    id: ConnId,
    at: std::time::Instant,
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

/// Bytes looked at per `peek`: a whole tunnel request (at most 775 bytes), SOCKS5 message or
/// typical HTTP head arrives in one.
const PEEK_BYTES: usize = 1024;

/// How far past the deadline a blocked read may run before the socket's timeout is re-armed.
/// Re-arming on every read cost a `setsockopt` per field of every handshake.
const REARM_SLACK: Duration = Duration::from_millis(20);

/// A socket whose handshake reads must all finish by one deadline, read with few system calls.
///
/// A per-read timeout alone lets a client that sends a byte every few seconds hold a worker
/// for hours (slowloris); this caps the whole handshake (to within [`REARM_SLACK`]).
///
/// Parsers read field by field; each field used to be a `recv`. Instead this peeks at
/// whatever has arrived (`MSG_PEEK`), serves the parser from that copy, and removes from the
/// socket only the bytes the parser took, when it needs more or when dropped. So a handshake
/// that arrived in one segment costs two `recv`s, and bytes an app sent early (past the
/// handshake) stay in the socket for the relay, never swallowed into a buffer here.
/// Drop it (or call [`Deadline::settle`]) before reading the socket any other way.
/// Writes pass straight through.
pub struct Deadline<'a> {
    stream: &'a TcpStream,
    until: std::time::Instant,
    // The read timeout the socket has now.
    timeout: Duration,
    // Bytes peeked from the socket (still in it): `peeked[..len]`, of which the first `taken`
    // have been handed to the reader.
    peeked: [u8; PEEK_BYTES],
    len: usize,
    taken: usize,
}

impl<'a> Deadline<'a> {
    /// Reads on `stream` must finish within `within` from now; sets that as the read timeout.
    pub fn new(stream: &'a TcpStream, within: Duration) -> io::Result<Deadline<'a>> {
        stream.set_read_timeout(Some(within.max(Duration::from_millis(1))))?;
        Ok(Deadline {
            stream,
            until: std::time::Instant::now() + within,
            timeout: within,
            peeked: [0; PEEK_BYTES],
            len: 0,
            taken: 0,
        })
    }

    /// The next byte, without taking it; `None` at end of stream.
    ///
    /// # Errors
    /// As `read`: the deadline passed, or the socket failed.
    pub fn peek_byte(&mut self) -> io::Result<Option<u8>> {
        if self.taken == self.len && !self.fill()? {
            return Ok(None);
        }
        Ok(Some(self.peeked[self.taken]))
    }

    /// Removes from the socket the bytes already handed out.
    ///
    /// # Errors
    /// When the socket fails (the bytes were seen by `peek`, so this does not wait).
    pub fn settle(&mut self) -> io::Result<()> {
        if self.taken > 0 {
            let n = self.taken;
            self.len = 0;
            self.taken = 0;
            io::Read::read_exact(&mut &*self.stream, &mut self.peeked[..n])?;
        }
        Ok(())
    }

    // Peeks at the socket after settling what was taken; false at end of stream.
    fn fill(&mut self) -> io::Result<bool> {
        self.settle()?;
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake took too long",
            ));
        }
        if left + REARM_SLACK < self.timeout {
            self.stream.set_read_timeout(Some(left))?;
            self.timeout = left;
        }
        self.len = self.stream.peek(&mut self.peeked)?;
        Ok(self.len > 0)
    }
}

impl Drop for Deadline<'_> {
    fn drop(&mut self) {
        let _ = self.settle();
    }
}

impl io::Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || (self.taken == self.len && !self.fill()?) {
            return Ok(0);
        }
        let n = buf.len().min(self.len - self.taken);
        buf[..n].copy_from_slice(&self.peeked[self.taken..self.taken + n]);
        self.taken += n;
        Ok(n)
    }
}

impl io::Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut &*self.stream, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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

/// Most "busy" answers being written at once; past this, turned-away sockets are just
/// closed, so a flood cannot tie up threads answering it.
const MAX_BUSY_JOBS: usize = 64;

/// State shared by the accept thread, the serve workers and the sweeper.
struct ServeCtx {
    rx: crossbeam_channel::Receiver<Arrived>,
    service: Arc<dyn Service>,
    workers: Workers,
    admission: Admission<Arrived>,
    // Seconds clients turned away are told to wait.
    retry_after: u16,
    // Serve workers waiting for a socket.
    idle: AtomicUsize,
    // Serve workers in existence (idle or busy); at most `max`.
    serving: AtomicUsize,
    max: usize,
    // "busy" answers in flight.
    busy_jobs: Arc<AtomicUsize>,
}

impl ServeCtx {
    /// Adds a serve worker unless the cap is reached.
    fn add_worker(self: &Arc<Self>) {
        let added = self
            .serving
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if added {
            let ctx = Arc::clone(self);
            self.workers.spawn(move || ctx.serve_loop());
        }
    }

    fn serve_loop(self: Arc<Self>) {
        loop {
            self.idle.fetch_add(1, Ordering::AcqRel);
            let next = self.rx.recv();
            let idle_now = self.idle.fetch_sub(1, Ordering::AcqRel) - 1;
            let Ok(mut arrived) = next else {
                self.serving.fetch_sub(1, Ordering::AcqRel);
                return; // channel closed: the server is shutting down
            };
            // Keep one spare worker waiting, so the next socket does not wait for this one.
            if idle_now == 0 {
                self.add_worker();
            }
            // Serve on this slot until the queue has nobody left for it.
            loop {
                let mut next = self
                    .service
                    .handle(arrived.stream, arrived.id, &self.workers);
                while let Next::Continue(f) = next {
                    next = f(&self.workers);
                }
                let mut removed = Removed::default();
                let following = self
                    .admission
                    .finish(&mut |a: &Arrived| peer_alive(&a.stream), &mut removed);
                self.turn_away(removed);
                match following {
                    Some(a) => {
                        log::debug!(
                            "conn={} dequeued after {}ms",
                            a.id,
                            a.at.elapsed().as_millis()
                        );
                        arrived = a;
                    }
                    None => break,
                }
            }
        }
    }

    /// Answers expired waiters "busy" and drops departed ones.
    fn turn_away(&self, removed: Removed<Arrived>) {
        for a in removed.gone {
            log::debug!("conn={} left the queue before being served", a.id);
        }
        for a in removed.expired {
            log::info!(
                "conn={} server busy: waited {}ms for a slot",
                a.id,
                a.at.elapsed().as_millis()
            );
            self.send_busy(a);
        }
    }

    fn send_busy(&self, a: Arrived) {
        let in_flight = self.busy_jobs.fetch_add(1, Ordering::AcqRel);
        if in_flight >= MAX_BUSY_JOBS {
            self.busy_jobs.fetch_sub(1, Ordering::AcqRel);
            return; // dropping the socket closes it
        }
        let (service, jobs, retry) = (
            Arc::clone(&self.service),
            Arc::clone(&self.busy_jobs),
            self.retry_after,
        );
        self.workers.spawn(move || {
            service.busy(a.stream, a.id, retry);
            jobs.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Expires waiters on time and notices clients that left, until `stop` closes.
    fn sweep_loop(&self, stop: crossbeam_channel::Receiver<()>) {
        const TICK: Duration = Duration::from_millis(100);
        loop {
            let wait = self
                .admission
                .next_deadline()
                .map(|d| d.saturating_duration_since(std::time::Instant::now()))
                .map_or(TICK, |d| d.min(TICK));
            match stop.recv_timeout(wait) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let removed = self
                .admission
                .sweep(&mut |a: &Arrived| peer_alive(&a.stream));
            self.turn_away(removed);
            self.service.sweep(&self.workers);
        }
    }
}

impl Server {
    /// Binds `addr` and starts accepting. `name` prefixes thread names and log lines.
    ///
    /// # Errors
    /// The bind error (address in use, permission denied).
    pub fn bind(
        addr: SocketAddr,
        name: &str,
        limits: Limits,
        service: Arc<dyn Service>,
    ) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        let workers = Workers::new(name);
        let (tx, rx) = crossbeam_channel::unbounded::<Arrived>();
        let ctx = Arc::new(ServeCtx {
            rx,
            service,
            workers: workers.clone(),
            admission: Admission::new(limits),
            retry_after: crate::throttle::retry_after_secs(limits.timeout),
            idle: AtomicUsize::new(0),
            serving: AtomicUsize::new(0),
            max: limits.max_active.max(1),
            busy_jobs: Arc::new(AtomicUsize::new(0)),
        });
        ctx.add_worker();
        let stopping = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        {
            let ctx = Arc::clone(&ctx);
            std::thread::Builder::new()
                .name(format!("{name}-sweep"))
                .spawn(move || ctx.sweep_loop(stop_rx))?;
        }
        let stop = Arc::clone(&stopping);
        let label = name.to_string();
        let accept = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || accept_loop(listener, tx, ctx, stop, &label))?;
        Ok(Server {
            local_addr,
            stopping,
            accept: Some(accept),
            guards: vec![Box::new(stop_tx)],
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Keeps `guard` alive until shutdown, then drops it (closing a channel, say).
    pub fn attach(&mut self, guard: Box<dyn Any + Send>) {
        self.guards.push(guard);
    }

    /// Blocks until the accept loop ends (it ends only on shutdown).
    pub fn wait(mut self) {
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }

    /// Stops accepting and waits for the accept loop to end. Open tunnels are not cut;
    /// connections still queued are closed.
    pub fn shutdown(&mut self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocked accept() by connecting to ourselves (tiny-http's trick).
        let wake = match self.local_addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::from(([127, 0, 0, 1], a.port()))
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
            }
            other => other,
        };
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.guards.clear();
        log::info!("stopped listening on {}", self.local_addr);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(
    listener: TcpListener,
    tx: crossbeam_channel::Sender<Arrived>,
    ctx: Arc<ServeCtx>,
    stopping: Arc<AtomicBool>,
    name: &str,
) {
    let mut consecutive_errors = 0u32;
    loop {
        match listener.accept() {
            Ok((stream, _peer)) => {
                consecutive_errors = 0;
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let arrived = Arrived {
                    stream,
                    id: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
                    at: std::time::Instant::now(),
                };
                match ctx.admission.arrive(arrived) {
                    Arrival::Admitted(a) => {
                        if tx.send(a).is_err() {
                            break;
                        }
                    }
                    Arrival::Queued => log::debug!(
                        "{name}: connection queued (active={} queued={})",
                        ctx.admission.active(),
                        ctx.admission.queued()
                    ),
                    Arrival::Full(a) => {
                        log::info!("conn={} server busy: queue full", a.id);
                        ctx.send_busy(a);
                    }
                }
            }
            Err(e) => {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                // EMFILE and friends are transient: back off instead of spinning or dying.
                consecutive_errors += 1;
                if consecutive_errors == 1 || consecutive_errors % 100 == 0 {
                    log::error!("{name}: accept failed: {e}");
                }
                std::thread::sleep(Duration::from_millis(
                    (10 * consecutive_errors as u64).min(1000),
                ));
            }
        }
    }
    // Whoever still waits for a slot is closed: the server is going away.
    drop(ctx.admission.drain());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A connected client socket and the server side of it.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    #[test]
    fn a_deadline_caps_a_trickling_handshake() {
        let (mut c, s) = pair();
        let trickle = std::thread::spawn(move || {
            for _ in 0..20 {
                if c.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let mut d = Deadline::new(&s, Duration::from_millis(400)).unwrap();
        let t = std::time::Instant::now();
        let mut buf = [0u8; 1];
        let err = loop {
            match d.read(&mut buf) {
                Ok(0) => panic!("EOF before the deadline"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            "{err}"
        );
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "took {:?}",
            t.elapsed()
        );
        drop(d);
        drop(s);
        trickle.join().unwrap();
    }

    #[test]
    fn a_deadline_leaves_unparsed_bytes_in_the_socket() {
        let (mut c, s) = pair();
        c.write_all(b"HEADearly app data").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut d = Deadline::new(&s, Duration::from_secs(2)).unwrap();
        assert_eq!(d.peek_byte().unwrap(), Some(b'H'));
        let mut head = [0u8; 4];
        d.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HEAD");
        drop(d);
        // What the parser did not take is still there for whoever reads next (the relay).
        let mut rest = [0u8; 14];
        (&s).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"early app data");
    }

    #[test]
    fn a_deadline_reads_a_message_split_across_segments() {
        let (mut c, s) = pair();
        let writer = std::thread::spawn(move || {
            for part in [&b"ab"[..], b"cd", b"ef"] {
                c.write_all(part).unwrap();
                std::thread::sleep(Duration::from_millis(30));
            }
            c
        });
        let mut d = Deadline::new(&s, Duration::from_secs(2)).unwrap();
        let mut all = [0u8; 5];
        d.read_exact(&mut all).unwrap();
        assert_eq!(&all, b"abcde");
        drop(d);
        let _c = writer.join().unwrap();
        let mut last = [0u8; 1];
        (&s).read_exact(&mut last).unwrap();
        assert_eq!(&last, b"f");
    }

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
