//! Shared pieces of the integration tests: an origin, in-process proxy pairs, real-binary
//! launchers, and small SOCKS5/HTTP clients. Every blocking step has a deadline.

#![allow(dead_code)]

use flowgate::config::{Credentials, LocalConfig, LocalTls, RemoteConfig, RemoteTls, Timeouts};
use flowgate::local::upstreams::connect::Link;
use flowgate::net::hop::Hop;
pub mod origin;
pub mod postgres;

use flowgate::limit::rate::Bandwidth;
use flowgate::net::server::Server;
use flowgate::users::Store;
use origin::Origin;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Deadline for any single read in a test client.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// `RUST_LOG=debug cargo test -- --nocapture` shows what the servers did.
pub fn init_log() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
            .is_test(true)
            .try_init();
    });
}

/// A fresh directory for one test.
pub fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "flowgate-it-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// The shared in-test origin (one per test binary is enough).
pub fn origin() -> SocketAddr {
    static O: OnceLock<Origin> = OnceLock::new();
    O.get_or_init(|| Origin::start("127.0.0.1:0".parse().unwrap()).expect("origin"))
        .local_addr()
}

/// An address on which nothing listens (connections are refused).
pub fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// A user to create before starting.
pub struct UserSpec {
    pub name: &'static str,
    pub password: &'static str,
    pub bandwidth: Bandwidth,
}

pub fn user(name: &'static str, password: &'static str, bandwidth: &str) -> UserSpec {
    UserSpec {
        name,
        password,
        bandwidth: bandwidth.parse().unwrap(),
    }
}

/// remote-proxy and local-proxy in this process, on ephemeral ports.
pub struct Pair {
    pub remote: Server,
    /// The remote's configuration, listening on the port it got, for a restart.
    pub remote_cfg: RemoteConfig,
    pub state: std::sync::Arc<flowgate::remote::Remote>,
    pub local: Server,
    pub db: PathBuf,
    /// How local-proxy reaches the remote: pinned TLS, or plaintext.
    pub tls: LocalTls,
}

impl Pair {
    pub fn local_addr(&self) -> SocketAddr {
        self.local.local_addr()
    }
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote.local_addr()
    }
    /// Stops remote-proxy and starts it again on the same port and identity.
    pub fn restart_remote(&mut self) {
        self.remote.shutdown();
        let (remote, state) = flowgate::remote::start_with_state(self.remote_cfg.clone()).unwrap();
        self.remote = remote;
        self.state = state;
    }

    /// A connection to remote-proxy as local-proxy opens it (TLS with the pin, or
    /// plaintext), for tests that speak the tunnel protocol themselves.
    pub fn raw_remote(&self) -> RawHop {
        RawHop::connect(self.remote_addr(), &self.tls)
    }
}

/// A hand-driven connection to remote-proxy: reads and writes go through TLS when the hop
/// has it, each with the test I/O timeout.
pub struct RawHop(pub Hop, pub Duration);

impl RawHop {
    pub fn connect(remote: SocketAddr, tls: &LocalTls) -> RawHop {
        RawHop::over(connect(remote), remote, tls)
    }

    /// As [`connect`](Self::connect), from the loopback address `from`.
    pub fn connect_from(from: std::net::Ipv4Addr, remote: SocketAddr, tls: &LocalTls) -> RawHop {
        RawHop::over(connect_from(from, remote), remote, tls)
    }

    fn over(s: TcpStream, remote: SocketAddr, tls: &LocalTls) -> RawHop {
        let trust = tls.trust().unwrap();
        match Link::to(&remote.to_string(), trust.as_ref()).unwrap() {
            Link::Plaintext => RawHop(Hop::plain(s), IO_TIMEOUT),
            Link::Tls(dial) => {
                let (cfg, name) = dial.for_tunnels();
                let hop = Hop::connect(s, cfg, name, IO_TIMEOUT).expect("TLS handshake");
                RawHop(hop, IO_TIMEOUT)
            }
        }
    }
}

impl Read for RawHop {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.io(self.1)?.read(buf) {
            // The remote closed without close_notify: for a test, the end of the stream.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
            other => other,
        }
    }
}

