//! Byte counts as they move, and a volume quota's allowance, shared by every tunnel of a
//! user (and summed into a server-wide meter).
//!
//! The relay asks [`Meter::allowance`] before each read and reports each chunk with
//! [`Meter::moved`]: two atomic adds per chunk, no lock, so counting costs the relay nothing
//! it can measure. Writing the counts to the database is someone else's job (remote/
//! accounting.rs reads [`Meter::totals`] on its own thread).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// Which way bytes moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the app towards the target.
    Up,
    /// From the target towards the app.
    Down,
}

/// Counts for one user (or, as a parent, for the whole server).
#[derive(Debug)]
pub struct Meter {
    up: AtomicU64,
    down: AtomicU64,
    // Quota bytes left in the period; `NO_QUOTA` when there is no quota. Goes below zero
    // by at most what concurrent reads took at once, and is reset from the database.
    left: AtomicI64,
    parent: Option<Arc<Meter>>,
    // Told once each time the quota runs out, so someone can close the user's tunnels
    // that are not reading (and so would not notice).
    alarm: Option<crossbeam_channel::Sender<()>>,
    // Below this many bytes left, `low_alarm` is told (once per crossing): where the
    // allowance is a chunk of a quota shared by a fleet, it is time to ask for more.
    low_water: AtomicI64,
    low_alarm: Option<crossbeam_channel::Sender<()>>,
}

const NO_QUOTA: i64 = i64::MAX;

impl Default for Meter {
    fn default() -> Meter {
        Meter::new(None)
    }
}

impl Meter {
    /// A meter with no quota; what it counts is added to `parent` too.
    pub fn new(parent: Option<Arc<Meter>>) -> Meter {
        Meter {
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            left: AtomicI64::new(NO_QUOTA),
            parent,
            alarm: None,
            low_water: AtomicI64::new(0),
            low_alarm: None,
        }
    }

    /// As [`new`](Self::new), sending on `alarm` (without blocking) when a quota runs out,
    /// and on `low` when what is left falls below the low-water mark of [`set_left_with`].
    ///
    /// [`set_left_with`]: Self::set_left_with
    pub fn with_alarms(
        parent: Option<Arc<Meter>>,
        alarm: crossbeam_channel::Sender<()>,
        low: crossbeam_channel::Sender<()>,
    ) -> Meter {
        Meter {
            alarm: Some(alarm),
            low_alarm: Some(low),
            ..Meter::new(parent)
        }
    }

    /// How many of `want` bytes the next read may take: all of them without a quota, at
    /// most what is left with one, 0 once it is used up (the tunnel must end).
    pub fn allowance(&self, want: usize) -> usize {
        let left = self.left.load(Ordering::Relaxed);
        if left <= 0 {
            0
        } else {
            want.min(usize::try_from(left).unwrap_or(usize::MAX))
        }
    }

    /// Counts `n` bytes moved `dir`. False when this used the quota up.
    pub fn moved(&self, dir: Direction, n: u64) -> bool {
        let counter = match dir {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        };
        counter.fetch_add(n, Ordering::Relaxed);
        if let Some(p) = &self.parent {
            p.moved(dir, n);
        }
        let before = self.left.load(Ordering::Relaxed);
        if before == NO_QUOTA {
            return true;
        }
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        let before = self.left.fetch_sub(n, Ordering::Relaxed);
        if before > 0 && before <= n {
            if let Some(a) = &self.alarm {
                let _ = a.try_send(());
            }
        }
        let low = self.low_water.load(Ordering::Relaxed);
        if before > low && before - n <= low {
            if let Some(a) = &self.low_alarm {
                let _ = a.try_send(());
            }
        }
        before > n
    }

    /// Bytes counted up and down since this meter was made.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }

    /// As [`set_left`](Self::set_left), with a low-water mark: when what is left falls
    /// to it, the low alarm goes off.
    pub fn set_left_with(&self, left: Option<u64>, low_water: u64) {
        self.low_water.store(
            i64::try_from(low_water).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
        self.set_left(left);
    }

    /// Sets the quota bytes left in the period (`None`: no quota).
    pub fn set_left(&self, left: Option<u64>) {
        let v = left.map_or(NO_QUOTA, |l| i64::try_from(l).unwrap_or(NO_QUOTA - 1));
        self.left.store(v, Ordering::Relaxed);
    }

    /// True while a quota applies and nothing of it is left.
    pub fn used_up(&self) -> bool {
        self.left.load(Ordering::Relaxed) <= 0
    }

    /// True when a quota applies.
    pub fn has_quota(&self) -> bool {
        self.left.load(Ordering::Relaxed) != NO_QUOTA
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_both_ways_into_the_parent_too() {
        let all = Arc::new(Meter::default());
        let a = Meter::new(Some(Arc::clone(&all)));
        let b = Meter::new(Some(Arc::clone(&all)));
        assert!(a.moved(Direction::Up, 10));
        assert!(a.moved(Direction::Down, 100));
        assert!(b.moved(Direction::Down, 5));
        assert_eq!(a.totals(), (10, 100));
        assert_eq!(all.totals(), (10, 105));
        assert_eq!(a.allowance(65_536), 65_536);
        assert!(!a.has_quota());
    }

    #[test]
    fn a_quota_caps_reads_and_says_when_it_is_used_up() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (low_tx, low_rx) = crossbeam_channel::bounded(1);
        let m = Meter::with_alarms(None, tx, low_tx);
        m.set_left_with(Some(1000), 500);
        assert_eq!(m.allowance(65_536), 1000);
        assert!(m.moved(Direction::Up, 400));
        assert!(low_rx.try_recv().is_err(), "600 left, above the low water");
        assert!(m.moved(Direction::Up, 200));
        assert!(low_rx.try_recv().is_ok(), "400 left: time to ask for more");
        assert_eq!(m.allowance(65_536), 400);
        assert!(rx.try_recv().is_err());
        assert!(!m.moved(Direction::Down, 400), "the last byte uses it up");
        assert!(rx.try_recv().is_ok(), "the alarm went off once");
        assert!(!m.moved(Direction::Down, 1));
        assert!(rx.try_recv().is_err());
        assert_eq!(m.allowance(65_536), 0);
        assert!(m.used_up());
        // A larger quota (or a new period) lets it move again.
        m.set_left(Some(10));
        assert_eq!(m.allowance(65_536), 10);
        m.set_left(None);
        assert!(!m.used_up());
    }
}
