//! Users: what a user is, the [`UserStore`] trait any database implements, the SQLite store
//! (`sqlite.rs`: schema, migrations, parameterized CRUD), argon2id hashing (`password.rs`),
//! and [`Authenticator`] (`auth.rs`), which caches successful verifications so a known
//! password is not re-hashed on every tunnel.
//!
//! Out of scope: buckets and live rate changes (remote/registry.rs polls
//! [`UserStore::data_version`] and applies them).

mod auth;
mod db;
pub mod invites;
mod password;
mod pg;
mod pgpass;
mod sqlite;
pub mod usage;

pub use auth::{AuthError, Authenticator};
pub use db::Db;
pub use password::{hash_password, verify_password, verify_password_with};
pub use pg::{this_host, PgStore, PG_SCHEMA_VERSION};
pub use sqlite::{Store, SCHEMA_VERSION};

use crate::limit::quota::Quota;
use crate::limit::rate::{Bandwidth, RequestRate};
use std::fmt;

/// Longest user name, in bytes.
pub const MAX_NAME: usize = 64;
/// Longest password, in bytes (the tunnel protocol carries at most 255).
pub const MAX_PASSWORD: usize = 255;

/// Why a user operation failed.
#[derive(Debug)]
pub enum Error {
    /// `user add` or signup for a name that exists.
    Exists(String),
    /// A name that is not in the database.
    NotFound(String),
    /// A name outside `[A-Za-z0-9._@-]{1,64}`.
    BadName(String),
    /// An empty or too long password.
    BadPassword(&'static str),
    /// The database is from a newer flowgate.
    SchemaTooNew(i64),
    /// SQLite failed.
    Db(rusqlite::Error),
    /// PostgreSQL failed, or could not be reached (what it said, on one line).
    Pg(String),
    /// Hashing failed (should not happen with valid parameters).
    Hash(String),
    /// The database file could not be created.
    Create(std::path::PathBuf, std::io::Error),
    /// A signup's invite token did not allow it.
    Invite(invites::Refused),
    /// `invite revoke` of an id no invite has.
    NoSuchInvite(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Exists(n) => write!(f, "user {n:?} already exists"),
            Error::NotFound(n) => write!(f, "no such user {n:?}"),
            Error::BadName(n) => write!(
                f,
                "invalid user name {n:?}: use 1-{MAX_NAME} of A-Z a-z 0-9 . _ @ -"
            ),
            Error::BadPassword(why) => write!(f, "invalid password: {why}"),
            Error::SchemaTooNew(v) => write!(
                f,
                "database schema version {v} is newer than this build supports ({SCHEMA_VERSION})"
            ),
            Error::Db(e) => write!(f, "database: {e}"),
            Error::Pg(e) => write!(f, "database: {e}"),
            Error::Hash(e) => write!(f, "password hashing: {e}"),
            Error::Create(p, e) => write!(f, "cannot create {}: {e}", p.display()),
            Error::Invite(why) => write!(f, "{why}"),
            Error::NoSuchInvite(id) => write!(f, "no invite with id {id:?} (see `invite list`)"),
        }
    }
}

impl std::error::Error for Error {}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Db(e)
    }
}

/// One user as stored. `Debug` hides the hash.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// Account name.
    pub name: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Bytes per second for everything forwarded for this user.
    pub bandwidth: Bandwidth,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: i64,
    /// Most tunnels at once; further ones wait (`None`: no cap).
    pub max_connections: Option<u32>,
    /// Most new tunnels per time window (`None`: no limit).
    pub rate: Option<RequestRate>,
    /// Most bytes (up plus down) per calendar period (`None`: no quota).
    pub quota: Option<Quota>,
}

/// A user's columns as both stores keep them (NULL is "none"), read back into a [`User`]:
/// the one place the stored form is decoded.
pub(crate) struct StoredUser {
    pub name: String,
    pub password_hash: String,
    pub bandwidth: Option<i64>,
    pub created_at: i64,
    pub max_connections: Option<i64>,
    pub rate_count: Option<i64>,
    pub rate_per_secs: Option<i64>,
    pub quota_bytes: Option<i64>,
    pub quota_period: Option<String>,
}

/// The columns of [`StoredUser`], in its order, for both stores' SELECTs.
pub(crate) const USER_COLUMNS: &str = "name, password_hash, bandwidth, created_at, \
    max_connections, rate_count, rate_per_secs, quota_bytes, quota_period";

