//! Reading a handshake from a socket under one deadline, with few system calls.

use std::io;
use std::net::TcpStream;
use std::time::Duration;

/// Bytes looked at per `peek`: a whole tunnel request (at most 783 bytes), SOCKS5 message or
/// typical HTTP head arrives in one.
const PEEK_BYTES: usize = 1024;

/// How far past the deadline a blocked read may run before the socket's timeout is re-armed.
/// Re-arming on every read cost a `setsockopt` per field of every handshake.
pub(crate) const REARM_SLACK: Duration = Duration::from_millis(20);

/// A socket whose handshake reads must all finish by one deadline, read with few system calls.
///
/// A per-read timeout alone lets a client that sends a byte every few seconds hold a worker
/// for hours (slowloris); this caps the whole handshake (to within `REARM_SLACK`).
///
/// Parsers read field by field; each field used to be a `recv`. Instead this peeks at
/// whatever has arrived (`MSG_PEEK`), serves the parser from that copy, and removes from the
/// socket only the bytes the parser took, when it needs more or when dropped. So a handshake
/// that arrived in one segment costs two `recv`s, and bytes an app sent early (past the
/// handshake) stay in the socket for the relay, never swallowed into a buffer here.
/// Drop it (or call [`HandshakeReader::settle`]) before reading the socket any other way.
/// Writes pass straight through.
pub struct HandshakeReader<'a> {
    stream: &'a TcpStream,
    until: std::time::Instant,
    // The whole handshake's deadline, while `until` is the earlier first-byte deadline.
    after_first: Option<std::time::Instant>,
    // The read timeout the socket has now.
    timeout: Duration,
    // Bytes peeked from the socket (still in it): `peeked[..len]`, of which the first `taken`
    // have been handed to the reader.
    peeked: [u8; PEEK_BYTES],
    len: usize,
    taken: usize,
}

/// The instant `within` from now.
///
/// # Errors
/// `InvalidInput` when that is past what the clock can represent.
pub fn deadline(within: Duration) -> io::Result<std::time::Instant> {
    std::time::Instant::now()
        .checked_add(within)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "deadline out of range"))
}

impl<'a> HandshakeReader<'a> {
    /// Reads on `stream` must finish within `within` from now; sets that as the read timeout.
    pub fn new(stream: &'a TcpStream, within: Duration) -> io::Result<HandshakeReader<'a>> {
        let until = deadline(within)?;
        stream.set_read_timeout(Some(within.max(Duration::from_millis(1))))?;
        Ok(HandshakeReader {
            stream,
            until,
            after_first: None,
            timeout: within,
            peeked: [0; PEEK_BYTES],
            len: 0,
            taken: 0,
        })
    }

    /// As [`new`](Self::new), but nothing at all may take longer than `first_byte`: a socket
    /// that sends nothing is let go sooner than one that is slowly handshaking.
    ///
    /// # Errors
    /// When the socket's timeout cannot be set.
    pub fn awaiting_first_byte(
        stream: &'a TcpStream,
        first_byte: Duration,
        within: Duration,
    ) -> io::Result<HandshakeReader<'a>> {
        if first_byte >= within {
            return HandshakeReader::new(stream, within);
        }
        let whole = deadline(within)?;
        let mut r = HandshakeReader::new(stream, first_byte)?;
        r.after_first = Some(whole);
        Ok(r)
    }

    /// The next byte, without taking it; `None` at end of stream.
    ///
    /// # Errors
    /// As `read`: the deadline passed, or the socket failed.
    pub fn peek_byte(&mut self) -> io::Result<Option<u8>> {
        if self.taken == self.len && !self.fill()? {
            return Ok(None);
        }
        Ok(Some(self.peeked[self.taken]))
    }

    /// Removes from the socket the bytes already handed out.
    ///
    /// # Errors
    /// When the socket fails (the bytes were seen by `peek`, so this does not wait).
    pub fn settle(&mut self) -> io::Result<()> {
        if self.taken > 0 {
            let n = self.taken;
            self.len = 0;
            self.taken = 0;
            io::Read::read_exact(&mut &*self.stream, &mut self.peeked[..n])?;
        }
        Ok(())
    }

