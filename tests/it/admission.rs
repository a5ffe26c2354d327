//! Slots, the paused queue, per-user caps and request-rate throttles, end to end.

use crate::support::*;
use flowgate::proto::addr::TargetAddr;
use flowgate::proto::tunnel::Status;
use flowgate::users::{Changes, Store, UserStore};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Opens a SOCKS tunnel on another thread; the result arrives on the returned channel.
fn socks_later(
    proxy: SocketAddr,
    target: SocketAddr,
    creds: (&'static str, &'static str),
) -> mpsc::Receiver<Result<TcpStream, u16>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(socks_connect(proxy, Dest::Ip(target), Some(creds)));
    });
    rx
}

fn limits(r: &mut flowgate::config::RemoteConfig, active: usize, queued: usize, timeout_ms: u64) {
    r.admission.max_active = active;
    r.admission.max_queued = queued;
    r.admission.timeout = Duration::from_millis(timeout_ms);
}

fn set_limits(db: &std::path::Path, user: &str, cap: Option<u32>, rate: Option<&str>) {
    let ch = Changes {
        max_connections: Some(cap),
        rate: Some(rate.map(|r| r.parse().unwrap())),
        ..Changes::default()
    };
    Store::open(db).unwrap().set(user, &ch).unwrap();
}

#[test]
fn third_connection_waits_then_completes_intact_when_a_slot_frees() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| limits(r, 2, 10, 20_000),
        |_| {},
    );
    let held = Arc::new(AtomicUsize::new(0));
    let hold = hold_target(held.clone());
    let first = socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap();
    let _second = socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap();
    let third = socks_later(p.local_addr(), origin(), ("alice", "pw"));
    assert!(
        third.recv_timeout(Duration::from_millis(700)).is_err(),
        "third tunnel was served while both slots were busy"
    );
    drop(first); // frees a slot
    let mut s = third
        .recv_timeout(Duration::from_secs(10))
        .expect("third tunnel never served")
        .expect("third tunnel refused");
    download_and_verify(&mut s, "o", 2_000_000);
}

#[test]
fn a_full_queue_answers_busy_at_once() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| limits(r, 1, 1, 20_000),
        |_| {},
    );
    let hold = hold_target(Arc::new(AtomicUsize::new(0)));
    let _first = socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap();
    let _queued = socks_later(p.local_addr(), hold, ("alice", "pw"));
    std::thread::sleep(Duration::from_millis(300)); // let it take the one queue place
    let t = Instant::now();
    let reply = tunnel_reply(&p, "alice", "pw", TargetAddr::Ip(hold));
    assert_eq!(reply.status, Status::ServerBusy);
    assert!(reply.retry_after >= 1);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    // Through local-proxy, HTTP clients get 503 with Retry-After, SOCKS clients 0x01.
    let mut s = connect(p.local_addr());
    write!(s, "CONNECT {hold} HTTP/1.1\r\n\r\n").unwrap();
    let r = read_response_head(&mut s);
    assert_eq!(r.code, 503, "{}", r.head);
    assert!(r.head.contains("Retry-After: "), "{}", r.head);
    assert_eq!(
        socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap_err(),
        0x01
    );
}

#[test]
fn a_queued_connection_times_out_with_busy() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| limits(r, 1, 10, 1_000),
        |_| {},
    );
    let hold = hold_target(Arc::new(AtomicUsize::new(0)));
    let _first = socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap();
    let t = Instant::now();
    let reply = tunnel_reply(&p, "alice", "pw", TargetAddr::Ip(hold));
    let waited = t.elapsed();
    assert_eq!(reply.status, Status::ServerBusy);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "answered after {waited:?}"
    );
}

#[test]
fn a_client_that_leaves_the_queue_is_never_served() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| limits(r, 1, 10, 20_000),
        |_| {},
    );
    let hold = hold_target(Arc::new(AtomicUsize::new(0)));
    let first = socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap();
    // Queue a tunnel to a counting target straight at remote-proxy, then hang up.
    let reached = Arc::new(AtomicUsize::new(0));
    let counted = hold_target(reached.clone());
    {
        let mut s = connect(p.remote_addr());
        let req = flowgate::proto::tunnel::Request {
            tunnel_id: Some(flowgate::proto::tunnel::TunnelId(7)),
            command: flowgate::proto::tunnel::Command::Connect,
            user: "alice".into(),
            password: "pw".into(),
            target: Some(TargetAddr::Ip(counted)),
            invite: None,
        };
        flowgate::proto::tunnel::write_request(&mut s, &req).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    } // dropped: the client left while queued
    std::thread::sleep(Duration::from_millis(300));
    drop(first);
    // The next client is served (the queue moved on), and the one that left never was.
    let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 10_000);
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "a departed client was served"
    );
}

