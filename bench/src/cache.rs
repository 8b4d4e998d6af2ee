//! `rdmem-bench cache`: the page cache's hit and miss latency, next to a raw READ, and its hit
//! ratio under a zipfian load.
//!
//! The working set is `pages` pages of 4 KiB on the first memory node, page `p` at
//! `BASE + p * 4096`, in read-ahead stripes of 16 pages. It is filled once (batched WRITEs) with
//! a known pattern: the 8-byte word at page-space byte address `a` holds `PATTERN ^ a`. Every
//! access reads one such word (at a pseudo-random 8-byte offset of its page) and checks it: a
//! wrong word is an error naming the page, so a broken cache cannot produce a figure.
//! Single accesses are timed with the TSC (see [`crate::tsc`]; its two reads, about 13 ns in the
//! VM, are in every sample), p50/p99/p999 from an hdrhistogram. All rows: `bench` "cache", one
//! thread, one endpoint.
//!
//! - `op` "hit" (`impl` "cache", `size` 8): an 8-byte `PageCache::read` of a cached page. A
//!   cache of 64 pages (one shard) reads a hot set of 64 pages once, then `iters` accesses to
//!   random hot pages are timed (after a warm-up); a miss among them is an error.
//! - `op` "miss" (`impl` "cache", `size` 8) and `op` "raw_read" (`impl` "verbs", `size` 4096):
//!   an 8-byte `PageCache::read` of a page not cached (one shard, no read-ahead, 32 pages, so it
//!   evicts one and READs 4 KiB into its frame), next to a 4 KiB `read_into` of a random page
//!   into a registered buffer (the READ a miss cannot avoid). Pages are drawn uniformly from the
//!   working set, so nearly every cache access misses; a sample counts only when the cache's
//!   miss counter rose during it (the rare hits are skipped; `hit_ratio` and the note count
//!   them). The two alternate access by access, for `rounds` rounds of `iters` pairs (which goes
//!   first flips each round), so the host's speed drift (10% over seconds in the VM) hits both
//!   alike. The note gives miss p50 / raw_read p50 as the median of the rounds' own ratios
//!   (paired, as `verbs` compares with perftest); each row's p50 is the median of its rounds'
//!   p50s, p99 and p999 come from all rounds merged.
//! - `op` "zipf" (`impl` "cache", `size` 8): for caches of 1/32, 1/16, 1/8, 1/4 and 1/2 of the
//!   working set (the default options otherwise: 16 shards, read-ahead 7), a zipfian load
//!   (theta 0.99 over the pages, fixed seed, ranks scrambled over the pages as YCSB does, so hot
//!   pages do not sit in the same stripes) of 20 000 accesses after a warm-up of 5 000.
//!   `hit_ratio` is hits / accesses of the measured phase (from the cache's counters),
//!   `cache_bytes` the capacity the cache really has (whole pages per shard), `mops` accesses per
//!   second over the measured phase (timed once around it), p50/p99/p999 per access. The note
//!   gives the ideal hit ratio for that size: the share of accesses to the most popular pages
//!   that fit (what a cache holding exactly those would reach).

use std::time::Instant;

use clap::Args;
use hdrhistogram::Histogram;
use rdmem_cache::{CacheOptions, Home, Homes, PAGE_SIZE, PageCache, PageId};
use rdmem_core::{Endpoint, GlobalAddr, NodeId, Transport};

use crate::harness;
use crate::report::{Printer, Row, median, new_histogram};
use crate::tsc::Tsc;

