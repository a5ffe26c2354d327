//! Micro-benchmark of the shared bucket under contention: grants per second, and the fairness
//! of grants, with 1, 8 and 64 threads acquiring from one user's bucket at once.
//! `cargo bench --bench bucket`. Plain `std::time` rather than criterion: one number per case
//! is all we need, and the CI build stays free of criterion's dependency tree.

use flowgate::limit::bucket::SharedBucket;
use flowgate::limit::rate::Bandwidth;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn run(rate: Bandwidth, threads: usize, chunk: u64, secs: f64) -> (f64, f64, f64) {
    let bucket = Arc::new(SharedBucket::new(rate));
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..threads).map(|_| AtomicU64::new(0)).collect());
    let grants = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|i| {
            let (bucket, stop, counts, grants) =
                (bucket.clone(), stop.clone(), counts.clone(), grants.clone());
            std::thread::spawn(move || {
                let _g = bucket.register();
                while !stop.load(Ordering::Relaxed) {
                    let n = (bucket.chunk_limit(chunk as usize) as u64).min(chunk);
                    bucket.acquire(n);
                    if stop.load(Ordering::Relaxed) {
                        break; // granted after the clock stopped: not counted
                    }
                    counts[i].fetch_add(n, Ordering::Relaxed);
                    grants.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    // Lift the limit so waiters blocked on tokens notice the stop at once.
    bucket.set_rate(Bandwidth::UNLIMITED);
    for h in hs {
        h.join().unwrap();
    }
    let per: Vec<f64> = counts
        .iter()
        .map(|c| c.load(Ordering::Relaxed) as f64)
        .collect();
    let total: f64 = per.iter().sum();
    let sq: f64 = per.iter().map(|x| x * x).sum();
    let jain = if sq > 0.0 {
        total * total / (per.len() as f64 * sq)
    } else {
        0.0
    };
    (
        grants.load(Ordering::Relaxed) as f64 / elapsed,
        total / elapsed,
        jain,
    )
}

fn main() {
    println!("| rate | threads | max chunk B | grants/s | bytes/s | Jain |");
    println!("|---|---|---|---|---|---|");
    for (label, rate) in [
        ("unlimited", Bandwidth::UNLIMITED),
        ("1 GB/s", Bandwidth::bytes_per_sec(1_000_000_000)),
        ("1 MB/s", Bandwidth::bytes_per_sec(1_000_000)),
    ] {
        for threads in [1usize, 8, 64] {
            let (g, b, j) = run(rate, threads, 16 * 1024, 3.0);
            println!("| {label} | {threads} | 16384 | {g:.0} | {b:.3e} | {j:.3} |");
        }
    }
}
