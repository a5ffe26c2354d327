//! Findings of the security review about logs, files and the process: client text cannot
//! forge log lines, the database is owner-only, the password does not linger in the
//! environment, and a bare LF in a forwarded head is refused.

use crate::support::*;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn a_user_name_with_a_newline_cannot_forge_a_log_line() {
    let p = binary_pair(&[]);
    let forged = "mallory\n[2026-01-01T00:00:00Z INFO  flowgate::remote] forged\u{202e}\x1b[31m";
    let e = socks_connect(p.local_addr, Dest::Ip(origin()), Some((forged, "pw"))).unwrap_err();
    assert_eq!(e, 0x101);
    assert!(eventually(Duration::from_secs(3), || !p
        .remote
        .log_lines("auth failed")
        .is_empty()));
    std::thread::sleep(Duration::from_millis(200));
    for proc_ in [&p.local, &p.remote] {
        // Every line the process wrote starts as a log line does; none is the forged one.
        let all = proc_.log_lines("");
        assert!(all.iter().all(|l| l.starts_with('[')), "{all:?}");
        assert!(all.iter().all(|l| !l.starts_with("[2026-01-01")), "{all:?}");
        assert!(all
            .iter()
            .all(|l| !l.contains('\u{202e}') && !l.contains('\x1b')));
    }
    let line = p.remote.log_lines("auth failed").remove(0);
    assert!(line.contains("user=mallory\\n[2026-01-01"), "{line}");
}

#[test]
fn the_database_and_its_wal_files_are_created_owner_only() {
    let db = temp_dir().join("users.db");
    cli_user_add(&db, "alice", "pw", "1M");
    for f in [
        db.clone(),
        db.with_extension("db-wal"),
        db.with_extension("db-shm"),
    ] {
        if f.exists() {
            let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
    }
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn the_password_leaves_the_environment_and_can_come_from_a_file() {
    let p = binary_pair(&[]);
    let env_of = |pid: u32| std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    // binary_pair gave local-proxy FLOWGATE_PASSWORD=pw.
    let env = env_of(p.local.0.id());
    assert!(
        !env.windows(18).any(|w| w == b"FLOWGATE_PASSWORD="),
        "the password is still in /proc/PID/environ"
    );
    // --password-file: the first line is the password.
    let file = temp_dir().join("password");
    std::fs::write(&file, "pw\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = local_bin();
    cmd.args(["--listen", "127.0.0.1:0", "--user", "alice"])
        .args(["--remote", &p.remote_addr.to_string()])
        .args(["--pin", &identity(&p.db)])
        .arg("--password-file")
        .arg(&file)
        .stdin(Stdio::null());
    let (local, laddr) = spawn_listening(cmd);
    assert!(eventually(Duration::from_secs(5), || !local
        .log_lines("credentials ok")
        .is_empty()));
    let mut s = socks_connect(laddr, Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 1000);
}

#[test]
fn a_bare_lf_in_a_forwarded_head_is_refused_and_never_reaches_the_origin() {
    let p = pair(&[user("alice", "pw", "unlimited")]);
    let seen = Arc::new(AtomicUsize::new(0));
    let target = hold_target(seen.clone());
    for head in [
        format!("GET http://{target}/ HTTP/1.1\r\nHost: x\nX-Injected: 1\r\n\r\n"),
        format!("GET http://{target}/ HTTP/1.1\r\nHost: x\rX-Injected: 1\r\n\r\n"),
    ] {
        let mut s = connect(p.local_addr());
        s.write_all(head.as_bytes()).unwrap();
        let r = read_response_head(&mut s);
        assert_eq!(r.code, 400, "{}", r.head);
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest);
        assert!(rest.contains("bare CR or LF"), "{rest}");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(seen.load(Ordering::SeqCst), 0);
}
