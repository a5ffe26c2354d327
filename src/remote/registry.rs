//! Per-user state shared by all of a user's tunnels: the bandwidth bucket and the request-rate
//! throttle, and the watcher that applies `user set` and `user del` made by other processes.
//!
//! Out of scope: checking passwords (users/) and per-user connection caps (the gate in
//! limit/admission.rs, driven by remote/mod.rs).

use crate::limit::bucket::SharedBucket;
use crate::limit::rate::{Bandwidth, RequestRate};
use crate::limit::throttle::Throttle;
use crate::users::{Authenticator, User};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The live per-user state of one remote-proxy.
#[derive(Debug, Default)]
pub struct Registry {
    // One bucket per user who has had a tunnel, shared by all of that user's tunnels.
    buckets: Mutex<HashMap<String, Arc<SharedBucket>>>,
    // Per-user request rates: one sliding log per distinct rate, keyed by user name, so users
    // on the same rate share a map instead of each owning a throttle.
    throttles: Mutex<HashMap<RequestRate, Arc<Throttle<String>>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The user's bucket, created on first use; applies `bandwidth` (just read from the
    /// database) so a change is in force from this tunnel on.
    pub fn bucket_for(&self, name: &str, bandwidth: Bandwidth) -> Arc<SharedBucket> {
        let mut map = self.buckets.lock();
        let b = map
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(SharedBucket::new(bandwidth)));
        b.set_rate(bandwidth);
        Arc::clone(b)
    }

    /// Time relays have spent waiting on the users' buckets, all users together.
    pub fn bucket_wait(&self) -> Duration {
        self.buckets.lock().values().map(|b| b.waited()).sum()
    }

    /// Counts a new tunnel of `user` against their request rate.
    ///
    /// # Errors
    /// The wait until the oldest tunnel in the window leaves it, when the user is at the rate.
    pub fn check_rate(&self, user: &str, rate: RequestRate) -> Result<(), Duration> {
        let throttle = Arc::clone(
            self.throttles
                .lock()
                .entry(rate)
                .or_insert_with(|| Arc::new(Throttle::new(rate))),
        );
        throttle.check(&user.to_string())
    }

    /// Applies the database's current users to live state: new bandwidths reach the buckets
    /// (waking blocked relays), and deleted users' buckets are dropped.
    pub fn apply(&self, users: &[User]) {
        let rates: HashMap<&str, Bandwidth> = users
            .iter()
            .map(|u| (u.name.as_str(), u.bandwidth))
            .collect();
        self.buckets
            .lock()
            .retain(|name, bucket| match rates.get(name.as_str()) {
                Some(bw) => {
                    if bucket.rate() != *bw {
                        log::info!("user={name} bandwidth now {bw}");
                        bucket.set_rate(*bw);
                    }
                    true
                }
                None => {
                    log::info!("user={name} deleted; new tunnels refused");
                    false
                }
            });
    }
}

/// Polls the store for changes made by other processes every `every` and applies them to
/// `registry` and to `auth`'s cache, until `stop` is closed.
pub fn watch_users(
    auth: &Authenticator,
    registry: &Registry,
    accounts: &super::accounting::Accounts,
    every: Duration,
    stop: crossbeam_channel::Receiver<()>,
) {
    let mut seen = auth.with_store(|s| s.data_version()).ok();
    loop {
        match stop.recv_timeout(every) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let now = match auth.with_store(|s| s.data_version()) {
            Ok(v) => v,
            Err(e) => {
                log::warn!("cannot poll the user database: {e}");
                continue;
            }
        };
        if Some(now) == seen {
            continue;
        }
        seen = Some(now);
        let users = match auth.with_store(|s| s.list()) {
            Ok(u) => u,
            Err(e) => {
                log::warn!("cannot reload users: {e}");
                continue;
            }
        };
        registry.apply(&users);
        auth.with_store(|s| accounts.apply(&users, s));
        auth.users_changed(&users);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, bw: &str) -> User {
        User {
            name: name.into(),
            password_hash: String::new(),
            bandwidth: bw.parse().unwrap(),
            created_at: 0,
            max_connections: None,
            rate: None,
            quota: None,
        }
    }

    #[test]
    fn a_changed_bandwidth_reaches_the_live_bucket_and_a_deleted_user_loses_it() {
        let r = Registry::new();
        let a = r.bucket_for("alice", "1M".parse().unwrap());
        let b = r.bucket_for("bob", "1M".parse().unwrap());
        r.apply(&[user("alice", "300K")]);
        assert_eq!(a.rate(), "300K".parse().unwrap());
        // bob was deleted: his next tunnel (if the store still let it in) gets a new bucket.
        let b2 = r.bucket_for("bob", "1M".parse().unwrap());
        assert!(!Arc::ptr_eq(&b, &b2));
        assert!(Arc::ptr_eq(
            &a,
            &r.bucket_for("alice", "300K".parse().unwrap())
        ));
    }

    #[test]
    fn users_on_one_rate_are_counted_apart() {
        let r = Registry::new();
        let rate: RequestRate = "2/m".parse().unwrap();
        assert!(r.check_rate("alice", rate).is_ok());
        assert!(r.check_rate("alice", rate).is_ok());
        assert!(r.check_rate("alice", rate).is_err());
        assert!(r.check_rate("bob", rate).is_ok());
    }
}
