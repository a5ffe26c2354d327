//! Command-line flags of both binaries (clap derive), and their conversion into the
//! validated types of config.rs. The binaries stay thin: parse, convert, run.

use crate::config::{self, Credentials, LocalConfig, RemoteConfig, Timeouts};
use crate::limit::admission::Limits;
use crate::limit::quota::MaybeQuota;
use crate::limit::rate::{Bandwidth, RequestRate};
use crate::net::workers::PoolConfig;
use crate::users::Changes;
use clap::{Args, Parser, Subcommand};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub mod file;

/// remote-proxy: authenticates flowgate tunnels against a user database and relays them to
/// their targets, holding each user to their bandwidth.
#[derive(Debug, Parser)]
#[command(name = "remote-proxy", version)]
pub struct RemoteCli {
    /// User database: a SQLite file (created on first use), or PostgreSQL for a fleet
    /// (postgres://USER@HOST/DB or "host=... dbname=..."; the password from PGPASSWORD or
    /// ~/.pgpass, never here).
    #[arg(long, global = true, default_value = config::DEFAULT_DB, env = "FLOWGATE_DB", value_name = "PATH|URL")]
    pub db: crate::users::Db,
    /// Directory for the TLS identity (identity.key, identity.crt; made on first start,
    /// owner-only). Default: the database's directory.
    #[arg(long, global = true, value_name = "DIR", env = "FLOWGATE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Settings from this TOML file: keys are the flags' long names (`listen`,
    /// `allow-dest = [...]`); flags on the command line win. SIGHUP re-reads it.
    #[arg(long, global = true, value_name = "FILE", env = "FLOWGATE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: RemoteCommand,
}

impl RemoteCli {
    /// Where the TLS identity is kept.
    pub fn state_dir(&self) -> PathBuf {
        match &self.state_dir {
            Some(d) => d.clone(),
            None => match config::RemoteTls::beside(&self.db) {
                config::RemoteTls::StateDir(d) => d,
                _ => PathBuf::from("."),
            },
        }
    }
}

/// remote-proxy subcommands.
#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// Accept tunnels from local-proxies.
    Serve(Box<ServeArgs>),
    /// Check `serve`'s settings (from --config and flags) and print the effective ones.
    CheckConfig(Box<ServeArgs>),
    /// Manage users (the running server picks changes up within a second).
    #[command(subcommand)]
    User(UserCommand),
    /// Manage signup invite tokens (`local-proxy signup --invite TOKEN`).
    #[command(subcommand)]
    Invite(InviteCommand),
    /// Bytes moved per user and day or month, as a table or JSON; `usage reset NAME`.
    Usage(UsageArgs),
    /// Print this server's TLS identity (`sha256:...`), the value users pin with
    /// `local-proxy --pin` or compare when they run `local-proxy trust`. Makes the identity
    /// first if there is none yet.
    Identity {
        /// Print the identity of this certificate (PEM) instead of the state directory's.
        #[arg(long, value_name = "FILE")]
        tls_cert: Option<PathBuf>,
    },
}

