//! The allocator's local fast path: alloc+free pairs served from a thread's own chunk, with no
//! network operation. Runs on the loopback transport so only the allocator's own code is timed.
//!
//! `cargo bench -p rdmem-allocator --bench fast_path`
#![allow(missing_docs, reason = "criterion's macros generate undocumented functions")]

use std::alloc::Layout;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use rdmem_allocator::{Allocator, AllocatorOptions};
use rdmem_core::LoopbackTransport;

fn fast_path(c: &mut Criterion) {
    let allocator =
        Allocator::new(Arc::new(LoopbackTransport::new(&[256 << 20])), AllocatorOptions::default()).unwrap();
    let alloc = allocator.thread().unwrap();
    let mut group = c.benchmark_group("alloc_free_pair");
    for size in [64usize, 4096] {
        let layout = Layout::from_size_align(size, 8).unwrap();
        // Warm the class: its chunk is claimed outside the measurement.
        let keep = alloc.alloc(layout).unwrap();
        group.bench_function(format!("{size}B"), |b| {
            b.iter_custom(|iters| {
                let ops_before = alloc.network_ops();
                let start = Instant::now();
                for _ in 0..iters {
                    let addr = alloc.alloc(std::hint::black_box(layout)).unwrap();
                    alloc.free(std::hint::black_box(addr)).unwrap();
                }
                let took: Duration = start.elapsed();
                assert_eq!(alloc.network_ops(), ops_before, "the fast path must not touch the network");
                took
            })
        });
        alloc.free(keep).unwrap();
        // The baseline, in the same run: the same size through the system allocator.
        group.bench_function(format!("{size}B_system_box"), |b| {
            b.iter(|| drop(std::hint::black_box(Box::<[u8]>::new_uninit_slice(std::hint::black_box(size)))))
        });
    }
    group.finish();
}

criterion_group!(benches, fast_path);
criterion_main!(benches);
