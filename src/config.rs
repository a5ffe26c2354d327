//! Validated settings for both proxies; every default lives here, once.
//!
//! Out of scope: flag parsing (cli.rs turns flags into these types).

use crate::limit::admission::Limits;
use crate::limit::rate::{Bandwidth, RequestRate};
use crate::net::workers::PoolConfig;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Default listen address of remote-proxy: loopback, so nothing is exposed until asked.
pub const DEFAULT_REMOTE_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7080);
/// Default listen address of local-proxy.
pub const DEFAULT_LOCAL_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1080);
/// Default database path.
pub const DEFAULT_DB: &str = "flowgate.db";
/// Default bandwidth for accounts made by signup: 1 MB/s.
pub const DEFAULT_SIGNUP_BANDWIDTH: Bandwidth = Bandwidth::bytes_per_sec(1_000_000);
/// Default handshake timeout: a client must finish its whole handshake within it.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default wait for a client's first byte; a socket that sends nothing is closed then.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default target (and remote-proxy) connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle timeout: a tunnel with no bytes either way this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default time open tunnels get to finish after SIGTERM or SIGINT.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Default cap on tunnels served at once; more wait unread until one ends.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default cap on connections waiting for a slot; more are told "busy" at once.
pub const DEFAULT_MAX_QUEUED: usize = 1024;
/// Idle warm connections from one client address, at remote-proxy.
pub const DEFAULT_MAX_IDLE_PER_IP: u32 = 64;
/// How long remote-proxy keeps a warm connection that no app has taken.
pub const DEFAULT_WARM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often remote-proxy writes byte counts to the database: what a crash can lose.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Connections from one client address in their handshake at once, at remote-proxy.
pub const DEFAULT_MAX_HANDSHAKES_PER_IP: u32 = 32;
/// Default longest wait for a slot; then "busy".
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit on failed logins per client IP: 10 a minute.
pub const DEFAULT_FAILED_LOGIN_RATE: RequestRate = RequestRate {
    count: 10,
    per: Duration::from_secs(60),
};
/// Default limit on failed logins per client IP over all user names: ten users' worth of
/// typos behind one local-proxy before the address as a whole is held back.
pub const DEFAULT_FAILED_LOGIN_RATE_PER_IP: RequestRate = RequestRate {
    count: 100,
    per: Duration::from_secs(60),
};
/// Default limit on signups per client IP: 5 an hour (each account gets its own budget).
pub const DEFAULT_SIGNUP_RATE: RequestRate = RequestRate {
    count: 5,
    per: Duration::from_secs(3600),
};
/// How often remote-proxy checks the database for `user set`/`user del`.
pub const DEFAULT_USER_POLL: Duration = Duration::from_millis(500);
/// Default time an idle worker beyond the spares waits for a job before it exits.
pub const DEFAULT_WORKER_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time between health probes of each remote-proxy.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Default longest wait for a health probe's answer.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default good probes in a row that bring a down remote back (HAProxy's `rise`).
pub const DEFAULT_RISE: u32 = 2;
/// Warm connections local-proxy keeps to each healthy remote.
pub const DEFAULT_WARM: usize = 4;
/// Most warm connections per remote (`--warm` above this is lowered to it).
pub const MAX_WARM: usize = 64;
/// Default failed probes in a row that take a remote down (HAProxy's `fall`).
pub const DEFAULT_FALL: u32 = 3;
/// Longest duration any flag accepts: 30 days. Far beyond any sensible timeout, and far
/// below where adding it to the clock could overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 86_400);

/// The default cap on worker threads for `max_connections` tunnels: two per tunnel (the
/// copying relay runs its second direction on a second worker) and 64 for "busy" answers, so
/// the cap never holds up a tunnel admission let in; it bounds threads if admission is
/// raised far, before the kernel's thread limit does it less gracefully.
pub fn default_max_workers(max_connections: usize) -> usize {
    max_connections.saturating_mul(2).saturating_add(64)
}

/// The default worker pool for `max_connections` tunnels.
pub fn default_pool(max_connections: usize) -> PoolConfig {
    PoolConfig {
        max_workers: default_max_workers(max_connections),
        idle_timeout: DEFAULT_WORKER_IDLE_TIMEOUT,
    }
}

