//! Per-user byte accounting and volume quotas at remote-proxy.
//!
//! Each user who has had a tunnel gets an [`Account`]: a meter the relays count into as
//! bytes move (limit/meter.rs), the user's open tunnels, and, for a user with a quota, a
//! handle on both sockets of each open tunnel so all of them can be cut the moment the
//! quota runs out. A flusher thread writes what the meters counted since the last flush to
//! the database in one transaction every `--flush-interval`, within half a second of a
//! tunnel closing, and at shutdown, so a crash loses at most one interval; the same pass re-reads each quota's
//! use in its period, which is how a new day (or `usage reset`, or a larger quota) lets a
//! user in again.
//!
//! Out of scope: the relay loop (net/relay/), the tables (users/), and the periods
//! (limit/quota.rs).

use crate::limit::calendar::unix_now;
use crate::limit::meter::Meter;
use crate::limit::quota::{self, Quota};
use crate::users::{Db, UsageDelta, User, UserStore};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// One user's live accounting.
#[derive(Debug)]
pub struct Account {
    name: String,
    meter: Arc<Meter>,
    quota: Mutex<Option<Quota>>,
    open: AtomicU32,
    // (up, down) of the meter as last written; only the flusher moves it.
    flushed: Mutex<(u64, u64)>,
    // Both sockets of each open tunnel of this user, kept only while the user has a quota.
    cut: Mutex<HashMap<u64, [TcpStream; 2]>>,
    // The user was deleted: the account goes once its tunnels ended and all is written.
    deleted: std::sync::atomic::AtomicBool,
}

impl Account {
    /// The meter this user's relays count into.
    pub fn meter(&self) -> &Arc<Meter> {
        &self.meter
    }

    /// Tunnels of this user relaying now.
    pub fn open_tunnels(&self) -> u32 {
        self.open.load(Ordering::Relaxed)
    }

    /// True when the user has a quota and nothing of it is left.
    pub fn used_up(&self) -> bool {
        self.meter.used_up()
    }

    /// True once the user was deleted (and not added again).
    pub fn deleted(&self) -> bool {
        self.deleted.load(Ordering::Relaxed)
    }

    /// When the user's quota lets them in again (Unix seconds), if they have one.
    pub fn resets_at(&self, now: i64) -> Option<i64> {
        self.quota.lock().map(|q| q.period.next(now))
    }

    /// Closes every open tunnel of this user: shutting both sockets down ends the relay
    /// whatever it is waiting for, and the app sees its connection end.
    fn cut_all(&self) -> usize {
        let cut = self.cut.lock();
        for s in cut.values().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
        cut.len()
    }
}

