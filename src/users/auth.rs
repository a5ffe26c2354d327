//! Checking credentials: argon2 behind a cache of verified passwords and single flight.

use super::password::{ct_eq, verify_password_with};
use super::password::{hash_password, hash_password_with};
use super::{Error, User, UserStore};
use argon2::password_hash::rand_core::OsRng;
use argon2::Block;
use blake2::{Blake2b512, Digest};
use parking_lot::{Condvar, Mutex};
use rand_core::RngCore;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Cached verifications kept before the cache is cleared (bounds memory).
const CACHE_LIMIT: usize = 100_000;

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

/// A user read for a login ([`Authenticator::look_up`]).
#[derive(Debug)]
pub struct Lookup {
    user: Option<User>,
    digest: [u8; 64],
    cached: bool,
}

impl Lookup {
    /// The user, when this password verified against their current record before.
    pub fn cached_user(&self) -> Option<&User> {
        self.user.as_ref().filter(|_| self.cached)
    }
}

/// One argon2 check in progress, shared by every caller with the same name, password and
/// stored hash.
struct Flight {
    phc: String,
    // Set once: whether the password matched.
    result: Mutex<Option<bool>>,
    done: Condvar,
}

/// How long a login whose password verified before waits for the store before the last
/// record read serves it.
const KNOWN_WAIT: Duration = Duration::from_millis(250);

/// Checks credentials against the store, remembering successes.
///
/// A password that verified once is recognised by a keyed BLAKE2b digest (microseconds)
/// until the stored hash changes. A wrong password, or an unknown user, always costs a full
/// argon2 check, so timing does not tell the two apart. At most as many argon2 checks run at
/// once as there are cores: each takes 19 MiB, and a login flood must not exhaust memory.
/// Concurrent checks of the same name and password share one argon2 run (single flight): an
/// app that opens many connections at once would otherwise queue as many hashes.
pub struct Authenticator {
    // The store; one connection, lookups are short primary-key reads.
    store: Mutex<Box<dyn UserStore>>,
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
    // The last record read of each user whose password verified (refreshed by every change
    // the watcher sees): what serves them while the database cannot be reached, or while
    // a lookup ahead of them waits on it.
    known: Mutex<HashMap<String, User>>,
    // The database failed on the last lookup (logged once, when it starts and when it ends).
    store_down: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Wraps a store.
    pub fn new(store: impl UserStore + 'static) -> Result<Authenticator, Error> {
        Self::boxed(Box::new(store))
    }

