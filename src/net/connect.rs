//! Opening outbound connections: name resolution and connecting to a target.

use crate::proto::addr::TargetAddr;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Connects to the first of `addrs` that accepts, in order; the last error wins. The caller
/// resolved (and checked) them: nothing is resolved again here.
pub fn connect_any(addrs: &[SocketAddr], timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no addresses");
    for a in addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Resolves to socket addresses. Names under `.invalid` fail at once (RFC 6761 §6.4).
///
/// # Errors
/// `io::ErrorKind::NotFound` when the name does not resolve to any address.
pub fn resolve(target: &TargetAddr) -> io::Result<Vec<SocketAddr>> {
    match target {
        TargetAddr::Ip(a) => Ok(vec![*a]),
        TargetAddr::Domain(host, port) => {
            let lower = host.trim_end_matches('.').to_ascii_lowercase();
            if lower == "invalid" || lower.ends_with(".invalid") {
                return Err(not_resolved(host));
            }
            let addrs: Vec<SocketAddr> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|_| not_resolved(host))?
                .collect();
            if addrs.is_empty() {
                return Err(not_resolved(host));
            }
            Ok(addrs)
        }
    }
}

fn not_resolved(host: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {host}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_tld_fails_without_dns() {
        let e = resolve(&TargetAddr::Domain("nothing.invalid".into(), 80)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
