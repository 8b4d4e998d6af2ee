//! The page cache's hit path next to a plain map: an 8-byte read of a cached page through
//! `PageCache::read` (with an endpoint, as the DSM's slow path calls it) and through
//! `PageCache::read_if_cached` (no endpoint), next to a `HashMap<u64, Box<[u8; 4096]>>`
//! lookup plus the same copy, at 1 and 2 threads. With 2 threads each does the iterations
//! (time per iteration per thread: equal to 1 thread's means perfect scaling). The threads
//! share the hot pages, except in `own_shards`, where each reads pages of shards of its own.
//! Last, it prints the 2-thread scaling of the own-shards read next to the map's, from paired
//! rounds (criterion's separate runs drift with the host too much to divide).
//!
//! `cargo bench -p rdmem-cache --bench hit`
#![allow(missing_docs, reason = "criterion's macros generate undocumented functions")]

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use rdmem_cache::{CacheOptions, Home, Homes, PAGE_SIZE, PageCache, PageId};
use rdmem_core::{GlobalAddr, LoopbackBuffer, LoopbackTransport, NodeId, Transport};

const PAGES: u64 = 64;

struct Flat;

impl Homes for Flat {
    fn home(&self, page: PageId) -> rdmem_core::Result<Home> {
        Ok(Home { addr: GlobalAddr::new(NodeId(0), page * PAGE_SIZE as u64).unwrap(), run: 1 })
    }
}

fn warm_cache(transport: &LoopbackTransport) -> PageCache<LoopbackBuffer> {
    let mut ep = transport.endpoint().unwrap();
    // Room for every hot page in its shard (256 frames a shard, 4 hot pages each on average).
    let options =
        CacheOptions { capacity_bytes: 64 * PAGES * PAGE_SIZE as u64, shards: 16, stripe_pages: 1, read_ahead: 0 };
    let cache = PageCache::new(&mut ep, options).unwrap();
    let mut word = [0u8; 8];
    for p in 0..PAGES {
        cache.read(&mut ep, &Flat, p * PAGE_SIZE as u64, &mut word).unwrap();
    }
    cache
}

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
    let transport = LoopbackTransport::new(&[PAGES * PAGE_SIZE as u64 * 2]);
    let cache = warm_cache(&transport);
    let map: HashMap<u64, Box<[u8; PAGE_SIZE]>> = (0..PAGES).map(|p| (p, Box::new([p as u8; PAGE_SIZE]))).collect();
    let mut group = c.benchmark_group("hit_8B");
    for threads in [1, 2] {
        group.bench_function(format!("hashmap_{threads}t"), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, &|t, i| {
                    let mut word = [0u8; 8];
                    let page = map.get(&page_of(t, i)).unwrap();
                    word.copy_from_slice(&page[8..16]);
                    black_box(word);
                })
            })
        });
        group.bench_function(format!("cache_read_if_cached_{threads}t"), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, &|t, i| {
                    let mut word = [0u8; 8];
                    assert!(cache.read_if_cached(page_of(t, i) * PAGE_SIZE as u64 + 8, &mut word));
                    black_box(word);
                })
            })
        });
        // Each thread on pages of its own shards: what scaling the cache allows.
        let own: Vec<Vec<u64>> =
            (0..threads).map(|t| (0..PAGES).filter(|&p| cache.shard_of(p) % threads == t).take(16).collect()).collect();
        assert!(own.iter().all(|pages| pages.len() == 16), "16 pages in each thread's shards");
        group.bench_function(format!("cache_read_if_cached_own_shards_{threads}t"), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, &|t, i| {
                    let mut word = [0u8; 8];
                    let pages = &own[t];
                    let page = pages[(i as usize * 7) & 15];
                    assert!(cache.read_if_cached(page * PAGE_SIZE as u64 + 8, &mut word));
                    black_box(word);
                })
            })
        });
        group.bench_function(format!("cache_read_{threads}t"), |b| {
            b.iter_custom(|iters| {
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..threads)
                        .map(|t| {
                            let (cache, transport) = (&cache, &transport);
                            s.spawn(move || {
                                let mut ep = transport.endpoint().unwrap();
                                let started = Instant::now();
                                for i in 0..iters {
                                    let mut word = [0u8; 8];
                                    cache
                                        .read(&mut ep, &Flat, page_of(t, i) * PAGE_SIZE as u64 + 8, &mut word)
                                        .unwrap();
                                    black_box(word);
                                }
                                started.elapsed()
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).max().unwrap()
                })
            })
        });
    }
    group.finish();
    // Only under `cargo bench`: `cargo test --benches` runs each bench once, as a test.
    if std::env::args().any(|a| a == "--bench") {
        print_scaling(&cache, &map);
    }
}

/// Two threads' throughput over one thread's, measured in paired rounds (1 thread, then 2,
/// 15 times, the cache and the map alternating), so that the host's drift between criterion's
/// separate runs does not decide the figure: this machine's second core comes and goes. Prints
/// the median and range of the rounds' ratios for the cache (each thread on its own shards)
/// and for the map (each thread on its own pages).
fn print_scaling(cache: &PageCache<LoopbackBuffer>, map: &HashMap<u64, Box<[u8; PAGE_SIZE]>>) {
    const ITERS: u64 = 2_000_000;
    let own: Vec<Vec<u64>> =
        (0..2).map(|t| (0..PAGES).filter(|&p| cache.shard_of(p) % 2 == t).take(16).collect()).collect();
    let cache_op = |t: usize, i: u64| {
        let mut word = [0u8; 8];
        let page = own[t][(i as usize * 7) & 15];
        assert!(cache.read_if_cached(page * PAGE_SIZE as u64 + 8, &mut word));
        black_box(word);
    };
    let map_op = |t: usize, i: u64| {
        let mut word = [0u8; 8];
        let page = map.get(&own[t][(i as usize * 7) & 15]).unwrap();
        word.copy_from_slice(&page[8..16]);
        black_box(word);
    };
    let ratio = |op: &(dyn Fn(usize, u64) + Sync)| {
        let one = on_threads(1, ITERS, op);
        let two = on_threads(2, ITERS, op);
        2.0 * one.as_secs_f64() / two.as_secs_f64()
    };
    let (mut cached, mut mapped) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        cached.push(ratio(&cache_op));
        mapped.push(ratio(&map_op));
    }
    for (name, mut ratios) in [("cache_read_if_cached_own_shards", cached), ("hashmap_own_pages", mapped)] {
        ratios.sort_by(f64::total_cmp);
        println!(
            "scaling {name}: 2 threads / 1 thread throughput, median {:.2} (range {:.2}-{:.2}) over 15 paired rounds",
            ratios[7], ratios[0], ratios[14]
        );
    }
}

criterion_group!(benches, hits);
criterion_main!(benches);
