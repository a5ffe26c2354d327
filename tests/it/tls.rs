//! TLS on the hop: what a watcher on the path sees, how each way of trusting a remote
//! refuses the wrong one, mismatched modes, and the identity's files.

use crate::support::*;
use flowgate::config::{LocalTls, RemoteTls};
use flowgate::tls::Fingerprint;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const USER: &str = "carol";
const PASSWORD: &str = "S3cr3t-Pass-for-the-wire";

/// A TCP forwarder placed between local-proxy and remote-proxy that keeps a copy of every
/// byte it passes, both ways.
struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    fn to(remote: SocketAddr) -> Tap {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let keep = seen.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let Ok(r) = TcpStream::connect(remote) else {
                    continue;
                };
                for (mut from, mut to) in [(c.try_clone().unwrap(), r.try_clone().unwrap()), (r, c)]
                {
                    let keep = keep.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    keep.lock().unwrap().extend_from_slice(&buf[..n]);
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Tap { addr, seen }
    }

    fn saw(&self, needle: &[u8]) -> bool {
        let seen = self.seen.lock().unwrap();
        seen.windows(needle.len()).any(|w| w == needle)
    }

    fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A pair whose local-proxy reaches its remote through a [`Tap`].
fn tapped_pair(hop: HopMode) -> (Pair, Arc<Mutex<Option<Tap>>>) {
    let tap = Arc::new(Mutex::new(None));
    let slot = tap.clone();
    let p = pair_with(&[user(USER, PASSWORD, "unlimited")], hop, move |l| {
        let remote: SocketAddr = l.upstreams.remotes[0].parse().unwrap();
        let t = Tap::to(remote);
        l.upstreams.remotes = vec![t.addr.to_string()];
        *slot.lock().unwrap() = Some(t);
    });
    (p, tap)
}

/// A slice of the origin's body from the middle of a 1 MB download: the payload a watcher
/// would look for.
fn payload_sample() -> Vec<u8> {
    let mut o = TcpStream::connect(origin()).unwrap();
    write!(o, "GET /bytes/1000000 HTTP/1.1\r\nHost: o\r\n\r\n").unwrap();
    let mut s = vec![0u8; 500_064];
    o.read_exact(&mut s).unwrap();
    s[500_000..].to_vec()
}

/// What a tap between the proxies found in a 1 MB download: (user name, password,
/// payload), and the bytes it passed. (Each needle is long enough that 1 MB of ciphertext
/// holds it by chance about once in a million runs; the tunnel request's 3-byte magic would
/// turn up in one run in twenty.)
fn what_a_tap_sees(hop: HopMode) -> ([bool; 3], usize) {
    let sample = payload_sample();
    let (p, tap) = tapped_pair(hop);
    let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 1_000_000);
    let tap = tap.lock().unwrap();
    let tap = tap.as_ref().unwrap();
    let found = [
        tap.saw(USER.as_bytes()),
        tap.saw(PASSWORD.as_bytes()),
        tap.saw(&sample),
    ];
    (found, tap.len())
}

#[test]
fn a_watcher_between_the_proxies_sees_no_name_password_or_payload() {
    let (found, passed) = what_a_tap_sees(tls);
    assert!(passed > 1_000_000, "the download went through the tap");
    assert_eq!(found, [false; 3], "user, password, payload in clear");
}

#[test]
fn with_plaintext_the_same_watcher_sees_everything() {
    // The control for the test above: the tap does capture what crosses it.
    assert_eq!(what_a_tap_sees(plaintext).0, [true; 3]);
}

