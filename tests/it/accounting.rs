//! Per-user byte accounting and volume quotas, through the real binaries: what is recorded
//! matches what moved, survives restarts and a kill -9 (minus one flush interval), and a
//! quota cuts a running tunnel at its last byte and refuses the next one in both protocols.

use crate::support::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What one relay read may take at most: the bound on what a count may be off by.
const ONE_BUFFER: u64 = 256 * 1024;

/// remote-proxy flags: loopback targets and a short flush interval.
fn remote_flags(flush: &str) -> Vec<String> {
    let mut f = allow_loopback();
    f.extend(["--flush-interval".to_string(), flush.to_string()]);
    f
}

/// (up, down) recorded for `user` in all periods, from `usage --json --bytes`.
fn recorded(db: &std::path::Path, user: &str) -> (u64, u64) {
    let out = remote_user_ok(
        db,
        &["usage", "--user", user, "--since", "1970-01-01", "--json"],
    );
    let rows: serde_json::Value = serde_json::from_str(out.trim()).expect("usage --json parses");
    let mut sum = (0, 0);
    for r in rows.as_array().expect("an array") {
        assert_eq!(r["user"], user);
        sum.0 += r["up_bytes"].as_u64().expect("up_bytes");
        sum.1 += r["down_bytes"].as_u64().expect("down_bytes");
    }
    sum
}

