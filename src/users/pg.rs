//! The PostgreSQL user store, for a fleet of remote-proxies on one database: the same tables
//! as SQLite's, a small pool of connections, a schema migrated in one transaction under an
//! advisory lock (two nodes starting at once on an empty database do not both migrate), and
//! a listener that turns `NOTIFY`s from a trigger on `users` into [`UserStore::data_version`]
//! changes, so every node sees `user set` and `user del` made anywhere within its poll.
//!
//! Uses the blocking `postgres` crate (it runs a small runtime of its own inside); every
//! statement has a timeout, and connecting has one, so no thread waits on a dead server.
//! With `sslmode=require` the connection is TLS 1.3 through rustls, the server verified
//! against a CA the operator gives; otherwise it is plain (a Unix socket, a private network).

use super::invites::{self, Invite};
use super::password::hash_password;
use super::{
    bytes_to_db, validate_name, validate_password, Activity, Changes, Error, StoredUser,
    UsageDelta, UsageRow, User, UserStore, USER_COLUMNS,
};
use crate::limit::calendar::unix_now;
use crate::limit::rate::Bandwidth;
use parking_lot::Mutex;
use postgres::{Client, NoTls};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The schema version this build writes in PostgreSQL (its own numbering).
pub const PG_SCHEMA_VERSION: i64 = 1;

/// Connections kept open for reuse.
const POOL_IDLE: usize = 4;
/// Longest wait to connect, and for any one statement.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const STATEMENT_TIMEOUT_MS: u64 = 5000;
/// The advisory lock key migrations take ("flowgate" in ASCII, truncated).
const MIGRATION_LOCK: i64 = 0x666c_6f77_6761_7465;
/// The channel the trigger notifies on.
const CHANNEL: &str = "flowgate_users";

/// How connections to the server are made: TLS (rustls) with `sslmode=require`, else plain.
#[derive(Clone)]
enum Connector {
    Plain,
    Tls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Connector {
    /// The connector `config` asks for. `sslmode=require` verifies the server against the
    /// CA in `PGSSLROOTCERT` (or `~/.postgresql/root.crt`, libpq's default), and its name
    /// against the host; without a CA it refuses to start rather than trust any server.
    fn for_config(config: &postgres::Config) -> Result<Connector, Error> {
        use postgres::config::SslMode;
        if config.get_ssl_mode() != SslMode::Require {
            return Ok(Connector::Plain);
        }
        let ca = std::env::var_os("PGSSLROOTCERT")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|h| std::path::PathBuf::from(h).join(".postgresql/root.crt"))
            })
            .filter(|p| p.exists())
            .ok_or_else(|| {
                Error::Pg(
                    "sslmode=require needs the server's CA to verify it: set PGSSLROOTCERT \
                     to its PEM file (or put it in ~/.postgresql/root.crt)"
                        .into(),
                )
            })?;
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&ca)
            .map_err(|e| Error::Pg(format!("{}: {e}", ca.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| Error::Pg(format!("{}: {e}", ca.display())))?;
            roots
                .add(cert)
                .map_err(|e| Error::Pg(format!("{}: {e}", ca.display())))?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Pg(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Connector::Tls(
            tokio_postgres_rustls::MakeRustlsConnect::new(tls),
        ))
    }

    fn connect(&self, config: &postgres::Config) -> Result<Client, postgres::Error> {
        match self {
            Connector::Plain => config.connect(NoTls),
            Connector::Tls(t) => config.connect(t.clone()),
        }
    }
}

/// A PostgreSQL user store.
pub struct PgStore {
    config: postgres::Config,
    connector: Connector,
    // Connection target, for error messages (never the password).
    shown: String,
    // This node's name in the activity table (`host:port` once the server is listening).
    node: String,
    pool: Mutex<Vec<Client>>,
    // Bumped by the listener for each notice and after each reconnect.
    version: Arc<AtomicI64>,
    listening: AtomicBool,
    // Dropped with the store: the listener's waits end at once when it goes.
    _stop: crossbeam_channel::Sender<()>,
    stopped: crossbeam_channel::Receiver<()>,
    // After a failed connect: no new attempt before this, so logins fail at once instead
    // of each waiting for a dead server (the wait doubles up to `MAX_BACKOFF`).
    breaker: Mutex<(Option<std::time::Instant>, Duration)>,
}

