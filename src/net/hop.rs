//! The connection between local-proxy and remote-proxy: TLS 1.3 (the default) or plain TCP
//! (`--plaintext`), with blocking reads and writes under a deadline for the tunnel
//! handshake. Once a tunnel is open, the relay takes the socket and TLS state apart
//! ([`Hop::into_parts`]) and drives them itself.

use crate::net::handshake::HandshakeReader;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first byte of every plaintext tunnel request (`FG`).
const PLAINTEXT_MAGIC: u8 = b'F';
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// The first byte of a TLS alert record.
const TLS_ALERT: u8 = 0x15;

/// Why a TLS handshake on the hop failed.
#[derive(Debug)]
pub enum HopError {
    /// The socket failed, or the handshake deadline passed.
    Io(io::Error),
    /// The TLS handshake failed, including our own refusal of the peer's identity.
    Tls(rustls::Error),
    /// TLS was expected, and the peer spoke the plaintext tunnel protocol: it runs with
    /// `--plaintext`.
    PlaintextPeer,
    /// TLS was expected, and the peer sent something else.
    NotTls,
}

impl std::fmt::Display for HopError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HopError::Io(e) => write!(f, "{e}"),
            HopError::Tls(e) => match crate::tls::refusal(e) {
                Some(r) => write!(f, "{r}"),
                None => write!(f, "TLS handshake failed: {e}"),
            },
            HopError::PlaintextPeer => {
                write!(
                    f,
                    "the peer speaks the plaintext tunnel protocol (--plaintext)"
                )
            }
            HopError::NotTls => write!(f, "the peer does not speak TLS"),
        }
    }
}

impl std::error::Error for HopError {}

impl HopError {
    /// The error of a failed client handshake, given the first byte the server sent: a
    /// plaintext reply starts with its version byte where a TLS server's first record is a
    /// handshake or an alert.
    fn from_io(e: io::Error, first_byte: Option<u8>) -> HopError {
        use crate::proto::tunnel::{VERSION, VERSION_1};
        if first_byte.is_some_and(|b| b == VERSION || b == VERSION_1) {
            return HopError::PlaintextPeer;
        }
        let tls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned();
        match tls {
            Some(t) => HopError::Tls(t),
            None if first_byte.is_some_and(|b| b != TLS_HANDSHAKE && b != TLS_ALERT) => {
                HopError::NotTls
            }
            None => HopError::Io(e),
        }
    }
}

/// One connection between the proxies.
#[derive(Debug)]
pub struct Hop {
    sock: TcpStream,
    tls: Option<Box<Connection>>,
}

impl Hop {
    /// A plaintext hop.
    pub fn plain(sock: TcpStream) -> Hop {
        Hop { sock, tls: None }
    }

