//! local-proxy's per-connection handler: tell SOCKS5 from HTTP by the first byte, run that
//! handshake, open a tunnel to remote-proxy, answer the app in its own protocol, relay.
//! Glue only: parsing lives in proto/ (socks5.rs, http.rs, tunnel.rs), the connection to
//! remote-proxies in upstreams/, the choice of reply codes in refusal.rs.

pub mod logins;
mod refusal;
pub mod upstreams;

pub use refusal::Refusal;
pub use upstreams::connect::{open_tunnel, signup, TunnelError};
pub use upstreams::{Lease, Upstreams};

use crate::config::{Credentials, LocalConfig};
use crate::net::handshake::HandshakeReader;
use crate::net::hop::Hop;
use crate::net::relay;
use crate::net::server::{Accepted, ConnId, Handled, Server, Service, StartError};
use crate::net::workers::Workers;
use crate::proto::addr::TargetAddr;
use crate::proto::http::{self, ProxyRequest};
use crate::proto::socks5::{self, Method};
use crate::proto::tunnel::{Command, Reply, Request, Status, TunnelId};
use crate::proto::Shown;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shared state of one local-proxy.
#[derive(Debug)]
pub struct Local {
    cfg: LocalConfig,
    // Random high half of this process's tunnel ids; the low half is the connection id, so
    // ids from different local-proxies do not collide in a remote-proxy's log.
    tunnel_prefix: u32,
    // The remote-proxies, their health, and the balancing policy.
    upstreams: Arc<Upstreams>,
    // App credentials checked with a remote during RFC 1929, remembered briefly.
    logins: logins::Logins,
    // Bytes relayed, counted as they move (for the metrics).
    meter: Arc<crate::limit::meter::Meter>,
    // Tunnels relaying now.
    open_tunnels: std::sync::atomic::AtomicUsize,
}

