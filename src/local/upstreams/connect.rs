//! One connection from local-proxy to one remote-proxy: open a tunnel (connect, send the
//! request, read the reply), a health probe, and signup.

use crate::config::{Credentials, Timeouts};
use crate::net::hop::{Hop, HopError};
use crate::proto::tunnel::{self, Command, Reply, Request, Status, TunnelId};
use crate::tls;
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How local-proxy talks to one remote-proxy: TLS with the remote's verification settings,
/// or plaintext (`--plaintext`).
#[derive(Clone, Debug)]
pub enum Link {
    /// The tunnel protocol straight over TCP.
    Plaintext,
    /// The tunnel protocol inside TLS 1.3.
    Tls(tls::Dial),
}

impl Link {
    /// The link to `remote` under `trust` (`None`: plaintext).
    ///
    /// # Errors
    /// When the CA bundle cannot be read or the host name cannot be checked by TLS.
    pub fn to(remote: &str, trust: Option<&tls::Trust>) -> Result<Link, tls::Error> {
        match trust {
            None => Ok(Link::Plaintext),
            Some(t) => tls::dial(t, remote).map(Link::Tls),
        }
    }
}

/// What a connection to a remote is for: tunnels and probes offer different ALPN names,
/// so a remote with a full queue can still answer probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A tunnel, signup or credential check.
    Tunnel,
    /// A health probe.
    Health,
}

/// Why a tunnel to remote-proxy could not be opened.
#[derive(Debug)]
pub enum TunnelError {
    /// remote-proxy could not be reached or stopped answering.
    Remote(io::Error),
    /// remote-proxy answered with something that is not our protocol.
    Protocol(tunnel::Error),
    /// The request cannot be sent (credentials too long for the protocol); nothing was
    /// sent.
    Request(tunnel::Error),
    /// Every remote-proxy is down (or draining): nothing was tried.
    NoRemote,
    /// The TLS handshake failed, or the remote's identity was refused; no credential was
    /// sent.
    Tls(HopError),
    /// This local-proxy runs `--plaintext` and the remote requires TLS; it did not look at
    /// the request.
    TlsRequired,
}

impl fmt::Display for TunnelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunnelError::Remote(e) => write!(f, "cannot reach remote-proxy: {e}"),
            TunnelError::Protocol(e) => write!(f, "bad answer from remote-proxy: {e}"),
            TunnelError::Request(e) => write!(f, "cannot send the tunnel request: {e}"),
            TunnelError::NoRemote => write!(f, "no remote-proxy is available (all are down)"),
            TunnelError::Tls(HopError::PlaintextPeer) => write!(
                f,
                "remote-proxy answered in plaintext: it runs with --plaintext (give \
                 local-proxy --plaintext too, on a trusted network only)"
            ),
            TunnelError::Tls(e) => write!(f, "{e}"),
            TunnelError::TlsRequired => write!(
                f,
                "remote-proxy requires TLS: run local-proxy without --plaintext"
            ),
        }
    }
}

impl std::error::Error for TunnelError {}

/// Opens a tunnel: connects to remote-proxy, sends `req`, reads the reply.
///
/// The reply may take as long as remote-proxy's queue wait plus its target connect, so it is
/// awaited for `reply_wait`, not just the handshake timeout.
///
/// # Errors
/// `Request` when `req` cannot be encoded, `Remote` when remote-proxy cannot be reached or
/// goes silent, `Protocol` for bad replies.
pub fn open_tunnel(
    remote: &str,
    link: &Link,
    req: &Request,
    timeouts: &Timeouts,
    reply_wait: Duration,
) -> Result<(Hop, Reply), TunnelError> {
    let bytes = tunnel::encode_request(req).map_err(TunnelError::Request)?;
    let addrs = resolve(remote).map_err(TunnelError::Remote)?;
    exchange(
        &addrs,
        link,
        Purpose::Tunnel,
        &bytes,
        timeouts.connect,
        reply_wait,
    )
}

/// Resolves `HOST:PORT`.
///
/// # Errors
/// The resolver's error, or `NotFound` when it gives no address.
pub fn resolve(remote: &str) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = remote.to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{remote} resolved to no address"),
        ));
    }
    Ok(addrs)
}

