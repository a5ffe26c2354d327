//! The local-proxy → remote-proxy wire protocol, version 2 (docs/protocol.md); version 1
//! requests are still read, so remote-proxies can be upgraded before their local-proxies.
//!
//! In scope: encoding and decoding the request and the reply, and the [`Status`] codes.
//! Out of scope: sockets, authentication, relaying. After an `Ok` reply to `Connect`, both
//! sides switch to raw bytes.

use crate::proto::addr::{self, TargetAddr};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};

/// First two bytes of every request: tells a stray HTTP or SOCKS client from local-proxy.
pub const MAGIC: [u8; 2] = *b"FG";
/// The protocol version this build speaks.
pub const VERSION: u8 = 2;
/// The previous version, still accepted: it lacks the tunnel id.
pub const VERSION_1: u8 = 1;

/// A tunnel's id, chosen by local-proxy and logged by both proxies, so one grep finds both
/// ends of a tunnel (docs/protocol.md §2). Printed as 16 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TunnelId(pub u64);

impl fmt::Display for TunnelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
/// Length of a health probe on the wire, in bytes (MAGIC, VER, CMD, TUNNEL_ID).
pub const HEALTH_PROBE_LEN: usize = 12;
/// The first bytes of every health probe: MAGIC, version 2, CMD 0x03.
pub const HEALTH_PROBE_START: [u8; 4] = [b'F', b'G', VERSION, Command::Health as u8];
/// Longest user name and password on the wire, in bytes.
pub const MAX_CREDENTIAL: usize = 255;
/// The command byte of a signup that carries an invite token (§2.3): a code of its own, so
/// a remote-proxy from before invites answers `malformed` instead of ignoring the token.
pub const SIGNUP_WITH_INVITE: u8 = 5;

/// What the request asks for (docs/protocol.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Authenticate, connect to the target, then relay raw bytes.
    Connect = 1,
    /// Create the named account with the given password (only with `--allow-signup`).
    Signup = 2,
    /// Is this remote-proxy serving? No credentials and no target follow; answered without
    /// authentication and without an admission slot (docs/protocol.md §2.1). Version 2 only.
    Health = 3,
    /// Are these credentials good? Answered like a login (counted by the failed-login
    /// throttle), with the user's bandwidth after an `ok` reply (§2.2); opens nothing.
    Check = 4,
    /// A warm connection (§2.4): nothing follows now and nothing is answered; the
    /// connection's real request comes later, when an app connection takes it. Version 2
    /// only.
    Warm = 6,
}

impl TryFrom<u8> for Command {
    type Error = Error;
    fn try_from(b: u8) -> Result<Self, Error> {
        match b {
            1 => Ok(Command::Connect),
            2 => Ok(Command::Signup),
            3 => Ok(Command::Health),
            4 => Ok(Command::Check),
            6 => Ok(Command::Warm),
            other => Err(Error::BadCommand(other)),
        }
    }
}

/// A decoded request. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub command: Command,
    /// The tunnel's id; `None` in a version 1 request, which carries none.
    pub tunnel_id: Option<TunnelId>,
    /// Account name.
    pub user: String,
    /// Account password, in clear on the wire (run the tunnel over a trusted path or TLS).
    pub password: String,
    /// Where to connect; `None` for `Signup`.
    pub target: Option<TargetAddr>,
    /// The invite token of a `Signup` (`remote-proxy invite create`); `None` otherwise.
    pub invite: Option<String>,
}

impl Request {
    /// A health probe (§2.1): no credentials, no target.
    pub fn health(tunnel_id: Option<TunnelId>) -> Request {
        Request {
            command: Command::Health,
            tunnel_id: tunnel_id.or(Some(TunnelId(0))),
            user: String::new(),
            password: String::new(),
            target: None,
            invite: None,
        }
    }

    /// The announcement that opens a warm connection (§2.4).
    pub fn warm() -> Request {
        Request {
            command: Command::Warm,
            ..Request::health(Some(TunnelId(0)))
        }
    }