impl Write for RawHop {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.send(buf).map(|()| buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The first bytes a tunnel connection sends the remote (its TLS ClientHello; for a
/// plaintext hop, the start of a tunnel request).
pub fn client_hello(tls: &LocalTls, remote: SocketAddr) -> Vec<u8> {
    let trust = tls.trust().unwrap();
    match Link::to(&remote.to_string(), trust.as_ref()).unwrap() {
        Link::Plaintext => b"FG\x02\x01\0\0\0\0\0\0\0\x01\x05alice".to_vec(),
        Link::Tls(dial) => {
            let (cfg, name) = dial.for_tunnels();
            let mut c = rustls::ClientConnection::new(cfg.clone(), name.clone()).unwrap();
            let mut out = Vec::new();
            c.write_tls(&mut out).unwrap();
            out
        }
    }
}

/// Sends a health probe on `s` with its first `split` bytes (of the ClientHello, or of the
/// plaintext probe) apart from the rest by `pause`; the reply.
pub fn probe_in_pieces(
    p: &Pair,
    s: &mut TcpStream,
    split: usize,
    pause: Duration,
) -> flowgate::proto::tunnel::Reply {
    use flowgate::proto::tunnel;
    let probe = tunnel::encode_request(&tunnel::Request::health(None)).unwrap();
    let trust = p.tls.trust().unwrap();
    match Link::to(&p.remote_addr().to_string(), trust.as_ref()).unwrap() {
        Link::Plaintext => {
            s.write_all(&probe[..split]).unwrap();
            std::thread::sleep(pause);
            s.write_all(&probe[split..]).unwrap();
            tunnel::read_reply(s).unwrap()
        }
        Link::Tls(dial) => {
            let (cfg, name) = dial.for_probes();
            let mut c = rustls::ClientConnection::new(cfg.clone(), name.clone()).unwrap();
            let mut hello = Vec::new();
            c.write_tls(&mut hello).unwrap();
            s.write_all(&hello[..split]).unwrap();
            std::thread::sleep(pause);
            s.write_all(&hello[split..]).unwrap();
            let mut tls = rustls::Stream::new(&mut c, s);
            tls.write_all(&probe).unwrap();
            tunnel::read_reply(&mut tls).unwrap()
        }
    }
}

/// How a test's pair runs its hop: TLS (the default) or `--plaintext`.
pub type HopMode = fn(&mut RemoteConfig);

/// The default hop: TLS, the remote pinned.
pub fn tls(_: &mut RemoteConfig) {}

/// Makes a pair's hop plaintext (`--plaintext` on both sides).
pub fn plaintext(r: &mut RemoteConfig) {
    r.tls = RemoteTls::Plaintext { public: false };
}

/// A fresh database holding `users` (and the test log started).
pub fn users_db(users: &[UserSpec]) -> PathBuf {
    init_log();
    let db = temp_dir().join("users.db");
    let store = Store::open(&db).unwrap();
    for u in users {
        flowgate::users::UserStore::add(&store, u.name, u.password, u.bandwidth).unwrap();
    }
    db
}

/// Starts a pair whose local-proxy defaults to the first user's credentials.
pub fn pair(users: &[UserSpec]) -> Pair {
    pair_with(users, |_| {}, |_| {})
}

pub fn pair_with(
    users: &[UserSpec],
    remote_cfg: impl FnOnce(&mut RemoteConfig),
    local_cfg: impl FnOnce(&mut LocalConfig),
) -> Pair {
    let db = users_db(users);
    let mut rc = RemoteConfig::new(db.clone());
    rc.listen = "127.0.0.1:0".parse().unwrap();
    rc.user_poll = Duration::from_millis(200);
    // Targets in the tests live on loopback, which the policy refuses by default.
    rc.destinations.allow = LOOPBACK_TARGETS
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    remote_cfg(&mut rc);
    let (remote, state) = flowgate::remote::start_with_state(rc.clone()).unwrap();
    let remote_cfg = RemoteConfig {
        listen: remote.local_addr(),
        ..rc
    };
    let tls = match state.identity() {
        Some(fp) => LocalTls::Pins(vec![fp]),
        None => LocalTls::Plaintext,
    };
    let creds = users.first().map(|u| Credentials {
        user: u.name.to_string(),
        password: u.password.to_string(),
    });
    let mut lc = LocalConfig::new(vec![remote.local_addr().to_string()], creds);
    lc.listen = "127.0.0.1:0".parse().unwrap();
    lc.timeouts = Timeouts::default();
    // Periodic health probes would take a remote's slot now and then, and the admission
    // tests count slots exactly; the tests of health checks use a Fleet instead.
    lc.upstreams.health_interval = Duration::from_secs(3600);
    lc.tls = tls.clone();
    local_cfg(&mut lc);
    let local = flowgate::local::start(lc).unwrap();
    // local-proxy checked its --user credentials at start; the remote frees that slot a
    // moment after answering. Tests that count slots start from none in use.
    assert!(eventually(Duration::from_secs(5), || remote.active() == 0));
    Pair {
        remote,
        remote_cfg,
        state,
        local,
        db,
        tls,
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Connects to `to` from the loopback address `from` (127.0.0.2, say: another client
/// address as the servers see it), with the test I/O timeouts.
pub fn connect_from(from: std::net::Ipv4Addr, to: SocketAddr) -> TcpStream {
    use nix::sys::socket::{self as sock, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    assert!(from.is_loopback(), "tests stay on loopback");
    let SocketAddr::V4(to) = to else {
        panic!("connect_from is for IPv4 listeners")
    };
    let fd = sock::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    let s = TcpStream::from(fd);
    let bind = SockaddrIn::from(std::net::SocketAddrV4::new(from, 0));
    sock::bind(s.as_raw_fd(), &bind).expect("bind the source address");
    sock::connect(s.as_raw_fd(), &SockaddrIn::from(to)).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// A SOCKS5 target as the client sends it.
pub enum Dest<'a> {
    Ip(SocketAddr),
    Host(&'a str, u16),
}

/// Runs a SOCKS5 handshake; returns the stream, or the reply code when it is not success
/// (0xff when no method was acceptable, 0x100 + status when RFC 1929 auth failed).
pub fn socks_connect(
    proxy: SocketAddr,
    dest: Dest<'_>,
    creds: Option<(&str, &str)>,
) -> Result<TcpStream, u16> {
    let mut s = connect(proxy);
    match creds {
        Some(_) => s.write_all(&[5, 1, 2]).unwrap(),
        None => s.write_all(&[5, 1, 0]).unwrap(),
    }
    let mut m = [0u8; 2];
    s.read_exact(&mut m).expect("method reply");
    assert_eq!(m[0], 5);
    if m[1] == 0xff {
        return Err(0xff);
    }
    if let Some((u, p)) = creds {
        assert_eq!(m[1], 2);
        let mut msg = vec![1, u.len() as u8];
        msg.extend_from_slice(u.as_bytes());
        msg.push(p.len() as u8);
        msg.extend_from_slice(p.as_bytes());
        s.write_all(&msg).unwrap();
        let mut st = [0u8; 2];
        s.read_exact(&mut st).expect("auth status");
        if st[1] != 0 {
            return Err(0x100 + st[1] as u16);
        }
    }
    let mut req = vec![5, 1, 0];
    match dest {
        Dest::Ip(SocketAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
        }
        Dest::Ip(SocketAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
        }
        Dest::Host(h, _) => {
            req.push(3);
            req.push(h.len() as u8);
            req.extend_from_slice(h.as_bytes());
        }
    }
    let port = match dest {
        Dest::Ip(a) => a.port(),
        Dest::Host(_, p) => p,
    };
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).unwrap();
    let code = read_socks_reply(&mut s);
    if code != 0 {
        return Err(code as u16);
    }
    Ok(s)
}

/// Reads a whole SOCKS5 reply and returns its REP code.
pub fn read_socks_reply(s: &mut TcpStream) -> u8 {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).expect("socks reply");
    assert_eq!(head[0], 5, "socks version in reply");
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l).unwrap();
            l[0] as usize + 2
        }
        other => panic!("bad atyp {other}"),
    };
    let mut skip = vec![0u8; rest];
    s.read_exact(&mut skip).unwrap();
    head[1]
}

/// A parsed HTTP response head.
#[derive(Debug)]
pub struct Response {
    pub code: u16,
    pub head: String,
    pub content_length: Option<u64>,
}

/// Reads a response head byte by byte (so no body byte is consumed).
pub fn read_response_head(s: &mut TcpStream) -> Response {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut b).expect("response head");
        assert_eq!(
            n,
            1,
            "EOF inside response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let code = head[9..12].parse().unwrap();
    let content_length = head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())
            .flatten()
    });
    Response {
        code,
        head,
        content_length,
    }
}

