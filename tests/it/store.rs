//! One set of behaviour tests for the user store, run against both backends: SQLite, and a
//! throwaway PostgreSQL server of the test's own.

use crate::support::postgres::Postgres;
use crate::support::*;
use flowgate::limit::rate::Bandwidth;
use flowgate::users::{invites, Changes, Db, Error, UsageDelta, UserStore};
use std::time::Duration;

/// Opens a second store on the same database (another node, or the CLI).
type Opener = dyn Fn() -> Box<dyn UserStore>;

fn behaves_as_a_user_store(open: &Opener) {
    let s = open();
    let bw: Bandwidth = "1M".parse().unwrap();
    s.add("alice", "pw1", bw).unwrap();
    assert!(matches!(s.add("alice", "x", bw), Err(Error::Exists(_))));
    assert!(matches!(s.add("a b", "x", bw), Err(Error::BadName(_))));
    assert!(matches!(s.add("bob", "", bw), Err(Error::BadPassword(_))));
    let alice = s.get("alice").unwrap().unwrap();
    assert_eq!(alice.bandwidth, bw);
    assert!(alice.password_hash.starts_with("$argon2id$"));
    assert!(flowgate::users::verify_password(
        "pw1",
        &alice.password_hash
    ));
    assert_eq!(s.get("nobody").unwrap(), None);
    // Limits and a quota, set and cleared, all or nothing.
    let ch = Changes {
        bandwidth: Some("300K".parse().unwrap()),
        max_connections: Some(Some(3)),
        rate: Some(Some("5/m".parse().unwrap())),
        quota: Some(Some("1MB/day".parse().unwrap())),
        ..Changes::default()
    };
    s.set("alice", &ch).unwrap();
    let a = s.get("alice").unwrap().unwrap();
    assert_eq!(
        (a.bandwidth, a.max_connections, a.rate, a.quota),
        (
            "300K".parse().unwrap(),
            Some(3),
            Some("5/m".parse().unwrap()),
            Some("1MB/day".parse().unwrap())
        )
    );
    let bad = Changes {
        bandwidth: Some("1K".parse().unwrap()),
        password: Some(String::new()),
        ..Changes::default()
    };
    assert!(s.set("alice", &bad).is_err());
    assert_eq!(
        s.get("alice").unwrap().unwrap().bandwidth,
        "300K".parse().unwrap()
    );
    assert!(matches!(s.set("nobody", &ch), Err(Error::NotFound(_))));
    s.add_with("carol", "pw3", bw, &ch).unwrap();
    assert_eq!(s.get("carol").unwrap().unwrap().max_connections, Some(3));
    assert_eq!(
        s.list()
            .unwrap()
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>(),
        ["alice", "carol"]
    );
    s.delete("carol").unwrap();
    assert!(matches!(s.delete("carol"), Err(Error::NotFound(_))));
    // Invites: uses spent in the signup's transaction, a taken name spends none.
    let token = invites::new_token();
    let h = invites::token_hash(&token);
    let made = s.add_invite(&h, 1, None).unwrap();
    assert!(matches!(
        s.add_hashed_invited("alice", "$argon2id$x", bw, &h),
        Err(Error::Exists(_))
    ));
    s.add_hashed_invited("dave", "$argon2id$x", bw, &h).unwrap();
    assert!(matches!(
        s.add_hashed_invited("erin", "$argon2id$x", bw, &h),
        Err(Error::Invite(invites::Refused::UsedUp))
    ));
    assert_eq!(s.invites().unwrap()[0].uses_left, 0);
    s.revoke_invite(&made.id).unwrap();
    assert!(matches!(
        s.revoke_invite(&made.id),
        Err(Error::NoSuchInvite(_))
    ));
    // Usage: increments per hour, from two stores (two nodes) adding up.
    let day = 1_796_083_200; // 2026-12-01 00:00 UTC
    let other = open();
    let d = |up, down| UsageDelta {
        user: "alice".into(),
        up,
        down,
    };
    s.record_usage(day + 10, &[d(100, 1000)], &[("alice".into(), 2)])
        .unwrap();
    other
        .record_usage(day + 20, &[d(1, 2)], &[("alice".into(), 1)])
        .unwrap();
    s.record_usage(day + 3605, &[d(5, 5)], &[]).unwrap();
    let rows = s.usage(None, day).unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].up, rows[0].down), (101, 1002));
    assert_eq!(s.usage(Some("bob"), day).unwrap(), vec![]);
    assert_eq!(s.quota_used("alice", day).unwrap(), 1113);
    s.reset_quota("alice", day).unwrap();
    assert_eq!(s.quota_used("alice", day).unwrap(), 0);
    s.record_usage(day + 7200, &[d(7, 0)], &[]).unwrap();
    assert_eq!(other.quota_used("alice", day).unwrap(), 7);
    assert!(matches!(s.reset_quota("bob", day), Err(Error::NotFound(_))));
    let act = s.activity().unwrap();
    assert_eq!(act.len(), 1);
    assert!(act[0].last_seen.is_some());
    // A change made by another connection moves the data version.
    let before = s.data_version().unwrap();
    other
        .set(
            "alice",
            &Changes {
                bandwidth: Some("2M".parse().unwrap()),
                ..Changes::default()
            },
        )
        .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || s.data_version().unwrap()
            != before),
        "another node's change was not noticed"
    );
    assert_eq!(
        s.get("alice").unwrap().unwrap().bandwidth,
        "2M".parse().unwrap()
    );
    // Usage written by another connection is no user change: nothing to reload.
    std::thread::sleep(Duration::from_millis(600)); // a pending notice lands meanwhile
    let settled = s.data_version().unwrap();
    other
        .record_usage(day + 9000, &[d(1, 1)], &[("alice".into(), 0)])
        .unwrap();
    let moved = eventually(Duration::from_secs(1), || {
        s.data_version().unwrap() != settled
    });
    assert!(!moved, "a usage write moved the users' version");
}

