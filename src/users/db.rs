//! Which user database `--db` names: a SQLite file (the default), or a PostgreSQL server
//! shared by a fleet of remote-proxies (`postgres://USER@HOST/DB`, `postgresql://...`, or
//! libpq's `host=... dbname=...`), and opening it behind the one [`UserStore`] trait.

use super::{Error, UserStore};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A user database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Db {
    /// A SQLite file, created on first use.
    Sqlite(PathBuf),
    /// A PostgreSQL connection string, without a password (it comes from `PGPASSWORD` or a
    /// `.pgpass` file, as libpq's users expect).
    Postgres(String),
}

impl Db {
    /// Opens the database and brings its schema up to date.
    ///
    /// # Errors
    /// When it cannot be reached, opened or migrated.
    pub fn open(&self) -> Result<Box<dyn UserStore>, Error> {
        match self {
            Db::Sqlite(p) => Ok(Box::new(super::Store::open(p)?)),
            Db::Postgres(c) => Ok(Box::new(super::pg::PgStore::open(c)?)),
        }
    }

    /// Where the TLS identity is kept when no `--state-dir` is given: beside a SQLite file;
    /// the current directory with PostgreSQL (which has no directory of its own here).
    pub fn default_state_dir(&self) -> PathBuf {
        match self {
            Db::Sqlite(p) => p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            Db::Postgres(_) => PathBuf::from("."),
        }
    }

    /// True for PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }
}

impl From<PathBuf> for Db {
    fn from(p: PathBuf) -> Db {
        Db::Sqlite(p)
    }
}

impl From<&Path> for Db {
    fn from(p: &Path) -> Db {
        Db::Sqlite(p.to_path_buf())
    }
}

/// True when `s` looks like a libpq key=value connection string (`host=x dbname=y`).
fn is_conninfo(s: &str) -> bool {
    let keys = ["host=", "hostaddr=", "dbname=", "user=", "port="];
    s.split_whitespace()
        .any(|w| keys.iter().any(|k| w.starts_with(k)))
}

impl FromStr for Db {
    type Err = String;

    fn from_str(s: &str) -> Result<Db, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty database".into());
        }
        let url = s.starts_with("postgres://") || s.starts_with("postgresql://");
        if !url && !is_conninfo(s) {
            return Ok(Db::Sqlite(PathBuf::from(s)));
        }
        if has_password(s) {
            return Err(
                "put the PostgreSQL password in PGPASSWORD or a .pgpass file, not in --db \
                 (a command line is visible to every user of the machine)"
                    .into(),
            );
        }
        Ok(Db::Postgres(s.to_string()))
    }
}

/// True when a connection string carries a password (`user:pw@` or `password=`).
fn has_password(s: &str) -> bool {
    if let Some(rest) = s
        .strip_prefix("postgres://")
        .or_else(|| s.strip_prefix("postgresql://"))
    {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let query_pw = rest
            .split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|kv| kv.starts_with("password=")));
        return authority
            .rsplit_once('@')
            .is_some_and(|(userinfo, _)| userinfo.contains(':'))
            || query_pw;
    }
    s.split_whitespace().any(|w| w.starts_with("password="))
}

impl fmt::Display for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Db::Sqlite(p) => write!(f, "{}", p.display()),
            Db::Postgres(c) => write!(f, "{c}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_sqlite_and_a_url_or_conninfo_is_postgres() {
        assert_eq!("users.db".parse(), Ok(Db::Sqlite("users.db".into())));
        assert_eq!(
            "/var/lib/flowgate/users.db".parse(),
            Ok(Db::Sqlite("/var/lib/flowgate/users.db".into()))
        );
        for pg in [
            "postgres://flowgate@db.example/flowgate",
            "postgresql://flowgate@db.example:5433/flowgate?sslmode=disable",
            "host=/run/postgresql dbname=flowgate user=flowgate",
        ] {
            assert_eq!(pg.parse(), Ok(Db::Postgres(pg.to_string())), "{pg}");
        }
    }

    #[test]
    fn a_password_on_the_command_line_is_refused() {
        for bad in [
            "postgres://flowgate:secret@db.example/flowgate",
            "postgresql://db.example/flowgate?password=secret",
            "host=db dbname=f password=secret",
        ] {
            let e = bad.parse::<Db>().unwrap_err();
            assert!(e.contains("PGPASSWORD"), "{bad}: {e}");
        }
        // An @ in the path is not a password.
        assert!("postgres://flowgate@db/flow@gate".parse::<Db>().is_ok());
    }
}
