//! A fleet: two remote-proxies (real binaries) on one PostgreSQL, each with a local-proxy in
//! front. Both serve the same users; changes made anywhere reach both; counters from both
//! add up; and a PostgreSQL outage is survived.

use crate::support::postgres::Postgres;
use crate::support::*;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The fleet's database and the TLS state directory its nodes share (one identity).
struct Fleet {
    pg: Postgres,
    db: PathBuf,
    state: PathBuf,
}

impl Fleet {
    fn start() -> Fleet {
        let pg = Postgres::start();
        let db = PathBuf::from(pg.conninfo());
        let state = temp_dir();
        Fleet { pg, db, state }
    }

    /// `remote-proxy --db PG ARGS` (the CLI, run "anywhere").
    fn cli(&self, args: &[&str]) -> String {
        remote_user_ok(&self.db, args)
    }

    fn pin(&self) -> String {
        self.cli(&["--state-dir", self.state.to_str().unwrap(), "identity"])
            .trim()
            .to_string()
    }

    /// A remote-proxy node on the fleet's database.
    fn node(&self) -> (ChildGuard, SocketAddr) {
        self.node_on(&self.db)
    }

    /// A remote-proxy node that reaches the fleet's database through `db`.
    fn node_on(&self, db: &Path) -> (ChildGuard, SocketAddr) {
        let mut cmd = remote_bin();
        cmd.arg("--db")
            .arg(db)
            .arg("--state-dir")
            .arg(&self.state)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--flush-interval",
                "500ms",
            ])
            .args(allow_loopback());
        spawn_listening(cmd)
    }

    /// A local-proxy in front of `remote`, as alice.
    fn local(&self, remote: SocketAddr) -> (ChildGuard, SocketAddr) {
        let mut cmd = local_bin();
        cmd.args(["--listen", "127.0.0.1:0", "--remote", &remote.to_string()])
            .args(["--user", "alice", "--pin", &self.pin()])
            .env("FLOWGATE_PASSWORD", "pw");
        spawn_listening(cmd)
    }
}

/// (up, down) recorded for `user`, from `usage --json`.
fn recorded(db: &Path, user: &str) -> (u64, u64) {
    let out = remote_user_ok(
        db,
        &["usage", "--user", user, "--since", "1970-01", "--json"],
    );
    let rows: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    rows.as_array().unwrap().iter().fold((0, 0), |(u, d), r| {
        (
            u + r["up_bytes"].as_u64().unwrap(),
            d + r["down_bytes"].as_u64().unwrap(),
        )
    })
}

/// A tunnel through `local` that has asked the origin for `n` bytes (the head and body are
/// the caller's to read).
fn pull(local: SocketAddr, n: u64) -> std::net::TcpStream {
    let mut s = socks_connect(local, Dest::Ip(origin()), None).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        s,
        "GET /bytes/{n} HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s
}

fn get(local: SocketAddr, n: u64) {
    let mut s = socks_connect(local, Dest::Ip(origin()), None).expect("tunnel");
    download_and_verify(&mut s, "o", n);
}

#[test]
fn two_nodes_on_one_postgres_serve_the_same_users_and_see_changes_live() {
    let f = Fleet::start();
    f.cli(&[
        "user",
        "add",
        "alice",
        "--bandwidth",
        "1M",
        "--password",
        "pw",
    ]);
    let (a, a_addr) = f.node();
    let (b, b_addr) = f.node();
    let (_la, la) = f.local(a_addr);
    let (_lb, lb) = f.local(b_addr);
    get(la, 300_000);
    get(lb, 200_000);
    // Counters from both nodes add up in the shared rows.
    let added = eventually(Duration::from_secs(5), || {
        let (_, down) = recorded(&f.db, "alice");
        (500_000..500_000 + 4096).contains(&down)
    });
    assert!(added, "recorded {:?}", recorded(&f.db, "alice"));
    // A live tunnel on node B at 1 MB/s; the bandwidth is changed with the CLI.
    let mut s = pull(lb, 20_000_000);
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        got += read_some(&mut s, &mut buf);
    }
    f.cli(&["user", "set", "alice", "--bandwidth", "100K"]);
    let changed = Instant::now();
    let mut mark = None;
    while changed.elapsed() < Duration::from_secs(4) {
        got += read_some(&mut s, &mut buf);
        if mark.is_none() && changed.elapsed() >= Duration::from_secs(2) {
            mark = Some((Instant::now(), got));
        }
    }
    let (t, at) = mark.unwrap();
    let rate = (got - at) as f64 / t.elapsed().as_secs_f64();
    // Within 2 s of the change the tunnel on the other node runs at the new rate.
    assert!(
        rate < 200_000.0,
        "still {rate:.0} B/s two seconds after user set"
    );
    assert!(!b.log_lines("user=alice bandwidth now 100K/s").is_empty());
    // One tunnel open on each node: `user list` sums the nodes' counts.
    let hold = pull(la, 20_000_000);
    let both = eventually(Duration::from_secs(5), || {
        let list = f.cli(&["user", "list"]);
        list.lines()
            .find(|l| l.starts_with("alice"))
            .is_some_and(|l| l.trim_end().ends_with(" 2"))
    });
    assert!(both, "{}", f.cli(&["user", "list"]));
    drop((s, hold));
    // A user added anywhere works on both nodes; one deleted is refused on both at once.
    f.cli(&["user", "set", "alice", "--bandwidth", "unlimited"]);
    f.cli(&["user", "del", "alice"]);
    let deleted = Instant::now();
    for local in [la, lb] {
        assert_eq!(
            socks_connect(local, Dest::Ip(origin()), None).err(),
            Some(0x02)
        );
    }
    assert!(deleted.elapsed() < Duration::from_secs(1));
    assert!(a.log_lines("panicked").is_empty() && b.log_lines("panicked").is_empty());
}