    // Peeks at the socket after settling what was taken; false at end of stream.
    fn fill(&mut self) -> io::Result<bool> {
        self.settle()?;
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake took too long",
            ));
        }
        if left + REARM_SLACK < self.timeout {
            self.stream.set_read_timeout(Some(left))?;
            self.timeout = left;
        }
        self.len = loop {
            match self.stream.peek(&mut self.peeked) {
                // The socket's timeout was set for the first byte; the handshake's own
                // deadline is later: wait on for what is left of it. Re-armed only here, so a
                // handshake that keeps coming costs no extra system call.
                Err(e)
                    if crate::proto::is_timeout(&e) && std::time::Instant::now() < self.until =>
                {
                    let left = self
                        .until
                        .saturating_duration_since(std::time::Instant::now());
                    self.stream
                        .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                    self.timeout = left;
                }
                other => break other?,
            }
        };
        if self.len > 0 {
            if let Some(whole) = self.after_first.take() {
                // Something came: the rest of the handshake has the whole deadline.
                self.until = whole;
            }
        }
        Ok(self.len > 0)
    }
}

impl Drop for HandshakeReader<'_> {
    fn drop(&mut self) {
        let _ = self.settle();
    }
}

impl io::Read for HandshakeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || (self.taken == self.len && !self.fill()?) {
            return Ok(0);
        }
        let n = buf.len().min(self.len - self.taken);
        buf[..n].copy_from_slice(&self.peeked[self.taken..self.taken + n]);
        self.taken += n;
        Ok(n)
    }
}

impl io::Write for HandshakeReader<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut &*self.stream, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::tests::pair;
    use std::io::{Read, Write};

    #[test]
    fn a_deadline_caps_a_trickling_handshake() {
        let (mut c, s) = pair();
        let trickle = std::thread::spawn(move || {
            for _ in 0..20 {
                if c.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let mut d = HandshakeReader::new(&s, Duration::from_millis(400)).unwrap();
        let t = std::time::Instant::now();
        let mut buf = [0u8; 1];
        let err = loop {
            match d.read(&mut buf) {
                Ok(0) => panic!("EOF before the deadline"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            "{err}"
        );
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "took {:?}",
            t.elapsed()
        );
        drop(d);
        drop(s);
        trickle.join().unwrap();
    }

    #[test]
    fn a_silent_socket_is_let_go_at_the_first_byte_deadline_and_a_talking_one_is_not() {
        let (_c, s) = pair();
        let t = std::time::Instant::now();
        let mut d = HandshakeReader::awaiting_first_byte(
            &s,
            Duration::from_millis(200),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(d.peek_byte().is_err());
        assert!(
            t.elapsed() < Duration::from_millis(800),
            "{:?}",
            t.elapsed()
        );
        // One byte in time, the next after the first-byte deadline: still read.
        let (mut c, s) = pair();
        let writer = std::thread::spawn(move || {
            c.write_all(b"a").unwrap();
            std::thread::sleep(Duration::from_millis(400));
            c.write_all(b"b").unwrap();
            c
        });
        let mut d = HandshakeReader::awaiting_first_byte(
            &s,
            Duration::from_millis(200),
            Duration::from_secs(5),
        )
        .unwrap();
        let mut two = [0u8; 2];
        d.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"ab");
        drop(d);
        drop(writer.join().unwrap());
    }

    #[test]
    fn a_deadline_leaves_unparsed_bytes_in_the_socket() {
        let (mut c, s) = pair();
        c.write_all(b"HEADearly app data").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut d = HandshakeReader::new(&s, Duration::from_secs(2)).unwrap();
        assert_eq!(d.peek_byte().unwrap(), Some(b'H'));
        let mut head = [0u8; 4];
        d.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HEAD");
        drop(d);
        // What the parser did not take is still there for whoever reads next (the relay).
        let mut rest = [0u8; 14];
        (&s).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"early app data");
    }

    #[test]
    fn a_deadline_reads_a_message_split_across_segments() {
        let (mut c, s) = pair();
        let writer = std::thread::spawn(move || {
            for part in [&b"ab"[..], b"cd", b"ef"] {
                c.write_all(part).unwrap();
                std::thread::sleep(Duration::from_millis(30));
            }
            c
        });
        let mut d = HandshakeReader::new(&s, Duration::from_secs(2)).unwrap();
        let mut all = [0u8; 5];
        d.read_exact(&mut all).unwrap();
        assert_eq!(&all, b"abcde");
        drop(d);
        let _c = writer.join().unwrap();
        let mut last = [0u8; 1];
        (&s).read_exact(&mut last).unwrap();
        assert_eq!(&last, b"f");
    }
}