/// Flags of `remote-proxy serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default; use 0.0.0.0:PORT to serve other hosts).
    #[arg(long, default_value_t = config::DEFAULT_REMOTE_LISTEN)]
    pub listen: SocketAddr,
    /// Let `local-proxy signup` create accounts.
    #[arg(long)]
    pub allow_signup: bool,
    /// Bandwidth of accounts created by signup.
    #[arg(long, default_value_t = config::DEFAULT_SIGNUP_BANDWIDTH, value_name = "RATE")]
    pub signup_bandwidth: Bandwidth,
    /// Signups per client IP, as N/PERIOD (sliding window), or off.
    #[arg(
        long,
        value_name = "N/PERIOD",
        default_value_t = MaybeRate(Some(config::DEFAULT_SIGNUP_RATE))
    )]
    pub signup_rate: MaybeRate,
    /// Refuse signups once the database holds this many users.
    #[arg(long, value_name = "N")]
    pub max_users: Option<u32>,
    /// Refuse signups that bring no valid invite token (`remote-proxy invite create`).
    #[arg(long, requires = "allow_signup")]
    pub signup_requires_invite: bool,
    /// New tunnels per client IP, as N/s, N/m, N/h or N/d (sliding window), or off.
    /// Counted when the connection is accepted, so a refused one costs no slot or worker.
    #[arg(long, value_name = "N/PERIOD", default_value_t = MaybeRate(None))]
    pub rate_per_ip: MaybeRate,
    /// Most connections from one client IP in their handshake (not yet authenticated) at
    /// once; more from that address wait unread, holding no thread, while other addresses
    /// pass them (`none` = no cap).
    #[arg(
        long,
        value_name = "N",
        default_value_t = Cap(Some(config::DEFAULT_MAX_HANDSHAKES_PER_IP))
    )]
    pub max_handshakes_per_ip: Cap,
    /// Most idle connections parked per client IP (local-proxy's `--warm` ones, and new
    /// ones that have not spoken yet); past it a warm one is closed and a new one waits on
    /// a worker (`none` = no cap).
    #[arg(
        long,
        value_name = "N",
        default_value_t = Cap(Some(config::DEFAULT_MAX_IDLE_PER_IP))
    )]
    pub max_idle_per_ip: Cap,
    /// How long a warm connection may wait for its app before it is closed (local-proxy
    /// replaces it).
    #[arg(long, default_value_t = HumanDuration(config::DEFAULT_WARM_IDLE_TIMEOUT), value_name = "DURATION")]
    pub warm_idle_timeout: HumanDuration,
    /// How often byte counts are written to the database (also when a tunnel closes and at
    /// shutdown): what a crash can lose.
    #[arg(long, default_value_t = HumanDuration(config::DEFAULT_FLUSH_INTERVAL), value_name = "DURATION")]
    pub flush_interval: HumanDuration,
    /// Also give each user's bytes a series of their own in the metrics (user names as
    /// labels: the most active --metrics-max-users, the rest summed as `other`).
    #[arg(long)]
    pub metrics_per_user: bool,
    /// Users with their own series under --metrics-per-user.
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_METRICS_MAX_USERS)]
    pub metrics_max_users: usize,
    /// Failed logins per client IP and user name before that user's further logins from
    /// there are refused without checking, as N/PERIOD, or off.
    #[arg(
        long,
        value_name = "N/PERIOD",
        default_value_t = MaybeRate(Some(config::DEFAULT_FAILED_LOGIN_RATE))
    )]
    pub failed_login_rate: MaybeRate,
    /// Failed logins per client IP over all user names, as N/PERIOD, or off (the limit above
    /// is per address and user name, so one user's typos do not lock out the others behind
    /// the same local-proxy).
    #[arg(
        long,
        value_name = "N/PERIOD",
        default_value_t = MaybeRate(Some(config::DEFAULT_FAILED_LOGIN_RATE_PER_IP))
    )]
    pub failed_login_rate_per_ip: MaybeRate,
    /// Use this certificate chain (PEM, end-entity first) instead of the generated
    /// identity: a CA-issued certificate, or one shared by all remotes of a fleet.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        conflicts_with = "plaintext"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert; keep it owner-only (chmod 600).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// No TLS: tunnels, passwords included, cross the network in clear. Only for trusted
    /// networks (loopback, a VPN link); local-proxy needs --plaintext too.
    #[arg(long)]
    pub plaintext: bool,
    /// Allow --plaintext on a listen address that is not loopback.
    #[arg(long, requires = "plaintext")]
    pub plaintext_on_public: bool,
    /// Let tunnels reach this range although the built-in deny list covers it (a private
    /// network behind the proxy; 127.0.0.1 for a local test); give it several times.
    /// remote-proxy's own listening sockets stay refused.
    #[arg(long, value_name = "CIDR")]
    pub allow_dest: Vec<crate::limit::destinations::Cidr>,
    /// Refuse tunnels to this range too, even where --allow-dest opens it; repeatable.
    #[arg(long, value_name = "CIDR")]
    pub deny_dest: Vec<crate::limit::destinations::Cidr>,
    /// Refuse tunnels to this port (for example 25, against spam); repeatable.
    #[arg(long, value_name = "PORT")]
    pub deny_port: Vec<u16>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Where local-proxy keeps the remotes it trusts (serving, and `local-proxy trust`).
#[derive(Debug, Args)]
pub struct KnownRemotesArg {
    /// Without --pin or --ca, remotes must be in this file; `local-proxy trust HOST:PORT`
    /// records one.
    #[arg(
        long,
        value_name = "FILE",
        env = "FLOWGATE_KNOWN_REMOTES",
        default_value_os_t = crate::tls::default_known_remotes_path()
    )]
    pub known_remotes: PathBuf,
}

/// How local-proxy secures its tunnels; shared by serving and the subcommands that talk to
/// a remote.
#[derive(Debug, Args)]
pub struct HopArgs {
    /// Accept a remote whose certificate hashes to this (`sha256:<hex>`, as `remote-proxy
    /// identity` prints it); give it several times for a fleet or a key rotation.
    #[arg(long, value_name = "sha256:HEX", conflicts_with_all = ["ca", "plaintext"])]
    pub pin: Vec<crate::tls::Fingerprint>,
    /// Verify remotes' certificate chains and host names against this CA bundle (PEM).
    #[arg(long, value_name = "FILE", conflicts_with = "plaintext")]
    pub ca: Option<PathBuf>,
    #[command(flatten)]
    pub known: KnownRemotesArg,
    /// No TLS: credentials and data cross the network in clear. Only for trusted networks
    /// (loopback, a VPN link), against a remote-proxy started with --plaintext.
    #[arg(long)]
    pub plaintext: bool,
}

impl HopArgs {
    /// The TLS settings these flags ask for.
    pub fn tls(&self) -> config::LocalTls {
        if self.plaintext {
            config::LocalTls::Plaintext
        } else if !self.pin.is_empty() {
            config::LocalTls::Pins(self.pin.clone())
        } else if let Some(ca) = &self.ca {
            config::LocalTls::Ca(ca.clone())
        } else {
            config::LocalTls::KnownRemotes(self.known.known_remotes.clone())
        }
    }
}

