//! local-proxy over several remote-proxies: balancing, failover, health checks.

use crate::support::*;
use flowgate::config::Balance;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn users() -> Vec<UserSpec> {
    let names = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "u9"];
    names.iter().map(|n| user(n, "pw", "unlimited")).collect()
}

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
    let fleet = Fleet::start(3, &users());
    let local = fleet.local(|_| {});
    let target = hold_target(Arc::new(AtomicUsize::new(0)));
    let held = hold(local.local_addr(), "u1", 10, target);
    let counts = settle(10, || fleet.open_tunnels());
    assert!(counts.contains(&10), "u1's 10 tunnels: {counts:?}");
    drop(held);
    settle(0, || fleet.open_tunnels());
    let names = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "u9"];
    let on = placement(&fleet, local.local_addr(), &names);
    let distinct: std::collections::BTreeSet<_> = on.iter().collect();
    assert!(distinct.len() >= 2, "9 users all on one remote: {on:?}");
    // A second local-proxy with the same list agrees on every user.
    let other = fleet.local(|_| {});
    assert_eq!(placement(&fleet, other.local_addr(), &names), on);
}

#[test]
fn least_connections_and_round_robin_spread_one_user_over_all() {
    for balance in [Balance::LeastConnections, Balance::RoundRobin] {
        let fleet = Fleet::start(3, &users());
        let local = fleet.local(|l| l.upstreams.balance = balance);
        let target = hold_target(Arc::new(AtomicUsize::new(0)));
        let _held = hold(local.local_addr(), "u1", 9, target);
        let counts = settle(9, || fleet.open_tunnels());
        assert_eq!(counts, vec![3, 3, 3], "{balance}");
    }
}

#[test]
fn a_dead_remotes_users_fail_over_intact_and_only_they_move_then_come_back() {
    let mut fleet = Fleet::start(3, &users());
    let local = fleet.local(|_| {});
    let names = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "u9"];
    let before = placement(&fleet, local.local_addr(), &names);
    let dead = before[0];
    fleet.stop(dead);
    // u1's next tunnel succeeds, bytes intact, on another remote; the app never notices.
    let mut s = socks_connect(local.local_addr(), Dest::Ip(origin()), Some(("u1", "pw"))).unwrap();
    download_and_verify(&mut s, "o", 200_000);
    drop(s);
    let after = placement(&fleet, local.local_addr(), &names);
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
        local.local_addr(),
        &names[..1]
    )[0] == dead));
    assert_eq!(placement(&fleet, local.local_addr(), &names), before);
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn with_every_remote_down_the_app_is_refused_at_once() {
    let mut fleet = Fleet::start(3, &users());
    let local = fleet.local(|_| {});
    for i in 0..3 {
        fleet.stop(i);
    }
    for attempt in 1..=3 {
        let t = Instant::now();
        let e =
            socks_connect(local.local_addr(), Dest::Ip(origin()), Some(("u1", "pw"))).unwrap_err();
        assert_eq!(e, 0x01, "attempt {attempt}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "attempt {attempt}: {:?}",
            t.elapsed()
        );
    }
    let mut s = connect(local.local_addr());
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
    let mut lc = flowgate::config::LocalConfig::new(
        silent
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect(),
        Some(flowgate::config::Credentials::new("u1".into(), "pw".into()).unwrap()),
    );
    lc.listen = "127.0.0.1:0".parse().unwrap();
    lc.upstreams.health_interval = Duration::from_secs(30);
    lc.upstreams.health_timeout = Duration::from_millis(300);
    lc.timeouts.handshake = Duration::from_millis(300);
    lc.timeouts.connect = Duration::from_millis(300);
    lc.admission.timeout = Duration::from_millis(300);
    init_log();
    let local = flowgate::local::start(lc).unwrap();
    // The start-up probes already found them silent: no attempt waits on them.
    for attempt in 1..=3 {
        let t = Instant::now();
        assert_eq!(
            socks_connect(local.local_addr(), Dest::Ip(origin()), None).unwrap_err(),
            0x01
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "attempt {attempt}: {:?}",
            t.elapsed()
        );
    }
}
