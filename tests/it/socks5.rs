//! SOCKS5 through local-proxy ⇄ remote-proxy: bytes intact for every address type.

use crate::support::*;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};

const TEN_MB: u64 = 10 * 1000 * 1000;

over_both_hops!(
    socks5_ipv4_carries_10mb_each_way_intact,
    socks5_ipv4_carries_10mb_each_way_intact_over
);

fn socks5_ipv4_carries_10mb_each_way_intact_over(hop: HopMode) {
    let p = pair_with(&[user("alice", "pw", "unlimited")], hop, |_| {});
    let o = origin();
    let mut s = socks_connect(p.local_addr(), Dest::Ip(o), None).unwrap();
    download_and_verify(&mut s, "origin", TEN_MB);
    let mut s = socks_connect(p.local_addr(), Dest::Ip(o), None).unwrap();
    upload_and_verify(&mut s, "origin", TEN_MB);
}

#[test]
fn a_whole_handshake_and_early_data_in_one_write_arrive_intact() {
    // Greeting, RFC 1929 credentials, CONNECT and the app's first request in one segment (as
    // pipelining clients send them): the handshake takes its bytes, the request goes on.
    let p = pair(&[user("alice", "pw", "unlimited")]);
    let o = origin();
    let SocketAddr::V4(o4) = o else {
        panic!("origin is IPv4")
    };
    let mut s = connect(p.local_addr());
    let mut msg = vec![5, 1, 2, 1, 5];
    msg.extend_from_slice(b"alice");
    msg.extend_from_slice(&[2, b'p', b'w', 5, 1, 0, 1]);
    msg.extend_from_slice(&o4.ip().octets());
    msg.extend_from_slice(&o4.port().to_be_bytes());
    msg.extend_from_slice(b"GET /bytes/70000 HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n");
    s.write_all(&msg).unwrap();
    let mut replies = [0u8; 2 + 2 + 10];
    s.read_exact(&mut replies).unwrap();
    assert_eq!(&replies[..6], &[5, 2, 1, 0, 5, 0], "{replies:?}");
    let r = read_response_head(&mut s);
    assert_eq!(r.code, 200);
    assert_body_is_pattern(&mut s, 70_000);
}

#[test]
fn socks5_domain_is_resolved_by_remote_proxy() {
    let p = pair(&[user("alice", "pw", "unlimited")]);
    let o = origin();
    let mut s = socks_connect(p.local_addr(), Dest::Host("localhost", o.port()), None).unwrap();
    download_and_verify(&mut s, "localhost", TEN_MB);
    let mut s = socks_connect(p.local_addr(), Dest::Host("localhost", o.port()), None).unwrap();
    upload_and_verify(&mut s, "localhost", TEN_MB);
}

#[test]
fn socks5_ipv6_carries_bytes_when_the_machine_has_ipv6() {
    let Ok(o6) = crate::support::origin::Origin::start("[::1]:0".parse().unwrap()) else {
        eprintln!("skipped: cannot bind [::1]");
        return;
    };
    let p = pair(&[user("alice", "pw", "unlimited")]);
    let mut s = socks_connect(p.local_addr(), Dest::Ip(o6.local_addr()), None).unwrap();
    download_and_verify(&mut s, "[::1]", TEN_MB);
    let mut s = socks_connect(p.local_addr(), Dest::Ip(o6.local_addr()), None).unwrap();
    upload_and_verify(&mut s, "[::1]", TEN_MB);
}

#[test]
fn app_credentials_pick_the_user() {
    // local-proxy is configured as alice; the app authenticates as bob and is served as bob.
    let p = pair(&[
        user("alice", "pw", "unlimited"),
        user("bob", "bobpw", "unlimited"),
    ]);
    let o = origin();
    let mut s = socks_connect(p.local_addr(), Dest::Ip(o), Some(("bob", "bobpw"))).unwrap();
    download_and_verify(&mut s, "origin", 100_000);
    // bob's password does not work for alice.
    let e = socks_connect(p.local_addr(), Dest::Ip(o), Some(("alice", "bobpw"))).unwrap_err();
    assert_eq!(e, 0x101, "refused in the RFC 1929 sub-negotiation");
}

over_both_hops!(
    half_close_is_passed_on_not_turned_into_a_reset,
    half_close_over
);

fn half_close_over(hop: HopMode) {
    // A target that reads until EOF, then answers with the byte count: only works if the
    // client's FIN reaches it while the other direction stays open.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target: SocketAddr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut n = 0usize;
        let mut buf = [0u8; 65536];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        let _ = c.write_all(format!("got {n}").as_bytes());
    });
    let p = pair_with(&[user("alice", "pw", "unlimited")], hop, |_| {});
    let mut s = socks_connect(p.local_addr(), Dest::Ip(target), None).unwrap();
    s.write_all(&vec![7u8; 1_000_000]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "got 1000000");
}

#[test]
fn a_burst_of_rfc1929_logins_costs_one_check_at_the_remote() {
    let p = pair(&[
        user("alice", "pw", "unlimited"),
        user("bob", "bobpw", "unlimited"),
    ]);
    let before = p.state.credential_checks();
    let start = std::sync::Arc::new(std::sync::Barrier::new(20));
    let local = p.local_addr();
    let hs: Vec<_> = (0..20)
        .map(|_| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                socks_connect(local, Dest::Ip(origin()), Some(("bob", "bobpw"))).map(drop)
            })
        })
        .collect();
    for h in hs {
        assert!(h.join().unwrap().is_ok());
    }
    assert!(
        p.state.credential_checks() - before <= 1,
        "{}",
        p.state.credential_checks() - before
    );
}