/// Options of `rdmem-bench cache`.
#[derive(Args, Debug)]
pub(crate) struct CacheArgs {
    /// Memory node `host:port` (default: RDMEM_MEMNODES or the config file, else one started
    /// on the same device).
    #[arg(long = "memnode")]
    memnodes: Vec<String>,
    /// Timed accesses for the hit row, and pairs (miss + raw READ) per round for the miss rows.
    #[arg(long, default_value_t = 2000)]
    iters: u64,
    /// Pages of 4 KiB in the working set (at least 64).
    #[arg(long, default_value_t = 4096)]
    pages: u64,
    /// Rounds of the miss / raw READ comparison; the ratio is the median of the rounds' ratios.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Print one JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

/// Where the working set starts in the first node's pool.
const BASE: u64 = 1 << 20;
/// Pages per read-ahead stripe of the working set.
const STRIPE: u64 = 16;
/// The word at page-space byte address `a` holds `PATTERN ^ a`.
const PATTERN: u64 = 0x5EED_CAC4_E000_0000;
/// Pages of the hit row's hot set (and of its cache).
const HOT_PAGES: u64 = 64;
/// Pages of the miss row's cache.
const MISS_CACHE_PAGES: u64 = 32;
/// Untimed accesses before the hit and miss measurements.
const WARMUP: u64 = 200;
/// Untimed zipfian accesses before each measured phase.
const ZIPF_WARMUP: u64 = 5_000;
/// Measured zipfian accesses per cache size.
const ZIPF_ACCESSES: u64 = 20_000;
/// Zipf's skew.
const ZIPF_THETA: f64 = 0.99;
/// Cache sizes of the zipf rows, as divisors of the working set.
const ZIPF_FRACTIONS: [u64; 5] = [32, 16, 8, 4, 2];

pub(crate) fn run(args: &CacheArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.pages < HOT_PAGES {
        return Err(
            format!("--pages {} is too small: the cache benchmark needs at least {HOT_PAGES}", args.pages).into()
        );
    }
    let need = args
        .pages
        .checked_mul(PAGE_SIZE as u64)
        .and_then(|b| b.checked_add(BASE))
        .filter(|&b| b < GlobalAddr::OFFSET_LIMIT)
        .ok_or_else(|| format!("--pages {} is too large for one memory node", args.pages))?;
    let cluster = harness::connect(&args.memnodes, need.max(64 << 20))?;
    let node = cluster.transport.nodes()[0];
    if node.pool_size < need {
        return Err(format!("{} has {} bytes; {} pages need {need}", node.id, node.pool_size, args.pages).into());
    }
    let mut ep = cluster.transport.endpoint()?;
    let homes = WorkingSet { node: node.id, pages: args.pages };
    let tsc = Tsc::calibrate();
    let mut out = Printer::new(args.json);

    fill(&mut ep, &homes)?;
    out.print(&hit(&mut ep, &homes, &tsc, args.iters.max(1))?);
    for row in miss_vs_raw(&mut ep, &homes, &tsc, args.iters.max(1), args.rounds.max(1))? {
        out.print(&row);
    }
    let zipf = Zipf::new(args.pages, ZIPF_THETA, &mut Rng::new(0x5A1F_2026));
    for fraction in ZIPF_FRACTIONS {
        out.print(&zipf_row(&mut ep, &homes, &tsc, &zipf, args.pages / fraction, ZIPF_WARMUP, ZIPF_ACCESSES)?);
    }
    Ok(())
}

/// The working set: page `p` on `node` at `BASE + p * PAGE_SIZE`, stripes of [`STRIPE`] pages.
struct WorkingSet {
    node: NodeId,
    pages: u64,
}

impl Homes for WorkingSet {
    fn home(&self, page: PageId) -> rdmem_core::Result<Home> {
        let outside = || rdmem_core::Error::Config(format!("page {page} is outside the working set of {}", self.pages));
        if page >= self.pages {
            return Err(outside());
        }
        let addr = GlobalAddr::new(self.node, BASE + page * PAGE_SIZE as u64).ok_or_else(outside)?;
        Ok(Home { addr, run: (STRIPE - page % STRIPE).min(self.pages - page) as u32 })
    }
}

/// The word the working set holds at page-space byte address `addr`.
fn expected(addr: u64) -> u64 {
    PATTERN ^ addr
}

/// An error unless `got` is the word the working set holds at `addr`.
fn check(what: &str, addr: u64, got: [u8; 8]) -> Result<(), Box<dyn std::error::Error>> {
    let (got, want) = (u64::from_le_bytes(got), expected(addr));
    if got != want {
        let (page, offset) = (addr / PAGE_SIZE as u64, addr % PAGE_SIZE as u64);
        return Err(format!("{what}: page {page} offset {offset} read {got:#018x}, expected {want:#018x}").into());
    }
    Ok(())
}

/// Writes the pattern over the working set: a stripe per WRITE, 256 pages per batch.
fn fill<E: Endpoint>(ep: &mut E, homes: &WorkingSet) -> Result<(), Box<dyn std::error::Error>> {
    const CHUNK: u64 = 256;
    let mut buf = ep.buffer(CHUNK as usize * PAGE_SIZE)?;
    for first in (0..homes.pages).step_by(CHUNK as usize) {
        let count = CHUNK.min(homes.pages - first);
        let start = first * PAGE_SIZE as u64;
        for (i, word) in buf[..count as usize * PAGE_SIZE].chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&expected(start + 8 * i as u64).to_le_bytes());
        }
        let mut batch = ep.batch();
        let mut page = first;
        while page < first + count {
            let home = homes.home(page)?;
            let run = (home.run as u64).min(first + count - page);
            let local = (page - first) as usize * PAGE_SIZE;
            batch.write_from(home.addr, &buf, local..local + run as usize * PAGE_SIZE);
            page += run;
        }
        batch.submit()?;
    }
    Ok(())
}

