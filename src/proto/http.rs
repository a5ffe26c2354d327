//! HTTP proxy requests: `CONNECT host:port` tunnels (RFC 9110 §9.3.6) and absolute-form
//! requests (`GET http://host/path`, RFC 9112 §3.2.2) to forward, with `Proxy-Authorization:
//! Basic` (RFC 7617) credentials.
//!
//! In scope: a bounded head reader, a head parser on bytes, rewriting a forwarded request to
//! origin-form, and choosing response statuses ([`status_for`]). Out of scope: sockets and
//! TLS (`https://` absolute-form is refused; browsers use CONNECT for https).
//! A forwarded request gets `Connection: close`, so each client connection carries requests
//! to one origin only and the proxy never has to parse responses.

use crate::proto::addr::{self, TargetAddr};
use crate::proto::tunnel::Status;
use crate::proto::{is_out_of_descriptors, is_timeout};
use std::fmt;
use std::io::{self, Read, Write};

/// Largest request head we accept, in bytes; over it the client gets 431.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header lines we accept.
pub const MAX_HEADERS: usize = 100;

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Request method, e.g. `CONNECT` or `GET`.
    pub method: String,
    /// Request target as sent: authority-form, absolute-form or origin-form.
    pub target: String,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: String,
    /// Header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the client asked the proxy to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyRequest {
    /// Open a raw tunnel to the target and answer 200.
    Connect(TargetAddr),
    /// Send `head` (rewritten to origin-form) to the target, then relay raw bytes.
    Forward {
        /// The origin to connect to.
        target: TargetAddr,
        /// The request head to send to the origin, ending with the blank line.
        head: Vec<u8>,
    },
}

