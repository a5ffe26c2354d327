//! The real binaries: user management errors, signup, and the first log line.

use crate::support::*;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn user_management_round_trip() {
    let db = temp_dir().join("u.db");
    let out = remote_user_ok(
        &db,
        &words("user add alice --bandwidth 2MiB/s --password pw"),
    );
    assert!(out.contains("alice"));
    let mut child = remote_bin()
        .arg("--db")
        .arg(&db)
        .args(words("user add bob --bandwidth 500K --password-stdin"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"bobpw\n").unwrap();
    assert!(child.wait().unwrap().success());
    let (ok, out, _) = remote_user(&db, &["user", "list"]);
    assert!(ok);
    assert!(out.starts_with("NAME "), "{out}");
    let head = out.lines().next().unwrap();
    for col in ["QUOTA", "TODAY", "MONTH", "LAST SEEN (UTC)", "OPEN"] {
        assert!(head.contains(col), "{out}");
    }
    assert!(out.lines().nth(1).unwrap().contains("never"), "{out}");
    // Created today, as a date, not an epoch number.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let year = format!(" {}-", &flowgate::cli::utc_timestamp(now)[..4]);
    let show = remote_user_ok(&db, &["user", "show", "alice"]);
    let created = show.lines().find(|l| l.starts_with("created")).unwrap();
    assert!(created.contains(&year), "{show}");
    assert!(show.contains("quota            none"), "{show}");
    let (ok, _, err) = remote_user(&db, &["user", "show", "nobody"]);
    assert!(!ok && err.contains("no such user"), "{err}");
    assert!(out.contains("alice") && out.contains("2MiB/s"), "{out}");
    assert!(out.contains("bob") && out.contains("500K/s"), "{out}");
    let set = remote_user_ok(&db, &words("user set bob --bandwidth unlimited --rate 5/m"));
    assert_eq!(
        set.trim(),
        "updated user bob: bandwidth unlimited, rate 5/m"
    );
    assert!(remote_user(&db, &["user", "list"]).1.contains("unlimited"));
    assert!(remote_user(&db, &["user", "del", "bob"]).0);
    assert!(!remote_user(&db, &["user", "list"]).1.contains("bob"));
    // The stored hash is argon2id, and no password is in the file.
    let raw = std::fs::read(&db).unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains("bobpw"));
}

#[test]
fn bad_user_commands_fail_with_one_line_and_leave_the_db_alone() {
    let db = temp_dir().join("u.db");
    remote_user_ok(&db, &words("user add alice --bandwidth 1M --password pw"));
    let before = remote_user_ok(&db, &["user", "list"]);
    // Exit 2: the command line itself is wrong (clap rejects a value). Exit 1: the command
    // is well formed but cannot be done.
    for (cmd, code) in [
        ("user add bob --bandwidth fast --password x", 2),
        ("user add alice --bandwidth 1M --password x", 1),
        ("user set nobody --bandwidth 1M", 1),
        ("user del nobody", 1),
        ("user add bad!name --bandwidth 1M --password x", 1),
        ("user set alice --bandwidth 0", 2),
        ("user set alice --rate 3/month", 2),
        ("user set alice", 1),
    ] {
        let out = remote_bin()
            .arg("--db")
            .arg(&db)
            .args(words(cmd))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.trim().lines().count(), 1, "{cmd}: {err}");
        assert!(!err.contains("panicked"), "{cmd}: {err}");
        assert_eq!(
            remote_user_ok(&db, &["user", "list"]),
            before,
            "{cmd} changed the db"
        );
    }
    let (_, _, err) = remote_user(&db, &["user", "del", "nobody"]);
    assert!(err.starts_with("remote-proxy: "), "{err}");
}

fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

