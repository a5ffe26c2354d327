//! Warm connections: local-proxy's spare connections to a remote, parked at remote-proxy
//! without a worker or a slot until an app connection takes one.

use crate::support::*;
use flowgate::proto::addr::TargetAddr;
use flowgate::proto::tunnel::{self, Request, Status};
use std::io::Read;
use std::time::Duration;

/// A connection to the pair's remote that has announced itself warm.
fn warm(p: &Pair) -> RawHop {
    let mut s = p.raw_remote();
    tunnel::write_request(&mut s, &Request::warm()).unwrap();
    s
}

fn parked_tunnels_hold_no_slot(mode: fn(&mut flowgate::config::RemoteConfig)) {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| {
            mode(r);
            // Two slots; a warm connection holds one only while it is read, so the ten
            // arriving at once take turns in the queue, then hold none.
            r.admission.max_active = 2;
        },
        // Only the test's own connections: a warm one's TLS handshake takes a slot.
        |l| l.upstreams.warm = 0,
    );
    let spares: Vec<RawHop> = (0..10).map(|_| warm(&p)).collect();
    warmed(&p, 10);
    assert_eq!(p.remote.active(), 0);
    // Ten parked connections, two slots: the first two tunnels get them.
    let o = TargetAddr::Ip(origin());
    let held: Vec<RawHop> = spares.into_iter().take(2).collect();
    let mut tunnels = Vec::new();
    for mut s in held {
        let req = connect_request("alice", "pw", o.clone());
        tunnel::write_request(&mut s, &req).unwrap();
        assert_eq!(tunnel::read_reply(&mut s).unwrap().status, Status::Ok);
        tunnels.push(s);
    }
    // Bytes go through a tunnel that waited parked.
    for s in &mut tunnels {
        std::io::Write::write_all(s, b"GET /o/3000 HTTP/1.1\r\nHost: o\r\n\r\n").unwrap();
        let mut head = vec![0u8; 1];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head, b"H");
    }
    assert_eq!(p.remote.active(), 2);
}
over_both_hops!(
    ten_parked_connections_hold_no_slot,
    parked_tunnels_hold_no_slot
);

#[test]
fn ten_warm_connections_do_not_block_the_first_two_tunnels() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| r.admission.max_active = 2,
        |l| l.upstreams.warm = 10,
    );
    warmed(&p, 10);
    assert_eq!(p.remote.active(), 0);
    let held: Vec<_> = (0..2)
        .map(|_| {
            let hold = hold_target(std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)));
            socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap()
        })
        .collect();
    assert_eq!(held.len(), 2);
    assert!(eventually(Duration::from_secs(2), || p.remote.active() == 2));
}

#[test]
fn a_parked_connection_is_closed_after_the_warm_idle_timeout() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| r.warm_idle_timeout = Duration::from_millis(700),
        |_| {},
    );
    let mut s = warm(&p);
    let t = std::time::Instant::now();
    assert_closed_quietly(&mut s, Duration::from_secs(3));
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn an_address_may_park_at_most_its_cap() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| r.admission.max_idle_per_key = Some(3),
        // Only this test's own warm connections count against the cap.
        |l| l.upstreams.warm = 0,
    );
    let mut spares: Vec<RawHop> = (0..5).map(|_| warm(&p)).collect();
    // Two are closed at once; three stay.
    let mut closed = 0;
    for s in &mut spares {
        s.1 = Duration::from_millis(300);
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(0)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 2);
}

/// Waits until local-proxy's warm connections are all parked at the remote.
fn warmed(p: &Pair, n: usize) {
    assert!(
        eventually(Duration::from_secs(5), || p.remote.parked() == n),
        "parked: {}",
        p.remote.parked()
    );
}

/// Runs `f` and asserts it went through a warm connection (the remote took up one that
/// was parked).
fn through_warm<T>(p: &Pair, f: impl FnOnce() -> T) -> T {
    warmed(p, 4);
    let before = p.remote.woken();
    let out = f();
    assert!(
        eventually(Duration::from_secs(3), || p.remote.woken() > before),
        "not through a warm connection"
    );
    out
}

fn set_limits(p: &Pair, user: &str, cap: Option<u32>, rate: Option<&str>) {
    use flowgate::users::{Changes, Store, UserStore};
    let ch = Changes {
        max_connections: Some(cap),
        rate: Some(rate.map(|r| r.parse().unwrap())),
        ..Changes::default()
    };
    Store::open(&p.db).unwrap().set(user, &ch).unwrap();
}