/// Sends `GET /bytes/n` on an open tunnel and checks every byte of the answer.
pub fn download_and_verify(s: &mut TcpStream, host: &str, n: u64) {
    write!(
        s,
        "GET /bytes/{n} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let r = read_response_head(s);
    assert_eq!(r.code, 200, "{}", r.head);
    assert_eq!(r.content_length, Some(n));
    assert_body_is_pattern(s, n);
}

/// Reads exactly `n` body bytes and checks they are the origin's pattern.
pub fn assert_body_is_pattern(s: &mut TcpStream, n: u64) {
    let mut h = origin::FNV_START;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < n {
        let k = s.read(&mut buf).expect("body read");
        assert!(k > 0, "EOF after {got} of {n} bytes");
        h = origin::fnv1a(h, &buf[..k]);
        got += k as u64;
    }
    assert_eq!(got, n, "body length");
    assert_eq!(h, origin::pattern_hash(n), "body checksum");
}

/// Sends `POST /sink` with `n` pattern bytes and checks the origin saw them all intact.
pub fn upload_and_verify(s: &mut TcpStream, host: &str, n: u64) {
    write!(
        s,
        "POST /sink HTTP/1.1\r\nHost: {host}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    while off < n {
        let k = ((n - off) as usize).min(buf.len());
        origin::fill_pattern(off, &mut buf[..k]);
        s.write_all(&buf[..k]).unwrap();
        off += k as u64;
    }
    let r = read_response_head(s);
    assert_eq!(r.code, 200, "{}", r.head);
    let mut body = vec![0u8; r.content_length.unwrap() as usize];
    s.read_exact(&mut body).unwrap();
    let body = String::from_utf8(body).unwrap();
    assert_eq!(
        body.trim(),
        format!("bytes={n} fnv={:016x}", origin::pattern_hash(n))
    );
}

/// A child process killed on drop, with the stderr lines it wrote so far (when read by
/// [`spawn_listening`]).
pub struct ChildGuard(pub Child, pub std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl ChildGuard {
    /// The log lines so far that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let lines = self.1.lock().unwrap();
        lines
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a binary whose first log line names its listening address; returns it and the
/// address (read from stderr, never guessed by sleeping).
pub fn spawn_listening(mut cmd: Command) -> (ChildGuard, SocketAddr) {
    cmd.stderr(Stdio::piped()).stdout(Stdio::null());
    cmd.env("RUST_LOG", "info");
    let mut child = cmd.spawn().expect("spawn binary");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = log.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            keep.lock().unwrap().push(line.clone());
            if !sent {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        }
    });
    let guard = ChildGuard(child, log);
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("binary did not report its address");
    (guard, addr.parse().unwrap())
}

/// The TLS identity of remote-proxies on database `db` (kept beside it), as
/// `remote-proxy identity` prints it: what local-proxy is given as `--pin`.
pub fn identity(db: &std::path::Path) -> String {
    remote_user_ok(db, &["identity"]).trim().to_string()
}

/// Runs `remote-proxy --db DB ARGS...`; returns (success, stdout, stderr).
pub fn remote_user(db: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = remote_bin()
        .arg("--db")
        .arg(db)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run remote-proxy");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `remote-proxy --db DB user add NAME --bandwidth BW --password PW`, through the binary.
pub fn cli_user_add(db: &std::path::Path, name: &str, password: &str, bandwidth: &str) {
    remote_user_ok(
        db,
        &[
            "user",
            "add",
            name,
            "--bandwidth",
            bandwidth,
            "--password",
            password,
        ],
    );
}

/// Like [`remote_user`], failing the test when the command fails.
pub fn remote_user_ok(db: &std::path::Path, args: &[&str]) -> String {
    let (ok, out, err) = remote_user(db, args);
    assert!(ok, "remote-proxy {args:?}: {err}");
    out
}

/// The ranges tests open for their targets (origins, holders, sinks on loopback).
pub const LOOPBACK_TARGETS: [&str; 2] = ["127.0.0.1/32", "::1/128"];

/// remote-proxy's flags opening [`LOOPBACK_TARGETS`].
pub fn allow_loopback() -> Vec<String> {
    LOOPBACK_TARGETS
        .iter()
        .flat_map(|c| ["--allow-dest".to_string(), c.to_string()])
        .collect()
}

pub fn remote_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_remote-proxy"))
}

/// local-proxy, with a known-remotes file of its own (never the user's real one).
pub fn local_bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_local-proxy"));
    cmd.env("FLOWGATE_KNOWN_REMOTES", temp_dir().join("known_remotes"));
    cmd
}