/// Why a request head was refused; [`Error::status`] gives the response code.
#[derive(Debug)]
pub enum Error {
    /// Head is larger than [`MAX_HEAD`] or has more than [`MAX_HEADERS`] lines.
    HeadTooLarge,
    /// The head is not HTTP/1.x syntax.
    BadSyntax(&'static str),
    /// The request target is not something a proxy can serve.
    BadTarget(&'static str),
    /// The target's host or port is invalid.
    BadAddress(addr::Error),
    /// `Proxy-Authorization` is present but not valid Basic credentials.
    BadAuthorization,
    /// The client hung up, or a read timed out.
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::HeadTooLarge => write!(f, "request head too large"),
            Error::BadSyntax(s) => write!(f, "malformed request: {s}"),
            Error::BadTarget(s) => write!(f, "bad request target: {s}"),
            Error::BadAddress(e) => write!(f, "bad request target: {e}"),
            Error::BadAuthorization => write!(f, "malformed Proxy-Authorization"),
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

impl Error {
    /// The response status for this error; `None` when the client is gone.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::HeadTooLarge => Some(431),
            Error::BadSyntax(_) | Error::BadTarget(_) | Error::BadAddress(_) => Some(400),
            Error::BadAuthorization => Some(407),
            Error::Io(e) if is_timeout(e) => Some(408),
            Error::Io(_) => None,
        }
    }
}

/// Parses a complete head from the start of `buf`.
///
/// Returns `Ok(None)` when the blank line has not arrived yet, or `Ok(Some((len, head)))`
/// where `len` counts the head's bytes; anything after `len` belongs to the body or tunnel.
pub fn try_parse_head(buf: &[u8]) -> Result<Option<(usize, Head)>, Error> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(Error::HeadTooLarge);
        }
        return Ok(None);
    };
    let len = end + 4;
    if len > MAX_HEAD {
        return Err(Error::HeadTooLarge);
    }
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| Error::BadSyntax("not UTF-8"))?;
    // A CR or LF that is not part of a CRLF would end a line for some origins and not for
    // us: a forwarded head could smuggle a header past the proxy. Other control characters
    // (tab aside) have no business in a head either.
    let bare = |line: &str| line.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f);
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    if bare(request_line) {
        return Err(Error::BadSyntax(
            "control character (bare CR or LF) in the request line",
        ));
    }
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::BadSyntax("request line"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(Error::BadSyntax("method"));
    }
    if target.is_empty() {
        return Err(Error::BadSyntax("request target"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(Error::BadSyntax("version"));
    }
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() >= MAX_HEADERS {
            return Err(Error::HeadTooLarge);
        }
        if line.starts_with([' ', '\t']) {
            return Err(Error::BadSyntax("obsolete line folding"));
        }
        if bare(line) {
            return Err(Error::BadSyntax(
                "control character (bare CR or LF) in a header",
            ));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(Error::BadSyntax("header line"))?;
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(Error::BadSyntax("header name"));
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    Ok(Some((
        len,
        Head {
            method: method.to_string(),
            target: target.to_string(),
            version: version.to_string(),
            headers,
        },
    )))
}

/// Reads from `r` into `buf` until a whole head has arrived.
///
/// Returns the head and its length in `buf`; bytes after it are already in `buf` and must be
/// forwarded, not dropped (a pipelined body or a TLS ClientHello).
pub fn read_head<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<(usize, Head), Error> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(done) = try_parse_head(buf)? {
            return Ok(done);
        }
        let n = r.read(&mut chunk)?;
        if n == 0 {
            return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Headers that concern only the hop to the proxy and are not forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "proxy-authorization",
    "proxy-connection",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
];

/// Decides what a head asks for.
pub fn interpret(head: &Head) -> Result<ProxyRequest, Error> {
    if head.method.eq_ignore_ascii_case("CONNECT") {
        let target = TargetAddr::parse_authority(&head.target, None).map_err(Error::BadAddress)?;
        return Ok(ProxyRequest::Connect(target));
    }
    let lower = head.target.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(Error::BadTarget("https:// needs CONNECT"));
    }
    if !lower.starts_with("http://") {
        return Err(Error::BadTarget("not an absolute-form http:// URL"));
    }
    let rest = &head.target["http://".len()..];
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(Error::BadTarget("userinfo in URL"));
    }
    let target = TargetAddr::parse_authority(authority, Some(80)).map_err(Error::BadAddress)?;
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    let mut out = format!("{} {} {}\r\n", head.method, path, head.version);
    if head.header("host").is_none() {
        out.push_str(&format!("Host: {authority}\r\n"));
    }
    for (name, value) in &head.headers {
        if !HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h)) {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    Ok(ProxyRequest::Forward {
        target,
        head: out.into_bytes(),
    })
}

/// Basic credentials from `Proxy-Authorization`, if the header is there.
///
/// # Errors
/// `BadAuthorization` when the header is present but is not `Basic base64(user:password)`.
pub fn proxy_credentials(head: &Head) -> Result<Option<(String, String)>, Error> {
    let Some(value) = head.header("proxy-authorization") else {
        return Ok(None);
    };
    let (scheme, token) = value.split_once(' ').ok_or(Error::BadAuthorization)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(Error::BadAuthorization);
    }
    let raw = base64_decode(token.trim()).ok_or(Error::BadAuthorization)?;
    let text = String::from_utf8(raw).map_err(|_| Error::BadAuthorization)?;
    let (user, pass) = text.split_once(':').ok_or(Error::BadAuthorization)?;
    if user.is_empty() || pass.is_empty() {
        return Err(Error::BadAuthorization);
    }
    Ok(Some((user.to_string(), pass.to_string())))
}