    /// The version this request is written in: 2 with a tunnel id, 1 without.
    pub fn version(&self) -> u8 {
        if self.tunnel_id.is_some() {
            VERSION
        } else {
            VERSION_1
        }
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("command", &self.command)
            .field("tunnel_id", &self.tunnel_id)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("target", &self.target)
            .field("invite", &self.invite.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Reply status codes (docs/protocol.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Target connected (or account created); raw bytes follow.
    Ok = 0x00,
    /// Unknown user or wrong password; the two are deliberately not told apart.
    BadCredentials = 0x01,
    /// The user may not do this (a rule on the remote side).
    NotAllowed = 0x02,
    /// The target actively refused the connection.
    TargetRefused = 0x03,
    /// No route to the target host.
    HostUnreachable = 0x04,
    /// No route to the target network.
    NetworkUnreachable = 0x05,
    /// The target's host name did not resolve.
    NameNotResolved = 0x06,
    /// Connecting to the target took too long.
    TimedOut = 0x07,
    /// remote-proxy has no room for this tunnel now; retry after `retry_after` seconds.
    ServerBusy = 0x08,
    /// Too many requests; retry after `retry_after` seconds.
    RateLimited = 0x09,
    /// The request could not be parsed.
    Malformed = 0x0a,
    /// The request's version is not one this server speaks.
    UnsupportedVersion = 0x0b,
    /// Signup is switched off on this server.
    SignupDisabled = 0x0c,
    /// Signup for a name that is taken.
    UserExists = 0x0d,
    /// Anything else that went wrong on the remote side.
    GeneralFailure = 0x0e,
    /// The answer to a health probe from a remote-proxy that is shutting down: it takes no
    /// new tunnels.
    Draining = 0x0f,
    /// The answer, in plaintext, to a plaintext request sent to a remote-proxy that speaks
    /// only TLS: the request was not looked at.
    TlsRequired = 0x10,
    /// Too many failed logins for this user from this address (or from this address in
    /// all); retry after `retry_after` seconds. The password was not checked.
    TooManyFailedLogins = 0x11,
    /// A signup without a valid invite token where one is required, or with a token that
    /// is unknown, used up or expired.
    InviteRequired = 0x12,
    /// The user's volume quota for this period is used up. The reply is followed by when
    /// it resets (8 bytes, Unix seconds, big-endian; docs/protocol.md §4).
    QuotaExceeded = 0x13,
    /// remote-proxy cannot reach its user database, and this login was not verified
    /// before: refused (fail closed) until the database is back.
    Unavailable = 0x14,
}

impl TryFrom<u8> for Status {
    type Error = Error;
    fn try_from(b: u8) -> Result<Self, Error> {
        use Status::*;
        Result::Ok(match b {
            0x00 => Ok,
            0x01 => BadCredentials,
            0x02 => NotAllowed,
            0x03 => TargetRefused,
            0x04 => HostUnreachable,
            0x05 => NetworkUnreachable,
            0x06 => NameNotResolved,
            0x07 => TimedOut,
            0x08 => ServerBusy,
            0x09 => RateLimited,
            0x0a => Malformed,
            0x0b => UnsupportedVersion,
            0x0c => SignupDisabled,
            0x0d => UserExists,
            0x0e => GeneralFailure,
            0x0f => Draining,
            0x10 => TlsRequired,
            0x11 => TooManyFailedLogins,
            0x12 => InviteRequired,
            0x13 => QuotaExceeded,
            0x14 => Unavailable,
            other => return Err(Error::BadStatus(other)),
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Status::Ok => "ok",
            Status::BadCredentials => "bad credentials",
            Status::NotAllowed => "not allowed",
            Status::TargetRefused => "target refused the connection",
            Status::HostUnreachable => "target host unreachable",
            Status::NetworkUnreachable => "target network unreachable",
            Status::NameNotResolved => "target name not resolved",
            Status::TimedOut => "target timed out",
            Status::ServerBusy => "server busy",
            Status::RateLimited => "rate limited",
            Status::Malformed => "malformed request",
            Status::UnsupportedVersion => "unsupported protocol version",
            Status::SignupDisabled => "signup is disabled on this server",
            Status::UserExists => "user already exists",
            Status::GeneralFailure => "general failure",
            Status::Draining => "draining (shutting down)",
            Status::TlsRequired => "remote-proxy requires TLS (this side runs --plaintext)",
            Status::TooManyFailedLogins => "too many failed logins for this user",
            Status::InviteRequired => "signup needs a valid invite token",
            Status::QuotaExceeded => "quota exceeded",
            Status::Unavailable => "user database unavailable",
        };
        f.write_str(s)
    }
}

impl Status {
    /// The status that reports a failed target connect, keeping the `io::ErrorKind`. No
    /// descriptor for the socket (`EMFILE`, `ENFILE`) is `ServerBusy`: it passes.
    pub fn for_connect_error(e: &io::Error) -> Status {
        if crate::proto::is_out_of_descriptors(e) {
            return Status::ServerBusy;
        }
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Status::TargetRefused,
            io::ErrorKind::HostUnreachable => Status::HostUnreachable,
            io::ErrorKind::NetworkUnreachable => Status::NetworkUnreachable,
            io::ErrorKind::NotFound => Status::NameNotResolved,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Status::TimedOut,
            io::ErrorKind::AddrNotAvailable => Status::HostUnreachable,
            _ => Status::GeneralFailure,
        }
    }
}

/// A decoded reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The outcome.
    pub status: Status,
    /// Seconds to wait before retrying (`ServerBusy`, `RateLimited`); 0 otherwise.
    pub retry_after: u16,
    /// The address remote-proxy connected from (SOCKS BND.ADDR); unspecified when unknown.
    pub bound: SocketAddr,
    /// With `QuotaExceeded`: when the quota resets, Unix seconds (0 when unknown).
    pub resets_at: i64,
}

impl Reply {
    /// A reply with `status`, no retry hint and an unspecified bound address.
    pub fn status(status: Status) -> Reply {
        Reply {
            status,
            retry_after: 0,
            bound: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            resets_at: 0,
        }
    }
}

/// Why a request or reply could not be decoded.
#[derive(Debug)]
pub enum Error {
    /// The first two bytes are not `FG`.
    BadMagic,
    /// The first bytes are a TLS handshake record: a TLS client reached a plaintext server.
    TlsHandshake,
    /// A version this build does not speak.
    UnsupportedVersion(u8),
    /// A command byte we do not know.
    BadCommand(u8),
    /// A status byte we do not know.
    BadStatus(u8),
    /// An empty user name or password.
    EmptyCredential,
    /// Credentials that are not UTF-8.
    BadCredentialEncoding,
    /// A user name or password longer than [`MAX_CREDENTIAL`] bytes: refused by the encoder
    /// rather than cut (a cut could split a UTF-8 character, and would check a different
    /// password than the one the user typed).
    CredentialTooLong,
    /// A bad target address.
    BadAddress(addr::Error),
    /// The bytes ended early, or the socket failed or timed out.
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadMagic => write!(f, "not a flowgate tunnel request"),
            Error::TlsHandshake => write!(f, "a TLS handshake, not a plaintext tunnel request"),
            Error::UnsupportedVersion(v) => write!(f, "unsupported tunnel version {v}"),
            Error::BadCommand(c) => write!(f, "unknown tunnel command {c}"),
            Error::BadStatus(s) => write!(f, "unknown tunnel status {s}"),
            Error::EmptyCredential => write!(f, "empty user name or password"),
            Error::BadCredentialEncoding => write!(f, "credentials are not UTF-8"),
            Error::CredentialTooLong => write!(
                f,
                "user name or password longer than {MAX_CREDENTIAL} bytes"
            ),
            Error::BadAddress(e) => write!(f, "bad target address: {e}"),
            Error::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<addr::Error> for Error {
    fn from(e: addr::Error) -> Self {
        match e {
            addr::Error::Io(e) => Error::Io(e),
            other => Error::BadAddress(other),
        }
    }
}

impl Error {
    /// The status a server answers this decoding error with; `None` when the peer is gone or
    /// silent and no reply makes sense.
    pub fn reply_status(&self) -> Option<Status> {
        match self {
            Error::Io(_) => None,
            Error::UnsupportedVersion(_) => Some(Status::UnsupportedVersion),
            _ => Some(Status::Malformed),
        }
    }
}

/// Encodes a request (docs/protocol.md §2) into one buffer.
///
/// # Errors
/// `CredentialTooLong` when the user name or password does not fit its length byte.
pub fn encode_request(req: &Request) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(8 + req.user.len() + req.password.len() + 260);
    out.extend_from_slice(&MAGIC);
    out.push(req.version());
    let invite = req
        .invite
        .as_ref()
        .filter(|_| req.command == Command::Signup);
    out.push(match invite {
        Some(_) => SIGNUP_WITH_INVITE,
        None => req.command as u8,
    });
    if let Some(id) = req.tunnel_id {
        out.extend_from_slice(&id.0.to_be_bytes());
    }
    if matches!(req.command, Command::Health | Command::Warm) {
        return Ok(out); // no credentials, no target
    }
    for s in [Some(&req.user), Some(&req.password), invite]
        .into_iter()
        .flatten()
    {
        let len = u8::try_from(s.len()).map_err(|_| Error::CredentialTooLong)?;
        out.push(len);
        out.extend_from_slice(s.as_bytes());
    }
    if let Some(t) = &req.target {
        t.encode(&mut out);
    }
    Ok(out)
}

/// Sends a request with one `write_all`.
///
/// # Errors
/// As [`encode_request`], or `Io` when the write fails.
pub fn write_request<W: Write>(w: &mut W, req: &Request) -> Result<(), Error> {
    w.write_all(&encode_request(req)?)?;
    Ok(())
}

/// Reads a request (docs/protocol.md §2).
///
/// # Errors
/// `BadMagic`, `UnsupportedVersion`, `BadCommand`, `EmptyCredential`, `BadCredentialEncoding`
/// and `BadAddress` for bad bytes (answer them with [`Error::reply_status`]); `Io` when the
/// peer hangs up early or the read times out.
pub fn read_request<R: Read>(r: &mut R) -> Result<Request, Error> {
    let mut head = [0u8; 4];
    r.read_exact(&mut head[..2])?;
    if head[..2] != MAGIC {
        // A TLS record: content type 22 (handshake), then major version 3.
        if head[..2] == [0x16, 0x03] {
            return Err(Error::TlsHandshake);
        }
        return Err(Error::BadMagic);
    }
    r.read_exact(&mut head[2..3])?;
    let version = head[2];
    if version != VERSION && version != VERSION_1 {
        return Err(Error::UnsupportedVersion(version));
    }
    r.read_exact(&mut head[3..4])?;
    let with_invite = head[3] == SIGNUP_WITH_INVITE;
    let command = match with_invite {
        true => Command::Signup,
        false => Command::try_from(head[3])?,
    };
    let tunnel_id = if version == VERSION {
        let mut id = [0u8; 8];
        r.read_exact(&mut id)?;
        Some(TunnelId(u64::from_be_bytes(id)))
    } else {
        None
    };
    if matches!(command, Command::Health | Command::Warm) {
        if tunnel_id.is_none() {
            return Err(Error::BadCommand(command as u8)); // version 2 only
        }
        return Ok(Request {
            command,
            ..Request::health(tunnel_id)
        });
    }
    let user = read_credential(r)?;
    let password = read_credential(r)?;
    let invite = match with_invite {
        true => Some(read_credential(r)?),
        false => None,
    };
    let target = match command {
        Command::Connect => Some(TargetAddr::decode(r, false)?),
        Command::Signup | Command::Health | Command::Check | Command::Warm => None,
    };
    Ok(Request {
        command,
        tunnel_id,
        user,
        password,
        target,
        invite,
    })
}

fn read_credential<R: Read>(r: &mut R) -> Result<String, Error> {
    let mut len = [0u8; 1];
    r.read_exact(&mut len)?;
    if len[0] == 0 {
        return Err(Error::EmptyCredential);
    }
    let mut buf = vec![0u8; len[0] as usize];
    r.read_exact(&mut buf)?;
    String::from_utf8(buf).map_err(|_| Error::BadCredentialEncoding)
}

/// Encodes a reply (docs/protocol.md §4) into one buffer, in `version`: the request's, so a
/// version 1 local-proxy can read it.
pub fn encode_reply(reply: &Reply, version: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    out.push(version);
    out.push(reply.status as u8);
    out.extend_from_slice(&reply.retry_after.to_be_bytes());
    TargetAddr::Ip(reply.bound).encode(&mut out);
    if reply.status == Status::QuotaExceeded {
        out.extend_from_slice(&reply.resets_at.to_be_bytes());
    }
    out
}

/// Sends a reply in this build's version with one `write_all`.
pub fn write_reply<W: Write>(w: &mut W, reply: &Reply) -> io::Result<()> {
    w.write_all(&encode_reply(reply, VERSION))
}

/// Sends a reply in `version` (the request's, [`Request::version`]) with one `write_all`.
pub fn write_reply_to<W: Write>(w: &mut W, version: u8, reply: &Reply) -> io::Result<()> {
    w.write_all(&encode_reply(reply, version))
}

/// The bytes that follow an `ok` reply to `CHECK` (§2.2): the user's bandwidth in bytes per
/// second, 0 for unlimited.
pub fn encode_check_bandwidth(bytes_per_sec: Option<u64>) -> [u8; 8] {
    bytes_per_sec.unwrap_or(0).to_be_bytes()
}

/// Reads what follows an `ok` reply to `CHECK`: the bandwidth, `None` for unlimited.
///
/// # Errors
/// `Io` when the bytes end early or the read times out.
pub fn read_check_bandwidth<R: Read>(r: &mut R) -> Result<Option<u64>, Error> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    let v = u64::from_be_bytes(b);
    Ok((v != 0).then_some(v))
}

/// Reads a reply (docs/protocol.md §4).
///
/// # Errors
/// `UnsupportedVersion`, `BadStatus`, `BadAddress` for bad bytes; `Io` for a closed or
/// silent peer.
pub fn read_reply<R: Read>(r: &mut R) -> Result<Reply, Error> {
    let mut head = [0u8; 4];
    r.read_exact(&mut head)?;
    if head[0] != VERSION && head[0] != VERSION_1 {
        return Err(Error::UnsupportedVersion(head[0]));
    }
    let status = Status::try_from(head[1])?;
    let retry_after = u16::from_be_bytes([head[2], head[3]]);
    let bound = match TargetAddr::decode(r, true)? {
        TargetAddr::Ip(a) => a,
        TargetAddr::Domain(..) => return Err(Error::BadAddress(addr::Error::BadAddressType(3))),
    };
    let mut resets_at = 0;
    if status == Status::QuotaExceeded {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        resets_at = i64::from_be_bytes(b);
    }
    Ok(Reply {
        status,
        retry_after,
        bound,
        resets_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(target: &str) -> Request {
        Request {
            command: Command::Connect,
            tunnel_id: Some(TunnelId(0x0102_0304_0506_0708)),
            user: "alice".into(),
            password: "s3cret".into(),
            target: Some(TargetAddr::parse_authority(target, None).unwrap()),
            invite: None,
        }
    }

    /// Yields one byte per read, as a slow network might.
    struct OneByte<'a>(&'a [u8]);
    impl Read for OneByte<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.0[0];
            self.0 = &self.0[1..];
            Ok(1)
        }
    }