    /// The TCP socket under the hop (for peeking at liveness, addresses, timeouts).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// True when the hop is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The ALPN protocol the TLS handshake agreed on.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.tls.as_ref().and_then(|c| c.alpn_protocol())
    }

    /// remote-proxy's side: the TLS handshake on an accepted socket, within `within`.
    ///
    /// # Errors
    /// `PlaintextPeer` (with the socket, so the caller can answer in plaintext) when the
    /// client sent a plaintext tunnel request, `NotTls` for other bytes, `Tls` when the
    /// handshake fails, `Io` when the socket fails or the deadline passes.
    pub fn accept(
        sock: TcpStream,
        cfg: &Arc<ServerConfig>,
        first_byte: Duration,
        within: Duration,
    ) -> Result<Hop, (TcpStream, HopError)> {
        // Look before handing bytes to rustls: a plaintext request is answered in kind.
        let first = HandshakeReader::awaiting_first_byte(&sock, first_byte, within)
            .and_then(|mut r| r.peek_byte());
        let first = match first {
            Ok(Some(b)) => b,
            Ok(None) => {
                let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "closed before TLS");
                return Err((sock, HopError::Io(eof)));
            }
            Err(e) => return Err((sock, HopError::Io(e))),
        };
        match first {
            PLAINTEXT_MAGIC => return Err((sock, HopError::PlaintextPeer)),
            TLS_HANDSHAKE => {}
            _ => return Err((sock, HopError::NotTls)),
        }
        let conn = match ServerConnection::new(Arc::clone(cfg)) {
            Ok(c) => Connection::Server(c),
            Err(e) => return Err((sock, HopError::Tls(e))),
        };
        Hop::handshake(sock, conn, within).map_err(|(sock, e, _)| {
            let tls = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .cloned();
            (sock, tls.map_or(HopError::Io(e), HopError::Tls))
        })
    }

    /// local-proxy's side: the TLS handshake on a connected socket, checking the remote as
    /// `cfg`'s verifier says, within `within`.
    ///
    /// # Errors
    /// `Tls` when the handshake fails or the remote's identity is refused
    /// ([`crate::tls::refusal`] tells which), `PlaintextPeer` when the remote answered in
    /// the plaintext protocol, `Io` when the socket fails or the deadline passes.
    pub fn connect(
        sock: TcpStream,
        cfg: &Arc<ClientConfig>,
        name: &ServerName<'static>,
        within: Duration,
    ) -> Result<Hop, HopError> {
        let conn = ClientConnection::new(Arc::clone(cfg), name.clone()).map_err(HopError::Tls)?;
        Hop::handshake(sock, Connection::Client(conn), within)
            .map_err(|(_, e, first)| HopError::from_io(e, first))
    }

    fn handshake(
        sock: TcpStream,
        mut conn: Connection,
        within: Duration,
    ) -> Result<Hop, (TcpStream, io::Error, Option<u8>)> {
        let mut timed = match Timed::new(&sock, within) {
            Ok(t) => t,
            Err(e) => return Err((sock, e, None)),
        };
        // Driven by hand rather than by `complete_io`, to stop as soon as the handshake is
        // done without sending what it left queued (the client's Finished, the server's
        // session tickets): that leaves in one write with the tunnel request or reply, a
        // segment and a wake-up fewer per tunnel.
        while conn.is_handshaking() {
            let step = if conn.wants_write() {
                conn.write_tls(&mut timed).map(drop)
            } else {
                match conn.read_tls(&mut timed) {
                    Ok(0) => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed during the TLS handshake",
                    )),
                    Ok(_) => conn
                        .process_new_packets()
                        .map(drop)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
                    Err(e) => Err(e),
                }
            };
            if let Err(e) = step {
                let first = timed.first_byte;
                // Tell the peer why, if rustls has an alert for it.
                let _ = conn.write_tls(&mut timed);
                return Err((sock, e, first));
            }
        }
        Ok(Hop {
            sock,
            tls: Some(Box::new(conn)),
        })
    }

    /// As [`io`](Self::io), and a plaintext hop that has sent nothing yet must send its
    /// first byte within `first_byte` (a TLS hop's came with its handshake).
    ///
    /// # Errors
    /// When the socket's timeouts cannot be set.
    pub fn io_first(&mut self, first_byte: Duration, within: Duration) -> io::Result<HopIo<'_>> {
        match &mut self.tls {
            None => Ok(HopIo::Plain(HandshakeReader::awaiting_first_byte(
                &self.sock, first_byte, within,
            )?)),
            Some(_) => self.io(within),
        }
    }

    /// Reads and writes on the hop that must all finish within `within` from now.
    ///
    /// # Errors
    /// When the socket's timeouts cannot be set.
    pub fn io(&mut self, within: Duration) -> io::Result<HopIo<'_>> {
        match &mut self.tls {
            None => Ok(HopIo::Plain(HandshakeReader::new(&self.sock, within)?)),
            Some(conn) => Ok(HopIo::Tls {
                conn,
                timed: Timed::new(&self.sock, within)?,
            }),
        }
    }

    /// Writes all of `bytes` (a reply) with the socket's write timeout.
    ///
    /// # Errors
    /// When the socket fails.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.tls {
            None => (&self.sock).write_all(bytes),
            Some(conn) => {
                conn.writer().write_all(bytes)?;
                while conn.wants_write() {
                    conn.write_tls(&mut &self.sock)?;
                }
                Ok(())
            }
        }
    }

    /// Ends a hop that carried only a request and its answer: a TLS hop says
    /// close_notify, so the peer sees a clean end when the socket closes.
    pub fn close(&mut self) {
        if let Some(conn) = self.tls.as_mut() {
            conn.send_close_notify();
            let _ = self.sock.set_write_timeout(Some(Duration::from_secs(1)));
            while conn.wants_write() {
                if conn.write_tls(&mut &self.sock).is_err() {
                    break;
                }
            }
        }
    }

    /// True when bytes from the peer wait inside the hop, where the socket's readiness
    /// cannot show them: decrypted plaintext, or whole TLS records read but not processed.
    /// A plaintext hop reads no further than it parses, so it never holds any.
    pub fn has_buffered_input(&mut self) -> bool {
        match &mut self.tls {
            None => false,
            Some(conn) => conn
                .process_new_packets()
                .is_ok_and(|st| st.plaintext_bytes_to_read() > 0),
        }
    }

    /// A hop from what [`into_parts`](Self::into_parts) gave (a connection taken up again
    /// after waiting parked).
    pub fn from_parts(sock: TcpStream, tls: Option<Box<Connection>>) -> Hop {
        Hop { sock, tls }
    }

    /// The socket and the TLS state, for the relay.
    pub fn into_parts(self) -> (TcpStream, Option<Box<Connection>>) {
        (self.sock, self.tls)
    }
}

