//! Listening: bind, the accept loop, admission, handing each admitted socket to a worker,
//! the sweeper, and shutdown. Shared by local-proxy, remote-proxy and the tests.
//!
//! Shape: one accept thread asks the service whether the client's address may start a
//! connection now ([`Service::arrival`], the per-address tunnel rate), then [`Admission`]
//! about each socket. An admitted socket is handed through a crossbeam channel to a worker
//! (net/workers.rs), which owns it for its whole life: handshake, then the relay. Sockets
//! beyond `max_active`, or beyond their address's cap on handshakes in flight, wait in the
//! admission queue unread, holding no thread; when a tunnel ends, its worker takes the
//! oldest waiter that may start itself (no second hand-off), and when a handshake ends
//! ([`Handshake`]) a waiter its address held back takes a free slot. A sweeper thread
//! answers waiters that time out with "busy", and drops ones whose client left or that sent
//! nothing within the first-byte timeout. A handler that panics loses neither its slot nor
//! the process (`SlotGuard`).
//!
//! Out of scope: what a connection says (local/ and remote/ implement [`Service`]).

use crate::limit::admission::{Admission, Arrival, Limits, Removed};
use crate::net::parking::{Parking, Woke};
use crate::net::sys::{peek_now, peer_alive};
use crate::net::workers::{PoolConfig, Workers};
use std::any::Any;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    // The pool this listener's connections run on; closed at shutdown so idle workers exit.
    workers: Workers,
    // Shared with the accept loop and workers: the slots tell how many connections are
    // still being served.
    ctx: Arc<ServeCtx>,
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

/// What a handler wants done after it returns: nothing, more work on the same slot (a
/// tunnel of the same user that was waiting for this one to end), or keep the connection
/// idle until it speaks again.
pub enum Handled {
    /// The slot is free.
    SlotFree,
    /// Run this on the same slot, then look again.
    ResumeOnSlot(Box<dyn FnOnce(&Workers) -> Handled + Send>),
    /// Free the slot and the worker, and park the connection (net/parking.rs) until its
    /// next byte arrives, when it is admitted again like a new one, or until its deadline,
    /// when [`Service::expired`] closes it.
    Park(Parked),
}

/// A connection a service parks: what it needs to take it up again.
pub struct Parked {
    /// The socket.
    pub stream: TcpStream,
    /// Its id in log lines, kept across the wait.
    pub id: ConnId,
    /// The client's address.
    pub peer: SocketAddr,
    /// When it was first accepted.
    pub accepted_at: Instant,
    /// What the service had done with it (a finished TLS handshake), handed back in
    /// [`Accepted::resume`].
    pub resume: Option<Box<dyn Any + Send>>,
    /// When it is closed if it has said nothing more.
    pub until: Instant,
}

/// A connection as the server hands it to its service.
pub struct Accepted {
    /// The socket, unread.
    pub stream: TcpStream,
    /// Its id in log lines.
    pub id: ConnId,
    /// The client's address, as accept saw it.
    pub peer: SocketAddr,
    /// When it was accepted: its first-byte deadline runs from here, time spent queued
    /// included.
    pub accepted_at: Instant,
    /// The connection's place under its address's handshake cap.
    pub handshake: Handshake,
    /// What the service left with it when it parked it ([`Parked::resume`]); `None` for a
    /// new connection.
    pub resume: Option<Box<dyn Any + Send>>,
    // Its address had the most parked connections allowed: it waits on its worker instead.
    no_park: bool,
}

impl std::os::fd::AsFd for Accepted {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// How long a new connection may stay silent on its worker before it is parked until its
/// first byte: a client that connects and sends at once never waits for the parking thread,
/// one that says nothing (a browser's speculative connection, a port scanner, a flood)
/// holds a descriptor, not a worker.
pub const SILENT_LINGER: Duration = Duration::from_millis(20);

impl Accepted {
    /// The connection itself when it has bytes to read within [`SILENT_LINGER`] (or was
    /// taken up after parking); otherwise it is parked until its first byte arrives or its
    /// first-byte timeout `first_byte` (counted from the accept) runs out.
    ///
    /// # Errors
    /// [`Handled::Park`], for the service to return.
    pub fn unless_silent(self, first_byte: Duration) -> Result<Accepted, Handled> {
        if self.resume.is_some()
            || self.no_park
            || crate::net::sys::readable_within(&self.stream, SILENT_LINGER)
        {
            return Ok(self);
        }
        Err(Handled::Park(Parked {
            stream: self.stream,
            id: self.id,
            peer: self.peer,
            accepted_at: self.accepted_at,
            resume: None,
            until: self.accepted_at + first_byte,
        }))
    }

