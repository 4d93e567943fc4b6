//! Session-table fast path: `acquire` on a ready session plus dropping the permit.
//!
//! Run: `cargo bench --bench table`. The table is filled through the real slow path
//! (static backend, one endpoint shared by every session), then the measured loop is the
//! proxy's per-request cost: `Activator::acquire` (ready -> no await) and `Permit` drop.

use std::sync::Arc;
use std::time::Duration;

use agent_activator::activation::Activator;
use agent_activator::backend::DynBackend;
use agent_activator::backend::static_set::StaticBackend;
use agent_activator::config::Config;
use agent_activator::metrics::Metrics;
use agent_activator::session::SessionKey;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;

/// An activator whose table holds `n` ready sessions, and their keys.
fn filled(n: usize) -> (Arc<Activator>, Vec<SessionKey>) {
    let mut config = Config::default();
    config.session.max_sessions_per_sandbox = u32::MAX;
    let backend: DynBackend = Arc::new(
        StaticBackend::new(&["127.0.0.1:9".to_owned()], u32::MAX).expect("static endpoint"),
    );
    let activator = Activator::new(&config, backend, Arc::new(Metrics::new()));
    let keys: Vec<SessionKey> = (0..n)
        .map(|i| SessionKey::parse(&format!("session-{i:08}"), 128).expect("valid id"))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for k in &keys {
            drop(activator.acquire(k).await.expect("claim"));
        }
    });
    (activator, keys)
}

fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("acquire_ready");
    for n in [1usize, 10_000, 100_000] {
        let (activator, keys) = filled(n);
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                i = (i + 7919) % keys.len();
                let lease = activator
                    .acquire(&keys[i])
                    .now_or_never()
                    .expect("ready: no await")
                    .expect("lease");
                drop(lease);
            })
        });
    }
    group.finish();
}

/// `threads` threads each acquire+drop `iters / threads` times; `same_key` makes them all
/// hit one session (one entry lock), otherwise each walks its own keys.
// std's Instant is banned in the library for paused-time tests; a benchmark measures real
// wall time, which is what criterion's `iter_custom` expects.
#[allow(clippy::disallowed_types)]
fn run_contended(
    activator: &Arc<Activator>,
    keys: &Arc<Vec<SessionKey>>,
    threads: usize,
    same_key: bool,
    iters: u64,
) -> Duration {
    let per_thread = iters / threads as u64 + 1;
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let activator = Arc::clone(activator);
            let keys = Arc::clone(keys);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let mut i = t * 104_729;
                for _ in 0..per_thread {
                    i = if same_key { 0 } else { (i + 7919) % keys.len() };
                    let lease = activator
                        .acquire(&keys[i])
                        .now_or_never()
                        .expect("ready: no await")
                        .expect("lease");
                    drop(lease);
                }
            })
        })
        .collect();
    let start = std::time::Instant::now();
    barrier.wait();
    for h in handles {
        h.join().expect("bench thread");
    }
    start.elapsed()
}

fn contended(c: &mut Criterion) {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let mut group = c.benchmark_group(format!("acquire_ready_{threads}_threads"));
    let (activator, keys) = filled(100_000);
    let keys = Arc::new(keys);
    group.bench_function("same_session", |b| {
        b.iter_custom(|iters| run_contended(&activator, &keys, threads, true, iters))
    });
    group.bench_function("distinct_sessions_100k", |b| {
        b.iter_custom(|iters| run_contended(&activator, &keys, threads, false, iters))
    });
    group.finish();
}

criterion_group!(benches, single_thread, contended);
criterion_main!(benches);
