//! remote-proxy's per-connection handler: read the tunnel request, authenticate, connect to
//! the target, reply, relay through the user's bucket. Glue only; the wire format is in
//! tunnel.rs, passwords in users.rs, metering in bucket.rs and relay.rs.
//!
//! Also here: one [`SharedBucket`] per user, and the watcher thread that applies `user set`
//! and `user del` made by other processes (it polls SQLite's `data_version`).

use crate::addr::TargetAddr;
use crate::bucket::SharedBucket;
use crate::config::RemoteConfig;
use crate::relay;
use crate::server::{ConnId, Limits, Server, Workers};
use crate::tunnel::{self, Command, Reply, Request, Status};
use crate::users::{self, AuthError, Authenticator, Store};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why remote-proxy could not start.
#[derive(Debug)]
pub enum Error {
    /// The database could not be opened or migrated.
    Users(users::Error),
    /// The listen address could not be bound.
    Bind(SocketAddr, io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Users(e) => write!(f, "{e}"),
            Error::Bind(a, e) => write!(f, "cannot listen on {a}: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// Shared state of one remote-proxy.
pub struct Remote {
    cfg: RemoteConfig,
    auth: Authenticator,
    // One bucket per user who has had a tunnel, shared by all of that user's tunnels.
    buckets: Mutex<HashMap<String, Arc<SharedBucket>>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("cfg", &self.cfg).finish()
    }
}

/// Opens the database, binds, and starts serving. The returned server stops on drop.
///
/// # Errors
/// `Users` when the database cannot be opened, `Bind` when the address is taken.
pub fn start(cfg: RemoteConfig) -> Result<Server, Error> {
    let store = Store::open(&cfg.db).map_err(Error::Users)?;
    let auth = Authenticator::new(store).map_err(Error::Users)?;
    let remote = Arc::new(Remote {
        cfg: cfg.clone(),
        auth,
        buckets: Mutex::new(HashMap::new()),
    });
    let handler = {
        let remote = Arc::clone(&remote);
        Arc::new(move |s: TcpStream, id: ConnId, w: &Workers| remote.handle(s, id, w))
    };
    let limits = Limits {
        max_connections: cfg.max_connections,
    };
    let mut server = Server::bind(cfg.listen, "remote", limits, handler)
        .map_err(|e| Error::Bind(cfg.listen, e))?;
    log::info!(
        "remote-proxy listening on {} db={} signup={}",
        server.local_addr(),
        cfg.db.display(),
        if cfg.allow_signup { "on" } else { "off" }
    );
    // Dropping the sender (at shutdown) ends the watcher.
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let watcher = Arc::clone(&remote);
    std::thread::Builder::new()
        .name("remote-users".into())
        .spawn(move || watcher.watch_users(stop_rx))
        .map_err(|e| Error::Bind(cfg.listen, e))?;
    server.attach(Box::new(stop_tx));
    Ok(server)
}

impl Remote {
    fn handle(&self, stream: TcpStream, id: ConnId, workers: &Workers) {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let _ = stream.set_nodelay(true);
        if let Err(e) = stream.set_read_timeout(Some(self.cfg.timeouts.handshake)) {
            log::debug!("conn={id} peer={peer} cannot set timeout: {e}");
            return;
        }
        let req = match tunnel::read_request(&mut &stream) {
            Ok(r) => r,
            Err(e) => {
                match e.reply_status() {
                    Some(status) => {
                        log::info!("conn={id} peer={peer} rejected: {e}");
                        let _ = tunnel::write_reply(&mut &stream, &Reply::status(status));
                    }
                    None => log::debug!("conn={id} peer={peer} handshake ended: {e}"),
                }
                return;
            }
        };
        match req.command {
            Command::Signup => self.signup(&stream, id, &peer, &req),
            Command::Connect => self.connect(stream, id, &peer, req, workers),
        }
    }

    fn reply(stream: &TcpStream, status: Status) {
        let _ = tunnel::write_reply(&mut &*stream, &Reply::status(status));
    }

    fn signup(&self, stream: &TcpStream, id: ConnId, peer: &str, req: &Request) {
        if !self.cfg.allow_signup {
            log::info!("conn={id} peer={peer} signup refused: disabled");
            return Self::reply(stream, Status::SignupDisabled);
        }
        let res = self
            .auth
            .with_store(|s| s.add(&req.user, &req.password, self.cfg.signup_bandwidth));
        let status = match res {
            Ok(()) => {
                log::info!(
                    "conn={id} peer={peer} signup user={} bandwidth={}",
                    req.user,
                    self.cfg.signup_bandwidth
                );
                Status::Ok
            }
            Err(users::Error::Exists(_)) => {
                log::info!(
                    "conn={id} peer={peer} signup refused: user={} exists",
                    req.user
                );
                Status::UserExists
            }
            Err(e @ (users::Error::BadName(_) | users::Error::BadPassword(_))) => {
                log::info!("conn={id} peer={peer} signup refused: {e}");
                Status::NotAllowed
            }
            Err(e) => {
                log::error!("conn={id} signup failed: {e}");
                Status::GeneralFailure
            }
        };
        Self::reply(stream, status);
    }

    fn connect(&self, stream: TcpStream, id: ConnId, peer: &str, req: Request, workers: &Workers) {
        let Some(target) = req.target else {
            return Self::reply(&stream, Status::Malformed);
        };
        let user = match self.auth.authenticate(&req.user, &req.password) {
            Ok(u) => u,
            Err(AuthError::BadCredentials) => {
                log::info!("conn={id} peer={peer} user={} auth failed", req.user);
                return Self::reply(&stream, Status::BadCredentials);
            }
            Err(AuthError::Store(e)) => {
                log::error!("conn={id} user database failed: {e}");
                return Self::reply(&stream, Status::GeneralFailure);
            }
        };
        let bucket = self.bucket_for(&user.name, user.bandwidth);
        let upstream = match connect_target(&target, self.cfg.timeouts.connect) {
            Ok(s) => s,
            Err(e) => {
                let status = Status::for_connect_error(&e);
                log::info!(
                    "conn={id} user={} target={target} failed: {status} ({e})",
                    user.name
                );
                return Self::reply(&stream, status);
            }
        };
        let _ = upstream.set_nodelay(true);
        let mut reply = Reply::status(Status::Ok);
        if let Ok(a) = upstream.local_addr() {
            reply.bound = a;
        }
        if let Err(e) = tunnel::write_reply(&mut &stream, &reply) {
            log::debug!("conn={id} client left before the reply: {e}");
            return;
        }
        log::info!(
            "conn={id} open user={} target={target} peer={peer}",
            user.name
        );
        let started = Instant::now();
        let opts = relay::Options {
            bucket: Some(bucket),
            idle_timeout: self.cfg.timeouts.idle,
        };
        let stats = relay::relay(stream, upstream, &opts, workers);
        log::info!(
            "conn={id} close user={} target={target} up={} down={} dur={:.3}s{}",
            user.name,
            stats.up,
            stats.down,
            started.elapsed().as_secs_f64(),
            if stats.idle_closed { " idle" } else { "" }
        );
    }

    /// The user's bucket, created on first use; applies `bandwidth` (just read from the
    /// database) so a change is in force from this tunnel on.
    fn bucket_for(&self, name: &str, bandwidth: crate::rate::Bandwidth) -> Arc<SharedBucket> {
        let mut map = self.buckets.lock();
        let b = map
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(SharedBucket::new(bandwidth)));
        b.set_rate(bandwidth);
        Arc::clone(b)
    }

    /// Applies bandwidth changes and deletions made by other processes to live buckets.
    fn watch_users(&self, stop: crossbeam_channel::Receiver<()>) {
        let mut seen = self.auth.with_store(|s| s.data_version()).ok();
        loop {
            match stop.recv_timeout(self.cfg.user_poll) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let now = match self.auth.with_store(|s| s.data_version()) {
                Ok(v) => v,
                Err(e) => {
                    log::warn!("cannot poll the user database: {e}");
                    continue;
                }
            };
            if Some(now) == seen {
                continue;
            }
            seen = Some(now);
            let users = match self.auth.with_store(|s| s.list()) {
                Ok(u) => u,
                Err(e) => {
                    log::warn!("cannot reload users: {e}");
                    continue;
                }
            };
            let rates: HashMap<&str, _> = users
                .iter()
                .map(|u| (u.name.as_str(), u.bandwidth))
                .collect();
            let mut map = self.buckets.lock();
            map.retain(|name, bucket| match rates.get(name.as_str()) {
                Some(bw) => {
                    if bucket.rate() != *bw {
                        log::info!("user={name} bandwidth now {bw}");
                        bucket.set_rate(*bw);
                    }
                    true
                }
                None => {
                    log::info!("user={name} deleted; new tunnels refused");
                    false
                }
            });
            drop(map);
            self.auth.retain_cached(&|n| rates.contains_key(n));
        }
    }
}

/// Resolves and connects, trying each address in turn; the last error wins.
fn connect_target(target: &TargetAddr, timeout: Duration) -> io::Result<TcpStream> {
    let addrs = target.resolve()?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no addresses");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}