/// Flags both proxies share.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Longest time a client may take to send its whole handshake (e.g. 10s, 500ms).
    #[arg(long, default_value_t = HumanDuration(config::DEFAULT_HANDSHAKE_TIMEOUT), value_name = "DURATION")]
    pub handshake_timeout: HumanDuration,
    /// A client that sends nothing at all is closed after this (within the handshake
    /// timeout).
    #[arg(long, default_value_t = HumanDuration(config::DEFAULT_FIRST_BYTE_TIMEOUT), value_name = "DURATION")]
    pub first_byte_timeout: HumanDuration,
    /// Longest wait to connect to the next hop.
    #[arg(long, default_value_t = HumanDuration(config::DEFAULT_CONNECT_TIMEOUT), value_name = "DURATION")]
    pub connect_timeout: HumanDuration,
    /// Close a tunnel after this long with no bytes either way (0 = never).
    #[arg(long, default_value_t = HumanDuration(config::DEFAULT_IDLE_TIMEOUT), value_name = "DURATION")]
    pub idle_timeout: HumanDuration,
    /// Tunnels served at once; further connections wait, unread and in order, for a slot.
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONNECTIONS, value_name = "N")]
    pub max_connections: usize,
    /// Connections waiting for a slot at most; one more is answered "server busy" at once.
    #[arg(long, default_value_t = config::DEFAULT_MAX_QUEUED, value_name = "N")]
    pub max_queued: usize,
    /// Most worker threads (each tunnel needs one, two when splice is unavailable)
    /// [default: twice --max-connections, plus 64]
    #[arg(long, value_name = "N")]
    pub max_workers: Option<usize>,
    /// An idle worker thread beyond a few spares exits after this long without work.
    #[arg(long, default_value_t = HumanDuration(config::DEFAULT_WORKER_IDLE_TIMEOUT), value_name = "DURATION")]
    pub worker_idle_timeout: HumanDuration,
    /// On SIGTERM or SIGINT: stop taking new tunnels, let open ones finish for this long,
    /// then exit (a second signal exits at once).
    #[arg(long, default_value_t = HumanDuration(config::DEFAULT_GRACE), value_name = "DURATION")]
    pub grace: HumanDuration,
    /// Longest wait for a slot before the answer is "server busy".
    #[arg(long, default_value_t = HumanDuration(config::DEFAULT_QUEUE_TIMEOUT), value_name = "DURATION")]
    pub queue_timeout: HumanDuration,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default). A bare port
    /// listens on loopback; give an address (0.0.0.0:9180) to serve other hosts.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<MetricsAddr>,
}

/// `--metrics-listen`: `HOST:PORT`, or a bare port on 127.0.0.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub SocketAddr);

impl std::str::FromStr for MetricsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(port) = s.trim().parse::<u16>() {
            return Ok(MetricsAddr(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        s.trim()
            .parse()
            .map(MetricsAddr)
            .map_err(|_| format!("bad metrics address {s:?}: use PORT, IP:PORT or [IPv6]:PORT"))
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl CommonArgs {
    fn timeouts(&self) -> Timeouts {
        Timeouts {
            handshake: self.handshake_timeout.0,
            first_byte: self.first_byte_timeout.0,
            connect: self.connect_timeout.0,
            idle: (!self.idle_timeout.0.is_zero()).then_some(self.idle_timeout.0),
            grace: self.grace.0,
        }
    }

    fn pool(&self) -> Result<PoolConfig, String> {
        let max_connections = self.max_connections.max(1);
        let max_workers = self
            .max_workers
            .unwrap_or_else(|| config::default_max_workers(max_connections));
        if max_workers < max_connections {
            return Err(format!(
                "--max-workers {max_workers} is below --max-connections {max_connections}: \
                 every tunnel needs a worker"
            ));
        }
        Ok(PoolConfig {
            max_workers,
            idle_timeout: self.worker_idle_timeout.0,
        })
    }

    fn admission(&self) -> Limits {
        Limits {
            max_active: self.max_connections.max(1),
            max_queued: self.max_queued,
            timeout: self.queue_timeout.0,
            max_handshakes_per_key: None,
            max_idle_per_key: None,
        }
    }
}

/// Per-user limits on `user add` and `user set`.
#[derive(Debug, Args)]
pub struct UserLimitArgs {
    /// Most tunnels this user may have at once; more wait for one to end (`none` = no cap).
    #[arg(long, value_name = "K")]
    pub max_connections: Option<Cap>,
    /// Most new tunnels for this user per period, as N/s, N/m, N/h or N/d (`none` = no limit).
    #[arg(long, value_name = "N/PERIOD")]
    pub rate: Option<MaybeRate>,
    /// Most bytes (up plus down) per calendar period in UTC: 10GB/month, 500MiB/day,
    /// 50G/week (units as for --bandwidth; `none` = no quota).
    #[arg(long, value_name = "AMOUNT/PERIOD")]
    pub quota: Option<MaybeQuota>,
}

/// A remote-proxy address as given to `--remote`: `HOST:PORT`, `IPv4:PORT` or `[IPv6]:PORT`,
/// checked at start so a typo is a CLI error instead of a failure at the first tunnel. Kept
/// as text: a host name is resolved when connecting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteAddr(pub String);

impl std::str::FromStr for RemoteAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        crate::proto::addr::TargetAddr::parse_authority(s, None)
            .map(|_| RemoteAddr(s.to_string()))
            .map_err(|e| {
                format!("bad remote-proxy address {s:?} ({e}): give HOST:PORT with a port 1-65535")
            })
    }
}

/// A connection cap: a positive number, or `none` (also `off`, `0`) for no cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub Option<u32>);

impl std::fmt::Display for Cap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("none"),
        }
    }
}

impl std::str::FromStr for Cap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "none" | "off" | "0" => Ok(Cap(None)),
            n => n
                .parse::<u32>()
                .map(|c| Cap(Some(c)))
                .map_err(|_| format!("bad connection cap {n:?} (a number, or none)")),
        }
    }
}