/// The "hit" row: 8-byte reads of a hot set that stays cached.
fn hit<E: Endpoint>(ep: &mut E, homes: &WorkingSet, tsc: &Tsc, iters: u64) -> Result<Row, Box<dyn std::error::Error>> {
    let options =
        CacheOptions { capacity_bytes: HOT_PAGES * PAGE_SIZE as u64, shards: 1, read_ahead: 0, stripe_pages: STRIPE };
    let cache = PageCache::new(ep, options)?;
    let hot: Vec<PageId> = (0..HOT_PAGES).map(|i| i * (homes.pages / HOT_PAGES)).collect();
    let mut word = [0u8; 8];
    for &page in &hot {
        cache.read(ep, homes, page * PAGE_SIZE as u64, &mut word)?;
        check("hit (first read)", page * PAGE_SIZE as u64, word)?;
    }
    let before = cache.stats();
    let mut rng = Rng::new(0x4817);
    let mut hist = new_histogram()?;
    for i in 0..WARMUP + iters {
        let addr = hot[rng.below(HOT_PAGES) as usize] * PAGE_SIZE as u64 + 8 * rng.below(PAGE_SIZE as u64 / 8);
        let t0 = tsc.now();
        cache.read(ep, homes, addr, &mut word)?;
        let t1 = tsc.now();
        check("hit", addr, word)?;
        if i >= WARMUP {
            hist.record(tsc.nanos(t0, t1).max(1))?;
        }
    }
    let missed = cache.stats().misses - before.misses;
    if missed != 0 {
        return Err(
            format!("hit: {missed} accesses to the {HOT_PAGES} hot pages missed; they should stay cached").into()
        );
    }
    let mut row = cache_row(Row::latency("cache", "hit", 8, 1, 1, &hist));
    row.hit_ratio = Some(1.0);
    row.cache_bytes = Some(cache.capacity_pages() as u64 * PAGE_SIZE as u64);
    Ok(row)
}

