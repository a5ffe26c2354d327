//! End-to-end benchmark: starts the release binaries, drives load from this process, and
//! reports throughput, rate accuracy, fairness, setup rate, scale and CPU, each beside the
//! same figure measured directly against the origin in the same run.
//!
//! Run through `scripts/bench.sh` (it builds in release and raises the open-file limit).
//! Writes `bench-out/results.md`, `bench-out/results.json` and `bench-out/accuracy.svg`.
//! `--quick` shortens every phase (for a smoke run); `--only NAME[,NAME]` picks phases
//! (throughput, curl, accuracy, fairness, setup, scale); `--no-reference` skips the HAProxy
//! rows (measured when `haproxy` is installed). Every flowgate figure is taken twice: with
//! TLS between the hops (the default) and with `--plaintext`.

// The origin lives with the test support (it is not part of the library); its unit tests run
// with the integration tests, not here.
#[path = "../tests/it/support/origin.rs"]
#[allow(dead_code, unused_imports)]
mod origin;

use origin::Origin;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "e2e/slowlink.rs"]
mod slowlink;

const GIB: u64 = 1 << 30;
const SLOT: Duration = Duration::from_millis(100);

struct Opts {
    quick: bool,
    // Measure HAProxy beside flowgate when it is installed (`--no-reference` skips it).
    reference: bool,
    only: Option<Vec<String>>,
    out: PathBuf,
    bin: PathBuf,
}

impl Opts {
    fn wants(&self, phase: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == phase))
    }
}

/// A spawned proxy, killed on drop.
struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn spawn(mut cmd: Command) -> Proc {
    cmd.stderr(Stdio::piped()).stdout(Stdio::null()).env(
        "RUST_LOG",
        "warn,flowgate::local=info,flowgate::remote=info",
    );
    let mut child = cmd.spawn().expect("spawn proxy");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !sent {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                    sent = true;
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("proxy did not report its address");
    Proc {
        child,
        addr: addr.parse().expect("address"),
    }
}

/// Workers stay for the whole run: per-thread context-switch counts vanish with a thread
/// that exits, so the setup figures need the threads that did the work still there.
const WORKER_ARGS: [&str; 2] = ["--worker-idle-timeout", "1h"];

struct Setup {
    remote: Proc,
    local: Proc,
    db: PathBuf,
    bin: PathBuf,
}

impl Setup {
    /// A pair on its own database; `tls` false runs both with `--plaintext`.
    fn start(opts: &Opts, tls: bool) -> Setup {
        let dir = std::env::temp_dir().join(format!(
            "flowgate-bench-{}-{}",
            std::process::id(),
            if tls { "tls" } else { "plain" }
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("bench.db");
        let s = |name: &str| opts.bin.join(name);
        let mut r = Command::new(s("remote-proxy"));
        r.arg("--db")
            .arg(&db)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--max-connections",
                "20000",
                "--max-queued",
                "20000",
                "--failed-login-rate",
                "off",
                // The origin and targets live on loopback.
                "--allow-dest",
                "127.0.0.1/32",
            ])
            .args(WORKER_ARGS);
        let hop: Vec<String> = if tls {
            let out = Command::new(s("remote-proxy"))
                .arg("--db")
                .arg(&db)
                .arg("identity")
                .output()
                .expect("remote-proxy identity");
            let pin = String::from_utf8_lossy(&out.stdout).trim().to_string();
            vec!["--pin".into(), pin]
        } else {
            r.arg("--plaintext");
            vec!["--plaintext".into()]
        };
        let remote = spawn(r);
        let mut l = Command::new(s("local-proxy"));
        l.args([
            "--listen",
            "127.0.0.1:0",
            "--remote",
            &remote.addr.to_string(),
        ])
        .args(["--max-connections", "20000", "--max-queued", "20000"])
        .args(&hop)
        .args(WORKER_ARGS);
        // FLOWGATE_BENCH_WARM=N runs the pairs' local-proxies with `--warm N` (A/B of the
        // warm pool on loopback); unset, local-proxy's default.
        if let Ok(n) = std::env::var("FLOWGATE_BENCH_WARM") {
            l.args(["--warm", &n]);
        }
        let local = spawn(l);
        let setup = Setup {
            remote,
            local,
            db,
            bin: opts.bin.clone(),
        };
        setup.add_user("unlimited", "unlimited");
        setup
    }

    fn add_user(&self, name: &str, rate: &str) {
        let st = Command::new(self.bin.join("remote-proxy"))
            .arg("--db")
            .arg(&self.db)
            .args(["user", "add", name, "--bandwidth", rate, "--password", "pw"])
            .stdout(Stdio::null())
            .status()
            .expect("user add");
        assert!(st.success(), "user add {name}");
    }
}

/// HAProxy as a two-hop TCP relay to the origin (two processes, like local-proxy and
/// remote-proxy, in stock threading), measured beside flowgate on the same client, origin and
/// machine: the peer figures in the issue came from such a setup, and absolute numbers swing
/// too much between runs and machines to compare with a figure taken elsewhere.
struct Reference {
    hops: Vec<Child>,
    entry: SocketAddr,
    dir: PathBuf,
}

impl Drop for Reference {
    fn drop(&mut self) {
        for c in &mut self.hops {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Reference {
    /// Starts the two hops, or `None` (with a note) when haproxy is not installed.
    fn start(origin: SocketAddr) -> Option<Reference> {
        let ok = Command::new("haproxy")
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("haproxy not installed: reference rows skipped");
            return None;
        }
        let free = || {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
        };
        let (entry, middle) = (free(), free());
        let dir = std::env::temp_dir().join(format!("flowgate-haproxy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let mut hops = vec![];
        for (i, (from, to)) in [(middle, origin), (entry, middle)].into_iter().enumerate() {
            let cfg = format!(
                "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 10s\n  \
                 timeout client 600s\n  timeout server 600s\nlisten hop\n  bind {from}\n  \
                 server next {to}\n"
            );
            let path = dir.join(format!("hop{i}.cfg"));
            std::fs::write(&path, cfg).ok()?;
            let child = Command::new("haproxy")
                .arg("-f")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            hops.push(child);
        }
        let r = Reference { hops, entry, dir };
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(middle).is_err() || TcpStream::connect(entry).is_err() {
            if Instant::now() > until {
                eprintln!("haproxy did not start: reference rows skipped");
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(r)
    }
}

/// Reads a /proc file. A figure computed from a file that could not be read would be a
/// made-up 0, so failing is the honest answer; the panic unwinds through `main`, and the
/// proxies it started are killed as their handles drop.
fn proc_read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Field `i` of a whitespace-separated line, as a number, or a panic naming the source.
fn proc_field<T: std::str::FromStr>(fields: &[&str], i: usize, what: &str) -> T {
    fields
        .get(i)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse field {i} of {what}"))
}

/// /proc/PID/stat utime+stime in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let path = format!("/proc/{pid}/stat");
    let stat = proc_read(&path);
    let after = stat
        .rsplit_once(')')
        .map(|(_, a)| a)
        .unwrap_or_else(|| panic!("cannot parse {path}"));
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = proc_field::<f64>(&f, 11, &path) + proc_field::<f64>(&f, 12, &path);
    ticks / 100.0
}

/// (busy, total) jiffies of the whole machine from /proc/stat: a run that leaves the cores
/// idle is waiting on something (wake-ups, windows), not out of CPU.
fn machine_ticks() -> (u64, u64) {
    let stat = proc_read("/proc/stat");
    let f: Vec<&str> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .collect();
    let v: Vec<u64> = (0..f.len())
        .map(|i| proc_field(&f, i, "/proc/stat"))
        .collect();
    let total: u64 = v.iter().sum();
    // idle and iowait
    let idle: u64 = proc_field::<u64>(&f, 3, "/proc/stat") + proc_field::<u64>(&f, 4, "/proc/stat");
    (total - idle, total)
}

/// Context switches of all of a process's threads so far. Threads that exited are not
/// counted, so the proxies run with a long --worker-idle-timeout (see `Setup::start`).
/// A thread that exits while being read is skipped; its count would be gone anyway.
fn ctx_switches(pid: u32) -> u64 {
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {dir}: {e}"));
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    proc_field::<u64>(&f, 1, "a task's ctxt_switches")
                })
                .sum::<u64>()
        })
        .sum()
}

/// (resident KiB, threads) from /proc/PID/status.
fn rss_threads(pid: u32) -> (u64, u64) {
    let path = format!("/proc/{pid}/status");
    let s = proc_read(&path);
    let get = |k: &str| {
        let line = s
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap_or_else(|| panic!("no {k} in {path}"));
        let f: Vec<&str> = line.split_whitespace().collect();
        proc_field::<u64>(&f, 1, &path)
    };
    (get("VmRSS:"), get("Threads:"))
}

/// Open pipe descriptors of process `pid`.
fn pipe_fds(pid: u32) -> usize {
    let dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {dir}: {e}"))
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("pipe:"))
        })
        .count()
}