impl From<StoredUser> for User {
    fn from(r: StoredUser) -> User {
        User {
            name: r.name,
            password_hash: r.password_hash,
            bandwidth: Bandwidth::from_db(r.bandwidth),
            created_at: r.created_at,
            max_connections: r
                .max_connections
                .map(|v| v.clamp(1, u32::MAX as i64) as u32),
            rate: match (r.rate_count, r.rate_per_secs) {
                (Some(c), Some(p)) if c > 0 && p > 0 => Some(RequestRate {
                    count: c.min(u32::MAX as i64) as u32,
                    per: std::time::Duration::from_secs(p as u64),
                }),
                _ => None,
            },
            quota: match (r.quota_bytes, r.quota_period) {
                (Some(b), Some(p)) if b > 0 => {
                    crate::limit::quota::Period::from_name(&p).map(|period| Quota {
                        bytes: b as u64,
                        period,
                    })
                }
                _ => None,
            },
        }
    }
}

/// A byte count as both stores keep it: their integers are signed.
pub(crate) fn bytes_to_db(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Changes for [`Store::set`]: `None` leaves a field as it is; `Some(None)` clears a limit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// New bandwidth.
    pub bandwidth: Option<Bandwidth>,
    /// New password (hashed before storing).
    pub password: Option<String>,
    /// New per-user tunnel cap.
    pub max_connections: Option<Option<u32>>,
    /// New per-user request rate.
    pub rate: Option<Option<RequestRate>>,
    /// New volume quota.
    pub quota: Option<Option<Quota>>,
}

impl Changes {
    /// True when nothing would change.
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("password_hash", &"<redacted>")
            .field("bandwidth", &self.bandwidth)
            .field("max_connections", &self.max_connections)
            .field("rate", &self.rate)
            .field("quota", &self.quota)
            .finish()
    }
}

/// Bytes one user moved since the last flush, as the accounting writes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageDelta {
    /// The user.
    pub user: String,
    /// Bytes from the app towards the target.
    pub up: u64,
    /// Bytes from the target towards the app.
    pub down: u64,
}

/// One hour of one user's traffic, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRow {
    /// The user.
    pub user: String,
    /// Start of the hour, Unix seconds (UTC).
    pub hour: i64,
    /// Bytes from the app towards the target.
    pub up: u64,
    /// Bytes from the target towards the app.
    pub down: u64,
}

/// What a running remote-proxy last wrote about a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activity {
    /// The user.
    pub user: String,
    /// When a byte of theirs last moved (as of a flush), Unix seconds.
    pub last_seen: Option<i64>,
    /// Tunnels open at the last flush.
    pub open_tunnels: u32,
    /// When that was written, Unix seconds.
    pub as_of: i64,
}

