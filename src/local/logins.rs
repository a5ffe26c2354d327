//! Checking an app's credentials with remote-proxy while the app is still in its RFC 1929
//! sub-negotiation, so a wrong password gets the RFC 1929 failure status ("authentication
//! failed") instead of a CONNECT refusal that apps report as "not allowed by ruleset".
//!
//! A success is remembered for [`REMEMBER`], keyed by a keyed BLAKE2b digest of the name and
//! password (never the password itself), so a browser opening many connections at once costs
//! one check: concurrent checks of the same credentials wait for the first. Failures are not
//! remembered: remote-proxy's failed-login throttle is the one that limits guessing.

use blake2::{Blake2b512, Digest};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a successful check is trusted: short, so a password changed or a user deleted
/// at the remote is noticed soon (remote-proxy checks every tunnel anyway).
pub const REMEMBER: Duration = Duration::from_secs(30);

/// Entries kept at most before the cache is cleared (bounds memory).
const LIMIT: usize = 10_000;

/// What the check said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The remote accepted the credentials.
    Good,
    /// The remote refused them.
    Refused,
    /// No remote could say (all down, or an error): let the tunnel request find out.
    Unknown,
}

/// Remembered successful checks.
#[derive(Debug)]
pub struct Logins {
    // Random per-process key for the digests.
    key: [u8; 32],
    // Digest -> when it was checked good.
    good: Mutex<HashMap<[u8; 64], Instant>>,
    // One lock per digest being checked, so a burst waits for one check.
    checking: Mutex<HashMap<[u8; 64], Arc<Mutex<()>>>>,
}

impl Default for Logins {
    fn default() -> Self {
        Logins::new()
    }
}

impl Logins {
    /// An empty cache with a fresh key.
    pub fn new() -> Logins {
        use rand_core::RngCore;
        let mut key = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut key);
        Logins {
            key,
            good: Mutex::new(HashMap::new()),
            checking: Mutex::new(HashMap::new()),
        }
    }

    fn digest(&self, user: &str, password: &str) -> [u8; 64] {
        let mut h = Blake2b512::new();
        h.update(self.key);
        h.update((user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn remembered(&self, d: &[u8; 64], now: Instant) -> bool {
        self.good
            .lock()
            .get(d)
            .is_some_and(|&at| now.saturating_duration_since(at) < REMEMBER)
    }

    /// The verdict for `user`/`password`: remembered, or from `check` (run at most once at
    /// a time per credentials; callers with the same ones wait and share a success).
    pub fn verify(&self, user: &str, password: &str, check: impl FnOnce() -> Verdict) -> Verdict {
        let d = self.digest(user, password);
        if self.remembered(&d, Instant::now()) {
            return Verdict::Good;
        }
        let lock = Arc::clone(self.checking.lock().entry(d).or_default());
        let _one_at_a_time = lock.lock();
        if self.remembered(&d, Instant::now()) {
            return Verdict::Good;
        }
        let verdict = check();
        if verdict == Verdict::Good {
            let mut good = self.good.lock();
            if good.len() >= LIMIT {
                good.clear();
            }
            good.insert(d, Instant::now());
        }
        self.checking.lock().remove(&d);
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_burst_with_good_credentials_costs_one_check() {
        let logins = Arc::new(Logins::new());
        let checks = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(std::sync::Barrier::new(20));
        let hs: Vec<_> = (0..20)
            .map(|_| {
                let (logins, checks, start) = (logins.clone(), checks.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    logins.verify("alice", "pw", || {
                        checks.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(50));
                        Verdict::Good
                    })
                })
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap(), Verdict::Good);
        }
        assert_eq!(checks.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn failures_are_not_remembered_and_passwords_are_told_apart() {
        let logins = Logins::new();
        assert_eq!(
            logins.verify("alice", "bad", || Verdict::Refused),
            Verdict::Refused
        );
        assert_eq!(
            logins.verify("alice", "bad", || Verdict::Refused),
            Verdict::Refused
        );
        assert_eq!(
            logins.verify("alice", "pw", || Verdict::Good),
            Verdict::Good
        );
        // Remembered for the right password only.
        assert_eq!(
            logins.verify("alice", "pw", || Verdict::Refused),
            Verdict::Good
        );
        assert_eq!(
            logins.verify("alice", "pw2", || Verdict::Refused),
            Verdict::Refused
        );
        assert!(logins.checking.lock().is_empty());
    }
}
