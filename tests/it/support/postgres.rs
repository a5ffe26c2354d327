//! A throwaway PostgreSQL server for one test: `initdb` into a temporary directory and the
//! server on a Unix socket there (no TCP port at all), run as the `postgres` system user
//! when the tests run as root (initdb refuses root). Stopped when dropped. A machine without
//! the server binaries fails the test with how to get them: CI installs them (`.ci/run`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped, for outage tests) PostgreSQL.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
    // Server settings beyond the defaults (TLS on a TCP port, for one test).
    extra: Vec<String>,
}

/// The directory holding initdb, pg_ctl and postgres.
fn bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return p;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, postgres) not found: install them \
             (apt-get install postgresql; .ci/run does it)"
        )
    })
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `cmd` as the postgres system user when we are root.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// initdb and start.
    pub fn start() -> Postgres {
        let dir = super::temp_dir().join("pg");
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            let pg = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .expect("a postgres system user (the postgresql package makes it)");
            std::os::unix::fs::chown(&dir, Some(pg.uid.as_raw()), Some(pg.gid.as_raw())).unwrap();
        }
        let bin = bin_dir();
        let out = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            dir,
            bin,
            child: None,
            extra: Vec::new(),
        };
        pg.resume();
        pg
    }

    /// As [`start`](Self::start), also taking TLS connections on 127.0.0.1:`port`, with a
    /// certificate for `localhost` signed by a CA of the test's own; the CA's PEM file.
    pub fn start_tls(port: u16) -> (Postgres, PathBuf) {
        let mut pg = Postgres::start();
        pg.stop();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let data = pg.dir.join("data");
        std::fs::write(data.join("server.crt"), leaf.pem()).unwrap();
        let key_file = data.join("server.key");
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        if is_root() {
            let u = nix::unistd::User::from_name("postgres").unwrap().unwrap();
            for f in ["server.crt", "server.key"] {
                std::os::unix::fs::chown(data.join(f), Some(u.uid.as_raw()), Some(u.gid.as_raw()))
                    .unwrap();
            }
        }
        let ca_file = pg.dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        pg.extra = [
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "ssl=on",
            "-c",
            "ssl_cert_file=server.crt",
            "-c",
            "ssl_key_file=server.key",
            "-p",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([port.to_string()])
        .collect();
        pg.resume();
        (pg, ca_file)
    }

    /// Starts the server (again) on its data, and waits until it takes connections.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.join("log")).unwrap();
        let child = as_postgres(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-k")
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=60",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            let ok = postgres::Client::connect(&self.conninfo(), postgres::NoTls).is_ok();
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "postgres did not start: {}",
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }

    /// Stops the server now (fast shutdown), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The connection string flowgate's `--db` takes.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.display(),
            self.port()
        )
    }

    /// The server's Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(format!(".s.PGSQL.{}", self.port()))
    }

    fn port(&self) -> &str {
        self.extra
            .iter()
            .position(|a| a == "-p")
            .map_or("5432", |i| self.extra[i + 1].as_str())
    }

    /// A plain client, for the test's own queries.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.conninfo(), postgres::NoTls).unwrap()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
