//! The page cache on the loopback transport: LRU order step by step, dirty eviction checked
//! with a raw READ of the home, read-ahead checked by counting READs, diffs of disjoint bytes,
//! invalidation.

use rdmem_cache::{CacheOptions, Home, Homes, PAGE_SIZE, PageCache, PageId};
use rdmem_core::{Endpoint, GlobalAddr, LoopbackBuffer, LoopbackTransport, NodeId, Transport};

const BASE: u64 = 1 << 20;
const STRIPE: u64 = 16;

/// Page p at node 0, BASE + p * PAGE_SIZE; runs end at 16-page stripes.
struct Flat {
    pages: u64,
}

impl Homes for Flat {
    fn home(&self, page: PageId) -> rdmem_core::Result<Home> {
        if page >= self.pages {
            return Err(rdmem_core::Error::Config(format!("no page {page}")));
        }
        let addr = GlobalAddr::new(NodeId(0), BASE + page * PAGE_SIZE as u64).unwrap();
        let run = (STRIPE - page % STRIPE).min(self.pages - page) as u32;
        Ok(Home { addr, run })
    }
}

fn setup(pages: usize, read_ahead: usize) -> (LoopbackTransport, PageCache<LoopbackBuffer>) {
    let transport = LoopbackTransport::new(&[8 << 20]);
    let mut ep = transport.endpoint().unwrap();
    // Page p's bytes all equal p + 1.
    for p in 0..64u64 {
        ep.write(GlobalAddr::new(NodeId(0), BASE + p * PAGE_SIZE as u64).unwrap(), &[p as u8 + 1; PAGE_SIZE]).unwrap();
    }
    let options =
        CacheOptions { capacity_bytes: (pages * PAGE_SIZE) as u64, shards: 1, read_ahead, stripe_pages: STRIPE };
    let cache = PageCache::new(&mut ep, options).unwrap();
    (transport, cache)
}

fn byte_at(cache: &PageCache<LoopbackBuffer>, ep: &mut impl Endpoint<Buffer = LoopbackBuffer>, page: u64) -> u8 {
    let mut b = [0u8];
    cache.read(ep, &Flat { pages: 64 }, page * PAGE_SIZE as u64 + 7, &mut b).unwrap();
    b[0]
}

#[test]
fn lru_order_step_by_step() {
    let (transport, cache) = setup(3, 0);
    let mut ep = transport.endpoint().unwrap();
    let mut step = |page: u64, order: &[u64]| {
        assert_eq!(byte_at(&cache, &mut ep, page), page as u8 + 1, "page {page}'s data");
        assert_eq!(cache.lru_order(0), order, "after touching page {page}");
    };
    step(0, &[0]);
    step(1, &[0, 1]);
    step(2, &[0, 1, 2]);
    step(0, &[1, 2, 0]); // a hit moves 0 to the most recent end
    step(3, &[2, 0, 3]); // full: 1, the least recent, is evicted
    step(2, &[0, 3, 2]);
    step(4, &[3, 2, 4]); // 0 evicted
    step(0, &[2, 4, 0]); // 0 comes back (a miss), 3 evicted
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.evictions), (2, 6, 3));
}

#[test]
fn evicting_a_dirty_page_writes_its_diff_home() {
    let (transport, cache) = setup(2, 0);
    let homes = Flat { pages: 64 };
    let mut ep = transport.endpoint().unwrap();
    cache.write(&mut ep, &homes, 5 * PAGE_SIZE as u64 + 100, b"hello").unwrap();
    assert!(cache.is_dirty(5));
    let home = GlobalAddr::new(NodeId(0), BASE + 5 * PAGE_SIZE as u64 + 100).unwrap();
    let mut raw = [0u8; 5];
    ep.read(home, &mut raw).unwrap();
    assert_eq!(raw, [6; 5], "not home before eviction (write-back)");
    byte_at(&cache, &mut ep, 6);
    byte_at(&cache, &mut ep, 7); // evicts page 5
    assert!(!cache.is_cached(5));
    ep.read(home, &mut raw).unwrap();
    assert_eq!(&raw, b"hello", "the raw READ of the home sees the evicted page's write");
    let s = cache.stats();
    assert_eq!((s.write_backs, s.bytes_written), (1, 5), "only the changed bytes went home");
    assert_eq!(cache.take_written(), [5], "the page is remembered for write notices");
}

