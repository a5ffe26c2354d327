//! Every failure reaches the client in its own protocol, with its own code; bad input never
//! hangs a worker.

use crate::support::*;
use flowgate::proto::addr::TargetAddr;
use flowgate::proto::tunnel::{self, Status};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[test]
fn remote_proxy_answers_each_failure_with_its_own_status() {
    let p = pair(&[user("alice", "pw", "unlimited")]);
    let r = &p;
    let ok = TargetAddr::Ip(origin());
    assert_eq!(tunnel_status(r, "alice", "pw", ok.clone()), Status::Ok);
    assert_eq!(
        tunnel_status(r, "alice", "wrong", ok.clone()),
        Status::BadCredentials
    );
    assert_eq!(
        tunnel_status(r, "mallory", "pw", ok),
        Status::BadCredentials
    );
    assert_eq!(
        tunnel_status(r, "alice", "pw", TargetAddr::Ip(refused_addr())),
        Status::TargetRefused
    );
    assert_eq!(
        tunnel_status(
            r,
            "alice",
            "pw",
            TargetAddr::Domain("nothing.invalid".into(), 80)
        ),
        Status::NameNotResolved
    );
}

over_both_hops!(
    malformed_tunnel_input_gets_the_malformed_reply_and_a_close,
    malformed_tunnel_input_gets_the_malformed_reply_and_a_close_over
);

fn malformed_tunnel_input_gets_the_malformed_reply_and_a_close_over(hop: HopMode) {
    let p = pair_with(&[user("alice", "pw", "unlimited")], hop, |_| {});
    for (garbage, want) in [
        (&b"GET / HTTP/1.1\r\n\r\n"[..], Status::Malformed),
        (&b"FG\x01\x09\x01a\x01b"[..], Status::Malformed),
        (&b"FG\x01\x01\x00"[..], Status::Malformed),
        (&b"FG\x01\x01\x01a\x01b\x07\x00"[..], Status::Malformed),
        (&b"FG\x07\x01"[..], Status::UnsupportedVersion),
    ] {
        let mut s = p.raw_remote();
        s.write_all(garbage).unwrap();
        let reply = tunnel::read_reply(&mut s).unwrap();
        assert_eq!(reply.status, want, "for {garbage:?}");
        assert_closed_quietly(&mut s, Duration::from_secs(3));
    }
    // The server still works afterwards.
    let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 1000);
}

#[test]
fn a_silent_client_is_closed_after_the_handshake_timeout() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| r.timeouts.handshake = Duration::from_millis(500),
        |l| l.timeouts.handshake = Duration::from_millis(500),
    );
    // A half-sent tunnel request (inside TLS) or SOCKS greeting, a socket that never
    // starts the TLS handshake, and one that stops halfway through it are all closed
    // without a reply. The handshake timeout is 500 ms: closed well within 3 s.
    let mut s = p.raw_remote();
    s.write_all(b"FG\x01").unwrap();
    assert_closed_quietly(&mut s, Duration::from_secs(3));
    let hello = client_hello(&p.tls, p.remote_addr());
    for (addr, partial) in [
        (p.local_addr(), &[5u8][..]),
        (p.remote_addr(), &[][..]),
        (p.remote_addr(), &hello[..hello.len() / 2]),
    ] {
        let mut s = connect(addr);
        s.write_all(partial).unwrap();
        assert_closed_quietly(&mut s, Duration::from_secs(3));
    }
    // A half-sent HTTP head gets 408 Request Timeout, then a close.
    let mut s = connect(p.local_addr());
    s.write_all(b"CONNECT example.com:443 HTTP/1.1\r\n")
        .unwrap();
    let t = Instant::now();
    assert_eq!(read_response_head(&mut s).code, 408);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn socks5_clients_get_the_documented_reply_codes() {
    let p = pair(&[user("alice", "pw", "unlimited")]);
    let l = p.local_addr();
    let o = origin();
    // A wrong password or unknown user fails the RFC 1929 sub-negotiation (status 1 there:
    // socks_connect reports 0x100 + status), checked with the remote before CONNECT.
    assert_eq!(
        socks_connect(l, Dest::Ip(o), Some(("alice", "bad"))).unwrap_err(),
        0x101
    );
    assert_eq!(
        socks_connect(l, Dest::Ip(o), Some(("nobody", "pw"))).unwrap_err(),
        0x101
    );
    assert_eq!(
        socks_connect(l, Dest::Ip(refused_addr()), None).unwrap_err(),
        0x05
    );
    assert_eq!(
        socks_connect(l, Dest::Host("nothing.invalid", 80), None).unwrap_err(),
        0x04
    );

    // BIND and UDP ASSOCIATE: command not supported.
    for cmd in [2u8, 3] {
        let mut s = connect(l);
        s.write_all(&[5, 1, 0]).unwrap();
        let mut m = [0u8; 2];
        s.read_exact(&mut m).unwrap();
        s.write_all(&[5, cmd, 0, 1, 127, 0, 0, 1, 0, 80]).unwrap();
        assert_eq!(read_socks_reply(&mut s), 0x07);
    }
    // Unknown address type.
    let mut s = connect(l);
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    s.write_all(&[5, 1, 0, 9, 0, 0]).unwrap();
    assert_eq!(read_socks_reply(&mut s), 0x08);
}