/// Standard base64 with padding (RFC 4648 §4); `None` on any bad character or length.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let b = s.as_bytes();
    if b.is_empty() || b.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (i, quad) in b.chunks(4).enumerate() {
        let last = i == b.len() / 4 - 1;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

/// The one place a tunnel status becomes an HTTP status code.
pub fn status_for(status: Status) -> u16 {
    match status {
        Status::Ok => 200,
        Status::BadCredentials => 407,
        Status::NotAllowed
        | Status::SignupDisabled
        | Status::UserExists
        | Status::InviteRequired
        | Status::QuotaExceeded => 403,
        Status::RateLimited | Status::TooManyFailedLogins => 429,
        Status::TargetRefused
        | Status::HostUnreachable
        | Status::NetworkUnreachable
        | Status::NameNotResolved
        | Status::Malformed
        | Status::UnsupportedVersion
        | Status::GeneralFailure
        | Status::TlsRequired => 502,
        Status::ServerBusy | Status::Draining | Status::Unavailable => 503,
        Status::TimedOut => 504,
    }
}

/// The one place a local failure (reaching remote-proxy) becomes an HTTP status, keeping the
/// `io::ErrorKind`: a timeout is 504, running out of descriptors is 503 (busy, retry), the rest
/// 502.
pub fn status_for_io_error(e: &io::Error) -> u16 {
    if is_timeout(e) {
        504
    } else if is_out_of_descriptors(e) {
        503
    } else {
        502
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "Connection established",
        400 => "Bad Request",
        403 => "Forbidden",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Writes a complete response head; for errors, a one-line text body saying why.
///
/// 407 carries `Proxy-Authenticate`; 429 and 503 carry `Retry-After` when `retry_after` is
/// above zero.
pub fn write_status<W: Write>(
    w: &mut W,
    code: u16,
    detail: &str,
    retry_after: u16,
) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {code} {}\r\n", reason(code));
    if code == 200 {
        out.push_str("\r\n");
        return w.write_all(out.as_bytes());
    }
    if code == 407 {
        out.push_str("Proxy-Authenticate: Basic realm=\"flowgate\"\r\n");
    }
    if (code == 429 || code == 503) && retry_after > 0 {
        out.push_str(&format!("Retry-After: {retry_after}\r\n"));
    }
    let body = format!("flowgate: {detail}\n");
    out.push_str(&format!(
        "Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    w.write_all(out.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Head {
        try_parse_head(s.as_bytes()).unwrap().unwrap().1
    }

    #[test]
    fn parses_connect_and_keeps_trailing_bytes() {
        let raw = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01";
        let (len, head) = try_parse_head(raw).unwrap().unwrap();
        assert_eq!(&raw[len..], b"\x16\x03\x01");
        assert_eq!(
            interpret(&head).unwrap(),
            ProxyRequest::Connect(TargetAddr::Domain("example.com".into(), 443))
        );
    }

    #[test]
    fn incomplete_head_asks_for_more_at_every_prefix() {
        let raw = b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n";
        for cut in 0..raw.len() {
            assert!(
                try_parse_head(&raw[..cut]).unwrap().is_none(),
                "prefix {cut}"
            );
        }
    }

    #[test]
    fn reads_a_head_one_byte_at_a_time() {
        struct OneByte<'a>(&'a [u8]);
        impl Read for OneByte<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Ok(0);
                }
                buf[0] = self.0[0];
                self.0 = &self.0[1..];
                Ok(1)
            }
        }
        let raw = b"CONNECT [::1]:22 HTTP/1.1\r\n\r\nxyz";
        let mut buf = Vec::new();
        let (len, head) = read_head(&mut OneByte(raw), &mut buf).unwrap();
        assert_eq!(head.target, "[::1]:22");
        assert_eq!(len, raw.len() - 3);
        let mut buf = Vec::new();
        assert!(matches!(
            read_head(&mut OneByte(b"GET /"), &mut buf),
            Err(Error::Io(_))
        ));
    }

    #[test]
    fn rewrites_absolute_form_to_origin_form() {
        let head = parse(
            "GET http://example.com:8080/a/b?c=1 HTTP/1.1\r\nHost: example.com:8080\r\n\
             Proxy-Authorization: Basic YTpi\r\nProxy-Connection: keep-alive\r\n\
             Connection: keep-alive\r\nAccept: */*\r\n\r\n",
        );
        let ProxyRequest::Forward { target, head } = interpret(&head).unwrap() else {
            panic!("not a forward")
        };
        assert_eq!(target, TargetAddr::Domain("example.com".into(), 8080));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET /a/b?c=1 HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\n\
             Connection: close\r\n\r\n"
        );
        let head = parse("GET http://10.0.0.1 HTTP/1.0\r\n\r\n");
        let ProxyRequest::Forward { target, head } = interpret(&head).unwrap() else {
            panic!("not a forward")
        };
        assert_eq!(target, TargetAddr::Ip("10.0.0.1:80".parse().unwrap()));
        assert!(String::from_utf8(head)
            .unwrap()
            .starts_with("GET / HTTP/1.0\r\nHost: 10.0.0.1\r\n"));
    }

    #[test]
    fn bad_heads_get_their_own_status() {
        let status = |s: &str| {
            try_parse_head(s.as_bytes())
                .map(|_| ())
                .unwrap_err()
                .status()
        };
        assert_eq!(status("GET  HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(status("GET / HTTP/2\r\n\r\n"), Some(400));
        assert_eq!(status("GET / HTTP/1.1\r\nno colon\r\n\r\n"), Some(400));
        // Header injection: a bare LF or CR inside a line, or another control character.
        assert_eq!(status("GET / HTTP/1.1\r\nA: b\nEvil: c\r\n\r\n"), Some(400));
        assert_eq!(status("GET / HTTP/1.1\r\nA: b\rEvil: c\r\n\r\n"), Some(400));
        assert_eq!(status("GET /\n HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(status("GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n"), Some(400));
        assert!(try_parse_head(b"GET / HTTP/1.1\r\nA: b\tc\r\n\r\n").is_ok());
        assert_eq!(
            status("GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n"),
            Some(400)
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(&big), Some(431));
        let endless = "a".repeat(MAX_HEAD + 1);
        assert_eq!(status(&endless), Some(431));
        let interp = |s: &str| interpret(&parse(s)).unwrap_err().status();
        assert_eq!(interp("GET /path HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(interp("GET https://x/ HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(interp("CONNECT example.com HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(interp("GET http://u:p@x/ HTTP/1.1\r\n\r\n"), Some(400));
    }

    #[test]
    fn decodes_basic_credentials() {
        let h =
            parse("CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6cHc6eA==\r\n\r\n");
        assert_eq!(
            proxy_credentials(&h).unwrap(),
            Some(("alice".to_string(), "pw:x".to_string()))
        );
        let none = parse("CONNECT a:1 HTTP/1.1\r\n\r\n");
        assert_eq!(proxy_credentials(&none).unwrap(), None);
        for bad in [
            "Bearer abc",
            "Basic !!!!",
            "Basic YWxpY2U=",
            "Basic",
            "Basic YQ",
        ] {
            let h = parse(&format!(
                "CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: {bad}\r\n\r\n"
            ));
            assert!(
                matches!(proxy_credentials(&h), Err(Error::BadAuthorization)),
                "{bad}"
            );
        }
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (enc, dec) in [
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg==", "foob"),
            ("Zm9vYmE=", "fooba"),
            ("Zm9vYmFy", "foobar"),
        ] {
            assert_eq!(base64_decode(enc).unwrap(), dec.as_bytes());
        }
        assert!(base64_decode("Zg=a").is_none());
        assert!(base64_decode("Zg==Zg==").is_none());
    }

    #[test]
    fn responses_carry_the_headers_clients_need() {
        let mut out = Vec::new();
        write_status(&mut out, 407, "bad credentials", 0).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 407 "));
        assert!(s.contains("Proxy-Authenticate: Basic"));
        let mut out = Vec::new();
        write_status(&mut out, 429, "rate limited", 12).unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Retry-After: 12\r\n"));
        let mut out = Vec::new();
        write_status(&mut out, 200, "", 0).unwrap();
        assert_eq!(out, b"HTTP/1.1 200 Connection established\r\n\r\n");
        assert_eq!(status_for(Status::TimedOut), 504);
        assert_eq!(status_for(Status::ServerBusy), 503);
        assert_eq!(status_for(Status::TargetRefused), 502);
        assert_eq!(status_for(Status::NotAllowed), 403);
    }
}