    #[test]
    fn request_roundtrips_for_every_target_kind() {
        for t in ["10.1.2.3:80", "[2001:db8::1]:443", "example.com:8080"] {
            let req = connect(t);
            let bytes = encode_request(&req).unwrap();
            assert_eq!(read_request(&mut &bytes[..]).unwrap(), req);
            assert_eq!(read_request(&mut OneByte(&bytes)).unwrap(), req);
        }
        let signup = Request {
            command: Command::Signup,
            tunnel_id: None,
            user: "bob".into(),
            password: "pw".into(),
            target: None,
            invite: None,
        };
        let bytes = encode_request(&signup).unwrap();
        assert_eq!(read_request(&mut &bytes[..]).unwrap(), signup);
        let invited = Request {
            invite: Some("fgi-0123".into()),
            ..signup
        };
        let bytes = encode_request(&invited).unwrap();
        assert_eq!(bytes, b"FG\x01\x05\x03bob\x02pw\x08fgi-0123");
        assert_eq!(read_request(&mut OneByte(&bytes)).unwrap(), invited);
        assert!(!format!("{invited:?}").contains("fgi-0123"));
    }

    #[test]
    fn request_wire_layout_matches_protocol_doc() {
        let bytes = encode_request(&connect("1.2.3.4:80")).unwrap();
        let mut expect = b"FG\x02\x01\x01\x02\x03\x04\x05\x06\x07\x08".to_vec();
        expect.extend_from_slice(b"\x05alice\x06s3cret\x01");
        expect.extend_from_slice(&[1, 2, 3, 4, 0, 80]);
        assert_eq!(bytes, expect);
    }

