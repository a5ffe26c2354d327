//! remote-proxy: the tunnel handler. Read the tunnel request, apply the throttles,
//! authenticate, wait for the user's cap, connect to the target, reply, relay through the
//! user's bucket.
//!
//! Glue only: the wire format is in proto/tunnel.rs, passwords in users/, metering in
//! limit/bucket.rs and net/relay/, queueing in limit/admission.rs, request rates in
//! limit/throttle.rs. Per-user live state (buckets, rate throttles, the watcher that applies
//! `user set` and `user del` from other processes) is in registry.rs.

mod accounting;
mod registry;

pub use accounting::{fleet_chunk, Accounts};
pub use registry::Registry;

use crate::config::{RemoteConfig, RemoteTls};
use crate::limit::admission::{Enter, Removed, UserGate};
use crate::limit::destinations::{canonical, Policy};
use crate::limit::throttle::{retry_after_secs, Throttle};
use crate::net::connect::{connect_any, resolve};
use crate::net::handshake::HandshakeReader;
use crate::net::hop::{Hop, HopError};
use crate::net::relay::{self, HopEnd};
use crate::net::server::{
    Accepted, ConnId, Handled, Handshake, Parked, Server, Service, StartError, Triage,
    SILENT_LINGER,
};
use crate::net::sys::{peek_now, peer_alive};
use crate::net::workers::Workers;
use crate::proto::addr::TargetAddr;
use crate::proto::tunnel::{self, Command, Reply, Request, Status, TunnelId};
use crate::proto::Shown;
use crate::tls::ALPN_HEALTH;
use crate::users::{self, AuthError, Authenticator, User};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Why remote-proxy could not start.
#[derive(Debug)]
pub enum Error {
    /// The database could not be opened or migrated.
    Users(users::Error),
    /// The listener, or a thread it needs, could not start.
    Start(StartError),
    /// The TLS identity cannot be loaded or made, or the settings are refused.
    Tls(String),
    /// The metrics endpoint or the usage flusher could not start.
    Metrics(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Users(e) => write!(f, "{e}"),
            Error::Start(e) => write!(f, "{e}"),
            Error::Tls(e) => write!(f, "{e}"),
            Error::Metrics(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

/// An authenticated tunnel waiting for one of its user's other tunnels to end.
struct AuthorizedTunnel {
    stream: Hop,
    tag: Tag,
    peer: String,
    user: User,
    target: TargetAddr,
    account: Arc<accounting::Account>,
}

/// A tunnel's place under its user's connection cap. If the tunnel panics, dropping this
/// gives the place back, so the user is not left one tunnel short for ever; a waiter that
/// would have followed on this slot is told "busy" (the slot itself is released by the
/// server's guard) rather than run outside admission.
struct UserPlace<'a> {
    remote: &'a Remote,
    user: &'a str,
    armed: bool,
}

impl Drop for UserPlace<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Some(next) = self.remote.leave_gate(self.user) {
                self.remote.busy_pending(next);
            }
        }
    }
}

/// Shared state of one remote-proxy.
pub struct Remote {
    cfg: RemoteConfig,
    // Itself, so continuations handed to the server can outlive a `&self` borrow.
    me: Weak<Remote>,
    auth: Authenticator,
    // Buckets and request-rate throttles of the users who have had tunnels.
    registry: Registry,
    // Byte counts and quotas of the users who have had tunnels.
    accounts: Arc<Accounts>,
    // Per-user tunnel caps; waiting tunnels are parked here, holding no slot or thread.
    gate: UserGate<AuthorizedTunnel>,
    // The request throttles; SIGHUP may swap them for new ones.
    throttles: parking_lot::RwLock<Arc<Throttles>>,
    // Tunnels relaying now.
    open_tunnels: std::sync::atomic::AtomicUsize,
    // Credential checks answered so far.
    credential_checks: std::sync::atomic::AtomicU64,
    // Shutting down: probes are answered "draining" and new tunnels refused with it.
    draining: std::sync::atomic::AtomicBool,
    // TLS on the hop; `None` with `--plaintext`.
    tls: Option<Arc<rustls::ServerConfig>>,
    // The identity local-proxies verify; `None` with `--plaintext`.
    identity: Option<crate::tls::Fingerprint>,
    // Where tunnels may go; its own sockets are filled in once the listener is bound.
    destinations: parking_lot::RwLock<Policy>,
    // Metrics switches (SIGHUP may change them).
    metrics_per_user: std::sync::atomic::AtomicBool,
    metrics_max_users: std::sync::atomic::AtomicUsize,
    // The settings last applied (the start's, or the last good SIGHUP's).
    applied: parking_lot::Mutex<RemoteConfig>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("cfg", &self.cfg).finish()
    }
}

/// The server's handle on a [`Remote`].
struct RemoteService(Arc<Remote>);

impl Service for RemoteService {
    fn handle(&self, conn: Accepted, workers: &Workers) -> Handled {
        self.0.handle(conn, workers)
    }

    fn first_byte_timeout(&self) -> Option<Duration> {
        Some(self.0.cfg.timeouts.first_byte)
    }

    fn expired(&self, conn: Accepted) {
        // A warm connection says close_notify, so local-proxy sees a clean end.
        if let Ok(mut hop) = resumed(conn.stream, conn.resume) {
            hop.close();
        }
    }

