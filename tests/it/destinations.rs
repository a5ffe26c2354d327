//! remote-proxy's destination policy through the real binaries: loopback (standing in for
//! every private range, which the unit tests in limit/destinations.rs cover without
//! sending a packet) is refused by default, opened only as far as `--allow-dest` says, and
//! the proxy's own port is never a target.

use crate::support::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A target listening on one port at 127.0.0.1, 127.0.0.2 and ::1 (every loopback form
/// reaches one of them), counting the connections it sees.
fn loopback_target(seen: Arc<AtomicUsize>) -> u16 {
    for _ in 0..20 {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        let (Ok(second), Ok(third)) = (
            TcpListener::bind(("127.0.0.2", port)),
            TcpListener::bind(("::1", port)),
        ) else {
            continue; // the port is taken on another address: pick another
        };
        for l in [first, second, third] {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for mut c in l.incoming().flatten() {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let _ = c.write_all(b"hello");
                }
            });
        }
        return port;
    }
    panic!("no port free on 127.0.0.1, 127.0.0.2 and ::1 at once");
}

/// remote-proxy with destination flags `policy` (none opening loopback unless given) and
/// local-proxy over it: (remote, its address, local, its address).
fn pair_with_flags(policy: &[&str]) -> (ChildGuard, SocketAddr, ChildGuard, SocketAddr) {
    let policy: Vec<String> = policy.iter().map(|s| s.to_string()).collect();
    let p = binary_pair_with_policy(&policy, &[]);
    (p.remote, p.remote_addr, p.local, p.local_addr)
}

fn forms(port: u16) -> Vec<Dest<'static>> {
    let ip = |s: &str| Dest::Ip(format!("{s}:{port}").parse().unwrap());
    vec![
        ip("127.0.0.1"),
        ip("127.0.0.2"),
        Dest::Host("localhost", port),
        ip("[::1]"),
        ip("[::ffff:127.0.0.1]"),
        ip("0.0.0.0"),
    ]
}

#[test]
fn every_loopback_form_is_refused_by_default_and_the_target_never_sees_it() {
    let seen = Arc::new(AtomicUsize::new(0));
    let port = loopback_target(seen.clone());
    let (remote, _, _local, laddr) = pair_with_flags(&[]);
    for dest in forms(port) {
        assert_eq!(socks_connect(laddr, dest, None).unwrap_err(), 0x02);
    }
    // HTTP clients get 403 saying why.
    let mut s = connect(laddr);
    write!(s, "CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").unwrap();
    let r = read_response_head(&mut s);
    assert_eq!(r.code, 403, "{}", r.head);
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    assert!(body.contains("destination not allowed"), "{body}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "a refused target was reached"
    );
    let lines = || remote.log_lines("refused: destination not allowed");
    assert!(
        eventually(Duration::from_secs(3), || lines().len() == 7),
        "{:?}",
        lines()
    );
    let lines = lines();
    assert!(lines
        .iter()
        .all(|l| l.contains("user=alice") && l.contains("default deny")));
    assert!(lines.iter().any(|l| l.contains("127.0.0.0/8")));
    assert!(lines.iter().any(|l| l.contains("::1/128")));
}

#[test]
fn allow_dest_opens_exactly_its_range() {
    let seen = Arc::new(AtomicUsize::new(0));
    let port = loopback_target(seen.clone());
    let (_remote, _, _local, laddr) = pair_with_flags(&["--allow-dest", "127.0.0.1/32"]);
    let mut opened = 0;
    for dest in forms(port) {
        let name = match &dest {
            Dest::Ip(a) => a.to_string(),
            Dest::Host(h, _) => h.to_string(),
        };
        match socks_connect(laddr, dest, None) {
            Ok(mut s) => {
                let mut hello = [0u8; 5];
                s.read_exact(&mut hello).unwrap();
                opened += 1;
                // 127.0.0.1 itself, its mapped form, and localhost's IPv4 address.
                assert!(
                    name.contains("127.0.0.1") || name == "localhost",
                    "{name} was let through"
                );
            }
            Err(code) => {
                assert_eq!(code, 0x02, "{name}");
                assert!(
                    !name.starts_with("127.0.0.1") && name != "localhost",
                    "{name} refused"
                );
            }
        }
    }
    assert_eq!(opened, 3);
    assert!(eventually(Duration::from_secs(2), || seen
        .load(Ordering::SeqCst)
        == 3));
}

#[test]
fn a_tunnel_to_remote_proxys_own_port_is_refused_even_when_its_range_is_open() {
    // Chaining the proxy into itself would take a slot and a thread per level.
    let (remote, raddr, _local, laddr) = pair_with_flags(&["--allow-dest", "127.0.0.0/8"]);
    assert_eq!(
        socks_connect(laddr, Dest::Ip(raddr), None).unwrap_err(),
        0x02
    );
    let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", raddr.port())
        .parse()
        .unwrap();
    assert_eq!(
        socks_connect(laddr, Dest::Ip(mapped), None).unwrap_err(),
        0x02
    );
    assert!(
        eventually(Duration::from_secs(3), || remote
            .log_lines("remote-proxy's own listener")
            .len()
            == 2),
        "{:?}",
        remote.log_lines("refused")
    );
    // The range itself is open: the origin is reached.
    let mut s = socks_connect(laddr, Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 1000);
}

#[test]
fn deny_port_and_deny_dest_win_over_allow_dest() {
    let seen = Arc::new(AtomicUsize::new(0));
    let port = loopback_target(seen.clone());
    let port_s = port.to_string();
    let (_r, _, _l, laddr) =
        pair_with_flags(&["--allow-dest", "127.0.0.0/8", "--deny-port", &port_s]);
    let dest = Dest::Ip(format!("127.0.0.1:{port}").parse().unwrap());
    assert_eq!(socks_connect(laddr, dest, None).unwrap_err(), 0x02);
    let (_r, _, _l, laddr) =
        pair_with_flags(&["--allow-dest", "127.0.0.0/8", "--deny-dest", "127.0.0.2/32"]);
    let two = Dest::Ip(format!("127.0.0.2:{port}").parse().unwrap());
    assert_eq!(socks_connect(laddr, two, None).unwrap_err(), 0x02);
    let one = Dest::Ip(format!("127.0.0.1:{port}").parse().unwrap());
    assert!(socks_connect(laddr, one, None).is_ok());
    assert!(eventually(Duration::from_secs(2), || seen
        .load(Ordering::SeqCst)
        == 1));
}

#[test]
fn a_bad_range_is_a_clear_start_up_error() {
    let out = remote_bin()
        .arg("--db")
        .arg(temp_dir().join("u.db"))
        .args(["serve", "--allow-dest", "10.0.0.1/8"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("10.0.0.0/8"), "{err}");
}