/// Connects to the first of `addrs` that accepts, runs the TLS handshake when `link` says
/// so, sends the encoded request `bytes`, and reads the reply; all of it within
/// `reply_wait` after the connect (remote-proxy starts the TLS handshake only once it has
/// a slot for the connection, so the handshake may wait in its queue).
///
/// # Errors
/// `Remote` when no address accepts or the remote goes silent, `Tls` when the handshake
/// fails or the remote's identity is refused (nothing was sent then), `TlsRequired` when a
/// plaintext request reached a TLS remote, `Protocol` for bad replies.
pub fn exchange(
    addrs: &[SocketAddr],
    link: &Link,
    purpose: Purpose,
    bytes: &[u8],
    connect_timeout: Duration,
    reply_wait: Duration,
) -> Result<(Hop, Reply), TunnelError> {
    let (mut hop, connected) = dial(addrs, link, purpose, connect_timeout, reply_wait)?;
    let left = (connected + reply_wait).saturating_duration_since(Instant::now());
    let reply = request_on(&mut hop, bytes, left)?;
    Ok((hop, reply))
}

/// Connects to the first of `addrs` that accepts and runs the TLS handshake when `link`
/// says so, within `within` of the connect; the hop and when it connected.
///
/// # Errors
/// `Remote` when no address accepts, `Tls` when the handshake fails or the remote's
/// identity is refused.
pub fn dial(
    addrs: &[SocketAddr],
    link: &Link,
    purpose: Purpose,
    connect_timeout: Duration,
    within: Duration,
) -> Result<(Hop, Instant), TunnelError> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "remote address did not resolve");
    for a in addrs {
        match TcpStream::connect_timeout(a, connect_timeout) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                let connected = Instant::now();
                let hop = match link {
                    Link::Plaintext => Hop::plain(s),
                    Link::Tls(dial) => {
                        let cfg = match purpose {
                            Purpose::Tunnel => &dial.tunnel,
                            Purpose::Health => &dial.health,
                        };
                        Hop::connect(s, cfg, &dial.name, within).map_err(TunnelError::Tls)?
                    }
                };
                return Ok((hop, connected));
            }
            Err(e) => last = e,
        }
    }
    Err(TunnelError::Remote(last))
}

/// Sends the encoded request `bytes` on an open hop (a fresh one, or a warm one taken from
/// the pool) and reads the reply within `wait`.
///
/// # Errors
/// `Remote` when the remote closed or went silent, `TlsRequired` when a plaintext request
/// reached a TLS remote, `Protocol` for bad replies.
pub fn request_on(hop: &mut Hop, bytes: &[u8], wait: Duration) -> Result<Reply, TunnelError> {
    let reply = send_and_read_reply(hop, bytes, wait)?;
    if reply.status == Status::TlsRequired {
        return Err(TunnelError::TlsRequired);
    }
    Ok(reply)
}

/// Sends a request and reads its reply in their own frame (the plaintext reader's peek
/// buffer must not stay on the stack of a tunnel's thread under the relay).
#[inline(never)]
fn send_and_read_reply(hop: &mut Hop, bytes: &[u8], wait: Duration) -> Result<Reply, TunnelError> {
    let mut io = hop
        .io(wait.max(Duration::from_millis(1)))
        .map_err(TunnelError::Remote)?;
    io::Write::write_all(&mut io, bytes).map_err(TunnelError::Remote)?;
    match tunnel::read_reply(&mut io) {
        Ok(r) => Ok(r),
        Err(tunnel::Error::Io(e)) => Err(TunnelError::Remote(e)),
        Err(e) => Err(TunnelError::Protocol(e)),
    }
}

/// Sends a health probe (docs/protocol.md §2.1) and returns the answer's status.
///
/// # Errors
/// `Remote` when nothing answers within `timeout`, `Protocol` for a bad answer.
pub fn probe(addrs: &[SocketAddr], link: &Link, timeout: Duration) -> Result<Status, TunnelError> {
    let bytes = tunnel::encode_request(&Request::health(None)).map_err(TunnelError::Request)?;
    let (mut hop, reply) = exchange(addrs, link, Purpose::Health, &bytes, timeout, timeout)?;
    hop.close();
    Ok(reply.status)
}

