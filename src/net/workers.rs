//! The worker pool both proxies run their connections on.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use threadpool::ThreadPool;

/// Stack size of every worker thread, in bytes. Relay buffers live on the heap; the deepest
/// stack use is getaddrinfo and argon2's setup, both well under this. The default 2 MiB costs
/// address space per thread, and thousands of tunnels mean thousands of threads; only touched
/// pages become resident, so this bounds the worst case, not the typical one.
pub const WORKER_STACK_SIZE: usize = 256 * 1024;

/// A thread pool that runs every job at once: it grows instead of queueing.
#[derive(Clone)]
pub struct Workers {
    inner: Arc<WorkersInner>,
}

struct WorkersInner {
    // The pool; behind a mutex because growing it needs `&mut`.
    pool: Mutex<ThreadPool>,
    // Jobs submitted and not yet finished.
    busy: AtomicUsize,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("busy", &self.inner.busy.load(Ordering::Relaxed))
            .finish()
    }
}

struct BusyGuard(Arc<WorkersInner>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Workers {
    /// An empty pool whose threads are named `name`.
    pub fn new(name: &str) -> Workers {
        let pool = threadpool::Builder::new()
            .num_threads(1)
            .thread_name(name.to_string())
            .thread_stack_size(WORKER_STACK_SIZE)
            .build();
        Workers {
            inner: Arc::new(WorkersInner {
                pool: Mutex::new(pool),
                busy: AtomicUsize::new(0),
            }),
        }
    }

    /// Runs `job` on a pool thread, adding a thread when every one is busy.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let mut pool = self.inner.pool.lock();
        let busy = self.inner.busy.fetch_add(1, Ordering::AcqRel) + 1;
        if busy > pool.max_count() {
            // Grow by a quarter at a time so a burst of tunnels does not add threads one by
            // one under the lock.
            let target = busy.max(pool.max_count() + pool.max_count() / 4);
            pool.set_num_threads(target);
        }
        let guard = BusyGuard(Arc::clone(&self.inner));
        pool.execute(move || {
            let _guard = guard;
            job();
        });
    }
}