    fn arrival(&self, peer: SocketAddr) -> Result<(), Duration> {
        // Looked at here, so an address over its rate costs no slot and no worker; counted
        // only when a tunnel is asked for, so probes, checks and warm connections (which
        // may be accepted at the same moment as a tunnel) take nothing.
        match self
            .0
            .throttles()
            .rate_per_ip
            .as_ref()
            .and_then(|t| t.wait(&canonical(peer.ip())))
        {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    fn refuse_arrival(&self, conn: Accepted, wait: Duration) {
        let peer = conn.peer;
        let Some((mut hop, req, tag)) = self.0.read_unslotted(conn) else {
            return;
        };
        match req.command {
            // Neither opens a tunnel, so the tunnel rate does not apply to them.
            Command::Health => self.0.answer_health(hop, tag),
            Command::Check => {
                let ip = Some(canonical(peer.ip()));
                self.0.check(&mut hop, tag, &peer.to_string(), ip, &req);
                hop.close();
            }
            // A warm connection refused now is closed with the answer; local-proxy drops it.
            Command::Connect | Command::Signup | Command::Warm => {
                rate_limited(
                    &mut hop,
                    tag,
                    "rate_per_ip",
                    &format!("peer={peer} rate limited (per IP)"),
                    wait,
                );
                hop.close();
            }
        }
    }

    fn busy(&self, conn: Accepted, retry_after: u16) {
        // Read the request first: replying to unread bytes and closing would send a reset
        // that can destroy the reply before local-proxy reads it.
        if let Some((mut hop, req, tag)) = self.0.read_unslotted(conn) {
            if req.command == Command::Health {
                // A busy remote is not a dead one: probes get their answer, not "busy".
                return self.0.answer_health(hop, tag);
            }
            let reply = Reply {
                retry_after,
                ..Reply::status(Status::ServerBusy)
            };
            send(&mut hop, tag, &reply);
            log::debug!("{tag} answered server busy");
            hop.close();
        }
    }

    fn answers_unadmitted(&self, stream: &TcpStream) -> Triage {
        if self.0.tls.is_some() {
            // A probe offers its own ALPN name in the cleartext ClientHello.
            let mut hello = [0u8; 1024];
            return match peek_now(stream, &mut hello) {
                Ok(n) if n > 0 => match crate::tls::hello_offers(&hello[..n], ALPN_HEALTH) {
                    Some(true) => Triage::Answer,
                    Some(false) => Triage::Wait,
                    None if n < hello.len() => Triage::Unknown,
                    None => Triage::Wait,
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Triage::Unknown,
                _ => Triage::Wait,
            };
        }
        let mut head = [0u8; tunnel::HEALTH_PROBE_LEN];
        match peek_now(stream, &mut head) {
            Ok(n) if n == head.len() => match tunnel::read_request(&mut &head[..]) {
                Ok(req) if req.command == Command::Health => Triage::Answer,
                _ => Triage::Wait,
            },
            // Not all there yet: if what is there can still start a probe, look again later.
            Ok(n) if n > 0 && tunnel::HEALTH_PROBE_START.starts_with(&head[..n.min(4)]) => {
                Triage::Unknown
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Triage::Unknown,
            _ => Triage::Wait,
        }
    }

    fn answer_unadmitted(&self, conn: Accepted) {
        if self.0.tls.is_some() {
            if let Some((hop, req, tag)) = self.0.read_unslotted(conn) {
                if req.command == Command::Health {
                    self.0.answer_health(hop, tag);
                }
            }
            return;
        }
        let (stream, id) = (conn.stream, conn.id);
        let mut head = [0u8; tunnel::HEALTH_PROBE_LEN];
        // The probe is all there (the sweeper peeked it): take it, so the close is a FIN.
        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
        if std::io::Read::read_exact(&mut &stream, &mut head).is_ok() {
            if let Ok(req) = tunnel::read_request(&mut &head[..]) {
                self.0.answer_health(Hop::plain(stream), Tag::of(id, &req));
            }
        }
    }

    fn sweep(&self, _workers: &Workers) {
        let removed = self
            .0
            .gate
            .sweep(&mut |p: &AuthorizedTunnel| peer_alive(p.stream.socket()));
        self.0.turn_away(removed);
    }
}

/// Opens the database, binds, and starts serving. The returned server stops on drop.
///
/// # Errors
/// `Users` when the database cannot be opened, `Start` when the address is taken.
pub fn start(cfg: RemoteConfig) -> Result<Server, Error> {
    start_with_state(cfg).map(|(server, _)| server)
}

/// As [`start`], also returning the proxy's shared state, for callers that read its
/// counters (the tests).
///
/// # Errors
/// As [`start`].
pub fn start_with_state(cfg: RemoteConfig) -> Result<(Server, Arc<Remote>), Error> {
    if let RemoteTls::Plaintext { public: false } = cfg.tls {
        if !cfg.listen.ip().is_loopback() {
            return Err(Error::Tls(format!(
                "--plaintext on {}, which is not a loopback address, would send every \
                 password and byte in clear: add --plaintext-on-public if the network is \
                 trusted (a VPN link), or drop --plaintext",
                cfg.listen
            )));
        }
    }
    let loaded = cfg.tls.identity().map_err(|e| Error::Tls(e.to_string()))?;
    let (identity, made) = match loaded {
        Some((id, made)) => (Some(id), made),
        None => (None, false),
    };
    let tls = match &identity {
        Some(id) => Some(crate::tls::server_config(id).map_err(|e| Error::Tls(e.to_string()))?),
        None => None,
    };
    let store = cfg.db.open().map_err(Error::Users)?;
    let auth = Authenticator::boxed(store).map_err(Error::Users)?;
    let remote = Arc::new_cyclic(|me| Remote {
        cfg: cfg.clone(),
        me: me.clone(),
        auth,
        registry: Registry::new(),
        accounts: Arc::new(Accounts::new(cfg.db.clone())),
        gate: UserGate::new(cfg.admission.timeout, cfg.admission.max_queued),
        throttles: parking_lot::RwLock::new(Arc::new(Throttles::from_config(&cfg, None))),
        open_tunnels: std::sync::atomic::AtomicUsize::new(0),
        credential_checks: std::sync::atomic::AtomicU64::new(0),
        draining: std::sync::atomic::AtomicBool::new(false),
        tls,
        identity: identity.as_ref().map(|i| i.fingerprint),
        destinations: parking_lot::RwLock::new(Policy {
            own: vec![cfg.listen],
            ..cfg.destinations.clone()
        }),
        metrics_per_user: std::sync::atomic::AtomicBool::new(cfg.metrics.per_user),
        metrics_max_users: std::sync::atomic::AtomicUsize::new(cfg.metrics.max_users),
        applied: parking_lot::Mutex::new(cfg.clone()),
    });
    let service = Arc::new(RemoteService(Arc::clone(&remote)));
    let mut server = Server::bind(cfg.listen, "remote", cfg.admission, cfg.pool, service)
        .map_err(Error::Start)?;
    remote.destinations.write().own = own_sockets(server.local_addr());
    // Dropping the sender (at shutdown) ends the watcher.
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let watcher = Arc::clone(&remote);
    std::thread::Builder::new()
        .name("remote-users".into())
        .spawn(move || {
            let every = watcher.cfg.user_poll;
            let w = &watcher;
            registry::watch_users(&w.auth, &w.registry, &w.accounts, every, stop_rx)
        })
        .map_err(|e| Error::Start(StartError::Spawn("user watcher", e)))?;
    server.attach(Box::new(stop_tx));
    // Dropped with the server, after the accept loop: the last flush sees every byte.
    let flusher = remote
        .accounts
        .start_flusher(
            cfg.flush_interval,
            &format!("{}:{}", users::this_host(), server.local_addr().port()),
        )
        .map_err(|e| Error::Metrics(format!("cannot start the usage flusher: {e}")))?;
    server.attach(Box::new(flusher));
    let metrics_at = crate::metrics::serve_beside(&mut server, cfg.metrics.listen, |load| {
        live_metrics(Arc::downgrade(&remote), load)
    })
    .map_err(Error::Metrics)?;
    // Only now, with everything that can fail at start behind it: scripts take this line
    // (the first) to mean the server is up.
    log::info!(
        "remote-proxy listening on {} db={} signup={} max-connections={} max-queued={} \
         queue-timeout={}s rate-per-ip={} failed-login-rate={} max-handshakes-per-ip={} \
         max-idle-per-ip={} warm-idle-timeout={}s",
        server.local_addr(),
        cfg.db,
        match (cfg.allow_signup, cfg.signup_requires_invite) {
            (false, _) => "off",
            (true, false) => "on",
            (true, true) => "invite-only",
        },
        cfg.admission.max_active,
        cfg.admission.max_queued,
        cfg.admission.timeout.as_secs_f64(),
        cfg.rate_per_ip.map_or("off".into(), |r| r.to_string()),
        cfg.failed_login_rate
            .map_or("off".into(), |r| r.to_string()),
        cap_text(cfg.admission.max_handshakes_per_key),
        cap_text(cfg.admission.max_idle_per_key),
        cfg.warm_idle_timeout.as_secs_f64(),
    );
    if let Some(at) = metrics_at {
        log::info!("metrics on http://{at}/metrics");
    }
    if let (true, RemoteTls::StateDir(dir)) = (made, &cfg.tls) {
        log::info!(
            "made a new TLS identity in {} ({} and {}, owner-only)",
            dir.display(),
            crate::tls::IDENTITY_KEY,
            crate::tls::IDENTITY_CERT
        );
    }
    match &identity {
        Some(id) => log::info!("tls identity {}", id.fingerprint),
        None => log::warn!(
            "tls off (--plaintext): passwords and data cross the network in clear; use only \
             on a trusted network"
        ),
    }
    match remote.auth.with_store(|s| s.list()) {
        Ok(users) if users.is_empty() => log::warn!(
            "database {} has no users: every tunnel will be refused (add one with \
             `remote-proxy --db {} user add NAME --bandwidth RATE`)",
            cfg.db,
            cfg.db
        ),
        Ok(users) => log::info!("database {} has {} users", cfg.db, users.len()),
        Err(e) => log::warn!("cannot list users in {}: {e}", cfg.db),
    }
    Ok((server, remote))
}

/// What remote-proxy reports at each scrape, read from its state.
fn live_metrics(remote: Weak<Remote>, load: crate::net::server::Load) -> crate::metrics::Source {
    use crate::metrics::{top_users, Sample};
    Box::new(move |out: &mut Vec<Sample>| {
        let (Some(r), Some(now)) = (remote.upgrade(), load.read()) else {
            return false;
        };
        crate::metrics::server_samples(out, r.open_tunnels(), now, r.bytes_relayed());
        out.push(Sample::counter(
            "argon2_checks",
            "Password hashes verified (a cached login runs none)",
            vec![],
            r.argon2_checks() as f64,
        ));
        out.push(Sample::counter(
            "bucket_wait_seconds",
            "Time relays spent waiting for their user's bandwidth",
            vec![],
            r.registry.bucket_wait().as_secs_f64(),
        ));
        let per_user = r
            .metrics_per_user
            .load(std::sync::atomic::Ordering::Relaxed);
        if per_user {
            let cap = r
                .metrics_max_users
                .load(std::sync::atomic::Ordering::Relaxed);
            for (user, up, down) in top_users(r.accounts.user_totals(), cap) {
                for (dir, v) in [("up", up), ("down", down)] {
                    out.push(Sample::counter(
                        "user_bytes",
                        "Bytes relayed per user (the most active; the rest as user=\"other\")",
                        vec![("user", user.clone()), ("direction", dir.to_string())],
                        v as f64,
                    ));
                }
            }
        }
        true
    })
}

/// A cap for a log line: the number, or `none`.
fn cap_text(cap: Option<usize>) -> String {
    cap.map_or("none".into(), |n| n.to_string())
}

/// The sockets a tunnel must never reach, or it would loop into remote-proxy itself: the
/// listening address, and when that is the unspecified address, every address of this host
/// with the listening port.
fn own_sockets(listen: std::net::SocketAddr) -> Vec<std::net::SocketAddr> {
    let mut own = vec![listen];
    if listen.ip().is_unspecified() {
        own.push(std::net::SocketAddr::new(
            std::net::Ipv4Addr::LOCALHOST.into(),
            listen.port(),
        ));
        own.push(std::net::SocketAddr::new(
            std::net::Ipv6Addr::LOCALHOST.into(),
            listen.port(),
        ));
        if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
            for a in addrs.filter_map(|i| i.address) {
                if let Some(v4) = a.as_sockaddr_in() {
                    own.push(std::net::SocketAddr::new(v4.ip().into(), listen.port()));
                } else if let Some(v6) = a.as_sockaddr_in6() {
                    own.push(std::net::SocketAddr::new(v6.ip().into(), listen.port()));
                }
            }
        }
    }
    own
}

/// Who a reply and a log line are about: the connection, the tunnel id local-proxy gave it
/// (which local-proxy logs too), and the protocol version to answer in.
#[derive(Clone, Copy, Debug)]
struct Tag {
    conn: ConnId,
    tunnel: Option<TunnelId>,
    version: u8,
    // What was asked: a reply to a tunnel request is counted in the metrics.
    command: Command,
}

impl Tag {
    fn of(conn: ConnId, req: &Request) -> Tag {
        Tag {
            conn,
            tunnel: req.tunnel_id,
            version: req.version(),
            command: req.command,
        }
    }
}

impl std::fmt::Display for Tag {
    /// `conn=5 tunnel=9f3a1c0b00000011`, the key=value form of every log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tunnel {
            Some(t) => write!(f, "conn={} tunnel={t}", self.conn),
            None => write!(f, "conn={}", self.conn),
        }
    }
}

/// Answers a plaintext request that reached a TLS listener with a plaintext `tls required`,
/// in the request's version, without looking at its credentials. The request is read first:
/// closing on unread bytes would send a reset that can destroy the answer.
fn refuse_plaintext(stream: TcpStream, within: Duration) {
    let Ok(mut reader) = HandshakeReader::new(&stream, within.min(Duration::from_secs(2))) else {
        return;
    };
    let version = tunnel::read_request(&mut reader).map_or(tunnel::VERSION, |r| r.version());
    drop(reader);
    let reply = Reply::status(Status::TlsRequired);
    let _ = std::io::Write::write_all(&mut &stream, &tunnel::encode_reply(&reply, version));
}

/// The hop of a connection that was parked after its TLS handshake; the bare socket back
/// when there is none to resume (a new connection, or a plaintext one).
fn resumed(
    stream: TcpStream,
    resume: Option<Box<dyn std::any::Any + Send>>,
) -> Result<Hop, TcpStream> {
    match resume.map(|r| r.downcast::<Box<rustls::Connection>>()) {
        Some(Ok(tls)) => Ok(Hop::from_parts(stream, Some(*tls))),
        _ => Err(stream),
    }
}

/// Answers a request that could not be read: in this build's version.
fn reply_unread(stream: &mut Hop, status: Status) {
    let _ = stream.send(&tunnel::encode_reply(
        &Reply::status(status),
        tunnel::VERSION,
    ));
}

fn reply(stream: &mut Hop, tag: Tag, status: Status) {
    send(stream, tag, &Reply::status(status));
}

/// Every answer to a tunnel request goes through here, so each is counted by outcome.
fn send(stream: &mut Hop, tag: Tag, r: &Reply) {
    if tag.command == Command::Connect {
        crate::metrics::global().tunnel(crate::metrics::outcome(r.status));
    }
    let _ = stream.send(&tunnel::encode_reply(r, tag.version));
}

/// Answers "rate limited" with the wait, and logs and counts which limit and when to retry.
fn rate_limited(stream: &mut Hop, tag: Tag, limit: &'static str, why: &str, wait: Duration) {
    crate::metrics::global().throttle(limit);
    log::info!("{tag} {why}; retry in {}s", retry_after_secs(wait));
    reply_wait(stream, tag, Status::RateLimited, wait);
}

fn reply_wait(stream: &mut Hop, tag: Tag, status: Status, wait: Duration) {
    let r = Reply {
        retry_after: retry_after_secs(wait),
        ..Reply::status(status)
    };
    send(stream, tag, &r);
}

/// remote-proxy's request throttles, replaced as a whole when SIGHUP changes a rate (a
/// throttle whose rate did not change is kept, with what it has counted).
struct Throttles {
    // New tunnels per client IP (`--rate-per-ip`).
    rate_per_ip: Option<Arc<Throttle<IpAddr>>>,
    // Failed logins per client IP and user name, and per client IP over all names; each
    // login reserves a failure before hashing and gives it back on success, so concurrent
    // guesses cannot all get a check in before the first one fails.
    failed_login: Option<Arc<Throttle<(IpAddr, String)>>>,
    failed_login_per_ip: Option<Arc<Throttle<IpAddr>>>,
    // Signups per client IP.
    signup: Option<Arc<Throttle<IpAddr>>>,
}

impl Throttles {
    /// The throttles `cfg` asks for, keeping those of `old` whose rate is the same.
    fn from_config(cfg: &RemoteConfig, old: Option<&Throttles>) -> Throttles {
        fn keep<K: std::hash::Hash + Eq + Clone>(
            rate: Option<crate::limit::rate::RequestRate>,
            old: Option<&Option<Arc<Throttle<K>>>>,
        ) -> Option<Arc<Throttle<K>>> {
            let rate = rate?;
            match old.and_then(|o| o.as_ref()) {
                Some(t) if t.rate() == rate => Some(Arc::clone(t)),
                _ => Some(Arc::new(Throttle::new(rate))),
            }
        }
        Throttles {
            rate_per_ip: keep(cfg.rate_per_ip, old.map(|o| &o.rate_per_ip)),
            failed_login: keep(cfg.failed_login_rate, old.map(|o| &o.failed_login)),
            failed_login_per_ip: keep(
                cfg.failed_login_rate_per_ip,
                old.map(|o| &o.failed_login_per_ip),
            ),
            signup: keep(cfg.signup_rate, old.map(|o| &o.signup)),
        }
    }
}

impl Remote {
    /// Applies the settings that can change while tunnels run (SIGHUP): the destination
    /// policy, the throttles and the metrics switches. Open tunnels are not touched; the
    /// next tunnel request sees the new settings. Returns one line per change, and one per
    /// setting that differs but only takes effect after a restart.
    pub fn reload(&self, new: RemoteConfig) -> Vec<String> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut said = Vec::new();
        let mut old = self.applied.lock();
        if new.destinations != old.destinations {
            let mut policy = self.destinations.write();
            let own = std::mem::take(&mut policy.own);
            *policy = Policy {
                own,
                ..new.destinations.clone()
            };
            said.push(format!(
                "destination policy now allow={:?} deny={:?} deny-port={:?}",
                new.destinations
                    .allow
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>(),
                new.destinations
                    .deny
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>(),
                new.destinations.deny_ports
            ));
        }
        let rate = |r: Option<crate::limit::rate::RequestRate>| {
            r.map_or("off".to_string(), |r| r.to_string())
        };
        for (name, was, now) in [
            ("rate-per-ip", old.rate_per_ip, new.rate_per_ip),
            (
                "failed-login-rate",
                old.failed_login_rate,
                new.failed_login_rate,
            ),
            (
                "failed-login-rate-per-ip",
                old.failed_login_rate_per_ip,
                new.failed_login_rate_per_ip,
            ),
            ("signup-rate", old.signup_rate, new.signup_rate),
        ] {
            if was != now {
                said.push(format!("{name} now {} (was {})", rate(now), rate(was)));
            }
        }
        let throttles = Throttles::from_config(&new, Some(&self.throttles()));
        *self.throttles.write() = Arc::new(throttles);
        if new.metrics.per_user != old.metrics.per_user {
            self.metrics_per_user.store(new.metrics.per_user, Relaxed);
            said.push(format!("metrics-per-user now {}", new.metrics.per_user));
        }
        if new.metrics.max_users != old.metrics.max_users {
            self.metrics_max_users.store(new.metrics.max_users, Relaxed);
            said.push(format!("metrics-max-users now {}", new.metrics.max_users));
        }
        let start = &self.cfg;
        for (name, differs) in [
            ("listen", new.listen != start.listen),
            ("db", new.db != start.db),
            ("tls settings", new.tls != start.tls),
            (
                "max-connections, max-queued or queue-timeout",
                new.admission != start.admission,
            ),
            ("timeouts", new.timeouts != start.timeouts),
            ("worker pool", new.pool != start.pool),
            ("metrics-listen", new.metrics.listen != start.metrics.listen),
            ("flush-interval", new.flush_interval != start.flush_interval),
            (
                "signup settings",
                (
                    new.allow_signup,
                    new.signup_bandwidth,
                    new.max_users,
                    new.signup_requires_invite,
                ) != (
                    start.allow_signup,
                    start.signup_bandwidth,
                    start.max_users,
                    start.signup_requires_invite,
                ),
            ),
            (
                "warm-idle-timeout",
                new.warm_idle_timeout != start.warm_idle_timeout,
            ),
        ] {
            if differs {
                said.push(format!(
                    "{name}: changed in the settings, applies after a restart"
                ));
            }
        }
        *old = new;
        said
    }

