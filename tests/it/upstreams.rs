//! local-proxy over several remote-proxies: balancing, failover, health checks.

use crate::support::*;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

const USERS: [&str; 9] = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "u9"];

/// Opens `n` held tunnels for `user` through `local`.
fn hold(local: SocketAddr, user: &str, n: usize, target: SocketAddr) -> Vec<TcpStream> {
    (0..n)
        .map(|_| socks_connect(local, Dest::Ip(target), Some((user, "pw"))).unwrap())
        .collect()
}

/// The remote each of `users` lands on, one held tunnel each (then closed).
fn placement(fleet: &Fleet, local: SocketAddr, users: &[&str]) -> Vec<usize> {
    let target = hold_target(Arc::new(AtomicUsize::new(0)));
    users
        .iter()
        .map(|u| {
            let t = hold(local, u, 1, target);
            let counts = settle(1, || fleet.open_tunnels());
            drop(t);
            settle(0, || fleet.open_tunnels());
            counts.iter().position(|&c| c == 1).unwrap()
        })
        .collect()
}

#[test]
fn sticky_keeps_a_user_on_one_remote_and_spreads_users() {
    let mut fleet = Fleet::start(3, &USERS);
    let local = fleet.local(&[]);
    let target = hold_target(Arc::new(AtomicUsize::new(0)));
    let held = hold(local, "u1", 10, target);
    let counts = settle(10, || fleet.open_tunnels());
    assert!(counts.contains(&10), "u1's 10 tunnels: {counts:?}");
    drop(held);
    settle(0, || fleet.open_tunnels());
    let on = placement(&fleet, local, &USERS);
    let distinct: std::collections::BTreeSet<_> = on.iter().collect();
    assert!(distinct.len() >= 2, "9 users all on one remote: {on:?}");
    // A second local-proxy with the same list agrees on every user.
    let other = fleet.local(&[]);
    assert_eq!(placement(&fleet, other, &USERS), on);
}

#[test]
fn least_connections_and_round_robin_spread_one_user_over_all() {
    for balance in ["least-connections", "round-robin"] {
        let mut fleet = Fleet::start(3, &USERS);
        let local = fleet.local(&["--balance", balance]);
        let target = hold_target(Arc::new(AtomicUsize::new(0)));
        let _held = hold(local, "u1", 9, target);
        let counts = settle(9, || fleet.open_tunnels());
        assert_eq!(counts, vec![3, 3, 3], "{balance}");
    }
}

#[test]
fn a_dead_remotes_users_fail_over_intact_and_only_they_move_then_come_back() {
    let mut fleet = Fleet::start(3, &USERS);
    let local = fleet.local(&[]);
    let names = USERS;
    let before = placement(&fleet, local, &names);
    let dead = before[0];
    fleet.kill(dead);
    // u1's next tunnel succeeds, bytes intact, on another remote; the app never notices.
    let mut s = socks_connect(local, Dest::Ip(origin()), Some(("u1", "pw"))).unwrap();
    download_and_verify(&mut s, "o", 200_000);
    drop(s);
    let after = placement(&fleet, local, &names);
    for (i, name) in names.iter().enumerate() {
        if before[i] == dead {
            assert_ne!(after[i], dead, "{name} still on the dead remote");
        } else {
            assert_eq!(after[i], before[i], "{name} moved though its remote is up");
        }
    }
    // Back within rise x interval (2 x 200 ms) plus a second.
    fleet.restart(dead);
    let t = Instant::now();
    assert!(eventually(Duration::from_millis(1400), || placement(
        &fleet,
        local,
        &names[..1]
    )[0] == dead));
    assert_eq!(placement(&fleet, local, &names), before);
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn with_every_remote_down_the_app_is_refused_at_once() {
    let mut fleet = Fleet::start(3, &USERS);
    let local = fleet.local(&[]);
    for i in 0..3 {
        fleet.kill(i);
    }
    for attempt in 1..=3 {
        let t = Instant::now();
        let e = socks_connect(local, Dest::Ip(origin()), Some(("u1", "pw"))).unwrap_err();
        assert_eq!(e, 0x01, "attempt {attempt}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "attempt {attempt}: {:?}",
            t.elapsed()
        );
    }
    let mut s = connect(local);
    std::io::Write::write_all(
        &mut s,
        format!(
            "CONNECT {} HTTP/1.1\r\nProxy-Authorization: Basic dTE6cHc=\r\n\r\n",
            origin()
        )
        .as_bytes(),
    )
    .unwrap();
    let r = read_response_head(&mut s);
    assert_eq!(r.code, 502);
    let mut body = vec![0u8; r.content_length.unwrap() as usize];
    std::io::Read::read_exact(&mut s, &mut body).unwrap();
    assert!(
        String::from_utf8_lossy(&body).contains("no remote-proxy"),
        "{body:?}"
    );
}

#[test]
fn remotes_that_accept_but_never_answer_cost_only_the_first_attempt() {
    // Listeners that accept (the kernel does, from the backlog) and never say a word.
    let silent: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut cmd = local_bin();
    cmd.args(["--listen", "127.0.0.1:0", "--user", "u1"])
        .args(["--health-interval", "30s", "--health-timeout", "300ms"])
        .args(["--handshake-timeout", "300ms", "--connect-timeout", "300ms"])
        .args(["--queue-timeout", "300ms"])
        .env("FLOWGATE_PASSWORD", "pw");
    for l in &silent {
        cmd.args(["--remote", &l.local_addr().unwrap().to_string()]);
    }
    let (_local, local) = spawn_listening(cmd);
    // The start-up probes already found them silent: no attempt waits on them.
    for attempt in 1..=3 {
        let t = Instant::now();
        assert_eq!(
            socks_connect(local, Dest::Ip(origin()), None).unwrap_err(),
            0x01
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "attempt {attempt}: {:?}",
            t.elapsed()
        );
    }
}