    /// What is left of `first_byte` (the first-byte timeout) since the accept; at least a
    /// moment, so bytes that arrived while it was queued are still read.
    pub fn first_byte_left(&self, first_byte: Duration) -> Duration {
        first_byte
            .saturating_sub(self.accepted_at.elapsed())
            .max(Duration::from_millis(1))
    }
}

/// A connection's place under its address's cap on handshakes in flight
/// (`--max-handshakes-per-ip`), held from admission until the service calls
/// [`over`](Self::over), once the client has authenticated, or drops it with the
/// connection. The cap is what keeps one address's silent or slow sockets from holding
/// every worker; connections of that address it held back go on when places free.
pub struct Handshake(Option<(Arc<ServeCtx>, IpAddr)>);

impl Handshake {
    /// The client is through its handshake: it no longer counts against its address.
    pub fn over(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some((ctx, ip)) = self.0.take() {
            ctx.handshake_over(ip);
        }
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.release();
    }
}

/// What a listener does with its connections.
pub trait Service: Send + Sync + 'static {
    /// Serves one admitted connection on a serve worker, start to end.
    fn handle(&self, conn: Accepted, workers: &Workers) -> Handled;
    /// Tells a connection that was not admitted "server busy, retry after N seconds" in its
    /// own protocol, then closes it. Runs on a short pool job; must bound its reads.
    fn busy(&self, conn: Accepted, retry_after: u16);
    /// Asked on accept (and when a parked connection wakes), before admission: may a
    /// connection from `peer` start now? `Err` carries the wait, and the connection goes to
    /// [`refuse_arrival`](Self::refuse_arrival) without a slot.
    fn arrival(&self, _peer: SocketAddr) -> Result<(), Duration> {
        Ok(())
    }
    /// Answers a connection [`arrival`](Self::arrival) refused, on a short pool job like
    /// [`busy`](Self::busy): it must bound its reads.
    fn refuse_arrival(&self, _conn: Accepted, _wait: Duration) {}
    /// Closes a parked connection whose deadline passed, in its own protocol (a TLS
    /// close_notify). Runs on the parking thread: must not block for long.
    fn expired(&self, _conn: Accepted) {}
    /// A connection waiting for a slot that has sent nothing this long after it was
    /// accepted is closed (as an admitted one is by the service's own first-byte deadline).
    fn first_byte_timeout(&self) -> Option<Duration> {
        None
    }
    /// Called by the sweeper a few times a second (remote/ expires parked tunnels here).
    fn sweep(&self, _workers: &Workers) {}
    /// Asked by the sweeper about a connection waiting for a slot: is it one the service
    /// answers without a slot (remote-proxy's health probes, so a busy remote is not taken
    /// for a dead one)? Runs under the queue's lock: must only look, not read or write
    /// ([`crate::net::sys::peek_now`]). A connection once answered [`Triage::Wait`] is not
    /// asked again, so a full queue costs a look per connection, not one per tick.
    fn answers_unadmitted(&self, _stream: &TcpStream) -> Triage {
        Triage::Wait
    }
    /// Answers a connection [`answers_unadmitted`](Self::answers_unadmitted) picked, on a
    /// short pool job like [`busy`](Self::busy): it must bound its reads.
    fn answer_unadmitted(&self, _conn: Accepted) {}
}

/// What to do with a connection waiting for a slot ([`Service::answers_unadmitted`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Triage {
    /// Answer it now, without a slot, and take it out of the queue.
    Answer,
    /// It waits for a slot like any connection; do not ask again.
    Wait,
    /// Too few of its bytes have arrived to tell: ask again at the next sweep.
    Unknown,
}

