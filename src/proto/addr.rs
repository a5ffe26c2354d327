//! Target addresses shared by every protocol, and their on-wire form.
//!
//! The wire form is the SOCKS5 one (RFC 1928 §5: ATYP, address, port), which the tunnel
//! protocol reuses (docs/protocol.md §3), so one encoder and one decoder serve both.
//! Also here: host-name checks. Out of scope: resolving and connecting (net/connect.rs).

use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Address type byte: IPv4 (RFC 1928 §5 `X'01'`).
pub const ATYP_IPV4: u8 = 0x01;
/// Address type byte: fully qualified domain name (RFC 1928 §5 `X'03'`).
pub const ATYP_DOMAIN: u8 = 0x03;
/// Address type byte: IPv6 (RFC 1928 §5 `X'04'`).
pub const ATYP_IPV6: u8 = 0x04;

/// Where an app wants to go: an IP endpoint, or a host name that remote-proxy resolves.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TargetAddr {
    /// A literal IPv4 or IPv6 address and port.
    Ip(SocketAddr),
    /// A host name (resolved by remote-proxy) and port.
    Domain(String, u16),
}

/// Why an address on the wire or in text was rejected.
#[derive(Debug)]
pub enum Error {
    /// The ATYP byte is none of 1, 3, 4.
    BadAddressType(u8),
    /// The host name is empty, too long, or has characters no host name has.
    BadHost,
    /// Port 0 cannot be connected to.
    BadPort,
    /// The bytes ended early or the socket failed.
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadAddressType(t) => write!(f, "unknown address type {t:#04x}"),
            Error::BadHost => write!(f, "invalid host name"),
            Error::BadPort => write!(f, "invalid port"),
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

impl TargetAddr {
    /// The port to connect to.
    pub fn port(&self) -> u16 {
        match self {
            TargetAddr::Ip(a) => a.port(),
            TargetAddr::Domain(_, p) => *p,
        }
    }

    /// Parses `host:port`, `[v6]:port` or `v4:port` as written in HTTP CONNECT and URLs.
    /// `default_port` applies when no port is given (absolute-form `http://host/`).
    pub fn parse_authority(s: &str, default_port: Option<u16>) -> Result<TargetAddr, Error> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or(Error::BadHost)?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(Error::BadHost),
            };
            (h, port)
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| Error::BadPort)?,
            None => default_port.ok_or(Error::BadPort)?,
        };
        if port == 0 {
            return Err(Error::BadPort);
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(TargetAddr::Ip(SocketAddr::new(ip, port)));
        }
        if !valid_host_name(host) {
            return Err(Error::BadHost);
        }
        Ok(TargetAddr::Domain(host.to_string(), port))
    }

    /// Appends the RFC 1928 §5 form (ATYP, address, port) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            TargetAddr::Ip(SocketAddr::V4(a)) => {
                out.push(ATYP_IPV4);
                out.extend_from_slice(&a.ip().octets());
            }
            TargetAddr::Ip(SocketAddr::V6(a)) => {
                out.push(ATYP_IPV6);
                out.extend_from_slice(&a.ip().octets());
            }
            TargetAddr::Domain(host, _) => {
                // Domains are checked on the way in (valid_host_name caps them at 253 bytes).
                let bytes = &host.as_bytes()[..host.len().min(255)];
                out.push(ATYP_DOMAIN);
                out.push(bytes.len() as u8);
                out.extend_from_slice(bytes);
            }
        }
        out.extend_from_slice(&self.port().to_be_bytes());
    }

    /// Reads the RFC 1928 §5 form (ATYP, address, port).
    ///
    /// # Errors
    /// `BadAddressType` for an unknown ATYP, `BadHost` for an empty or non-host-name domain,
    /// `BadPort` for port 0 (when `allow_port_zero` is false), `Io` when the bytes run out.
    pub fn decode<R: Read>(r: &mut R, allow_port_zero: bool) -> Result<TargetAddr, Error> {
        let mut atyp = [0u8; 1];
        r.read_exact(&mut atyp)?;
        let addr = match atyp[0] {
            ATYP_IPV4 => {
                let mut b = [0u8; 4];
                r.read_exact(&mut b)?;
                IpAddr::V4(Ipv4Addr::from(b))
            }
            ATYP_IPV6 => {
                let mut b = [0u8; 16];
                r.read_exact(&mut b)?;
                IpAddr::V6(Ipv6Addr::from(b))
            }
            ATYP_DOMAIN => {
                let mut len = [0u8; 1];
                r.read_exact(&mut len)?;
                let mut name = vec![0u8; len[0] as usize];
                r.read_exact(&mut name)?;
                let port = read_port(r)?;
                let name = String::from_utf8(name).map_err(|_| Error::BadHost)?;
                if port == 0 && !allow_port_zero {
                    return Err(Error::BadPort);
                }
                // A literal IP sent as a domain is still a literal IP (curl does this).
                if let Ok(ip) = name.parse::<IpAddr>() {
                    return Ok(TargetAddr::Ip(SocketAddr::new(ip, port)));
                }
                if !valid_host_name(&name) {
                    return Err(Error::BadHost);
                }
                return Ok(TargetAddr::Domain(name, port));
            }
            other => return Err(Error::BadAddressType(other)),
        };
        let port = read_port(r)?;
        if port == 0 && !allow_port_zero {
            return Err(Error::BadPort);
        }
        Ok(TargetAddr::Ip(SocketAddr::new(addr, port)))
    }
}

