//! `rdmem-bench tmem`: the page store's put and get, by page content, compressed or not, with
//! the pages in the local tier or on the memory node.
//!
//! Content, `pages` distinct pages of each (real bytes where there are some):
//! - "zeros": pages of zeros (kept as their pattern: no space, no compression);
//! - "text": this benchmark's own source code, page by page (embedded in the binary);
//! - "binary": the running executable's bytes (machine code and data), page by page;
//! - "random": xorshift bytes (incompressible: kept as they are).
//!
//! For each content, compressed (LZ4) and not, and each tier: "local" (a local tier large
//! enough for every page: put compresses and copies, get decompresses) and "remote" (local
//! capacity 0: every put compresses, allocates a block and WRITEs it, one page per doorbell;
//! every get READs it and decompresses). Each put and get is timed alone (`Instant`, p50/p99/
//! p999 from an hdrhistogram); `mops` is pages per second over the whole pass. Every get is
//! checked against the page put; a wrong page is an error. Rows: `bench` "tmem", `op` "put" or
//! "get", `content`, `tier`, `compressed`, `compression_ratio` (page bytes over bytes kept,
//! from the store's statistics), one thread.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use hdrhistogram::Histogram;
use rdmem_allocator::{Allocator, AllocatorOptions};
use rdmem_tmem::{PAGE_SIZE, Page, PageStore, PoolKind, StoreOptions};
use serde::Serialize;

use crate::harness;
use crate::report::new_histogram;

/// Options of `rdmem-bench tmem`.
#[derive(Args, Debug)]
pub(crate) struct TmemArgs {
    /// Memory node `host:port` (default: RDMEM_MEMNODES or the config file, else one started
    /// on the same device).
    #[arg(long = "memnode")]
    memnodes: Vec<String>,
    /// Distinct pages put and got per content, tier and compression.
    #[arg(long, default_value_t = 2000)]
    pages: usize,
    /// Print one JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

/// One result row.
#[derive(Debug, Serialize)]
struct TmemRow {
    bench: &'static str,
    #[serde(rename = "impl")]
    implementation: &'static str,
    op: &'static str,
    content: &'static str,
    tier: &'static str,
    compressed: bool,
    size: usize,
    threads: usize,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    mops: f64,
    ops: u64,
    compression_ratio: Option<f64>,
}

/// Text pages: source files of this benchmark, embedded.
const TEXT: &[&str] = &[
    include_str!("verbs.rs"),
    include_str!("cache.rs"),
    include_str!("report.rs"),
    include_str!("perftest.rs"),
    include_str!("alloc.rs"),
    include_str!("lock.rs"),
    include_str!("main.rs"),
    include_str!("plot.rs"),
];

/// `count` pages of `content`.
fn pages_of(content: &str, count: usize) -> Result<Vec<Page>, Box<dyn std::error::Error>> {
    let source: Vec<u8> = match content {
        "zeros" => return Ok(vec![[0; PAGE_SIZE]; count]),
        "text" => TEXT.concat().into_bytes(),
        "binary" => std::fs::read("/proc/self/exe")?,
        _ => {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            (0..count * PAGE_SIZE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        }
    };
    let whole = source.len() / PAGE_SIZE;
    if whole == 0 {
        return Err(format!("no whole page of {content} bytes").into());
    }
    // Distinct pages as long as the source lasts, then again from the start.
    Ok((0..count).map(|i| source[(i % whole) * PAGE_SIZE..][..PAGE_SIZE].try_into().expect("a page")).collect())
}

pub(crate) fn run(args: &TmemArgs) -> Result<(), Box<dyn std::error::Error>> {
    let pages = args.pages.max(1);
    // Room for every remote pass's pages at once (blocks of at most a page), twice over.
    let pool = (pages as u64 * PAGE_SIZE as u64 * 2 + (64 << 20)).next_power_of_two();
    let cluster = harness::connect(&args.memnodes, pool)?;
    let transport = Arc::new(cluster.transport);
    let mut printed_header = false;
    for content in ["zeros", "text", "binary", "random"] {
        let data = pages_of(content, pages)?;
        for compressed in [true, false] {
            for tier in ["local", "remote"] {
                let local = if tier == "local" { pages * PAGE_SIZE } else { 0 };
                let options = StoreOptions {
                    local_capacity: local,
                    remotify_above: local,
                    compress: compressed,
                    ..Default::default()
                };
                let allocator = Allocator::new(Arc::clone(&transport), AllocatorOptions::default())?;
                let store = PageStore::new(allocator, options)?;
                let pool = store.create_pool(PoolKind::Persistent)?;
                let mut handle = store.handle()?;
                let mut hist = new_histogram()?;
                let started = Instant::now();
                for (i, page) in data.iter().enumerate() {
                    let t = Instant::now();
                    handle.put(pool, 1, i as u32, page)?;
                    hist.record(t.elapsed().as_nanos() as u64)?;
                }
                let put_secs = started.elapsed().as_secs_f64();
                let stats = store.stats();
                if tier == "remote" && stats.local_pages != 0 {
                    return Err(format!("{} pages stayed local in the remote pass", stats.local_pages).into());
                }
                let ratio = stats.compression_ratio();
                let row = |op, hist: &Histogram<u64>, secs: f64| TmemRow {
                    bench: "tmem",
                    implementation: "rdmem-tmem",
                    op,
                    content,
                    tier,
                    compressed,
                    size: PAGE_SIZE,
                    threads: 1,
                    p50_us: hist.value_at_quantile(0.5) as f64 / 1000.0,
                    p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
                    p999_us: hist.value_at_quantile(0.999) as f64 / 1000.0,
                    mops: pages as f64 / secs / 1e6,
                    ops: hist.len(),
                    compression_ratio: ratio,
                };
                print(&row("put", &hist, put_secs), args.json, &mut printed_header);
                let mut hist = new_histogram()?;
                let mut out = [0u8; PAGE_SIZE];
                let started = Instant::now();
                for (i, page) in data.iter().enumerate() {
                    let t = Instant::now();
                    let found = handle.get(pool, 1, i as u32, &mut out)?;
                    hist.record(t.elapsed().as_nanos() as u64)?;
                    if !found || out != *page {
                        return Err(format!("{content} page {i} ({tier}) did not come back as put").into());
                    }
                }
                let get_secs = started.elapsed().as_secs_f64();
                print(&row("get", &hist, get_secs), args.json, &mut printed_header);
                handle.destroy_pool(pool)?;
            }
        }
    }
    Ok(())
}

fn print(row: &TmemRow, json: bool, printed_header: &mut bool) {
    if json {
        println!("{}", serde_json::to_string(row).expect("rows serialize"));
        return;
    }
    if !*printed_header {
        println!(
            "{:<4} {:<7} {:<7} {:<5} {:>10} {:>10} {:>10} {:>8} {:>7}",
            "op", "content", "tier", "lz4", "p50 us", "p99 us", "p999 us", "Mops", "ratio"
        );
        *printed_header = true;
    }
    println!(
        "{:<4} {:<7} {:<7} {:<5} {:>10.2} {:>10.2} {:>10.2} {:>8.4} {:>7}",
        row.op,
        row.content,
        row.tier,
        row.compressed,
        row.p50_us,
        row.p99_us,
        row.p999_us,
        row.mops,
        row.compression_ratio.map_or("-".into(), |r| format!("{r:.2}"))
    );
}