/// An accepted connection on its way to a slot.
struct Arrived {
    conn: Accepted,
    // The address its handshake counts under, when the listener caps them per address.
    key: Option<IpAddr>,
    // The service said it waits like any connection: the sweeper stops looking at it.
    triaged: std::cell::Cell<bool>,
    // Bytes have arrived: the first-byte deadline no longer applies.
    spoke: std::cell::Cell<bool>,
    // Dropped from the queue for sending nothing in time (for the log line).
    silent: std::cell::Cell<bool>,
    // When it asked for a slot, for the queue-wait histogram.
    arrived_at: Instant,
}

/// Most "busy" answers being written at once; past this, turned-away sockets are just
/// closed, so a flood cannot tie up threads answering it.
const MAX_BUSY_JOBS: usize = 64;

/// State shared by the accept thread, the workers serving connections, and the sweeper.
struct ServeCtx {
    service: Arc<dyn Service>,
    workers: Workers,
    admission: Admission<Arrived>,
    // Seconds clients turned away are told to wait.
    retry_after: u16,
    // "busy" answers in flight.
    busy_jobs: Arc<AtomicUsize>,
    // Handshakes are capped per client address.
    per_address: bool,
    // A waiter silent this long after accept is dropped.
    first_byte: Option<Duration>,
    // Idle connections between two steps.
    parking: Parking<Accepted>,
    // Parked connections taken up again since start.
    woken: AtomicU64,
    // Connections closed for their address's idle cap: a line a second, not one each.
    idle_cap_log: parking_lot::Mutex<EveryInterval>,
}

/// An admission slot held by the connection a worker is serving. Normally the worker hands
/// the slot on itself ([`ServeCtx::serve`]); if the handler panics, dropping this releases
/// the slot, so a panic never loses one, and the next waiter is served on another worker.
struct SlotGuard<'a> {
    ctx: &'a Arc<ServeCtx>,
    id: ConnId,
    armed: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        log::warn!(
            "conn={} handler panicked; its slot is released and serving goes on",
            self.id
        );
        if let Some(next) = self.ctx.release_slot() {
            self.ctx.dispatch(next);
        }
    }
}

impl ServeCtx {
    /// Serves an admitted connection on a worker.
    fn dispatch(self: &Arc<Self>, arrived: Arrived) {
        let ctx = Arc::clone(self);
        self.workers.spawn(move || ctx.serve(arrived));
    }

    /// Serves `arrived`, then whoever waited for its slot, on this worker, until the queue
    /// has nobody left for the slot.
    fn serve(self: &Arc<Self>, mut arrived: Arrived) {
        loop {
            let mut slot = SlotGuard {
                ctx: self,
                id: arrived.conn.id,
                armed: true,
            };
            let mut conn = arrived.conn;
            if let Some(ip) = arrived.key {
                // Admission counted it under its address; the guard gives the place back.
                conn.handshake = Handshake(Some((Arc::clone(self), ip)));
            }
            let mut next = self.service.handle(conn, &self.workers);
            loop {
                match next {
                    Handled::ResumeOnSlot(f) => next = f(&self.workers),
                    Handled::Park(p) => break self.park(p),
                    Handled::SlotFree => break,
                }
            }
            slot.armed = false;
            match self.release_slot() {
                Some(a) => arrived = a,
                None => return,
            }
        }
    }

    /// Parks a connection its service is done with for now; past its address's cap it is
    /// closed instead.
    fn park(self: &Arc<Self>, p: Parked) {
        let conn = Accepted {
            stream: p.stream,
            id: p.id,
            peer: p.peer,
            accepted_at: p.accepted_at,
            handshake: Handshake(None),
            resume: p.resume,
            no_park: false,
        };
        let key = Some(crate::limit::destinations::canonical(conn.peer.ip()));
        match self.parking.park(conn, key, p.until) {
            Ok(()) => log::debug!("conn={} parked", p.id),
            Err(mut conn) => {
                if let Some(n) = self.idle_cap_log.lock().tick(Instant::now()) {
                    log::info!(
                        "conn={} not parked: its address {} has the most idle connections \
                         allowed ({n} so in the last second)",
                        conn.id,
                        conn.peer.ip()
                    );
                }
                match conn.resume {
                    // A warm connection past the cap is closed; local-proxy backs off.
                    Some(_) => self.service.expired(conn),
                    // A new one that is only slow to speak (a client starved of CPU) is
                    // served on a worker as before parking, under the handshake cap.
                    None => {
                        conn.no_park = true;
                        self.admit(conn);
                    }
                }
            }
        }
    }