#[test]
fn per_user_cap_queues_then_serves_without_holding_a_slot() {
    let p = pair_with(
        &[
            user("alice", "pw", "unlimited"),
            user("bob", "pw", "unlimited"),
        ],
        |r| limits(r, 2, 10, 20_000),
        |_| {},
    );
    set_limits(&p.db, "alice", Some(1), None);
    let hold = hold_target(Arc::new(AtomicUsize::new(0)));
    let first = socks_connect(p.local_addr(), Dest::Ip(hold), Some(("alice", "pw"))).unwrap();
    let second = socks_later(p.local_addr(), origin(), ("alice", "pw"));
    assert!(
        second.recv_timeout(Duration::from_millis(700)).is_err(),
        "alice's second tunnel ran past her cap of 1"
    );
    // Two slots, alice holds one and her waiter holds none: bob gets the other at once.
    let t = Instant::now();
    let mut b = socks_connect(p.local_addr(), Dest::Ip(origin()), Some(("bob", "pw"))).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    download_and_verify(&mut b, "o", 10_000);
    drop(first);
    let mut s = second
        .recv_timeout(Duration::from_secs(10))
        .expect("alice's second tunnel never served")
        .expect("alice's second tunnel refused");
    download_and_verify(&mut s, "o", 1_000_000);
}

#[test]
fn three_per_minute_lets_exactly_three_in_and_the_fourth_gets_the_wait() {
    let p = pair(&[user("alice", "pw", "unlimited")]);
    set_limits(&p.db, "alice", None, Some("3/m"));
    let o = TargetAddr::Ip(origin());
    for i in 0..3 {
        assert_eq!(
            tunnel_status(&p, "alice", "pw", o.clone()),
            Status::Ok,
            "#{i}"
        );
    }
    let r = tunnel_reply(&p, "alice", "pw", o);
    assert_eq!(r.status, Status::RateLimited);
    assert!(
        (55..=60).contains(&r.retry_after),
        "retry after {}",
        r.retry_after
    );
    let mut s = connect(p.local_addr());
    write!(s, "CONNECT {} HTTP/1.1\r\n\r\n", origin()).unwrap();
    let resp = read_response_head(&mut s);
    assert_eq!(resp.code, 429, "{}", resp.head);
    assert!(resp.head.contains("Retry-After: "), "{}", resp.head);
    assert_eq!(
        socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap_err(),
        0x02
    );
}

#[test]
fn per_ip_and_per_user_throttles_are_independent() {
    let o = TargetAddr::Ip(origin());
    // Per IP: counts every user's tunnels from the address.
    let p = pair_with(
        &[
            user("alice", "pw", "unlimited"),
            user("bob", "pw", "unlimited"),
        ],
        |r| r.rate_per_ip = Some("3/m".parse().unwrap()),
        |_| {},
    );
    for u in ["alice", "alice", "bob"] {
        assert_eq!(tunnel_status(&p, u, "pw", o.clone()), Status::Ok);
    }
    assert_eq!(
        tunnel_status(&p, "bob", "pw", o.clone()),
        Status::RateLimited
    );
    // Per user: alice's limit does not touch bob, and no per-IP limit is in force.
    let p = pair(&[
        user("alice", "pw", "unlimited"),
        user("bob", "pw", "unlimited"),
    ]);
    set_limits(&p.db, "alice", None, Some("1/m"));
    assert_eq!(tunnel_status(&p, "alice", "pw", o.clone()), Status::Ok);
    assert_eq!(
        tunnel_status(&p, "alice", "pw", o.clone()),
        Status::RateLimited
    );
    for _ in 0..5 {
        assert_eq!(tunnel_status(&p, "bob", "pw", o.clone()), Status::Ok);
    }
}

