//! The user database (SQLite) and password checks.
//!
//! In scope: schema creation and migration (`PRAGMA user_version`), user CRUD with
//! parameterized SQL only, argon2id hashing, and [`Authenticator`], which caches successful
//! verifications so a known password is not re-hashed on every tunnel. Out of scope: buckets
//! and live rate changes (remote.rs watches `PRAGMA data_version` and applies them).

use crate::rate::{Bandwidth, RequestRate};
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use blake2::{Blake2b512, Digest};
use parking_lot::{Condvar, Mutex};
use rand_core::RngCore;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The schema version this build writes; older databases are migrated on open.
pub const SCHEMA_VERSION: i64 = 2;
/// Longest user name, in bytes.
pub const MAX_NAME: usize = 64;
/// Longest password, in bytes (the tunnel protocol carries at most 255).
pub const MAX_PASSWORD: usize = 255;
/// Cached verifications kept before the cache is cleared (bounds memory).
const CACHE_LIMIT: usize = 100_000;

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
    /// Hashing failed (should not happen with valid parameters).
    Hash(String),
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
            Error::Hash(e) => write!(f, "password hashing: {e}"),
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
            .finish()
    }
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

/// Hashes a password with argon2id and a random salt (PHC string form).
pub fn hash_password(password: &str) -> Result<String, Error> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Hash(e.to_string()))
}

/// Full argon2 check of `password` against a PHC string; false for a malformed hash.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Most argon2 memory a stored hash may ask for, in KiB (1 GiB): a hash with absurd
/// parameters is refused rather than allowed to exhaust memory.
const MAX_HASH_KIB: u32 = 1 << 20;

/// Full argon2 check like [`verify_password`], computing in `memory` (grown as needed and
/// kept by the caller for the next check).
pub fn verify_password_with(password: &str, phc: &str, memory: &mut Vec<Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(algorithm), Some(salt), Some(expected)) = (
        Algorithm::try_from(parsed.algorithm),
        parsed.salt,
        parsed.hash,
    ) else {
        return false;
    };
    let version = parsed
        .version
        .and_then(|v| Version::try_from(v).ok())
        .unwrap_or_default();
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    if params.m_cost() > MAX_HASH_KIB {
        return false;
    }
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let count = params.block_count();
    if memory.len() < count {
        memory.resize(count, Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params);
    if argon
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut memory[..count])
        .is_err()
    {
        return false;
    }
    let exp = expected.as_bytes();
    out.len() == exp.len() && out.iter().zip(exp).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The SQLite user store.
