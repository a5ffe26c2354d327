//! The worker pool both proxies run their connections on: it grows on demand up to a hard
//! cap, hands each job to the most recently idle worker, and lets idle workers beyond a few
//! spares exit after an idle timeout (Apache's MaxSpareThreads, a Java ThreadPoolExecutor's
//! keepAliveTime).
//!
//! Threads come from a `threadpool::ThreadPool`, but every thread runs one long job, a
//! worker loop, for its whole life; jobs reach a worker loop through that worker's own
//! crossbeam channel. threadpool alone could not shrink: its idle threads block in a
//! receive with no timeout, and lowering its size only stops threads that finish a job.
//! Here a worker that stays idle for the timeout lowers the pool's size by one and returns
//! from its job, and threadpool then ends that thread (it exits a thread that finds the pool
//! over size between jobs).
//!
//! Why the most recently idle worker gets the next job (a stack, not a queue): with a queue
//! every idle worker takes turns, so after a burst hundreds of cold threads stay in rotation,
//! none ever idle long enough to retire, and each job wakes a thread whose stack and caches
//! went cold. With a stack the few warm workers serve the steady load and the rest time out.
//!
//! Out of scope: what a job does (net/server.rs runs connections, net/relay/ a copying
//! direction).

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use threadpool::ThreadPool;

/// Stack size of every worker thread, in bytes. Relay buffers live on the heap; the deepest
/// stack use is getaddrinfo and argon2's setup, both well under this. The default 2 MiB costs
/// address space per thread, and thousands of tunnels mean thousands of threads; only touched
/// pages become resident, so this bounds the worst case, not the typical one.
pub const WORKER_STACK_SIZE: usize = 256 * 1024;

/// Idle workers kept however long they idle, so a new connection after a quiet spell does
/// not wait for a thread to be created.
pub const SPARE_WORKERS: usize = 4;

/// How the pool sizes itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Most worker threads at once; further jobs wait for a worker to finish.
    pub max_workers: usize,
    /// An idle worker beyond [`SPARE_WORKERS`] exits after this long without a job.
    pub idle_timeout: Duration,
}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A cloneable handle on one pool.
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    config: PoolConfig,
    // Makes the threads; its size is kept equal to the number of worker loops alive.
    pool: Mutex<ThreadPool>,
    // Idle workers, the most recently idle last; also jobs waiting for a worker when the
    // pool is at its cap. One lock, so a worker never goes idle while a job waits.
    state: Mutex<State>,
    // Worker loops alive (busy or idle).
    alive: AtomicUsize,
    // Set by `close`: workers exit instead of going idle.
    closed: AtomicBool,
}

#[derive(Default)]
struct State {
    idle: Vec<Arc<Idle>>,
    backlog: VecDeque<Job>,
}

/// How a job reaches one idle worker: its own channel, so the job goes to that worker and
/// no other. `None` tells it to exit (the pool is closing).
struct Idle {
    tx: crossbeam_channel::Sender<Option<Job>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("alive", &self.alive())
            .field("idle", &self.idle())
            .finish()
    }
}