fn tunnel(local: SocketAddr) -> std::net::TcpStream {
    let s = socks_connect(local, Dest::Ip(origin()), None).expect("tunnel");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// `user set alice CHANGE`, seen by the running server, then a tunnel asking for `n` bytes.
fn get_after_change(p: &BinaryPair, change: &[&str], n: u64) -> std::net::TcpStream {
    let mut args = vec!["user", "set", "alice"];
    args.extend(change);
    remote_user_ok(&p.db, &args);
    std::thread::sleep(Duration::from_millis(1500));
    let mut s = tunnel(p.local_addr);
    write!(
        s,
        "GET /bytes/{n} HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s
}

fn within(a: u64, b: u64, slack: u64) -> bool {
    a.abs_diff(b) <= slack
}

#[test]
fn bytes_recorded_for_a_download_and_an_upload_match_what_moved() {
    let p = binary_pair_with_policy(&remote_flags("500ms"), &[]);
    let mut s = tunnel(p.local_addr);
    download_and_verify(&mut s, "origin", 10_000_000);
    drop(s);
    let mut s = tunnel(p.local_addr);
    upload_and_verify(&mut s, "origin", 5_000_000);
    drop(s);
    // Both tunnels are closed: a flush follows each close.
    let ok = eventually(Duration::from_secs(5), || {
        let (up, down) = recorded(&p.db, "alice");
        within(up, 5_000_000, ONE_BUFFER) && within(down, 10_000_000, ONE_BUFFER)
    });
    assert!(ok, "recorded {:?}", recorded(&p.db, "alice"));
    // The table for people, and the list, say the same in their units.
    let table = remote_user_ok(&p.db, &["usage", "--by", "month", "--bytes"]);
    assert!(table.contains("alice"), "{table}");
    let list = remote_user_ok(&p.db, &["user", "list"]);
    let line = list.lines().find(|l| l.starts_with("alice")).unwrap();
    assert!(line.contains("15 MB"), "{list}");
    let json = remote_user_ok(&p.db, &["usage", "--json", "--by", "month"]);
    let rows: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let period = rows[0]["period"].as_str().unwrap();
    assert_eq!(period.len(), "2026-12".len(), "{json}");
}

#[test]
fn counters_survive_sigterm_and_restart() {
    let db = temp_dir().join("u.db");
    cli_user_add(&db, "alice", "pw", "unlimited");
    let serve = |db: &std::path::Path| {
        let mut cmd = remote_bin();
        cmd.arg("--db")
            .arg(db)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(remote_flags("1h")); // only closes and the stop flush write
        spawn_listening(cmd)
    };
    let local = |db: &std::path::Path, r: SocketAddr| {
        let mut cmd = local_bin();
        cmd.args(["--listen", "127.0.0.1:0", "--remote", &r.to_string()])
            .args(["--user", "alice", "--pin", &identity(db)])
            .env("FLOWGATE_PASSWORD", "pw");
        spawn_listening(cmd)
    };
    for round in 1..=2u64 {
        let (mut remote, raddr) = serve(&db);
        let (_local, laddr) = local(&db, raddr);
        let mut s = tunnel(laddr);
        download_and_verify(&mut s, "origin", 3_000_000);
        drop(s);
        kill(Pid::from_raw(remote.0.id() as i32), Signal::SIGTERM).unwrap();
        let status = remote.0.wait().unwrap();
        assert!(status.success(), "{status}");
        let (_, down) = recorded(&db, "alice");
        assert!(
            within(down, round * 3_000_000, ONE_BUFFER),
            "round {round}: {down}"
        );
    }
}

#[test]
fn a_kill_9_loses_at_most_the_last_flush_interval() {
    // 1 MB/s for 10 MB: the tunnel is still running when the process dies.
    let p = binary_pair_with_policy(&remote_flags("1s"), &[]);
    remote_user_ok(&p.db, &["user", "set", "alice", "--bandwidth", "1M"]);
    std::thread::sleep(Duration::from_millis(1500)); // the server sees the new bandwidth
    let mut s = tunnel(p.local_addr);
    write!(
        s,
        "GET /bytes/10000000 HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(3500) {
        got += read_some(&mut s, &mut buf);
    }
    // A running tunnel's bytes show up while it runs, not only when it closes.
    let (_, mid) = recorded(&p.db, "alice");
    assert!(mid >= 1_500_000, "recorded only {mid} after {got} moved");
    let mut remote = p.remote;
    kill(Pid::from_raw(remote.0.id() as i32), Signal::SIGKILL).unwrap();
    let _ = remote.0.wait();
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    while let Ok(n @ 1..) = s.read(&mut buf) {
        got += n as u64;
    }
    let (_, down) = recorded(&p.db, "alice");
    // At most one interval of traffic (1 MB) and what was in flight is missing; nothing
    // is counted that did not move.
    assert!(down <= got + ONE_BUFFER, "recorded {down} > moved {got}");
    assert!(
        got - down.min(got) <= 1_000_000 + 2 * ONE_BUFFER,
        "recorded {down} of {got}"
    );
}

/// Sends CONNECT through local-proxy; the status code and the body.
fn http_connect_status(local: SocketAddr) -> (u16, String) {
    let mut s = connect(local);
    let o = origin();
    write!(s, "CONNECT {o} HTTP/1.1\r\nHost: {o}\r\n\r\n").unwrap();
    let r = read_response_head(&mut s);
    let mut body = vec![0u8; r.content_length.unwrap_or(0) as usize];
    s.read_exact(&mut body).unwrap();
    (r.code, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn a_quota_cuts_a_running_download_and_refuses_the_next_tunnel_until_raised() {
    let p = binary_pair_with_policy(&remote_flags("500ms"), &[]);
    remote_user_ok(&p.db, &["user", "set", "alice", "--quota", "1MB/day"]);
    std::thread::sleep(Duration::from_millis(1500));
    // An idle tunnel of the same user, open while the quota runs out.
    let mut idle = tunnel(p.local_addr);
    let mut s = tunnel(p.local_addr);
    write!(
        s,
        "GET /bytes/5000000 HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n as u64,
        }
    }
    let ended = Instant::now();
    // Up (the request) and down together reach the quota exactly: never past it.
    assert!(got <= 1_000_000, "got {got}");
    assert!(got >= 990_000, "cut early at {got}");
    // The idle tunnel is closed too, within a second.
    idle.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let r = idle.read(&mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(
        ended.elapsed() < Duration::from_secs(1),
        "{:?}",
        ended.elapsed()
    );
    // The next tunnel gets the quota answer in both protocols.
    assert_eq!(
        socks_connect(p.local_addr, Dest::Ip(origin()), None).err(),
        Some(0x02)
    );
    let (code, body) = http_connect_status(p.local_addr);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("quota is used up"), "{body}");
    assert!(
        body.contains("resets at") && body.contains("00:00:00 UTC"),
        "{body}"
    );
    assert!(!p.remote.log_lines("quota exceeded").is_empty());
    // A larger quota lets the user in again without a restart.
    remote_user_ok(&p.db, &["user", "set", "alice", "--quota", "10MB/day"]);
    let back = eventually(Duration::from_secs(3), || {
        socks_connect(p.local_addr, Dest::Ip(origin()), None).is_ok()
    });
    assert!(back, "still refused after the quota was raised");
    let mut s = tunnel(p.local_addr);
    download_and_verify(&mut s, "origin", 100_000);
}

#[test]
fn usage_reset_lets_a_user_in_again_at_once() {
    let p = binary_pair_with_policy(&remote_flags("500ms"), &[]);
    let mut s = get_after_change(&p, &["--quota", "200KB/day"], 1_000_000);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    assert!(sink.len() <= 200_000, "{}", sink.len());
    assert!(eventually(Duration::from_secs(3), || socks_connect(
        p.local_addr,
        Dest::Ip(origin()),
        None
    )
    .is_err()));
    let out = remote_user_ok(&p.db, &["usage", "reset", "alice"]);
    assert!(out.contains("reset the quota of alice"), "{out}");
    let back = eventually(Duration::from_secs(3), || {
        socks_connect(p.local_addr, Dest::Ip(origin()), None).is_ok()
    });
    assert!(back, "still refused after usage reset");
    // What was moved is still on record: the reset forgives, it does not erase.
    let (up, down) = recorded(&p.db, "alice");
    assert!(up + down >= 190_000, "{up} {down}");
}

#[test]
fn user_del_ends_a_running_download_and_the_name_can_be_added_again() {
    let p = binary_pair_with_policy(&remote_flags("500ms"), &[]);
    let mut s = get_after_change(&p, &["--bandwidth", "500KB/s"], 20_000_000);
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < 300_000 {
        got += s.read(&mut buf).unwrap() as u64;
    }
    remote_user_ok(&p.db, &["user", "del", "alice"]);
    let deleted = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n as u64,
        }
    }
    // The watcher looks every 500 ms; the relay stops at its next read after that.
    assert!(
        deleted.elapsed() < Duration::from_secs(2),
        "{:?}",
        deleted.elapsed()
    );
    assert!(got < 5_000_000, "got {got}");
    assert!(eventually(Duration::from_secs(2), || !p
        .remote
        .log_lines("user deleted")
        .is_empty()));
    assert!(socks_connect(p.local_addr, Dest::Ip(origin()), None).is_err());
    // The same name added again gets in, though its old account may still be there.
    cli_user_add(&p.db, "alice", "pw", "unlimited");
    let back = eventually(Duration::from_secs(3), || {
        socks_connect(p.local_addr, Dest::Ip(origin()), None).is_ok()
    });
    assert!(back, "alice, added again, is still refused");
    let mut s = tunnel(p.local_addr);
    download_and_verify(&mut s, "origin", 100_000);
}