#[test]
fn read_ahead_brings_the_rest_of_the_stripe_in_one_doorbell() {
    let (transport, cache) = setup(32, 7);
    let mut ep = transport.endpoint().unwrap();
    let (before, rung) = (transport.operations(), transport.doorbells());
    for page in 0..16 {
        assert_eq!(byte_at(&cache, &mut ep, page), page as u8 + 1);
    }
    // Page 0: a miss, not yet sequential (1 READ). Page 1: sequential, reads pages 1..=8 with
    // one doorbell. Page 9: sequential again, reads 9..=15 (the stripe ends at 16) with one.
    // A READ per page, each straight into its frame: nothing goes through a staging area.
    assert_eq!(transport.doorbells() - rung, 3, "doorbells for 16 sequential pages");
    assert_eq!(transport.operations() - before, 16, "a READ per page");
    let s = cache.stats();
    assert_eq!((s.misses, s.hits, s.read_ahead, s.page_reads), (3, 13, 13, 3));
    // Random (non-sequential) misses read one page each.
    let before = transport.operations();
    byte_at(&cache, &mut ep, 40);
    byte_at(&cache, &mut ep, 30);
    assert_eq!(transport.operations() - before, 2);
    assert!(!cache.is_cached(41), "no read-ahead after a non-sequential miss");
}

#[test]
fn disjoint_bytes_written_by_two_caches_both_survive() {
    let transport = LoopbackTransport::new(&[8 << 20]);
    let homes = Flat { pages: 64 };
    let options =
        CacheOptions { capacity_bytes: 16 * PAGE_SIZE as u64, shards: 4, read_ahead: 0, stripe_pages: STRIPE };
    let (mut ep_a, mut ep_b) = (transport.endpoint().unwrap(), transport.endpoint().unwrap());
    let a = PageCache::new(&mut ep_a, options).unwrap();
    let b = PageCache::new(&mut ep_b, options).unwrap();
    // Both cache the page, then write interleaved bytes (even bytes by a, odd bytes by b).
    for i in (0..64).step_by(2) {
        a.write(&mut ep_a, &homes, 3 * PAGE_SIZE as u64 + i, &[0xaa]).unwrap();
        b.write(&mut ep_b, &homes, 3 * PAGE_SIZE as u64 + i + 1, &[0xbb]).unwrap();
    }
    a.flush(&mut ep_a, &homes).unwrap();
    b.flush(&mut ep_b, &homes).unwrap();
    let mut raw = [0u8; 66];
    ep_a.read(GlobalAddr::new(NodeId(0), BASE + 3 * PAGE_SIZE as u64).unwrap(), &mut raw).unwrap();
    for (i, &byte) in raw[..64].iter().enumerate() {
        assert_eq!(byte, if i % 2 == 0 { 0xaa } else { 0xbb }, "byte {i}");
    }
    assert_eq!(raw[64..], [0, 0], "bytes nobody wrote keep their value");
    assert!(!a.is_dirty(3) && a.is_cached(3), "flushed pages stay cached, clean");
}

#[test]
fn invalidation_makes_the_next_read_fetch_the_home() {
    let (transport, cache) = setup(8, 0);
    let homes = Flat { pages: 64 };
    let mut ep = transport.endpoint().unwrap();
    assert_eq!(byte_at(&cache, &mut ep, 2), 3);
    // Someone else changes the home: the cache still has the old copy...
    ep.write(GlobalAddr::new(NodeId(0), BASE + 2 * PAGE_SIZE as u64 + 7).unwrap(), &[99]).unwrap();
    assert_eq!(byte_at(&cache, &mut ep, 2), 3);
    // ...until it is invalidated.
    cache.invalidate(&mut ep, &homes, [2]).unwrap();
    assert_eq!(byte_at(&cache, &mut ep, 2), 99);
    // A dirty page is written home before it is dropped: nothing is lost.
    cache.write(&mut ep, &homes, 4 * PAGE_SIZE as u64, &[42]).unwrap();
    cache.invalidate_all(&mut ep, &homes).unwrap();
    assert!(!cache.is_cached(4) && !cache.is_cached(2));
    let mut raw = [0u8];
    ep.read(GlobalAddr::new(NodeId(0), BASE + 4 * PAGE_SIZE as u64).unwrap(), &mut raw).unwrap();
    assert_eq!(raw[0], 42);
}

