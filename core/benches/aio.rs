//! The async face's own cost: one 8-byte FAA at a time on the loopback transport (so only
//! the code around the operation is timed), through `AsyncEndpoint` inside `block_on` with the
//! default options and with `coalesce: false`, next to the sync `Endpoint::faa` in the same run.
//! Also 16 FAAs in flight from one thread (16 tasks under `join_all`) next to sync batches of 16.
//!
//! `cargo bench -p rdmem-core --bench aio`. For instruction counts, which are repeatable where
//! times are not, run the bench binary under `valgrind --tool=callgrind`.
#![allow(missing_docs, reason = "criterion's macros generate undocumented functions")]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use rdmem_core::aio::{AsyncEndpoint, AsyncOptions, LocalFuture, block_on, join_all};
use rdmem_core::{Endpoint, GlobalAddr, LoopbackTransport, NodeId, Transport};

fn single(c: &mut Criterion) {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let addr = GlobalAddr::new(NodeId(0), 64).unwrap();
    let mut group = c.benchmark_group("faa_one_at_a_time");
    let mut sync = transport.endpoint().unwrap();
    group.bench_function("sync", |b| b.iter(|| sync.faa(black_box(addr), 1).unwrap()));
    for coalesce in [true, false] {
        let options = AsyncOptions { coalesce, ..AsyncOptions::default() };
        let ep = AsyncEndpoint::with_options(transport.endpoint().unwrap(), options).unwrap();
        let name = if coalesce { "async" } else { "async_no_coalesce" };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                block_on(async {
                    let start = std::time::Instant::now();
                    for _ in 0..iters {
                        ep.faa(black_box(addr), 1).await.unwrap();
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

fn sixteen(c: &mut Criterion) {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let addr = |k: u64| GlobalAddr::new(NodeId(0), 8 * k).unwrap();
    let mut group = c.benchmark_group("faa_16_in_flight");
    let mut sync = transport.endpoint().unwrap();
    let mut olds = [0u64; 16];
    group.bench_function("sync_batch", |b| {
        b.iter(|| {
            let mut batch = sync.batch();
            for (k, old) in olds.iter_mut().enumerate() {
                batch.faa(addr(k as u64), 1, old);
            }
            batch.submit().unwrap();
        })
    });
    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    group.bench_function("async_join_all", |b| {
        // 16 tasks, each doing its `iters` FAAs in turn: an iteration is 16 FAAs, as above.
        b.iter_custom(|iters| {
            block_on(async {
                let ep = &ep;
                let start = std::time::Instant::now();
                let tasks: Vec<LocalFuture<'_, ()>> = (0..16u64)
                    .map(|k| {
                        Box::pin(async move {
                            for _ in 0..iters {
                                ep.faa(addr(k), 1).await.unwrap();
                            }
                        }) as _
                    })
                    .collect();
                join_all(tasks).await;
                start.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, single, sixteen);
criterion_main!(benches);
