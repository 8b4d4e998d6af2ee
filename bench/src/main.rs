//! `rdmem-bench`: rdmem's benchmarks (verbs, allocator, locks, cache), compared with perftest.
fn main() {
    eprintln!("rdmem-bench: no benchmarks yet");
    std::process::exit(2);
}
