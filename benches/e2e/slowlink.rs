//! A slow link for the latency phase, where the machine has no netem: a TCP forwarder that
//! holds every chunk for `delay` in each direction (a round trip of twice that), and makes
//! a new connection wait one round trip before anything passes, for the TCP handshake that
//! loopback completes at once. Threads per connection are fine here: the phase sends one
//! request at a time.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct SlowLink {
    pub addr: SocketAddr,
}

impl SlowLink {
    /// Forwards connections to `to` over a link with `delay` each way.
    pub fn start(to: SocketAddr, delay: Duration) -> SlowLink {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind slow link");
        let addr = l.local_addr().expect("slow link address");
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || carry(c, to, delay));
            }
        });
        SlowLink { addr }
    }
}

fn carry(client: TcpStream, to: SocketAddr, delay: Duration) {
    // SYN there, SYN-ACK back: the client could not have sent a byte before this.
    std::thread::sleep(2 * delay);
    let Ok(server) = TcpStream::connect(to) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (c2, s2) = match (client.try_clone(), server.try_clone()) {
        (Ok(c), Ok(s)) => (c, s),
        _ => return,
    };
    let up = std::thread::spawn(move || pump(client, server, delay));
    pump(s2, c2, delay);
    let _ = up.join();
}

/// Copies `from` to `to`, each chunk delivered `delay` after it was read; an end of stream
/// arrives `delay` late too.
fn pump(mut from: TcpStream, to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        let mut to = to;
        for (at, chunk) in rx {
            let due = at + delay;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if chunk.is_empty() {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            if to.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = tx.send((Instant::now(), Vec::new()));
                break;
            }
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}