/// local-proxy's flags for the hop `tls` describes: `--pin` for each pin, or `--plaintext`.
pub fn hop_args(tls: &LocalTls) -> Vec<String> {
    match tls {
        LocalTls::Pins(pins) => pins
            .iter()
            .flat_map(|p| ["--pin".to_string(), p.to_string()])
            .collect(),
        LocalTls::Plaintext => vec!["--plaintext".into()],
        other => panic!("tests pin or go plaintext, not {other:?}"),
    }
}

/// A raw TCP target that streams the pattern to every client until it hangs up.
pub fn source_target() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                origin::fill_pattern(0, &mut buf);
                while c.write_all(&buf).is_ok() {}
            });
        }
    });
    a
}

/// A raw TCP target that reads and counts everything sent to it into `counter`.
pub fn sink_target(counter: std::sync::Arc<std::sync::atomic::AtomicU64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    a
}

/// Sends one tunnel request straight to remote-proxy and returns the reply.
pub fn tunnel_reply(
    p: &Pair,
    user: &str,
    pw: &str,
    target: flowgate::proto::addr::TargetAddr,
) -> flowgate::proto::tunnel::Reply {
    tunnel_reply_at(p.remote_addr(), &p.tls, user, pw, target)
}

/// As [`tunnel_reply`], from what a thread can carry: the remote's address and hop.
pub fn tunnel_reply_at(
    remote: SocketAddr,
    tls: &LocalTls,
    user: &str,
    pw: &str,
    target: flowgate::proto::addr::TargetAddr,
) -> flowgate::proto::tunnel::Reply {
    tunnel_reply_on(RawHop::connect(remote, tls), user, pw, target)
}

