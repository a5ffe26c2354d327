//! remote-proxy's health probes: answered without credentials, slots or throttles.

use crate::support::*;
use flowgate::proto::tunnel::Status;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn a_remote_whose_slots_are_all_busy_still_answers_probes() {
    // One slot, held by a tunnel; the probe waits in the queue and the sweeper answers it.
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| {
            r.admission.max_active = 1;
            r.admission.max_queued = 8;
        },
        |_| {},
    );
    let hold = hold_target(Arc::new(AtomicUsize::new(0)));
    let _busy = socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap();
    let t = Instant::now();
    assert_eq!(health_probe(p.remote_addr(), &p.tls).unwrap(), Status::Ok);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    // A real tunnel in the same position is still held for the slot, not answered.
    // (Its TLS handshake waits for the slot: no ServerHello, nothing at all, comes back.)
    let mut queued = connect(p.remote_addr());
    queued
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    queued
        .write_all(&client_hello(&p.tls, p.remote_addr()))
        .unwrap();
    let mut byte = [0u8; 1];
    let e = queued.read(&mut byte).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{e}"
    );
}

#[test]
fn a_remote_with_a_full_queue_still_answers_probes() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| {
            r.admission.max_active = 1;
            r.admission.max_queued = 0;
        },
        // A warm connection's TLS handshake takes the one slot for a moment.
        |l| l.upstreams.warm = 0,
    );
    let hold = hold_target(Arc::new(AtomicUsize::new(0)));
    let _busy = socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap();
    assert_eq!(health_probe(p.remote_addr(), &p.tls).unwrap(), Status::Ok);
}

#[test]
fn probes_count_against_no_throttle() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| r.rate_per_ip = Some("1/m".parse().unwrap()),
        |_| {},
    );
    for _ in 0..5 {
        assert_eq!(health_probe(p.remote_addr(), &p.tls).unwrap(), Status::Ok);
    }
    // The address's one tunnel a minute is still there.
    let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 1000);
}

#[test]
fn a_probe_that_arrives_in_pieces_while_queued_is_still_answered() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| {
            r.admission.max_active = 1;
            r.admission.max_queued = 8;
        },
        |_| {},
    );
    let hold = hold_target(Arc::new(AtomicUsize::new(0)));
    let _busy = socks_connect(p.local_addr(), Dest::Ip(hold), None).unwrap();
    // Several sweeps see half a probe's ClientHello: not yet decided, so it is looked at
    // again, and answered once it is whole.
    let mut s = connect(p.remote_addr());
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let reply = probe_in_pieces(&p, &mut s, 6, Duration::from_millis(350));
    assert_eq!(reply.status, Status::Ok);
}