    /// Wraps a store opened by [`super::Db::open`].
    pub fn boxed(store: Box<dyn UserStore>) -> Result<Authenticator, Error> {
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
            known: Mutex::new(HashMap::new()),
            store_down: std::sync::atomic::AtomicBool::new(false),
            cache: Mutex::new(HashMap::new()),
            key,
            dummy_hash,
            hash_memory: Mutex::new((0..slots).map(|_| Vec::new()).collect()),
            hash_memory_freed: Condvar::new(),
            flights: Mutex::new(HashMap::new()),
            hashes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// argon2 checks run so far (a cached login runs none).
    pub fn argon2_checks(&self) -> u64 {
        self.hashes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` with the store locked.
    pub fn with_store<T>(&self, f: impl FnOnce(&dyn UserStore) -> T) -> T {
        f(&**self.store.lock())
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
        self.with_hash_memory(|memory| verify_password_with(password, phc, memory))
    }

    /// Hashes a new password (signup) in the same bounded working memory as logins: at most
    /// one argon2 run per core at once, whatever mix of logins and signups arrives.
    ///
    /// # Errors
    /// `Hash` when argon2 refuses.
    pub fn hash_new(&self, password: &str) -> Result<String, Error> {
        self.with_hash_memory(|memory| hash_password_with(password, memory))
    }

    /// Runs `f` with one of the per-core argon2 working memories, waiting for one to be free.
    fn with_hash_memory<T>(&self, f: impl FnOnce(&mut Vec<Block>) -> T) -> T {
        let mut memory = {
            let mut pool = self.hash_memory.lock();
            loop {
                if let Some(m) = pool.pop() {
                    break m;
                }
                self.hash_memory_freed.wait(&mut pool);
            }
        };
        let out = f(&mut memory);
        self.hash_memory.lock().push(memory);
        self.hash_memory_freed.notify_one();
        out
    }

    /// Reads the user a login names, and whether this password verified against that
    /// record before. A cached success was a right password, so callers may skip the
    /// failed-login bookkeeping for it (concurrent logins of a known user then never look
    /// like a burst of guesses) and finish with [`verify`](Self::verify) otherwise, which
    /// does not read the store again.
    ///
    /// # Errors
    /// `Store` when the database fails and the user was not verified before.
    pub fn look_up(&self, name: &str, password: &str) -> Result<Lookup, AuthError> {
        let digest = self.digest(name, password);
        let user = self.lookup(name, &digest)?;
        let cached = user
            .as_ref()
            .is_some_and(|u| self.is_cached(name, &u.password_hash, &digest));
        if let (true, Some(u)) = (cached, &user) {
            self.known.lock().insert(name.to_string(), u.clone());
        }
        Ok(Lookup {
            user,
            digest,
            cached,
        })
    }

    /// Reads a user from the store. When the store cannot answer, a user whose password
    /// (`digest`) verified before is served from the last record read, so their tunnels
    /// keep working through a database outage; anyone else gets the error (fail closed).
    fn lookup(&self, name: &str, digest: &[u8; 64]) -> Result<Option<User>, AuthError> {
        use std::sync::atomic::Ordering::Relaxed;
        // While the database is down, a known user does not queue behind a lookup that is
        // waiting on it: one login tries the database, the known ones are served as before.
        // Nor, before that is known, behind one stuck on a database that stopped answering
        // (until its connection is given up on): they wait `KNOWN_WAIT` at most.
        let wait = if self.store_down.load(Relaxed) {
            Duration::ZERO
        } else {
            KNOWN_WAIT
        };
        let read = match self.store.try_lock_for(wait) {
            Some(store) => store.get(name),
            None => match self.known_and_verified(name, digest) {
                Some(u) => return Ok(Some(u)),
                None => self.store.lock().get(name),
            },
        };
        match read {
            Ok(user) => {
                if self.store_down.swap(false, Relaxed) {
                    log::info!("user database reachable again");
                }
                Ok(user)
            }
            Err(e) => {
                if !self.store_down.swap(true, Relaxed) {
                    log::error!(
                        "user database unavailable ({e}); users verified before keep working, \
                         other logins are refused until it is back"
                    );
                }
                self.known_and_verified(name, digest)
                    .map(Some)
                    .ok_or(AuthError::Store(e))
            }
        }
    }

    /// The last record read of `name`, when this password verified against it.
    fn known_and_verified(&self, name: &str, digest: &[u8; 64]) -> Option<User> {
        let known = self.known.lock().get(name).cloned()?;
        self.is_cached(name, &known.password_hash, digest)
            .then_some(known)
    }

    /// True while the last lookup found the database unreachable.
    pub fn store_down(&self) -> bool {
        self.store_down.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns the user when `password` is theirs.
    ///
    /// # Errors
    /// `BadCredentials` for an unknown user or wrong password; `Store` when the database
    /// fails.
    pub fn authenticate(&self, name: &str, password: &str) -> Result<User, AuthError> {
        let looked = self.look_up(name, password)?;
        self.verify(name, password, looked)
    }

    /// Finishes a login [`look_up`](Self::look_up) began: the user when the password is
    /// theirs (from the cache, or the slow check).
    ///
    /// # Errors
    /// `BadCredentials` for an unknown user or wrong password.
    pub fn verify(&self, name: &str, password: &str, looked: Lookup) -> Result<User, AuthError> {
        let Lookup {
            user,
            digest,
            cached,
        } = looked;
        let Some(user) = user else {
            // Against the dummy hash, through the same single flight as a known user's
            // check: identical concurrent attempts share one run either way, so timing does
            // not tell which names exist.
            self.shared_verify(name, password, &self.dummy_hash, digest);
            return Err(AuthError::BadCredentials);
        };
        if !cached && !self.shared_verify(name, password, &user.password_hash, digest) {
            return Err(AuthError::BadCredentials);
        }
        self.known.lock().insert(name.to_string(), user.clone());
        Ok(user)
    }

    /// True when this name and password verified against `phc` before.
    fn is_cached(&self, name: &str, phc: &str, digest: &[u8; 64]) -> bool {
        self.cache
            .lock()
            .get(name)
            .is_some_and(|v| v.phc == phc && ct_eq(&v.digest, digest))
    }

    /// Runs the argon2 check, or waits for an identical one already running; a success is
    /// cached before anyone is told.
    fn shared_verify(&self, name: &str, password: &str, phc: &str, digest: [u8; 64]) -> bool {
        use std::collections::hash_map::Entry;
        let mut flights = self.flights.lock();
        // A leader caches its success before it retires its flight, so with the flights
        // locked, "no flight" means either nobody checked or the check's success is already
        // in the cache. A login that missed the cache just before a flight landed finds its
        // answer here instead of hashing again.
        if !flights.contains_key(&digest) && self.is_cached(name, phc, &digest) {
            return true;
        }
        // The flight to wait for or lead, and whether we lead it.
        let joined = match flights.entry(digest) {
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
        drop(flights);
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

    /// Takes a fresh read of every user: verifications of users no longer there are
    /// forgotten, and the records that serve known users when the store is slow or down
    /// are replaced, so those are never older than the last change seen.
    pub fn users_changed(&self, users: &[User]) {
        let by_name: HashMap<&str, &User> = users.iter().map(|u| (u.name.as_str(), u)).collect();
        self.cache
            .lock()
            .retain(|name, _| by_name.contains_key(name.as_str()));
        self.known
            .lock()
            .retain(|name, known| match by_name.get(name.as_str()) {
                Some(fresh) => {
                    *known = (*fresh).clone();
                    true
                }
                None => false,
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::rate::Bandwidth;
    use crate::users::{temp_db, Changes, Store};

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
    fn a_known_user_is_not_held_up_by_a_lookup_stuck_on_the_store() {
        let db = temp_db();
        let s = Store::open(&db).unwrap();
        s.add("alice", "right", Bandwidth::UNLIMITED).unwrap();
        s.add("bob", "his", Bandwidth::UNLIMITED).unwrap();
        let auth = Arc::new(Authenticator::new(s).unwrap());
        assert!(auth.authenticate("alice", "right").is_ok());
        // A change seen by the watcher replaces the record that serves her.
        let ch = Changes {
            bandwidth: Some("300K".parse().unwrap()),
            ..Changes::default()
        };
        Store::open(&db).unwrap().set("alice", &ch).unwrap();
        auth.users_changed(&Store::open(&db).unwrap().list().unwrap());
        // Another lookup holds the store, as one waiting on a database that stopped
        // answering would.
        let (held_tx, held_rx) = crossbeam_channel::bounded(0);
        let holder = {
            let auth = Arc::clone(&auth);
            std::thread::spawn(move || {
                auth.with_store(|_| {
                    held_tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(1500));
                })
            })
        };
        held_rx.recv().unwrap();
        let t = std::time::Instant::now();
        let alice = auth.authenticate("alice", "right").unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(alice.bandwidth, "300K".parse().unwrap());
        // Not her with a wrong password, nor a user never verified here: they wait.
        assert!(matches!(
            auth.authenticate("alice", "wrong"),
            Err(AuthError::BadCredentials)
        ));
        assert!(auth.authenticate("bob", "his").is_ok());
        assert!(
            t.elapsed() >= Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        holder.join().unwrap();
        // A deleted user's record is dropped with the change that deleted her.
        Store::open(&db).unwrap().delete("alice").unwrap();
        auth.users_changed(&Store::open(&db).unwrap().list().unwrap());
        assert!(auth.known.lock().get("alice").is_none());
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
        assert_eq!(hashes(&auth), 2);
        assert!(auth.flights.lock().is_empty());
    }

    fn hashes(auth: &Authenticator) -> u64 {
        auth.hashes.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn a_known_password_is_checked_with_argon2_once() {
        let db = temp_db();
        let s = Store::open(&db).unwrap();
        s.add("alice", "right", Bandwidth::UNLIMITED).unwrap();
        let auth = Authenticator::new(s).unwrap();
        for _ in 0..10 {
            auth.authenticate("alice", "right").unwrap();
        }
        assert_eq!(hashes(&auth), 1);
        // A wrong password is never answered from the cache.
        for _ in 0..2 {
            assert!(auth.authenticate("alice", "wrong").is_err());
        }
        assert_eq!(hashes(&auth), 3);
    }

    #[test]
    fn a_login_that_missed_the_cache_as_a_flight_landed_does_not_hash_again() {
        // Regression: a second argon2 check ran here. The race, replayed in order: this login looked at the cache
        // before the first check finished, and asks for a flight after it landed.
        let db = temp_db();
        let s = Store::open(&db).unwrap();
        s.add("alice", "right", Bandwidth::UNLIMITED).unwrap();
        let auth = Authenticator::new(s).unwrap();
        let user = auth.authenticate("alice", "right").unwrap();
        assert_eq!(hashes(&auth), 1);
        let digest = auth.digest("alice", "right");
        assert!(auth.shared_verify("alice", "right", &user.password_hash, digest));
        assert_eq!(hashes(&auth), 1, "a second argon2 check ran");
    }
}