/// Sends one tunnel request on `s` and returns the reply.
pub fn tunnel_reply_on(
    mut s: RawHop,
    user: &str,
    pw: &str,
    target: flowgate::proto::addr::TargetAddr,
) -> flowgate::proto::tunnel::Reply {
    use flowgate::proto::tunnel;
    tunnel::write_request(&mut s, &connect_request(user, pw, target)).unwrap();
    tunnel::read_reply(&mut s).unwrap()
}

/// A tunnel `CONNECT` request as local-proxy sends it.
pub fn connect_request(
    user: &str,
    pw: &str,
    target: flowgate::proto::addr::TargetAddr,
) -> flowgate::proto::tunnel::Request {
    use flowgate::proto::tunnel;
    tunnel::Request {
        tunnel_id: Some(tunnel::TunnelId(1)),
        command: tunnel::Command::Connect,
        user: user.into(),
        password: pw.into(),
        target: Some(target),
        invite: None,
    }
}

/// Like [`tunnel_reply`], just the status.
pub fn tunnel_status(
    p: &Pair,
    user: &str,
    pw: &str,
    target: flowgate::proto::addr::TargetAddr,
) -> flowgate::proto::tunnel::Status {
    tunnel_reply(p, user, pw, target).status
}

/// A raw TCP target that holds each connection open until the client closes its side, and
/// counts the connections it accepted.
pub fn hold_target(accepted: std::sync::Arc<AtomicUsize>) -> SocketAddr {
    hold_target_counting(accepted, Default::default())
}

