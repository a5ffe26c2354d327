//! local-proxy's remote-proxies: which one a tunnel goes to (choice.rs), whether each may
//! take tunnels (health.rs, fed by a probing thread and by tunnels that failed), spare
//! connections kept open to each (warm.rs, refilled by a warmer thread), and opening a
//! tunnel with failover (connect.rs does one attempt).
//!
//! Failover is invisible to the app: a remote that refuses the connection, times out, or
//! does not answer the tunnel request is marked down and the next remote in the user's order
//! is tried. Nothing of the app's bytes has been sent then (they follow the tunnel's `ok`),
//! so a request is never sent twice. An answer from a remote (bad credentials, rate limited,
//! target refused, busy) is not a remote failure: it goes to the app as it is.

pub mod choice;
pub mod connect;
pub mod health;
pub mod warm;

use crate::config::{self, Balance};
use crate::net::hop::Hop;
use crate::proto::tunnel::{self, Reply, Request, Status};
use choice::Candidate;
use connect::TunnelError;
use health::{Change, Health, Thresholds};
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The remote-proxies of one local-proxy and their state.
#[derive(Debug)]
pub struct Upstreams {
    cfg: config::Upstreams,
    remotes: Vec<Upstream>,
    // Advanced once per tunnel, for round-robin and least-connections ties.
    turn: AtomicUsize,
    // A tunnel took a warm connection: the warmer refills (never blocks: bounded, try_send).
    warm_taken: (
        crossbeam_channel::Sender<()>,
        crossbeam_channel::Receiver<()>,
    ),
}

#[derive(Debug)]
struct Upstream {
    // As configured: the rendezvous key and the name in log lines.
    name: String,
    // Resolved at start and again at each probe, not once per tunnel.
    addrs: Mutex<Vec<SocketAddr>>,
    // TLS (and how this remote's identity is checked) or plaintext.
    link: connect::Link,
    health: Mutex<Health>,
    // Why the first round of probes found it down, for the start-up report.
    first_failure: Mutex<Option<String>>,
    // Tunnels open through this remote from this local-proxy.
    open: AtomicUsize,
    // Connections open and ready for the next tunnels.
    spares: warm::Spares,
}

/// A tunnel's hold on its remote, for least-connections: dropping it counts the tunnel
/// closed.
#[derive(Debug)]
pub struct Lease {
    upstreams: Arc<Upstreams>,
    index: usize,
}