/// Longest pause between connection attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgStore({})", self.shown)
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Self {
        Error::Pg(pg_text(&e))
    }
}

/// The error's own message with the server's detail, on one line.
fn pg_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(cause) = src {
                s.push_str(&format!(": {cause}"));
                src = cause.source();
            }
            s
        }
    }
}

/// This machine's name.
pub fn this_host() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

impl PgStore {
    /// Connects to `conninfo` (a URL or key=value string, password from `PGPASSWORD` or
    /// `.pgpass`) and brings the schema up to date.
    ///
    /// # Errors
    /// `Pg` when the server cannot be reached or the schema cannot be migrated;
    /// `SchemaTooNew` for a database written by a newer flowgate.
    pub fn open(conninfo: &str) -> Result<PgStore, Error> {
        let mut config: postgres::Config = conninfo
            .parse()
            .map_err(|e: postgres::Error| Error::Pg(format!("bad --db: {}", pg_text(&e))))?;
        let os_user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map_or_else(|| "postgres".to_string(), |u| u.name);
        if config.get_user().is_none() {
            config.user(&os_user);
        }
        let user = config.get_user().unwrap_or("postgres").to_string();
        if config.get_dbname().is_none() {
            config.dbname(&user);
        }
        let host = match config.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            Some(postgres::config::Host::Unix(_)) | None => "localhost".to_string(),
        };
        if config.get_hosts().is_empty() {
            config.host_path("/var/run/postgresql");
        }
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let dbname = config.get_dbname().unwrap_or(&user).to_string();
        if config.get_password().is_none() {
            if let Some(pw) = super::pgpass::lookup(&host, port, &dbname, &user) {
                config.password(pw);
            }
        }
        config
            .connect_timeout(CONNECT_TIMEOUT)
            // A server gone silent (a partition, not a refusal) is given up on within
            // about 15 s instead of holding a thread for the kernel's default hours.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(15))
            // Notices ("already exists, skipping") are not news to an operator.
            .options(&format!(
                "-c statement_timeout={STATEMENT_TIMEOUT_MS} -c client_min_messages=warning"
            ))
            .application_name("flowgate");
        let shown = format!("postgres {user}@{host}:{port}/{dbname}");
        let connector = Connector::for_config(&config)?;
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let store = PgStore {
            connector,
            config,
            shown,
            node: this_host(),
            pool: Mutex::new(Vec::new()),
            version: Arc::new(AtomicI64::new(0)),
            listening: AtomicBool::new(false),
            _stop: stop_tx,
            stopped: stop_rx,
            breaker: Mutex::new((None, FIRST_BACKOFF)),
        };
        store.migrate()?;
        Ok(store)
    }

    fn connect(&self) -> Result<Client, Error> {
        let now = std::time::Instant::now();
        if let (Some(until), _) = *self.breaker.lock() {
            if now < until {
                return Err(Error::Pg(format!(
                    "{}: unreachable, next attempt in {:.1}s",
                    self.shown,
                    (until - now).as_secs_f64()
                )));
            }
        }
        match self.connector.connect(&self.config) {
            Ok(c) => {
                *self.breaker.lock() = (None, FIRST_BACKOFF);
                Ok(c)
            }
            Err(e) => {
                let mut b = self.breaker.lock();
                let wait = b.1;
                *b = (Some(now + wait), (wait * 2).min(MAX_BACKOFF));
                Err(Error::Pg(format!("{}: {}", self.shown, pg_text(&e))))
            }
        }
    }

    /// Runs `f` on a pooled connection; a connection that failed is not given back.
    fn with<T>(&self, f: impl FnOnce(&mut Client) -> Result<T, Error>) -> Result<T, Error> {
        let pooled = self.pool.lock().pop();
        let mut client = match pooled {
            Some(c) if !c.is_closed() => c,
            _ => self.connect()?,
        };
        let out = f(&mut client);
        if !client.is_closed() {
            let mut pool = self.pool.lock();
            if pool.len() < POOL_IDLE {
                pool.push(client);
            }
        }
        out
    }

    fn migrate(&self) -> Result<(), Error> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            // Held to the end of the transaction: a second node starting now waits here,
            // then finds the schema made.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS flowgate_schema (version BIGINT NOT NULL)",
            )?;
            let version: i64 = tx
                .query_opt("SELECT version FROM flowgate_schema", &[])?
                .map_or(0, |r| r.get(0));
            if version > PG_SCHEMA_VERSION {
                return Err(Error::SchemaTooNew(version));
            }
            if version < 1 {
                tx.batch_execute(
                    "CREATE TABLE users (
                         name               TEXT PRIMARY KEY,
                         password_hash      TEXT NOT NULL,
                         bandwidth          BIGINT,
                         created_at         BIGINT NOT NULL,
                         updated_at         BIGINT NOT NULL,
                         max_connections    BIGINT,
                         rate_count         BIGINT,
                         rate_per_secs      BIGINT,
                         quota_bytes        BIGINT,
                         quota_period       TEXT,
                         quota_offset       BIGINT NOT NULL DEFAULT 0,
                         quota_offset_start BIGINT
                     );
                     CREATE TABLE invites (
                         token_hash TEXT PRIMARY KEY,
                         uses_left  BIGINT NOT NULL,
                         expires_at BIGINT,
                         created_at BIGINT NOT NULL
                     );
                     CREATE TABLE usage (
                         user_name TEXT NOT NULL,
                         hour      BIGINT NOT NULL,
                         up        BIGINT NOT NULL DEFAULT 0,
                         down      BIGINT NOT NULL DEFAULT 0,
                         PRIMARY KEY (user_name, hour)
                     );
                     CREATE TABLE activity (
                         user_name    TEXT NOT NULL,
                         node         TEXT NOT NULL,
                         last_seen    BIGINT,
                         open_tunnels BIGINT NOT NULL DEFAULT 0,
                         as_of        BIGINT NOT NULL,
                         PRIMARY KEY (user_name, node)
                     );
                     CREATE FUNCTION flowgate_users_changed() RETURNS trigger AS $$
                     BEGIN
                         PERFORM pg_notify('flowgate_users', COALESCE(NEW.name, OLD.name));
                         RETURN NULL;
                     END $$ LANGUAGE plpgsql;
                     CREATE TRIGGER flowgate_users_changed
                         AFTER INSERT OR UPDATE OR DELETE ON users
                         FOR EACH ROW EXECUTE FUNCTION flowgate_users_changed();
                     INSERT INTO flowgate_schema (version) VALUES (1);",
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Starts the thread that listens for changes, once.
    fn listen(&self) {
        if self.listening.swap(true, Ordering::SeqCst) {
            return;
        }
        let (config, shown) = (self.config.clone(), self.shown.clone());
        let connector = self.connector.clone();
        let (version, stop) = (Arc::clone(&self.version), self.stopped.clone());
        let spawned = std::thread::Builder::new()
            .name("users-listen".into())
            .spawn(move || listen_loop(&config, &connector, &shown, &version, &stop));
        if let Err(e) = spawned {
            log::warn!("cannot start the database listener: {e}");
            self.listening.store(false, Ordering::SeqCst);
        }
    }
}