#[test]
fn without_a_configured_user_apps_must_authenticate() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |_| {},
        |l| l.credentials = None,
    );
    let o = origin();
    assert_eq!(
        socks_connect(p.local_addr(), Dest::Ip(o), None).unwrap_err(),
        0xff
    );
    let mut s = socks_connect(p.local_addr(), Dest::Ip(o), Some(("alice", "pw"))).unwrap();
    download_and_verify(&mut s, "o", 1000);
    let mut s = connect(p.local_addr());
    write!(s, "CONNECT {o} HTTP/1.1\r\n\r\n").unwrap();
    let r = read_response_head(&mut s);
    assert_eq!(r.code, 407);
    assert!(r.head.contains("Proxy-Authenticate"));
}

#[test]
fn http_clients_get_the_documented_statuses() {
    let p = pair(&[user("alice", "pw", "unlimited")]);
    let l = p.local_addr();
    let ask = |req: String| {
        let mut s = connect(l);
        s.write_all(req.as_bytes()).unwrap();
        read_response_head(&mut s)
    };
    let r = ask(format!("CONNECT {} HTTP/1.1\r\n\r\n", refused_addr()));
    assert_eq!(r.code, 502);
    let r = ask("CONNECT nothing.invalid:443 HTTP/1.1\r\n\r\n".into());
    assert_eq!(r.code, 502);
    // "alice:bad"
    let r = ask(format!(
        "CONNECT {} HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6YmFk\r\n\r\n",
        origin()
    ));
    assert_eq!(r.code, 407);
    let r = ask("GET /not-a-proxy-request HTTP/1.1\r\n\r\n".into());
    assert_eq!(r.code, 400);
    let r = ask("GET http://x/ HTTP/9.9\r\n\r\n".into());
    assert_eq!(r.code, 400);
    let r = ask(format!(
        "GET http://x/ HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    ));
    assert_eq!(r.code, 431);
}

#[test]
fn a_dead_remote_proxy_is_reported_not_hung() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |_| {},
        |l| l.upstreams.remotes = vec![refused_addr().to_string()],
    );
    assert_eq!(
        socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap_err(),
        0x01
    );
    let mut s = connect(p.local_addr());
    write!(s, "CONNECT {} HTTP/1.1\r\n\r\n", origin()).unwrap();
    assert_eq!(read_response_head(&mut s).code, 502);
}

#[test]
fn unknown_first_bytes_are_closed_without_a_reply() {
    let p = pair(&[user("alice", "pw", "unlimited")]);
    let mut s = connect(p.local_addr());
    s.write_all(&[0x16, 0x03, 0x01, 0, 0]).unwrap(); // a TLS ClientHello, not a proxy request
                                                     // Closed at once with nothing sent back (a FIN, or a reset if our bytes were unread).
    assert_closed_quietly(&mut s, Duration::from_secs(3));
    // SOCKS4 gets a SOCKS4 rejection rather than silence.
    let mut s = connect(p.local_addr());
    s.write_all(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).unwrap();
    let mut reply = [0u8; 8];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[1], 0x5b);
}