impl Lease {
    /// The remote the tunnel went to, as configured.
    pub fn remote(&self) -> &str {
        &self.upstreams.remotes[self.index].name
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.upstreams.remotes[self.index]
            .open
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl Upstreams {
    /// The remotes of `cfg`, reached in TLS verified by `trust` (`None`: plaintext), not
    /// yet probed (each counts as up until its first probe).
    ///
    /// # Errors
    /// When a remote's TLS settings cannot be made (an unreadable CA bundle, a host name TLS
    /// cannot check).
    pub fn new(
        cfg: config::Upstreams,
        trust: Option<&crate::tls::Trust>,
    ) -> Result<Upstreams, crate::tls::Error> {
        let remotes = cfg
            .remotes
            .iter()
            .map(|name| {
                Ok(Upstream {
                    name: name.clone(),
                    addrs: Mutex::new(connect::resolve(name).unwrap_or_default()),
                    link: connect::Link::to(name, trust)?,
                    health: Mutex::new(Health::new()),
                    first_failure: Mutex::new(None),
                    open: AtomicUsize::new(0),
                    spares: warm::Spares::default(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Upstreams {
            cfg,
            remotes,
            turn: AtomicUsize::new(0),
            warm_taken: crossbeam_channel::bounded(1),
        })
    }

    fn thresholds(&self) -> Thresholds {
        Thresholds {
            rise: self.cfg.rise,
            fall: self.cfg.fall,
        }
    }

    /// Opens a tunnel for `req` on the best usable remote for its user, failing over to the
    /// next while remotes fail to answer. The reply is awaited `reply_wait` per remote.
    ///
    /// # Errors
    /// `NoRemote` when every remote is down (at once, without trying them), `Request` when
    /// `req` cannot be encoded, or the last remote's failure when all that were tried failed.
    pub fn open(
        self: &Arc<Self>,
        req: &Request,
        connect_timeout: Duration,
        reply_wait: Duration,
    ) -> Result<(Hop, Reply, Lease), TunnelError> {
        let bytes = tunnel::encode_request(req).map_err(TunnelError::Request)?;
        let order = self.order(&req.user);
        let mut last = TunnelError::NoRemote;
        // A remote that could not reach its user database refuses logins it has not seen;
        // another may reach its own: that answer is kept only in case none does.
        let mut unavailable = None;
        for (attempt, index) in order.into_iter().enumerate() {
            if attempt > 0 {
                crate::metrics::global().failovers.inc();
            }
            let up = &self.remotes[index];
            let addrs = up.addrs.lock().clone();
            up.open.fetch_add(1, Ordering::AcqRel);
            let lease = Lease {
                upstreams: Arc::clone(self),
                index,
            };
            let answer = match self.on_spare(index, &bytes, reply_wait) {
                Some(answered) => Ok(answered),
                None => connect::exchange(
                    &addrs,
                    &up.link,
                    connect::Purpose::Tunnel,
                    &bytes,
                    connect_timeout,
                    reply_wait,
                ),
            };
            match answer {
                Ok((_, reply)) if reply.status == Status::Draining => {
                    // Shutting down, not refusing the user: the next remote takes it.
                    let change = up.health.lock().probe_ok(true, self.thresholds());
                    self.note(index, change);
                    last = TunnelError::NoRemote;
                }
                Ok((stream, reply)) if reply.status == Status::Unavailable => {
                    log::debug!("remote={} cannot reach its user database; next", up.name);
                    unavailable.get_or_insert((stream, reply, lease));
                }
                Ok((stream, reply)) => {
                    if reply.status == Status::Ok {
                        crate::metrics::global()
                            .remote_tunnels
                            .get_or_create(&vec![("remote", up.name.clone())])
                            .inc();
                    }
                    return Ok((stream, reply, lease));
                }
                Err(e) => {
                    self.note(index, up.health.lock().tunnel_failed(&short(&e)));
                    last = e;
                }
            }
        }
        unavailable.ok_or(last)
    }

    /// Sends the request on one of remote `index`'s warm connections, if it has one. `None`
    /// when there is none, or when the one taken failed before it answered (the remote
    /// expired it, or restarted): the caller opens a fresh connection then, so the app never
    /// sees it. Nothing of the app's has been sent at that point.
    fn on_spare(&self, index: usize, bytes: &[u8], reply_wait: Duration) -> Option<(Hop, Reply)> {
        let up = &self.remotes[index];
        let mut hop = up.spares.take()?;
        let _ = self.warm_taken.0.try_send(());
        match connect::request_on(&mut hop, bytes, reply_wait) {
            Ok(reply) => Some((hop, reply)),
            // Whatever went wrong with a spare (closed, reset, or an answer that is not a
            // reply), a fresh connection decides: nothing of the app's has been sent, and a
            // spare's failure must not mark the remote down.
            Err(e) => {
                log::debug!(
                    "remote={} warm connection failed before answering ({e}); using a new one",
                    up.name
                );
                None
            }
        }
    }

    /// Keeps `--warm` spare connections open to each usable remote until `stop` closes:
    /// refills when a tunnel takes one, and looks again every second for ones the remote
    /// closed. Connections are opened here, never on a tunnel's path.
    pub fn keep_warm(&self, stop: crossbeam_channel::Receiver<()>) {
        const LOOK_AGAIN: Duration = Duration::from_secs(1);
        let want = self.cfg.warm;
        if want == 0 {
            return;
        }
        let timeout = self.cfg.health_timeout.max(Duration::from_secs(2));
        loop {
            for up in &self.remotes {
                if !up.health.lock().usable() {
                    up.spares.clear();
                    continue;
                }
                let addrs = up.addrs.lock().clone();
                for _ in 0..up.spares.missing(want) {
                    match warm::open(&addrs, &up.link, timeout) {
                        Ok(hop) => up.spares.put(hop),
                        Err(e) => {
                            // The health checker judges the remote; try again later.
                            log::debug!("remote={} warm connection failed: {e}", up.name);
                            break;
                        }
                    }
                }
            }
            crossbeam_channel::select! {
                recv(self.warm_taken.1) -> _ => {}
                recv(stop) -> _ => return,
                default(LOOK_AGAIN) => {}
            }
        }
    }

    /// Warm connections held to each remote now, in configured order.
    pub fn spares(&self) -> Vec<usize> {
        self.remotes.iter().map(|r| r.spares.len()).collect()
    }

    /// Checks `creds` with the remote their user's tunnels would go to (failing over like a
    /// tunnel); the remote's name and its answer.
    ///
    /// # Errors
    /// `NoRemote` when every remote is down, or the last failure of those tried.
    pub fn check(
        &self,
        creds: &config::Credentials,
    ) -> Result<(String, connect::CheckAnswer), TunnelError> {
        let mut last = TunnelError::NoRemote;
        for index in self.order(&creds.user) {
            let up = &self.remotes[index];
            let addrs = up.addrs.lock().clone();
            match connect::check(
                &addrs,
                &up.link,
                creds,
                self.cfg.health_timeout.max(Duration::from_secs(2)),
            ) {
                Ok(answer) => return Ok((up.name.clone(), answer)),
                Err(e @ TunnelError::Request(_)) => return Err(e),
                Err(e) => {
                    self.note(index, up.health.lock().tunnel_failed(&short(&e)));
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Checks `creds` with every remote, in configured order: each one's name and what it
    /// said (`local-proxy check`).
    pub fn check_each(
        &self,
        creds: &config::Credentials,
    ) -> Vec<(String, Result<connect::CheckAnswer, TunnelError>)> {
        self.remotes
            .iter()
            .map(|up| {
                let addrs = up.addrs.lock().clone();
                let t = self.cfg.health_timeout.max(Duration::from_secs(2));
                (up.name.clone(), connect::check(&addrs, &up.link, creds, t))
            })
            .collect()
    }

    /// The usable remotes for a tunnel of `user`, best first.
    fn order(&self, user: &str) -> Vec<usize> {
        let healths: Vec<bool> = self
            .remotes
            .iter()
            .map(|r| r.health.lock().usable())
            .collect();
        let candidates: Vec<Candidate<'_>> = self
            .remotes
            .iter()
            .zip(healths)
            .map(|(r, usable)| Candidate {
                name: &r.name,
                usable,
                open: r.open.load(Ordering::Acquire),
            })
            .collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        choice::order(self.cfg.balance, user, &candidates, turn)
    }

    /// Probes every remote once, all at once, and applies the answers; logs the changes
    /// when `log` (the first round at start-up is reported with [`describe`](Self::describe)
    /// after the "listening on" line instead).
    pub fn probe_all(&self, log: bool) {
        std::thread::scope(|scope| {
            for index in 0..self.remotes.len() {
                scope.spawn(move || self.probe_one(index, log));
            }
        });
    }

    fn probe_one(&self, index: usize, log: bool) {
        let up = &self.remotes[index];
        let note = |change: Option<Change>| {
            if log {
                self.note(index, change)
            } else if let Some(Change::Down { reason, .. }) = change {
                *up.first_failure.lock() = Some(reason);
            }
        };
        // Re-resolve on every probe: a name's addresses may change while we run.
        let addrs = match connect::resolve(&up.name) {
            Ok(a) => {
                *up.addrs.lock() = a.clone();
                a
            }
            Err(e) => {
                let change = up
                    .health
                    .lock()
                    .probe_failed(&format!("resolve: {e}"), self.thresholds());
                return note(change);
            }
        };
        let t = self.thresholds();
        let started = std::time::Instant::now();
        let answer = connect::probe(&addrs, &up.link, self.cfg.health_timeout);
        if answer.is_ok() {
            crate::metrics::global()
                .probe_seconds
                .get_or_create(&vec![("remote", up.name.clone())])
                .observe(started.elapsed().as_secs_f64());
        }
        let change = match answer {
            Ok(Status::Draining) => up.health.lock().probe_ok(true, t),
            // Any answer in the protocol means it is there; a version 1 server answers the
            // probe it does not know with `malformed`.
            Ok(_) | Err(TunnelError::Protocol(tunnel::Error::BadStatus(_))) => {
                up.health.lock().probe_ok(false, t)
            }
            Err(e) => up.health.lock().probe_failed(&short(&e), t),
        };
        log::debug!("remote={} probed", up.name);
        note(change);
    }

    /// Logs a state change of remote `index`.
    fn note(&self, index: usize, change: Option<Change>) {
        let name = &self.remotes[index].name;
        match change {
            Some(Change::Down { reason, failures }) => {
                if reason.contains(crate::tls::IDENTITY_CHANGED) {
                    log::error!("remote={name} down: {reason} ({failures} failures)")
                } else {
                    log::info!("remote={name} down: {reason} ({failures} failures)")
                }
            }
            Some(Change::Up { probes }) => {
                log::info!("remote={name} up after {probes} good probes")
            }
            Some(Change::Draining) => log::info!("remote={name} draining: no new tunnels"),
            Some(Change::Serving) => log::info!("remote={name} serving again"),
            None => {}
        }
    }

    /// Per remote: its name, its state (1 up, 0.5 draining, 0 down) and its tunnels open.
    pub fn states(&self) -> Vec<(String, f64, usize)> {
        self.remotes
            .iter()
            .map(|r| {
                let h = r.health.lock();
                let state = match (h.is_up(), h.usable()) {
                    (true, true) => 1.0,
                    (true, false) => 0.5,
                    _ => 0.0,
                };
                (r.name.clone(), state, r.open.load(Ordering::Relaxed))
            })
            .collect()
    }

    /// One line per remote: `remote=ADDR up` / `down: WHY` / `draining`.
    pub fn describe(&self) -> Vec<String> {
        self.remotes
            .iter()
            .map(|r| {
                let h = r.health.lock();
                let state = match (h.is_up(), h.usable()) {
                    (true, true) => "up".to_string(),
                    (true, false) => "draining".to_string(),
                    _ => match r.first_failure.lock().as_ref() {
                        Some(why) => format!("down: {why}"),
                        None => "down".to_string(),
                    },
                };
                format!("remote={} {state}", r.name)
            })
            .collect()
    }

    /// Probes every `health_interval` (plus up to a tenth of jitter, so many local-proxies
    /// do not probe in step) until `stop` is closed.
    pub fn watch(&self, stop: crossbeam_channel::Receiver<()>) {
        loop {
            let jitter = self.cfg.health_interval / 10 * (connect::random_u32() % 1000) / 1000;
            match stop.recv_timeout(self.cfg.health_interval + jitter) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => self.probe_all(true),
                _ => return,
            }
        }
    }

    /// The balancing policy in force.
    pub fn balance(&self) -> Balance {
        self.cfg.balance
    }
}

/// A failure, briefly, for a state-change log line.
fn short(e: &TunnelError) -> String {
    match e {
        TunnelError::Remote(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connect refused".into(),
            k if crate::proto::is_timeout(io) => format!("timed out ({k:?})"),
            _ => io.to_string(),
        },
        other => other.to_string(),
    }
}