impl std::fmt::Display for MaybeRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(r) => write!(f, "{r}"),
            None => f.write_str("off"),
        }
    }
}

/// A request rate (`N/s`, `N/m`, `N/h`, `N/d`), or `none`/`off` for no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaybeRate(pub Option<RequestRate>);

impl std::str::FromStr for MaybeRate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "none" | "off" => Ok(MaybeRate(None)),
            r => r
                .parse()
                .map(|r| MaybeRate(Some(r)))
                .map_err(|e: crate::limit::rate::RequestRateError| e.to_string()),
        }
    }
}

/// `remote-proxy user ...`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user.
    Add {
        /// User name: 1-64 of A-Z a-z 0-9 . _ @ -
        name: String,
        /// Bytes per second for everything the user forwards: 500K, 2M, 1G (x1000), KiB,
        /// MiB, GiB (x1024), optional /s, or unlimited.
        #[arg(long, value_name = "RATE")]
        bandwidth: Bandwidth,
        #[command(flatten)]
        password: PasswordArgs,
        #[command(flatten)]
        limits: UserLimitArgs,
    },
    /// Change a user's bandwidth and/or password.
    Set {
        /// User name.
        name: String,
        /// New bandwidth (see `user add`).
        #[arg(long, value_name = "RATE")]
        bandwidth: Option<Bandwidth>,
        #[command(flatten)]
        password: PasswordArgs,
        #[command(flatten)]
        limits: UserLimitArgs,
    },
    /// Delete a user; their new tunnels are refused at once.
    Del {
        /// User name.
        name: String,
    },
    /// List users: limits, quota, usage today and this month, last seen, open tunnels.
    List {
        /// Exact byte counts instead of 1.2 GB.
        #[arg(long)]
        bytes: bool,
    },
    /// One user in detail: limits, quota and what is left of it, recent usage.
    Show {
        /// User name.
        name: String,
        /// Exact byte counts instead of 1.2 GB.
        #[arg(long)]
        bytes: bool,
    },
}

/// `remote-proxy usage ...`: bytes moved per user and period.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct UsageArgs {
    #[command(subcommand)]
    pub reset: Option<UsageCommand>,
    /// Only this user.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// From this UTC date on (YYYY-MM-DD or YYYY-MM); default: the start of this month.
    #[arg(long, value_name = "DATE")]
    pub since: Option<crate::limit::calendar::Date>,
    /// One row per user and day, or per user and month.
    #[arg(long, value_enum, default_value_t = UsageBy::Day)]
    pub by: UsageBy,
    /// An array of objects {user, period, up_bytes, down_bytes} instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Exact byte counts instead of 1.2 GB.
    #[arg(long)]
    pub bytes: bool,
}

/// How `usage` groups its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UsageBy {
    /// `2026-12-01`.
    Day,
    /// `2026-12`.
    Month,
}

/// `remote-proxy usage reset NAME`.
#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Forgive what NAME used in the current quota period: the quota starts again from
    /// zero now, and a running server lets the user in again at once.
    Reset {
        /// User name.
        name: String,
    },
}

/// `remote-proxy invite ...`.
#[derive(Debug, Subcommand)]
pub enum InviteCommand {
    /// Make an invite token and print it (it is shown this once; the database keeps only
    /// its hash).
    Create {
        /// Signups the token allows.
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
        /// How long it stays valid, as a duration (`7d`, `12h`, at most `30d`), or `never`.
        #[arg(long, value_name = "DURATION", default_value = "7d")]
        expires: Expiry,
    },
    /// List invites: id, uses left, expiry (the tokens themselves are not stored).
    List,
    /// Delete an invite by the id `invite list` shows; its token stops working at once.
    Revoke {
        /// The invite's id.
        id: String,
    },
}

/// How long an invite stays valid: a duration, or `never`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry(pub Option<Duration>);

impl std::str::FromStr for Expiry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "never" | "none" => Ok(Expiry(None)),
            d => parse_duration(d).map(|d| Expiry(Some(d))),
        }
    }
}

/// Where a password comes from.
#[derive(Debug, Args)]
pub struct PasswordArgs {
    /// Read the password from the first line of standard input.
    #[arg(long, conflicts_with = "password")]
    pub password_stdin: bool,
    /// The password itself (visible in `ps`; for scripts on a single-user machine).
    #[arg(long, value_name = "PASSWORD")]
    pub password: Option<String>,
}

impl PasswordArgs {
    /// The password if one was given by flag or stdin; `None` when neither was asked for.
    pub fn given(&self) -> Result<Option<String>, String> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        if self.password_stdin {
            return read_stdin_line().map(Some);
        }
        Ok(None)
    }

    /// The password from flag, stdin, or an interactive prompt.
    pub fn required(&self) -> Result<String, String> {
        match self.given()? {
            Some(p) => Ok(p),
            None => prompt("password: "),
        }
    }
}

fn read_stdin_line() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read password from stdin: {e}"))?;
    let p = line.trim_end_matches(['\r', '\n']).to_string();
    if p.is_empty() {
        return Err("empty password on stdin".into());
    }
    Ok(p)
}

fn prompt(text: &str) -> Result<String, String> {
    rpassword::prompt_password(text)
        .map_err(|e| format!("cannot prompt for a password ({e}); use --password-stdin"))
}