#[test]
fn a_postgres_outage_keeps_cached_users_working_and_the_node_recovers() {
    let mut f = Fleet::start();
    f.cli(&[
        "user",
        "add",
        "alice",
        "--bandwidth",
        "unlimited",
        "--password",
        "pw",
    ]);
    f.cli(&[
        "user",
        "add",
        "bob",
        "--bandwidth",
        "unlimited",
        "--password",
        "pw2",
    ]);
    let (node, addr) = f.node();
    let (_l, local) = f.local(addr);
    get(local, 100_000); // alice's password is verified now
    assert!(eventually(Duration::from_secs(5), || recorded(
        &f.db, "alice"
    )
    .1 >= 100_000));
    let before = recorded(&f.db, "alice").1;
    f.pg.stop();
    // alice keeps tunnelling from the node's cache, several times over.
    for _ in 0..3 {
        get(local, 200_000);
    }
    // bob was never verified on this node: refused with a clear answer, at once.
    let t = Instant::now();
    let refused = socks_connect(local, Dest::Ip(origin()), Some(("bob", "pw2")));
    assert!(refused.is_err(), "bob got in without the database");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let mut s = connect(local);
    write!(
        s,
        "CONNECT {} HTTP/1.1\r\nProxy-Authorization: Basic Ym9iOnB3Mg==\r\n\r\n",
        origin()
    )
    .unwrap();
    assert_eq!(read_response_head(&mut s).code, 503);
    // One log line for the outage, not one per connection.
    assert_eq!(
        node.log_lines("user database unavailable").len(),
        1,
        "{:?}",
        node.log_lines("database")
    );
    // The database comes back: the counts kept meanwhile are written, bob gets in, and the
    // node was not restarted.
    f.pg.resume();
    let written = eventually(Duration::from_secs(15), || {
        recorded(&f.db, "alice").1 >= before + 600_000
    });
    assert!(
        written,
        "recorded {:?} (had {before})",
        recorded(&f.db, "alice")
    );
    let back = eventually(Duration::from_secs(15), || {
        socks_connect(local, Dest::Ip(origin()), Some(("bob", "pw2"))).is_ok()
    });
    assert!(back, "bob still refused after the database came back");
    assert!(!node.log_lines("user database reachable again").is_empty());
    assert!(node.log_lines("panicked").is_empty());
}

#[test]
fn a_quota_is_held_across_two_nodes_within_one_chunk() {
    let f = Fleet::start();
    f.cli(&[
        "user",
        "add",
        "alice",
        "--bandwidth",
        "unlimited",
        "--password",
        "pw",
    ]);
    f.cli(&["user", "set", "alice", "--quota", "500MB/day"]);
    let (_a, a_addr) = f.node();
    let (_b, b_addr) = f.node();
    let (_la, la) = f.local(a_addr);
    let (_lb, lb) = f.local(b_addr);
    // Both nodes download as fast as they can at once, far more than the quota.
    let pulls: Vec<_> = [la, lb]
        .into_iter()
        .map(|local| {
            std::thread::spawn(move || {
                let mut s = pull(local, 2_000_000_000);
                let mut buf = vec![0u8; 256 * 1024];
                let mut got = 0u64;
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    got += n as u64;
                }
                got
            })
        })
        .collect();
    let moved: u64 = pulls.into_iter().map(|p| p.join().unwrap()).sum();
    let quota = 500_000_000u64;
    let chunk = flowgate::remote::fleet_chunk("500MB/day".parse().unwrap());
    // What the nodes relayed, as recorded once both have flushed: every byte the apps got,
    // plus what was in flight when the tunnels were cut.
    let mut spent = 0;
    let settled = eventually(Duration::from_secs(5), || {
        let (up, down) = recorded(&f.db, "alice");
        let before = spent;
        spent = up + down;
        spent >= moved && spent == before
    });
    assert!(settled, "moved {moved}, recorded {spent}");
    eprintln!("fleet quota: apps got {moved}, nodes spent {spent}, quota {quota}, chunk {chunk}");
    assert!(spent - moved < 8 << 20, "moved {moved}, recorded {spent}");
    // The documented bound: one chunk past the quota per node besides the one that hit it.
    assert!(
        spent <= quota + chunk + 2 * 256 * 1024,
        "spent {spent}, chunk {chunk}"
    );
    assert!(spent >= quota - 2 * chunk, "stopped early at {spent}");
    for local in [la, lb] {
        assert_eq!(
            socks_connect(local, Dest::Ip(origin()), None).err(),
            Some(0x02)
        );
    }
}

