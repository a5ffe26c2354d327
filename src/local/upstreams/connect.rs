//! One connection from local-proxy to one remote-proxy: open a tunnel (connect, send the
//! request, read the reply), a health probe, and signup.

use crate::config::{Credentials, Timeouts};
use crate::net::handshake::HandshakeReader;
use crate::proto::tunnel::{self, Command, Reply, Request, Status, TunnelId};
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

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
}

impl fmt::Display for TunnelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunnelError::Remote(e) => write!(f, "cannot reach remote-proxy: {e}"),
            TunnelError::Protocol(e) => write!(f, "bad answer from remote-proxy: {e}"),
            TunnelError::Request(e) => write!(f, "cannot send the tunnel request: {e}"),
            TunnelError::NoRemote => write!(f, "no remote-proxy is available (all are down)"),
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
    req: &Request,
    timeouts: &Timeouts,
    reply_wait: Duration,
) -> Result<(TcpStream, Reply), TunnelError> {
    let bytes = tunnel::encode_request(req).map_err(TunnelError::Request)?;
    let addrs = resolve(remote).map_err(TunnelError::Remote)?;
    exchange(&addrs, &bytes, timeouts.connect, reply_wait)
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

/// Connects to the first of `addrs` that accepts, sends the encoded request `bytes`, and
/// reads the reply for at most `reply_wait`.
///
/// # Errors
/// `Remote` when no address accepts or the remote goes silent, `Protocol` for bad replies.
pub fn exchange(
    addrs: &[SocketAddr],
    bytes: &[u8],
    connect_timeout: Duration,
    reply_wait: Duration,
) -> Result<(TcpStream, Reply), TunnelError> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "remote address did not resolve");
    for a in addrs {
        match TcpStream::connect_timeout(a, connect_timeout) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                io::Write::write_all(&mut &s, bytes).map_err(TunnelError::Remote)?;
                let reply = read_reply_within(&s, reply_wait)?;
                return Ok((s, reply));
            }
            Err(e) => last = e,
        }
    }
    Err(TunnelError::Remote(last))
}

/// Reads a reply in its own frame (the reader's peek buffer must not stay on the stack of a
/// tunnel's thread under the relay).
#[inline(never)]
fn read_reply_within(s: &TcpStream, wait: Duration) -> Result<Reply, TunnelError> {
    let mut d = HandshakeReader::new(s, wait).map_err(TunnelError::Remote)?;
    match tunnel::read_reply(&mut d) {
        Ok(r) => Ok(r),
        Err(tunnel::Error::Io(e)) => Err(TunnelError::Remote(e)),
        Err(e) => Err(TunnelError::Protocol(e)),
    }
}

/// Sends a health probe (docs/protocol.md §2.1) and returns the answer's status.
///
/// # Errors
/// `Remote` when nothing answers within `timeout`, `Protocol` for a bad answer.
pub fn probe(addrs: &[SocketAddr], timeout: Duration) -> Result<Status, TunnelError> {
    let bytes = tunnel::encode_request(&Request::health(None)).map_err(TunnelError::Request)?;
    exchange(addrs, &bytes, timeout, timeout).map(|(_, reply)| reply.status)
}

/// Asks remote-proxy to create an account (`local-proxy signup`).
///
/// # Errors
/// As [`open_tunnel`]; a refusal is an `Ok` reply with a non-`Ok` status.
pub fn signup(
    remote: &str,
    creds: &Credentials,
    timeouts: &Timeouts,
) -> Result<Status, TunnelError> {
    let req = Request {
        command: Command::Signup,
        tunnel_id: Some(TunnelId(u64::from(random_u32()))),
        user: creds.user.clone(),
        password: creds.password.clone(),
        target: None,
    };
    open_tunnel(remote, &req, timeouts, timeouts.handshake).map(|(_, reply)| reply.status)
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
    creds: &Credentials,
    timeout: Duration,
) -> Result<CheckAnswer, TunnelError> {
    let req = Request {
        command: Command::Check,
        tunnel_id: Some(TunnelId(u64::from(random_u32()))),
        user: creds.user.clone(),
        password: creds.password.clone(),
        target: None,
    };
    let bytes = tunnel::encode_request(&req).map_err(TunnelError::Request)?;
    let (stream, reply) = exchange(addrs, &bytes, timeout, timeout)?;
    if reply.status != Status::Ok {
        return Ok(CheckAnswer::Refused(reply.status));
    }
    let mut d = HandshakeReader::new(&stream, timeout).map_err(TunnelError::Remote)?;
    match tunnel::read_check_bandwidth(&mut d) {
        Ok(bw) => Ok(CheckAnswer::Ok(bw)),
        Err(tunnel::Error::Io(e)) => Err(TunnelError::Remote(e)),
        Err(e) => Err(TunnelError::Protocol(e)),
    }
}