fn signup(p: &Pair, user: &str) -> (bool, String) {
    let out = local_bin()
        .args([
            "signup",
            "--remote",
            &p.remote_addr().to_string(),
            "--user",
            user,
        ])
        .args(hop_args(&p.tls))
        .env("FLOWGATE_PASSWORD", "newpw")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn signup_is_refused_unless_enabled() {
    let p = pair(&[user("alice", "pw", "1M")]);
    let (ok, text) = signup(&p, "carol");
    assert!(!ok);
    assert!(text.contains("does not allow signup"), "{text}");
}

#[test]
fn signup_creates_a_user_who_can_tunnel() {
    let p = pair_with(
        &[user("alice", "pw", "1M")],
        |r| {
            r.allow_signup = true;
            r.signup_bandwidth = "250K".parse().unwrap();
        },
        |_| {},
    );
    let (ok, text) = signup(&p, "carol");
    assert!(ok, "{text}");
    let (ok, text) = signup(&p, "carol");
    assert!(!ok && text.contains("already exists"), "{text}");
    let mut s =
        socks_connect(p.local_addr(), Dest::Ip(origin()), Some(("carol", "newpw"))).unwrap();
    download_and_verify(&mut s, "o", 10_000);
    assert!(remote_user_ok(&p.db, &["user", "list"]).contains("250K/s"));
}

#[test]
fn a_configured_password_too_long_for_the_tunnel_is_a_startup_error() {
    let out = local_bin()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--remote",
            "127.0.0.1:9",
            "--user",
            "u",
        ])
        .env("FLOWGATE_PASSWORD", "p".repeat(256))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at most 255 bytes"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn help_shows_every_default_as_it_would_be_typed() {
    let out = remote_bin().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "[default: 127.0.0.1:7080]",
        "[default: 1M/s]",
        "[default: 10/m]",
        "[default: 10s]",
        "[default: 10m]",
        "[default: 30s]",
        "[default: 4096]",
    ] {
        assert!(help.contains(want), "{want} missing from:\n{help}");
    }
}

#[test]
fn out_of_range_durations_are_a_clear_cli_error() {
    // Regression: this used to panic at the first connection.
    for (bin, args) in [
        (
            remote_bin(),
            vec!["serve", "--handshake-timeout", "1000000000h"],
        ),
        (
            local_bin(),
            vec![
                "--remote",
                "127.0.0.1:9",
                "--queue-timeout",
                "99999999999999999999ms",
            ],
        ),
    ] {
        let mut bin = bin;
        let out = bin.args(&args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("too long"), "{err}");
    }
}

#[test]
fn a_taken_listen_address_is_named_in_the_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let db = temp_dir().join("u.db");
    for mut cmd in [
        {
            let mut c = local_bin();
            c.args(["--listen", &addr, "--remote", "127.0.0.1:9", "--user", "u"])
                .env("FLOWGATE_PASSWORD", "pw");
            c
        },
        {
            let mut c = remote_bin();
            c.arg("--db").arg(&db).args(["serve", "--listen", &addr]);
            c
        },
    ] {
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    }
}

/// The first line a binary writes to stderr, read with a deadline.
fn first_stderr_line(mut cmd: std::process::Command) -> (ChildGuard, String) {
    use std::io::BufRead;
    cmd.stderr(Stdio::piped())
        .stdout(Stdio::null())
        .stdin(Stdio::null())
        .env("RUST_LOG", "info");
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stderr).read_line(&mut line);
        let _ = tx.send(line);
    });
    let guard = ChildGuard(child, Default::default());
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("no first line");
    (guard, line)
}