    #[test]
    fn a_version_1_request_is_read_and_answered_in_version_1() {
        let mut v1 = b"FG\x01\x01\x05alice\x06s3cret\x01".to_vec();
        v1.extend_from_slice(&[1, 2, 3, 4, 0, 80]);
        let req = read_request(&mut &v1[..]).unwrap();
        assert_eq!(req.tunnel_id, None);
        assert_eq!(req.version(), VERSION_1);
        assert_eq!(encode_request(&req).unwrap(), v1);
        let mut out = Vec::new();
        write_reply_to(&mut out, req.version(), &Reply::status(Status::Ok)).unwrap();
        assert_eq!(out[0], VERSION_1);
    }

    #[test]
    fn credentials_over_255_bytes_are_refused_not_cut() {
        // Regression: these were cut to 255 bytes. 254 ASCII bytes and a 2-byte character: 256 bytes, and a
        // cut at 255 would split the character.
        let mut req = connect("1.2.3.4:80");
        req.password = format!("{}é", "p".repeat(254));
        assert!(matches!(
            encode_request(&req),
            Err(Error::CredentialTooLong)
        ));
        req.user = "u".repeat(256);
        req.password = "pw".into();
        assert!(matches!(
            encode_request(&req),
            Err(Error::CredentialTooLong)
        ));
        // 255 bytes exactly still fit, and come back whole.
        req.user = "u".repeat(255);
        req.password = "p".repeat(255);
        let bytes = encode_request(&req).unwrap();
        assert_eq!(read_request(&mut &bytes[..]).unwrap(), req);
    }