/// local-proxy: SOCKS5 and HTTP proxy for apps, carrying each connection through a tunnel
/// to remote-proxy.
#[derive(Debug, Parser)]
#[command(name = "local-proxy", version, args_conflicts_with_subcommands = true)]
pub struct LocalCli {
    #[command(subcommand)]
    pub command: Option<LocalCommand>,
    #[command(flatten)]
    pub run: LocalArgs,
}

/// local-proxy subcommands.
#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Check the settings (from --config and flags) and print the effective ones.
    CheckConfig(Box<LocalArgs>),
    /// Create an account on a remote-proxy started with --allow-signup.
    Signup {
        /// remote-proxy address, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        remote: RemoteAddr,
        /// The new account's name.
        #[arg(long)]
        user: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// An invite token from the remote's operator (`remote-proxy invite create`).
        #[arg(
            long,
            value_name = "TOKEN",
            env = "FLOWGATE_INVITE",
            hide_env_values = true
        )]
        invite: Option<String>,
        #[command(flatten)]
        hop: HopArgs,
    },
    /// Check each remote-proxy once: reachable, and whether it accepts the credentials;
    /// one line per remote, exit 0 when every one is fine, 1 otherwise.
    Check {
        /// remote-proxy address, HOST:PORT; give it several times.
        #[arg(long, value_name = "HOST:PORT", required = true)]
        remote: Vec<RemoteAddr>,
        /// The account to check. Password from --password-stdin, FLOWGATE_PASSWORD, or a
        /// prompt.
        #[arg(long)]
        user: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        hop: HopArgs,
    },
    /// Connect to a remote-proxy, show its TLS identity and, once confirmed, record it in
    /// the known-remotes file; compare it with what the remote's operator gave you
    /// (`remote-proxy identity`).
    Trust {
        /// remote-proxy address, HOST:PORT, as given to --remote.
        remote: RemoteAddr,
        /// Record without asking (for scripts that got the identity another way).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        known: KnownRemotesArg,
    },
}

/// Flags of `local-proxy` (serving).
#[derive(Debug, Args)]
pub struct LocalArgs {
    /// Settings from this TOML file: keys are the flags' long names (`listen`,
    /// `remote = [...]`); flags on the command line win.
    #[arg(long, value_name = "FILE", env = "FLOWGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address apps connect to (SOCKS5 and HTTP on the same port).
    #[arg(long, default_value_t = config::DEFAULT_LOCAL_LISTEN)]
    pub listen: SocketAddr,
    /// remote-proxy address, HOST:PORT; give it several times for several remote-proxies.
    #[arg(long, value_name = "HOST:PORT")]
    pub remote: Vec<RemoteAddr>,
    /// How new tunnels are spread over several remotes: sticky keeps each user on one
    /// remote (their bandwidth budget stays whole); least-connections and round-robin split
    /// a user's budget over the remotes.
    #[arg(long, value_enum, default_value_t = config::Balance::default())]
    pub balance: config::Balance,
    /// Time between health probes of each remote.
    #[arg(long, default_value_t = HumanDuration(config::DEFAULT_HEALTH_INTERVAL), value_name = "DURATION")]
    pub health_interval: HumanDuration,
    /// Longest wait for a health probe's answer.
    #[arg(long, default_value_t = HumanDuration(config::DEFAULT_HEALTH_TIMEOUT), value_name = "DURATION")]
    pub health_timeout: HumanDuration,
    /// Good probes in a row that bring a down remote back.
    #[arg(long, default_value_t = config::DEFAULT_RISE, value_name = "N")]
    pub health_rise: u32,
    /// Failed probes in a row that take a remote down (one failed tunnel does it at once).
    #[arg(long, default_value_t = config::DEFAULT_FALL, value_name = "N")]
    pub health_fall: u32,
    /// Connections kept open and ready (TCP connected, TLS done) to each healthy remote,
    /// so a new tunnel sends its request at once; 0 turns them off.
    #[arg(long, default_value_t = config::DEFAULT_WARM, value_name = "N")]
    pub warm: usize,
    /// Account used when an app sends no credentials. Password from --password-file,
    /// --password-stdin, FLOWGATE_PASSWORD, or a prompt. Without it, apps must send
    /// credentials.
    #[arg(long)]
    pub user: Option<String>,
    /// Read the password of --user from the first line of standard input.
    #[arg(long, conflicts_with = "password_file")]
    pub password_stdin: bool,
    /// Read the password of --user from the first line of this file (keep it owner-only).
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    #[command(flatten)]
    pub hop: HopArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The environment variable naming the pipe [`hide_password_from_environ`] handed
/// FLOWGATE_PASSWORD over.
const PASSWORD_FD: &str = "FLOWGATE_PASSWORD_FD";

/// FLOWGATE_PASSWORD would stay readable in /proc/PID/environ for the life of the process:
/// the kernel shows the environment as it was at exec, whatever the process does to it
/// later. So local-proxy execs itself once without it, handing the password over a pipe.
/// Call first thing in `main`, before any thread. Returns only when there was nothing to
/// hide or the exec failed (then with a warning, and the variable is used as it is).
pub fn hide_password_from_environ() {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let Some(pw) = std::env::var_os("FLOWGATE_PASSWORD").filter(|p| !p.is_empty()) else {
        return;
    };
    if std::env::var_os(PASSWORD_FD).is_some() {
        return;
    }
    let handed = || -> std::io::Result<std::os::fd::OwnedFd> {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        let (read, write) = nix::unistd::pipe()?;
        // The writing end closes at exec, so the new process reads to the end of the pipe.
        fcntl(&write, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        let mut line = std::os::unix::ffi::OsStrExt::as_bytes(pw.as_os_str()).to_vec();
        line.push(b'\n');
        std::fs::File::from(write).write_all(&line)?;
        Ok(read)
    };
    let err = match (handed(), std::env::current_exe()) {
        (Ok(read), Ok(exe)) => {
            use std::os::fd::AsRawFd;
            let mut args = std::env::args_os();
            let mut cmd = std::process::Command::new(exe);
            if let Some(arg0) = args.next() {
                cmd.arg0(arg0);
            }
            cmd.args(args)
                .env_remove("FLOWGATE_PASSWORD")
                .env(PASSWORD_FD, read.as_raw_fd().to_string())
                .exec()
        }
        (Err(e), _) | (_, Err(e)) => e,
    };
    eprintln!(
        "warning: cannot hide FLOWGATE_PASSWORD from /proc/PID/environ ({err}); it stays there"
    );
}

/// The password [`hide_password_from_environ`] handed over, if any (the pipe is closed
/// once read).
fn handed_password() -> Option<Result<String, String>> {
    let fd: i32 = std::env::var(PASSWORD_FD).ok()?.parse().ok()?;
    std::env::remove_var(PASSWORD_FD);
    let read = std::fs::read_to_string(format!("/proc/self/fd/{fd}"));
    let _ = nix::unistd::close(fd);
    Some(match read {
        Ok(text) => Ok(text.lines().next().unwrap_or("").to_string()),
        Err(e) => Err(format!("cannot read the password handed over: {e}")),
    })
}

/// Closes the pipe of a handed-over password nobody asked for (no --user).
pub fn forget_handed_password() {
    let _ = handed_password();
}

/// Reads a password for local-proxy: stdin flag, then FLOWGATE_PASSWORD (handed over a
/// pipe by [`hide_password_from_environ`]), then a prompt.
fn local_password(password_stdin: bool) -> Result<String, String> {
    if password_stdin {
        return read_stdin_line();
    }
    if let Some(p) = handed_password() {
        return p;
    }
    if let Ok(p) = std::env::var("FLOWGATE_PASSWORD") {
        if !p.is_empty() {
            return Ok(p);
        }
    }
    prompt("password: ")
}

/// The first line of `path` (`--password-file`), without its line ending.
fn password_from_file(path: &std::path::Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "warning: password file {} is readable by others (chmod 600 it)",
                path.display()
            );
        }
    }
    let line = text.lines().next().unwrap_or("").to_string();
    if line.is_empty() {
        return Err(format!("{}: the first line is empty", path.display()));
    }
    Ok(line)
}

