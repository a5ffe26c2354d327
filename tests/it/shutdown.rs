//! Graceful shutdown of the real binaries: SIGTERM lets open tunnels finish.

use crate::support::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// A database with alice (password pw) at 1 MB/s, so a 3 MB download takes 3 s.
fn alice_at_1m() -> std::path::PathBuf {
    let db = temp_dir().join("u.db");
    remote_user_ok(&db, &words("user add alice --bandwidth 1M --password pw"));
    db
}

fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

fn remote_serve(db: &std::path::Path, grace: &str) -> (ChildGuard, std::net::SocketAddr) {
    let mut cmd = remote_bin();
    cmd.arg("--db")
        .arg(db)
        .args(["serve", "--listen", "127.0.0.1:0", "--grace", grace])
        .args(allow_loopback());
    spawn_listening(cmd)
}

fn local_over(
    db: &std::path::Path,
    remotes: &[std::net::SocketAddr],
    grace: &str,
) -> (ChildGuard, std::net::SocketAddr) {
    let mut cmd = local_bin();
    cmd.args(["--pin", &identity(db)]);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--user",
        "alice",
        "--grace",
        grace,
    ])
    .args(["--health-interval", "200ms"])
    .env("FLOWGATE_PASSWORD", "pw");
    for r in remotes {
        cmd.args(["--remote", &r.to_string()]);
    }
    spawn_listening(cmd)
}

/// Waits for the child to exit, for at most `within`; its exit code.
fn exit_code(child: &mut ChildGuard, within: Duration) -> Option<i32> {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if let Ok(Some(status)) = child.0.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Starts a 3 MB download at alice's 1 MB/s through `local`; the thread checks every byte.
fn slow_download(local: std::net::SocketAddr) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut s = socks_connect(local, Dest::Ip(origin()), None).unwrap();
        download_and_verify(&mut s, "o", 3_000_000);
    })
}

#[test]
fn sigterm_lets_a_remote_finish_its_tunnels_and_new_ones_go_elsewhere() {
    let db = alice_at_1m();
    let (mut r1, a1) = remote_serve(&db, "10s");
    let (mut r2, a2) = remote_serve(&db, "10s");
    let (_local, local) = local_over(&db, &[a1, a2], "10s");
    let download = slow_download(local);
    // alice is sticky: whichever remote logged her tunnel is the one to stop.
    let mut on = None;
    assert!(eventually(Duration::from_secs(5), || {
        on = [&r1, &r2]
            .iter()
            .position(|r| !r.log_lines("open user=alice").is_empty());
        on.is_some()
    }));
    let (busy, other) = if on == Some(0) {
        (&mut r1, &mut r2)
    } else {
        (&mut r2, &mut r1)
    };
    std::thread::sleep(Duration::from_millis(500));
    kill(Pid::from_raw(busy.0.id() as i32), Signal::SIGTERM).unwrap();
    // A tunnel opened meanwhile goes to the other remote, and works.
    std::thread::sleep(Duration::from_millis(300));
    let mut s = socks_connect(local, Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 1000);
    assert!(eventually(Duration::from_secs(2), || !other
        .log_lines("open user=alice")
        .is_empty()));
    // The download in flight completes intact (the thread checks every byte), and the
    // remote then exits 0 without waiting out its grace.
    download
        .join()
        .expect("the download in flight was cut or corrupted");
    assert_eq!(exit_code(busy, Duration::from_secs(5)), Some(0));
    assert!(!busy.log_lines("draining").is_empty());
}

#[test]
fn sigterm_lets_local_proxy_finish_its_tunnels() {
    let db = alice_at_1m();
    let (_r, a) = remote_serve(&db, "10s");
    let (mut local, laddr) = local_over(&db, &[a], "10s");
    let download = slow_download(laddr);
    std::thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    kill(Pid::from_raw(local.0.id() as i32), Signal::SIGTERM).unwrap();
    // New app connections are refused at once: the listener is closed.
    assert!(eventually(Duration::from_secs(2), || {
        std::net::TcpStream::connect(laddr).is_err()
    }));
    download
        .join()
        .expect("the download in flight was cut or corrupted");
    assert_eq!(exit_code(&mut local, Duration::from_secs(5)), Some(0));
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
}

#[test]
fn a_second_signal_stops_at_once() {
    let db = alice_at_1m();
    let (mut remote, a) = remote_serve(&db, "30s");
    let (_local, laddr) = local_over(&db, &[a], "30s");
    // A download that would take 3 s, held by a 30 s grace: the second signal cuts it.
    let download = std::thread::spawn(move || {
        let mut s = socks_connect(laddr, Dest::Ip(origin()), None).unwrap();
        let _ = std::io::Write::write_all(
            &mut s,
            b"GET /bytes/3000000 HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n",
        );
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut sink);
        sink.len()
    });
    assert!(eventually(Duration::from_secs(5), || !remote
        .log_lines("open user=alice")
        .is_empty()));
    let pid = Pid::from_raw(remote.0.id() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    assert!(eventually(Duration::from_secs(2), || !remote
        .log_lines("draining")
        .is_empty()));
    let t = Instant::now();
    kill(pid, Signal::SIGINT).unwrap();
    assert_eq!(exit_code(&mut remote, Duration::from_secs(2)), Some(0));
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(
        download.join().unwrap() < 3_000_000,
        "the download was not cut"
    );
}