impl Workers {
    /// An empty pool whose threads are named `name`.
    pub fn new(name: &str, config: PoolConfig) -> Workers {
        let pool = threadpool::Builder::new()
            .num_threads(1)
            .thread_name(name.to_string())
            .thread_stack_size(WORKER_STACK_SIZE)
            .build();
        Workers {
            inner: Arc::new(Inner {
                config: PoolConfig {
                    max_workers: config.max_workers.max(1),
                    ..config
                },
                pool: Mutex::new(pool),
                state: Mutex::new(State::default()),
                alive: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Runs `job` on the most recently idle worker, or on a new one; at the cap, as soon as a
    /// worker finishes. A panicking job is caught; its worker goes on.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(job);
        let mut st = self.inner.state.lock();
        if let Some(idle) = st.idle.pop() {
            drop(st);
            // The worker waits on this channel (capacity 1, empty while it is listed idle);
            // if it is gone (the pool was closed), the job is dropped with it.
            let _ = idle.tx.send(Some(job));
            return;
        }
        let alive = self.inner.alive.load(Ordering::Acquire);
        if alive >= self.inner.config.max_workers {
            st.backlog.push_back(job);
            log::debug!("worker pool at its cap of {alive}; job waits for a worker");
            return;
        }
        self.inner.alive.fetch_add(1, Ordering::AcqRel);
        drop(st);
        let inner = Arc::clone(&self.inner);
        let mut pool = self.inner.pool.lock();
        let size = self.inner.alive.load(Ordering::Acquire).max(1);
        if size > pool.max_count() {
            // threadpool panics when the OS refuses a thread (RLIMIT_NPROC, threads-max);
            // that must not take the caller (the accept loop) down with it.
            let grown = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.set_num_threads(size)
            }));
            if grown.is_err() {
                drop(pool);
                self.inner.alive.fetch_sub(1, Ordering::AcqRel);
                log::warn!(
                    "cannot start a worker thread ({} running); the job waits for one to \
                     finish (raise the process limit or lower --max-workers)",
                    self.alive()
                );
                self.inner.state.lock().backlog.push_back(job);
                return;
            }
        }
        pool.execute(move || worker_loop(inner, job));
    }

    /// Worker threads alive now, busy or idle.
    pub fn alive(&self) -> usize {
        self.inner.alive.load(Ordering::Acquire)
    }

    /// Workers waiting for a job now.
    pub fn idle(&self) -> usize {
        self.inner.state.lock().idle.len()
    }

    /// Lets every worker exit once its current job ends, and drops jobs not yet started.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let mut st = self.inner.state.lock();
        for idle in st.idle.drain(..) {
            let _ = idle.tx.send(None);
        }
        st.backlog.clear();
    }

    /// Ends threads the pool lost track of. A worker that retires while another is being
    /// added can, rarely, leave a thread waiting inside threadpool with no job; a no-op job
    /// (sent only when none is already queued) lets it run, see the pool over size, and end.
    /// Called a few times a second by the server's sweeper. With no worker alive the one
    /// thread threadpool keeps would run every no-op, so none is sent then.
    pub fn tidy(&self) {
        let pool = self.inner.pool.lock();
        if pool.queued_count() == 0 && self.alive() > 0 {
            pool.execute(|| {});
        }
    }
}

impl Inner {
    /// The next job for a worker that just finished one: a waiting job, else idle on its
    /// own channel until a job comes or the idle timeout says to retire. `None`: exit.
    fn next_job(
        &self,
        me: &Arc<Idle>,
        rx: &crossbeam_channel::Receiver<Option<Job>>,
    ) -> Option<Job> {
        {
            let mut st = self.state.lock();
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            if let Some(job) = st.backlog.pop_front() {
                return Some(job);
            }
            st.idle.push(Arc::clone(me));
        }
        loop {
            match rx.recv_timeout(self.config.idle_timeout) {
                Ok(job) => return job,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return None,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    let mut st = self.state.lock();
                    let Some(pos) = st.idle.iter().position(|i| Arc::ptr_eq(i, me)) else {
                        // Taken off the stack just now: a job is on its way.
                        drop(st);
                        return rx.recv().ok().flatten();
                    };
                    if st.idle.len() <= SPARE_WORKERS {
                        continue; // a spare: keep waiting
                    }
                    st.idle.remove(pos);
                    return None;
                }
            }
        }
    }

    /// A worker loop is ending: shrink threadpool by one so the thread exits after it.
    fn retire(&self) {
        let left = self.alive.fetch_sub(1, Ordering::AcqRel) - 1;
        let mut pool = self.pool.lock();
        // threadpool ends a thread that finds, between jobs, as many threads busy as its
        // size. The others are all inside worker loops (busy), so size = `left` ends this
        // one. It cannot go below 1; the last thread then waits inside threadpool.
        pool.set_num_threads(left.max(1));
    }
}

