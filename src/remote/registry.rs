//! Per-user state shared by all of a user's tunnels: the bucket, and the watcher that applies
//! changes made by other processes.

use super::Remote;
use crate::limit::bucket::SharedBucket;
use crate::limit::rate::Bandwidth;
use std::collections::HashMap;
use std::sync::Arc;

impl Remote {
    /// The user's bucket, created on first use; applies `bandwidth` (just read from the
    /// database) so a change is in force from this tunnel on.
    pub(super) fn bucket_for(&self, name: &str, bandwidth: Bandwidth) -> Arc<SharedBucket> {
        let mut map = self.buckets.lock();
        let b = map
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(SharedBucket::new(bandwidth)));
        b.set_rate(bandwidth);
        Arc::clone(b)
    }

    /// Applies bandwidth changes and deletions made by other processes to live buckets.
    pub(super) fn watch_users(&self, stop: crossbeam_channel::Receiver<()>) {
        let mut seen = self.auth.with_store(|s| s.data_version()).ok();
        loop {
            match stop.recv_timeout(self.cfg.user_poll) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let now = match self.auth.with_store(|s| s.data_version()) {
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
            let users = match self.auth.with_store(|s| s.list()) {
                Ok(u) => u,
                Err(e) => {
                    log::warn!("cannot reload users: {e}");
                    continue;
                }
            };
            let rates: HashMap<&str, _> = users
                .iter()
                .map(|u| (u.name.as_str(), u.bandwidth))
                .collect();
            let mut map = self.buckets.lock();
            map.retain(|name, bucket| match rates.get(name.as_str()) {
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
            drop(map);
            self.auth.retain_cached(&|n| rates.contains_key(n));
        }
    }
}