/// Holds a connection that `LISTEN`s; bumps `version` for each notice and after each
/// (re)connect, which makes the user watcher reload everything: a notice lost while the
/// connection was down cannot leave the node stale. Reconnects with backoff, logging the
/// loss once and the return once; every wait ends at once when the store is dropped.
fn listen_loop(
    config: &postgres::Config,
    connector: &Connector,
    shown: &str,
    version: &AtomicI64,
    stop: &crossbeam_channel::Receiver<()>,
) {
    use crossbeam_channel::TryRecvError;
    let mut backoff = FIRST_BACKOFF;
    let mut lost = false;
    loop {
        let listening = connector.connect(config).and_then(|mut c| {
            c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
            Ok(c)
        });
        let mut client = match listening {
            Ok(c) => c,
            Err(e) => {
                if !lost {
                    log::warn!(
                        "lost the user database ({shown}: {}); retrying, cached users keep \
                         working",
                        pg_text(&e)
                    );
                    lost = true;
                }
                if stop
                    .recv_timeout(backoff)
                    .is_err_and(|e| e.is_disconnected())
                {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if lost {
            log::info!("user database back ({shown}); reloading users");
            lost = false;
        }
        backoff = FIRST_BACKOFF;
        version.fetch_add(1, Ordering::SeqCst);
        let mut checked = std::time::Instant::now();
        loop {
            if let Err(TryRecvError::Disconnected) = stop.try_recv() {
                return;
            }
            let (mut got, mut broken) = (0, false);
            {
                let mut notes = client.notifications();
                let mut it = notes.timeout_iter(Duration::from_millis(500));
                loop {
                    match postgres::fallible_iterator::FallibleIterator::next(&mut it) {
                        Ok(Some(_)) => got += 1,
                        Ok(None) => break,
                        Err(_) => {
                            broken = true;
                            break;
                        }
                    }
                }
            }
            if got > 0 {
                version.fetch_add(1, Ordering::SeqCst);
            }
            // A server gone silent sends no error: ask it now and then.
            if !broken && checked.elapsed() >= Duration::from_secs(10) {
                broken = client.is_valid(Duration::from_secs(2)).is_err();
                checked = std::time::Instant::now();
            }
            if broken || client.is_closed() {
                break;
            }
        }
    }
}

fn row_to_user(r: &postgres::Row) -> User {
    StoredUser {
        name: r.get(0),
        password_hash: r.get(1),
        bandwidth: r.get(2),
        created_at: r.get(3),
        max_connections: r.get(4),
        rate_count: r.get(5),
        rate_per_secs: r.get(6),
        quota_bytes: r.get(7),
        quota_period: r.get(8),
    }
    .into()
}

/// Writes `changes` for `name` inside `tx`; the password is hashed by the caller.
fn apply(
    tx: &mut postgres::Transaction<'_>,
    name: &str,
    changes: &Changes,
    hash: Option<&str>,
) -> Result<(), Error> {
    let now = unix_now();
    if let Some(bw) = changes.bandwidth {
        tx.execute(
            "UPDATE users SET bandwidth = $1, updated_at = $2 WHERE name = $3",
            &[&bw.to_db(), &now, &name],
        )?;
    }
    if let Some(h) = hash {
        tx.execute(
            "UPDATE users SET password_hash = $1, updated_at = $2 WHERE name = $3",
            &[&h, &now, &name],
        )?;
    }
    if let Some(cap) = changes.max_connections {
        tx.execute(
            "UPDATE users SET max_connections = $1, updated_at = $2 WHERE name = $3",
            &[&cap.map(i64::from), &now, &name],
        )?;
    }
    if let Some(rate) = changes.rate {
        tx.execute(
            "UPDATE users SET rate_count = $1, rate_per_secs = $2, updated_at = $3
             WHERE name = $4",
            &[
                &rate.map(|r| i64::from(r.count)),
                &rate.map(|r| r.per.as_secs() as i64),
                &now,
                &name,
            ],
        )?;
    }
    if let Some(quota) = changes.quota {
        tx.execute(
            "UPDATE users SET quota_bytes = $1, quota_period = $2, updated_at = $3
             WHERE name = $4",
            &[
                &quota.map(|q| bytes_to_db(q.bytes)),
                &quota.map(|q| q.period.name()),
                &now,
                &name,
            ],
        )?;
    }
    Ok(())
}

fn insert_user(
    tx: &mut postgres::Transaction<'_>,
    name: &str,
    hash: &str,
    bandwidth: Bandwidth,
) -> Result<(), Error> {
    validate_name(name)?;
    let now = unix_now();
    let n = tx.execute(
        "INSERT INTO users (name, password_hash, bandwidth, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $4) ON CONFLICT (name) DO NOTHING",
        &[&name, &hash, &bandwidth.to_db(), &now],
    )?;
    if n == 0 {
        return Err(Error::Exists(name.to_string()));
    }
    Ok(())
}

impl UserStore for PgStore {
    fn get(&self, name: &str) -> Result<Option<User>, Error> {
        self.with(|c| {
            let q = format!("SELECT {USER_COLUMNS} FROM users WHERE name = $1");
            Ok(c.query_opt(&q, &[&name])?.map(|r| row_to_user(&r)))
        })
    }

    fn list(&self) -> Result<Vec<User>, Error> {
        self.with(|c| {
            let q = format!("SELECT {USER_COLUMNS} FROM users ORDER BY name");
            Ok(c.query(&q, &[])?.iter().map(row_to_user).collect())
        })
    }

    fn add_hashed(&self, name: &str, hash: &str, bandwidth: Bandwidth) -> Result<(), Error> {
        self.add_hashed_with(name, hash, bandwidth, &Changes::default())
    }

    fn add_hashed_with(
        &self,
        name: &str,
        hash: &str,
        bandwidth: Bandwidth,
        changes: &Changes,
    ) -> Result<(), Error> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            insert_user(&mut tx, name, hash, bandwidth)?;
            apply(&mut tx, name, changes, None)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn add_hashed_invited(
        &self,
        name: &str,
        hash: &str,
        bandwidth: Bandwidth,
        token_hash: &str,
    ) -> Result<(), Error> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            let now = unix_now();
            let spent = tx.execute(
                "UPDATE invites SET uses_left = uses_left - 1
                 WHERE token_hash = $1 AND uses_left > 0
                   AND (expires_at IS NULL OR expires_at > $2)",
                &[&token_hash, &now],
            )?;
            if spent == 0 {
                let found = tx.query_opt(
                    "SELECT uses_left FROM invites WHERE token_hash = $1",
                    &[&token_hash],
                )?;
                let uses_left = found.map(|r| r.get::<_, i64>(0));
                return Err(Error::Invite(invites::Refused::for_invite(uses_left)));
            }
            insert_user(&mut tx, name, hash, bandwidth)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn add_invite(
        &self,
        token_hash: &str,
        uses: u32,
        expires_at: Option<i64>,
    ) -> Result<Invite, Error> {
        let now = unix_now();
        self.with(|c| {
            c.execute(
                "INSERT INTO invites (token_hash, uses_left, expires_at, created_at)
                 VALUES ($1, $2, $3, $4)",
                &[&token_hash, &i64::from(uses), &expires_at, &now],
            )?;
            Ok(())
        })?;
        Ok(Invite {
            id: invites::id_of(token_hash),
            uses_left: uses,
            expires_at,
            created_at: now,
        })
    }

    fn invites(&self) -> Result<Vec<Invite>, Error> {
        self.with(|c| {
            let rows = c.query(
                "SELECT token_hash, uses_left, expires_at, created_at FROM invites
                 ORDER BY created_at DESC, token_hash",
                &[],
            )?;
            Ok(rows
                .iter()
                .map(|r| Invite {
                    id: invites::id_of(&r.get::<_, String>(0)),
                    uses_left: r.get::<_, i64>(1).clamp(0, u32::MAX as i64) as u32,
                    expires_at: r.get(2),
                    created_at: r.get(3),
                })
                .collect())
        })
    }

    fn revoke_invite(&self, id: &str) -> Result<(), Error> {
        let id = id.trim().to_ascii_lowercase();
        let well_formed = id.len() == invites::ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit());
        let n = if well_formed {
            self.with(|c| {
                Ok(c.execute(
                    "DELETE FROM invites WHERE substr(token_hash, 1, $2) = $1",
                    &[&id, &(invites::ID_LEN as i32)],
                )?)
            })?
        } else {
            0
        };
        if n == 0 {
            return Err(Error::NoSuchInvite(id));
        }
        Ok(())
    }

    fn set(&self, name: &str, changes: &Changes) -> Result<(), Error> {
        let hash = match &changes.password {
            Some(p) => {
                validate_password(p)?;
                Some(hash_password(p)?)
            }
            None => None,
        };
        self.with(|c| {
            let mut tx = c.transaction()?;
            let exists = tx
                .query_opt("SELECT 1 FROM users WHERE name = $1 FOR UPDATE", &[&name])?
                .is_some();
            if !exists {
                return Err(Error::NotFound(name.to_string()));
            }
            apply(&mut tx, name, changes, hash.as_deref())?;
            tx.commit()?;
            Ok(())
        })
    }

    fn delete(&self, name: &str) -> Result<(), Error> {
        let n = self.with(|c| Ok(c.execute("DELETE FROM users WHERE name = $1", &[&name])?))?;
        if n == 0 {
            return Err(Error::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// Changes with each notice from the trigger on `users` and after each reconnect of
    /// the listener (started by the first call).
    fn data_version(&self) -> Result<i64, Error> {
        self.listen();
        Ok(self.version.load(Ordering::SeqCst))
    }

    fn record_usage(
        &self,
        at: i64,
        deltas: &[UsageDelta],
        open: &[(String, u32)],
    ) -> Result<(), Error> {
        let hour = at - at.rem_euclid(3600);
        self.with(|c| {
            let mut tx = c.transaction()?;
            // Increments, not values: every node adds its own counts to the shared rows.
            let add = tx.prepare(
                "INSERT INTO usage (user_name, hour, up, down) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (user_name, hour) DO UPDATE
                 SET up = usage.up + EXCLUDED.up, down = usage.down + EXCLUDED.down",
            )?;
            let seen = tx.prepare(
                "INSERT INTO activity (user_name, node, last_seen, as_of) VALUES ($1, $2, $3, $3)
                 ON CONFLICT (user_name, node) DO UPDATE
                 SET last_seen = EXCLUDED.last_seen, as_of = EXCLUDED.as_of",
            )?;
            for d in deltas.iter().filter(|d| d.up > 0 || d.down > 0) {
                tx.execute(
                    &add,
                    &[&d.user, &hour, &bytes_to_db(d.up), &bytes_to_db(d.down)],
                )?;
                tx.execute(&seen, &[&d.user, &self.node, &at])?;
            }
            let tunnels = tx.prepare(
                "INSERT INTO activity (user_name, node, open_tunnels, as_of) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (user_name, node) DO UPDATE
                 SET open_tunnels = EXCLUDED.open_tunnels, as_of = EXCLUDED.as_of",
            )?;
            for (user, n) in open {
                tx.execute(&tunnels, &[user, &self.node, &i64::from(*n), &at])?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn usage(&self, user: Option<&str>, since: i64) -> Result<Vec<UsageRow>, Error> {
        let since = since - since.rem_euclid(3600);
        self.with(|c| {
            let rows = c.query(
                "SELECT user_name, hour, up, down FROM usage
                 WHERE hour >= $1 AND ($2::TEXT IS NULL OR user_name = $2)
                 ORDER BY hour, user_name",
                &[&since, &user],
            )?;
            Ok(rows
                .iter()
                .map(|r| UsageRow {
                    user: r.get(0),
                    hour: r.get(1),
                    up: r.get::<_, i64>(2).max(0) as u64,
                    down: r.get::<_, i64>(3).max(0) as u64,
                })
                .collect())
        })
    }

    fn quota_used(&self, name: &str, period_start: i64) -> Result<u64, Error> {
        self.with(|c| {
            let r = c.query_one(
                "SELECT (SELECT COALESCE(SUM(up + down), 0)::BIGINT FROM usage
                         WHERE user_name = $1 AND hour >= $2),
                        COALESCE((SELECT quota_offset FROM users
                                  WHERE name = $1 AND quota_offset_start = $2), 0)",
                &[&name, &period_start],
            )?;
            let (used, forgiven): (i64, i64) = (r.get(0), r.get(1));
            Ok(used.saturating_sub(forgiven).max(0) as u64)
        })
    }

    fn reset_quota(&self, name: &str, period_start: i64) -> Result<(), Error> {
        let n = self.with(|c| {
            Ok(c.execute(
                "UPDATE users SET
                     quota_offset = (SELECT COALESCE(SUM(up + down), 0)::BIGINT FROM usage
                                     WHERE user_name = $1 AND hour >= $2),
                     quota_offset_start = $2, updated_at = $3
                 WHERE name = $1",
                &[&name, &period_start, &unix_now()],
            )?)
        })?;
        if n == 0 {
            return Err(Error::NotFound(name.to_string()));
        }
        Ok(())
    }

    fn set_node(&mut self, node: &str) {
        self.node = node.to_string();
    }

    fn activity(&self) -> Result<Vec<Activity>, Error> {
        self.with(|c| {
            // Summed over the nodes: open tunnels fleet-wide, the latest sighting anywhere.
            let rows = c.query(
                "SELECT user_name, MAX(last_seen), SUM(open_tunnels)::BIGINT, MAX(as_of)
                 FROM activity GROUP BY user_name ORDER BY user_name",
                &[],
            )?;
            Ok(rows
                .iter()
                .map(|r| Activity {
                    user: r.get(0),
                    last_seen: r.get(1),
                    open_tunnels: r.get::<_, i64>(2).clamp(0, u32::MAX as i64) as u32,
                    as_of: r.get(3),
                })
                .collect())
        })
    }
}
