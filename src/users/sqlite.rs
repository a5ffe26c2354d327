//! The SQLite user store: schema, migrations, parameterized CRUD.

use super::invites::{self, Invite};
use super::password::hash_password;
use super::{
    bytes_to_db, validate_name, validate_password, Activity, Changes, Error, StoredUser,
    UsageDelta, UsageRow, User, UserStore, USER_COLUMNS,
};
use crate::limit::calendar::unix_now;
use crate::limit::rate::Bandwidth;
use rusqlite::{params, Connection, OptionalExtension};
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// The schema version this build writes; older databases are migrated on open.
pub const SCHEMA_VERSION: i64 = 5;

/// The SQLite user store.
pub struct Store {
    conn: Connection,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// Creates the database file, empty and readable by its owner only (0600), if it does not
/// exist: it holds password hashes. SQLite gives its -wal and -shm files the database file's
/// mode, so they are owner-only too.
fn create_private(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Create(path.to_path_buf(), e)),
    }
}

/// Switches the file to WAL (it stays so). Several processes opening a new file at once
/// contend for the switch, and SQLite answers "busy" at once there rather than waiting out
/// the busy timeout: try again for up to that timeout.
fn set_wal(conn: &Connection) -> Result<(), Error> {
    let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
    if mode.eq_ignore_ascii_case("wal") {
        return Ok(()); // every open but a new file's first
    }
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Ok(()) => return Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < until =>
            {
                // Another process holds the lock: nothing in this one can say when it lets
                // go, so poll, briefly, and only while a new file is being set up.
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, Error> {
        create_private(path)?;
        let conn = Connection::open(path)?;
        // WAL lets `user set` from the CLI commit while remote-proxy reads; the busy timeout
        // makes the two wait for each other instead of failing.
        conn.busy_timeout(Duration::from_secs(5))?;
        set_wal(&conn)?;
        let store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    /// A transaction that takes the write lock at its start. A deferred one that reads
    /// first and writes later fails at once with "database is locked" when another
    /// connection (the usage flusher, the CLI) wrote in between, whatever the busy timeout.
    fn write_tx(&self) -> Result<rusqlite::Transaction<'_>, Error> {
        Ok(rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )?)
    }

    fn migrate(&self) -> Result<(), Error> {
        let current = || -> Result<i64, Error> {
            Ok(self
                .conn
                .pragma_query_value(None, "user_version", |r| r.get(0))?)
        };
        if current()? == SCHEMA_VERSION {
            return Ok(());
        }
        // One write transaction for the whole migration, the version read inside it: two
        // processes opening an old (or new) file at once migrate it once.
        let tx = self.write_tx()?;
        let version = current()?;
        if version > SCHEMA_VERSION {
            return Err(Error::SchemaTooNew(version));
        }
        if version < 1 {
            self.conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS users (
                     name          TEXT PRIMARY KEY NOT NULL,
                     password_hash TEXT NOT NULL,
                     bandwidth     INTEGER,            -- bytes/s; NULL = unlimited
                     created_at    INTEGER NOT NULL,
                     updated_at    INTEGER NOT NULL
                 );
                 PRAGMA user_version = 1;",
            )?;
        }
        if version < 2 {
            // v2: per-user admission limits. NULL means "no limit".
            self.conn.execute_batch(
                "ALTER TABLE users ADD COLUMN max_connections INTEGER;
                 ALTER TABLE users ADD COLUMN rate_count INTEGER;
                 ALTER TABLE users ADD COLUMN rate_per_secs INTEGER;
                 PRAGMA user_version = 2;",
            )?;
        }
        if version < 3 {
            // v3: signup invites, stored by the SHA-256 of their token (never the token).
            self.conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS invites (
                     token_hash TEXT PRIMARY KEY NOT NULL,
                     uses_left  INTEGER NOT NULL,
                     expires_at INTEGER,               -- unix seconds; NULL = never
                     created_at INTEGER NOT NULL
                 );
                 PRAGMA user_version = 3;",
            )?;
        }
        if version < 4 {
            // v4: volume quotas and byte accounting. Usage is kept per user name and hour
            // (UTC), which answers per day and per month; it outlives `user del`, for
            // billing. `quota_offset` is what `usage reset` forgave in the period starting
            // at `quota_offset_start`.
            self.conn.execute_batch(
                "ALTER TABLE users ADD COLUMN quota_bytes INTEGER;
                 ALTER TABLE users ADD COLUMN quota_period TEXT;
                 ALTER TABLE users ADD COLUMN quota_offset INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE users ADD COLUMN quota_offset_start INTEGER;
                 CREATE TABLE IF NOT EXISTS usage (
                     user TEXT NOT NULL,
                     hour INTEGER NOT NULL,               -- unix seconds, a multiple of 3600
                     up   INTEGER NOT NULL DEFAULT 0,
                     down INTEGER NOT NULL DEFAULT 0,
                     PRIMARY KEY (user, hour)
                 ) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS activity (
                     user         TEXT PRIMARY KEY NOT NULL,
                     last_seen    INTEGER,
                     open_tunnels INTEGER NOT NULL DEFAULT 0,
                     as_of        INTEGER NOT NULL
                 );
                 PRAGMA user_version = 4;",
            )?;
        }
        if version < 5 {
            // v5: a counter of changes to users, so a running server reloads users when
            // they change, not each time the usage flusher writes (SQLite's data_version
            // moves with every table).
            self.conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS users_version (v INTEGER NOT NULL);
                 INSERT INTO users_version (v) VALUES (0);
                 CREATE TRIGGER users_inserted AFTER INSERT ON users
                     BEGIN UPDATE users_version SET v = v + 1; END;
                 CREATE TRIGGER users_updated AFTER UPDATE ON users
                     BEGIN UPDATE users_version SET v = v + 1; END;
                 CREATE TRIGGER users_deleted AFTER DELETE ON users
                     BEGIN UPDATE users_version SET v = v + 1; END;
                 PRAGMA user_version = 5;",
            )?;
        }
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
        if let Some(quota) = changes.quota {
            self.conn.execute(
                "UPDATE users SET quota_bytes = ?1, quota_period = ?2, updated_at = ?3
                 WHERE name = ?4",
                params![
                    quota.map(|q| bytes_to_db(q.bytes)),
                    quota.map(|q| q.period.name()),
                    now,
                    name
                ],
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
}

impl UserStore for Store {
    /// Adds a user whose password the caller already hashed with [`hash_password`], so the
    /// slow hash can run without holding whatever lock guards this store.
    ///
    /// # Errors
    /// `BadName`, or `Exists` when the name is taken.
    fn add_hashed(&self, name: &str, hash: &str, bandwidth: Bandwidth) -> Result<(), Error> {
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

    fn add_hashed_with(
        &self,
        name: &str,
        hash: &str,
        bandwidth: Bandwidth,
        changes: &Changes,
    ) -> Result<(), Error> {
        let tx = self.write_tx()?;
        self.add_hashed(name, hash, bandwidth)?;
        self.apply(name, changes)?;
        tx.commit()?;
        Ok(())
    }

    fn add_hashed_invited(
        &self,
        name: &str,
        hash: &str,
        bandwidth: Bandwidth,
        token_hash: &str,
    ) -> Result<(), Error> {
        let tx = self.write_tx()?;
        let now = unix_now();
        let spent = self.conn.execute(
            "UPDATE invites SET uses_left = uses_left - 1
             WHERE token_hash = ?1 AND uses_left > 0 AND (expires_at IS NULL OR expires_at > ?2)",
            params![token_hash, now],
        )?;
        if spent == 0 {
            let uses_left: Option<i64> = self
                .conn
                .query_row(
                    "SELECT uses_left FROM invites WHERE token_hash = ?1",
                    params![token_hash],
                    |r| r.get(0),
                )
                .optional()?;
            return Err(Error::Invite(invites::Refused::for_invite(uses_left)));
        }
        self.add_hashed(name, hash, bandwidth)?;
        tx.commit()?;
        Ok(())
    }

    fn add_invite(
        &self,
        token_hash: &str,
        uses: u32,
        expires_at: Option<i64>,
    ) -> Result<Invite, Error> {
        let now = unix_now();
        self.conn.execute(
            "INSERT INTO invites (token_hash, uses_left, expires_at, created_at)
             VALUES (?1, ?2, ?3, ?4)",
            params![token_hash, uses, expires_at, now],
        )?;
        Ok(Invite {
            id: invites::id_of(token_hash),
            uses_left: uses,
            expires_at,
            created_at: now,
        })
    }

    fn invites(&self) -> Result<Vec<Invite>, Error> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT token_hash, uses_left, expires_at, created_at FROM invites
             ORDER BY created_at DESC, token_hash",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Invite {
                id: invites::id_of(&r.get::<_, String>(0)?),
                uses_left: r.get::<_, i64>(1)?.clamp(0, u32::MAX as i64) as u32,
                expires_at: r.get(2)?,
                created_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn revoke_invite(&self, id: &str) -> Result<(), Error> {
        let id = id.trim().to_ascii_lowercase();
        let well_formed = id.len() == invites::ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit());
        let n = match well_formed {
            true => self.conn.execute(
                "DELETE FROM invites WHERE substr(token_hash, 1, ?2) = ?1",
                params![id, invites::ID_LEN as i64],
            )?,
            false => 0,
        };
        if n == 0 {
            return Err(Error::NoSuchInvite(id));
        }
        Ok(())
    }

    /// Applies `changes` to a user, all or nothing.
    ///
    /// # Errors
    /// `NotFound` for an unknown user, `BadPassword` for a bad new password.
    fn set(&self, name: &str, changes: &Changes) -> Result<(), Error> {
        let tx = self.write_tx()?;
        if self.get(name)?.is_none() {
            return Err(Error::NotFound(name.to_string()));
        }
        self.apply(name, changes)?;
        tx.commit()?;
        Ok(())
    }

    /// Deletes a user.
    ///
    /// # Errors
    /// `NotFound` for an unknown user.
    fn delete(&self, name: &str) -> Result<(), Error> {
        let n = self
            .conn
            .execute("DELETE FROM users WHERE name = ?1", params![name])?;
        if n == 0 {
            return Err(Error::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// One user, or `None`.
    fn get(&self, name: &str) -> Result<Option<User>, Error> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users WHERE name = ?1"))?;
        Ok(stmt.query_row(params![name], row_to_user).optional()?)
    }

    /// Every user, by name.
    fn list(&self) -> Result<Vec<User>, Error> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users ORDER BY name"))?;
        let rows = stmt.query_map([], row_to_user)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// A counter the triggers on `users` move (schema v5): cheap to poll for changes made
    /// by `remote-proxy user ...`, and still while the usage flusher writes.
    fn data_version(&self) -> Result<i64, Error> {
        Ok(self
            .conn
            .query_row("SELECT v FROM users_version", [], |r| r.get(0))?)
    }

    fn record_usage(
        &self,
        at: i64,
        deltas: &[UsageDelta],
        open: &[(String, u32)],
    ) -> Result<(), Error> {
        let tx = self.write_tx()?;
        let hour = at - at.rem_euclid(3600);
        {
            let mut add = self.conn.prepare_cached(
                "INSERT INTO usage (user, hour, up, down) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user, hour) DO UPDATE SET up = up + excluded.up,
                                                        down = down + excluded.down",
            )?;
            let mut seen = self.conn.prepare_cached(
                "INSERT INTO activity (user, last_seen, as_of) VALUES (?1, ?2, ?2)
                 ON CONFLICT (user) DO UPDATE SET last_seen = excluded.last_seen,
                                                  as_of = excluded.as_of",
            )?;
            for d in deltas.iter().filter(|d| d.up > 0 || d.down > 0) {
                add.execute(params![
                    d.user,
                    hour,
                    bytes_to_db(d.up),
                    bytes_to_db(d.down)
                ])?;
                seen.execute(params![d.user, at])?;
            }
            let mut tunnels = self.conn.prepare_cached(
                "INSERT INTO activity (user, open_tunnels, as_of) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user) DO UPDATE SET open_tunnels = excluded.open_tunnels,
                                                  as_of = excluded.as_of",
            )?;
            for (user, n) in open {
                tunnels.execute(params![user, n, at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn usage(&self, user: Option<&str>, since: i64) -> Result<Vec<UsageRow>, Error> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT user, hour, up, down FROM usage
             WHERE hour >= ?1 AND (?2 IS NULL OR user = ?2) ORDER BY hour, user",
        )?;
        let rows = stmt.query_map(params![since - since.rem_euclid(3600), user], |r| {
            Ok(UsageRow {
                user: r.get(0)?,
                hour: r.get(1)?,
                up: r.get::<_, i64>(2)?.max(0) as u64,
                down: r.get::<_, i64>(3)?.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn quota_used(&self, name: &str, period_start: i64) -> Result<u64, Error> {
        let (used, forgiven): (i64, i64) = self.conn.query_row(
            "SELECT (SELECT COALESCE(SUM(up + down), 0) FROM usage
                     WHERE user = ?1 AND hour >= ?2),
                    COALESCE((SELECT quota_offset FROM users
                              WHERE name = ?1 AND quota_offset_start = ?2), 0)",
            params![name, period_start],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(used.saturating_sub(forgiven).max(0) as u64)
    }

    fn reset_quota(&self, name: &str, period_start: i64) -> Result<(), Error> {
        let n = self.conn.execute(
            "UPDATE users SET
                 quota_offset = (SELECT COALESCE(SUM(up + down), 0) FROM usage
                                 WHERE user = ?1 AND hour >= ?2),
                 quota_offset_start = ?2, updated_at = ?3
             WHERE name = ?1",
            params![name, period_start, unix_now()],
        )?;
        if n == 0 {
            return Err(Error::NotFound(name.to_string()));
        }
        Ok(())
    }

    fn activity(&self) -> Result<Vec<Activity>, Error> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT user, last_seen, open_tunnels, as_of FROM activity ORDER BY user",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Activity {
                user: r.get(0)?,
                last_seen: r.get(1)?,
                open_tunnels: r.get::<_, i64>(2)?.clamp(0, u32::MAX as i64) as u32,
                as_of: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

fn row_to_user(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(StoredUser {
        name: r.get(0)?,
        password_hash: r.get(1)?,
        bandwidth: r.get(2)?,
        created_at: r.get(3)?,
        max_connections: r.get(4)?,
        rate_count: r.get(5)?,
        rate_per_secs: r.get(6)?,
        quota_bytes: r.get(7)?,
        quota_period: r.get(8)?,
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::temp_db;

    #[test]
    fn the_database_and_its_wal_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let db = temp_db();
        let s = Store::open(&db).unwrap();
        s.add("alice", "pw1", Bandwidth::UNLIMITED).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&db), 0o600);
        for suffix in ["-wal", "-shm"] {
            let side = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
            assert!(side.exists(), "{}", side.display());
            assert_eq!(mode(&side), 0o600, "{}", side.display());
        }
    }

    #[test]
    fn an_invite_allows_its_uses_until_spent_expired_or_revoked() {
        use invites::Refused;
        let s = Store::open(&temp_db()).unwrap();
        let bw = Bandwidth::UNLIMITED;
        let (token, other) = (invites::new_token(), invites::new_token());
        let h = invites::token_hash(&token);
        let made = s.add_invite(&h, 2, None).unwrap();
        assert_eq!((made.uses_left, made.id.len()), (2, invites::ID_LEN));
        s.add_hashed_invited("a1", "hash", bw, &h).unwrap();
        // A taken name spends no use: the transaction is all or nothing.
        assert!(matches!(
            s.add_hashed_invited("a1", "hash", bw, &h),
            Err(Error::Exists(_))
        ));
        assert_eq!(s.invites().unwrap()[0].uses_left, 1);
        s.add_hashed_invited("a2", "hash", bw, &h).unwrap();
        let refused = |name: &str, hash: &str| match s.add_hashed_invited(name, "hash", bw, hash) {
            Err(Error::Invite(why)) => why,
            other => panic!("{other:?}"),
        };
        assert_eq!(refused("a3", &h), Refused::UsedUp);
        assert_eq!(
            refused("a3", &invites::token_hash(&other)),
            Refused::Unknown
        );
        assert!(s.get("a3").unwrap().is_none());
        // Past its expiry it allows nothing.
        let old = invites::token_hash(&other);
        s.add_invite(&old, 5, Some(unix_now() - 1)).unwrap();
        assert_eq!(refused("b1", &old), Refused::Expired);
        // Revoked, it is gone; a made-up id is refused.
        let id = invites::id_of(&old);
        s.revoke_invite(&id.to_uppercase()).unwrap();
        assert_eq!(refused("b1", &old), Refused::Unknown);
        assert!(matches!(s.revoke_invite(&id), Err(Error::NoSuchInvite(_))));
        assert!(matches!(s.revoke_invite("%"), Err(Error::NoSuchInvite(_))));
        assert_eq!(s.invites().unwrap().len(), 1);
        // Nothing in the database is the token itself.
        let c = Connection::open(s.conn.path().unwrap()).unwrap();
        let stored: String = c
            .query_row("SELECT token_hash FROM invites", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, h);
        assert!(!stored.contains(&token[invites::TOKEN_PREFIX.len()..]));
    }

    #[test]
    fn usage_adds_up_per_hour_and_a_reset_forgives_the_period_so_far() {
        let s = Store::open(&temp_db()).unwrap();
        s.add("alice", "pw", Bandwidth::UNLIMITED).unwrap();
        let day = 1_796_083_200; // 2026-12-01 00:00 UTC
        let d = |up, down| UsageDelta {
            user: "alice".into(),
            up,
            down,
        };
        let open = [("alice".to_string(), 2)];
        s.record_usage(day + 10, &[d(100, 1000)], &open).unwrap();
        s.record_usage(day + 20, &[d(1, 2)], &open).unwrap();
        s.record_usage(day + 3600 + 5, &[d(5, 5)], &[("alice".into(), 0)])
            .unwrap();
        let rows = s.usage(None, day).unwrap();
        assert_eq!(rows.len(), 2, "one row per hour");
        assert_eq!((rows[0].hour, rows[0].up, rows[0].down), (day, 101, 1002));
        assert_eq!(s.usage(Some("bob"), day).unwrap(), vec![]);
        assert_eq!(s.quota_used("alice", day).unwrap(), 1113);
        assert_eq!(s.quota_used("alice", day + 3600).unwrap(), 10);
        let a = &s.activity().unwrap()[0];
        assert_eq!(
            (a.last_seen, a.open_tunnels, a.as_of),
            (Some(day + 3605), 0, day + 3605)
        );
        s.reset_quota("alice", day).unwrap();
        assert_eq!(s.quota_used("alice", day).unwrap(), 0);
        s.record_usage(day + 7200, &[d(7, 0)], &[]).unwrap();
        assert_eq!(s.quota_used("alice", day).unwrap(), 7);
        // The reset is for that period only; the usage rows themselves are kept.
        assert_eq!(s.quota_used("alice", day + 3600).unwrap(), 17);
        assert!(matches!(s.reset_quota("bob", day), Err(Error::NotFound(_))));
    }

    #[test]
    fn quotas_are_stored_and_cleared() {
        let s = Store::open(&temp_db()).unwrap();
        s.add("alice", "pw", Bandwidth::UNLIMITED).unwrap();
        let q: crate::limit::quota::Quota = "1MB/day".parse().unwrap();
        let set = |quota| Changes {
            quota: Some(quota),
            ..Changes::default()
        };
        s.set("alice", &set(Some(q))).unwrap();
        assert_eq!(s.get("alice").unwrap().unwrap().quota, Some(q));
        s.set("alice", &set(None)).unwrap();
        assert_eq!(s.get("alice").unwrap().unwrap().quota, None);
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
}