/// A tunnel counted as open until dropped.
#[must_use]
pub struct OpenTunnel {
    account: Arc<Account>,
    id: u64,
    closed: Arc<AtomicBool>,
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.account.cut.lock().remove(&self.id);
        self.account.open.fetch_sub(1, Ordering::Relaxed);
        // A flag, not a message: the flusher looks at it twice a second, so closing a
        // tunnel wakes no thread.
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// Every account of one remote-proxy, and the flusher's trigger.
#[derive(Debug)]
pub struct Accounts {
    db: Db,
    all: Arc<Meter>,
    users: Mutex<HashMap<String, Arc<Account>>>,
    next_id: AtomicU64,
    // A fleet node's chunk is running low: flush and read the quotas now.
    flush_soon: crossbeam_channel::Sender<()>,
    flush_asked: crossbeam_channel::Receiver<()>,
    // A tunnel closed: flush within `CLOSED_FLUSH_WITHIN` (closes are coalesced: at
    // thousands of tunnels a second, one write per close would be the proxy's main work).
    closed: Arc<AtomicBool>,
    // A user's quota ran out: the flusher closes that user's tunnels.
    used_up: crossbeam_channel::Sender<()>,
    used_up_rx: crossbeam_channel::Receiver<()>,
    // A fleet shares quotas: the chunk a node may spend ahead of the database.
    chunk: Option<fn(Quota) -> u64>,
}

/// The share of a quota one node of a fleet may spend ahead of the shared database: 64 MiB,
/// or 1% of the quota when that is more. The fleet goes past a quota by at most one chunk
/// per node besides the one that hits it. A node asks for the next chunk (a flush and a
/// fresh read) once a quarter of this one is spent, so at loopback speeds its tunnels do
/// not run dry while the database answers.
pub fn fleet_chunk(q: Quota) -> u64 {
    (64 << 20u64).max(q.bytes / 100)
}

/// How soon after a tunnel closes its counts are written (or at the flush interval, if
/// that comes first).
const CLOSED_FLUSH_WITHIN: Duration = Duration::from_millis(500);

/// How long after a quota runs out its user's tunnels are closed: long enough for a tunnel
/// that stopped at the quota to hand on what it already read, well within the second the
/// operator is promised.
const CUT_AFTER: Duration = Duration::from_millis(250);

impl Accounts {
    /// Accounts written to the database at `db`; a PostgreSQL one is shared by a fleet, so
    /// quotas are spent there in chunks ([`fleet_chunk`]).
    pub fn new(db: Db) -> Accounts {
        let chunk = db.is_postgres().then_some(fleet_chunk as fn(Quota) -> u64);
        let (flush_soon, flush_asked) = crossbeam_channel::bounded(1);
        let (used_up, used_up_rx) = crossbeam_channel::bounded(1);
        Accounts {
            db,
            all: Arc::new(Meter::default()),
            users: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            flush_soon,
            flush_asked,
            closed: Arc::new(AtomicBool::new(false)),
            used_up,
            used_up_rx,
            chunk,
        }
    }

    /// (user, up, down) counted since start, for each user with an account now.
    pub fn user_totals(&self) -> Vec<(String, u64, u64)> {
        self.users
            .lock()
            .values()
            .map(|a| {
                let (up, down) = a.meter.totals();
                (a.name.clone(), up, down)
            })
            .collect()
    }

    /// Bytes (up, down) relayed for all users since start.
    pub fn totals(&self) -> (u64, u64) {
        self.all.totals()
    }

    /// The account of `user`, made on first use with what the user's quota has left in its
    /// period (read from `store`).
    pub fn account(&self, user: &User, store: &dyn UserStore) -> Arc<Account> {
        if let Some(a) = self.existing(&user.name) {
            return a;
        }
        let a = Arc::new(Account {
            name: user.name.clone(),
            meter: Arc::new(Meter::with_alarms(
                Some(Arc::clone(&self.all)),
                self.used_up.clone(),
                self.flush_soon.clone(),
            )),
            quota: Mutex::new(None),
            open: AtomicU32::new(0),
            flushed: Mutex::new((0, 0)),
            cut: Mutex::new(HashMap::new()),
            deleted: std::sync::atomic::AtomicBool::new(false),
        });
        refresh_quota(&a, user.quota, store, unix_now(), self.chunk);
        // Another tunnel of the same user may have made one meanwhile: keep the first.
        Arc::clone(
            self.users
                .lock()
                .entry(user.name.clone())
                .or_insert_with(|| a),
        )
    }

    /// The account of `name` if it has one already: a tunnel's usual case, which needs
    /// nothing from the store.
    pub fn existing(&self, name: &str) -> Option<Arc<Account>> {
        self.users.lock().get(name).cloned()
    }

    /// Counts a tunnel of `account` as open; with a quota, keeps a handle on both its
    /// sockets so the tunnel can be cut when the quota runs out (two descriptors more per
    /// tunnel, only for users with a quota).
    pub fn open(
        &self,
        account: &Arc<Account>,
        client: &TcpStream,
        target: &TcpStream,
    ) -> OpenTunnel {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if account.meter.has_quota() {
            if let (Ok(c), Ok(t)) = (client.try_clone(), target.try_clone()) {
                account.cut.lock().insert(id, [c, t]);
            }
        }
        account.open.fetch_add(1, Ordering::Relaxed);
        OpenTunnel {
            account: Arc::clone(account),
            id,
            closed: Arc::clone(&self.closed),
        }
    }