/// Why local-proxy could not start.
#[derive(Debug)]
pub enum Error {
    /// The TLS settings cannot be used (an unreadable CA bundle or known-remotes file).
    Tls(crate::tls::Error),
    /// The listener, or a thread it needs, could not start.
    Start(StartError),
    /// The metrics endpoint could not start.
    Metrics(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Tls(e) => write!(f, "{e}"),
            Error::Start(e) => write!(f, "{e}"),
            Error::Metrics(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

/// Binds and starts serving. The returned server stops on drop.
///
/// # Errors
/// The bind error, naming the address, or a thread that could not start.
pub fn start(cfg: LocalConfig) -> Result<Server, Error> {
    let trust = cfg.tls.trust().map_err(Error::Tls)?;
    let upstreams =
        Arc::new(Upstreams::new(cfg.upstreams.clone(), trust.as_ref()).map_err(Error::Tls)?);
    // The first round of probes runs before any tunnel, so a remote that is down at start
    // gets none; its result is logged after the "listening on" line, which stays first.
    upstreams.probe_all(false);
    let local = Arc::new(Local {
        cfg: cfg.clone(),
        tunnel_prefix: upstreams::connect::random_u32(),
        upstreams: Arc::clone(&upstreams),
        logins: logins::Logins::new(),
        meter: Arc::new(crate::limit::meter::Meter::default()),
        open_tunnels: std::sync::atomic::AtomicUsize::new(0),
    });
    let weak = Arc::downgrade(&local);
    let mut server =
        Server::bind(cfg.listen, "local", cfg.admission, cfg.pool, local).map_err(Error::Start)?;
    // Bound before the "listening on" line, so that line means everything that can fail at
    // start has not.
    let metrics_at =
        crate::metrics::serve_beside(&mut server, cfg.metrics, |load| live_metrics(weak, load))
            .map_err(Error::Metrics)?;
    log::info!(
        "local-proxy listening on {} remotes={} balance={} warm={} tls={} user={}",
        server.local_addr(),
        cfg.upstreams.remotes.join(","),
        cfg.upstreams.balance,
        cfg.upstreams.warm,
        trust
            .as_ref()
            .map_or("off (plaintext)".into(), |t| t.describe()),
        cfg.credentials
            .as_ref()
            .map_or("(from app)", |c| c.user.as_str())
    );
    if let Some(at) = metrics_at {
        log::info!("metrics on http://{at}/metrics");
    }
    for line in upstreams.describe() {
        if line.contains(crate::tls::IDENTITY_CHANGED) {
            log::error!("{line}");
        } else {
            log::info!("{line}");
        }
    }
    // A wrong --user password is said now, not at the first app connection; the process
    // keeps running (the remote may come up, or the password be fixed there, later).
    if let Some(creds) = &cfg.credentials {
        match upstreams.check(creds) {
            Ok((remote, upstreams::connect::CheckAnswer::Ok(bw))) => log::info!(
                "remote={remote} user={} credentials ok (bandwidth {})",
                Shown(&creds.user),
                bw.map_or("unlimited".to_string(), |b| {
                    crate::limit::rate::Bandwidth::bytes_per_sec(b).to_string()
                })
            ),
            Ok((remote, upstreams::connect::CheckAnswer::Refused(status))) => log::warn!(
                "remote={remote} user={} credentials refused: {status}; apps without their \
                 own credentials will be refused",
                Shown(&creds.user)
            ),
            Err(e) => log::warn!("user={} credentials not checked: {e}", Shown(&creds.user)),
        }
    }
    // Dropping the sender (at shutdown) ends the prober and the warmer.
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    {
        let (upstreams, stop_rx) = (Arc::clone(&upstreams), stop_rx.clone());
        std::thread::Builder::new()
            .name("local-warm".into())
            .spawn(move || upstreams.keep_warm(stop_rx))
            .map_err(|e| Error::Start(StartError::Spawn("warm connections", e)))?;
    }
    std::thread::Builder::new()
        .name("local-health".into())
        .spawn(move || upstreams.watch(stop_rx))
        .map_err(|e| Error::Start(StartError::Spawn("health check", e)))?;
    server.attach(Box::new(stop_tx));
    Ok(server)
}

/// What local-proxy reports at each scrape, read from its state.
fn live_metrics(
    local: std::sync::Weak<Local>,
    load: crate::net::server::Load,
) -> crate::metrics::Source {
    use crate::metrics::Sample;
    use std::sync::atomic::Ordering::Relaxed;
    Box::new(move |out: &mut Vec<Sample>| {
        let (Some(l), Some(now)) = (local.upgrade(), load.read()) else {
            return false;
        };
        let open = l.open_tunnels.load(Relaxed);
        crate::metrics::server_samples(out, open, now, l.meter.totals());
        for (remote, state, open) in l.upstreams.states() {
            out.push(Sample::gauge(
                "remote_up",
                "Each remote's health: 1 up, 0.5 draining (no new tunnels), 0 down",
                vec![("remote", remote.clone())],
                state,
            ));
            out.push(Sample::gauge(
                "remote_tunnels_open",
                "Tunnels open (or being opened) through each remote",
                vec![("remote", remote)],
                open as f64,
            ));
        }
        true
    })
}

/// An app's handshake, read: what to serve next.
enum Handshake {
    /// SOCKS5 greeting, authentication and CONNECT request done; the reply is still owed.
    Socks(Credentials, socks5::Request),
    /// An HTTP head (or why it could not be read), and the bytes read with it.
    Http(Result<(usize, http::Head), http::Error>, Vec<u8>),
    /// Answered already (refused, or not a protocol we speak), or the app left.
    Done,
}

/// The address sent in SOCKS5 replies that carry none.
const UNSPECIFIED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// What an app asked for, once its handshake is done.
struct AppRequest {
    proto: &'static str,
    creds: Credentials,
    target: TargetAddr,
    // The app's address, for the log.
    app: String,
    // Sent to remote-proxy, which logs it too.
    tunnel: TunnelId,
}

impl Service for Local {
    fn handle(&self, conn: Accepted, workers: &Workers) -> Handled {
        let conn = match conn.unless_silent(self.cfg.timeouts.silence()) {
            Ok(conn) => conn,
            Err(parked) => return parked,
        };
        let first_byte = conn.first_byte_left(self.cfg.timeouts.first_byte);
        self.serve(conn.stream, conn.id, first_byte, workers);
        Handled::SlotFree
    }

    fn first_byte_timeout(&self) -> Option<Duration> {
        Some(self.cfg.timeouts.first_byte)
    }

    fn busy(&self, conn: Accepted, retry_after: u16) {
        let Accepted { stream, id, .. } = conn;
        // Run the app's handshake far enough to answer in its own protocol, with a short
        // deadline: this job exists only to say "busy".
        let wait = self.cfg.timeouts.handshake.min(Duration::from_secs(2));
        let Ok(mut d) = HandshakeReader::new(&stream, wait) else {
            return;
        };
        match d.peek_byte() {
            Ok(Some(socks5::VERSION)) if self.socks_handshake(&mut d, id).is_some() => {
                let code = socks5::Reply::for_status(Status::ServerBusy);
                let _ = socks5::write_reply(&mut &stream, code, UNSPECIFIED);
                log::info!("conn={id} socks5 answered busy ({code:?}); retry in {retry_after}s");
            }
            Ok(Some(b))
                if b.is_ascii_alphabetic() && http::read_head(&mut d, &mut Vec::new()).is_ok() =>
            {
                let code = http::status_for(Status::ServerBusy);
                let _ = http::write_status(&mut &stream, code, "server busy", retry_after);
                log::info!("conn={id} http answered {code} busy; retry in {retry_after}s");
            }
            _ => {}
        }
    }
}

impl Local {
    /// Serves an app connection whose first byte is due within `first_byte`.
    fn serve(&self, stream: TcpStream, id: ConnId, first_byte: Duration, workers: &Workers) {
        let _ = stream.set_nodelay(true);
        match self.read_handshake(&stream, id, first_byte) {
            Handshake::Socks(creds, req) => self.socks(stream, id, creds, req, workers),
            Handshake::Http(read, buf) => self.http(stream, id, read, buf, workers),
            Handshake::Done => {}
        }
    }

    /// Tells SOCKS5 from HTTP by the first byte and reads that handshake under the deadline;
    /// answers and logs what cannot go on. Not inlined: the reader's peek buffer lives in
    /// this frame, which is gone before the relay runs, so a tunnel's thread touches one
    /// stack page fewer for its whole life (docs/benchmarks.md).
    #[inline(never)]
    fn read_handshake(&self, stream: &TcpStream, id: ConnId, first_byte: Duration) -> Handshake {
        let t = &self.cfg.timeouts;
        let Ok(mut d) = HandshakeReader::awaiting_first_byte(stream, first_byte, t.handshake)
        else {
            return Handshake::Done;
        };
        let first = match d.peek_byte() {
            Ok(Some(b)) => b,
            Ok(None) => return Handshake::Done,
            Err(e) => {
                log::debug!("conn={id} no greeting: {e}");
                return Handshake::Done;
            }
        };
        match first {
            socks5::VERSION => match self.socks_handshake(&mut d, id) {
                Some((creds, req)) => Handshake::Socks(creds, req),
                None => Handshake::Done,
            },
            b'A'..=b'Z' | b'a'..=b'z' => {
                let mut buf = Vec::with_capacity(1024);
                let read = http::read_head(&mut d, &mut buf);
                Handshake::Http(read, buf)
            }
            0x04 => {
                log::info!("conn={id} SOCKS4 is not supported; use SOCKS5");
                // SOCKS4 "request rejected" (0x5B), so SOCKS4 clients print a real error.
                let _ = (&mut &*stream).write_all(&[0, 0x5b, 0, 0, 0, 0, 0, 0]);
                Handshake::Done
            }
            other => {
                log::info!("conn={id} unknown protocol (first byte {other:#04x})");
                drop(d);
                drain_arrived(stream);
                Handshake::Done
            }
        }
    }

    /// Asks the user's remote whether an app's RFC 1929 credentials are good (remembered a
    /// short while), so a wrong password fails the sub-negotiation, which apps report as an
    /// authentication failure. With no remote to ask, the CONNECT request finds out.
    fn check_app_credentials(&self, creds: &Credentials, id: ConnId) -> logins::Verdict {
        use logins::Verdict;
        self.logins.verify(&creds.user, &creds.password, || {
            match self.upstreams.check(creds) {
                Ok((_, upstreams::connect::CheckAnswer::Ok(_))) => Verdict::Good,
                // That remote cannot tell; the tunnel request, which may go to another
                // remote, decides.
                Ok((_, upstreams::connect::CheckAnswer::Refused(Status::Unavailable))) => {
                    Verdict::Unknown
                }
                Ok((remote, upstreams::connect::CheckAnswer::Refused(status))) => {
                    log::info!(
                        "conn={id} socks5 auth: user={} refused by remote={remote}: {status}",
                        Shown(&creds.user)
                    );
                    Verdict::Refused
                }
                Err(e) => {
                    log::debug!(
                        "conn={id} socks5 auth: cannot check user={}: {e}",
                        Shown(&creds.user)
                    );
                    Verdict::Unknown
                }
            }
        })
    }

    /// The id of connection `id`'s tunnel, unique across local-proxies with high odds.
    fn tunnel_id(&self, id: ConnId) -> TunnelId {
        TunnelId(u64::from(self.tunnel_prefix) << 32 | (id & 0xffff_ffff))
    }

    fn default_creds(&self) -> Option<Credentials> {
        self.cfg.credentials.clone()
    }

    /// Runs the SOCKS5 greeting, authentication and request. Failures are answered and
    /// logged here; `None` means the connection is done.
    fn socks_handshake(
        &self,
        s: &mut HandshakeReader<'_>,
        id: ConnId,
    ) -> Option<(Credentials, socks5::Request)> {
        let methods = match socks5::read_greeting(s) {
            Ok(m) => m,
            Err(e) => {
                log::info!("conn={id} socks5 greeting: {e}");
                return None;
            }
        };
        // App credentials win: they pick the user, so one local-proxy serves several users.
        let creds = if methods.contains(&(Method::UserPass as u8)) {
            socks5::write_method(s, Method::UserPass).ok()?;
            match socks5::read_userpass(s) {
                Ok((user, password)) => {
                    let creds = Credentials { user, password };
                    if self.check_app_credentials(&creds, id) == logins::Verdict::Refused {
                        // A tunnel refused at the sub-negotiation, before its request.
                        crate::metrics::global().tunnel("bad_credentials");
                        let _ = socks5::write_userpass_status(s, false);
                        return None;
                    }
                    socks5::write_userpass_status(s, true).ok()?;
                    creds
                }
                Err(e) => {
                    log::info!("conn={id} socks5 auth: {e}");
                    let _ = socks5::write_userpass_status(s, false);
                    return None;
                }
            }
        } else if let (true, Some(c)) = (
            methods.contains(&(Method::NoAuth as u8)),
            self.default_creds(),
        ) {
            socks5::write_method(s, Method::NoAuth).ok()?;
            c
        } else {
            log::info!("conn={id} socks5: no acceptable auth method (no --user configured)");
            let _ = socks5::write_method(s, Method::NoAcceptable);
            return None;
        };
        let req = match socks5::read_request(s) {
            Ok(r) => r,
            Err(e) => {
                log::info!("conn={id} socks5 request: {e}");
                if let Some(reply) = e.reply() {
                    let _ = socks5::write_reply(s, reply, UNSPECIFIED);
                }
                return None;
            }
        };
        if req.command != socks5::Command::Connect {
            log::info!("conn={id} socks5 command {:?} not supported", req.command);
            let _ = socks5::write_reply(s, socks5::Reply::CommandNotSupported, UNSPECIFIED);
            return None;
        }
        Some((creds, req))
    }

    fn socks(
        &self,
        stream: TcpStream,
        id: ConnId,
        creds: Credentials,
        req: socks5::Request,
        workers: &Workers,
    ) {
        let ask = AppRequest {
            proto: "socks5",
            creds,
            target: req.target,
            app: peer_of(&stream),
            tunnel: self.tunnel_id(id),
        };
        let (remote, reply, lease) = match self.tunnel(&ask, id) {
            Ok(open) => open,
            Err(refusal) => {
                let code = refusal.socks5_reply();
                log::debug!("conn={id} socks5 reply {code:?}: {refusal}");
                let _ = socks5::write_reply(&mut &stream, code, UNSPECIFIED);
                return;
            }
        };
        if socks5::write_reply(&mut &stream, socks5::Reply::Succeeded, reply.bound).is_err() {
            return;
        }
        self.run(stream, remote, &lease, &ask, id, 0, workers);
    }

    /// Serves an HTTP proxy request whose head was read (`read`) into `buf`.
    fn http(
        &self,
        stream: TcpStream,
        id: ConnId,
        read: Result<(usize, http::Head), http::Error>,
        buf: Vec<u8>,
        workers: &Workers,
    ) {
        let fail = |code: u16, detail: &str, retry: u16| {
            let _ = http::write_status(&mut &stream, code, detail, retry);
        };
        let (len, head) = match read {
            Ok(h) => h,
            Err(e) => {
                log::info!("conn={id} http: {e}");
                if let Some(code) = e.status() {
                    fail(code, &e.to_string(), 0);
                }
                return;
            }
        };
        let creds = match http::proxy_credentials(&head) {
            Ok(Some((user, password))) => Credentials { user, password },
            Ok(None) => match self.default_creds() {
                Some(c) => c,
                None => {
                    log::info!("conn={id} http: no credentials (no --user configured)");
                    return fail(407, "proxy credentials required", 0);
                }
            },
            Err(e) => {
                log::info!("conn={id} http: {e}");
                return fail(407, &e.to_string(), 0);
            }
        };
        let request = match http::interpret(&head) {
            Ok(r) => r,
            Err(e) => {
                log::info!("conn={id} http: {e}");
                return fail(e.status().unwrap_or(400), &e.to_string(), 0);
            }
        };
        let (target, forward_head, proto) = match request {
            ProxyRequest::Connect(t) => (t, None, "http-connect"),
            ProxyRequest::Forward { target, head } => (target, Some(head), "http"),
        };
        let ask = AppRequest {
            proto,
            creds,
            target,
            app: peer_of(&stream),
            tunnel: self.tunnel_id(id),
        };
        let (remote, lease) = match self.tunnel(&ask, id) {
            Ok((remote, _reply, lease)) => (remote, lease),
            Err(refusal) => {
                let code = refusal.http_status();
                log::debug!("conn={id} http reply {code}: {refusal}");
                return fail(code, &refusal.to_string(), refusal.retry_after());
            }
        };
        let (mut remote, lease) = (remote, lease);
        let sent = match &forward_head {
            None => http::write_status(&mut &stream, 200, "", 0),
            Some(h) => forward(&mut remote, h, self.cfg.timeouts.handshake),
        };
        // Bytes the app sent after the head (a request body, a TLS ClientHello) go on.
        let rest = &buf[len..];
        if sent.is_err()
            || (!rest.is_empty()
                && forward(&mut remote, rest, self.cfg.timeouts.handshake).is_err())
        {
            return;
        }
        let already_up = (forward_head.map_or(0, |h| h.len()) + rest.len()) as u64;
        self.run(stream, remote, &lease, &ask, id, already_up, workers);
    }

    /// Opens the tunnel for `ask` and logs a refusal; the caller answers the app in its
    /// protocol from the [`Refusal`].
    fn tunnel(&self, ask: &AppRequest, id: ConnId) -> Result<(Hop, Reply, Lease), Refusal> {
        let req = Request {
            command: Command::Connect,
            tunnel_id: Some(ask.tunnel),
            user: ask.creds.user.clone(),
            password: ask.creds.password.clone(),
            target: Some(ask.target.clone()),
            invite: None,
        };
        // remote-proxy may queue us (its queue timeout is assumed to be like ours) and then
        // spend its connect timeout on the target.
        let t = &self.cfg.timeouts;
        let reply_wait = t.handshake + t.connect + self.cfg.admission.timeout;
        let metrics = crate::metrics::global();
        match self.upstreams.open(&req, t.connect, reply_wait) {
            Ok((remote, reply, lease)) if reply.status == Status::Ok => {
                metrics.tunnel("ok");
                Ok((remote, reply, lease))
            }
            Ok((_, reply, lease)) => {
                metrics.tunnel(crate::metrics::outcome(reply.status));
                let retry = if reply.retry_after > 0 {
                    format!("; retry in {}s", reply.retry_after)
                } else {
                    String::new()
                };
                log::info!(
                    "conn={id} tunnel={} proto={} app={} user={} target={} remote={} refused: \
                     {}{retry}",
                    ask.tunnel,
                    ask.proto,
                    ask.app,
                    Shown(&ask.creds.user),
                    ask.target,
                    lease.remote(),
                    reply.status
                );
                Err(Refusal::Remote {
                    status: reply.status,
                    retry_after: reply.retry_after,
                    resets_at: reply.resets_at,
                })
            }
            Err(e @ TunnelError::Request(_)) => {
                metrics.tunnel("bad_request");
                log::info!("conn={id} tunnel={} proto={} {e}", ask.tunnel, ask.proto);
                Err(Refusal::Local(e))
            }
            Err(e) => {
                metrics.tunnel("remote_unreachable");
                log::warn!("conn={id} tunnel={} {e}", ask.tunnel);
                Err(Refusal::Local(e))
            }
        }
    }

    /// Relays an open tunnel; `already_up` counts bytes the handshake forwarded itself.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        app: TcpStream,
        remote: Hop,
        lease: &Lease,
        ask: &AppRequest,
        id: ConnId,
        already_up: u64,
        workers: &Workers,
    ) {
        log::info!(
            "conn={id} tunnel={} open proto={} app={} user={} target={} remote={}",
            ask.tunnel,
            ask.proto,
            ask.app,
            Shown(&ask.creds.user),
            ask.target,
            lease.remote()
        );
        let started = Instant::now();
        let opts = relay::Options {
            bucket: None,
            idle_timeout: self.cfg.timeouts.idle,
            meter: Some(Arc::clone(&self.meter)),
        };
        use std::sync::atomic::Ordering::AcqRel;
        self.open_tunnels.fetch_add(1, AcqRel);
        self.meter
            .moved(crate::limit::meter::Direction::Up, already_up);
        let stats = relay::relay_hop(remote, relay::HopEnd::Target, app, &opts, workers);
        self.open_tunnels.fetch_sub(1, AcqRel);
        log::info!(
            "conn={id} tunnel={} close user={} target={} up={} down={} dur={:.3}s",
            ask.tunnel,
            Shown(&ask.creds.user),
            ask.target,
            stats.up + already_up,
            stats.down,
            started.elapsed().as_secs_f64()
        );
    }
}

/// Takes what already arrived so closing sends a FIN, not a reset.
///
/// Not inlined: its buffer would otherwise sit in `serve`'s frame, which stays live for the
/// whole tunnel, and a frame over a page is probed page by page: a resident page more per
/// idle tunnel (docs/benchmarks.md).
/// Sends bytes the app gave with its request (an HTTP head, early data) through the hop.
fn forward(remote: &mut Hop, bytes: &[u8], within: std::time::Duration) -> std::io::Result<()> {
    remote.io(within)?.write_all(bytes)
}

/// A socket's peer address for the log, or `?`.
fn peer_of(stream: &TcpStream) -> String {
    stream
        .peer_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string())
}

#[inline(never)]
fn drain_arrived(stream: &TcpStream) {
    let mut s = stream;
    let _ = s.read(&mut [0u8; 4096]);
}
