//! The DSM's hit path next to a plain map: `Dsm::get::<u64>` and `Dsm::set` of a word in a
//! cached page (one rank on the loopback transport), next to a `HashMap<u64, Box<[u8; 4096]>>`
//! lookup plus the same 8-byte copy, at 1 and 2 threads of the rank. With 2 threads each does
//! the iterations (time per iteration per thread: equal to 1 thread's means perfect scaling);
//! the threads read the same 64 hot pages.
//!
//! `cargo bench -p rdmem-coherence --bench get`
#![allow(missing_docs, reason = "criterion's macros generate undocumented functions")]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use rdmem_coherence::dsm::{Dsm, DsmOptions, SharedAddr};
use rdmem_core::LoopbackTransport;

const PAGES: u64 = 64;
const PAGE: u64 = 4096;

/// Runs `op(thread, i)` `iters` times on each of `threads` threads; the slowest thread's time.
fn on_threads(threads: usize, iters: u64, op: &(dyn Fn(usize, u64) + Sync)) -> Duration {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let started = Instant::now();
                    for i in 0..iters {
                        op(t, i);
                    }
                    started.elapsed()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).max().unwrap()
    })
}

/// The page of iteration `i` of thread `t`: threads walk the hot set from different places.
fn page_of(t: usize, i: u64) -> u64 {
    (i.wrapping_mul(7) + t as u64 * 31) % PAGES
}

fn hits(c: &mut Criterion) {
    let transport = Arc::new(LoopbackTransport::new(&[64 << 20]));
    let dsm = Dsm::join_with(transport, DsmOptions::new(0, 1)).unwrap();
    let region = dsm.alloc(PAGES * PAGE).unwrap();
    let at = |page: u64| SharedAddr(region.0 + page * PAGE + 8);
    for p in 0..PAGES {
        dsm.set(at(p), &p).unwrap(); // cached from here on
    }
    let map: HashMap<u64, Box<[u8; PAGE as usize]>> =
        (0..PAGES).map(|p| (p, Box::new([p as u8; PAGE as usize]))).collect();
    let mut group = c.benchmark_group("dsm_hit_8B");
    for threads in [1, 2] {
        group.bench_function(format!("hashmap_{threads}t"), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, &|t, i| {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(&map.get(&page_of(t, i)).unwrap()[8..16]);
                    black_box(word);
                })
            })
        });
        group.bench_function(format!("get_{threads}t"), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, &|t, i| {
                    black_box(dsm.get::<u64>(at(page_of(t, i))).unwrap());
                })
            })
        });
        group.bench_function(format!("set_{threads}t"), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, &|t, i| {
                    let page = page_of(t, i);
                    dsm.set(at(page), &page).unwrap();
                })
            })
        });
    }
    group.finish();
    for p in 0..PAGES {
        assert_eq!(dsm.get::<u64>(at(p)).unwrap(), p, "every page kept its word");
    }
    dsm.leave().unwrap();
}

criterion_group!(benches, hits);
criterion_main!(benches);