    #[test]
    fn a_health_probe_is_twelve_bytes_and_roundtrips() {
        let probe = Request::health(Some(TunnelId(9)));
        let bytes = encode_request(&probe).unwrap();
        assert_eq!(bytes, b"FG\x02\x03\x00\x00\x00\x00\x00\x00\x00\x09");
        assert_eq!(bytes.len(), HEALTH_PROBE_LEN);
        assert_eq!(bytes[..4], HEALTH_PROBE_START);
        assert_eq!(read_request(&mut &bytes[..]).unwrap(), probe);
        for cut in 0..bytes.len() {
            assert!(matches!(
                read_request(&mut &bytes[..cut]),
                Err(Error::Io(_))
            ));
        }
        // Version 1 has no health command.
        assert!(matches!(
            read_request(&mut &b"FG\x01\x03"[..]),
            Err(Error::BadCommand(3))
        ));
    }

    #[test]
    fn a_warm_announcement_is_twelve_bytes_and_version_2_only() {
        let warm = Request::warm();
        let bytes = encode_request(&warm).unwrap();
        assert_eq!(bytes, b"FG\x02\x06\x00\x00\x00\x00\x00\x00\x00\x00");
        assert_eq!(read_request(&mut OneByte(&bytes)).unwrap(), warm);
        // Followed by the real request on the same connection, each is read whole.
        let mut both = bytes.clone();
        both.extend_from_slice(&encode_request(&connect("1.2.3.4:80")).unwrap());
        let mut r = &both[..];
        assert_eq!(read_request(&mut r).unwrap(), warm);
        assert_eq!(read_request(&mut r).unwrap(), connect("1.2.3.4:80"));
        assert!(matches!(
            read_request(&mut &b"FG\x01\x06"[..]),
            Err(Error::BadCommand(6))
        ));
    }