fn warm_tunnels_get_every_check_over(mode: fn(&mut flowgate::config::RemoteConfig)) {
    let p = pair_with(
        &[
            user("alice", "pw", "unlimited"),
            user("bob", "pw", "unlimited"),
        ],
        mode,
        |_| {},
    );
    // Bytes intact, both ways.
    through_warm(&p, || {
        let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
        download_and_verify(&mut s, "o", 200_000);
    });
    through_warm(&p, || {
        let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
        upload_and_verify(&mut s, "o", 200_000);
    });
    // A wrong password ("alice:bad") is refused as on a fresh connection.
    let code = through_warm(&p, || {
        let mut s = connect(p.local_addr());
        let req = format!(
            "CONNECT {} HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6YmFk\r\n\r\n",
            origin()
        );
        std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
        read_response_head(&mut s).code
    });
    assert_eq!(code, 407);
    // The per-user rate: bob's one tunnel a minute, then refused.
    set_limits(&p, "bob", None, Some("1/m"));
    std::thread::sleep(Duration::from_millis(500)); // the remote's user poll
    let bob = Some(("bob", "pw"));
    through_warm(&p, || {
        socks_connect(p.local_addr(), Dest::Ip(origin()), bob).unwrap()
    });
    let refused = through_warm(&p, || {
        socks_connect(p.local_addr(), Dest::Ip(origin()), bob)
    });
    assert_eq!(refused.unwrap_err(), 0x02);
    // The per-user cap: alice's second tunnel waits for her first to end.
    set_limits(&p, "alice", Some(1), None);
    std::thread::sleep(Duration::from_millis(500));
    let first = through_warm(&p, || {
        let hold = hold_target(std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)));
        socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap()
    });
    let local = p.local_addr();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(socks_connect(local, Dest::Ip(origin()), None).is_ok());
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(700)).is_err(),
        "cap not held"
    );
    drop(first);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
    // A user deleted while the connections were warm is refused on them.
    set_limits(&p, "alice", None, None);
    {
        use flowgate::users::{Store, UserStore};
        Store::open(&p.db).unwrap().delete("alice").unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let gone = through_warm(&p, || {
        socks_connect(p.local_addr(), Dest::Ip(origin()), None)
    });
    assert!(gone.is_err());
}
over_both_hops!(
    warm_tunnels_get_every_check,
    warm_tunnels_get_every_check_over
);

#[test]
fn an_expired_warm_connection_is_replaced_without_an_app_seeing_an_error() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        // Past local-proxy's early-death pause, so expired ones are replaced at once.
        |r| r.warm_idle_timeout = Duration::from_millis(2500),
        |_| {},
    );
    warmed(&p, 4);
    let t = std::time::Instant::now();
    // Tunnels one after another across the moment the first warm connections expire.
    let mut n = 0;
    while t.elapsed() < Duration::from_secs(4) {
        let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None)
            .unwrap_or_else(|e| panic!("tunnel {n} at {:?}: {e}", t.elapsed()));
        download_and_verify(&mut s, "o", 1000);
        n += 1;
        std::thread::sleep(Duration::from_millis(30));
    }
    // And once they have expired unused, fresh ones take their place.
    std::thread::sleep(Duration::from_secs(3));
    through_warm(&p, || {
        let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
        download_and_verify(&mut s, "o", 1000);
    });
}

#[test]
fn a_remote_restart_throws_its_warm_connections_away_without_failing_an_app() {
    let mut p = pair(&[user("alice", "pw", "unlimited")]);
    warmed(&p, 4);
    p.restart_remote();
    for i in 0..10 {
        let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None)
            .unwrap_or_else(|e| panic!("tunnel {i} after the restart: {e}"));
        download_and_verify(&mut s, "o", 1000);
    }
    // The new remote gets warm connections of its own.
    through_warm(&p, || {
        let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
        download_and_verify(&mut s, "o", 1000);
    });
}

#[test]
fn connections_slow_to_speak_past_the_idle_cap_are_still_served() {
    // A client starved of CPU may connect and write its request only later: past its
    // address's idle cap such a connection waits on a worker instead of being parked, and
    // is served, not closed.
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| {
            plaintext(r);
            r.admission.max_idle_per_key = Some(2);
        },
        |l| l.upstreams.warm = 0,
    );
    let two = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let mut slow: Vec<std::net::TcpStream> =
        (0..5).map(|_| connect_from(two, p.remote_addr())).collect();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(p.remote.parked(), 2);
    for s in &mut slow {
        let req = connect_request("alice", "pw", TargetAddr::Ip(origin()));
        tunnel::write_request(s, &req).unwrap();
    }
    for s in &mut slow {
        assert_eq!(tunnel::read_reply(s).unwrap().status, Status::Ok);
    }
}