#[test]
fn the_first_log_line_names_the_bound_address() {
    // Scripts start the binaries on port 0 and read the address from this line.
    let db = temp_dir().join("u.db");
    let mut remote = remote_bin();
    remote
        .arg("--db")
        .arg(&db)
        .args(["serve", "--listen", "127.0.0.1:0"]);
    let (_r, line) = first_stderr_line(remote);
    let addr = line
        .split("remote-proxy listening on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("first line: {line}"));
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    assert_ne!(addr.port(), 0);
    // It is the real address: something accepts there.
    drop(connect(addr));
    let mut local = local_bin();
    local
        .args([
            "--listen",
            "127.0.0.1:0",
            "--remote",
            &addr.to_string(),
            "--user",
            "u",
        ])
        .args(["--pin", &identity(&db)])
        .env("FLOWGATE_PASSWORD", "pw");
    let (_l, line) = first_stderr_line(local);
    assert!(
        line.contains("local-proxy listening on 127.0.0.1:"),
        "{line}"
    );
    assert!(!line.contains(":0 "), "{line}");
}

#[test]
fn one_grep_finds_both_ends_of_a_tunnel() {
    let p = binary_pair(&[]);
    let mut s = socks_connect(p.local_addr, Dest::Ip(origin()), None).unwrap();
    let app = s.local_addr().unwrap();
    download_and_verify(&mut s, "o", 1000);
    drop(s);
    // local-proxy's open line names the app and the tunnel id.
    let mut open = Vec::new();
    assert!(eventually(Duration::from_secs(5), || {
        open = p.local.log_lines(&format!("app={app} "));
        !open.is_empty()
    }));
    let tunnel = open[0]
        .split("tunnel=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no tunnel id in {open:?}"))
        .to_string();
    let key = format!("tunnel={tunnel} ");
    // remote-proxy logs the same id on its open and close lines.
    assert!(
        eventually(Duration::from_secs(5), || {
            let lines = p.remote.log_lines(&key);
            lines.iter().any(|l| l.contains(" open "))
                && lines.iter().any(|l| l.contains(" close "))
        }),
        "remote-proxy lines for {key}: {:?}",
        p.remote.log_lines("tunnel=")
    );
    // local-proxy's close line comes when its side of the relay ends, which may be after
    // remote-proxy's.
    assert!(eventually(Duration::from_secs(5), || p
        .local
        .log_lines(&key)
        .iter()
        .any(|l| l.contains(" close "))));
}

#[test]
fn a_malformed_remote_is_refused_at_start() {
    for bad in ["localhost", "127.0.0.1:99999", "127.0.0.1:0"] {
        let out = local_bin()
            .args(["--listen", "127.0.0.1:0", "--remote", bad, "--user", "u"])
            .env("FLOWGATE_PASSWORD", "pw")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("HOST:PORT"), "{bad}: {err}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("listening on"));
    }
}

#[test]
fn check_reports_each_remote_with_a_verdict() {
    let p = binary_pair(&[]);
    let dead = refused_addr();
    let run = |password: &str| {
        let out = local_bin()
            .args(["check", "--user", "alice"])
            .args(["--remote", &p.remote_addr.to_string()])
            .args(["--remote", &dead.to_string()])
            .args(["--pin", &identity(&p.db)])
            .env("FLOWGATE_PASSWORD", password)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run("pw");
    assert_eq!(code, Some(1), "{out}");
    let live = format!("{}: ok: reachable", p.remote_addr);
    assert!(
        out.contains(&live) && out.contains("accepted, bandwidth unlimited"),
        "{out}"
    );
    assert!(
        out.contains(&format!("{dead}: FAILED: unreachable")),
        "{out}"
    );
    let (code, out) = run("wrong");
    assert_eq!(code, Some(1));
    assert!(out.contains("user alice refused: bad credentials"), "{out}");
    // With only the live remote and the right password: exit 0.
    let out = local_bin()
        .args([
            "check",
            "--user",
            "alice",
            "--remote",
            &p.remote_addr.to_string(),
        ])
        .args(["--pin", &identity(&p.db)])
        .env("FLOWGATE_PASSWORD", "pw")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_wrong_password_at_start_is_logged_not_fatal() {
    let p = binary_pair(&[]);
    let mut cmd = local_bin();
    cmd.args(["--listen", "127.0.0.1:0", "--user", "alice"])
        .args(["--remote", &p.remote_addr.to_string()])
        .args(["--pin", &identity(&p.db)])
        .env("FLOWGATE_PASSWORD", "wrong");
    let (local, _addr) = spawn_listening(cmd);
    assert!(eventually(Duration::from_secs(5), || !local
        .log_lines("credentials refused: bad credentials")
        .is_empty()));
    assert!(
        local
            .log_lines(&format!("remote={} up", p.remote_addr))
            .len()
            == 1
    );
}