/// The "miss" and "raw_read" rows: misses and raw 4 KiB READs of random pages, alternating,
/// in paired rounds.
fn miss_vs_raw<E: Endpoint>(
    ep: &mut E,
    homes: &WorkingSet,
    tsc: &Tsc,
    iters: u64,
    rounds: usize,
) -> Result<[Row; 2], Box<dyn std::error::Error>> {
    let options = CacheOptions {
        capacity_bytes: MISS_CACHE_PAGES * PAGE_SIZE as u64,
        shards: 1,
        read_ahead: 0,
        stripe_pages: STRIPE,
    };
    let cache = PageCache::new(ep, options)?;
    let mut buf = ep.buffer(PAGE_SIZE)?;
    let mut rng = Rng::new(0x3155);
    let (mut all_miss, mut all_raw) = (new_histogram()?, new_histogram()?);
    let (mut miss_p50s, mut raw_p50s, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut skipped = 0u64;
    let mut word = [0u8; 8];
    for round in 0..rounds {
        let (mut miss, mut raw) = (new_histogram()?, new_histogram()?);
        // The first round begins with a warm-up, which also fills the cache so every measured
        // miss evicts a page.
        let warmup = if round == 0 { WARMUP } else { 0 };
        for i in 0..warmup + iters {
            for half in 0..2 {
                let page = rng.below(homes.pages);
                let addr = page * PAGE_SIZE as u64 + 8 * rng.below(PAGE_SIZE as u64 / 8);
                if (half == 0) == (round % 2 == 0) {
                    let misses = cache.stats().misses;
                    let t0 = tsc.now();
                    cache.read(ep, homes, addr, &mut word)?;
                    let t1 = tsc.now();
                    check("miss", addr, word)?;
                    if i < warmup {
                        continue;
                    }
                    if cache.stats().misses > misses {
                        miss.record(tsc.nanos(t0, t1).max(1))?;
                    } else {
                        skipped += 1;
                    }
                } else {
                    let home = homes.home(page)?;
                    let t0 = tsc.now();
                    ep.read_into(home.addr, &mut buf, 0..PAGE_SIZE)?;
                    let t1 = tsc.now();
                    let offset = (addr % PAGE_SIZE as u64) as usize;
                    check("raw_read", addr, buf[offset..offset + 8].try_into().expect("8 bytes"))?;
                    if i >= warmup {
                        raw.record(tsc.nanos(t0, t1).max(1))?;
                    }
                }
            }
        }
        if miss.is_empty() {
            return Err("miss: every access of a round hit; the miss cache is too big for the working set".into());
        }
        let (m, r) = (miss.value_at_quantile(0.5) as f64 / 1000.0, raw.value_at_quantile(0.5) as f64 / 1000.0);
        miss_p50s.push(m);
        raw_p50s.push(r);
        ratios.push(m / r);
        all_miss.add(&miss)?;
        all_raw.add(&raw)?;
    }
    let ratio = median(&ratios);
    let mut miss = cache_row(Row::latency("cache", "miss", 8, 1, 1, &all_miss));
    miss.p50_us = Some(median(&miss_p50s));
    // Of all accesses, the hits the samples leave out.
    miss.hit_ratio = Some(skipped as f64 / (skipped + miss.ops) as f64);
    miss.cache_bytes = Some(cache.capacity_pages() as u64 * PAGE_SIZE as u64);
    miss.note = Some(format!(
        "miss p50 / raw_read p50 = {ratio:.3} (median of {rounds} paired rounds); {skipped} hits skipped"
    ));
    let mut raw = cache_row(Row::latency("verbs", "raw_read", PAGE_SIZE, 1, 1, &all_raw));
    raw.p50_us = Some(median(&raw_p50s));
    Ok([miss, raw])
}

/// A "zipf" row: a cache of `cache_pages` pages under the zipfian load.
fn zipf_row<E: Endpoint>(
    ep: &mut E,
    homes: &WorkingSet,
    tsc: &Tsc,
    zipf: &Zipf,
    cache_pages: u64,
    warmup: u64,
    accesses: u64,
) -> Result<Row, Box<dyn std::error::Error>> {
    let options = CacheOptions { capacity_bytes: cache_pages * PAGE_SIZE as u64, ..CacheOptions::default() };
    let cache = PageCache::new(ep, options)?;
    let mut rng = Rng::new(0x21FF);
    let mut hist = new_histogram()?;
    let mut word = [0u8; 8];
    let mut access = |rng: &mut Rng, hist: Option<&mut Histogram<u64>>| -> Result<(), Box<dyn std::error::Error>> {
        let addr = zipf.page(rng) * PAGE_SIZE as u64 + 8 * rng.below(PAGE_SIZE as u64 / 8);
        let t0 = tsc.now();
        cache.read(ep, homes, addr, &mut word)?;
        let t1 = tsc.now();
        check("zipf", addr, word)?;
        if let Some(hist) = hist {
            hist.record(tsc.nanos(t0, t1).max(1))?;
        }
        Ok(())
    };
    for _ in 0..warmup {
        access(&mut rng, None)?;
    }
    let before = cache.stats();
    let began = Instant::now();
    for _ in 0..accesses {
        access(&mut rng, Some(&mut hist))?;
    }
    let seconds = began.elapsed().as_secs_f64();
    let after = cache.stats();
    let (hits, misses) = (after.hits - before.hits, after.misses - before.misses);
    if hits + misses != accesses {
        return Err(format!("zipf: {hits} hits + {misses} misses for {accesses} one-page accesses").into());
    }
    let capacity = cache.capacity_pages() as u64;
    let hit_ratio = hits as f64 / accesses as f64;
    let mops = accesses as f64 / seconds / 1e6;
    let mut row = cache_row(Row::latency("cache", "zipf", 8, 1, 1, &hist));
    row.mops = Some(mops);
    row.hit_ratio = Some(hit_ratio);
    let ideal = zipf.top_share(capacity);
    row.ideal_hit_ratio = Some(ideal);
    row.cache_bytes = Some(capacity * PAGE_SIZE as u64);
    row.note = Some(format!(
        "hit ratio {hit_ratio:.3} (ideal {ideal:.3}), {mops:.3} Mops, {capacity} of {} pages cached",
        homes.pages
    ));
    Ok(row)
}

/// A cache row: `bench` "cache".
fn cache_row(mut row: Row) -> Row {
    row.bench = "cache";
    row
}

/// xorshift64* (Vigna): small, fast, and good enough to pick pages.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (multiply-shift; the bias is below n / 2^64).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipfian ranks over `n` pages: `P(rank k) ∝ 1 / (k + 1)^theta`, drawn by binary search in the
/// precomputed CDF; rank `k` is page `pages[k]` (a fixed random permutation).
struct Zipf {
    /// `cdf[k]` = P(rank <= k); the last is 1.
    cdf: Vec<f64>,
    pages: Vec<PageId>,
}

impl Zipf {
    fn new(n: u64, theta: f64, rng: &mut Rng) -> Self {
        let mut cdf: Vec<f64> = (1..=n).map(|k| (k as f64).powf(-theta)).collect();
        let mut sum = 0.0;
        for w in &mut cdf {
            sum += *w;
            *w = sum;
        }
        for c in &mut cdf {
            *c /= sum;
        }
        let mut pages: Vec<PageId> = (0..n).collect();
        for i in (1..pages.len()).rev() {
            pages.swap(i, rng.below(i as u64 + 1) as usize);
        }
        Zipf { cdf, pages }
    }

    /// A page, drawn by popularity.
    fn page(&self, rng: &mut Rng) -> PageId {
        let u = rng.unit();
        let rank = self.cdf.partition_point(|&c| c <= u).min(self.cdf.len() - 1);
        self.pages[rank]
    }

    /// The share of accesses that go to the `count` most popular pages.
    fn top_share(&self, count: u64) -> f64 {
        match count {
            0 => 0.0,
            c => self.cdf[(c as usize).min(self.cdf.len()) - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use rdmem_core::LoopbackTransport;

    use super::*;

    /// The whole benchmark on the loopback transport: the pattern checks pass, the rows say
    /// what they should.
    #[test]
    fn rows_on_loopback() {
        let pages = 256;
        let transport = LoopbackTransport::new(&[BASE + pages * PAGE_SIZE as u64]);
        let mut ep = transport.endpoint().unwrap();
        let homes = WorkingSet { node: transport.nodes()[0].id, pages };
        let tsc = Tsc::calibrate();
        fill(&mut ep, &homes).unwrap();

        let row = hit(&mut ep, &homes, &tsc, 300).unwrap();
        assert_eq!((row.bench, row.op, row.ops), ("cache", "hit", 300));

        let [miss, raw] = miss_vs_raw(&mut ep, &homes, &tsc, 100, 3).unwrap();
        assert_eq!((miss.op, raw.op, raw.ops), ("miss", "raw_read", 300));
        assert!(miss.ops > 200, "nearly every access misses: {}", miss.ops);
        assert!(miss.note.unwrap().starts_with("miss p50 / raw_read p50 = "));

        let zipf = Zipf::new(pages, ZIPF_THETA, &mut Rng::new(7));
        let (small, big) = (
            zipf_row(&mut ep, &homes, &tsc, &zipf, pages / 32, 500, 2000).unwrap(),
            zipf_row(&mut ep, &homes, &tsc, &zipf, pages / 2, 500, 2000).unwrap(),
        );
        let (small, big) = (small.hit_ratio.unwrap(), big.hit_ratio.unwrap());
        assert!(0.0 < small && small < big && big < 1.0, "{small} {big}");
    }

    /// A word that is not the pattern is an error naming its page.
    #[test]
    fn check_names_the_page() {
        let addr = 5 * PAGE_SIZE as u64 + 16;
        check("t", addr, expected(addr).to_le_bytes()).unwrap();
        let e = check("t", addr, 0u64.to_le_bytes()).unwrap_err().to_string();
        assert!(e.contains("page 5 offset 16"), "{e}");
    }

    /// The CDF ends at 1, is increasing, and rank 0 is drawn most often.
    #[test]
    fn zipf_is_skewed() {
        let zipf = Zipf::new(1000, ZIPF_THETA, &mut Rng::new(1));
        assert!((zipf.top_share(1000) - 1.0).abs() < 1e-12);
        assert!(zipf.cdf.windows(2).all(|w| w[0] < w[1]));
        let mut rng = Rng::new(2);
        let top = zipf.pages[0];
        let hits = (0..10_000).filter(|_| zipf.page(&mut rng) == top).count() as f64 / 10_000.0;
        assert!((hits - zipf.top_share(1)).abs() < 0.02, "{hits} vs {}", zipf.top_share(1));
    }
}