    /// The throttles in force now.
    fn throttles(&self) -> Arc<Throttles> {
        Arc::clone(&self.throttles.read())
    }

    /// argon2 checks run so far: a login answered from the verification cache, or refused
    /// by the failed-login throttle, runs none.
    pub fn argon2_checks(&self) -> u64 {
        self.auth.argon2_checks()
    }

    /// Bytes (up, down) relayed for all users since start, as counted while they moved.
    pub fn bytes_relayed(&self) -> (u64, u64) {
        self.accounts.totals()
    }

    /// The TLS identity local-proxies verify (`None` with `--plaintext`).
    pub fn identity(&self) -> Option<crate::tls::Fingerprint> {
        self.identity
    }

    /// Starts the graceful shutdown: from now on health probes are answered `draining`, so
    /// local-proxies send new tunnels elsewhere, and a tunnel request that still comes is
    /// refused with `draining` (local-proxy then tries its next remote). Open tunnels run on.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Credential checks (docs/protocol.md §2.2) answered so far.
    pub fn credential_checks(&self) -> u64 {
        self.credential_checks
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tunnels relaying now.
    pub fn open_tunnels(&self) -> usize {
        self.open_tunnels.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reads the request of a connection answered without a slot (on a short job, so with a
    /// short deadline): the TLS handshake, then the request.
    fn read_unslotted(&self, conn: Accepted) -> Option<(Hop, Request, Tag)> {
        let Accepted {
            stream,
            id,
            peer,
            resume,
            ..
        } = conn;
        let within = self.cfg.timeouts.handshake.min(Duration::from_secs(2));
        let mut hop = match resumed(stream, resume) {
            Ok(hop) => hop,
            Err(stream) => self.open_hop(stream, id, &peer.to_string(), within, within)?,
        };
        let req = hop
            .io(within)
            .map(|mut io| tunnel::read_request(&mut io))
            .ok()?
            .ok()?;
        let tag = Tag::of(id, &req);
        Some((hop, req, tag))
    }

    fn handle(&self, conn: Accepted, workers: &Workers) -> Handled {
        let conn = match conn.unless_silent(self.cfg.timeouts.silence()) {
            Ok(conn) => conn,
            Err(parked) => return parked,
        };
        // The socket's first byte is due within the first-byte timeout of the accept, time
        // spent queued included; after a TLS handshake, the request's within that timeout.
        let first_byte = conn.first_byte_left(self.cfg.timeouts.first_byte);
        let Accepted {
            stream,
            id,
            peer: peer_addr,
            accepted_at,
            handshake,
            resume,
            ..
        } = conn;
        let peer = peer_addr.to_string();
        let _ = stream.set_nodelay(true);
        // One deadline for the TLS handshake and the tunnel request together.
        let until = Instant::now() + self.cfg.timeouts.handshake;
        let within = self.cfg.timeouts.handshake;
        let hop = match resumed(stream, resume) {
            Ok(hop) => Some(hop),
            Err(stream) => self.open_hop(stream, id, &peer, first_byte, within),
        };
        let Some(mut stream) = hop else {
            return Handled::SlotFree;
        };
        let left = until.saturating_duration_since(Instant::now());
        let first_byte = match self.tls {
            Some(_) => self.cfg.timeouts.first_byte,
            None => first_byte,
        };
        let Some(mut req) = self.read_request(&mut stream, id, &peer, first_byte, left) else {
            return Handled::SlotFree;
        };
        // A warm connection taken as soon as it was made: its real request may be read
        // already, into TLS's buffer, where no readiness would ever wake a parked socket;
        // or it comes within a moment (a busy local-proxy takes spares as fast as it makes
        // them), and is read on this worker, saving the parking thread's two wake-ups.
        while req.command == Command::Warm
            && (stream.has_buffered_input()
                || crate::net::sys::readable_within(stream.socket(), SILENT_LINGER))
        {
            let left = until.saturating_duration_since(Instant::now());
            let Some(next) = self.read_request(&mut stream, id, &peer, first_byte, left) else {
                return Handled::SlotFree;
            };
            req = next;
        }
        let tag = Tag::of(id, &req);
        let ip = Some(canonical(peer_addr.ip()));
        if req.command == Command::Warm {
            // A local-proxy's spare connection: it waits without a worker, a slot or a
            // place under the address's tunnel rate, until its real request comes.
            let (stream, tls) = stream.into_parts();
            return Handled::Park(Parked {
                stream,
                id,
                peer: peer_addr,
                accepted_at,
                resume: tls.map(|t| Box::new(t) as Box<dyn std::any::Any + Send>),
                until: Instant::now() + self.cfg.warm_idle_timeout,
            });
        }
        if req.command == Command::Health {
            // Before every throttle: a probe counts against no address's or user's limits.
            self.answer_health(stream, tag);
            return Handled::SlotFree;
        }
        if req.command == Command::Check {
            // A check opens no tunnel, so the per-IP tunnel rate does not apply; it is a
            // login, so the failed-login lockout does.
            self.check(&mut stream, tag, &peer, ip, &req);
            stream.close();
            return Handled::SlotFree;
        }
        if self.is_draining() {
            log::info!("{tag} peer={peer} refused: draining");
            reply(&mut stream, tag, Status::Draining);
            return Handled::SlotFree;
        }
        if let (Some(t), Some(ip)) = (&self.throttles().rate_per_ip, ip) {
            // Counted now; a burst accepted together may find the rate used up meanwhile.
            if let Err(wait) = t.check(&ip) {
                let why = format!("peer={peer} rate limited (per IP)");
                rate_limited(&mut stream, tag, "rate_per_ip", &why, wait);
                return Handled::SlotFree;
            }
        }
        match req.command {
            Command::Signup => {
                self.signup(&mut stream, tag, &peer, ip, &req);
                stream.close();
                Handled::SlotFree
            }
            // Answered above.
            Command::Health | Command::Check | Command::Warm => Handled::SlotFree,
            Command::Connect => self.connect(stream, tag, peer_addr, req, handshake, workers),
        }
    }

    /// The hop on an admitted connection: the TLS handshake within `within`, or, with
    /// `--plaintext`, the socket as it is. A client speaking the other mode is answered in
    /// its own (a plaintext request gets a plaintext `tls required`, unread) and logged.
    fn open_hop(
        &self,
        stream: TcpStream,
        id: ConnId,
        peer: &str,
        first_byte: Duration,
        within: Duration,
    ) -> Option<Hop> {
        let Some(cfg) = &self.tls else {
            return Some(Hop::plain(stream));
        };
        match Hop::accept(stream, cfg, first_byte, within) {
            Ok(hop) => Some(hop),
            Err((stream, HopError::PlaintextPeer)) => {
                log::warn!(
                    "conn={id} peer={peer} refused: plaintext tunnel request on a TLS listener \
                     (that local-proxy runs with --plaintext; this remote-proxy requires TLS)"
                );
                refuse_plaintext(stream, within);
                None
            }
            Err((_, HopError::Io(e))) => {
                log::debug!("conn={id} peer={peer} TLS handshake ended: {e}");
                None
            }
            Err((_, e)) => {
                log::info!("conn={id} peer={peer} TLS handshake failed: {e}");
                None
            }
        }
    }

    /// Answers a health probe: `ok`, or `draining` while shutting down.
    fn answer_health(&self, mut stream: Hop, tag: Tag) {
        log::debug!("{tag} health probe");
        let status = if self.is_draining() {
            Status::Draining
        } else {
            Status::Ok
        };
        reply(&mut stream, tag, status);
        stream.close();
    }

    /// Reads the tunnel request within `within`; a bad one is answered and logged here. Not
    /// inlined: the plaintext reader's peek buffer lives in this frame, which is gone before
    /// the relay runs, so a tunnel's thread touches one stack page fewer for its whole life
    /// (docs/benchmarks.md).
    #[inline(never)]
    fn read_request(
        &self,
        stream: &mut Hop,
        id: ConnId,
        peer: &str,
        first_byte: Duration,
        within: Duration,
    ) -> Option<Request> {
        let read = match stream.io_first(first_byte, within) {
            Ok(mut io) => tunnel::read_request(&mut io),
            Err(e) => {
                log::debug!("conn={id} peer={peer} cannot set timeout: {e}");
                return None;
            }
        };
        match read {
            Ok(r) => Some(r),
            Err(tunnel::Error::TlsHandshake) => {
                log::warn!(
                    "conn={id} peer={peer} refused: TLS handshake on a --plaintext listener \
                     (that local-proxy uses TLS; start both with --plaintext, or neither)"
                );
                reply_unread(stream, Status::Malformed);
                None
            }
            Err(e) => {
                match e.reply_status() {
                    Some(status) => {
                        log::info!("conn={id} peer={peer} rejected: {e}");
                        reply_unread(stream, status);
                        stream.close();
                    }
                    None => log::debug!("conn={id} peer={peer} handshake ended: {e}"),
                }
                None
            }
        }
    }

    /// Checks the request's credentials. A failure is reserved before the hash, for the
    /// address and user name and (looser) for the address, and given back on success: past
    /// either allowance the login is refused without hashing, concurrent guesses included.
    /// A refusal is answered and logged here; `None` then.
    fn login(
        &self,
        stream: &mut Hop,
        tag: Tag,
        peer: &str,
        ip: Option<IpAddr>,
        req: &Request,
    ) -> Option<User> {
        let name = Shown(&req.user);
        let key = ip.map(|ip| (ip, req.user.clone()));
        // Read once, for the fast path and the slow check alike.
        let looked = match self.auth.look_up(&req.user, &req.password) {
            Ok(l) => l,
            Err(e) => {
                // The authenticator logs an outage once; this is one login of many.
                log::debug!("{tag} user={name} refused: {e}");
                reply(stream, tag, Status::Unavailable);
                return None;
            }
        };
        // A password verified before needs no failure reserved, so a burst of one user's
        // tunnels is not taken for a burst of guesses. Only while not locked out: during a
        // lockout every login is refused unchecked, or a cached password would tell a
        // guesser which guess was right, at no cost to them.
        let th = self.throttles();
        let locked = th
            .failed_login
            .as_ref()
            .zip(key.as_ref())
            .is_some_and(|(t, k)| t.wait(k).is_some())
            || th
                .failed_login_per_ip
                .as_ref()
                .zip(ip)
                .is_some_and(|(t, ip)| t.wait(&ip).is_some());
        if !locked {
            if let Some(user) = looked.cached_user() {
                return Some(user.clone());
            }
        }
        let user_place = match (&th.failed_login, &key) {
            (Some(t), Some(k)) => match t.reserve(k) {
                Ok(at) => Some((t, at)),
                Err(wait) => {
                    let why =
                        format!("peer={peer} user={name} too many failed logins for this user");
                    self.throttled_login(stream, tag, &why, wait);
                    return None;
                }
            },
            _ => None,
        };
        let ip_place = match (&th.failed_login_per_ip, ip) {
            (Some(t), Some(ip)) => match t.reserve(&ip) {
                Ok(at) => Some((t, ip, at)),
                Err(wait) => {
                    if let (Some((t, at)), Some(k)) = (user_place, &key) {
                        t.refund(k, at);
                    }
                    let why =
                        format!("peer={peer} user={name} too many failed logins from this address");
                    self.throttled_login(stream, tag, &why, wait);
                    return None;
                }
            },
            _ => None,
        };
        let refund = || {
            if let (Some((t, at)), Some(k)) = (user_place, &key) {
                t.refund(k, at);
            }
            if let Some((t, ip, at)) = ip_place {
                t.refund(&ip, at);
            }
        };
        match self.auth.verify(&req.user, &req.password, looked) {
            Ok(u) => {
                refund();
                Some(u)
            }
            Err(AuthError::BadCredentials) => {
                crate::metrics::global().failed_logins.inc();
                log::info!("{tag} peer={peer} user={name} auth failed");
                reply(stream, tag, Status::BadCredentials);
                None
            }
            Err(AuthError::Store(e)) => {
                refund();
                log::debug!("{tag} user={name} refused: user database failed: {e}");
                reply(stream, tag, Status::Unavailable);
                None
            }
        }
    }

    /// Answers a login refused unchecked after too many failures, with when to retry.
    fn throttled_login(&self, stream: &mut Hop, tag: Tag, why: &str, wait: Duration) {
        crate::metrics::global().throttle("failed_logins");
        log::info!(
            "{tag} {why}; login refused unchecked, retry in {}s",
            retry_after_secs(wait)
        );
        reply_wait(stream, tag, Status::TooManyFailedLogins, wait);
    }

    /// Answers a credential check (docs/protocol.md §2.2) like a login: refused unchecked
    /// while the address is locked out, and a failure counts towards the lockout.
    fn check(&self, stream: &mut Hop, tag: Tag, peer: &str, ip: Option<IpAddr>, req: &Request) {
        self.credential_checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(user) = self.login(stream, tag, peer, ip, req) else {
            return;
        };
        log::info!(
            "{tag} peer={peer} user={} credentials checked: ok",
            user.name
        );
        let mut answer = tunnel::encode_reply(&Reply::status(Status::Ok), tag.version);
        answer.extend_from_slice(&tunnel::encode_check_bandwidth(user.bandwidth.limit()));
        let _ = stream.send(&answer);
    }

    fn signup(&self, stream: &mut Hop, tag: Tag, peer: &str, ip: Option<IpAddr>, req: &Request) {
        if !self.cfg.allow_signup {
            log::info!("{tag} peer={peer} signup refused: disabled");
            return reply(stream, tag, Status::SignupDisabled);
        }
        if let (Some(t), Some(ip)) = (&self.throttles().signup, ip) {
            if let Err(wait) = t.check(&ip) {
                let why = format!("peer={peer} signup rate limited (per IP)");
                return rate_limited(stream, tag, "signup_rate", &why, wait);
            }
        }
        if let Some(max) = self.cfg.max_users {
            let count = self.cfg.db.open().and_then(|s| s.list().map(|u| u.len()));
            if count.is_ok_and(|n| n >= max as usize) {
                log::warn!("{tag} peer={peer} signup refused: --max-users {max} reached");
                return reply(stream, tag, Status::NotAllowed);
            }
        }
        // The token is a secret: log lines name an invite by its id, never by the token.
        let invite = req.invite.as_deref().map(users::invites::token_hash);
        let invite_id = invite.as_deref().map(users::invites::id_of);
        if self.cfg.signup_requires_invite && invite.is_none() {
            log::info!("{tag} peer={peer} signup refused: no invite token (one is required)");
            return reply(stream, tag, Status::InviteRequired);
        }
        // Hash before taking the store lock: argon2 takes tens of milliseconds, and every
        // tunnel's authentication needs that lock. The hash runs in the logins' bounded
        // working memory, so a signup burst cannot take hundreds of MiB.
        let res = users::validate_name(&req.user)
            .and_then(|()| users::validate_password(&req.password))
            .and_then(|()| self.auth.hash_new(&req.password))
            // On a connection of its own: a write that waits for a locked database (a CLI
            // `user set` in progress) must not hold the store every login goes through.
            .and_then(|hash| {
                let bandwidth = self.cfg.signup_bandwidth;
                self.cfg.db.open().and_then(|s| match &invite {
                    Some(token) => s.add_hashed_invited(&req.user, &hash, bandwidth, token),
                    None => s.add_hashed(&req.user, &hash, bandwidth),
                })
            });
        let status = match res {
            Ok(()) => {
                log::info!(
                    "{tag} peer={peer} signup user={} bandwidth={}{}",
                    req.user,
                    self.cfg.signup_bandwidth,
                    invite_id.map_or(String::new(), |id| format!(" invite={id}"))
                );
                Status::Ok
            }
            Err(users::Error::Invite(why)) => {
                log::info!(
                    "{tag} peer={peer} signup refused: {why} (invite={})",
                    invite_id.as_deref().unwrap_or("?")
                );
                Status::InviteRequired
            }
            Err(users::Error::Exists(_)) => {
                log::info!(
                    "{tag} peer={peer} signup refused: user={} exists",
                    Shown(&req.user)
                );
                Status::UserExists
            }
            Err(e @ (users::Error::BadName(_) | users::Error::BadPassword(_))) => {
                log::info!("{tag} peer={peer} signup refused: {e}");
                Status::NotAllowed
            }
            Err(e) => {
                log::error!("{tag} signup failed: {e}");
                Status::GeneralFailure
            }
        };
        reply(stream, tag, status);
    }

    fn connect(
        &self,
        mut stream: Hop,
        tag: Tag,
        peer_addr: SocketAddr,
        req: Request,
        handshake: Handshake,
        workers: &Workers,
    ) -> Handled {
        let (peer, ip) = (peer_addr.to_string(), Some(canonical(peer_addr.ip())));
        let Some(target) = req.target.clone() else {
            reply(&mut stream, tag, Status::Malformed);
            return Handled::SlotFree;
        };
        let Some(user) = self.login(&mut stream, tag, &peer, ip, &req) else {
            return Handled::SlotFree;
        };
        // Authenticated: from here the tunnel counts against its user, not its address.
        handshake.over();
        // The store (and its lock) only for a user's first tunnel.
        let account = self
            .accounts
            .existing(&user.name)
            .unwrap_or_else(|| self.auth.with_store(|s| self.accounts.account(&user, s)));
        if account.used_up() {
            self.quota_exceeded(&mut stream, tag, &user.name, &account);
            return Handled::SlotFree;
        }
        if let Some(rate) = user.rate {
            if let Err(wait) = self.registry.check_rate(&user.name, rate) {
                let why = format!("user={} rate limited ({rate})", user.name);
                rate_limited(&mut stream, tag, "user_rate", &why, wait);
                return Handled::SlotFree;
            }
        }
        let cap = user.max_connections.map(|c| c as usize);
        let pending = AuthorizedTunnel {
            stream,
            tag,
            peer,
            user,
            target,
            account,
        };
        let name = pending.user.name.clone();
        match self.gate.enter(&name, cap, pending) {
            Enter::Go(p) => self.run(p, workers),
            Enter::Parked => {
                log::debug!("{tag} user={name} at its connection cap; waiting");
                Handled::SlotFree
            }
            Enter::Full(p) => {
                log::info!("{tag} user={name} server busy: too many tunnels waiting");
                self.busy_pending(p);
                Handled::SlotFree
            }
        }
    }

    /// Connects and relays a tunnel that has its user's permission; when it ends, hands its
    /// place to the user's next waiting tunnel, if any.
    fn run(&self, p: AuthorizedTunnel, workers: &Workers) -> Handled {
        let name = p.user.name.clone();
        let mut place = UserPlace {
            remote: self,
            user: &name,
            armed: true,
        };
        self.tunnel(p, workers);
        place.armed = false;
        let next = self.leave_gate(&name);
        match (next, self.me.upgrade()) {
            (Some(p), Some(me)) => {
                log::debug!("{} user={name} resumed", p.tag);
                Handled::ResumeOnSlot(Box::new(move |w: &Workers| me.run(p, w)))
            }
            _ => Handled::SlotFree,
        }
    }

    fn tunnel(&self, p: AuthorizedTunnel, workers: &Workers) {
        let AuthorizedTunnel {
            mut stream,
            tag,
            peer,
            user,
            target,
            account,
        } = p;
        // Looked at again: the quota may have run out while this tunnel waited for its cap.
        if account.used_up() {
            return self.quota_exceeded(&mut stream, tag, &user.name, &account);
        }
        let bucket = self.registry.bucket_for(&user.name, user.bandwidth);
        let upstream = match self.open_target(&target) {
            Ok(s) => s,
            Err((status, why)) => {
                log::info!("{tag} user={} target={target} {why}", user.name);
                return reply(&mut stream, tag, status);
            }
        };
        let _ = upstream.set_nodelay(true);
        let mut ok = Reply::status(Status::Ok);
        if let Ok(a) = upstream.local_addr() {
            ok.bound = a;
        }
        crate::metrics::global().tunnel("ok");
        if let Err(e) = stream.send(&tunnel::encode_reply(&ok, tag.version)) {
            log::debug!("{tag} client left before the reply: {e}");
            return;
        }
        log::info!("{tag} open user={} target={target} peer={peer}", user.name);
        let started = Instant::now();
        let opts = relay::Options {
            bucket: Some(bucket),
            idle_timeout: self.cfg.timeouts.idle,
            meter: Some(Arc::clone(account.meter())),
        };
        use std::sync::atomic::Ordering::AcqRel;
        self.open_tunnels.fetch_add(1, AcqRel);
        let open = self.accounts.open(&account, stream.socket(), &upstream);
        let stats = relay::relay_hop(stream, HopEnd::Client, upstream, &opts, workers);
        drop(open);
        self.open_tunnels.fetch_sub(1, AcqRel);
        log::info!(
            "{tag} close user={} target={target} up={} down={} dur={:.3}s{}",
            user.name,
            stats.up,
            stats.down,
            started.elapsed().as_secs_f64(),
            match (stats.idle_closed, stats.quota_closed) {
                (true, _) => " idle",
                (_, true) if account.deleted() => " user deleted",
                (_, true) => " quota used up",
                _ => "",
            }
        );
    }

    /// Connects to a tunnel's target: resolved once, and only the addresses the destination
    /// policy passes are tried, in the resolver's order. A failure is the status to answer
    /// and what to log.
    fn open_target(&self, target: &TargetAddr) -> Result<TcpStream, (Status, String)> {
        let failed = |e: std::io::Error| {
            let status = Status::for_connect_error(&e);
            (status, format!("failed: {status} ({e})"))
        };
        let addrs = resolve(target).map_err(failed)?;
        let allowed = self.destinations.read().filter(&addrs);
        let addrs = allowed.map_err(|rule| {
            (
                Status::NotAllowed,
                format!("refused: destination not allowed ({rule})"),
            )
        })?;
        connect_any(&addrs, self.cfg.timeouts.connect).map_err(failed)
    }

    /// Answers `quota exceeded` with when the quota resets, and logs it.
    fn quota_exceeded(
        &self,
        stream: &mut Hop,
        tag: Tag,
        user: &str,
        account: &accounting::Account,
    ) {
        let resets_at = account
            .resets_at(crate::limit::calendar::unix_now())
            .unwrap_or(0);
        log::info!(
            "{tag} user={user} refused: quota exceeded; resets at {} UTC",
            crate::limit::calendar::timestamp(resets_at)
        );
        send(
            stream,
            tag,
            &Reply {
                resets_at,
                ..Reply::status(Status::QuotaExceeded)
            },
        );
    }

    /// One of `user`'s tunnels ended: its place passes to the user's next live waiter.
    fn leave_gate(&self, user: &str) -> Option<AuthorizedTunnel> {
        let mut removed = Removed::default();
        let next = self.gate.exit(
            user,
            &mut |w: &AuthorizedTunnel| peer_alive(w.stream.socket()),
            &mut removed,
        );
        self.turn_away(removed);
        next
    }

    fn busy_pending(&self, mut p: AuthorizedTunnel) {
        let _ = p
            .stream
            .socket()
            .set_write_timeout(Some(Duration::from_secs(2)));
        reply_wait(
            &mut p.stream,
            p.tag,
            Status::ServerBusy,
            self.cfg.admission.timeout,
        );
    }

    fn turn_away(&self, removed: Removed<AuthorizedTunnel>) {
        for p in removed.gone {
            log::debug!("{} user={} left while waiting", p.tag, p.user.name);
        }
        for p in removed.expired {
            log::info!(
                "{} user={} server busy: waited too long for the user's cap",
                p.tag,
                p.user.name
            );
            self.busy_pending(p);
        }
    }
}