/// As [`hold_target`], also counting the connections whose client closed (`closed`).
pub fn hold_target_counting(
    accepted: std::sync::Arc<AtomicUsize>,
    closed: std::sync::Arc<AtomicUsize>,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            accepted.fetch_add(1, Ordering::SeqCst);
            let closed = closed.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    a
}

/// Both real binaries, remote-proxy with user `alice`/`pw` (unlimited), local-proxy using
/// that account, each started with `extra` flags. Killed when dropped.
pub struct BinaryPair {
    pub remote: ChildGuard,
    pub remote_addr: SocketAddr,
    pub local: ChildGuard,
    pub local_addr: SocketAddr,
    pub db: PathBuf,
}

pub fn binary_pair(extra: &[&str]) -> BinaryPair {
    binary_pair_with_policy(&allow_loopback(), extra)
}

/// As [`binary_pair`], remote-proxy with `policy` (its own flags: destination ranges and
/// anything local-proxy does not take) instead of the loopback ranges the other tests open.
pub fn binary_pair_with_policy(policy: &[String], extra: &[&str]) -> BinaryPair {
    let db = temp_dir().join("u.db");
    cli_user_add(&db, "alice", "pw", "unlimited");
    let mut rcmd = remote_bin();
    rcmd.arg("--db")
        .arg(&db)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(policy)
        .args(extra);
    let (remote, remote_addr) = spawn_listening(rcmd);
    let mut lcmd = local_bin();
    lcmd.args([
        "--listen",
        "127.0.0.1:0",
        "--remote",
        &remote_addr.to_string(),
    ])
    .args(["--user", "alice"])
    .args(extra)
    .env("FLOWGATE_PASSWORD", "pw");
    if !extra.contains(&"--plaintext") {
        lcmd.args(["--pin", &identity(&db)]);
    }
    let (local, local_addr) = spawn_listening(lcmd);
    BinaryPair {
        remote,
        remote_addr,
        local,
        local_addr,
        db,
    }
}

/// Threads of process `pid` now (from /proc/PID/status).
pub fn thread_count(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads: line")
}

/// The names of process `pid`'s threads, counted, for failure messages.
pub fn thread_names(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut names = std::collections::BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            *names.entry(name.trim().to_string()).or_insert(0) += 1;
        }
    }
    names
}

/// Open descriptors of process `pid` that are pipes.
pub fn pipe_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy().starts_with("pipe:"))
                .unwrap_or(false)
        })
        .count()
}

/// Waits until `cond` holds, checking every 50 ms for at most `within`; true if it did.
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A raw TCP target that answers each chunk it reads with `reply`, and holds the connection
/// open until the client closes it.
pub fn reply_target(reply: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {
                    if c.write_all(reply).is_err() {
                        break;
                    }
                }
            });
        }
    });
    a
}

/// Asserts the server closes `s` (a FIN or a reset) within `within` without sending another
/// byte. A read that times out fails: a server that never closes must not pass.
pub fn assert_closed_quietly(s: &mut impl Deadline, within: Duration) {
    s.read_within(within);
    let t = std::time::Instant::now();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed within {within:?} ({e}); got {rest:?}"),
    }
    assert!(rest.is_empty(), "bytes before the close: {rest:?}");
    assert!(t.elapsed() < within, "closed after {:?}", t.elapsed());
}

/// A connection whose reads can be given a time limit.
pub trait Deadline: Read {
    fn read_within(&mut self, within: Duration);
}

impl Deadline for TcpStream {
    fn read_within(&mut self, within: Duration) {
        self.set_read_timeout(Some(within)).unwrap();
    }
}

impl Deadline for RawHop {
    fn read_within(&mut self, within: Duration) {
        self.1 = within;
    }
}