/// Asks remote-proxy to create an account (`local-proxy signup`), with the operator's
/// invite token if there is one.
///
/// # Errors
/// As [`open_tunnel`]; a refusal is an `Ok` reply with a non-`Ok` status.
pub fn signup(
    remote: &str,
    link: &Link,
    creds: &Credentials,
    invite: Option<&str>,
    timeouts: &Timeouts,
) -> Result<Status, TunnelError> {
    let req = Request {
        invite: invite.map(|t| t.trim().to_string()),
        ..credential_request(Command::Signup, creds)
    };
    let (mut hop, reply) = open_tunnel(remote, link, &req, timeouts, timeouts.handshake)?;
    hop.close();
    Ok(reply.status)
}

/// The TLS identity `remote` presents (`local-proxy trust`): a TLS handshake that accepts
/// any certificate whose key signs the handshake, then a close; nothing else is sent.
///
/// # Errors
/// `Remote` when it cannot be reached, `Tls` when the handshake fails (a plaintext remote
/// gives `Tls(PlaintextPeer)`).
pub fn identity_of(remote: &str, timeout: Duration) -> Result<tls::Fingerprint, TunnelError> {
    let slot = std::sync::Arc::new(parking_lot::Mutex::new(None));
    let link = Link::to(
        remote,
        Some(&tls::Trust::Note(std::sync::Arc::clone(&slot))),
    )
    .map_err(|e| TunnelError::Remote(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let Link::Tls(dial) = link else {
        return Err(TunnelError::NoRemote); // cannot happen: a trust gives a TLS link
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "remote address did not resolve");
    for a in resolve(remote).map_err(TunnelError::Remote)? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                let mut hop =
                    Hop::connect(s, &dial.health, &dial.name, timeout).map_err(TunnelError::Tls)?;
                hop.close();
                let seen = *slot.lock();
                return seen.ok_or(TunnelError::NoRemote);
            }
            Err(e) => last = e,
        }
    }
    Err(TunnelError::Remote(last))
}

/// A request that carries credentials and no target (signup, credential check), with a
/// fresh tunnel id for the log lines.
fn credential_request(command: Command, creds: &Credentials) -> Request {
    Request {
        command,
        tunnel_id: Some(TunnelId(u64::from(random_u32()))),
        user: creds.user.clone(),
        password: creds.password.clone(),
        target: None,
        invite: None,
    }
}

/// A random number from the OS, for tunnel ids (not a secret: ids only tell log lines apart).
pub(crate) fn random_u32() -> u32 {
    use rand_core::RngCore;
    rand_core::OsRng.next_u32()
}

/// What a remote-proxy said to a credential check (docs/protocol.md §2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckAnswer {
    /// Good credentials; the user's bandwidth, `None` for unlimited.
    Ok(Option<u64>),
    /// Refused: bad credentials, or the address is locked out (`RateLimited`).
    Refused(Status),
}

/// Asks one remote-proxy whether `creds` are good, without opening a tunnel.
///
/// # Errors
/// As [`exchange`], and `Request` for credentials too long to send.
pub fn check(
    addrs: &[SocketAddr],
    link: &Link,
    creds: &Credentials,
    timeout: Duration,
) -> Result<CheckAnswer, TunnelError> {
    let req = credential_request(Command::Check, creds);
    let bytes = tunnel::encode_request(&req).map_err(TunnelError::Request)?;
    let (mut hop, reply) = exchange(addrs, link, Purpose::Tunnel, &bytes, timeout, timeout)?;
    if reply.status != Status::Ok {
        hop.close();
        return Ok(CheckAnswer::Refused(reply.status));
    }
    let read = {
        let mut io = hop.io(timeout).map_err(TunnelError::Remote)?;
        tunnel::read_check_bandwidth(&mut io)
    };
    hop.close();
    match read {
        Ok(bw) => Ok(CheckAnswer::Ok(bw)),
        Err(tunnel::Error::Io(e)) => Err(TunnelError::Remote(e)),
        Err(e) => Err(TunnelError::Protocol(e)),
    }
}