/// `local-proxy check` against `remote` with `flags`; (exit code, stdout).
fn check(remote: SocketAddr, flags: &[&str], known: &std::path::Path) -> (Option<i32>, String) {
    let out = local_bin()
        .args(["check", "--user", USER, "--remote", &remote.to_string()])
        .args(flags)
        .env("FLOWGATE_PASSWORD", PASSWORD)
        .env("FLOWGATE_KNOWN_REMOTES", known)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// remote-proxy binary with user carol on a fresh database; its address, identity, db.
fn remote_binary(extra: &[&str]) -> (ChildGuard, SocketAddr, String, std::path::PathBuf) {
    let db = temp_dir().join("u.db");
    cli_user_add(&db, USER, PASSWORD, "unlimited");
    let mut cmd = remote_bin();
    cmd.arg("--db")
        .arg(&db)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(allow_loopback())
        .args(extra);
    let (child, addr) = spawn_listening(cmd);
    let id = identity(&db);
    (child, addr, id, db)
}

#[test]
fn a_wrong_pin_is_refused_with_the_identity_seen_and_no_login() {
    let (remote, addr, id, _db) = remote_binary(&[]);
    let wrong = Fingerprint([7; 32]).to_string();
    let known = temp_dir().join("known");
    let (code, out) = check(addr, &["--pin", &wrong], &known);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("presented identity {id}")), "{out}");
    assert!(out.contains("matches no --pin"), "{out}");
    // Nothing reached the login: remote-proxy never saw a request.
    assert!(remote.log_lines("credentials checked").is_empty());
    assert!(remote.log_lines("auth failed").is_empty());
    // Any one matching pin of several passes.
    let (code, out) = check(addr, &["--pin", &wrong, "--pin", &id], &known);
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn an_unknown_remote_is_refused_until_trusted_then_a_changed_one_is_refused_loudly() {
    let (remote, addr, id, _db) = remote_binary(&[]);
    let known = temp_dir().join("known_remotes");
    // Not in the file: refused, naming its identity and the command that trusts it.
    let (code, out) = check(addr, &[], &known);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("is not a known remote"), "{out}");
    assert!(out.contains(&id), "{out}");
    assert!(out.contains(&format!("local-proxy trust {addr}")), "{out}");
    assert!(remote.log_lines("credentials checked").is_empty());
    // `trust` asks; "n" records nothing.
    let trust = |answer: &str| {
        let mut child = local_bin()
            .args(["trust", &addr.to_string()])
            .env("FLOWGATE_KNOWN_REMOTES", &known)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(answer.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = trust("n\n");
    assert!(
        !ok && out.contains(&id) && out.contains("nothing recorded"),
        "{out}"
    );
    assert_eq!(check(addr, &[], &known).0, Some(1));
    let (ok, out) = trust("y\n");
    assert!(ok, "{out}");
    let (code, out) = check(addr, &[], &known);
    assert_eq!(code, Some(0), "{out}");
    // The file now says something else for this remote: its identity "changed".
    let other = Fingerprint([9; 32]);
    std::fs::write(&known, format!("{addr} {other}\n")).unwrap();
    let (code, out) = check(addr, &[], &known);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("REMOTE IDENTITY HAS CHANGED"), "{out}");
    assert!(
        out.contains(&id) && out.contains(&other.to_string()),
        "{out}"
    );
    assert!(eventually(Duration::from_secs(3), || remote
        .log_lines("credentials checked")
        .len()
        == 1));
    // trust warns before replacing it; --yes replaces without asking.
    let (ok, out) = trust("n\n");
    assert!(!ok && out.contains("WARNING"), "{out}");
    trust_yes(addr, &known);
    assert_eq!(check(addr, &[], &known).0, Some(0));
}

#[test]
fn a_running_local_proxy_names_an_unknown_remote_in_one_line_and_takes_a_later_trust() {
    let (_remote, addr, id, _db) = remote_binary(&[]);
    let known = temp_dir().join("known_remotes");
    let mut cmd = local_bin();
    cmd.args(["--listen", "127.0.0.1:0", "--remote", &addr.to_string()])
        .args(["--health-interval", "200ms", "--health-rise", "1"])
        .env("FLOWGATE_KNOWN_REMOTES", &known);
    let (local, laddr) = spawn_listening(cmd);
    std::thread::sleep(Duration::from_millis(1000));
    let lines = local.log_lines("is not a known remote");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(&id) && lines[0].contains("local-proxy trust"));
    assert_eq!(
        socks_connect(laddr, Dest::Ip(origin()), Some((USER, PASSWORD))).unwrap_err(),
        0x01
    );
    // Trusted while it runs: the next probes find it, without a restart.
    trust_yes(addr, &known);
    assert!(eventually(Duration::from_secs(5), || !local
        .log_lines(&format!("remote={addr} up"))
        .is_empty()));
    let mut s = socks_connect(laddr, Dest::Ip(origin()), Some((USER, PASSWORD))).unwrap();
    download_and_verify(&mut s, "o", 10_000);
}

