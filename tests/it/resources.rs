//! What idle and finished tunnels cost the real binaries: threads and pipes.

use crate::support::*;
use std::io::{Read, Write};
use std::time::Duration;

/// Idle workers beyond the spares exit after this; short, so the test is quick.
const IDLE: &str = "1s";
/// Slack over the baseline once idle workers have gone: the spare workers and a thread
/// that may be between jobs.
const SLACK: usize = flowgate::net::workers::SPARE_WORKERS + 2;

#[test]
fn threads_return_to_the_baseline_after_300_idle_tunnels_close() {
    flowgate::net::sys::raise_fd_limit();
    let p = binary_pair(&["--worker-idle-timeout", IDLE]);
    let pids = [p.remote.0.id(), p.local.0.id()];
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let target = hold_target_counting(accepted, closed.clone());
    // One tunnel first, so both processes have made their first worker and helper threads.
    drop(socks_connect(p.local_addr, Dest::Ip(target), None).unwrap());
    std::thread::sleep(Duration::from_millis(1500));
    let before = pids.map(thread_count);
    let tunnels: Vec<_> = (0..300)
        .map(|_| socks_connect(p.local_addr, Dest::Ip(target), None).unwrap())
        .collect();
    // A tunnel holds a worker for its life (idle or not), in each proxy.
    for pid in pids {
        assert!(
            thread_count(pid) >= 300,
            "pid {pid}: {} threads with 300 tunnels open",
            thread_count(pid)
        );
    }
    drop(tunnels);
    // The apps' closes travel through both proxies to the target; once it has seen them,
    // the tunnels are ending. On a loaded machine that alone can take a while: it is not
    // what is measured.
    assert!(eventually(Duration::from_secs(20), || closed
        .load(std::sync::atomic::Ordering::SeqCst)
        == 301));
    // From there, within the idle timeout (plus half a second for the relays to return),
    // the workers are gone.
    for (pid, base) in pids.iter().zip(before) {
        assert!(
            eventually(Duration::from_millis(1500), || thread_count(*pid)
                <= base + SLACK),
            "pid {pid}: {} threads, baseline {base}: {:?}",
            thread_count(*pid),
            thread_names(*pid)
        );
    }
    // The pair still works after shrinking.
    let mut s = socks_connect(p.local_addr, Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 100_000);
}

#[test]
fn an_idle_tunnel_holds_no_pipe() {
    // Regression: idle tunnels kept their pipes. Every tunnel carries a request and its response, then idles,
    // as browsers hold keep-alive connections. A direction used to keep its pipe for the
    // rest of the tunnel: two pipes, four descriptors per idle tunnel in each proxy.
    flowgate::net::sys::raise_fd_limit();
    let p = binary_pair(&[]);
    let pids = [p.remote.0.id(), p.local.0.id()];
    let target = reply_target(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let n = 300;
    let mut tunnels = Vec::new();
    for _ in 0..n {
        let mut s = socks_connect(p.local_addr, Dest::Ip(target), None).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut got = [0u8; 40];
        s.read_exact(&mut got).unwrap();
        assert!(got.ends_with(b"ok"));
        tunnels.push(s);
    }
    // Spare pipes kept for the next tunnels are fine; pipes per idle tunnel are not.
    for pid in pids {
        let pipes = pipe_count(pid);
        assert!(
            pipes <= flowgate::net::relay::MAX_SPARE_PIPE_FDS,
            "pid {pid}: {pipes} pipe descriptors with {n} idle tunnels"
        );
    }
    drop(tunnels);
}