impl ServeArgs {
    /// Builds the validated config.
    ///
    /// # Errors
    /// Flags that contradict each other.
    pub fn into_config(
        self,
        db: crate::users::Db,
        state_dir: PathBuf,
    ) -> Result<RemoteConfig, String> {
        let mut cfg = RemoteConfig::new(db);
        cfg.tls = match (self.plaintext, self.tls_cert, self.tls_key) {
            (true, _, _) => config::RemoteTls::Plaintext {
                public: self.plaintext_on_public,
            },
            (false, Some(cert), Some(key)) => config::RemoteTls::Files { cert, key },
            (false, None, None) => config::RemoteTls::StateDir(state_dir),
            _ => return Err("--tls-cert and --tls-key go together".into()),
        };
        cfg.listen = self.listen;
        cfg.allow_signup = self.allow_signup;
        cfg.signup_bandwidth = self.signup_bandwidth;
        cfg.signup_rate = self.signup_rate.0;
        cfg.max_users = self.max_users;
        cfg.warm_idle_timeout = self.warm_idle_timeout.0;
        if self.flush_interval.0.is_zero() {
            return Err("--flush-interval must be above zero".into());
        }
        cfg.flush_interval = self.flush_interval.0;
        cfg.metrics = config::MetricsConfig {
            listen: self.common.metrics_listen.map(|m| m.0),
            per_user: self.metrics_per_user,
            max_users: self.metrics_max_users,
        };
        cfg.signup_requires_invite = self.signup_requires_invite;
        cfg.timeouts = self.common.timeouts();
        cfg.admission = Limits {
            max_handshakes_per_key: self.max_handshakes_per_ip.0.map(|n| n as usize),
            max_idle_per_key: self.max_idle_per_ip.0.map(|n| n as usize),
            ..self.common.admission()
        };
        cfg.pool = self.common.pool()?;
        cfg.rate_per_ip = self.rate_per_ip.0;
        cfg.destinations.allow = self.allow_dest;
        cfg.destinations.deny = self.deny_dest;
        cfg.destinations.deny_ports = self.deny_port;
        cfg.failed_login_rate = self.failed_login_rate.0;
        cfg.failed_login_rate_per_ip = self.failed_login_rate_per_ip.0;
        Ok(cfg)
    }
}

impl LocalArgs {
    /// Validates the settings as [`into_config`](Self::into_config) would, without asking
    /// for or reading the password (a password file must be there and readable).
    ///
    /// # Errors
    /// What `into_config` would say.
    pub fn check(mut self) -> Result<LocalConfig, String> {
        if let Some(f) = &self.password_file {
            password_from_file(f)?;
        }
        if self.user.is_none() && (self.password_stdin || self.password_file.is_some()) {
            return Err("--password-stdin and --password-file need --user".into());
        }
        self.user = None;
        self.password_stdin = false;
        self.password_file = None;
        self.into_config()
    }

