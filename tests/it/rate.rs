//! The user's total rate, across connections and directions, holds the configured rate.
//! Windows start after a warm-up of one second so the initial burst (100 ms of rate) and
//! socket buffers filling do not count; tolerance is the ±5% the issue asks for.

use crate::support::*;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WARM_UP: Duration = Duration::from_millis(1000);
const WINDOW: Duration = Duration::from_millis(2500);

/// Counts bytes arriving on `streams`, in total and per stream, until dropped.
struct Readers {
    counter: Arc<AtomicU64>,
    each: Vec<Arc<AtomicU64>>,
    stop: Arc<AtomicBool>,
    streams: Vec<TcpStream>,
}

impl Readers {
    fn start(streams: Vec<TcpStream>) -> Readers {
        let counter = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut each = Vec::new();
        for s in &streams {
            let mut s = s.try_clone().unwrap();
            let mine = Arc::new(AtomicU64::new(0));
            each.push(mine.clone());
            let (counter, stop) = (counter.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            counter.fetch_add(n as u64, Ordering::Relaxed);
                            mine.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    };
                }
            });
        }
        Readers {
            counter,
            each,
            stop,
            streams,
        }
    }

    fn snapshot(&self) -> Vec<u64> {
        self.each
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

/// Jain's fairness index of `xs`: 1.0 when all are equal, 1/n when one takes everything.
fn jain(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (xs.len() as f64 * squares)
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in &self.streams {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Bytes per second `counter` grows by over `window`, starting after `warm_up`.
fn measure(counter: &AtomicU64, warm_up: Duration, window: Duration) -> f64 {
    std::thread::sleep(warm_up);
    let (c0, t0) = (counter.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(window);
    let (c1, t1) = (counter.load(Ordering::Relaxed), Instant::now());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

fn assert_within_5pct(got: f64, want: f64, what: &str) {
    let err = (got - want) / want;
    assert!(
        err.abs() <= 0.05,
        "{what}: measured {got:.0} B/s, configured {want:.0} B/s ({:+.1}%)",
        err * 100.0
    );
}

fn downloads(
    proxy: SocketAddr,
    creds: (&str, &str),
    target: SocketAddr,
    n: usize,
) -> Vec<TcpStream> {
    (0..n)
        .map(|_| socks_connect(proxy, Dest::Ip(target), Some(creds)).unwrap())
        .collect()
}

#[test]
fn one_connection_holds_the_configured_rate() {
    let p = pair(&[user("alice", "pw", "1M")]);
    let r = Readers::start(downloads(
        p.local_addr(),
        ("alice", "pw"),
        source_target(),
        1,
    ));
    let got = measure(&r.counter, WARM_UP, WINDOW);
    assert_within_5pct(got, 1_000_000.0, "1 connection");
}

over_both_hops!(
    four_connections_share_one_budget,
    four_connections_share_one_budget_over
);

fn four_connections_share_one_budget_over(hop: HopMode) {
    let p = pair_with(&[user("alice", "pw", "2M")], hop, |_| {});
    let r = Readers::start(downloads(
        p.local_addr(),
        ("alice", "pw"),
        source_target(),
        4,
    ));
    std::thread::sleep(WARM_UP);
    let before = r.snapshot();
    let got = measure(&r.counter, Duration::ZERO, WINDOW);
    let shares: Vec<f64> = r
        .snapshot()
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b) as f64)
        .collect();
    assert_within_5pct(got, 2_000_000.0, "4 connections together");
    // And no connection is starved to make up the sum.
    let fairness = jain(&shares);
    assert!(fairness >= 0.9, "Jain {fairness:.3} over {shares:?}");
}

#[test]
fn two_users_each_keep_their_own_rate() {
    let p = pair(&[user("alice", "pw", "1M"), user("bob", "pw2", "400K")]);
    let src = source_target();
    let a = Readers::start(downloads(p.local_addr(), ("alice", "pw"), src, 2));
    let b = Readers::start(downloads(p.local_addr(), ("bob", "pw2"), src, 2));
    std::thread::sleep(WARM_UP);
    let (a0, b0, t0) = (
        a.counter.load(Ordering::Relaxed),
        b.counter.load(Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(WINDOW);
    let secs = t0.elapsed().as_secs_f64();
    let ra = (a.counter.load(Ordering::Relaxed) - a0) as f64 / secs;
    let rb = (b.counter.load(Ordering::Relaxed) - b0) as f64 / secs;
    assert_within_5pct(ra, 1_000_000.0, "alice");
    assert_within_5pct(rb, 400_000.0, "bob");
}

over_both_hops!(
    upload_and_download_share_one_budget,
    upload_and_download_share_one_budget_over
);

fn upload_and_download_share_one_budget_over(hop: HopMode) {
    let p = pair_with(&[user("alice", "pw", "1M")], hop, |_| {});
    let sunk = Arc::new(AtomicU64::new(0));
    let sink = sink_target(sunk.clone());
    let down = Readers::start(downloads(
        p.local_addr(),
        ("alice", "pw"),
        source_target(),
        1,
    ));
    let up = socks_connect(p.local_addr(), Dest::Ip(sink), Some(("alice", "pw"))).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut up2 = up.try_clone().unwrap();
        std::thread::spawn(move || {
            let buf = vec![1u8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) && up2.write_all(&buf).is_ok() {}
        })
    };
    std::thread::sleep(WARM_UP);
    let (d0, u0, t0) = (
        down.counter.load(Ordering::Relaxed),
        sunk.load(Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(WINDOW);
    let secs = t0.elapsed().as_secs_f64();
    let d = (down.counter.load(Ordering::Relaxed) - d0) as f64 / secs;
    let u = (sunk.load(Ordering::Relaxed) - u0) as f64 / secs;
    stop.store(true, Ordering::Relaxed);
    let _ = up.shutdown(Shutdown::Both);
    let _ = writer.join();
    assert!(
        d > 100_000.0 && u > 100_000.0,
        "both directions move: down {d:.0} up {u:.0}"
    );
    assert_within_5pct(d + u, 1_000_000.0, "upload + download");
}

#[test]
fn live_user_set_changes_the_rate_within_two_seconds() {
    let p = pair(&[user("alice", "pw", "1M")]);
    let r = Readers::start(downloads(
        p.local_addr(),
        ("alice", "pw"),
        source_target(),
        2,
    ));
    let before = measure(
        &r.counter,
        Duration::from_millis(700),
        Duration::from_millis(1300),
    );
    assert_within_5pct(before, 1_000_000.0, "before user set");
    remote_user_ok(&p.db, &["user", "set", "alice", "--bandwidth", "300K"]);
    // Within 2 s of the change the new rate is in force: measure from there on.
    let after = measure(&r.counter, Duration::from_secs(2), Duration::from_secs(2));
    assert_within_5pct(after, 300_000.0, "after user set");
}