/// Blocking reads and writes on a [`Hop`] under one deadline.
///
/// The plaintext reader's peek buffer makes this large; it lives in a short handshake frame
/// (never under the relay), and boxing it would cost an allocation per tunnel.
#[allow(clippy::large_enum_variant)]
pub enum HopIo<'a> {
    /// Plaintext: the peeking handshake reader.
    Plain(HandshakeReader<'a>),
    /// TLS: rustls over the socket.
    Tls {
        /// The TLS state.
        conn: &'a mut Connection,
        /// The socket with the deadline.
        timed: Timed<'a>,
    },
}

impl Read for HopIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (conn, timed) = match self {
            HopIo::Plain(r) => return r.read(buf),
            HopIo::Tls { conn, timed } => (conn, timed),
        };
        loop {
            match conn.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            while conn.wants_write() {
                conn.write_tls(timed)?;
            }
            conn.read_tls(timed)?;
            if let Err(e) = conn.process_new_packets() {
                let _ = conn.write_tls(timed);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }
}

impl Write for HopIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            HopIo::Plain(r) => r.write(buf),
            HopIo::Tls { conn, timed } => {
                let n = conn.writer().write(buf)?;
                while conn.wants_write() {
                    conn.write_tls(timed)?;
                }
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket whose reads and writes fail once a deadline has passed; remembers the first byte
/// it read (to tell a plaintext peer from a broken TLS one).
pub struct Timed<'a> {
    sock: &'a TcpStream,
    until: Instant,
    // The read timeout the socket has now: lowered only when the deadline gets close, so a
    // handshake's reads cost no `setsockopt` each (as in HandshakeReader).
    armed: Duration,
    first_byte: Option<u8>,
}

impl<'a> Timed<'a> {
    fn new(sock: &'a TcpStream, within: Duration) -> io::Result<Timed<'a>> {
        let until = crate::net::handshake::deadline(within)?;
        let armed = within.max(Duration::from_millis(1));
        sock.set_write_timeout(Some(armed))?;
        sock.set_read_timeout(Some(armed))?;
        Ok(Timed {
            sock,
            until,
            armed,
            first_byte: None,
        })
    }

    fn left(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake took too long",
            ));
        }
        Ok(left)
    }
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        if left + crate::net::handshake::REARM_SLACK < self.armed {
            self.sock.set_read_timeout(Some(left))?;
            self.armed = left;
        }
        let n = (&*self.sock).read(buf)?;
        if self.first_byte.is_none() && n > 0 {
            self.first_byte = Some(buf[0]);
        }
        Ok(n)
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.left()?;
        (&*self.sock).write(buf)
    }

    /// rustls hands over all its queued records at once: one system call, one segment.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.left()?;
        (&*self.sock).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
