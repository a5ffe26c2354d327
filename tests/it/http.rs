//! HTTP CONNECT and plain absolute-form forwarding through the pair.

use crate::support::*;
use std::io::{Read, Write};

const TEN_MB: u64 = 10 * 1000 * 1000;

fn http_connect(
    proxy: std::net::SocketAddr,
    authority: &str,
    auth: Option<&str>,
) -> (std::net::TcpStream, Response) {
    let mut s = connect(proxy);
    let auth = auth
        .map(|a| format!("Proxy-Authorization: Basic {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n"
    )
    .unwrap();
    let r = read_response_head(&mut s);
    (s, r)
}

#[test]
fn connect_tunnel_carries_10mb_each_way_intact() {
    let p = pair(&[user("alice", "pw", "unlimited")]);
    let o = origin();
    let (mut s, r) = http_connect(p.local_addr(), &o.to_string(), None);
    assert_eq!(r.code, 200, "{}", r.head);
    download_and_verify(&mut s, "origin", TEN_MB);
    let (mut s, r) = http_connect(p.local_addr(), &format!("localhost:{}", o.port()), None);
    assert_eq!(r.code, 200, "{}", r.head);
    upload_and_verify(&mut s, "origin", TEN_MB);
}

/// Sends a CONNECT head carrying `pad` bytes of extra header and, in the same write, a GET
/// for the origin; checks the GET's answer arrives whole.
fn connect_with_request_in_the_same_write(pad: usize) {
    let p = pair(&[user("alice", "pw", "unlimited")]);
    let o = origin();
    let mut s = connect(p.local_addr());
    let pad = format!("X-Pad: {}\r\n", "a".repeat(pad));
    write!(
        s,
        "CONNECT {o} HTTP/1.1\r\n{pad}\r\nGET /bytes/5000 HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    assert_eq!(read_response_head(&mut s).code, 200);
    let r = read_response_head(&mut s);
    assert_eq!(r.code, 200);
    assert_body_is_pattern(&mut s, 5000);
}

#[test]
fn bytes_sent_right_after_the_connect_head_are_not_lost() {
    connect_with_request_in_the_same_write(10);
}

#[test]
fn a_head_longer_than_one_peek_keeps_the_bytes_after_it() {
    // local-proxy peeks at most 1 KiB at a time during a handshake.
    connect_with_request_in_the_same_write(6000);
}

over_both_hops!(
    plain_http_is_forwarded_10mb_each_way_intact,
    plain_http_is_forwarded_10mb_each_way_intact_over
);

fn plain_http_is_forwarded_10mb_each_way_intact_over(hop: HopMode) {
    let p = pair_with(&[user("alice", "pw", "unlimited")], hop, |_| {});
    let o = origin();
    let mut s = connect(p.local_addr());
    write!(
        s,
        "GET http://{o}/bytes/{TEN_MB} HTTP/1.1\r\nHost: {o}\r\nProxy-Connection: keep-alive\r\n\r\n"
    )
    .unwrap();
    let r = read_response_head(&mut s);
    assert_eq!(r.code, 200, "{}", r.head);
    assert_eq!(r.content_length, Some(TEN_MB));
    assert_body_is_pattern(&mut s, TEN_MB);

    let mut s = connect(p.local_addr());
    write!(
        s,
        "POST http://localhost:{}/sink HTTP/1.1\r\nHost: localhost\r\nContent-Length: {TEN_MB}\r\n\r\n",
        o.port()
    )
    .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    while off < TEN_MB {
        let k = ((TEN_MB - off) as usize).min(buf.len());
        crate::support::origin::fill_pattern(off, &mut buf[..k]);
        s.write_all(&buf[..k]).unwrap();
        off += k as u64;
    }
    let r = read_response_head(&mut s);
    assert_eq!(r.code, 200, "{}", r.head);
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert_eq!(
        body.trim(),
        format!(
            "bytes={TEN_MB} fnv={:016x}",
            crate::support::origin::pattern_hash(TEN_MB)
        )
    );
}

#[test]
fn proxy_authorization_picks_the_user() {
    let p = pair(&[
        user("alice", "pw", "unlimited"),
        user("bob", "bobpw", "unlimited"),
    ]);
    let o = origin();
    // "bob:bobpw"
    let (mut s, r) = http_connect(p.local_addr(), &o.to_string(), Some("Ym9iOmJvYnB3"));
    assert_eq!(r.code, 200, "{}", r.head);
    download_and_verify(&mut s, "origin", 1000);
    // "bob:nope"
    let (_, r) = http_connect(p.local_addr(), &o.to_string(), Some("Ym9iOm5vcGU="));
    assert_eq!(r.code, 407, "{}", r.head);
    assert!(r.head.contains("Proxy-Authenticate: Basic"), "{}", r.head);
}

/// Standard base64 (RFC 4648 §4) with padding, for Basic credentials.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn a_password_longer_than_the_protocol_carries_is_refused_not_cut() {
    // Regression: the password used to be cut to fit. The stored password is the first 255 bytes of what the app
    // sends; cutting the app's password to fit would log it in.
    let stored: &'static str = Box::leak("p".repeat(255).into_boxed_str());
    let p = pair(&[user("alice", stored, "unlimited")]);
    let o = origin().to_string();
    let exact = base64(format!("alice:{stored}").as_bytes());
    let (_s, r) = http_connect(p.local_addr(), &o, Some(&exact));
    assert_eq!(r.code, 200, "{}", r.head);
    let longer = base64(format!("alice:{stored}extra").as_bytes());
    let (_s, r) = http_connect(p.local_addr(), &o, Some(&longer));
    assert_eq!(r.code, 407, "{}", r.head);
    assert!(r.head.contains("Proxy-Authenticate"), "{}", r.head);
}
