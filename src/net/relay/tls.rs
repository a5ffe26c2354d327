//! The relay with one TLS leg (the hop between the proxies) and one plain leg: both
//! directions on one thread, poll(2) on the two non-blocking sockets, rustls in between.
//!
//! The TLS leg cannot splice: every byte is decrypted or encrypted in user space. So reads
//! and writes are batched: ciphertext is read from the socket in large reads into `raw` and
//! fed to rustls from there (rustls itself would read a few KiB per system call), plaintext
//! is gathered into `out` across records before one write, and encrypted records leave in
//! one vectored write. Buffers are taken when traffic starts and given back once the tunnel
//! has been quiet for [`QUIET`], so an idle tunnel holds rustls' state and no buffer.

use super::copy::INITIAL_BUFFER;

/// Largest buffer of a direction: 64 records of 16 KiB, what rustls sends in one vectored
/// write.
const MAX_BUFFER: usize = 1024 * 1024;
use super::{Activity, Options, Payer};
use crate::limit::meter::Direction;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rustls::Connection;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;

/// After this long without an event, a tunnel's buffers are given back.
const QUIET: Duration = Duration::from_millis(200);

/// Bytes moved by [`relay_tls`]: out of the TLS leg, and into it.
pub(super) struct Moved {
    pub from_tls: u64,
    pub to_tls: u64,
    pub idle_closed: bool,
    pub quota_closed: bool,
}

/// A buffer holding `data[start..end]`, allocated only while in use.
#[derive(Default)]
struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Makes room: the buffer, allocated if needed, emptied.
    fn reset(&mut self) -> &mut Vec<u8> {
        if self.data.is_empty() {
            self.data = vec![0; INITIAL_BUFFER];
        }
        self.start = 0;
        self.end = 0;
        &mut self.data
    }

    /// Doubles the buffer (up to the relay maximum) after a read filled it.
    fn grow_if_filled(&mut self, n: usize) {
        if n == self.data.len() && self.data.len() < MAX_BUFFER {
            self.data.resize(self.data.len() * 2, 0);
        }
    }

    fn release(&mut self) {
        if self.is_empty() {
            *self = Buf::default();
        }
    }
}

/// A read or write failed, or TLS failed: tear the tunnel down.
struct Failed;

struct State<'a> {
    conn: &'a mut Connection,
    tls: &'a TcpStream,
    plain: &'a TcpStream,
    payer: Payer<'a>,
    // Which way bytes read from the TLS leg go (up at remote-proxy, down at local-proxy).
    from_tls_dir: Direction,
    activity: &'a Activity,
    // Ciphertext read from the TLS socket, not yet given to rustls.
    raw: Buf,
    // Plaintext from rustls, paid for, not yet written to the plain socket.
    out: Buf,
    // Plaintext read from the plain socket (handed to rustls at once).
    input: Buf,
    // The TLS socket reached EOF.
    tls_sock_eof: bool,
    // The peer's plaintext stream ended (close_notify).
    tls_eof: bool,
    // The FIN was passed on to the plain socket.
    plain_shut: bool,
    // The plain socket reached EOF.
    plain_eof: bool,
    // close_notify and FIN were sent on the TLS socket.
    tls_shut: bool,
    from_tls: u64,
    to_tls: u64,
    // Reading stopped because the user's quota is used up.
    quota_used_up: bool,
}

