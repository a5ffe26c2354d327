//! A tiny HTTP/1.1 origin server for the demo, the tests and the benchmarks: it serves
//! deterministic bytes and checks uploads, so a client can prove every byte arrived intact.
//!
//! Routes: `GET /bytes/N` sends N bytes of [`fill_pattern`]; `POST /sink` (or `PUT`) reads a
//! `Content-Length` body and answers `bytes=N fnv=HEX`; `POST /discard` does the same without
//! hashing (for throughput benchmarks); `GET /` says hello. Not a general web
//! server: no chunked bodies, no files. One thread per connection, keep-alive honoured.

use flowgate::proto::http::{read_head, Head};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// FNV-1a 64-bit offset basis: the starting value for [`fnv1a`].
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Folds `bytes` into an FNV-1a 64-bit hash (start from [`FNV_START`]).
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Fills `buf` with the bytes found at `offset` of the origin's stream: byte `i` is
/// `i % 251`. 251 is prime, so a lost, repeated or reordered chunk shows in the hash.
pub fn fill_pattern(offset: u64, buf: &mut [u8]) {
    let mut v = (offset % 251) as u8;
    for b in buf {
        *b = v;
        v = if v == 250 { 0 } else { v + 1 };
    }
}

/// The FNV-1a hash of the first `len` bytes of the pattern.
pub fn pattern_hash(len: u64) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut h = FNV_START;
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        fill_pattern(off, &mut buf[..n]);
        h = fnv1a(h, &buf[..n]);
        off += n as u64;
    }
    h
}

/// A running origin; it runs until the process exits.
#[derive(Debug)]
pub struct Origin {
    local_addr: SocketAddr,
}

impl Origin {
    /// Binds `addr` and serves in the background.
    pub fn start(addr: SocketAddr) -> io::Result<Origin> {
        let listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        std::thread::Builder::new()
            .name("origin-accept".into())
            .spawn(move || {
                for s in listener.incoming().flatten() {
                    let _ = std::thread::Builder::new()
                        .name("origin".into())
                        .stack_size(256 * 1024)
                        .spawn(move || {
                            let _ = serve(s);
                        });
                }
            })?;
        Ok(Origin { local_addr })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

fn serve(stream: TcpStream) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = Vec::new();
    loop {
        let (len, head) = match read_head(&mut &stream, &mut buf) {
            Ok(h) => h,
            Err(_) => return Ok(()),
        };
        let leftover = buf.split_off(len);
        buf = leftover;
        let close = head
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || head.version == "HTTP/1.0";
        respond(&stream, &head, &mut buf)?;
        if close {
            let _ = stream.shutdown(std::net::Shutdown::Write);
            return Ok(());
        }
    }
}

fn respond(stream: &TcpStream, head: &Head, pending: &mut Vec<u8>) -> io::Result<()> {
    let mut w = stream;
    let path = head.target.as_str();
    if head.method == "GET" {
        if let Some(n) = path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<u64>().ok())
        {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
            );
            // The pattern repeats every 251 bytes, so one block computed once per process
            // serves any offset and the origin runs at memcpy speed (it is the baseline of
            // the benchmarks; filling the block per request cost more than a small request).
            static BLOCK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            const CHUNK: usize = 256 * 1024;
            let block = BLOCK.get_or_init(|| {
                let mut b = vec![0u8; CHUNK + 251];
                fill_pattern(0, &mut b);
                b
            });
            // Head and first chunk in one write: a small response is one segment, as a real
            // server sends it (with TCP_NODELAY, separate writes are separate segments).
            let first = (n as usize).min(CHUNK);
            let mut out = Vec::with_capacity(head.len() + first);
            out.extend_from_slice(head.as_bytes());
            out.extend_from_slice(&block[..first]);
            w.write_all(&out)?;
            let mut off = first as u64;
            while off < n {
                let k = ((n - off) as usize).min(CHUNK);
                let start = (off % 251) as usize;
                w.write_all(&block[start..start + k])?;
                off += k as u64;
            }
            return Ok(());
        }
        if path == "/" {
            let body = "flowgate origin: try /bytes/1000000\n";
            return write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    }
    if (head.method == "POST" || head.method == "PUT") && (path == "/sink" || path == "/discard") {
        let hash = path == "/sink";
        let Some(len) = head
            .header("content-length")
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return write!(
                w,
                "HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\n\r\n"
            );
        };
        let mut h = FNV_START;
        let from_pending = (pending.len() as u64).min(len) as usize;
        if hash {
            h = fnv1a(h, &pending[..from_pending]);
        }
        pending.drain(..from_pending);
        let mut left = len - from_pending as u64;
        let mut buf = vec![0u8; 256 * 1024];
        let mut r = stream;
        while left > 0 {
            let k = (left as usize).min(buf.len());
            let got = r.read(&mut buf[..k])?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if hash {
                h = fnv1a(h, &buf[..got]);
            }
            left -= got as u64;
        }
        let body = format!("bytes={len} fnv={h:016x}\n");
        return write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    }
    write!(w, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_continuous_across_chunks() {
        let mut whole = vec![0u8; 1000];
        fill_pattern(0, &mut whole);
        let mut part = vec![0u8; 300];
        fill_pattern(700, &mut part);
        assert_eq!(&whole[700..], &part[..]);
        assert_eq!(pattern_hash(1000), fnv1a(FNV_START, &whole));
    }
}
