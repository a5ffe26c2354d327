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

use crate::limit::admission::{Admission, Arrival, Limits, Removed};
use crate::net::sys::peer_alive;
use crate::net::workers::Workers;
use std::any::Any;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Short per-connection id for log lines (`conn=17`).
pub type ConnId = u64;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Why a listener could not start.
#[derive(Debug)]
pub enum StartError {
    /// The address could not be bound (in use, not ours, no permission).
    Bind(SocketAddr, io::Error),
    /// A thread the server needs could not be created; names which.
    Spawn(&'static str, io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Bind(a, e) => write!(f, "cannot listen on {a}: {e}"),
            StartError::Spawn(what, e) => write!(f, "cannot start the {what} thread: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

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
pub enum Handled {
    /// The slot is free.
    SlotFree,
    /// Run this on the same slot, then look again.
    ResumeOnSlot(Box<dyn FnOnce(&Workers) -> Handled + Send>),
}

/// What a listener does with its connections.
pub trait Service: Send + Sync + 'static {
    /// Serves one admitted connection on a serve worker, start to end.
    fn handle(&self, stream: TcpStream, id: ConnId, workers: &Workers) -> Handled;
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
                while let Handled::ResumeOnSlot(f) = next {
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
    /// `Bind` (address in use, permission denied), or `Spawn` when a thread cannot be made.
    pub fn bind(
        addr: SocketAddr,
        name: &str,
        limits: Limits,
        service: Arc<dyn Service>,
    ) -> Result<Server, StartError> {
        let bind_err = |e| StartError::Bind(addr, e);
        let listener = TcpListener::bind(addr).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let workers = Workers::new(name);
        let (tx, rx) = crossbeam_channel::unbounded::<Arrived>();
        let ctx = Arc::new(ServeCtx {
            rx,
            service,
            workers: workers.clone(),
            admission: Admission::new(limits),
            retry_after: crate::limit::throttle::retry_after_secs(limits.timeout),
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
                .spawn(move || ctx.sweep_loop(stop_rx))
                .map_err(|e| StartError::Spawn("queue sweeper", e))?;
        }
        let stop = Arc::clone(&stopping);
        let label = name.to_string();
        let accept = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || accept_loop(listener, tx, ctx, stop, &label))
            .map_err(|e| StartError::Spawn("accept", e))?;
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