/// How new tunnels are spread over the remotes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Balance {
    /// Each user keeps to one remote (rendezvous hashing of the user name): the user's
    /// budget stays whole.
    #[default]
    Sticky,
    /// The remote with the fewest open tunnels from this local-proxy: a user's budget is
    /// split, so a user can reach n times the rate over n remotes.
    LeastConnections,
    /// Each remote in turn: splits a user's budget like least-connections.
    RoundRobin,
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Balance::Sticky => "sticky",
            Balance::LeastConnections => "least-connections",
            Balance::RoundRobin => "round-robin",
        })
    }
}

/// How local-proxy uses its remote-proxies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstreams {
    /// The remote-proxies, `HOST:PORT` each, as given (the order matters to no policy).
    pub remotes: Vec<String>,
    /// How new tunnels are spread over them.
    pub balance: Balance,
    /// Time between health probes of each remote (a little jitter is added).
    pub health_interval: Duration,
    /// Longest wait for a probe's answer.
    pub health_timeout: Duration,
    /// Good probes in a row that bring a down remote back.
    pub rise: u32,
    /// Failed probes in a row that take an up remote down.
    pub fall: u32,
    /// Warm connections kept to each healthy remote (0: none).
    pub warm: usize,
}

impl Upstreams {
    /// Defaults for everything but the remotes.
    pub fn new(remotes: Vec<String>) -> Upstreams {
        Upstreams {
            remotes,
            balance: Balance::default(),
            health_interval: DEFAULT_HEALTH_INTERVAL,
            health_timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: DEFAULT_RISE,
            warm: DEFAULT_WARM,
            fall: DEFAULT_FALL,
        }
    }
}

/// Timeouts both proxies use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Longest time a client may take over its whole handshake (not per read: slowloris).
    pub handshake: Duration,
    /// A client that sends nothing at all is closed after this (sooner than `handshake`).
    pub first_byte: Duration,
    /// Longest wait to connect to the next hop.
    pub connect: Duration,
    /// Close tunnels idle this long; `None` never closes them.
    pub idle: Option<Duration>,
    /// On SIGTERM or SIGINT, how long open tunnels may run on before the process exits.
    pub grace: Duration,
}

impl Timeouts {
    /// How long a connection may say nothing at all: the first-byte timeout, or the whole
    /// handshake's if that is shorter.
    pub fn silence(&self) -> Duration {
        self.first_byte.min(self.handshake)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: DEFAULT_HANDSHAKE_TIMEOUT,
            first_byte: DEFAULT_FIRST_BYTE_TIMEOUT,
            connect: DEFAULT_CONNECT_TIMEOUT,
            idle: Some(DEFAULT_IDLE_TIMEOUT),
            grace: DEFAULT_GRACE,
        }
    }
}

/// remote-proxy settings.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteConfig {
    /// Where to listen for local-proxies.
    pub listen: SocketAddr,
    /// The user database.
    pub db: crate::users::Db,
    /// Whether `local-proxy signup` may create accounts.
    pub allow_signup: bool,
    /// Bandwidth given to accounts made by signup.
    pub signup_bandwidth: Bandwidth,
    /// Failed logins per client IP over all names (`None`: no limit); `failed_login_rate`
    /// is per client IP and user name.
    pub failed_login_rate_per_ip: Option<RequestRate>,
    /// Signups per client IP (`None`: no limit).
    pub signup_rate: Option<RequestRate>,
    /// Signups are refused once the database holds this many users (`None`: no cap).
    pub max_users: Option<u32>,
    /// Signups must bring a valid invite token.
    pub signup_requires_invite: bool,
    /// How long a warm connection waits, parked, for its tunnel request.
    pub warm_idle_timeout: Duration,
    /// How often byte counts are written to the database (also at tunnel close and stop).
    pub flush_interval: Duration,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Slots, queue bound and queue timeout.
    pub admission: Limits,
    /// Worker threads: the cap and when idle ones exit.
    pub pool: PoolConfig,
    /// New tunnels per client IP (`None`: no limit).
    pub rate_per_ip: Option<RequestRate>,
    /// Failed logins per client IP and user name before further attempts are refused
    /// unchecked.
    pub failed_login_rate: Option<RequestRate>,
    /// How often to look for user changes made by other processes.
    pub user_poll: Duration,
    /// TLS on the hop, and with which identity; or plaintext.
    pub tls: RemoteTls,
    /// Where tunnels may go (`--allow-dest`, `--deny-dest`, `--deny-port`); remote-proxy
    /// adds its own listening sockets at start.
    pub destinations: crate::limit::destinations::Policy,
}