/// This process's soft open-file limit (the proxies raise theirs to the same hard limit).
fn fd_limit() -> String {
    proc_read("/proc/self/limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or("?")
        .to_string()
}

/// Where a client connects: straight to the origin, or through local-proxy as a user.
#[derive(Clone)]
enum Via {
    Direct,
    Proxy(SocketAddr, String),
    /// A fixed-target TCP relay (the HAProxy reference): connect here instead of the target.
    Relay(SocketAddr),
}

fn open(via: &Via, target: SocketAddr) -> std::io::Result<TcpStream> {
    match via {
        Via::Direct | Via::Relay(_) => {
            let to = match via {
                Via::Relay(a) => *a,
                _ => target,
            };
            let s = TcpStream::connect(to)?;
            s.set_nodelay(true)?;
            Ok(s)
        }
        Via::Proxy(local, user) => {
            let mut s = TcpStream::connect(local)?;
            s.set_nodelay(true)?;
            let mut req = vec![5u8, 1, 2, 1, user.len() as u8];
            req.extend_from_slice(user.as_bytes());
            req.extend_from_slice(&[2, b'p', b'w', 5, 1, 0]);
            match target {
                SocketAddr::V4(a) => {
                    req.push(1);
                    req.extend_from_slice(&a.ip().octets());
                }
                SocketAddr::V6(a) => {
                    req.push(4);
                    req.extend_from_slice(&a.ip().octets());
                }
            }
            req.extend_from_slice(&target.port().to_be_bytes());
            // Greeting, credentials and request in one write: the proxy reads them in order.
            s.write_all(&req)?;
            let mut resp = [0u8; 2 + 2 + 10];
            s.read_exact(&mut resp)?;
            if resp[1] != 2 || resp[3] != 0 || resp[5] != 0 {
                return Err(std::io::Error::other(format!("socks refused: {resp:?}")));
            }
            Ok(s)
        }
    }
}

/// Sends GET /bytes/n and reads the response head; returns how many body bytes came with it.
fn get(s: &mut TcpStream, n: u64) -> std::io::Result<u64> {
    let req = format!("GET /bytes/{n} HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    loop {
        let k = s.read(&mut buf[len..])?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        len += k;
        if let Some(end) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok((len - end - 4) as u64);
        }
        if len == buf.len() {
            return Err(std::io::Error::other("response head too long"));
        }
    }
}

/// Reads the rest of an `n`-byte body of which `got` bytes came with the head.
fn drain(s: &mut TcpStream, n: u64, mut got: u64) -> std::io::Result<u64> {
    // Sized to what is left (plus one byte to see the close) so small requests do not map
    // and unmap a large buffer each time.
    let mut buf = vec![0u8; (n.saturating_sub(got) as usize + 1).min(256 * 1024)];
    while got < n {
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        got += k as u64;
    }
    Ok(got)
}