#[test]
fn a_page_without_a_home_is_an_error() {
    let (transport, cache) = setup(8, 0);
    let mut ep = transport.endpoint().unwrap();
    let mut b = [0u8; 4];
    let err = cache.read(&mut ep, &Flat { pages: 64 }, 64 * PAGE_SIZE as u64, &mut b).unwrap_err();
    assert!(err.to_string().contains("no page 64"), "{err}");
}

/// A miss whose READ fails (a dead memory node, or an injected fault) gives its frames back:
/// the cache keeps every frame, and works again at full capacity once the node is back.
#[test]
fn failed_reads_lose_no_frame_and_never_panic() {
    use rdmem_core::LoopbackOptions;
    for read_ahead in [0, 7] {
        let (transport, cache) = setup(4, read_ahead);
        let homes = Flat { pages: 64 };
        let mut ep = transport.endpoint().unwrap();
        // Fill the cache, dirty a page, then let the node die: misses fail, so does the eviction.
        for p in 0..4 {
            byte_at(&cache, &mut ep, p);
        }
        cache.write(&mut ep, &homes, 0, b"dirty").unwrap();
        transport.set_node_down(NodeId(0), true);
        let mut buf = [0u8; 1];
        for round in 0..3 {
            for p in 0..64u64 {
                let r = cache.read(&mut ep, &homes, p * PAGE_SIZE as u64, &mut buf);
                assert!(r.is_err() || p < 4, "round {round}: page {p} read from a dead node");
            }
        }
        transport.set_node_down(NodeId(0), false);
        let mut ep = transport.endpoint().unwrap();
        for p in 10..14u64 {
            assert_eq!(byte_at(&cache, &mut ep, p), p as u8 + 1);
        }
        let cached = (0..64).filter(|&p| cache.is_cached(p)).count();
        assert_eq!(cached, 4, "the cache lost frames (read_ahead {read_ahead})");
        // The dirty page's bytes were written home when it was evicted, not lost.
        let mut raw = [0u8; 5];
        ep.read(GlobalAddr::new(NodeId(0), BASE).unwrap(), &mut raw).unwrap();
        assert_eq!(&raw, b"dirty");
    }
    // Injected faults on every third operation, read and write mixed: no panic, frames kept.
    let transport =
        LoopbackTransport::with_options(&[8 << 20], LoopbackOptions { fail_every: Some(3), ..Default::default() });
    let options = CacheOptions { capacity_bytes: 4 * PAGE_SIZE as u64, shards: 1, read_ahead: 0, stripe_pages: STRIPE };
    let homes = Flat { pages: 64 };
    let cache = PageCache::new(&mut transport.endpoint().unwrap(), options).unwrap();
    for i in 0..2000u64 {
        let mut ep = transport.endpoint().unwrap();
        let page = (i * 7) % 64;
        let _ = if i % 2 == 0 {
            cache.write(&mut ep, &homes, page * PAGE_SIZE as u64, &[1, 2, 3])
        } else {
            cache.read(&mut ep, &homes, page * PAGE_SIZE as u64, &mut [0u8; 3])
        };
    }
    // Whatever failed, four distinct pages fit again (retrying past the injected faults).
    let mut n = 0;
    let mut ep = transport.endpoint().unwrap();
    for page in 40..44u64 {
        while cache.read(&mut ep, &homes, page * PAGE_SIZE as u64, &mut [0u8; 1]).is_err() {
            ep = transport.endpoint().unwrap();
            n += 1;
            assert!(n < 1000, "reads keep failing");
        }
    }
    for page in 40..44u64 {
        assert!(cache.is_cached(page), "page {page}: frames were lost to failed operations");
    }
}
