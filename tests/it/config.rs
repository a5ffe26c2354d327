//! `--config FILE` on both binaries: the same behaviour as the same flags, mistakes named by
//! line, `check-config`, and SIGHUP applying a changed destination policy to new tunnels
//! while an open one keeps running.

use crate::support::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{Read, Write};
use std::time::Duration;

fn write_file(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `check-config` output without the source comments, for comparing settings.
fn settings(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("config ="))
        .map(|l| l.split("  #").next().unwrap().to_string())
        .collect()
}

#[test]
fn a_config_file_means_the_same_as_the_same_flags() {
    let dir = temp_dir();
    let db = dir.join("u.db");
    let f = write_file(
        &dir,
        "remote.toml",
        "# the same as the flags below\nlisten = \"127.0.0.1:7999\"\nmax-connections = 7\n\
         allow-dest = [\"127.0.0.1/32\", \"::1/128\"]\ndeny-port = [25]\nrate-per-ip = \"30/m\"\n\
         plaintext = true\n",
    );
    let by_file = remote_user_ok(&db, &["--config", f.to_str().unwrap(), "check-config"]);
    let by_flags = remote_user_ok(
        &db,
        &[
            "check-config",
            "--listen",
            "127.0.0.1:7999",
            "--max-connections",
            "7",
            "--allow-dest",
            "127.0.0.1/32",
            "--allow-dest",
            "::1/128",
            "--deny-port",
            "25",
            "--rate-per-ip",
            "30/m",
            "--plaintext",
        ],
    );
    assert_eq!(settings(&by_file), settings(&by_flags));
    assert!(by_file.contains("max-connections = 7  # file"), "{by_file}");
    // A flag wins over the file, and says so.
    let over = remote_user_ok(
        &db,
        &[
            "--config",
            f.to_str().unwrap(),
            "check-config",
            "--max-connections",
            "9",
        ],
    );
    assert!(over.contains("max-connections = 9  # flag"), "{over}");
    // FLOWGATE_CONFIG names the file as --config does.
    let out = remote_bin()
        .arg("--db")
        .arg(&db)
        .arg("check-config")
        .env("FLOWGATE_CONFIG", &f)
        .output()
        .unwrap();
    let by_env = String::from_utf8_lossy(&out.stdout);
    assert_eq!(settings(&by_env), settings(&by_file), "{by_env}");
    // And it runs as configured: a tunnel through a pair started from files alone.
    cli_user_add(&db, "alice", "pw", "unlimited");
    let rf = write_file(
        &dir,
        "serve.toml",
        &format!(
            "db = {:?}\nlisten = \"127.0.0.1:0\"\nallow-dest = [\"127.0.0.1/32\"]\nplaintext = true\n",
            db.to_str().unwrap()
        ),
    );
    let mut cmd = remote_bin();
    cmd.args(["--config", rf.to_str().unwrap(), "serve"]);
    let (_remote, raddr) = spawn_listening(cmd);
    let lf = write_file(
        &dir,
        "local.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nremote = [\"{raddr}\"]\nuser = \"alice\"\nplaintext = true\nwarm = 0\n"
        ),
    );
    let mut cmd = local_bin();
    cmd.args(["--config", lf.to_str().unwrap()])
        .env("FLOWGATE_PASSWORD", "pw");
    let (_local, laddr) = spawn_listening(cmd);
    let mut s = socks_connect(laddr, Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 100_000);
    // local-proxy's check-config shows no password.
    let out = local_bin()
        .args(["check-config", "--config", lf.to_str().unwrap()])
        .env("FLOWGATE_PASSWORD", "hunter2")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("remote = [\"{raddr}\"]  # file")),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn a_bad_key_or_value_names_the_file_and_its_line() {
    let dir = temp_dir();
    let db = dir.join("u.db");
    let f = write_file(
        &dir,
        "r.toml",
        "listen = \"127.0.0.1:0\"\n\nmax-conections = 5\n",
    );
    let (ok, _, err) = remote_user(&db, &["--config", f.to_str().unwrap(), "serve"]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        format!(
            "remote-proxy: {}:3: max-conections: unknown key (keys are the flags' long names, as in --help)",
            f.display()
        )
    );
    let f = write_file(&dir, "v.toml", "# x\nwarm = \"lots\"\n");
    let out = local_bin()
        .args(["--config", f.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.starts_with(&format!(
            "local-proxy: {}:2: warm: invalid value 'lots'",
            f.display()
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn sighup_applies_a_new_destination_policy_without_cutting_an_open_tunnel() {
    let dir = temp_dir();
    let db = dir.join("u.db");
    cli_user_add(&db, "alice", "pw", "unlimited");
    let allow = "listen = \"127.0.0.1:0\"\nallow-dest = [\"127.0.0.1/32\"]\n";
    let f = write_file(&dir, "r.toml", allow);
    let mut cmd = remote_bin();
    cmd.arg("--db")
        .arg(&db)
        .args(["--config", f.to_str().unwrap(), "serve"]);
    let (remote, raddr) = spawn_listening(cmd);
    let mut cmd = local_bin();
    cmd.args(["--listen", "127.0.0.1:0", "--remote", &raddr.to_string()])
        .args(["--user", "alice", "--pin", &identity(&db), "--warm", "0"])
        .env("FLOWGATE_PASSWORD", "pw");
    let (_local, laddr) = spawn_listening(cmd);
    let echo = echo_target();
    let mut open = socks_connect(laddr, Dest::Ip(echo), None).unwrap();
    open.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let roundtrip = |s: &mut std::net::TcpStream, b: u8| {
        s.write_all(&[b; 100]).unwrap();
        let mut back = [0u8; 100];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, [b; 100]);
    };
    roundtrip(&mut open, 1);
    // Loopback no longer allowed: the built-in deny list applies again.
    std::fs::write(&f, "listen = \"127.0.0.1:0\"\n").unwrap();
    let hup = || kill(Pid::from_raw(remote.0.id() as i32), Signal::SIGHUP).unwrap();
    hup();
    assert!(eventually(Duration::from_secs(5), || !remote
        .log_lines("SIGHUP: destination policy now")
        .is_empty()));
    assert_eq!(
        socks_connect(laddr, Dest::Ip(echo), None).err(),
        Some(0x02),
        "a new tunnel to loopback is refused"
    );
    roundtrip(&mut open, 2); // the open one carries on
                             // A broken file changes nothing, and says so.
    std::fs::write(
        &f,
        "listen = \"127.0.0.1:0\"\nallow-dest = [\"not a range\"]\n",
    )
    .unwrap();
    hup();
    assert!(eventually(Duration::from_secs(5), || !remote
        .log_lines("keeping the current settings")
        .is_empty()));
    assert_eq!(socks_connect(laddr, Dest::Ip(echo), None).err(), Some(0x02));
    // Allowed again: new tunnels pass.
    std::fs::write(&f, allow).unwrap();
    hup();
    assert!(eventually(Duration::from_secs(5), || socks_connect(
        laddr,
        Dest::Ip(echo),
        None
    )
    .is_ok()));
    roundtrip(&mut open, 3);
    assert!(remote.0.id() > 0 && remote.log_lines("stopped").is_empty());
}

/// A target that echoes what it gets.
fn echo_target() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let mut w = c;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    a
}

#[test]
fn the_sample_configs_in_contrib_pass_check_config() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    let (ok, _, err) = remote_user(
        &temp_dir().join("u.db"),
        &[
            "--config",
            dir.join("remote-proxy.toml").to_str().unwrap(),
            "check-config",
        ],
    );
    assert!(ok, "{err}");
    let out = local_bin()
        .args(["check-config", "--config"])
        .arg(dir.join("local-proxy.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