impl State<'_> {
    fn done(&self) -> bool {
        self.plain_shut && self.tls_shut
    }

    /// Moves what can move without waiting, both ways.
    fn step(&mut self) -> Result<(), Failed> {
        loop {
            let before = (self.from_tls, self.to_tls, self.out.start, self.tls_eof);
            let before_eof = (self.plain_eof, self.tls_sock_eof);
            self.tls_to_plain()?;
            self.plain_to_tls()?;
            self.flush_tls()?;
            if self.plain_eof && !self.tls_shut && !self.conn.wants_write() {
                let _ = self.tls.shutdown(Shutdown::Write);
                self.tls_shut = true;
            }
            let after = (self.from_tls, self.to_tls, self.out.start, self.tls_eof);
            if after == before && (self.plain_eof, self.tls_sock_eof) == before_eof {
                return Ok(());
            }
        }
    }

    /// Writes pending plaintext to the plain socket; when none is pending, gathers more
    /// from rustls (feeding it ciphertext, reading the TLS socket when that runs out).
    fn tls_to_plain(&mut self) -> Result<(), Failed> {
        if !self.out.is_empty() {
            self.write_out()?;
            if !self.out.is_empty() {
                return Ok(()); // the plain socket is full; poll for POLLOUT
            }
        }
        if self.tls_eof {
            if !self.plain_shut {
                let _ = self.plain.shutdown(Shutdown::Write);
                self.plain_shut = true;
            }
            return Ok(());
        }
        let cap = self.out.reset().len();
        let limit = self.payer.limit(cap);
        if limit == 0 {
            // The quota is used up: read no more, as at the peer's close_notify.
            self.tls_eof = true;
            self.quota_used_up = true;
            return Ok(());
        }
        let mut got = 0;
        loop {
            match self.conn.reader().read(&mut self.out.data[got..limit]) {
                Ok(0) => {
                    self.tls_eof = true;
                    break;
                }
                Ok(n) => {
                    got += n;
                    if got == limit {
                        break;
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // An EOF without close_notify: the peer died or the stream was cut.
                    log::trace!("relay tls read failed: {e}");
                    return Err(Failed);
                }
            }
            if !self.feed_rustls()? {
                break;
            }
        }
        if got > 0 {
            self.payer.pay(self.from_tls_dir, got);
            self.out.end = got;
            self.from_tls += got as u64;
            self.activity.touch();
            if got == cap {
                self.out.grow_if_filled(cap);
            }
            self.write_out()?;
        }
        Ok(())
    }

    /// Gives rustls the next ciphertext, reading the TLS socket when `raw` is empty.
    /// False when there is none to give until poll says so.
    fn feed_rustls(&mut self) -> Result<bool, Failed> {
        if self.raw.is_empty() {
            if self.tls_sock_eof {
                return Ok(false);
            }
            self.raw.reset();
            match (&*self.tls).read(&mut self.raw.data) {
                Ok(0) => {
                    self.tls_sock_eof = true;
                    // Tell rustls: its reader then says whether the close was clean.
                    let _ = self.conn.read_tls(&mut io::empty());
                    return self.process().map(|()| true);
                }
                Ok(n) => {
                    self.raw.end = n;
                    self.raw.grow_if_filled(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
                Err(e) => {
                    log::trace!("relay tls socket read failed: {e}");
                    return Err(Failed);
                }
            }
        }
        let mut rest = &self.raw.data[self.raw.start..self.raw.end];
        match self.conn.read_tls(&mut rest) {
            Ok(n) => self.raw.start += n,
            Err(e) => {
                log::trace!("relay tls buffer refused: {e}");
                return Err(Failed);
            }
        }
        self.process().map(|()| true)
    }

    fn process(&mut self) -> Result<(), Failed> {
        if let Err(e) = self.conn.process_new_packets() {
            log::debug!("relay tls failed: {e}");
            // Send the alert rustls queued, if the socket takes it.
            let _ = self.conn.write_tls(&mut &*self.tls);
            return Err(Failed);
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<(), Failed> {
        while !self.out.is_empty() {
            match (&*self.plain).write(&self.out.data[self.out.start..self.out.end]) {
                Ok(0) => return Err(Failed),
                Ok(n) => self.out.start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::trace!("relay plain write failed: {e}");
                    return Err(Failed);
                }
            }
        }
        Ok(())
    }

    /// Reads the plain socket and hands the bytes to rustls, while rustls has nothing left
    /// to send (so a slow TLS peer holds back the plain side, not memory).
    fn plain_to_tls(&mut self) -> Result<(), Failed> {
        if self.plain_eof || self.conn.wants_write() {
            return Ok(());
        }
        let cap = self.input.reset().len();
        let limit = self.payer.limit(cap);
        if limit == 0 {
            // As at EOF: what rustls holds is still sent, then close_notify.
            self.plain_eof = true;
            self.quota_used_up = true;
            self.conn.send_close_notify();
            return Ok(());
        }
        match (&*self.plain).read(&mut self.input.data[..limit]) {
            Ok(0) => {
                self.plain_eof = true;
                self.conn.send_close_notify();
            }
            Ok(n) => {
                let to_tls_dir = match self.from_tls_dir {
                    Direction::Up => Direction::Down,
                    Direction::Down => Direction::Up,
                };
                self.payer.pay(to_tls_dir, n);
                if self.conn.writer().write_all(&self.input.data[..n]).is_err() {
                    return Err(Failed);
                }
                self.to_tls += n as u64;
                self.activity.touch();
                self.input.grow_if_filled(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::trace!("relay plain read failed: {e}");
                return Err(Failed);
            }
        }
        Ok(())
    }

    fn flush_tls(&mut self) -> Result<(), Failed> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut &*self.tls) {
                Ok(0) => return Err(Failed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::trace!("relay tls write failed: {e}");
                    return Err(Failed);
                }
            }
        }
        Ok(())
    }

    /// What to poll each socket for.
    fn interest(&self) -> (PollFlags, PollFlags) {
        let mut tls = PollFlags::empty();
        let mut plain = PollFlags::empty();
        if !self.tls_sock_eof && !self.tls_eof && self.out.is_empty() {
            tls |= PollFlags::POLLIN;
        }
        if self.conn.wants_write() {
            tls |= PollFlags::POLLOUT;
        } else if !self.plain_eof {
            plain |= PollFlags::POLLIN;
        }
        if !self.out.is_empty() {
            plain |= PollFlags::POLLOUT;
        }
        (tls, plain)
    }

    fn release_buffers(&mut self) {
        self.raw.release();
        self.out.release();
        self.input.release();
    }
}

/// Relays between the TLS leg (`conn` over `tls`) and `plain` until both directions end.
/// Plaintext already buffered in `conn` (bytes that came with the tunnel handshake) goes
/// first. Metering is as in the other relays, on plaintext bytes.
pub(super) fn relay_tls(
    conn: &mut Connection,
    tls: &TcpStream,
    plain: &TcpStream,
    opts: &Options,
    from_tls_dir: Direction,
) -> Moved {
    let _ = tls.set_nonblocking(true);
    let _ = plain.set_nonblocking(true);
    // rustls caps unsent records at 64 KiB by default and then takes only part of a write;
    // the relay bounds them itself (no plain read while records wait), to one read's worth.
    conn.set_buffer_limit(None);
    let payer = Payer::of(opts);
    let _guards = payer.register();
    let activity = Activity::new();
    let mut s = State {
        conn,
        tls,
        plain,
        payer,
        from_tls_dir,
        activity: &activity,
        raw: Buf::default(),
        out: Buf::default(),
        input: Buf::default(),
        tls_sock_eof: false,
        tls_eof: false,
        plain_shut: false,
        plain_eof: false,
        tls_shut: false,
        from_tls: 0,
        to_tls: 0,
        quota_used_up: false,
    };
    let tick = Activity::tick(opts.idle_timeout);
    let quiet = PollTimeout::try_from(QUIET).unwrap_or(PollTimeout::MAX);
    let mut holding = true;
    // Step only after poll reported something: a step takes buffers, and after a quiet
    // spell has given them back they must stay given back.
    let mut ready = true;
    let mut idle_closed = false;
    let mut failed = false;
    loop {
        if ready {
            if s.step().is_err() {
                failed = true;
                break;
            }
            if s.done() {
                break;
            }
        }
        let (want_tls, want_plain) = s.interest();
        if want_tls.is_empty() && want_plain.is_empty() {
            failed = true; // cannot happen while a direction is unfinished; never spin
            break;
        }
        let mut fds = Vec::with_capacity(2);
        if !want_tls.is_empty() {
            fds.push(PollFd::new(tls.as_fd(), want_tls));
        }
        if !want_plain.is_empty() {
            fds.push(PollFd::new(plain.as_fd(), want_plain));
        }
        ready = false;
        match poll(&mut fds, if holding { quiet } else { tick }) {
            Ok(0) if holding => {
                s.release_buffers();
                holding = false;
            }
            Ok(0) => {
                if activity.expired(opts.idle_timeout) {
                    idle_closed = true;
                    break;
                }
            }
            Ok(_) => {
                holding = true;
                ready = true;
            }
            Err(Errno::EINTR) => {}
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    if failed || idle_closed {
        let _ = tls.shutdown(Shutdown::Both);
        let _ = plain.shutdown(Shutdown::Both);
    }
    Moved {
        from_tls: s.from_tls,
        to_tls: s.to_tls,
        idle_closed,
        quota_closed: s.quota_used_up,
    }
}