    /// A tunnel of `account` found its quota used up: its other tunnels are closed now.
    pub fn quota_ran_out(&self, account: &Account) {
        let n = account.cut_all();
        if n > 0 {
            log::info!(
                "user={} quota used up: closing {}",
                account.name,
                open_tunnels_text(n)
            );
        }
    }

    /// Ends a deleted user's open tunnels: nothing more is let through them (a running one
    /// ends at its next read, an idle one when it next has bytes to move), and the ones
    /// held for a quota cut are closed now.
    fn user_deleted(&self, account: &Account) {
        *account.quota.lock() = None;
        account.meter.set_left(Some(0));
        account.cut_all();
        let n = account.open_tunnels() as usize;
        if n > 0 {
            log::info!(
                "user={} deleted: {} end at their next read",
                account.name,
                open_tunnels_text(n)
            );
        }
    }

    /// Applies the database's users (after a change by another process): quotas changed
    /// or reset take effect now, and deleted users' accounts go once their tunnels end.
    pub fn apply(&self, users: &[User], store: &dyn UserStore) {
        let now = unix_now();
        let by_name: HashMap<&str, &User> = users.iter().map(|u| (u.name.as_str(), u)).collect();
        let accounts: Vec<Arc<Account>> = self.users.lock().values().cloned().collect();
        for a in accounts {
            match by_name.get(a.name.as_str()) {
                Some(u) => {
                    // Added again under the same name before the old account went.
                    a.deleted.store(false, Ordering::Relaxed);
                    refresh_quota(&a, u.quota, store, now, self.chunk);
                    if a.used_up() {
                        self.quota_ran_out(&a);
                    }
                }
                None if !a.deleted.swap(true, Ordering::Relaxed) => self.user_deleted(&a),
                None => {}
            }
        }
    }

    /// Writes what was counted since the last flush, in one transaction, and refreshes
    /// each quota from the database. On failure the counts stay for the next flush.
    fn flush(&self, store: &dyn UserStore, now: i64) -> Result<(), crate::users::Error> {
        let accounts: Vec<Arc<Account>> = self.users.lock().values().cloned().collect();
        let mut deltas = Vec::with_capacity(accounts.len());
        let mut totals = Vec::with_capacity(accounts.len());
        let mut open = Vec::with_capacity(accounts.len());
        for a in &accounts {
            let (up, down) = a.meter.totals();
            let (fu, fd) = *a.flushed.lock();
            deltas.push(UsageDelta {
                user: a.name.clone(),
                up: up - fu,
                down: down - fd,
            });
            totals.push((up, down));
            open.push((a.name.clone(), a.open_tunnels()));
        }
        store.record_usage(now, &deltas, &open)?;
        for (a, t) in accounts.iter().zip(totals) {
            *a.flushed.lock() = t;
            let q = *a.quota.lock();
            if q.is_some() {
                refresh_quota(a, q, store, now, self.chunk);
                if a.used_up() {
                    self.quota_ran_out(a);
                }
            }
        }
        drop(accounts);
        // A deleted user's account stays until its last bytes are written.
        self.users.lock().retain(|_, a| {
            !a.deleted.load(Ordering::Relaxed)
                || a.open_tunnels() > 0
                || a.meter.totals() != *a.flushed.lock()
        });
        Ok(())
    }