    /// Takes up parked connections that spoke again, and closes those whose time ran out,
    /// until the server stops.
    fn park_loop(self: &Arc<Self>, stopping: Arc<AtomicBool>) {
        // New deadlines are at least a first-byte timeout away: seen in time at this pace.
        const MAX_WAIT: Duration = Duration::from_millis(500);
        while !stopping.load(Ordering::SeqCst) {
            for woke in self.parking.wait(MAX_WAIT) {
                match woke {
                    Woke::Ready(conn) => {
                        // Readable because it closed, with nothing to say: just let it go.
                        if matches!(peek_now(&conn.stream, &mut [0u8; 1]), Ok(0)) {
                            log::debug!("conn={} closed while parked", conn.id);
                            continue;
                        }
                        log::debug!("conn={} woke", conn.id);
                        self.woken.fetch_add(1, Ordering::Relaxed);
                        self.admit(conn);
                    }
                    Woke::Expired(conn) => {
                        log::debug!("conn={} idle too long; closed", conn.id);
                        self.service.expired(conn);
                    }
                }
            }
        }
        for conn in self.parking.drain() {
            self.service.expired(conn);
        }
    }

    /// A connection arrives, new or woken from parking: the service's say on its address,
    /// then a slot or the queue.
    fn admit(self: &Arc<Self>, conn: Accepted) {
        let peer = conn.peer;
        match self.service.arrival(peer) {
            Ok(()) => {}
            Err(wait) => {
                self.spawn_short(conn, move |service, c| service.refuse_arrival(c, wait));
                return;
            }
        }
        // A v4 client of a dual-stack listener counts under its v4 address.
        let key = self
            .per_address
            .then(|| crate::limit::destinations::canonical(peer.ip()));
        let arrived = Arrived {
            spoke: std::cell::Cell::new(conn.resume.is_some()),
            conn,
            key,
            triaged: std::cell::Cell::new(false),
            silent: std::cell::Cell::new(false),
            arrived_at: Instant::now(),
        };
        match self.admission.arrive(arrived, key) {
            Arrival::Admitted(a) => {
                crate::metrics::global().queued(Duration::ZERO);
                self.dispatch(a)
            }
            Arrival::Queued => log::debug!(
                "connection queued (active={} queued={})",
                self.admission.active(),
                self.admission.queued()
            ),
            Arrival::Full(a) => {
                log::info!("conn={} server busy: queue full", a.conn.id);
                self.send_busy(a.conn);
            }
        }
    }

    /// Frees a slot, or passes it to the oldest waiter that may start, returned to be
    /// served next.
    fn release_slot(&self) -> Option<Arrived> {
        let mut removed = Removed::default();
        let following = self
            .admission
            .finish(&mut |a: &Arrived| self.still_waiting(a), &mut removed);
        self.turn_away(removed);
        if let Some(a) = &following {
            log::debug!(
                "conn={} dequeued after {}ms",
                a.conn.id,
                a.conn.accepted_at.elapsed().as_millis()
            );
            crate::metrics::global().queued(a.arrived_at.elapsed());
        }
        following
    }

    /// A handshake counted under `ip` ended: a waiter of that address may take a free slot.
    fn handshake_over(self: &Arc<Self>, ip: IpAddr) {
        let mut removed = Removed::default();
        let next = self.admission.handshake_over(
            ip,
            &mut |a: &Arrived| self.still_waiting(a),
            &mut removed,
        );
        self.turn_away(removed);
        if let Some(a) = next {
            log::debug!(
                "conn={} dequeued after {}ms (its address had a handshake end)",
                a.conn.id,
                a.conn.accepted_at.elapsed().as_millis()
            );
            crate::metrics::global().queued(a.arrived_at.elapsed());
            self.dispatch(a);
        }
    }

