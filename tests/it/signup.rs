//! Sign-up limits: per-IP rate, a cap on users, invites, and memory that a signup burst
//! cannot blow.

use crate::support::*;
use std::process::Stdio;
use std::time::Duration;

/// A pair whose remote-proxy also gets `flags` (with the loopback ranges the tests open).
fn pair_with_remote_flags(flags: &[&str]) -> BinaryPair {
    let mut remote = allow_loopback();
    remote.extend(flags.iter().map(|f| f.to_string()));
    binary_pair_with_policy(&remote, &[])
}

/// `local-proxy signup` of `user` at the pair's remote; (succeeded, what it printed).
fn signup(remote: std::net::SocketAddr, pin: &str, user: &str) -> (bool, String) {
    signup_invited(remote, pin, user, None)
}

/// As [`signup`], with `--invite TOKEN` when there is a token.
fn signup_invited(
    remote: std::net::SocketAddr,
    pin: &str,
    user: &str,
    invite: Option<&str>,
) -> (bool, String) {
    let out = local_bin()
        .args(["signup", "--remote", &remote.to_string(), "--user", user])
        .args(["--pin", pin])
        .args(invite.map(|t| ["--invite", t]).into_iter().flatten())
        .env("FLOWGATE_PASSWORD", "a-new-password")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn signups_are_throttled_per_ip_by_default() {
    let p = pair_with_remote_flags(&["--allow-signup"]);
    let pin = identity(&p.db);
    for i in 0..5 {
        let (ok, out) = signup(p.remote_addr, &pin, &format!("new{i}"));
        assert!(ok, "{out}");
    }
    let (ok, out) = signup(p.remote_addr, &pin, "new5");
    assert!(!ok && out.contains("rate limited"), "{out}");
    assert!(!remote_user_ok(&p.db, &["user", "list"]).contains("new5"));
}

#[test]
fn max_users_caps_signups() {
    // alice is already there: one more fits under --max-users 2.
    let p = pair_with_remote_flags(&["--allow-signup", "--max-users", "2"]);
    let pin = identity(&p.db);
    let (ok, out) = signup(p.remote_addr, &pin, "carol");
    assert!(ok, "{out}");
    let (ok, out) = signup(p.remote_addr, &pin, "dave");
    assert!(!ok && out.contains("not allowed"), "{out}");
    assert!(eventually(Duration::from_secs(3), || !p
        .remote
        .log_lines("--max-users 2 reached")
        .is_empty()));
}

#[test]
fn signups_can_require_an_invite_whose_uses_and_revocation_hold() {
    let p = pair_with_remote_flags(&[
        "--allow-signup",
        "--signup-requires-invite",
        "--signup-rate",
        "20/h",
    ]);
    let pin = identity(&p.db);
    let made = remote_bin()
        .arg("--db")
        .arg(&p.db)
        .args(["invite", "create", "--uses", "2", "--expires", "1h"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let token = String::from_utf8(made.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("fgi-"), "{token}");
    // Without a token, or with a wrong one: refused, and told what to do.
    let (ok, out) = signup_invited(p.remote_addr, &pin, "nia", None);
    assert!(!ok && out.contains("--invite TOKEN"), "{out}");
    let (ok, out) = signup_invited(p.remote_addr, &pin, "nia", Some("fgi-0000"));
    assert!(!ok && out.contains("unknown, used up or expired"), "{out}");
    // Two uses: two signups, and the third is refused.
    for name in ["ivy", "ian"] {
        let (ok, out) = signup_invited(p.remote_addr, &pin, name, Some(&token));
        assert!(ok, "{out}");
    }
    let (ok, out) = signup_invited(p.remote_addr, &pin, "ira", Some(&token));
    assert!(!ok && out.contains("does not accept that invite"), "{out}");
    let users = remote_user_ok(&p.db, &["user", "list"]);
    assert!(users.contains("ivy") && users.contains("ian") && !users.contains("ira"));
    assert!(!users.contains("nia"));
    // The operator sees why, by the invite's id, and never the token.
    assert!(eventually(Duration::from_secs(3), || !p
        .remote
        .log_lines("signup refused: invite used up")
        .is_empty()));
    assert!(p.remote.log_lines(&token).is_empty());
    // `invite list` shows it spent; a revoked invite lets nobody in.
    let list = remote_user_ok(&p.db, &["invite", "list"]);
    let row = list.lines().nth(1).unwrap_or_default().to_string();
    assert!(row.split_whitespace().nth(1) == Some("0"), "{list}");
    let made = remote_bin()
        .arg("--db")
        .arg(&p.db)
        .args(["invite", "create"])
        .output()
        .unwrap();
    let fresh = String::from_utf8(made.stdout).unwrap().trim().to_string();
    // "invite ID allows 1 signup, ...", on stderr.
    let said = String::from_utf8(made.stderr).unwrap();
    let id = said.split_whitespace().nth(1).unwrap().to_string();
    assert!(remote_user_ok(&p.db, &["invite", "list"]).contains(&id));
    remote_user_ok(&p.db, &["invite", "revoke", &id]);
    let (ok, out) = signup_invited(p.remote_addr, &pin, "ivo", Some(&fresh));
    assert!(!ok && out.contains("does not accept that invite"), "{out}");
}

#[test]
fn sixteen_concurrent_signups_stay_under_150_mib() {
    let p = pair_with_remote_flags(&["--allow-signup", "--signup-rate", "off"]);
    let pin = identity(&p.db);
    let hs: Vec<_> = (0..16)
        .map(|i| {
            let (remote, pin) = (p.remote_addr, pin.clone());
            std::thread::spawn(move || signup(remote, &pin, &format!("burst{i}")))
        })
        .collect();
    for h in hs {
        let (ok, out) = h.join().unwrap();
        assert!(ok, "{out}");
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.remote.0.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(peak_kib < 150 * 1024, "peak resident {peak_kib} KiB");
}

#[test]
fn a_signup_waiting_on_a_locked_database_does_not_stall_logins() {
    let p = pair_with(
        &[user("alice", "pw", "unlimited")],
        |r| r.allow_signup = true,
        |_| {},
    );
    // alice's password is in the verification cache after one tunnel.
    let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 100);
    // Another process holds the write lock (as a long `user set` would).
    let lock = rusqlite::Connection::open(&p.db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (remote, tls) = (p.remote_addr(), p.tls.clone());
    let waiting = std::thread::spawn(move || {
        let out = local_bin()
            .args(["signup", "--remote", &remote.to_string(), "--user", "carol"])
            .args(hop_args(&tls))
            .env("FLOWGATE_PASSWORD", "a-new-password")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        out.status.success()
    });
    std::thread::sleep(Duration::from_millis(500));
    let t = std::time::Instant::now();
    let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 100);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a cached login took {:?} behind the signup",
        t.elapsed()
    );
    lock.execute_batch("ROLLBACK").unwrap();
    assert!(
        waiting.join().unwrap(),
        "the signup went through once the lock was gone"
    );
}