#[test]
fn failed_logins_are_throttled_per_address_and_user_without_hashing() {
    let p = pair_with(
        &[
            user("alice", "pw", "unlimited"),
            user("bob", "pw2", "unlimited"),
        ],
        |r| r.failed_login_rate = Some("10/m".parse().unwrap()),
        |_| {},
    );
    let o = TargetAddr::Ip(origin());
    // local-proxy checked its --user credentials at start: that is one argon2 check already.
    let before = p.state.argon2_checks();
    for _ in 0..10 {
        assert_eq!(
            tunnel_status(&p, "alice", "guess", o.clone()),
            Status::BadCredentials
        );
    }
    let hashed = p.state.argon2_checks();
    assert_eq!(
        hashed - before,
        10,
        "each wrong password costs one argon2 check"
    );
    for _ in 0..20 {
        let r = tunnel_reply(&p, "alice", "guess", o.clone());
        assert_eq!(r.status, Status::TooManyFailedLogins);
        assert!(r.retry_after >= 1);
    }
    // Even the right password waits: alice is locked out from this address for the window.
    assert_eq!(
        tunnel_status(&p, "alice", "pw", o.clone()),
        Status::TooManyFailedLogins
    );
    assert_eq!(
        p.state.argon2_checks(),
        hashed,
        "throttled logins must be refused before any hashing"
    );
    // Another user behind the same local-proxy is not locked out by alice's typos.
    assert_eq!(tunnel_status(&p, "bob", "pw2", o), Status::Ok);
    // An HTTP app as alice is told what happened and when to retry.
    let mut s = connect(p.local_addr());
    write!(
        s,
        "CONNECT {} HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6cHc=\r\n\r\n",
        origin()
    )
    .unwrap();
    let r = read_response_head(&mut s);
    assert_eq!(r.code, 429, "{}", r.head);
    assert!(r.head.contains("Retry-After: "), "{}", r.head);
    let mut body = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut body);
    assert!(
        body.contains("too many failed logins for this user; retry in"),
        "{body}"
    );
}

#[test]
fn concurrent_wrong_passwords_beyond_the_limit_do_no_hashing() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| r.failed_login_rate = Some("10/m".parse().unwrap()),
        |_| {},
    );
    let (remote, tls) = (p.remote_addr(), p.tls.clone());
    let before = p.state.argon2_checks();
    let start = std::sync::Arc::new(std::sync::Barrier::new(40));
    let hs: Vec<_> = (0..40)
        .map(|i| {
            let (tls, start) = (tls.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let pw = format!("guess{i}");
                tunnel_reply_at(remote, &tls, "alice", &pw, TargetAddr::Ip(origin())).status
            })
        })
        .collect();
    let statuses: Vec<Status> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    let hashed = p.state.argon2_checks() - before;
    assert!(
        hashed <= 10,
        "{hashed} argon2 checks for 40 concurrent guesses"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == Status::BadCredentials)
            .count() as u64,
        hashed
    );
    assert!(statuses
        .iter()
        .all(|s| matches!(s, Status::BadCredentials | Status::TooManyFailedLogins)));
}

#[test]
fn known_and_unknown_users_answer_alike_under_concurrency() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| r.failed_login_rate = None,
        |_| {},
    );
    let (remote, tls) = (p.remote_addr(), p.tls.clone());
    // 8 identical wrong attempts at once, for a name that exists and one that does not.
    let burst = |name: &'static str| {
        let start = std::sync::Arc::new(std::sync::Barrier::new(8));
        let t = Instant::now();
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let (tls, start) = (tls.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    tunnel_reply_at(remote, &tls, name, "wrong", TargetAddr::Ip(origin())).status
                })
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap(), Status::BadCredentials);
        }
        t.elapsed()
    };
    let mut known = vec![];
    let mut unknown = vec![];
    for _ in 0..3 {
        known.push(burst("alice"));
        unknown.push(burst("nobody"));
    }
    known.sort();
    unknown.sort();
    let (k, u) = (known[1].as_secs_f64(), unknown[1].as_secs_f64());
    assert!(
        u < 2.0 * k && k < 2.0 * u,
        "known {known:?} vs unknown {unknown:?}: timing tells names apart"
    );
}