/// `local-proxy trust ADDR --yes` into the known-remotes file `known`; it must succeed.
fn trust_yes(addr: SocketAddr, known: &std::path::Path) {
    let out = local_bin()
        .args(["trust", &addr.to_string(), "--yes"])
        .env("FLOWGATE_KNOWN_REMOTES", known)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (written to ca.pem) and, for each list of names, a certificate it signed for them
/// with its key: (ca.pem, [(cert, key)]).
fn ca_signed(
    names: &[&[&str]],
) -> (
    std::path::PathBuf,
    Vec<(std::path::PathBuf, std::path::PathBuf)>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let dir = temp_dir();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let mut out = Vec::new();
    for (i, names) in names.iter().enumerate() {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let (c, k) = (dir.join(format!("c{i}.pem")), dir.join(format!("k{i}.pem")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        out.push((c, k));
    }
    (ca_file, out)
}

#[test]
fn a_ca_signed_certificate_is_accepted_for_its_name_and_refused_for_another() {
    let (ca, certs) = ca_signed(&[&["localhost", "127.0.0.1"], &["proxy.example"]]);
    let (cert, key) = certs[0].clone();
    let ca_pair = |remote_name: &'static str| {
        let (cert, key, ca) = (cert.clone(), key.clone(), ca.clone());
        pair_with(
            &[user(USER, PASSWORD, "unlimited")],
            move |r| r.tls = RemoteTls::Files { cert, key },
            move |l| {
                let port = l.upstreams.remotes[0]
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .to_string();
                l.upstreams.remotes = vec![format!("{remote_name}:{port}")];
                l.tls = LocalTls::Ca(ca);
            },
        )
    };
    for name in ["localhost", "127.0.0.1"] {
        let p = ca_pair(name);
        let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
        download_and_verify(&mut s, "o", 100_000);
    }
    // The same certificate, reached under a name it does not carry: refused.
    let (other_cert, other_key) = certs[1].clone();
    let p = pair_with(
        &[user(USER, PASSWORD, "unlimited")],
        move |r| {
            r.tls = RemoteTls::Files {
                cert: other_cert,
                key: other_key,
            }
        },
        |_| {},
    );
    let before = p.state.credential_checks();
    let (code, out) = check(
        p.remote_addr(),
        &["--ca", ca.to_str().unwrap()],
        &temp_dir().join("k"),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.to_lowercase().contains("not valid for name"), "{out}");
    assert_eq!(p.state.credential_checks(), before, "credentials were sent");
}

#[test]
fn tls_and_plaintext_mismatches_fail_fast_on_both_sides_with_the_reason() {
    // A TLS local-proxy and a plaintext remote-proxy.
    let (plain_remote, paddr, _, _) = remote_binary(&["--plaintext", "--handshake-timeout", "3s"]);
    let t = Instant::now();
    let (code, out) = check(
        paddr,
        &["--pin", &Fingerprint([1; 32]).to_string()],
        &temp_dir(),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("runs with --plaintext"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(eventually(Duration::from_secs(3), || !plain_remote
        .log_lines("TLS handshake on a --plaintext listener")
        .is_empty()));
    // A plaintext local-proxy and a TLS remote-proxy: refused before any login.
    let (tls_remote, taddr, _, _) = remote_binary(&["--handshake-timeout", "3s"]);
    let t = Instant::now();
    let (code, out) = check(taddr, &["--plaintext"], &temp_dir());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("requires TLS"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(eventually(Duration::from_secs(3), || !tls_remote
        .log_lines("plaintext tunnel request on a TLS listener")
        .is_empty()));
    assert!(tls_remote.log_lines("credentials checked").is_empty());
    // And an app through a mismatched pair gets its answer at once, not a hang.
    let p = pair_with(&[user(USER, PASSWORD, "unlimited")], plaintext, |l| {
        l.tls = LocalTls::Pins(vec![Fingerprint([1; 32])])
    });
    let t = Instant::now();
    let e = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap_err();
    assert_eq!(e, 0x01);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn the_identity_survives_restarts_and_its_files_are_owner_only() {
    let (remote, _addr, id, db) = remote_binary(&[]);
    assert!(eventually(Duration::from_secs(3), || !remote
        .log_lines(&format!("tls identity {id}"))
        .is_empty()));
    drop(remote);
    let dir = db.parent().unwrap();
    for f in ["identity.key", "identity.crt"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let mut cmd = remote_bin();
    cmd.arg("--db")
        .arg(&db)
        .args(["serve", "--listen", "127.0.0.1:0"]);
    let (again, _) = spawn_listening(cmd);
    assert!(eventually(Duration::from_secs(3), || !again
        .log_lines(&format!("tls identity {id}"))
        .is_empty()));
    assert_eq!(identity(&db), id);
    // --state-dir keeps it elsewhere; a new directory is a new identity.
    let elsewhere = temp_dir();
    let out = remote_bin()
        .arg("--db")
        .arg(&db)
        .arg("--state-dir")
        .arg(&elsewhere)
        .arg("identity")
        .output()
        .unwrap();
    let other = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(other.starts_with("sha256:") && other != id, "{other}");
    assert!(elsewhere.join("identity.key").exists());
}

#[test]
fn plaintext_on_a_public_address_needs_its_own_flag() {
    let db = temp_dir().join("u.db");
    let out = remote_bin()
        .arg("--db")
        .arg(&db)
        .args(["serve", "--plaintext", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--plaintext-on-public"), "{err}");
    assert!(!err.contains("listening on"), "{err}");
    let out = remote_bin()
        .arg("--db")
        .arg(&db)
        .args(["serve", "--plaintext-on-public"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_stalled_tls_handshake_holds_no_slot_past_the_deadline() {
    // Stops after its ClientHello: cut at the handshake deadline like a silent socket, and
    // the one slot is free again for a real tunnel.
    let p = pair_with(
        &[user(USER, PASSWORD, "unlimited")],
        |r| {
            r.timeouts.handshake = Duration::from_millis(500);
            r.admission.max_active = 1;
        },
        |_| {},
    );
    let mut s = connect(p.remote_addr());
    s.write_all(&client_hello(&p.tls, p.remote_addr())).unwrap();
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let mut s = socks_connect(p.local_addr(), Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 10_000);
}
