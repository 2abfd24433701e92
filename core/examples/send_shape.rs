//! Drives the rate limiter alone (no HTTP, no database) the way the engine does: one dispatcher
//! takes permits, a task a request waits for its admission to the send log. Every so often the
//! whole runtime stalls (a virtual CPU taken by the hypervisor). Prints, for each 10 s, the
//! most admissions within any 5 ms and the most requests in flight at once if each took
//! 20 ± 10 ms: whether the shape of a window carries over into the next ones.
//!
//! `cargo run --release -p payout-core --example send_shape -- SECONDS STALL_MS EVERY_MS`

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use payout_core::rate::RateLimiter;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<u64>().map_err(|e| format!("{a:?}: {e} (SECONDS STALL_MS EVERY_MS)")))
        .collect::<Result<Vec<u64>, String>>()?;
    let secs = args.first().copied().unwrap_or(120);
    let stall_ms = args.get(1).copied().unwrap_or(30);
    let every_ms = args.get(2).copied().unwrap_or(1500);
    let limiter =
        RateLimiter::new(NonZeroU32::MIN.saturating_add(999), Duration::from_millis(4), 2);
    let admitted = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    if stall_ms > 0 {
        // A stall of both workers at once, at pseudo-random times around every `every_ms`.
        for worker in 0..2u64 {
            tokio::spawn(async move {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ worker;
                loop {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    tokio::time::sleep(Duration::from_millis(every_ms / 2 + x % every_ms)).await;
                    std::thread::sleep(Duration::from_millis(1 + (x >> 20) % stall_ms));
                }
            });
        }
    }
    while Instant::now() < end {
        limiter.acquire().await;
        let limiter = limiter.clone();
        let admitted = admitted.clone();
        tokio::spawn(async move {
            let at = limiter.admit().await;
            lock(&admitted).push(at);
        });
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut times: Vec<f64> =
        lock(&admitted).iter().map(|t| t.duration_since(start).as_secs_f64()).collect();
    times.sort_by(f64::total_cmp);
    println!("{} admitted in {secs} s: {:.1}/s", times.len(), times.len() as f64 / secs as f64);
    let mut seed = 1u64;
    let mut latency = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        0.010 + (seed >> 11) as f64 / (1u64 << 53) as f64 * 0.020
    };
    let ends: Vec<f64> = times.iter().map(|t| t + latency()).collect();
    for block in 0..secs.div_ceil(10) {
        let (lo, hi) = (block as f64 * 10.0, block as f64 * 10.0 + 10.0);
        let idx: Vec<usize> =
            (0..times.len()).filter(|&i| times[i] >= lo && times[i] < hi).collect();
        let mut densest = 0;
        let mut j = 0;
        for (n, &i) in idx.iter().enumerate() {
            while times[idx[j]] < times[i] - 0.005 {
                j += 1;
            }
            densest = densest.max(n - j + 1);
        }
        // Requests in flight at once: +1 at admission, -1 at its answer.
        let mut events: Vec<(f64, i32)> = Vec::new();
        for &i in &idx {
            events.push((times[i], 1));
            events.push((ends[i], -1));
        }
        events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let (mut now, mut peak) = (0i32, 0i32);
        for (_, d) in events {
            now += d;
            peak = peak.max(now);
        }
        println!(
            "{lo:>5.0}-{hi:<5.0} s  {:>5} sent  densest 5 ms {densest:>4}  in flight peak {peak:>4}",
            idx.len()
        );
    }
    Ok(())
}