/// remote-proxy's side of the hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteTls {
    /// No TLS (`--plaintext`), for trusted networks. `public` allows it on a listen address
    /// that is not loopback (`--plaintext-on-public`).
    Plaintext {
        /// `--plaintext-on-public` was given.
        public: bool,
    },
    /// TLS with the identity kept in this state directory (made on first start).
    StateDir(PathBuf),
    /// TLS with the operator's own certificate chain and key (PEM files).
    Files {
        /// The certificate chain, end-entity first.
        cert: PathBuf,
        /// Its private key.
        key: PathBuf,
    },
}

impl RemoteTls {
    /// The default: TLS with the identity kept beside the database (in the current
    /// directory for PostgreSQL).
    pub fn beside(db: &crate::users::Db) -> RemoteTls {
        RemoteTls::StateDir(db.default_state_dir())
    }

    /// Loads (or, in a state directory, makes) the identity, and whether it was made now;
    /// `None` for plaintext.
    ///
    /// # Errors
    /// When the files cannot be read, written or used.
    pub fn identity(&self) -> Result<Option<(crate::tls::Identity, bool)>, crate::tls::Error> {
        match self {
            RemoteTls::Plaintext { .. } => Ok(None),
            RemoteTls::StateDir(dir) => crate::tls::Identity::load_or_create(dir).map(Some),
            RemoteTls::Files { cert, key } => {
                crate::tls::Identity::load(cert, key).map(|id| Some((id, false)))
            }
        }
    }
}

/// local-proxy's side of the hop: how it knows a remote is the real one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalTls {
    /// No TLS (`--plaintext`), for trusted networks.
    Plaintext,
    /// The remote's certificate must hash to one of these (`--pin`).
    Pins(Vec<crate::tls::Fingerprint>),
    /// The remote's chain and host name must verify against this CA bundle (`--ca`).
    Ca(PathBuf),
    /// The remote must be recorded in this known-remotes file (`local-proxy trust`).
    KnownRemotes(PathBuf),
}

impl LocalTls {
    /// The verification settings; `None` for plaintext.
    ///
    /// # Errors
    /// When the known-remotes file cannot be read or parsed.
    pub fn trust(&self) -> Result<Option<crate::tls::Trust>, crate::tls::Error> {
        use crate::tls::{KnownRemotes, Trust};
        Ok(match self {
            LocalTls::Plaintext => None,
            LocalTls::Pins(p) => Some(Trust::Pins(p.clone())),
            LocalTls::Ca(path) => Some(Trust::Ca(path.clone())),
            LocalTls::KnownRemotes(path) => {
                Some(Trust::Known(std::sync::Arc::new(KnownRemotes::open(path)?)))
            }
        })
    }
}

/// The default admission limits (no per-address handshake cap: remote-proxy sets its own,
/// local-proxy, on loopback, serves one machine's apps and needs none).
pub fn default_admission() -> Limits {
    Limits {
        max_active: DEFAULT_MAX_CONNECTIONS,
        max_queued: DEFAULT_MAX_QUEUED,
        timeout: DEFAULT_QUEUE_TIMEOUT,
        max_handshakes_per_key: None,
        max_idle_per_key: None,
    }
}