#[test]
fn local_proxy_has_its_own_slots() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |_| {},
        |l| {
            l.admission.max_active = 1;
            l.admission.max_queued = 0;
        },
    );
    let hold = hold_target(Arc::new(AtomicUsize::new(0)));
    let _first = socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap();
    assert_eq!(
        socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap_err(),
        0x01
    );
    let mut s = connect(p.local_addr());
    write!(s, "CONNECT {hold} HTTP/1.1\r\n\r\n").unwrap();
    let r = read_response_head(&mut s);
    assert_eq!(r.code, 503, "{}", r.head);
    assert!(r.head.contains("Retry-After: "));
}

#[test]
fn an_address_at_its_handshake_cap_waits_unread_while_others_pass() {
    let stall = Duration::from_millis(1500);
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| {
            r.admission.max_handshakes_per_key = Some(2);
            r.timeouts.handshake = stall;
        },
        |_| {},
    );
    let o = TargetAddr::Ip(origin());
    let two = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let t = Instant::now();
    // Two handshakes from 127.0.0.2 that start (the first byte of a TLS record) and stall:
    // a silent socket would be parked, holding no place; these hold theirs until the
    // handshake timeout.
    let _stalled: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = connect_from(two, p.remote_addr());
            s.write_all(&[0x16]).unwrap();
            s
        })
        .collect();
    assert!(eventually(Duration::from_secs(1), || p.remote.active() == 2));
    // A third connection from 127.0.0.2 waits for one of those handshakes to end: without a
    // slot, so without a worker.
    let (tx, rx) = mpsc::channel();
    let (remote, tls) = (p.remote_addr(), p.tls.clone());
    std::thread::spawn(move || {
        let hop = RawHop::connect_from(two, remote, &tls);
        let _ = tx.send((tunnel_reply_on(hop, "alice", "pw", o).status, t.elapsed()));
    });
    // Another address is served at once meanwhile.
    let mine = Instant::now();
    assert_eq!(
        tunnel_status(&p, "alice", "pw", TargetAddr::Ip(origin())),
        Status::Ok
    );
    assert!(
        mine.elapsed() < Duration::from_secs(1),
        "{:?}",
        mine.elapsed()
    );
    assert!(
        rx.try_recv().is_err(),
        "127.0.0.2's third connection passed its cap"
    );
    // Once the finished tunnel's slot is back, the stalled two hold the only ones in use.
    assert!(
        eventually(Duration::from_millis(500), || p.remote.active() == 2),
        "the waiting connection holds a slot"
    );
    assert!(rx.try_recv().is_err());
    // The stalled two are closed at the handshake timeout; then the third goes on.
    let (status, at) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(status, Status::Ok);
    assert!(
        at >= stall - Duration::from_millis(100),
        "served after {at:?}"
    );
}

#[test]
fn a_burst_of_200_tunnels_from_one_address_is_all_served() {
    // Everyone behind one local-proxy shares its address: the handshake cap (default 32)
    // makes the burst take turns, it turns nobody away.
    let p = pair(&[user("alice", "pw", "unlimited")]);
    let threads: Vec<_> = (0..200)
        .map(|_| {
            let local = p.local_addr();
            std::thread::spawn(move || {
                let mut s = socks_connect(local, Dest::Ip(origin()), None)?;
                download_and_verify(&mut s, "o", 2000);
                Ok::<(), u16>(())
            })
        })
        .collect();
    let failed: Vec<u16> = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 200 refused, codes {failed:?}",
        failed.len()
    );
}

#[test]
fn the_per_address_tunnel_rate_is_applied_at_accept_without_a_slot() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| {
            r.rate_per_ip = Some("1/m".parse().unwrap());
            // One slot, no queue: a connection that needed a slot to be refused would be
            // told "busy" instead.
            limits(r, 1, 0, 1000);
        },
        // A warm connection's TLS handshake takes the one slot for a moment.
        |l| l.upstreams.warm = 0,
    );
    let o = TargetAddr::Ip(origin());
    let hold = hold_target(Arc::new(AtomicUsize::new(0)));
    let _held = socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap();
    assert_eq!(p.remote.active(), 1);
    // The tunnel above took the address's one a minute: the next is refused by the rate,
    // at once, though no slot is free to read its request on.
    let t = Instant::now();
    let r = tunnel_reply(&p, "alice", "pw", o.clone());
    assert_eq!(r.status, Status::RateLimited);
    assert!(r.retry_after > 0);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // Probes are still answered, from the same address, though it is over its rate.
    assert_eq!(health_probe(p.remote_addr(), &p.tls).unwrap(), Status::Ok);
}