/// Downloads `per_stream` bytes on each of `streams` connections at once; returns MB/s.
fn download(via: &Via, origin: SocketAddr, streams: usize, per_stream: u64) -> f64 {
    let t = Instant::now();
    let hs: Vec<_> = (0..streams)
        .map(|_| {
            let via = via.clone();
            std::thread::spawn(move || {
                let mut s = open(&via, origin).expect("open");
                let got = get(&mut s, per_stream).expect("get");
                drain(&mut s, per_stream, got).expect("drain")
            })
        })
        .collect();
    let total: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(total, per_stream * streams as u64, "short download");
    total as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// Uploads `n` bytes to /discard on one connection; returns MB/s.
fn upload(via: &Via, origin: SocketAddr, n: u64) -> f64 {
    let mut s = open(via, origin).expect("open");
    let t = Instant::now();
    write!(
        s,
        "POST /discard HTTP/1.1\r\nHost: o\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let buf = vec![7u8; 256 * 1024];
    let mut left = n;
    while left > 0 {
        let k = (left as usize).min(buf.len());
        s.write_all(&buf[..k]).unwrap();
        left -= k as u64;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(
        resp.contains(&format!("bytes={n}")),
        "upload answer {resp:?}"
    );
    n as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// A named benchmark phase.
type Phase<'a> = (&'a str, &'a dyn Fn(&mut Report));

struct Report {
    md: String,
    json: BTreeMap<String, String>,
}

impl Report {
    fn num(&mut self, key: &str, v: f64) {
        self.json.insert(key.to_string(), format!("{v:.4}"));
    }
}

/// Medians of three rounds in which each of `runs` runs once in turn: throughput on a shared
/// 2-core machine swings by 2x between runs, so single runs do not compare.
fn alternate(runs: &mut [&mut dyn FnMut() -> f64]) -> Vec<f64> {
    let mut got = vec![vec![]; runs.len()];
    for _ in 0..3 {
        for (i, run) in runs.iter_mut().enumerate() {
            got[i].push(run());
        }
    }
    got.into_iter()
        .map(|mut v| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[1]
        })
        .collect()
}

fn throughput(
    opts: &Opts,
    pairs: &[(&str, &Setup); 2],
    reference: Option<&Reference>,
    origin: SocketAddr,
    rep: &mut Report,
) {
    let size = if opts.quick { GIB / 4 } else { GIB };
    let relay = reference.map(|r| Via::Relay(r.entry));
    // Per mode: (local, remote) CPU seconds and bytes relayed.
    let cpu = std::cell::RefCell::new([(0.0f64, 0.0f64, 0u64); 2]);
    // Machine busy/total ticks during the proxied runs of the current kind.
    let ticks = std::cell::Cell::new((0u64, 0u64));
    let measure = |m: usize, f: &dyn Fn() -> f64| {
        let st = pairs[m].1;
        let c0 = (cpu_secs(st.local.pid()), cpu_secs(st.remote.pid()));
        let m0 = machine_ticks();
        let r = f();
        let m1 = machine_ticks();
        let mut c = cpu.borrow_mut();
        c[m].0 += cpu_secs(st.local.pid()) - c0.0;
        c[m].1 += cpu_secs(st.remote.pid()) - c0.1;
        c[m].2 += size;
        if m == 0 {
            let t = ticks.get();
            ticks.set((t.0 + m1.0 - m0.0, t.1 + m1.1 - m0.1));
        }
        r
    };
    type Run<'a> = Box<dyn Fn(&Via) -> f64 + 'a>;
    let kinds: [(&str, Run); 3] = [
        (
            "download, 1 stream",
            Box::new(|v: &Via| download(v, origin, 1, size)),
        ),
        (
            "download, 8 streams",
            Box::new(|v: &Via| download(v, origin, 8, size / 8)),
        ),
        (
            "upload, 1 stream",
            Box::new(|v: &Via| upload(v, origin, size)),
        ),
    ];
    let vias: Vec<Via> = pairs
        .iter()
        .map(|(_, st)| Via::Proxy(st.local.addr, "unlimited".into()))
        .collect();
    let mut rows = vec![];
    for (name, run) in &kinds {
        let mut direct = || run(&Via::Direct);
        let mut tls = || measure(0, &|| run(&vias[0]));
        let mut plain = || measure(1, &|| run(&vias[1]));
        let mut peer = || relay.as_ref().map_or(0.0, run);
        let mut runs: Vec<&mut dyn FnMut() -> f64> = vec![&mut direct, &mut tls, &mut plain];
        if relay.is_some() {
            runs.push(&mut peer);
        }
        let m = alternate(&mut runs);
        let (busy, total) = ticks.replace((0, 0));
        let busy = busy as f64 / total.max(1) as f64;
        rows.push((*name, m[0], m[1], m[2], m.get(3).copied(), busy));
    }
    let _ = writeln!(
        rep.md,
        "\n## 1. Throughput, unlimited user ({} MiB per run, median of 3 alternating runs)\n",
        size >> 20
    );
    let _ = writeln!(
        rep.md,
        "| run | direct MB/s | flowgate TLS MB/s | ratio | cores busy (TLS runs) | flowgate plaintext MB/s | ratio | haproxy 2-hop MB/s | ratio |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (name, d, t, p, h, busy) in rows {
        let peer = h.map_or("- | -".to_string(), |h| format!("{h:.0} | {:.2}", h / d));
        let _ = writeln!(
            rep.md,
            "| {name} | {d:.0} | {t:.0} | {:.2} | {:.0}% | {p:.0} | {:.2} | {peer} |",
            t / d,
            busy * 100.0,
            p / d
        );
        let key = name.replace([',', ' '], "_").replace("__", "_");
        rep.num(&format!("throughput.{key}.direct_mbps"), d);
        rep.num(&format!("throughput.{key}.tls_mbps"), t);
        rep.num(&format!("throughput.{key}.tls_ratio"), t / d);
        rep.num(&format!("throughput.{key}.plaintext_mbps"), p);
        rep.num(&format!("throughput.{key}.plaintext_ratio"), p / d);
        rep.num(&format!("throughput.{key}.machine_busy"), busy);
        if let Some(h) = h {
            rep.num(&format!("throughput.{key}.haproxy_mbps"), h);
            rep.num(&format!("throughput.{key}.haproxy_ratio"), h / d);
        }
    }
    let _ = writeln!(rep.md, "\n## 6. CPU seconds per GiB relayed (during the throughput runs)\n\n| process | TLS CPU s/GiB | plaintext CPU s/GiB |\n|---|---|---|");
    let c = cpu.borrow();
    let per = |m: usize| {
        let gib = c[m].2 as f64 / GIB as f64;
        (c[m].0 / gib, c[m].1 / gib)
    };
    let (tls, plain) = (per(0), per(1));
    let _ = writeln!(
        rep.md,
        "| local-proxy | {:.2} | {:.2} |\n| remote-proxy | {:.2} | {:.2} |",
        tls.0, plain.0, tls.1, plain.1
    );
    rep.num("cpu.tls.local_s_per_gib", tls.0);
    rep.num("cpu.tls.remote_s_per_gib", tls.1);
    rep.num("cpu.plaintext.local_s_per_gib", plain.0);
    rep.num("cpu.plaintext.remote_s_per_gib", plain.1);
}

/// Child processes of an external setup (nginx, shadowsocks-libev), killed on drop, and
/// the directory that holds their files.
struct External {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for External {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn installed(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// Waits until something accepts on `addr`.
fn wait_listening(addr: SocketAddr, what: &str) {
    let until = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < until, "{what} did not start on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One `curl` download of `url` to /dev/null, optionally through a SOCKS5 proxy with
/// credentials; curl's own average speed in MB/s.
fn curl_speed(url: &str, socks: Option<(SocketAddr, &str)>) -> f64 {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{speed_download}"]);
    if let Some((addr, creds)) = socks {
        cmd.args(["--socks5-hostname", &addr.to_string()]);
        if !creds.is_empty() {
            cmd.args(["--proxy-user", creds]);
        }
    }
    let out = cmd.arg(url).output().expect("run curl");
    assert!(out.status.success(), "curl {url} failed");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .expect("curl speed")
        / 1e6
}

/// Like with like: nginx serving a file, curl downloading it in one stream, straight, through
/// flowgate with TLS and with `--plaintext`, and through shadowsocks-libev (`aes-256-gcm`,
/// ss-local + ss-server: the usual encrypted two-hop proxy) when it is installed.
fn curl_nginx(opts: &Opts, pairs: &[(&str, &Setup); 2], rep: &mut Report) {
    if !installed("nginx") || !installed("curl") {
        let _ = writeln!(
            rep.md,
            "\n## 1b. nginx + curl: skipped (nginx or curl not installed)"
        );
        return;
    }
    let size = if opts.quick { GIB / 4 } else { GIB };
    let dir = std::env::temp_dir().join(format!("flowgate-nginx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("www")).unwrap();
    // A sparse file: served from the page cache, so the disk plays no part.
    let file = std::fs::File::create(dir.join("www").join("big")).unwrap();
    file.set_len(size).unwrap();
    let web = free_port();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 1024; }}\nhttp {{ access_log off; sendfile on;\n\
         client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;\n\
         uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n\
         server {{ listen {web}; root {d}/www; }} }}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let mut ext = External {
        children: vec![],
        dir: dir.clone(),
    };
    ext.children.push(
        Command::new("nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx"),
    );
    wait_listening(web, "nginx");
    let ss = installed("ss-server") && installed("ss-local");
    let ss_local = free_port();
    if ss {
        let server = free_port();
        let common = |c: &mut Command| {
            c.args(["-k", "bench-password", "-m", "aes-256-gcm"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        };
        let mut srv = Command::new("ss-server");
        srv.args(["-s", "127.0.0.1", "-p", &server.port().to_string()]);
        common(&mut srv);
        ext.children.push(srv.spawn().expect("start ss-server"));
        let mut loc = Command::new("ss-local");
        loc.args(["-s", "127.0.0.1", "-p", &server.port().to_string()])
            .args(["-b", "127.0.0.1", "-l", &ss_local.port().to_string()]);
        common(&mut loc);
        ext.children.push(loc.spawn().expect("start ss-local"));
        wait_listening(server, "ss-server");
        wait_listening(ss_local, "ss-local");
    }
    let url = format!("http://{web}/big");
    let rounds = if opts.quick { 3 } else { 7 };
    // Once untimed: the first read of the file fills the page cache.
    curl_speed(&url, None);
    let cpu = std::cell::RefCell::new([(0.0f64, 0.0f64); 2]);
    let via_pair = |m: usize| {
        let st = pairs[m].1;
        let c0 = (cpu_secs(st.local.pid()), cpu_secs(st.remote.pid()));
        let r = curl_speed(&url, Some((st.local.addr, "unlimited:pw")));
        let mut c = cpu.borrow_mut();
        c[m].0 += cpu_secs(st.local.pid()) - c0.0;
        c[m].1 += cpu_secs(st.remote.pid()) - c0.1;
        r
    };
    let mut got: Vec<Vec<f64>> = vec![vec![]; 4];
    for _ in 0..rounds {
        got[0].push(curl_speed(&url, None));
        got[1].push(via_pair(0));
        got[2].push(via_pair(1));
        if ss {
            got[3].push(curl_speed(&url, Some((ss_local, ""))));
        }
    }
    // Ratios per round (each against the direct run beside it), then their median: the
    // machine's speed drifts between rounds more than it differs within one.
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let ratio = |i: usize| {
        median(
            got[i]
                .iter()
                .zip(&got[0])
                .map(|(x, d)| x / d)
                .collect::<Vec<_>>(),
        )
    };
    let _ = writeln!(rep.md, "\n## 1b. nginx origin, curl client: one stream of {} MiB ({rounds} alternating rounds; median MB/s, median of per-round ratios)\n\n| path | MB/s | ratio to direct |\n|---|---|---|", size >> 20);
    let names = [
        "direct",
        "flowgate TLS",
        "flowgate plaintext",
        "shadowsocks-libev aes-256-gcm (2 hops)",
    ];
    for (i, name) in names.iter().enumerate() {
        if got[i].is_empty() {
            let _ = writeln!(rep.md, "| {name} | not installed | - |");
            continue;
        }
        let (mbps, r) = (median(got[i].clone()), ratio(i));
        let _ = writeln!(rep.md, "| {name} | {mbps:.0} | {r:.2} |");
        let key = ["direct", "tls", "plaintext", "shadowsocks"][i];
        rep.num(&format!("curl.{key}.mbps"), mbps);
        rep.num(&format!("curl.{key}.ratio"), r);
    }
    if ss {
        let vs = ratio(1) / ratio(3).max(1e-9);
        let _ = writeln!(
            rep.md,
            "\nflowgate TLS reads {vs:.2}x shadowsocks-libev's ratio."
        );
        rep.num("curl.tls_vs_shadowsocks", vs);
    }
    let c = cpu.borrow();
    let gib = (rounds as u64 * size) as f64 / GIB as f64;
    let _ = writeln!(rep.md, "\n| process | TLS CPU s/GiB | plaintext CPU s/GiB |\n|---|---|---|\n| local-proxy | {:.2} | {:.2} |\n| remote-proxy | {:.2} | {:.2} |", c[0].0 / gib, c[1].0 / gib, c[0].1 / gib, c[1].1 / gib);
    rep.num("curl.cpu.tls.local_s_per_gib", c[0].0 / gib);
    rep.num("curl.cpu.tls.remote_s_per_gib", c[0].1 / gib);
    rep.num("curl.cpu.plaintext.local_s_per_gib", c[1].0 / gib);
    rep.num("curl.cpu.plaintext.remote_s_per_gib", c[1].1 / gib);
    drop(ext);
}

/// Per-connection bytes in 100 ms slots.
struct Series {
    slots: Vec<Vec<AtomicU64>>,
}

/// Runs `conns_per_user` downloads for each of `users` for `secs`, counting bytes per
/// connection in 100 ms slots. Readers start as each tunnel opens (a tunnel that waited for
/// its head before the next opened would queue behind the others for minutes at 10 KB/s);
/// counting starts half a second after the last tunnel opened, so the figures describe the
/// steady state, not the ramp-up.
fn metered(
    local: SocketAddr,
    origin: SocketAddr,
    users: &[String],
    conns_per_user: usize,
    secs: u64,
) -> Vec<Vec<u64>> {
    let n_slots = (secs * 10) as usize;
    let total_conns = users.len() * conns_per_user;
    let series = Arc::new(Series {
        slots: (0..total_conns)
            .map(|_| (0..n_slots).map(|_| AtomicU64::new(0)).collect())
            .collect(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let t0: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let mut streams = vec![];
    let mut hs = vec![];
    for (i, u) in users
        .iter()
        .flat_map(|u| std::iter::repeat_n(u, conns_per_user))
        .enumerate()
    {
        let mut s = open(&Via::Proxy(local, u.clone()), origin).expect("open metered");
        write!(s, "GET /bytes/{} HTTP/1.1\r\nHost: o\r\n\r\n", 1u64 << 50).expect("get");
        let mut r = s.try_clone().unwrap();
        streams.push(s);
        let (series, stop, t0) = (series.clone(), stop.clone(), t0.clone());
        hs.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            let mut start = None;
            while !stop.load(Ordering::Relaxed) {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        if start.is_none() {
                            start = *t0.lock().unwrap();
                        }
                        let Some(t) = start else { continue };
                        let Some(el) = Instant::now().checked_duration_since(t) else {
                            continue;
                        };
                        let slot = (el.as_millis() / SLOT.as_millis()) as usize;
                        if slot < n_slots {
                            series.slots[i][slot].fetch_add(k as u64, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    let start = Instant::now() + Duration::from_millis(500);
    *t0.lock().unwrap() = Some(start);
    std::thread::sleep(Duration::from_millis(500) + Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for s in &streams {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    for h in hs {
        let _ = h.join();
    }
    series
        .slots
        .iter()
        .map(|c| c.iter().map(|a| a.load(Ordering::Relaxed)).collect())
        .collect()
}

fn jain(xs: &[f64]) -> f64 {
    let s: f64 = xs.iter().sum();
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    if sq == 0.0 {
        return 0.0;
    }
    s * s / (xs.len() as f64 * sq)
}

/// Largest sum over any 10 consecutive 100 ms slots.
fn max_window(total: &[u64]) -> u64 {
    total.windows(10).map(|w| w.iter().sum()).max().unwrap_or(0)
}

struct AccRun {
    label: String,
    rate: f64,
    total: Vec<u64>,
    // Per-connection slot counts (for the plot; at most 8 are drawn).
    per: Vec<Vec<u64>>,
}

fn accuracy(opts: &Opts, st: &Setup, origin: SocketAddr, rep: &mut Report) -> Vec<AccRun> {
    let secs = if opts.quick { 3 } else { 10 };
    let _ = writeln!(
        rep.md,
        "\n## 2. Accuracy and 3. fairness within one user ({secs} s per run)\n"
    );
    let _ = writeln!(rep.md, "| rate | conns | achieved B/s | error | max 1 s window / rate | Jain (conns) |\n|---|---|---|---|---|---|");
    let mut runs = vec![];
    for (rate_s, rate) in [("10K", 10_000.0), ("1M", 1e6), ("100M", 1e8)] {
        for conns in [1usize, 8, 64] {
            let user = format!("acc{rate_s}x{conns}");
            st.add_user(&user, rate_s);
            let per = metered(
                st.local.addr,
                origin,
                std::slice::from_ref(&user),
                conns,
                secs,
            );
            let slots = per[0].len();
            let total: Vec<u64> = (0..slots).map(|i| per.iter().map(|c| c[i]).sum()).collect();
            let sum: u64 = total.iter().sum();
            let achieved = sum as f64 / secs as f64;
            let err = (achieved - rate) / rate * 100.0;
            let win = max_window(&total) as f64 / rate;
            let fair = jain(
                &per.iter()
                    .map(|c| c.iter().sum::<u64>() as f64)
                    .collect::<Vec<_>>(),
            );
            if std::env::var_os("BENCH_DEBUG").is_some() {
                let pc: Vec<u64> = per.iter().map(|c| c.iter().sum()).collect();
                eprintln!("{user}: per-conn {pc:?}\n total slots {total:?}");
            }
            let _ = writeln!(
                rep.md,
                "| {rate_s}/s | {conns} | {achieved:.0} | {err:+.2}% | {win:.3} | {} |",
                if conns > 1 {
                    format!("{fair:.3}")
                } else {
                    "-".into()
                }
            );
            let k = format!("accuracy.{rate_s}.{conns}");
            rep.num(&format!("{k}.achieved_bps"), achieved);
            rep.num(&format!("{k}.error_pct"), err);
            rep.num(&format!("{k}.max_1s_window_ratio"), win);
            if conns > 1 {
                rep.num(&format!("{k}.jain"), fair);
            }
            runs.push(AccRun {
                label: format!("{rate_s}/s x {conns}"),
                rate,
                total,
                per,
            });
        }
    }
    runs
}

fn fairness_users(opts: &Opts, st: &Setup, origin: SocketAddr, rep: &mut Report) {
    let secs = if opts.quick { 3 } else { 10 };
    let users: Vec<String> = (1..=8).map(|i| format!("fair{i}")).collect();
    for u in &users {
        st.add_user(u, "50M");
    }
    let per = metered(st.local.addr, origin, &users, 2, secs);
    let per_user: Vec<f64> = per
        .chunks(2)
        .map(|c| c.iter().flatten().sum::<u64>() as f64 / secs as f64)
        .collect();
    let f = jain(&per_user);
    let _ = writeln!(rep.md, "\n## 3. Fairness across users\n\n8 users at 50 MB/s each (400 MB/s asked in total), 2 connections each, {secs} s: Jain's index **{f:.3}**; per user MB/s: {}",
        per_user.iter().map(|r| format!("{:.1}", r / 1e6)).collect::<Vec<_>>().join(", "));
    rep.num("fairness.users8.jain", f);
}

/// 16 clients each open a new connection, fetch 1 KiB and close, for `secs`; returns
/// requests per second and every time to first byte in ms.
fn setup_round(via: &Via, origin: SocketAddr, secs: u64) -> (f64, Vec<f64>) {
    let lat = Arc::new(Mutex::new(Vec::<f64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let hs: Vec<_> = (0..16)
        .map(|_| {
            let (via, lat, stop) = (via.clone(), lat.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut mine = vec![];
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let Ok(mut s) = open(&via, origin) else {
                        continue;
                    };
                    let Ok(got) = get(&mut s, 1024) else {
                        continue;
                    };
                    let ttfb = t.elapsed();
                    if drain(&mut s, 1024, got).ok() == Some(1024) {
                        mine.push(ttfb.as_secs_f64() * 1000.0);
                    }
                }
                lat.lock().unwrap().extend(mine);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    let elapsed = t.elapsed().as_secs_f64();
    let l = lat.lock().unwrap().clone();
    (l.len() as f64 / elapsed, l)
}

fn setup_rate(
    opts: &Opts,
    pairs: &[(&str, &Setup); 2],
    reference: Option<&Reference>,
    origin: SocketAddr,
    rep: &mut Report,
) {
    let secs = if opts.quick { 2 } else { 5 };
    let mut rows = vec![];
    // Each path with the relay processes whose CPU and context switches it costs.
    let mut paths = vec![("direct", Via::Direct, vec![])];
    for (name, st) in pairs {
        paths.push((
            name,
            Via::Proxy(st.local.addr, "unlimited".into()),
            vec![st.local.pid(), st.remote.pid()],
        ));
    }
    if let Some(r) = reference {
        let pids = r.hops.iter().map(Child::id).collect();
        paths.push(("haproxy 2-hop (reference)", Via::Relay(r.entry), pids));
    }
    // Per path: req/s of each round, all TTFBs, relay CPU s, context switches, requests.
    let mut acc: Vec<(Vec<f64>, Vec<f64>, f64, u64)> = vec![(vec![], vec![], 0.0, 0); paths.len()];
    for _ in 0..3 {
        for ((_, via, pids), acc) in paths.iter().zip(acc.iter_mut()) {
            let cpu0: f64 = pids.iter().map(|&p| cpu_secs(p)).sum();
            let ctx0: u64 = pids.iter().map(|&p| ctx_switches(p)).sum();
            let (rps, lat) = setup_round(via, origin, secs);
            acc.0.push(rps);
            acc.1.extend(lat);
            acc.2 += pids.iter().map(|&p| cpu_secs(p)).sum::<f64>() - cpu0;
            acc.3 += pids.iter().map(|&p| ctx_switches(p)).sum::<u64>() - ctx0;
        }
    }
    for ((name, _, pids), (mut rps, mut l, cpu, ctx)) in paths.into_iter().zip(acc) {
        rps.sort_by(|a, b| a.total_cmp(b));
        l.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| {
            l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        let reqs = l.len().max(1) as f64;
        let relay = (!pids.is_empty()).then(|| (cpu * 1e6 / reqs, ctx as f64 / reqs));
        rows.push((name, rps[1], pct(0.5), pct(0.99), relay));
    }
    let _ = writeln!(rep.md, "\n## 4. Setup: 1 KiB requests on new connections, 16 concurrent, 3 alternating rounds of {secs} s (median req/s; TTFB over all rounds)\n\n| path | req/s | TTFB p50 ms | TTFB p99 ms | relay CPU us/req (both hops) | context switches/req (both hops) |\n|---|---|---|---|---|---|");
    for (n, r, p50, p99, relay) in &rows {
        let per = relay.map_or("- | -".into(), |(c, x)| format!("{c:.0} | {x:.1}"));
        let _ = writeln!(rep.md, "| {n} | {r:.0} | {p50:.2} | {p99:.2} | {per} |");
        let n = n.replace(" (reference)", "").replace(' ', "_");
        if let Some((c, x)) = relay {
            rep.num(&format!("setup.{n}.relay_cpu_us_per_req"), *c);
            rep.num(&format!("setup.{n}.ctx_switches_per_req"), *x);
        }
        rep.num(&format!("setup.{n}.rps"), *r);
        rep.num(&format!("setup.{n}.ttfb_p50_ms"), *p50);
        rep.num(&format!("setup.{n}.ttfb_p99_ms"), *p99);
    }
    let _ = writeln!(rep.md);
    for (i, (name, _)) in pairs.iter().enumerate() {
        let ratio = rows[i + 1].1 / rows[0].1;
        let extra = rows[i + 1].3 - rows[0].3;
        let _ = writeln!(
            rep.md,
            "{name}: {ratio:.2}x direct; p99 TTFB {extra:+.2} ms over direct  "
        );
        let key = name.replace(' ', "_");
        rep.num(&format!("setup.{key}.ratio"), ratio);
        rep.num(&format!("setup.{key}.p99_extra_ms"), extra);
    }
    if let Some(h) = rows.get(3) {
        let _ = writeln!(
            rep.md,
            "haproxy 2-hop: {:.2}x direct; p99 TTFB {:+.2} ms over direct",
            h.1 / rows[0].1,
            h.3 - rows[0].3
        );
        rep.num("setup.haproxy_ratio", h.1 / rows[0].1);
    }
}

fn scale(opts: &Opts, mode: &str, st: &Setup, rep: &mut Report) {
    let n = if opts.quick { 500 } else { 5000 };
    // A target that answers one request on each connection and then keeps it open, as a
    // keep-alive web server does, without a thread per connection: the client below opens
    // tunnels one at a time, so the accept thread can serve each in turn. A tunnel that
    // carried bytes is what holds pipes and buffers; one that never moved a byte would not
    // show them.
    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: scale\r\n\r\n";
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    {
        let held = held.clone();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut req = vec![0u8; REQUEST.len()];
                if s.read_exact(&mut req).is_ok() {
                    let _ = s.write_all(RESPONSE);
                }
                held.lock().unwrap().push(s);
            }
        });
    }
    let via = Via::Proxy(st.local.addr, "unlimited".into());
    // One tunnel first: the user's first login allocates argon2's working memory (19 MiB,
    // once per process), which is not a per-tunnel cost.
    drop(open(&via, target));
    std::thread::sleep(Duration::from_millis(300));
    let before = (rss_threads(st.local.pid()), rss_threads(st.remote.pid()));
    let mut open_ok = vec![];
    let mut failed = 0;
    let exchange = |s: &mut TcpStream| -> std::io::Result<()> {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(REQUEST)?;
        let mut resp = vec![0u8; RESPONSE.len()];
        s.read_exact(&mut resp)?;
        if resp != RESPONSE {
            return Err(std::io::Error::other("wrong response"));
        }
        Ok(())
    };
    for _ in 0..n {
        match open(&via, target).and_then(|mut s| exchange(&mut s).map(|()| s)) {
            Ok(s) => open_ok.push(s),
            Err(_) => failed += 1,
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = (rss_threads(st.local.pid()), rss_threads(st.remote.pid()));
    let pipes = (pipe_fds(st.local.pid()), pipe_fds(st.remote.pid()));
    let ok = open_ok.len();
    let per = |b: (u64, u64), a: (u64, u64)| a.0.saturating_sub(b.0) as f64 / ok.max(1) as f64;
    let _ = writeln!(rep.md, "\n## 5. Scale, {mode}: {n} concurrent idle tunnels, each after one request and response\n\n{ok} opened, {failed} failed (open-file limit {}).\n\n| process | RSS before KiB | RSS with tunnels KiB | threads | pipe fds | KiB per tunnel |\n|---|---|---|---|---|---|", fd_limit());
    for (name, b, a, p) in [
        ("local-proxy", before.0, after.0, pipes.0),
        ("remote-proxy", before.1, after.1, pipes.1),
    ] {
        let _ = writeln!(
            rep.md,
            "| {name} | {} | {} | {} | {p} | {:.1} |",
            b.0,
            a.0,
            a.1,
            per(b, a)
        );
        let k = format!("scale.{}.{name}", mode.replace(' ', "_"));
        rep.num(&format!("{k}.pipe_fds"), p as f64);
        rep.num(&format!("{k}.kib_per_tunnel"), per(b, a));
        rep.num(&format!("{k}.threads"), a.1 as f64);
        rep.num(&format!("{k}.rss_kib"), a.0 as f64);
    }
    let k = mode.replace(' ', "_");
    rep.num(&format!("scale.{k}.opened"), ok as f64);
    rep.num(&format!("scale.{k}.failed"), failed as f64);
    drop(open_ok);
    held.lock().unwrap().clear();
}

fn svg(runs: &[AccRun]) -> String {
    let (w, h, pad) = (300.0, 180.0, 30.0);
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' font-size='11'>\n<rect width='100%' height='100%' fill='white'/>\n",
        3.0 * w,
        3.0 * h + 20.0
    );
    let _ = writeln!(out, "<text x='5' y='14'>Rate / configured over time. grey: total per 100 ms; blue: total, 1 s window; green: each connection x N (1 = fair share); red: configured</text>");
    for (i, r) in runs.iter().enumerate() {
        let (ox, oy) = ((i % 3) as f64 * w, (i / 3) as f64 * h + 20.0);
        let (pw, ph) = (w - pad - 10.0, h - pad - 20.0);
        let x = |t: f64, n: usize| ox + pad + t / n as f64 * pw;
        let y = |v: f64| oy + 15.0 + ph - (v / 1.5).min(1.0) * ph;
        let _ = writeln!(
            out,
            "<text x='{}' y='{}'>{}</text>",
            ox + pad,
            oy + 12.0,
            r.label
        );
        let _ = writeln!(
            out,
            "<rect x='{}' y='{}' width='{pw}' height='{ph}' fill='none' stroke='#ccc'/>",
            ox + pad,
            oy + 15.0
        );
        let n = r.total.len();
        let slot_rate = |v: u64| v as f64 * 10.0 / r.rate;
        let pts: Vec<String> = r
            .total
            .iter()
            .enumerate()
            .map(|(j, &v)| format!("{:.1},{:.1}", x(j as f64 + 0.5, n), y(slot_rate(v))))
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill='none' stroke='#bbb' points='{}'/>",
            pts.join(" ")
        );
        let win: Vec<String> = r
            .total
            .windows(10)
            .enumerate()
            .map(|(j, w)| {
                format!(
                    "{:.1},{:.1}",
                    x(j as f64 + 10.0, n),
                    y(w.iter().sum::<u64>() as f64 / r.rate)
                )
            })
            .collect();
        // Each connection's 1 s window times the connection count: 1.0 is its fair share.
        if r.per.len() > 1 {
            let k = r.per.len() as f64;
            for c in r.per.iter().take(8) {
                let pts: Vec<String> = c
                    .windows(10)
                    .enumerate()
                    .map(|(j, w)| {
                        let v = w.iter().sum::<u64>() as f64 * k / r.rate;
                        format!("{:.1},{:.1}", x(j as f64 + 10.0, n), y(v))
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "<polyline fill='none' stroke='#2a2' stroke-opacity='0.35' points='{}'/>",
                    pts.join(" ")
                );
            }
        }
        let _ = writeln!(
            out,
            "<polyline fill='none' stroke='#1f6fd1' stroke-width='1.5' points='{}'/>",
            win.join(" ")
        );
        let _ = writeln!(
            out,
            "<line x1='{}' x2='{}' y1='{2}' y2='{2}' stroke='#d12' stroke-dasharray='4 3'/>",
            x(0.0, n),
            x(n as f64, n),
            y(1.0)
        );
        for v in [0.0, 0.5, 1.0, 1.5] {
            let _ = writeln!(
                out,
                "<text x='{}' y='{}' text-anchor='end'>{v}</text>",
                ox + pad - 3.0,
                y(v) + 4.0
            );
        }
        let _ = writeln!(
            out,
            "<text x='{}' y='{}'>{} s</text>",
            x(n as f64, n) - 20.0,
            oy + h - 8.0,
            n / 10
        );
    }
    out.push_str("</svg>\n");
    out
}

fn json(map: &BTreeMap<String, String>) -> String {
    let body: Vec<String> = map.iter().map(|(k, v)| format!("  \"{k}\": {v}")).collect();
    format!("{{\n{}\n}}\n", body.join(",\n"))
}

/// The latency phase: time to first byte of 1 KiB requests on new connections over a slow
/// link between the hops, against the client going straight to the origin over the same
/// link. One request at a time, variants taking turns, so each sees the same machine.
fn latency(opts: &Opts, pairs: &[(&str, &Setup); 2], origin: SocketAddr, rep: &mut Report) {
    let ms: u64 = std::env::var("FLOWGATE_BENCH_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let delay = Duration::from_millis(ms);
    let direct = slowlink::SlowLink::start(origin, delay);
    let local_over = |st: &Setup, tls: bool, warm: &str| {
        let link = slowlink::SlowLink::start(st.remote.addr, delay);
        let mut l = Command::new(opts.bin.join("local-proxy"));
        l.args([
            "--listen",
            "127.0.0.1:0",
            "--remote",
            &link.addr.to_string(),
        ])
        .args(["--warm", warm]);
        if tls {
            let out = Command::new(opts.bin.join("remote-proxy"))
                .arg("--db")
                .arg(&st.db)
                .arg("identity")
                .output()
                .expect("remote-proxy identity");
            l.args(["--pin", String::from_utf8_lossy(&out.stdout).trim()]);
        } else {
            l.arg("--plaintext");
        }
        (link, spawn(l))
    };
    let (tls, plain) = (pairs[0].1, pairs[1].1);
    let warm_tls = local_over(tls, true, "4");
    let cold_tls = local_over(tls, true, "0");
    let warm_plain = local_over(plain, false, "4");
    let cold_plain = local_over(plain, false, "0");
    let user = "unlimited".to_string();
    let variants: Vec<(&str, Via)> = vec![
        ("direct over the link", Via::Relay(direct.addr)),
        (
            "flowgate TLS, warm on",
            Via::Proxy(warm_tls.1.addr, user.clone()),
        ),
        (
            "flowgate TLS, warm off",
            Via::Proxy(cold_tls.1.addr, user.clone()),
        ),
        (
            "flowgate plaintext, warm on",
            Via::Proxy(warm_plain.1.addr, user.clone()),
        ),
        (
            "flowgate plaintext, warm off",
            Via::Proxy(cold_plain.1.addr, user),
        ),
    ];
    // Spares made, credentials checked and remembered, before anything is timed.
    std::thread::sleep(Duration::from_secs(1));
    let one = |via: &Via| -> Option<f64> {
        let t = Instant::now();
        let mut s = open(via, origin).ok()?;
        let got = get(&mut s, 1024).ok()?;
        let ttfb = t.elapsed().as_secs_f64() * 1000.0;
        (drain(&mut s, 1024, got).ok()? == 1024).then_some(ttfb)
    };
    for (_, via) in &variants {
        let _ = one(via);
    }
    let rounds = if opts.quick { 10 } else { 40 };
    let mut samples = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (i, (_, via)) in variants.iter().enumerate() {
            if let Some(ms) = one(via) {
                samples[i].push(ms);
            }
            // Time for a used spare to be replaced, as between a page's requests.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = writeln!(rep.md, "
## Latency over a slow link: {ms} ms each way between the hops ({} ms round trip), 1 KiB requests on new connections, one at a time, {rounds} rounds

| path | TTFB p50 ms | TTFB p90 ms | p50 over direct ms |
|---|---|---|---|", 2 * ms);
    let q = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let direct_p50 = q(&mut samples[0], 0.5);
    for (i, (name, _)) in variants.iter().enumerate() {
        let (p50, p90) = (q(&mut samples[i], 0.5), q(&mut samples[i], 0.9));
        let _ = writeln!(
            rep.md,
            "| {name} | {p50:.1} | {p90:.1} | {:+.1} |",
            p50 - direct_p50
        );
        let key = name.replace([' ', ','], "_");
        rep.num(&format!("latency.{key}.ttfb_p50_ms"), p50);
        rep.num(&format!("latency.{key}.ttfb_p90_ms"), p90);
    }
    let warm_p50 = q(&mut samples[1], 0.5);
    let _ = writeln!(
        rep.md,
        "
Target: TLS with warm connections at most direct + 5 ms at the median: {:+.1} ms ({}).",
        warm_p50 - direct_p50,
        if warm_p50 <= direct_p50 + 5.0 {
            "met"
        } else {
            "not met"
        }
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = Opts {
        quick: args.iter().any(|a| a == "--quick"),
        reference: !args.iter().any(|a| a == "--no-reference"),
        only: None,
        out: PathBuf::from("bench-out"),
        bin: PathBuf::from("target/release"),
    };
    for w in args.windows(2) {
        match w[0].as_str() {
            "--only" => opts.only = Some(w[1].split(',').map(str::to_string).collect()),
            "--out" => opts.out = PathBuf::from(&w[1]),
            "--bin" => opts.bin = PathBuf::from(&w[1]),
            _ => {}
        }
    }
    assert!(
        Path::new(&opts.bin.join("remote-proxy")).exists(),
        "build the release binaries first (scripts/bench.sh does)"
    );
    std::fs::create_dir_all(&opts.out).unwrap();
    let origin = Origin::start("127.0.0.1:0".parse().unwrap())
        .expect("origin")
        .local_addr();
    let st = Setup::start(&opts, true);
    let plain = Setup::start(&opts, false);
    let pairs: [(&str, &Setup); 2] = [("flowgate TLS", &st), ("flowgate plaintext", &plain)];
    let reference = (opts.reference && (opts.wants("throughput") || opts.wants("setup")))
        .then(|| Reference::start(origin))
        .flatten();
    let mut rep = Report {
        md: String::new(),
        json: BTreeMap::new(),
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(rep.md, "# flowgate benchmark\n\n{} cores; origin, client and both proxies on 127.0.0.1; ratios are against direct in the same run.", cores);
    let phases: &[Phase] = &[
        ("throughput", &|r| {
            throughput(&opts, &pairs, reference.as_ref(), origin, r)
        }),
        ("curl", &|r| curl_nginx(&opts, &pairs, r)),
        ("latency", &|r| latency(&opts, &pairs, origin, r)),
        ("accuracy", &|r| {
            let runs = accuracy(&opts, &st, origin, r);
            std::fs::write(opts.out.join("accuracy.svg"), svg(&runs)).unwrap();
        }),
        ("fairness", &|r| fairness_users(&opts, &st, origin, r)),
        ("setup", &|r| {
            setup_rate(&opts, &pairs, reference.as_ref(), origin, r)
        }),
        ("scale", &|r| {
            scale(&opts, "TLS", &st, r);
            scale(&opts, "plaintext", &plain, r);
        }),
    ];
    for (name, run) in phases {
        if opts.wants(name) {
            eprintln!("== {name}");
            run(&mut rep);
        }
    }
    std::fs::write(opts.out.join("results.md"), &rep.md).unwrap();
    std::fs::write(opts.out.join("results.json"), json(&rep.json)).unwrap();
    println!("{}", rep.md);
    println!(
        "(written to {}/results.md, results.json, accuracy.svg)",
        opts.out.display()
    );
}