fn worker_loop(inner: Arc<Inner>, first: Job) {
    let (tx, rx) = crossbeam_channel::bounded::<Option<Job>>(1);
    let me = Arc::new(Idle { tx });
    let mut job = first;
    loop {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
            log::warn!("a worker job panicked: {}", panic_message(&*panic));
        }
        match inner.next_job(&me, &rx) {
            Some(next) => job = next,
            None => break,
        }
    }
    inner.retire();
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    fn pool(max: usize, idle_ms: u64) -> Workers {
        Workers::new(
            "test",
            PoolConfig {
                max_workers: max,
                idle_timeout: Duration::from_millis(idle_ms),
            },
        )
    }

    /// Waits until `cond` holds, for at most `secs`.
    fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        cond()
    }

    #[test]
    fn every_job_runs_at_once_while_under_the_cap() {
        let w = pool(64, 5_000);
        let n = 40;
        let barrier = Arc::new(std::sync::Barrier::new(n + 1));
        for _ in 0..n {
            let b = Arc::clone(&barrier);
            w.spawn(move || {
                b.wait();
            });
        }
        // Every job must be running at once for the barrier to open.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            barrier.wait();
            let _ = tx.send(());
        });
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        assert_eq!(w.alive(), n);
    }

    #[test]
    fn idle_workers_beyond_the_spares_exit_after_the_idle_timeout() {
        let w = pool(64, 200);
        let (release_tx, release_rx) = crossbeam_channel::unbounded::<()>();
        for _ in 0..30 {
            let r = release_rx.clone();
            w.spawn(move || {
                let _ = r.recv();
            });
        }
        assert!(eventually(5, || w.alive() == 30));
        drop(release_tx);
        assert!(
            eventually(5, || w.alive() == SPARE_WORKERS),
            "alive {} idle {}",
            w.alive(),
            w.idle()
        );
        // The spares stay, and still work.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(w.alive(), SPARE_WORKERS);
        let (tx, rx) = mpsc::channel();
        w.spawn(move || tx.send(7).unwrap());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(7));
    }

    #[test]
    fn sequential_jobs_go_to_the_same_warm_worker() {
        let w = pool(64, 5_000);
        let (release_tx, release_rx) = crossbeam_channel::unbounded::<()>();
        for _ in 0..20 {
            let r = release_rx.clone();
            w.spawn(move || {
                let _ = r.recv();
            });
        }
        drop(release_tx);
        assert!(eventually(5, || w.idle() == 20));
        let mut threads = std::collections::HashSet::new();
        for _ in 0..50 {
            let (tx, rx) = mpsc::channel();
            w.spawn(move || tx.send(std::thread::current().id()).unwrap());
            threads.insert(rx.recv_timeout(Duration::from_secs(5)).unwrap());
            // Let the worker list itself idle again before the next job.
            assert!(eventually(5, || w.idle() == 20));
        }
        assert_eq!(
            threads.len(),
            1,
            "jobs rotated over {} threads",
            threads.len()
        );
    }

    #[test]
    fn at_the_cap_jobs_wait_for_a_worker_and_all_run() {
        let w = pool(2, 5_000);
        let (release_tx, release_rx) = crossbeam_channel::unbounded::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        for i in 0..6 {
            let (r, d) = (release_rx.clone(), done_tx.clone());
            w.spawn(move || {
                let _ = r.recv();
                d.send(i).unwrap();
            });
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(w.alive(), 2, "the cap was exceeded");
        drop(release_tx);
        let mut done: Vec<i32> = (0..6)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        done.sort();
        assert_eq!(done, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_panicking_job_does_not_take_its_worker_down() {
        let w = pool(1, 5_000);
        w.spawn(|| panic!("job failed"));
        let (tx, rx) = mpsc::channel();
        w.spawn(move || tx.send(1).unwrap());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(1));
        assert_eq!(w.alive(), 1);
    }

    #[test]
    fn close_lets_idle_workers_exit() {
        let w = pool(8, 60_000);
        for _ in 0..3 {
            w.spawn(|| {});
        }
        assert!(eventually(5, || w.idle() >= 1));
        w.close();
        assert!(eventually(5, || w.alive() == 0), "alive {}", w.alive());
    }
}