    /// Is a waiter worth keeping: its client still there, and (past the first-byte
    /// deadline) it has said something? Only looks at the socket.
    fn still_waiting(&self, a: &Arrived) -> bool {
        if !peer_alive(&a.conn.stream) {
            return false;
        }
        let Some(deadline) = self.first_byte else {
            return true;
        };
        if a.spoke.get() {
            return true;
        }
        if matches!(peek_now(&a.conn.stream, &mut [0u8; 1]), Ok(n) if n > 0) {
            a.spoke.set(true);
            return true;
        }
        if a.conn.accepted_at.elapsed() >= deadline {
            a.silent.set(true);
            return false;
        }
        true
    }

    /// Answers expired waiters "busy" and drops departed and silent ones.
    fn turn_away(&self, removed: Removed<Arrived>) {
        for a in removed.gone {
            if a.silent.get() {
                log::debug!(
                    "conn={} closed while queued: sent nothing within the first-byte timeout",
                    a.conn.id
                );
            } else {
                log::debug!("conn={} left the queue before being served", a.conn.id);
            }
        }
        for a in removed.expired {
            log::info!(
                "conn={} server busy: waited {}ms for a slot",
                a.conn.id,
                a.conn.accepted_at.elapsed().as_millis()
            );
            self.send_busy(a.conn);
        }
    }

    fn send_busy(&self, conn: Accepted) {
        let retry = self.retry_after;
        self.spawn_short(conn, move |service, c| service.busy(c, retry));
    }