pub struct Store {
    conn: Connection,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, Error> {
        let conn = Connection::open(path)?;
        // WAL lets `user set` from the CLI commit while remote-proxy reads; the busy timeout
        // makes the two wait for each other instead of failing.
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), Error> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(Error::SchemaTooNew(version));
        }
        if version < 1 {
            self.conn.execute_batch(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS users (
                     name          TEXT PRIMARY KEY NOT NULL,
                     password_hash TEXT NOT NULL,
                     bandwidth     INTEGER,            -- bytes/s; NULL = unlimited
                     created_at    INTEGER NOT NULL,
                     updated_at    INTEGER NOT NULL
                 );
                 PRAGMA user_version = 1;
                 COMMIT;",
            )?;
        }
        if version < 2 {
            // v2: per-user admission limits (issue 3). NULL means "no limit".
            self.conn.execute_batch(
                "BEGIN;
                 ALTER TABLE users ADD COLUMN max_connections INTEGER;
                 ALTER TABLE users ADD COLUMN rate_count INTEGER;
                 ALTER TABLE users ADD COLUMN rate_per_secs INTEGER;
                 PRAGMA user_version = 2;
                 COMMIT;",
            )?;
        }
        Ok(())
    }

    /// Adds a user.
    ///
    /// # Errors
    /// `BadName`, `BadPassword`, or `Exists` when the name is taken; nothing is written then.
    pub fn add(&self, name: &str, password: &str, bandwidth: Bandwidth) -> Result<(), Error> {
        validate_name(name)?;
        validate_password(password)?;
        self.add_hashed(name, &hash_password(password)?, bandwidth)
    }

    /// Adds a user whose password the caller already hashed with [`hash_password`], so the
    /// slow hash can run without holding whatever lock guards this store.
    ///
    /// # Errors
    /// `BadName`, or `Exists` when the name is taken.
    pub fn add_hashed(&self, name: &str, hash: &str, bandwidth: Bandwidth) -> Result<(), Error> {
        validate_name(name)?;
        let now = unix_now();
        let res = self.conn.execute(
            "INSERT INTO users (name, password_hash, bandwidth, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?4)",
            params![name, hash, bandwidth.to_db(), now],
        );
        match res {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(Error::Exists(name.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Adds a user and applies `changes` (limits) in one transaction.
    ///
    /// # Errors
    /// As [`add`](Self::add) and [`set`](Self::set); nothing is written on error.
    pub fn add_with(
        &self,
        name: &str,
        password: &str,
        bandwidth: Bandwidth,
        changes: &Changes,
    ) -> Result<(), Error> {
        let tx = self.conn.unchecked_transaction()?;
        self.add(name, password, bandwidth)?;
        self.apply(name, changes)?;
        tx.commit()?;
        Ok(())
    }

    /// Applies `changes` to a user, all or nothing.
    ///
    /// # Errors
    /// `NotFound` for an unknown user, `BadPassword` for a bad new password.
    pub fn set(&self, name: &str, changes: &Changes) -> Result<(), Error> {
        let tx = self.conn.unchecked_transaction()?;
        if self.get(name)?.is_none() {
            return Err(Error::NotFound(name.to_string()));
        }
        self.apply(name, changes)?;
        tx.commit()?;
        Ok(())
    }

    /// Writes `changes` for an existing user; the caller holds the transaction.
    fn apply(&self, name: &str, changes: &Changes) -> Result<(), Error> {
        let hash = match &changes.password {
            Some(p) => {
                validate_password(p)?;
                Some(hash_password(p)?)
            }
            None => None,
        };
        let now = unix_now();
        if let Some(bw) = changes.bandwidth {
            self.conn.execute(
                "UPDATE users SET bandwidth = ?1, updated_at = ?2 WHERE name = ?3",
                params![bw.to_db(), now, name],
            )?;
        }
        if let Some(h) = hash {
            self.conn.execute(
                "UPDATE users SET password_hash = ?1, updated_at = ?2 WHERE name = ?3",
                params![h, now, name],
            )?;
        }
        if let Some(cap) = changes.max_connections {
            self.conn.execute(
                "UPDATE users SET max_connections = ?1, updated_at = ?2 WHERE name = ?3",
                params![cap, now, name],
            )?;
        }
        if let Some(rate) = changes.rate {
            self.conn.execute(
                "UPDATE users SET rate_count = ?1, rate_per_secs = ?2, updated_at = ?3
                 WHERE name = ?4",
                params![
                    rate.map(|r| r.count),
                    rate.map(|r| r.per.as_secs() as i64),
                    now,
                    name
                ],
            )?;
        }
        Ok(())
    }

    /// Deletes a user.
    ///
    /// # Errors
    /// `NotFound` for an unknown user.
    pub fn delete(&self, name: &str) -> Result<(), Error> {
        let n = self
            .conn
            .execute("DELETE FROM users WHERE name = ?1", params![name])?;
        if n == 0 {
            return Err(Error::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// One user, or `None`.
    pub fn get(&self, name: &str) -> Result<Option<User>, Error> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, password_hash, bandwidth, created_at, max_connections, rate_count,
                    rate_per_secs
             FROM users WHERE name = ?1",
        )?;
        Ok(stmt.query_row(params![name], row_to_user).optional()?)
    }

    /// Every user, by name.
    pub fn list(&self) -> Result<Vec<User>, Error> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, password_hash, bandwidth, created_at, max_connections, rate_count,
                    rate_per_secs
             FROM users ORDER BY name",
        )?;
        let rows = stmt.query_map([], row_to_user)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// A number that changes whenever another connection commits (`PRAGMA data_version`):
    /// cheap to poll for changes made by `remote-proxy user ...`.
    pub fn data_version(&self) -> Result<i64, Error> {
        Ok(self
            .conn
            .pragma_query_value(None, "data_version", |r| r.get(0))?)
    }
}

fn row_to_user(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        name: r.get(0)?,
        password_hash: r.get(1)?,
        bandwidth: Bandwidth::from_db(r.get(2)?),
        created_at: r.get(3)?,
        max_connections: r
            .get::<_, Option<i64>>(4)?
            .map(|v| v.clamp(1, u32::MAX as i64) as u32),
        rate: match (r.get::<_, Option<i64>>(5)?, r.get::<_, Option<i64>>(6)?) {
            (Some(c), Some(p)) if c > 0 && p > 0 => Some(RequestRate {
                count: c.min(u32::MAX as i64) as u32,
                per: Duration::from_secs(p as u64),
            }),
            _ => None,
        },
    })
}

/// Why authentication failed.
#[derive(Debug)]
pub enum AuthError {
    /// Unknown user or wrong password (not told apart, so names cannot be probed).
    BadCredentials,
    /// The database failed.
    Store(Error),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::BadCredentials => write!(f, "bad credentials"),
            AuthError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for AuthError {}

/// A remembered successful verification.
struct Verified {
    /// The PHC string it was checked against; a changed password changes it (new salt).
    phc: String,
    /// Keyed BLAKE2b of the password that matched.
    digest: [u8; 64],
}

/// One argon2 check in progress, shared by every caller with the same name, password and
/// stored hash.
struct Flight {
    phc: String,
    // Set once: whether the password matched.
    result: Mutex<Option<bool>>,
    done: Condvar,
}

/// Checks credentials against the store, remembering successes.
///
/// A password that verified once is recognised by a keyed BLAKE2b digest (microseconds)
/// until the stored hash changes. A wrong password, or an unknown user, always costs a full
/// argon2 check, so timing does not tell the two apart. At most as many argon2 checks run at
/// once as there are cores: each takes 19 MiB, and a login flood must not exhaust memory.
/// Concurrent checks of the same name and password share one argon2 run (single flight): an
/// app that opens 16 connections at once used to queue 16 hashes, a second of CPU on 2 cores.
pub struct Authenticator {
    // The store; one connection, lookups are short primary-key reads.
    store: Mutex<Store>,
    // user name -> last verified password digest.
    cache: Mutex<HashMap<String, Verified>>,
    // Random per-process key for the digests, so a memory dump does not hold plain hashes.
    key: [u8; 32],
    // A hash of a random password, checked for unknown users to spend the same time.
    dummy_hash: String,
    // argon2 working memory (19 MiB each with the default parameters), one per concurrent
    // check, reused: freed 19 MiB blocks would otherwise stay resident in every thread's
    // malloc arena (glibc raises its mmap threshold after the first free), hundreds of MiB.
    hash_memory: Mutex<Vec<Vec<Block>>>,
    hash_memory_freed: Condvar,
    // Checks in progress, by password digest (which covers the name).
    flights: Mutex<HashMap<[u8; 64], Arc<Flight>>>,
    // argon2 checks run so far.
    hashes: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Wraps a store.
    pub fn new(store: Store) -> Result<Authenticator, Error> {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        let mut dummy = [0u8; 16];
        OsRng.fill_bytes(&mut dummy);
        let dummy_hash = hash_password(&format!("{dummy:?}"))?;
        let slots = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Ok(Authenticator {
            store: Mutex::new(store),
            cache: Mutex::new(HashMap::new()),
            key,
            dummy_hash,
            hash_memory: Mutex::new((0..slots).map(|_| Vec::new()).collect()),
            hash_memory_freed: Condvar::new(),
            flights: Mutex::new(HashMap::new()),
            hashes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Runs `f` with the store locked.
    pub fn with_store<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        f(&self.store.lock())
    }

    fn digest(&self, name: &str, password: &str) -> [u8; 64] {
        let mut h = Blake2b512::new();
        h.update(self.key);
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn slow_verify(&self, password: &str, phc: &str) -> bool {
        self.hashes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut memory = {
            let mut pool = self.hash_memory.lock();
            loop {
                if let Some(m) = pool.pop() {
                    break m;
                }
                self.hash_memory_freed.wait(&mut pool);
            }
        };
        let ok = verify_password_with(password, phc, &mut memory);
        self.hash_memory.lock().push(memory);
        self.hash_memory_freed.notify_one();
        ok
    }

    /// Returns the user when `password` is theirs.
    ///
    /// # Errors
    /// `BadCredentials` for an unknown user or wrong password; `Store` when SQLite fails.
    pub fn authenticate(&self, name: &str, password: &str) -> Result<User, AuthError> {
        let user = self.store.lock().get(name).map_err(AuthError::Store)?;
        let Some(user) = user else {
            self.slow_verify(password, &self.dummy_hash);
            return Err(AuthError::BadCredentials);
        };
        let digest = self.digest(name, password);
        if let Some(v) = self.cache.lock().get(name) {
            if v.phc == user.password_hash && ct_eq(&v.digest, &digest) {
                return Ok(user);
            }
        }
        if !self.shared_verify(name, password, &user.password_hash, digest) {
            return Err(AuthError::BadCredentials);
        }
        Ok(user)
    }

    /// Runs the argon2 check, or waits for an identical one already running; a success is
    /// cached before anyone is told.
    fn shared_verify(&self, name: &str, password: &str, phc: &str, digest: [u8; 64]) -> bool {
        use std::collections::hash_map::Entry;
        // (flight to wait for or lead, whether we lead); the map's lock is released here.
        let joined = match self.flights.lock().entry(digest) {
            Entry::Occupied(e) if e.get().phc == phc => Some((Arc::clone(e.get()), false)),
            // A check against an older hash (the password just changed): run our own.
            Entry::Occupied(_) => None,
            Entry::Vacant(e) => {
                let f = Arc::new(Flight {
                    phc: phc.to_string(),
                    result: Mutex::new(None),
                    done: Condvar::new(),
                });
                e.insert(Arc::clone(&f));
                Some((f, true))
            }
        };
        match joined {
            Some((f, true)) => self.lead(name, password, digest, &f),
            Some((f, false)) => {
                let mut result = f.result.lock();
                loop {
                    if let Some(ok) = *result {
                        return ok;
                    }
                    f.done.wait(&mut result);
                }
            }
            None => self.verify_and_remember(name, password, phc, digest),
        }
    }

    // Runs the flight this caller registered, publishes the result, and retires the flight.
    fn lead(&self, name: &str, password: &str, digest: [u8; 64], f: &Flight) -> bool {
        /// Publishes "no match" and retires the flight if the check panics, so waiters and
        /// later logins are never stuck behind it.
        struct Landing<'a> {
            auth: &'a Authenticator,
            flight: &'a Flight,
            digest: [u8; 64],
        }
        impl Drop for Landing<'_> {
            fn drop(&mut self) {
                self.flight.result.lock().get_or_insert(false);
                self.flight.done.notify_all();
                self.auth.flights.lock().remove(&self.digest);
            }
        }
        let _landing = Landing {
            auth: self,
            flight: f,
            digest,
        };
        let ok = self.verify_and_remember(name, password, &f.phc, digest);
        *f.result.lock() = Some(ok);
        ok
    }

    /// The argon2 check; a success goes into the cache.
    fn verify_and_remember(&self, name: &str, password: &str, phc: &str, digest: [u8; 64]) -> bool {
        let ok = self.slow_verify(password, phc);
        if ok {
            self.remember(name, phc, digest);
        }
        ok
    }

    fn remember(&self, name: &str, phc: &str, digest: [u8; 64]) {
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(
            name.to_string(),
            Verified {
                phc: phc.to_string(),
                digest,
            },
        );
    }

    /// Forgets cached verifications of users no longer in `present`.
    pub fn retain_cached(&self, present: &dyn Fn(&str) -> bool) {
        self.cache.lock().retain(|name, _| present(name));
    }
}

/// Compares two digests in time independent of where they differ.
fn ct_eq(a: &[u8; 64], b: &[u8; 64]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn temp_db() -> std::path::PathBuf {
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

    #[test]
    fn crud_roundtrip_and_errors() {
        let db = temp_db();
        let s = Store::open(&db).unwrap();
        s.add("alice", "pw1", Bandwidth::bytes_per_sec(1000))
            .unwrap();
        assert!(matches!(
            s.add("alice", "x", Bandwidth::UNLIMITED),
            Err(Error::Exists(_))
        ));
        assert!(matches!(
            s.add("a b", "x", Bandwidth::UNLIMITED),
            Err(Error::BadName(_))
        ));
        assert!(matches!(
            s.add("bob", "", Bandwidth::UNLIMITED),
            Err(Error::BadPassword(_))
        ));
        let u = s.get("alice").unwrap().unwrap();
        assert_eq!(u.bandwidth, Bandwidth::bytes_per_sec(1000));
        assert!(u.password_hash.starts_with("$argon2id$"));
        assert!(!u.password_hash.contains("pw1"));
        let ch = Changes {
            bandwidth: Some(Bandwidth::UNLIMITED),
            max_connections: Some(Some(3)),
            rate: Some(Some("100/m".parse().unwrap())),
            ..Changes::default()
        };
        s.set("alice", &ch).unwrap();
        let u = s.get("alice").unwrap().unwrap();
        assert_eq!(u.bandwidth, Bandwidth::UNLIMITED);
        assert_eq!(u.max_connections, Some(3));
        assert_eq!(u.rate, Some("100/m".parse().unwrap()));
        let clear = Changes {
            max_connections: Some(None),
            rate: Some(None),
            ..Changes::default()
        };
        s.set("alice", &clear).unwrap();
        let u = s.get("alice").unwrap().unwrap();
        assert_eq!((u.max_connections, u.rate), (None, None));
        let pw = Changes {
            password: Some("x".into()),
            ..Changes::default()
        };
        assert!(matches!(s.set("carol", &pw), Err(Error::NotFound(_))));
        // add_with is all or nothing: a duplicate leaves no trace of its limits.
        assert!(matches!(
            s.add_with("alice", "pw", Bandwidth::UNLIMITED, &ch),
            Err(Error::Exists(_))
        ));
        assert_eq!(s.list().unwrap().len(), 1);
        s.delete("alice").unwrap();
        assert!(matches!(s.delete("alice"), Err(Error::NotFound(_))));
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn a_version_1_database_is_migrated_with_its_users() {
        let db = temp_db();
        let c = Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE users (name TEXT PRIMARY KEY NOT NULL, password_hash TEXT NOT NULL,
                 bandwidth INTEGER, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
             INSERT INTO users VALUES ('old', 'h', 1000, 1, 1);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(c);
        let s = Store::open(&db).unwrap();
        let u = s.get("old").unwrap().unwrap();
        assert_eq!(u.bandwidth, Bandwidth::bytes_per_sec(1000));
        assert_eq!((u.max_connections, u.rate), (None, None));
    }

    #[test]
    fn reusable_memory_check_agrees_with_the_reference() {
        let phc = hash_password("right").unwrap();
        let mut mem = Vec::new();
        assert!(verify_password_with("right", &phc, &mut mem));
        assert!(verify_password("right", &phc));
        assert!(!verify_password_with("wrong", &phc, &mut mem));
        assert!(!verify_password_with("right", "not a hash", &mut mem));
        // Reused memory still gives the right answer.
        assert!(verify_password_with("right", &phc, &mut mem));
    }

    #[test]
    fn schema_is_versioned_and_newer_is_refused() {
        let db = temp_db();
        drop(Store::open(&db).unwrap());
        let c = Connection::open(&db).unwrap();
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        assert!(matches!(Store::open(&db), Err(Error::SchemaTooNew(99))));
    }

    #[test]
    fn authenticator_caches_success_and_notices_password_change() {
        let db = temp_db();
        let s = Store::open(&db).unwrap();
        s.add("alice", "right", Bandwidth::UNLIMITED).unwrap();
        let auth = Authenticator::new(s).unwrap();
        assert!(auth.authenticate("alice", "right").is_ok());
        assert!(auth.cache.lock().contains_key("alice"));
        assert!(matches!(
            auth.authenticate("alice", "wrong"),
            Err(AuthError::BadCredentials)
        ));
        assert!(matches!(
            auth.authenticate("nobody", "right"),
            Err(AuthError::BadCredentials)
        ));
        // A password change from another connection (the CLI) invalidates the cached check.
        let ch = Changes {
            password: Some("new".into()),
            ..Changes::default()
        };
        Store::open(&db).unwrap().set("alice", &ch).unwrap();
        assert!(matches!(
            auth.authenticate("alice", "right"),
            Err(AuthError::BadCredentials)
        ));
        assert!(auth.authenticate("alice", "new").is_ok());
    }

    #[test]
    fn concurrent_logins_with_one_password_share_one_hash() {
        let db = temp_db();
        let s = Store::open(&db).unwrap();
        s.add("alice", "right", Bandwidth::UNLIMITED).unwrap();
        let auth = Arc::new(Authenticator::new(s).unwrap());
        let start = Arc::new(std::sync::Barrier::new(16));
        let hs: Vec<_> = (0..16)
            .map(|i| {
                let (auth, start) = (Arc::clone(&auth), Arc::clone(&start));
                std::thread::spawn(move || {
                    let pw = if i == 15 { "wrong" } else { "right" };
                    start.wait();
                    auth.authenticate("alice", pw).is_ok()
                })
            })
            .collect();
        let oks: Vec<bool> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(oks.iter().filter(|&&ok| ok).count(), 15);
        assert!(!oks[15], "the wrong password must still fail");
        // One hash for the fifteen right passwords (shared, or cached by the time a late
        // thread arrives) and one for the wrong one.
        assert_eq!(auth.hashes.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert!(auth.flights.lock().is_empty());
    }

    #[test]
    fn cached_check_is_much_faster_than_argon2() {
        let db = temp_db();
        let s = Store::open(&db).unwrap();
        s.add("alice", "right", Bandwidth::UNLIMITED).unwrap();
        let auth = Authenticator::new(s).unwrap();
        let t = std::time::Instant::now();
        auth.authenticate("alice", "right").unwrap();
        let slow = t.elapsed();
        let t = std::time::Instant::now();
        for _ in 0..10 {
            auth.authenticate("alice", "right").unwrap();
        }
        let fast = t.elapsed() / 10;
        assert!(fast * 5 < slow, "cached {fast:?} vs full {slow:?}");
    }
}
