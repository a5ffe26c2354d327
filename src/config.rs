//! Validated settings for both proxies; every default lives here, once.
//!
//! Out of scope: flag parsing (cli.rs turns flags into these types).

use crate::limit::admission::Limits;
use crate::limit::rate::{Bandwidth, RequestRate};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default listen address of remote-proxy.
pub const DEFAULT_REMOTE_LISTEN: &str = "127.0.0.1:7080";
/// Default listen address of local-proxy.
pub const DEFAULT_LOCAL_LISTEN: &str = "127.0.0.1:1080";
/// Default database path.
pub const DEFAULT_DB: &str = "flowgate.db";
/// Default bandwidth for accounts made by signup: 1 MB/s.
pub const DEFAULT_SIGNUP_BANDWIDTH: &str = "1M";
/// Default handshake timeout, in seconds: a client must finish its greeting within it.
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// Default target (and remote-proxy) connect timeout, in seconds.
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;
/// Default idle timeout, in seconds: a tunnel with no bytes either way this long is closed.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 600;
/// Default cap on tunnels served at once; more wait unread until one ends.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default cap on connections waiting for a slot; more are told "busy" at once.
pub const DEFAULT_MAX_QUEUED: usize = 1024;
/// Default longest wait for a slot, in seconds; then "busy".
pub const DEFAULT_QUEUE_TIMEOUT_SECS: u64 = 30;
/// Default limit on failed logins per client IP (DRF syntax).
pub const DEFAULT_FAILED_LOGIN_RATE: &str = "10/m";
/// How often remote-proxy checks the database for `user set`/`user del`, in milliseconds.
pub const DEFAULT_USER_POLL_MS: u64 = 500;

/// Timeouts both proxies use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Longest time a client may take over its whole handshake (not per read: slowloris).
    pub handshake: Duration,
    /// Longest wait to connect to the next hop.
    pub connect: Duration,
    /// Close tunnels idle this long; `None` never closes them.
    pub idle: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(DEFAULT_HANDSHAKE_TIMEOUT_SECS),
            connect: Duration::from_secs(DEFAULT_CONNECT_TIMEOUT_SECS),
            idle: Some(Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS)),
        }
    }
}

/// remote-proxy settings.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// Where to listen for local-proxies.
    pub listen: SocketAddr,
    /// The user database.
    pub db: PathBuf,
    /// Whether `local-proxy signup` may create accounts.
    pub allow_signup: bool,
    /// Bandwidth given to accounts made by signup.
    pub signup_bandwidth: Bandwidth,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Slots, queue bound and queue timeout.
    pub admission: Limits,
    /// New tunnels per client IP (`None`: no limit).
    pub rate_per_ip: Option<RequestRate>,
    /// Failed logins per client IP before further attempts are refused unchecked.
    pub failed_login_rate: Option<RequestRate>,
    /// How often to look for user changes made by other processes.
    pub user_poll: Duration,
}

/// The default admission limits.
pub fn default_admission() -> Limits {
    Limits {
        max_active: DEFAULT_MAX_CONNECTIONS,
        max_queued: DEFAULT_MAX_QUEUED,
        timeout: Duration::from_secs(DEFAULT_QUEUE_TIMEOUT_SECS),
    }
}

impl RemoteConfig {
    /// Defaults for everything but the database path.
    pub fn new(db: PathBuf) -> RemoteConfig {
        RemoteConfig {
            listen: parse_default(DEFAULT_REMOTE_LISTEN),
            db,
            allow_signup: false,
            signup_bandwidth: DEFAULT_SIGNUP_BANDWIDTH
                .parse()
                .unwrap_or(Bandwidth::bytes_per_sec(1_000_000)),
            timeouts: Timeouts::default(),
            admission: default_admission(),
            rate_per_ip: None,
            failed_login_rate: DEFAULT_FAILED_LOGIN_RATE.parse().ok(),
            user_poll: Duration::from_millis(DEFAULT_USER_POLL_MS),
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
    /// remote-proxy's address, `HOST:PORT`, resolved at each connect.
    pub remote: String,
    /// The account used when an app sends no credentials; `None` requires app credentials.
    pub credentials: Option<Credentials>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Slots, queue bound and queue timeout.
    pub admission: Limits,
}

impl LocalConfig {
    /// Defaults for everything but the remote address and credentials.
    pub fn new(remote: String, credentials: Option<Credentials>) -> LocalConfig {
        LocalConfig {
            listen: parse_default(DEFAULT_LOCAL_LISTEN),
            remote,
            credentials,
            timeouts: Timeouts::default(),
            admission: default_admission(),
        }
    }
}

fn parse_default(s: &str) -> SocketAddr {
    // The defaults above are literal socket addresses; a typo there is caught by the test.
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        assert_eq!(
            RemoteConfig::new("x".into()).listen,
            DEFAULT_REMOTE_LISTEN.parse().unwrap()
        );
        assert_eq!(
            LocalConfig::new("r:1".into(), None).listen,
            DEFAULT_LOCAL_LISTEN.parse().unwrap()
        );
        assert_eq!(
            RemoteConfig::new("x".into()).signup_bandwidth,
            DEFAULT_SIGNUP_BANDWIDTH.parse().unwrap()
        );
        assert_eq!(
            RemoteConfig::new("x".into()).failed_login_rate,
            Some(DEFAULT_FAILED_LOGIN_RATE.parse().unwrap())
        );
    }
}
