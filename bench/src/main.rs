//! `rdmem-bench`: rdmem's benchmarks (verbs, allocator, locks, cache), compared with perftest.
#[allow(dead_code)]
mod perftest;

fn main() {
    eprintln!("rdmem-bench: no benchmarks yet");
    std::process::exit(2);
}