impl RemoteConfig {
    /// Defaults for everything but the database path.
    pub fn new(db: impl Into<crate::users::Db>) -> RemoteConfig {
        let db = db.into();
        let tls = RemoteTls::beside(&db);
        RemoteConfig {
            listen: DEFAULT_REMOTE_LISTEN,
            db,
            allow_signup: false,
            signup_bandwidth: DEFAULT_SIGNUP_BANDWIDTH,
            signup_rate: Some(DEFAULT_SIGNUP_RATE),
            failed_login_rate_per_ip: Some(DEFAULT_FAILED_LOGIN_RATE_PER_IP),
            max_users: None,
            signup_requires_invite: false,
            warm_idle_timeout: DEFAULT_WARM_IDLE_TIMEOUT,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            metrics: MetricsConfig::default(),
            timeouts: Timeouts::default(),
            admission: Limits {
                max_handshakes_per_key: Some(DEFAULT_MAX_HANDSHAKES_PER_IP as usize),
                max_idle_per_key: Some(DEFAULT_MAX_IDLE_PER_IP as usize),
                ..default_admission()
            },
            pool: default_pool(DEFAULT_MAX_CONNECTIONS),
            rate_per_ip: None,
            failed_login_rate: Some(DEFAULT_FAILED_LOGIN_RATE),
            user_poll: DEFAULT_USER_POLL,
            tls,
            destinations: crate::limit::destinations::Policy::default(),
        }
    }
}

/// Credentials local-proxy uses when an app gives none. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Account name.
    pub user: String,
    /// Account password.
    pub password: String,
}

impl Credentials {
    /// Credentials the tunnel protocol can carry.
    ///
    /// # Errors
    /// An empty name or password, or one over 255 bytes (the protocol's length byte).
    pub fn new(user: String, password: String) -> Result<Credentials, String> {
        use crate::proto::tunnel::MAX_CREDENTIAL;
        if user.is_empty() || password.is_empty() {
            return Err("empty user name or password".into());
        }
        if user.len() > MAX_CREDENTIAL || password.len() > MAX_CREDENTIAL {
            return Err(format!(
                "user name and password may be at most {MAX_CREDENTIAL} bytes each"
            ));
        }
        Ok(Credentials { user, password })
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// local-proxy settings.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// Where apps connect (SOCKS5 and HTTP on one port).
    pub listen: SocketAddr,
    /// The remote-proxies and how they are used.
    pub upstreams: Upstreams,
    /// The account used when an app sends no credentials; `None` requires app credentials.
    pub credentials: Option<Credentials>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Slots, queue bound and queue timeout.
    pub admission: Limits,
    /// Worker threads: the cap and when idle ones exit.
    pub pool: PoolConfig,
    /// TLS to the remotes and how they are verified; or plaintext.
    pub tls: LocalTls,
    /// Where to serve Prometheus metrics (`None`: not at all).
    pub metrics: Option<SocketAddr>,
}

/// remote-proxy's metrics switches, which SIGHUP may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where to serve Prometheus metrics (`None`: not at all).
    pub listen: Option<SocketAddr>,
    /// Series per user (bytes by direction), for the most active users.
    pub per_user: bool,
    /// How many users get their own series; the rest are summed as `other`.
    pub max_users: usize,
}

/// Users with their own series by default under `--metrics-per-user`.
pub const DEFAULT_METRICS_MAX_USERS: usize = 100;

impl Default for MetricsConfig {
    fn default() -> MetricsConfig {
        MetricsConfig {
            listen: None,
            per_user: false,
            max_users: DEFAULT_METRICS_MAX_USERS,
        }
    }
}

impl LocalConfig {
    /// Defaults for everything but the remote addresses and credentials.
    pub fn new(remotes: Vec<String>, credentials: Option<Credentials>) -> LocalConfig {
        LocalConfig {
            listen: DEFAULT_LOCAL_LISTEN,
            upstreams: Upstreams::new(remotes),
            credentials,
            timeouts: Timeouts::default(),
            admission: default_admission(),
            pool: default_pool(DEFAULT_MAX_CONNECTIONS),
            tls: LocalTls::KnownRemotes(crate::tls::default_known_remotes_path()),
            metrics: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_what_the_readme_says() {
        assert_eq!(DEFAULT_REMOTE_LISTEN.to_string(), "127.0.0.1:7080");
        assert_eq!(DEFAULT_LOCAL_LISTEN.to_string(), "127.0.0.1:1080");
        assert_eq!(DEFAULT_SIGNUP_BANDWIDTH.to_string(), "1M/s");
        assert_eq!(DEFAULT_FAILED_LOGIN_RATE.to_string(), "10/m");
        assert_eq!(
            RemoteConfig::new(PathBuf::from("x")).listen,
            DEFAULT_REMOTE_LISTEN
        );
    }
}
