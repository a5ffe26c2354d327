//! SOCKS5 server side: RFC 1928 §3–6 (greeting, request, reply) and RFC 1929 (username and
//! password sub-negotiation).
//!
//! In scope: message encoding and decoding, and choosing reply codes ([`Reply::for_status`],
//! [`Reply::for_io_error`]). Out of scope: sockets and what to do with a request (local/).
//! Only CONNECT is carried; BIND and UDP ASSOCIATE get [`Reply::CommandNotSupported`].

use crate::proto::addr::{self, TargetAddr};
use crate::proto::tunnel::Status;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

/// Protocol version byte (RFC 1928 §3).
pub const VERSION: u8 = 0x05;
/// Version of the username/password sub-negotiation (RFC 1929 §2).
pub const USERPASS_VERSION: u8 = 0x01;

/// Authentication methods (RFC 1928 §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `X'00'` NO AUTHENTICATION REQUIRED.
    NoAuth = 0x00,
    /// `X'02'` USERNAME/PASSWORD (RFC 1929).
    UserPass = 0x02,
    /// `X'FF'` NO ACCEPTABLE METHODS.
    NoAcceptable = 0xff,
}

/// Request commands (RFC 1928 §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `X'01'` CONNECT.
    Connect,
    /// `X'02'` BIND.
    Bind,
    /// `X'03'` UDP ASSOCIATE.
    UdpAssociate,
    /// Any other byte.
    Unknown(u8),
}

impl From<u8> for Command {
    fn from(b: u8) -> Self {
        match b {
            0x01 => Command::Connect,
            0x02 => Command::Bind,
            0x03 => Command::UdpAssociate,
            other => Command::Unknown(other),
        }
    }
}

/// Reply codes (RFC 1928 §6, field REP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `X'00'` succeeded.
    Succeeded = 0x00,
    /// `X'01'` general SOCKS server failure.
    GeneralFailure = 0x01,
    /// `X'02'` connection not allowed by ruleset.
    NotAllowed = 0x02,
    /// `X'03'` Network unreachable.
    NetworkUnreachable = 0x03,
    /// `X'04'` Host unreachable.
    HostUnreachable = 0x04,
    /// `X'05'` Connection refused.
    ConnectionRefused = 0x05,
    /// `X'06'` TTL expired (used for time-outs, as most servers do).
    TtlExpired = 0x06,
    /// `X'07'` Command not supported.
    CommandNotSupported = 0x07,
    /// `X'08'` Address type not supported.
    AddressTypeNotSupported = 0x08,
}

impl Reply {
    /// The one place a tunnel status becomes a SOCKS5 reply code.
    pub fn for_status(status: Status) -> Reply {
        match status {
            Status::Ok => Reply::Succeeded,
            Status::BadCredentials
            | Status::NotAllowed
            | Status::RateLimited
            | Status::TooManyFailedLogins
            | Status::QuotaExceeded => Reply::NotAllowed,
            Status::TargetRefused => Reply::ConnectionRefused,
            Status::HostUnreachable | Status::NameNotResolved => Reply::HostUnreachable,
            Status::NetworkUnreachable => Reply::NetworkUnreachable,
            Status::TimedOut => Reply::TtlExpired,
            Status::ServerBusy
            | Status::Draining
            | Status::Unavailable
            | Status::Malformed
            | Status::UnsupportedVersion
            | Status::SignupDisabled
            | Status::UserExists
            | Status::InviteRequired
            | Status::GeneralFailure
            | Status::TlsRequired => Reply::GeneralFailure,
        }
    }

    /// The one place a local failure (reaching remote-proxy) becomes a SOCKS5 reply, keeping
    /// the `io::ErrorKind`: a timeout is TTL expired; anything else, running out of
    /// descriptors ("server busy") included, is a general failure, SOCKS5 having no busy code.
    pub fn for_io_error(e: &io::Error) -> Reply {
        if crate::proto::is_timeout(e) {
            Reply::TtlExpired
        } else {
            Reply::GeneralFailure
        }
    }
}

/// A CONNECT (or other) request after the greeting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The command asked for.
    pub command: Command,
    /// Where to go.
    pub target: TargetAddr,
}

