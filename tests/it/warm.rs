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
            r.admission.max_active = 2;
            r.admission.max_queued = 0;
        },
        |_| {},
    );
    let spares: Vec<RawHop> = (0..10).map(|_| warm(&p)).collect();
    assert!(eventually(Duration::from_secs(3), || p.remote.active() == 0));
    // Ten parked connections, two slots: the first two tunnels get them.
    let o = TargetAddr::Ip(origin());
    let held: Vec<RawHop> = spares.into_iter().take(2).collect();
    let mut tunnels = Vec::new();
    for mut s in held {
        let req = Request {
            tunnel_id: Some(tunnel::TunnelId(7)),
            command: tunnel::Command::Connect,
            user: "alice".into(),
            password: "pw".into(),
            target: Some(o.clone()),
            invite: None,
        };
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
        |_| {},
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