/// Sends a health probe straight to remote-proxy; the reply status, or the read error.
pub fn health_probe(
    remote: SocketAddr,
    tls: &LocalTls,
) -> std::io::Result<flowgate::proto::tunnel::Status> {
    use flowgate::proto::tunnel;
    let trust = tls.trust().unwrap();
    let link = Link::to(&remote.to_string(), trust.as_ref()).unwrap();
    if let Link::Tls(_) = link {
        use flowgate::local::upstreams::connect;
        return connect::probe(&[remote], &link, Duration::from_secs(3))
            .map_err(|e| std::io::Error::other(e.to_string()));
    }
    let mut s = connect(remote);
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    tunnel::write_request(&mut s, &tunnel::Request::health(None)).map_err(|e| match e {
        tunnel::Error::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    })?;
    tunnel::read_reply(&mut s)
        .map(|r| r.status)
        .map_err(|e| match e {
            tunnel::Error::Io(e) => e,
            other => std::io::Error::other(other.to_string()),
        })
}

/// Several remote-proxy binaries on one database, and local-proxy binaries over them all.
pub struct Fleet {
    pub remotes: Vec<Option<ChildGuard>>,
    pub addrs: Vec<SocketAddr>,
    pub db: PathBuf,
    // The local-proxies started over the fleet; killed with it.
    pub locals: Vec<ChildGuard>,
}

impl Fleet {
    /// `n` remotes with `users` (password `pw`) in their shared database.
    pub fn start(n: usize, users: &[&str]) -> Fleet {
        let db = temp_dir().join("users.db");
        for u in users {
            remote_user_ok(
                &db,
                &[
                    "user",
                    "add",
                    u,
                    "--bandwidth",
                    "unlimited",
                    "--password",
                    "pw",
                ],
            );
        }
        let mut fleet = Fleet {
            remotes: Vec::new(),
            addrs: Vec::new(),
            db,
            locals: Vec::new(),
        };
        for _ in 0..n {
            let (child, addr) = fleet.spawn_remote("127.0.0.1:0");
            fleet.addrs.push(addr);
            fleet.remotes.push(Some(child));
        }
        fleet
    }

    fn spawn_remote(&self, listen: &str) -> (ChildGuard, SocketAddr) {
        let mut cmd = remote_bin();
        cmd.arg("--db")
            .arg(&self.db)
            .args(["serve", "--listen", listen, "--failed-login-rate", "off"])
            .args(allow_loopback());
        spawn_listening(cmd)
    }

    /// A local-proxy binary over every remote (fast health checks), with `extra` flags;
    /// returns its address. It lives as long as the fleet.
    pub fn local(&mut self, extra: &[&str]) -> SocketAddr {
        let mut cmd = local_bin();
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(["--health-interval", "200ms", "--health-timeout", "500ms"])
            .args(["--pin", &identity(&self.db)])
            .args(extra);
        for a in &self.addrs {
            cmd.args(["--remote", &a.to_string()]);
        }
        let (child, addr) = spawn_listening(cmd);
        self.locals.push(child);
        addr
    }

    /// Tunnels open on each remote now, from its log (opened minus closed); a killed
    /// remote counts 0.
    pub fn open_tunnels(&self) -> Vec<usize> {
        self.remotes
            .iter()
            .map(|r| {
                r.as_ref().map_or(0, |c| {
                    let opened = c.log_lines(" open user=").len();
                    let closed = c.log_lines(" close user=").len();
                    opened.saturating_sub(closed)
                })
            })
            .collect()
    }

    /// Kills remote `i` with SIGKILL: its tunnels die with it, new connections are refused.
    pub fn kill(&mut self, i: usize) {
        self.remotes[i] = None; // ChildGuard kills and reaps it
    }

    /// Starts remote `i` again on its old address.
    pub fn restart(&mut self, i: usize) {
        let (child, _) = self.spawn_remote(&self.addrs[i].to_string());
        self.remotes[i] = Some(child);
    }
}

/// Waits until `counts()` sums to `n`, for at most 5 s; returns the counts.
pub fn settle(n: usize, mut counts: impl FnMut() -> Vec<usize>) -> Vec<usize> {
    let mut last = counts();
    eventually(Duration::from_secs(5), || {
        last = counts();
        last.iter().sum::<usize>() == n
    });
    last
}

/// One read of a running download, retried when a signal interrupts it (the tests send
/// signals to child processes, and a read in flight may see EINTR).
pub fn read_some(s: &mut TcpStream, buf: &mut [u8]) -> u64 {
    loop {
        match s.read(buf) {
            Ok(n) => return n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("download read failed: {e}"),
        }
    }
}