    #[test]
    fn a_check_carries_credentials_and_no_target_and_its_answer_a_bandwidth() {
        let check = Request {
            command: Command::Check,
            tunnel_id: Some(TunnelId(1)),
            user: "alice".into(),
            password: "pw".into(),
            target: None,
            invite: None,
        };
        let bytes = encode_request(&check).unwrap();
        assert_eq!(&bytes[..4], b"FG\x02\x04");
        assert_eq!(read_request(&mut &bytes[..]).unwrap(), check);
        let bw = encode_check_bandwidth(Some(1_000_000));
        assert_eq!(read_check_bandwidth(&mut &bw[..]).unwrap(), Some(1_000_000));
        let unlimited = encode_check_bandwidth(None);
        assert_eq!(read_check_bandwidth(&mut &unlimited[..]).unwrap(), None);
    }

    #[test]
    fn every_strict_prefix_of_a_request_is_an_io_error() {
        let bytes = encode_request(&connect("example.com:80")).unwrap();
        for cut in 0..bytes.len() {
            match read_request(&mut &bytes[..cut]) {
                Err(Error::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
                other => panic!("prefix {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_requests_get_their_own_error() {
        let ok = encode_request(&connect("1.2.3.4:80")).unwrap();
        let with = |i: usize, b: u8| {
            let mut v = ok.clone();
            v[i] = b;
            read_request(&mut &v[..])
        };
        assert!(matches!(with(0, b'G'), Err(Error::BadMagic)));
        let hello = [0x16, 0x03, 0x01, 0x00, 0xf4, 0x01];
        assert!(matches!(
            read_request(&mut &hello[..]),
            Err(Error::TlsHandshake)
        ));
        assert!(matches!(with(2, 9), Err(Error::UnsupportedVersion(9))));
        assert!(matches!(with(3, 7), Err(Error::BadCommand(7))));
        // After the 8-byte tunnel id: the user name's length, then its first byte.
        assert!(matches!(with(12, 0), Err(Error::EmptyCredential)));
        assert!(matches!(with(13, 0xff), Err(Error::BadCredentialEncoding)));
        let atyp = ok.len() - 7;
        assert!(matches!(
            with(atyp, 9),
            Err(Error::BadAddress(addr::Error::BadAddressType(9)))
        ));
        let mut zero_port = ok.clone();
        let n = zero_port.len();
        zero_port[n - 1] = 0;
        assert!(matches!(
            read_request(&mut &zero_port[..]),
            Err(Error::BadAddress(addr::Error::BadPort))
        ));
        assert!(matches!(
            read_request(&mut &b"GET / HTTP/1.1\r\n"[..]),
            Err(Error::BadMagic)
        ));
    }

    #[test]
    fn decoding_errors_map_to_reply_statuses() {
        assert_eq!(Error::BadMagic.reply_status(), Some(Status::Malformed));
        assert_eq!(
            Error::UnsupportedVersion(2).reply_status(),
            Some(Status::UnsupportedVersion)
        );
        assert_eq!(
            Error::Io(io::ErrorKind::TimedOut.into()).reply_status(),
            None
        );
    }

    #[test]
    fn reply_roundtrips_and_prefixes_fail() {
        let r = Reply {
            status: Status::RateLimited,
            retry_after: 17,
            bound: "[::1]:5555".parse().unwrap(),
            resets_at: 0,
        };
        let quota = Reply {
            resets_at: 1_798_761_600,
            ..Reply::status(Status::QuotaExceeded)
        };
        for r in [r, quota] {
            let bytes = encode_reply(&r, VERSION);
            assert_eq!(read_reply(&mut &bytes[..]).unwrap(), r);
            assert_eq!(read_reply(&mut OneByte(&bytes)).unwrap(), r);
            for cut in 0..bytes.len() {
                assert!(read_reply(&mut &bytes[..cut]).is_err());
            }
        }
        let plain = encode_reply(&Reply::status(Status::Ok), VERSION);
        assert_eq!(plain, vec![2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn every_status_byte_roundtrips() {
        for b in 0u8..=0x14 {
            let s = Status::try_from(b).unwrap();
            assert_eq!(s as u8, b);
            assert!(!s.to_string().is_empty());
        }
        assert!(Status::try_from(0x15).is_err());
    }

    #[test]
    fn connect_errors_keep_their_kind() {
        use io::ErrorKind::*;
        assert_eq!(
            Status::for_connect_error(&ConnectionRefused.into()),
            Status::TargetRefused
        );
        assert_eq!(
            Status::for_connect_error(&TimedOut.into()),
            Status::TimedOut
        );
        assert_eq!(
            Status::for_connect_error(&NotFound.into()),
            Status::NameNotResolved
        );
        assert_eq!(
            Status::for_connect_error(&HostUnreachable.into()),
            Status::HostUnreachable
        );
        assert_eq!(
            Status::for_connect_error(&NetworkUnreachable.into()),
            Status::NetworkUnreachable
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let s = format!("{:?}", connect("1.2.3.4:80"));
        assert!(!s.contains("s3cret"));
        assert!(s.contains("redacted"));
    }
}