#[test]
fn deleted_user_is_refused_at_once() {
    let p = pair(&[
        user("alice", "pw", "unlimited"),
        user("bob", "pw", "unlimited"),
    ]);
    let o = origin();
    let mut s = socks_connect(p.local_addr(), Dest::Ip(o), Some(("bob", "pw"))).unwrap();
    download_and_verify(&mut s, "o", 1000);
    remote_user_ok(&p.db, &["user", "del", "bob"]);
    let e = socks_connect(p.local_addr(), Dest::Ip(o), Some(("bob", "pw"))).unwrap_err();
    assert_eq!(e, 0x02);
}

#[test]
fn remote_proxy_survives_a_burst_of_clients_that_hang_up_mid_handshake() {
    let p = pair(&[user("alice", "pw", "unlimited")]);
    let hello = client_hello(&p.tls, p.remote_addr());
    for i in 0..200 {
        let mut s = TcpStream::connect(p.remote_addr()).unwrap();
        // Half of them stop inside the TLS handshake, half send plaintext and stop.
        let _ = if i % 2 == 0 {
            s.write_all(&hello[..(i * 7) % hello.len()])
        } else {
            s.write_all(&b"FG\x01\x01\x05alice"[..(i % 10)])
        };
        drop(s);
    }
    let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 100_000);
}

#[test]
fn a_client_trickling_its_handshake_is_cut_at_the_deadline() {
    // One byte every 150 ms never trips a per-read timeout of 1 s; the whole-handshake
    // deadline of 1 s must still close it.
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| r.timeouts.handshake = Duration::from_secs(1),
        |l| l.timeouts.handshake = Duration::from_secs(1),
    );
    let slow = b"GET http://example/ HTTP/1.1\r\nX: aaaaaaaaaaaaaaaaaaaaaaaa".to_vec();
    let s = connect(p.local_addr());
    let mut w = s.try_clone().unwrap();
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        for b in slow {
            if w.write_all(&[b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    });
    let mut r = s;
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "local: closed after {took:?}"
    );
    assert!(
        String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 408"),
        "{rest:?}"
    );
    drop(r);
    writer.join().unwrap();
    // The same inside TLS: the deadline covers the TLS handshake and the request together.
    let mut s = p.raw_remote();
    let t = Instant::now();
    for b in b"FG\x02\x01\0\0\0\0\0\0\0\x01\x05alice\x02pw\x03\x20aaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "remote: closed after {took:?}"
    );
}

#[test]
fn silent_sockets_are_closed_at_the_first_byte_timeout_and_others_are_served_meanwhile() {
    let first_byte = Duration::from_secs(2);
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| {
            r.timeouts.first_byte = first_byte;
            r.timeouts.handshake = Duration::from_secs(10);
            // Fewer slots than silent sockets: were they served on workers, they would hold
            // every slot, and the real tunnel would wait.
            r.admission.max_active = 40;
        },
        |l| {
            l.timeouts.first_byte = first_byte;
            l.timeouts.handshake = Duration::from_secs(10);
        },
    );
    // 100 sockets from 127.0.0.2 that never say a word to the remote, and 50 to local-proxy.
    let from = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let t = Instant::now();
    let silent: Vec<TcpStream> = std::iter::repeat_n(p.remote_addr(), 100)
        .chain(std::iter::repeat_n(p.local_addr(), 50))
        .map(|to| connect_from(from, to))
        .collect();
    // Silent, they are parked (64 per address by default, beside local-proxy's warm
    // connections), holding no worker and no slot; the rest wait on workers, at most the
    // 32 handshakes an address may have at once.
    let parked = || p.remote.parked() >= 64 && p.remote.active() <= 32;
    assert!(eventually(Duration::from_secs(2), parked));
    // A real tunnel from 127.0.0.1 is served at once meanwhile.
    let served = Instant::now();
    let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 1000);
    assert!(
        served.elapsed() < Duration::from_secs(1),
        "{:?}",
        served.elapsed()
    );
    // Every silent one, the ones held back by the cap included, is closed at the first-byte
    // timeout after its connect, well before the 10 s handshake timeout.
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "a silent socket got an answer");
    }
    assert!(
        t.elapsed() < first_byte + Duration::from_secs(1),
        "closed after {:?}",
        t.elapsed()
    );
}