    /// Builds the validated config, reading the password if `--user` is set.
    pub fn into_config(self) -> Result<LocalConfig, String> {
        if self.remote.is_empty() {
            return Err("--remote HOST:PORT is required (where remote-proxy listens)".into());
        }
        let remotes: Vec<String> = self.remote.into_iter().map(|r| r.0).collect();
        let credentials = match self.user {
            Some(user) => {
                let password = match &self.password_file {
                    Some(f) => password_from_file(f)?,
                    None => local_password(self.password_stdin)?,
                };
                Some(Credentials::new(user, password)?)
            }
            None if self.password_stdin || self.password_file.is_some() => {
                return Err("--password-stdin and --password-file need --user".into());
            }
            None => None,
        };
        let mut cfg = LocalConfig::new(remotes, credentials);
        cfg.upstreams.balance = self.balance;
        cfg.upstreams.health_interval = self.health_interval.0.max(Duration::from_millis(100));
        cfg.upstreams.health_timeout = self.health_timeout.0.max(Duration::from_millis(10));
        cfg.upstreams.rise = self.health_rise.max(1);
        cfg.upstreams.fall = self.health_fall.max(1);
        cfg.upstreams.warm = self.warm.min(config::MAX_WARM);
        cfg.listen = self.listen;
        cfg.timeouts = self.common.timeouts();
        cfg.admission = self.common.admission();
        cfg.pool = self.common.pool()?;
        cfg.tls = self.hop.tls();
        cfg.metrics = self.common.metrics_listen.map(|m| m.0);
        Ok(cfg)
    }
}

impl UserLimitArgs {
    /// The limit changes these flags ask for.
    pub fn changes(&self) -> Changes {
        Changes {
            max_connections: self.max_connections.map(|c| c.0),
            rate: self.rate.map(|r| r.0),
            quota: self.quota.map(|q| q.0),
            ..Changes::default()
        }
    }
}

impl LocalCommand {
    /// Credentials for signup.
    pub fn signup_credentials(user: &str, password_stdin: bool) -> Result<Credentials, String> {
        Credentials::new(user.to_string(), local_password(password_stdin)?)
    }
}

/// Parses the command line. `--help` and `--version` print and exit 0; a mistake prints one
/// line, `NAME: <what is wrong>`, and exits 2, so scripts see a single clear error.
pub fn parse_or_exit<T: Parser>(name: &str) -> T {
    match file::parse::<T>(std::env::args_os().collect()) {
        Ok(t) => t,
        Err(Ok(line)) => {
            eprintln!("{name}: {line}");
            std::process::exit(2);
        }
        Err(Err(e)) => clap_error(name, e),
    }
}

/// Prints clap's error as one line (or its help and version as they are) and exits.
fn clap_error(name: &str, e: clap::Error) -> ! {
    match e {
        e if !e.use_stderr() => e.exit(),
        e => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("{name}: {first} (see --help)");
            std::process::exit(2);
        }
    }
}

/// A duration as operators write it: `10`, `10s`, `500ms`, `2m`, `1h`, `1d` (a bare number is
/// seconds), at most [`config::MAX_DURATION`]. Prints back in the same form, so `--help`
/// shows each default as it would be typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s).map(HumanDuration)
    }
}

impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, per) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms % per == 0 {
                return write!(f, "{}{unit}", ms / per);
            }
        }
        write!(f, "{ms}ms")
    }
}

/// Parses `10`, `10s`, `500ms`, `2m`, `1h`, `1d` into a duration (a bare number is seconds).
///
/// # Errors
/// Not a number with a known unit, or longer than [`config::MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let ms_per = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("bad duration unit {unit:?} (use ms, s, m, h, d)")),
    };
    let too_long = || {
        format!(
            "duration {s:?} is too long (at most {})",
            HumanDuration(config::MAX_DURATION)
        )
    };
    let n: u64 = match num.parse() {
        Ok(n) => n,
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => return Err(too_long()),
        Err(_) => return Err(format!("bad duration {s:?} (e.g. 10s, 500ms, 2m)")),
    };
    let ms = n.checked_mul(ms_per).ok_or_else(too_long)?;
    let d = Duration::from_millis(ms);
    if d > config::MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// What `user set` changed, for its one line of output: `bandwidth 300K/s, password`.
pub fn describe_changes(c: &Changes) -> String {
    let mut parts = Vec::new();
    if let Some(bw) = c.bandwidth {
        parts.push(format!("bandwidth {bw}"));
    }
    if c.password.is_some() {
        parts.push("password".to_string());
    }
    if let Some(cap) = c.max_connections {
        parts.push(format!(
            "max-connections {}",
            cap.map_or("none".into(), |n| n.to_string())
        ));
    }
    if let Some(rate) = c.rate {
        parts.push(format!(
            "rate {}",
            rate.map_or("none".into(), |r| r.to_string())
        ));
    }
    if let Some(quota) = c.quota {
        parts.push(format!(
            "quota {}",
            quota.map_or("none".into(), |q| q.to_string())
        ));
    }
    parts.join(", ")
}