/// What remote-proxy needs from a user database. SQLite ([`Store`]) implements it; a store
/// shared by several remote-proxies can implement it too. Implementations hash nothing on
/// the read path and use parameterized queries only.
pub trait UserStore: Send {
    /// One user, or `None`.
    fn get(&self, name: &str) -> Result<Option<User>, Error>;
    /// Every user, by name.
    fn list(&self) -> Result<Vec<User>, Error>;
    /// Adds a user whose password the caller already hashed with [`hash_password`], so the
    /// slow hash runs without holding whatever lock guards the store.
    ///
    /// # Errors
    /// `BadName`, or `Exists` when the name is taken.
    fn add_hashed(&self, name: &str, hash: &str, bandwidth: Bandwidth) -> Result<(), Error>;
    /// As [`add_hashed`](Self::add_hashed), applying `changes` (limits, a quota) in the
    /// same transaction: a failure leaves no half-made user.
    ///
    /// # Errors
    /// As `add_hashed` and [`set`](Self::set).
    fn add_hashed_with(
        &self,
        name: &str,
        hash: &str,
        bandwidth: Bandwidth,
        changes: &Changes,
    ) -> Result<(), Error>;
    /// Adds a user, hashing the password here.
    ///
    /// # Errors
    /// `BadName`, `BadPassword`, or `Exists` when the name is taken; nothing is written then.
    fn add(&self, name: &str, password: &str, bandwidth: Bandwidth) -> Result<(), Error> {
        self.add_with(name, password, bandwidth, &Changes::default())
    }
    /// Adds a user with limits, in one transaction, hashing the password here.
    ///
    /// # Errors
    /// As [`add`](Self::add) and [`set`](Self::set).
    fn add_with(
        &self,
        name: &str,
        password: &str,
        bandwidth: Bandwidth,
        changes: &Changes,
    ) -> Result<(), Error> {
        validate_name(name)?;
        validate_password(password)?;
        let hash = hash_password(password)?;
        self.add_hashed_with(name, &hash, bandwidth, changes)
    }
    /// As [`add_hashed`](Self::add_hashed), spending one use of the invite whose token
    /// hashes to `token_hash` ([`invites::token_hash`]) in the same transaction: both
    /// happen, or neither (a taken name spends no use).
    ///
    /// # Errors
    /// `Invite` when the token is unknown, used up or expired; as `add_hashed` otherwise.
    fn add_hashed_invited(
        &self,
        name: &str,
        hash: &str,
        bandwidth: Bandwidth,
        token_hash: &str,
    ) -> Result<(), Error>;
    /// Stores a new invite for the token hashing to `token_hash`.
    fn add_invite(
        &self,
        token_hash: &str,
        uses: u32,
        expires_at: Option<i64>,
    ) -> Result<invites::Invite, Error>;
    /// Every invite, newest first, spent and expired ones included.
    fn invites(&self) -> Result<Vec<invites::Invite>, Error>;
    /// Deletes the invite `id` ([`invites::Invite::id`]).
    ///
    /// # Errors
    /// `NoSuchInvite` when no invite has that id.
    fn revoke_invite(&self, id: &str) -> Result<(), Error>;
    /// Applies `changes` to a user, all or nothing.
    ///
    /// # Errors
    /// `NotFound` for an unknown user, `BadPassword` for a bad new password.
    fn set(&self, name: &str, changes: &Changes) -> Result<(), Error>;
    /// Deletes a user.
    ///
    /// # Errors
    /// `NotFound` for an unknown user.
    fn delete(&self, name: &str) -> Result<(), Error>;
    /// A number that changes whenever a user is added, changed or deleted (by any process,
    /// on any node): cheap to poll, so a running server notices `user set` and `user del`
    /// without reloading every user, and does not reload them for other writes.
    fn data_version(&self) -> Result<i64, Error>;
    /// Adds one flush of byte counts to the hour `at` falls in and records each user's open
    /// tunnels (`open`: every user the server knows, zero included) and last activity, in
    /// one transaction: all of it is written, or none.
    fn record_usage(
        &self,
        at: i64,
        deltas: &[UsageDelta],
        open: &[(String, u32)],
    ) -> Result<(), Error>;
    /// Hourly rows from `since` (Unix seconds) on, of one user or of all, oldest first.
    fn usage(&self, user: Option<&str>, since: i64) -> Result<Vec<UsageRow>, Error>;
    /// Bytes (up plus down) counted against `name`'s quota in the period starting at
    /// `period_start`: what was moved in it, less what `usage reset` forgave in it.
    fn quota_used(&self, name: &str, period_start: i64) -> Result<u64, Error>;
    /// Forgives what `name` has used in the period starting at `period_start`, so the
    /// quota starts again from zero now.
    ///
    /// # Errors
    /// `NotFound` for an unknown user.
    fn reset_quota(&self, name: &str, period_start: i64) -> Result<(), Error>;
    /// What the last flush of a running server recorded, per user.
    fn activity(&self) -> Result<Vec<Activity>, Error>;
    /// Names the server this store records activity for (a fleet's stores keep one row per
    /// node); a store for one server ignores it.
    fn set_node(&mut self, _node: &str) {}
}

/// Checks a user name: 1..=64 bytes of `A-Z a-z 0-9 . _ @ -`, so it fits every protocol
/// (no `:` for HTTP Basic, no spaces or control bytes for logs).
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

/// Checks a password: 1..=255 bytes.
pub fn validate_password(password: &str) -> Result<(), Error> {
    if password.is_empty() {
        Err(Error::BadPassword("empty"))
    } else if password.len() > MAX_PASSWORD {
        Err(Error::BadPassword("longer than 255 bytes"))
    } else {
        Ok(())
    }
}

/// A fresh database path for one unit test.
#[cfg(test)]
pub(crate) fn temp_db() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "flowgate-users-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("users.db");
    let _ = std::fs::remove_file(&p);
    p
}