    /// Starts the flusher thread, recording activity as `node` (this server, for a fleet's
    /// per-node rows); dropping the returned guard flushes one last time and waits for it,
    /// so a clean stop loses nothing.
    ///
    /// # Errors
    /// The database cannot be opened, or the thread cannot start.
    pub fn start_flusher(
        self: &Arc<Self>,
        every: Duration,
        node: &str,
    ) -> Result<FlusherGuard, Box<dyn std::error::Error + Send + Sync>> {
        let mut store = self.db.open()?;
        store.set_node(node);
        // A crash leaves the last run's open-tunnel counts behind: none are open now.
        let everyone: Vec<(String, u32)> = store.list()?.into_iter().map(|u| (u.name, 0)).collect();
        store.record_usage(unix_now(), &[], &everyone)?;
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let me = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("remote-accounting".into())
            .spawn(move || me.flush_loop(&*store, every, &stop_rx))?;
        Ok(FlusherGuard {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Closes the tunnels of every user whose quota is used up.
    fn cut_used_up(&self) {
        let accounts: Vec<Arc<Account>> = self.users.lock().values().cloned().collect();
        for a in accounts.iter().filter(|a| a.used_up()) {
            self.quota_ran_out(a);
        }
    }

    fn flush_loop(
        &self,
        store: &dyn UserStore,
        every: Duration,
        stop: &crossbeam_channel::Receiver<()>,
    ) {
        use std::time::Instant;
        let mut failing = false;
        let mut next = Instant::now() + every;
        let mut cut_at: Option<Instant> = None;
        loop {
            let due = cut_at.map_or(next, |c| c.min(next));
            let wait = due
                .saturating_duration_since(Instant::now())
                .min(CLOSED_FLUSH_WITHIN);
            let (last, flush) = crossbeam_channel::select! {
                recv(stop) -> _ => (true, true),
                recv(self.flush_asked) -> _ => (false, true),
                recv(self.used_up_rx) -> _ => {
                    cut_at = cut_at.or(Some(Instant::now() + CUT_AFTER));
                    (false, false)
                }
                default(wait) => {
                    let closed = self.closed.swap(false, Ordering::Relaxed);
                    (false, closed || Instant::now() >= next)
                }
            };
            if cut_at.is_some_and(|c| Instant::now() >= c) {
                cut_at = None;
                // Read the quotas again first: a fleet's chunk may have run out, not the
                // quota, and the read grants the next one.
                let _ = self.flush(store, unix_now());
                self.cut_used_up();
            }
            if !flush {
                continue;
            }
            if Instant::now() >= next {
                next = Instant::now() + every;
            }
            match self.flush(store, unix_now()) {
                Ok(()) if failing => {
                    failing = false;
                    log::info!("usage written to the database again");
                }
                Ok(()) => {}
                // One line when it starts failing, not one per interval.
                Err(e) if !failing => {
                    failing = true;
                    log::warn!("cannot write usage to the database (kept in memory): {e}");
                }
                Err(_) => {}
            }
            if last {
                return;
            }
        }
    }
}

/// "1 open tunnel", "3 open tunnels".
fn open_tunnels_text(n: usize) -> String {
    format!("{n} open tunnel{}", if n == 1 { "" } else { "s" })
}

/// Stops the flusher after one last flush, and waits for it.
pub struct FlusherGuard {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for FlusherGuard {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sets what `account`'s quota has left: the quota less what the database holds for this
/// period and what the meter counted that is not written yet.
///
/// With a fleet (`chunk`), at most one chunk of it: a node never runs more than a chunk
/// ahead of what the shared database knows, and asks again (a flush and a fresh read) when
/// a quarter of it is spent.
fn refresh_quota(
    account: &Account,
    quota: Option<Quota>,
    store: &dyn UserStore,
    now: i64,
    chunk: Option<fn(Quota) -> u64>,
) {
    *account.quota.lock() = quota;
    let Some(q) = quota else {
        account.meter.set_left(None);
        account.cut.lock().clear();
        return;
    };
    match store.quota_used(&account.name, q.period.start(now)) {
        Ok(used) => {
            let (up, down) = account.meter.totals();
            let (fu, fd) = *account.flushed.lock();
            let unwritten = (up - fu) + (down - fd);
            let left = quota::left(q, used.saturating_add(unwritten));
            match chunk.map(|c| c(q)) {
                Some(c) => account.meter.set_left_with(Some(left.min(c)), c / 4 * 3),
                None => account.meter.set_left(Some(left)),
            }
        }
        // Keep what the meter has: the quota is still counted down as bytes move.
        Err(e) => log::debug!("user={} cannot read quota use: {e}", account.name),
    }
}