/// A byte count as people read it: `1.2 GB`, `340 kB`, `12 B` (decimal units, as `MB`
/// means in --bandwidth and --quota); exact with `exact`.
pub fn human_bytes(n: u64, exact: bool) -> String {
    if exact || n < 1000 {
        return format!("{n} B");
    }
    let units = ["kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = n as f64 / 1000.0;
    let mut i = 0;
    while v >= 999.95 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if v < 10.0 {
        format!("{v:.1} {}", units[i])
    } else {
        format!("{v:.0} {}", units[i])
    }
}

/// Seconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS` in UTC (the civil-from-days
/// algorithm from Howard Hinnant's date library; no time-zone database needed).
pub fn utc_timestamp(secs: i64) -> String {
    crate::limit::calendar::timestamp(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        RemoteCli::command().debug_assert();
        LocalCli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_parses_with_its_defaults() {
        // Catches derive mismatches that only show when clap converts the values.
        let serve = RemoteCli::try_parse_from(["remote-proxy", "serve"]).unwrap();
        let RemoteCommand::Serve(args) = serve.command else {
            panic!("not serve")
        };
        let cfg = args
            .into_config(crate::users::Db::Sqlite("x.db".into()), ".".into())
            .unwrap();
        assert_eq!(cfg.rate_per_ip, None);
        assert_eq!(cfg.failed_login_rate, Some("10/m".parse().unwrap()));
        assert_eq!(
            cfg.admission,
            RemoteConfig::new(std::path::PathBuf::from("x.db")).admission
        );
        assert_eq!(cfg.admission.max_handshakes_per_key, Some(32));
        let set = RemoteCli::try_parse_from([
            "remote-proxy",
            "user",
            "set",
            "a",
            "--max-connections",
            "none",
            "--rate",
            "5/m",
        ])
        .unwrap();
        let RemoteCommand::User(UserCommand::Set { limits, .. }) = set.command else {
            panic!("not set")
        };
        let ch = limits.changes();
        assert_eq!(ch.max_connections, Some(None));
        assert_eq!(ch.rate, Some(Some("5/m".parse().unwrap())));
        let local = LocalCli::try_parse_from(["local-proxy", "--remote", "r:1"]).unwrap();
        assert_eq!(local.run.into_config().unwrap().admission.max_queued, 1024);
        assert!(LocalCli::try_parse_from([
            "local-proxy",
            "signup",
            "--remote",
            "r:1",
            "--user",
            "u"
        ])
        .is_ok());
    }

    #[test]
    fn timestamps_print_as_utc_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01 00:00:00");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_timestamp(1_796_154_067), "2026-12-01 19:41:07");
        assert_eq!(utc_timestamp(-1), "1969-12-31 23:59:59");
    }

    #[test]
    fn byte_counts_print_with_units_people_read() {
        assert_eq!(human_bytes(12, false), "12 B");
        assert_eq!(human_bytes(1_234, false), "1.2 kB");
        assert_eq!(human_bytes(340_000, false), "340 kB");
        assert_eq!(human_bytes(1_200_000_000, false), "1.2 GB");
        assert_eq!(human_bytes(999_999, false), "1.0 MB");
        assert_eq!(human_bytes(1_200_000_000, true), "1200000000 B");
    }

    #[test]
    fn user_set_says_what_changed() {
        let c = Changes {
            bandwidth: Some("300K".parse().unwrap()),
            password: Some("x".into()),
            max_connections: Some(None),
            rate: Some(Some("5/m".parse().unwrap())),
            quota: Some(Some("10G/month".parse().unwrap())),
        };
        assert_eq!(
            describe_changes(&c),
            "bandwidth 300K/s, password, max-connections none, rate 5/m, quota 10G/month"
        );
    }

    #[test]
    fn remote_addresses_are_checked_at_start() {
        for ok in [
            "127.0.0.1:7080",
            "[::1]:7080",
            "proxy.example:7080",
            "localhost:1",
        ] {
            assert!(ok.parse::<RemoteAddr>().is_ok(), "{ok}");
        }
        for bad in [
            "localhost",
            "127.0.0.1:99999",
            "127.0.0.1:0",
            ":7080",
            "[::1]",
            "a b:1",
        ] {
            assert!(bad.parse::<RemoteAddr>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("30d"), Ok(config::MAX_DURATION));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5w").is_err());
        // Regression: these overflowed (`n * 3600`) or later panicked adding the
        // duration to the clock.
        for huge in [
            "31d",
            "5124095576030431h",
            "18446744073709551615s",
            "99999999999999999999",
        ] {
            let e = parse_duration(huge).unwrap_err();
            assert!(
                e.contains("too long") || e.contains("bad duration"),
                "{huge}: {e}"
            );
        }
        for d in ["0s", "500ms", "10s", "2m", "1h", "1d", "90s", "1500ms"] {
            let parsed = parse_duration(d).unwrap();
            assert_eq!(HumanDuration(parsed).to_string(), d);
        }
    }

    #[test]
    fn user_add_parses_rates_and_rejects_bad_ones() {
        let ok = RemoteCli::try_parse_from([
            "remote-proxy",
            "--db",
            "x.db",
            "user",
            "add",
            "alice",
            "--bandwidth",
            "2MiB/s",
            "--password",
            "pw",
        ])
        .unwrap();
        match ok.command {
            RemoteCommand::User(UserCommand::Add { bandwidth, .. }) => {
                assert_eq!(bandwidth.limit(), Some(2 << 20))
            }
            other => panic!("{other:?}"),
        }
        assert!(RemoteCli::try_parse_from([
            "remote-proxy",
            "user",
            "add",
            "alice",
            "--bandwidth",
            "fast",
        ])
        .is_err());
    }
}