#[test]
fn sqlite_behaves_as_a_user_store() {
    let db = temp_dir().join("u.db");
    behaves_as_a_user_store(&move || Db::Sqlite(db.clone()).open().unwrap());
}

#[test]
fn processes_opening_a_new_sqlite_file_at_once_migrate_it_once() {
    let db = temp_dir().join("u.db");
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || Db::Sqlite(db).open().map(|_| ()))
        })
        .collect();
    for o in opens {
        o.join().unwrap().unwrap();
    }
    let s = Db::Sqlite(db).open().unwrap();
    s.add("alice", "pw", "1M".parse().unwrap()).unwrap();
}

#[test]
fn postgres_behaves_as_a_user_store() {
    let pg = Postgres::start();
    let info = pg.conninfo();
    let db: Db = info.parse().unwrap();
    assert!(db.is_postgres());
    behaves_as_a_user_store(&move || db.open().unwrap());
    // Two nodes starting at once on an empty database: one migrates, the other waits.
    drop(pg);
    let pg = Postgres::start();
    let db: Db = pg.conninfo().parse().unwrap();
    let nodes: Vec<_> = (0..4)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || db.open().map(|_| ()))
        })
        .collect();
    for n in nodes {
        n.join().unwrap().unwrap();
    }
    let version: i64 = pg
        .client()
        .query_one("SELECT version FROM flowgate_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(version, flowgate::users::PG_SCHEMA_VERSION);
    let rows = pg
        .client()
        .query("SELECT version FROM flowgate_schema", &[])
        .unwrap()
        .len();
    assert_eq!(rows, 1, "migrated once");
}

#[test]
fn postgres_over_tls_is_verified_against_the_operators_ca() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (_pg, ca) = Postgres::start_tls(port);
    let db = std::path::PathBuf::from(format!(
        "host=localhost port={port} user=postgres dbname=postgres sslmode=require"
    ));
    let run = |ca: Option<&std::path::Path>, args: &[&str]| {
        let mut cmd = remote_bin();
        cmd.arg("--db").arg(&db).args(args).env("HOME", temp_dir());
        match ca {
            Some(ca) => cmd.env("PGSSLROOTCERT", ca),
            None => cmd.env_remove("PGSSLROOTCERT"),
        };
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(
        Some(&ca),
        &[
            "user",
            "add",
            "alice",
            "--bandwidth",
            "1M",
            "--password",
            "pw",
        ],
    );
    assert!(ok, "{err}");
    // Without a CA flowgate refuses to start rather than trust any server...
    let (ok, err) = run(None, &["user", "list"]);
    assert!(!ok && err.contains("PGSSLROOTCERT"), "{err}");
    // ...and a server whose certificate that CA did not sign is refused.
    let other = temp_dir().join("other-ca.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other, p.self_signed(&key).unwrap().pem()).unwrap();
    let (ok, err) = run(Some(&other), &["user", "list"]);
    assert!(!ok, "connected to a server the CA does not vouch for");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let (ok, err) = run(Some(&ca), &["user", "list"]);
    assert!(ok, "{err}");
}