/// Why a SOCKS5 exchange failed.
#[derive(Debug)]
pub enum Error {
    /// A version byte other than 5 (or 1 in the RFC 1929 sub-negotiation).
    BadVersion(u8),
    /// A greeting listing no methods.
    NoMethods,
    /// The request's address type is unknown (answer [`Reply::AddressTypeNotSupported`]).
    BadAddressType(u8),
    /// The request's host name or port is invalid (answer [`Reply::GeneralFailure`]).
    BadAddress(addr::Error),
    /// An empty user name or password, or one that is not UTF-8.
    BadCredentials,
    /// The client hung up, or a read timed out.
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadVersion(v) => write!(f, "bad socks version {v}"),
            Error::NoMethods => write!(f, "no authentication methods offered"),
            Error::BadAddressType(t) => write!(f, "unsupported address type {t:#04x}"),
            Error::BadAddress(e) => write!(f, "bad address: {e}"),
            Error::BadCredentials => write!(f, "empty or non-UTF-8 user name or password"),
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
            addr::Error::BadAddressType(t) => Error::BadAddressType(t),
            other => Error::BadAddress(other),
        }
    }
}

impl Error {
    /// The reply to send before closing, if the client is still there to read one.
    pub fn reply(&self) -> Option<Reply> {
        match self {
            Error::BadAddressType(_) => Some(Reply::AddressTypeNotSupported),
            Error::BadAddress(_) => Some(Reply::GeneralFailure),
            _ => None,
        }
    }
}

/// Reads the greeting (RFC 1928 §3): VER, NMETHODS, METHODS. Returns the method bytes.
pub fn read_greeting<R: Read>(r: &mut R) -> Result<Vec<u8>, Error> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head)?;
    if head[0] != VERSION {
        return Err(Error::BadVersion(head[0]));
    }
    if head[1] == 0 {
        return Err(Error::NoMethods);
    }
    let mut methods = vec![0u8; head[1] as usize];
    r.read_exact(&mut methods)?;
    Ok(methods)
}

/// Sends the method selection (RFC 1928 §3).
pub fn write_method<W: Write>(w: &mut W, method: Method) -> io::Result<()> {
    w.write_all(&[VERSION, method as u8])
}

/// Reads the RFC 1929 §2 username/password request. `Debug` of the result is not redacted:
/// never log it.
pub fn read_userpass<R: Read>(r: &mut R) -> Result<(String, String), Error> {
    let mut ver = [0u8; 1];
    r.read_exact(&mut ver)?;
    if ver[0] != USERPASS_VERSION {
        return Err(Error::BadVersion(ver[0]));
    }
    let mut field = || -> Result<String, Error> {
        let mut len = [0u8; 1];
        r.read_exact(&mut len)?;
        let mut b = vec![0u8; len[0] as usize];
        r.read_exact(&mut b)?;
        match String::from_utf8(b) {
            Ok(s) if !s.is_empty() => Ok(s),
            _ => Err(Error::BadCredentials),
        }
    };
    let user = field();
    let pass = field();
    Ok((user?, pass?))
}

/// Sends the RFC 1929 §2 status: 0 for success, 1 for failure.
pub fn write_userpass_status<W: Write>(w: &mut W, ok: bool) -> io::Result<()> {
    w.write_all(&[USERPASS_VERSION, if ok { 0 } else { 1 }])
}

/// Reads a request (RFC 1928 §4): VER, CMD, RSV, ATYP, DST.ADDR, DST.PORT.
pub fn read_request<R: Read>(r: &mut R) -> Result<Request, Error> {
    let mut head = [0u8; 3];
    r.read_exact(&mut head)?;
    if head[0] != VERSION {
        return Err(Error::BadVersion(head[0]));
    }
    let target = TargetAddr::decode(r, false)?;
    Ok(Request {
        command: Command::from(head[1]),
        target,
    })
}