#[test]
fn a_node_that_lost_its_database_hands_new_logins_to_one_that_has_it() {
    // Two nodes on two databases that both know bob; node B's database goes away.
    let f = Fleet::start();
    let mut g = Fleet::start();
    g.state = f.state.clone(); // one identity for both nodes
    for fleet in [&f, &g] {
        fleet.cli(&[
            "user",
            "add",
            "bob",
            "--bandwidth",
            "unlimited",
            "--password",
            "pw2",
        ]);
    }
    let (_a, a_addr) = f.node();
    let (b, b_addr) = g.node();
    let mut cmd = local_bin();
    cmd.args(["--listen", "127.0.0.1:0", "--balance", "round-robin"])
        .args([
            "--remote",
            &a_addr.to_string(),
            "--remote",
            &b_addr.to_string(),
        ])
        .args(["--pin", &f.pin(), "--warm", "0"]);
    let (_l, local) = spawn_listening(cmd);
    g.pg.stop();
    // Every new login of bob succeeds: the ones sent to B come back "unavailable" and go
    // to A, which reaches its database.
    for _ in 0..4 {
        let mut s =
            socks_connect(local, Dest::Ip(origin()), Some(("bob", "pw2"))).expect("bob's tunnel");
        download_and_verify(&mut s, "o", 10_000);
    }
    assert!(
        !b.log_lines("user database unavailable").is_empty(),
        "{:#?}",
        b.log_lines("")
    );
}

/// Stands between a node and PostgreSQL (TCP in front, the server's Unix socket behind) and
/// can stop passing bytes on while keeping every connection open: a database that has
/// stopped answering without closing anything, which no refused connect reveals.
struct Freezer {
    addr: SocketAddr,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Freezer {
    fn start(socket: PathBuf) -> Freezer {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&frozen);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::os::unix::net::UnixStream::connect(&socket) else {
                    continue;
                };
                let pass = |mut from: Box<dyn Read + Send>, mut to: Box<dyn Write + Send>| {
                    let f = Arc::clone(&f);
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            while f.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                };
                pass(
                    Box::new(client.try_clone().unwrap()),
                    Box::new(server.try_clone().unwrap()),
                );
                pass(Box::new(server), Box::new(client));
            }
        });
        Freezer { addr, frozen }
    }

    fn freeze(&self, on: bool) {
        self.frozen.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_database_that_stops_answering_does_not_hold_up_cached_users() {
    let f = Fleet::start();
    for (name, pw) in [("alice", "pw"), ("bob", "pw2")] {
        f.cli(&[
            "user",
            "add",
            name,
            "--bandwidth",
            "unlimited",
            "--password",
            pw,
        ]);
    }
    let freezer = Freezer::start(f.pg.socket());
    let db = PathBuf::from(format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        freezer.addr.port()
    ));
    let (_node, node) = f.node_on(&db);
    let mut cmd = local_bin();
    cmd.args(["--listen", "127.0.0.1:0", "--remote", &node.to_string()])
        .args(["--pin", &f.pin(), "--warm", "0"]);
    let (_l, local) = spawn_listening(cmd);
    let mut s = socks_connect(local, Dest::Ip(origin()), Some(("alice", "pw"))).unwrap();
    download_and_verify(&mut s, "o", 10_000);
    drop(s);
    freezer.freeze(true);
    // bob's first login reads the database, and waits on it.
    let bob = std::thread::spawn(move || {
        socks_connect(local, Dest::Ip(origin()), Some(("bob", "pw2")))
            .map(|mut s| download_and_verify(&mut s, "o", 10_000))
    });
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let t = Instant::now();
        let mut s = socks_connect(local, Dest::Ip(origin()), Some(("alice", "pw")))
            .expect("a cached user's tunnel while the database is silent");
        download_and_verify(&mut s, "o", 10_000);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    assert!(
        !bob.is_finished(),
        "bob's login did not wait on the database"
    );
    // The database answers again: the login that waited goes through.
    freezer.freeze(false);
    assert_eq!(bob.join().unwrap().err(), None);
}