    /// Runs `job` for a connection that gets an answer without a slot, on a pool job (the
    /// answer may need a TLS handshake: a round trip the sweeper must not wait for). At most
    /// `MAX_BUSY_JOBS` run at once; beyond that the connection is just closed.
    fn spawn_short<F>(&self, conn: Accepted, job: F)
    where
        F: FnOnce(&dyn Service, Accepted) + Send + 'static,
    {
        let in_flight = self.busy_jobs.fetch_add(1, Ordering::AcqRel);
        if in_flight >= MAX_BUSY_JOBS {
            self.busy_jobs.fetch_sub(1, Ordering::AcqRel);
            return; // dropping the socket closes it
        }
        let (service, jobs) = (Arc::clone(&self.service), Arc::clone(&self.busy_jobs));
        self.workers.spawn(move || {
            job(&*service, conn);
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
                .sweep(&mut |a: &Arrived| self.still_waiting(a));
            self.turn_away(removed);
            let answered = self.admission.take_where(&mut |a: &Arrived| {
                if a.triaged.get() {
                    return false;
                }
                match self.service.answers_unadmitted(&a.conn.stream) {
                    Triage::Answer => true,
                    Triage::Wait => {
                        a.triaged.set(true);
                        false
                    }
                    Triage::Unknown => false,
                }
            });
            for a in answered {
                log::debug!("conn={} answered while queued", a.conn.id);
                self.spawn_short(a.conn, |service, c| service.answer_unadmitted(c));
            }
            self.service.sweep(&self.workers);
            self.workers.tidy();
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
        pool: PoolConfig,
        service: Arc<dyn Service>,
    ) -> Result<Server, StartError> {
        let bind_err = |e| StartError::Bind(addr, e);
        let listener = TcpListener::bind(addr).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let workers = Workers::new(name, pool);
        let ctx = Arc::new(ServeCtx {
            first_byte: service.first_byte_timeout(),
            service,
            workers: workers.clone(),
            admission: Admission::new(limits),
            retry_after: crate::limit::throttle::retry_after_secs(limits.timeout),
            busy_jobs: Arc::new(AtomicUsize::new(0)),
            per_address: limits.max_handshakes_per_key.is_some(),
            parking: Parking::new(limits.max_idle_per_key)
                .map_err(|e| StartError::Spawn("parking", e))?,
            woken: AtomicU64::new(0),
            idle_cap_log: parking_lot::Mutex::new(EveryInterval::new(Duration::from_secs(1))),
        });
        let ctx_for_server = Arc::clone(&ctx);
        let stopping = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        {
            let ctx = Arc::clone(&ctx);
            std::thread::Builder::new()
                .name(format!("{name}-sweep"))
                .spawn(move || ctx.sweep_loop(stop_rx))
                .map_err(|e| StartError::Spawn("queue sweeper", e))?;
        }
        {
            let (ctx, stop) = (Arc::clone(&ctx), Arc::clone(&stopping));
            std::thread::Builder::new()
                .name(format!("{name}-park"))
                .spawn(move || ctx.park_loop(stop))
                .map_err(|e| StartError::Spawn("parking", e))?;
        }
        let stop = Arc::clone(&stopping);
        let label = name.to_string();
        let accept = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || accept_loop(listener, ctx, stop, &label))
            .map_err(|e| StartError::Spawn("accept", e))?;
        Ok(Server {
            local_addr,
            stopping,
            accept: Some(accept),
            workers,
            ctx: ctx_for_server,
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

    /// Connections holding a slot now (in their handshake or relaying).
    pub fn active(&self) -> usize {
        self.ctx.admission.active()
    }

    /// A handle that reads this server's slots, queue and parked connections from another
    /// thread (the metrics), for as long as the server runs.
    pub fn load(&self) -> Load {
        Load(Arc::downgrade(&self.ctx))
    }

    /// Connections parked now (warm connections waiting for their app).
    pub fn parked(&self) -> usize {
        self.ctx.parking.len()
    }

    /// Parked connections that spoke again and were taken up, since start.
    pub fn woken(&self) -> u64 {
        self.ctx.woken.load(Ordering::Relaxed)
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
        self.workers.close();
        log::info!("stopped listening on {}", self.local_addr);
    }
}

/// See [`Server::load`].
#[derive(Clone, Debug)]
pub struct Load(std::sync::Weak<ServeCtx>);

impl Load {
    /// (slots in use, connections queued, connections parked); `None` once the server is
    /// gone.
    pub fn read(&self) -> Option<(usize, usize, usize)> {
        let ctx = self.0.upgrade()?;
        Some((
            ctx.admission.active(),
            ctx.admission.queued(),
            ctx.parking.len(),
        ))
    }
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every connection finished.
    Done,
    /// The grace period ran out with this many connections still open.
    GraceOver(usize),
    /// A second signal came: stop now, with this many open.
    Interrupted(usize),
}

impl Drained {
    /// The one log line that ends a graceful stop; the process exits 0 after it (tunnels
    /// still open are closed with it).
    pub fn log(self) {
        match self {
            Drained::Done => log::info!("all tunnels finished; stopped"),
            Drained::GraceOver(n) => log::info!("grace period over; closing {n} tunnels; stopped"),
            Drained::Interrupted(n) => log::info!("second signal; closing {n} tunnels; stopped"),
        }
    }
}

/// Waits until `server` has no connection left, at most `grace`, or until another message on
/// `signals` (a second SIGTERM or SIGINT) says to stop now. The caller has already made new
/// connections finish quickly (closed the listener, or answers them "draining").
pub fn drain(
    server: &Server,
    signals: &crossbeam_channel::Receiver<&'static str>,
    grace: Duration,
) -> Drained {
    const CHECK: Duration = Duration::from_millis(100);
    let until = std::time::Instant::now() + grace;
    loop {
        let open = server.active();
        if open == 0 {
            return Drained::Done;
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Drained::GraceOver(open);
        }
        // Nothing signals when the last tunnel ends, so look again a few times a second;
        // a second signal wakes this at once (a SIGHUP, a reload, does not stop anything).
        if signals
            .recv_timeout(left.min(CHECK))
            .is_ok_and(|sig| sig != "SIGHUP")
        {
            return Drained::Interrupted(server.active());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Lets a repeating event through to the log at most once per interval, counting the rest,
/// so a run of failures (accept with no descriptors left) is one line a second, not one per
/// retry.
#[derive(Debug)]
struct EveryInterval {
    every: Duration,
    last: Option<std::time::Instant>,
    // Events since the last one let through, that one included.
    count: u64,
}

impl EveryInterval {
    fn new(every: Duration) -> Self {
        EveryInterval {
            every,
            last: None,
            count: 0,
        }
    }

    /// Counts an event at `now`; `Some(events since the last line)` when it should be logged.
    fn tick(&mut self, now: std::time::Instant) -> Option<u64> {
        self.count += 1;
        let due = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= self.every);
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

fn accept_loop(listener: TcpListener, ctx: Arc<ServeCtx>, stopping: Arc<AtomicBool>, name: &str) {
    let mut consecutive_errors = 0u32;
    let mut accept_log = EveryInterval::new(Duration::from_secs(1));
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                consecutive_errors = 0;
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                ctx.admit(Accepted {
                    stream,
                    id: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
                    peer,
                    accepted_at: Instant::now(),
                    handshake: Handshake(None),
                    resume: None,
                    no_park: false,
                });
            }
            Err(e) => {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                // EMFILE and friends pass as tunnels end: back off instead of spinning or
                // dying. Nothing signals when a descriptor frees, so this waits by sleeping,
                // briefly, to accept again soon after one does.
                consecutive_errors += 1;
                if let Some(failures) = accept_log.tick(std::time::Instant::now()) {
                    log::error!("{name}: accept failed: {e} ({failures} times in the last second)");
                }
                std::thread::sleep(Duration::from_millis(
                    (10 * consecutive_errors as u64).min(100),
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

    /// Reads one byte; panics on `p`, answers `ok` to anything else.
    struct Panicky;

    impl Service for Panicky {
        fn handle(&self, conn: Accepted, _workers: &Workers) -> Handled {
            let stream = conn.stream;
            let mut b = [0u8; 1];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            if (&stream).read_exact(&mut b).is_ok() {
                assert_ne!(b[0], b'p', "told to panic");
                let _ = (&stream).write_all(b"ok");
            }
            Handled::SlotFree
        }

        fn busy(&self, conn: Accepted, _retry_after: u16) {
            let _ = (&conn.stream).write_all(b"busy");
        }
    }

    #[test]
    fn a_run_of_accept_failures_is_logged_once_a_second() {
        let t0 = std::time::Instant::now();
        let ms = Duration::from_millis;
        let mut every = EveryInterval::new(Duration::from_secs(1));
        assert_eq!(every.tick(t0), Some(1));
        // A retry every 10 ms for a second: silent, counted.
        for i in 1..100 {
            assert_eq!(every.tick(t0 + ms(10 * i)), None, "at {}ms", 10 * i);
        }
        assert_eq!(every.tick(t0 + ms(1000)), Some(100));
        assert_eq!(every.tick(t0 + ms(1500)), None);
        assert_eq!(every.tick(t0 + ms(2600)), Some(2));
    }

    fn client(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    #[test]
    fn a_panicking_handler_releases_its_slot_to_the_next_waiter() {
        // Regression: a panic used to lose its slot for ever. One slot: the second client
        // waits behind the first, whose handler panics; it must be served, not told "busy".
        let limits = Limits {
            max_active: 1,
            max_queued: 8,
            timeout: Duration::from_secs(3),
            max_handshakes_per_key: None,
            max_idle_per_key: None,
        };
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            "test",
            limits,
            crate::net::workers::PoolConfig {
                max_workers: 8,
                idle_timeout: Duration::from_secs(10),
            },
            Arc::new(Panicky),
        )
        .unwrap();
        let addr = server.local_addr();
        let mut first = client(addr);
        std::thread::sleep(Duration::from_millis(100)); // first holds the slot
        let mut second = client(addr);
        second.write_all(b"x").unwrap();
        first.write_all(b"p").unwrap();
        let mut got = Vec::new();
        let _ = second.read_to_end(&mut got);
        assert_eq!(got, b"ok", "{:?}", String::from_utf8_lossy(&got));
        // And the slot is free for the next one.
        let mut third = client(addr);
        third.write_all(b"y").unwrap();
        let mut got = Vec::new();
        let _ = third.read_to_end(&mut got);
        assert_eq!(got, b"ok");
    }
}