/// Sends a reply (RFC 1928 §6) in one write.
pub fn write_reply<W: Write>(w: &mut W, reply: Reply, bound: SocketAddr) -> io::Result<()> {
    let mut out = Vec::with_capacity(22);
    out.extend_from_slice(&[VERSION, reply as u8, 0x00]);
    TargetAddr::Ip(bound).encode(&mut out);
    w.write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_greeting_and_methods() {
        assert_eq!(read_greeting(&mut &[5u8, 2, 0, 2][..]).unwrap(), vec![0, 2]);
        assert!(matches!(
            read_greeting(&mut &[4u8, 1, 0][..]),
            Err(Error::BadVersion(4))
        ));
        assert!(matches!(
            read_greeting(&mut &[5u8, 0][..]),
            Err(Error::NoMethods)
        ));
        assert!(matches!(
            read_greeting(&mut &[5u8, 2, 0][..]),
            Err(Error::Io(_))
        ));
    }

    #[test]
    fn reads_userpass() {
        let msg = b"\x01\x05alice\x02pw";
        assert_eq!(
            read_userpass(&mut &msg[..]).unwrap(),
            ("alice".to_string(), "pw".to_string())
        );
        for cut in 0..msg.len() {
            assert!(read_userpass(&mut &msg[..cut]).is_err());
        }
        assert!(matches!(
            read_userpass(&mut &b"\x01\x00\x02pw"[..]),
            Err(Error::BadCredentials)
        ));
        assert!(matches!(
            read_userpass(&mut &b"\x05\x01a\x01b"[..]),
            Err(Error::BadVersion(5))
        ));
    }

    #[test]
    fn reads_connect_requests_for_each_address_type() {
        let v4 = [5u8, 1, 0, 1, 127, 0, 0, 1, 0x1f, 0x90];
        let r = read_request(&mut &v4[..]).unwrap();
        assert_eq!(r.command, Command::Connect);
        assert_eq!(r.target, TargetAddr::Ip("127.0.0.1:8080".parse().unwrap()));
        let mut dom = vec![5u8, 1, 0, 3, 9];
        dom.extend_from_slice(b"localhost");
        dom.extend_from_slice(&[0, 80]);
        assert_eq!(
            read_request(&mut &dom[..]).unwrap().target,
            TargetAddr::Domain("localhost".into(), 80)
        );
        let mut v6 = vec![5u8, 3, 0, 4];
        v6.extend_from_slice(&[0; 15]);
        v6.extend_from_slice(&[1, 0, 22]);
        let r = read_request(&mut &v6[..]).unwrap();
        assert_eq!(r.command, Command::UdpAssociate);
        assert_eq!(r.target, TargetAddr::Ip("[::1]:22".parse().unwrap()));
        for cut in 0..dom.len() {
            assert!(read_request(&mut &dom[..cut]).is_err());
        }
    }

    #[test]
    fn bad_requests_get_their_reply_code() {
        let e = read_request(&mut &[5u8, 1, 0, 9, 0, 0][..]).unwrap_err();
        assert_eq!(e.reply(), Some(Reply::AddressTypeNotSupported));
        let e = read_request(&mut &[5u8, 1, 0, 1, 1, 2, 3, 4, 0, 0][..]).unwrap_err();
        assert_eq!(e.reply(), Some(Reply::GeneralFailure));
        let e = read_request(&mut &[5u8, 1][..]).unwrap_err();
        assert_eq!(e.reply(), None);
    }

    #[test]
    fn writes_replies_in_rfc_layout() {
        let mut out = Vec::new();
        write_reply(
            &mut out,
            Reply::ConnectionRefused,
            "10.0.0.1:1080".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(out, vec![5, 5, 0, 1, 10, 0, 0, 1, 0x04, 0x38]);
        let mut out = Vec::new();
        write_method(&mut out, Method::NoAcceptable).unwrap();
        write_userpass_status(&mut out, false).unwrap();
        assert_eq!(out, vec![5, 0xff, 1, 1]);
    }

    #[test]
    fn status_mapping_matches_the_documented_table() {
        assert_eq!(Reply::for_status(Status::Ok), Reply::Succeeded);
        assert_eq!(Reply::for_status(Status::BadCredentials), Reply::NotAllowed);
        assert_eq!(Reply::for_status(Status::NotAllowed), Reply::NotAllowed);
        assert_eq!(Reply::for_status(Status::RateLimited), Reply::NotAllowed);
        assert_eq!(
            Reply::for_status(Status::NetworkUnreachable),
            Reply::NetworkUnreachable
        );
        assert_eq!(
            Reply::for_status(Status::HostUnreachable),
            Reply::HostUnreachable
        );
        assert_eq!(
            Reply::for_status(Status::NameNotResolved),
            Reply::HostUnreachable
        );
        assert_eq!(
            Reply::for_status(Status::TargetRefused),
            Reply::ConnectionRefused
        );
        assert_eq!(Reply::for_status(Status::TimedOut), Reply::TtlExpired);
        assert_eq!(Reply::for_status(Status::ServerBusy), Reply::GeneralFailure);
        assert_eq!(
            Reply::for_io_error(&io::ErrorKind::TimedOut.into()),
            Reply::TtlExpired
        );
    }
}