fn read_port<R: Read>(r: &mut R) -> io::Result<u16> {
    let mut p = [0u8; 2];
    r.read_exact(&mut p)?;
    Ok(u16::from_be_bytes(p))
}

/// True for names made of LDH labels (plus `_`), each 1..=63 bytes, 253 bytes at most.
pub fn valid_host_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAddr::Ip(a) => write!(f, "{a}"),
            TargetAddr::Domain(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(t: TargetAddr) {
        let mut buf = Vec::new();
        t.encode(&mut buf);
        let back = TargetAddr::decode(&mut &buf[..], false).unwrap();
        assert_eq!(back, t);
        for cut in 0..buf.len() {
            assert!(
                TargetAddr::decode(&mut &buf[..cut], false).is_err(),
                "prefix {cut}"
            );
        }
    }

    #[test]
    fn encodes_and_decodes_every_address_type() {
        roundtrip(TargetAddr::Ip("1.2.3.4:80".parse().unwrap()));
        roundtrip(TargetAddr::Ip("[::1]:443".parse().unwrap()));
        roundtrip(TargetAddr::Domain("example.com".into(), 8080));
    }

    #[test]
    fn rejects_bad_wire_addresses() {
        assert!(matches!(
            TargetAddr::decode(&mut &[0x02u8, 0, 0][..], false),
            Err(Error::BadAddressType(2))
        ));
        assert!(matches!(
            TargetAddr::decode(&mut &[0x03u8, 0, 0, 80][..], false),
            Err(Error::BadHost)
        ));
        assert!(matches!(
            TargetAddr::decode(&mut &[0x03u8, 3, b'a', b' ', b'b', 0, 80][..], false),
            Err(Error::BadHost)
        ));
        assert!(matches!(
            TargetAddr::decode(&mut &[0x01u8, 1, 2, 3, 4, 0, 0][..], false),
            Err(Error::BadPort)
        ));
    }

    #[test]
    fn a_literal_ip_sent_as_domain_is_an_ip() {
        let mut buf = vec![ATYP_DOMAIN, 9];
        buf.extend_from_slice(b"127.0.0.1");
        buf.extend_from_slice(&80u16.to_be_bytes());
        assert_eq!(
            TargetAddr::decode(&mut &buf[..], false).unwrap(),
            TargetAddr::Ip("127.0.0.1:80".parse().unwrap())
        );
    }

    #[test]
    fn parses_authorities() {
        let p = |s, d| TargetAddr::parse_authority(s, d);
        assert_eq!(
            p("example.com:443", None).unwrap(),
            TargetAddr::Domain("example.com".into(), 443)
        );
        assert_eq!(
            p("example.com", Some(80)).unwrap(),
            TargetAddr::Domain("example.com".into(), 80)
        );
        assert_eq!(
            p("[::1]:8080", None).unwrap(),
            TargetAddr::Ip("[::1]:8080".parse().unwrap())
        );
        assert_eq!(
            p("[::1]", Some(80)).unwrap(),
            TargetAddr::Ip("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            p("10.0.0.1:22", None).unwrap(),
            TargetAddr::Ip("10.0.0.1:22".parse().unwrap())
        );
        assert!(matches!(p("example.com", None), Err(Error::BadPort)));
        assert!(matches!(p("example.com:0", None), Err(Error::BadPort)));
        assert!(matches!(p("example.com:http", None), Err(Error::BadPort)));
        assert!(matches!(p("exa mple.com:80", None), Err(Error::BadHost)));
        assert!(matches!(p("[::1:80", None), Err(Error::BadHost)));
        assert!(matches!(p(":80", None), Err(Error::BadHost)));
    }

    #[test]
    fn host_name_rules() {
        assert!(valid_host_name("a.b-c.d_e"));
        assert!(valid_host_name("localhost."));
        assert!(!valid_host_name(""));
        assert!(!valid_host_name("a..b"));
        assert!(!valid_host_name(&"a".repeat(64)));
        assert!(!valid_host_name("a/b"));
    }
}
