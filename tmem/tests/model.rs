//! The page store against a model, on the loopback transport: random put/get/flush/remotify
//! sequences (persistent pools never lose a page; an ephemeral get returns the last page put or
//! nothing), remotify racing gets, puts and flushes from other threads, full memory nodes,
//! hostile remote bytes, and the doorbells a remotify batch costs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use proptest::prelude::*;
use rdmem_allocator::{Allocator, AllocatorOptions};
use rdmem_core::{Endpoint, LoopbackTransport, Transport};
use rdmem_tmem::{PAGE_SIZE, Page, PageStore, PoolKind, StoreOptions, TmemError};

/// A page of the given kind. Text and random pages say whose they are: object, index and
/// version in their first 20 bytes.
fn page_of(content: Content, object: u64, index: u32, version: u64) -> Page {
    let mut page = [0u8; PAGE_SIZE];
    let mut x = object.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(index) << 40 ^ version.wrapping_mul(31) | 1;
    match content {
        Content::Zero => return page,
        Content::Filled => {
            for w in page.chunks_exact_mut(8) {
                w.copy_from_slice(&x.to_ne_bytes());
            }
            return page;
        }
        Content::Text => {
            let words: [&[u8]; 6] = [b"remote ", b"memory ", b"page ", b"swap ", b"object ", b"index "];
            let mut at = 0;
            while at < PAGE_SIZE {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let w = words[(x % 6) as usize];
                let n = w.len().min(PAGE_SIZE - at);
                page[at..at + n].copy_from_slice(&w[..n]);
                at += n;
            }
        }
        Content::Random => {
            for b in page.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }
    page[..8].copy_from_slice(&object.to_le_bytes());
    page[8..12].copy_from_slice(&index.to_le_bytes());
    page[12..20].copy_from_slice(&version.to_le_bytes());
    page
}

#[derive(Clone, Copy, Debug)]
enum Content {
    Zero,
    Filled,
    Text,
    Random,
}

fn content() -> impl Strategy<Value = Content> {
    prop_oneof![Just(Content::Zero), Just(Content::Filled), Just(Content::Text), Just(Content::Random)]
}

fn store(pool_bytes: u64, options: StoreOptions) -> (Arc<LoopbackTransport>, PageStore<LoopbackTransport>) {
    let transport = Arc::new(LoopbackTransport::new(&[pool_bytes]));
    let allocator = Allocator::new(
        Arc::clone(&transport),
        AllocatorOptions { chunk_size: 64 << 10, ..AllocatorOptions::default() },
    )
    .unwrap();
    (transport, PageStore::new(allocator, options).unwrap())
}

/// Small local tiers, so that pages move to the memory node all the time.
fn small(local_pages: usize) -> StoreOptions {
    let local = local_pages * PAGE_SIZE;
    StoreOptions { local_capacity: local, remotify_above: local / 2, compress: true, batch: 4, shards: 2 }
}

#[derive(Clone, Debug)]
enum Op {
    Put { pool: usize, object: u64, index: u32, content: Content },
    Get { pool: usize, object: u64, index: u32 },
    FlushPage { pool: usize, object: u64, index: u32 },
    FlushObject { pool: usize, object: u64 },
    FlushPool { pool: usize },
    Remotify,
}

fn op() -> impl Strategy<Value = Op> {
    let (pool, object, index) = (0..2usize, 0..3u64, 0..24u32);
    prop_oneof![
        6 => (pool.clone(), object.clone(), index.clone(), content())
            .prop_map(|(pool, object, index, content)| Op::Put { pool, object, index, content }),
        6 => (pool.clone(), object.clone(), index.clone()).prop_map(|(pool, object, index)| Op::Get { pool, object, index }),
        2 => (pool.clone(), object.clone(), index).prop_map(|(pool, object, index)| Op::FlushPage { pool, object, index }),
        1 => (pool.clone(), object).prop_map(|(pool, object)| Op::FlushObject { pool, object }),
        1 => pool.prop_map(|pool| Op::FlushPool { pool }),
        1 => Just(Op::Remotify),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Pool 0 is persistent, pool 1 ephemeral; the model is the last page put under each key.
    #[test]
    fn random_sequences_agree_with_the_model(ops in proptest::collection::vec(op(), 1..200), local_pages in 0usize..6) {
        let (_transport, store) = store(16 << 20, small(local_pages * 2));
        let pools = [store.create_pool(PoolKind::Persistent).unwrap(), store.create_pool(PoolKind::Ephemeral).unwrap()];
        let mut handle = store.handle().unwrap();
        let mut model: HashMap<(usize, u64, u32), Page> = HashMap::new();
        let mut version = 0u64;
        let mut out = [0u8; PAGE_SIZE];
        for op in ops {
            match op {
                Op::Put { pool, object, index, content } => {
                    version += 1;
                    let page = page_of(content, object, index, version);
                    handle.put(pools[pool], object, index, &page).unwrap();
                    model.insert((pool, object, index), page);
                }
                Op::Get { pool, object, index } => {
                    let found = handle.get(pools[pool], object, index, &mut out).unwrap();
                    match (pool, model.get(&(pool, object, index))) {
                        (0, Some(page)) => { prop_assert!(found, "a persistent page is never lost"); prop_assert_eq!(&out, page); }
                        (_, None) => prop_assert!(!found, "nothing was put, or it was flushed"),
                        (_, Some(page)) => {
                            if found {
                                prop_assert_eq!(&out, page, "an ephemeral get gives the last page put or nothing");
                            } else {
                                model.remove(&(pool, object, index)); // dropped: it stays dropped
                            }
                        }
                    }
                }
                Op::FlushPage { pool, object, index } => {
                    let found = handle.flush_page(pools[pool], object, index).unwrap();
                    let had = model.remove(&(pool, object, index)).is_some();
                    if pool == 0 { prop_assert_eq!(found, had); } else { prop_assert!(had || !found); }
                }
                Op::FlushObject { pool, object } => {
                    let n = handle.flush_object(pools[pool], object).unwrap();
                    let before = model.len();
                    model.retain(|k, _| !(k.0 == pool && k.1 == object));
                    let had = (before - model.len()) as u64;
                    if pool == 0 { prop_assert_eq!(n, had); } else { prop_assert!(n <= had); }
                }
                Op::FlushPool { pool } => {
                    let n = handle.flush_pool(pools[pool]).unwrap();
                    let before = model.len();
                    model.retain(|k, _| k.0 != pool);
                    let had = (before - model.len()) as u64;
                    if pool == 0 { prop_assert_eq!(n, had); } else { prop_assert!(n <= had); }
                }
                Op::Remotify => {
                    handle.remotify().unwrap();
                    prop_assert_eq!(store.stats().local_pages, 0);
                }
            }
            let stats = store.stats();
            let persistent = model.keys().filter(|k| k.0 == 0).count() as u64;
            prop_assert!(stats.pages() >= persistent && stats.pages() <= model.len() as u64, "{:?} vs {} in the model", stats, model.len());
            prop_assert!(stats.local_bytes <= (local_pages * 2 * PAGE_SIZE) as u64, "the local tier stays bounded: {:?}", stats);
        }
        // Everything the model holds in the persistent pool comes back, then flushing it all
        // gives every remote block back.
        for ((pool, object, index), page) in &model {
            if *pool == 0 {
                prop_assert!(handle.get(pools[0], *object, *index, &mut out).unwrap());
                prop_assert_eq!(&out, page);
            }
        }
        handle.flush_pool(pools[0]).unwrap();
        handle.flush_pool(pools[1]).unwrap();
        let stats = store.stats();
        prop_assert_eq!((stats.pages(), stats.local_bytes, stats.remote_bytes), (0, 0, 0));
    }
}

/// Writers overwrite pages with new versions, a remotifier moves them out, readers check every
/// page they get is its own key's (some version at least as new as the one last seen), and
/// a flusher removes pages: for many rounds. At the end, every page is its last version.
#[test]
fn remotify_racing_gets_puts_and_flushes_never_gives_another_pages_bytes() {
    for round in 0..20u64 {
        let (_transport, store) = store(32 << 20, small(8));
        let pool = store.create_pool(PoolKind::Persistent).unwrap();
        let _remotifier = store.start_remotifier().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        const PAGES: u32 = 32;
        const WRITERS: u64 = 2;
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut handle = store.handle().unwrap();
                    let mut last = HashMap::new();
                    for version in 1..=150u64 {
                        let index = ((version * 7 + round) % u64::from(PAGES / WRITERS as u32)) as u32 * WRITERS as u32
                            + w as u32;
                        let content = if version % 3 == 0 { Content::Random } else { Content::Text };
                        handle.put(pool, 1, index, &page_of(content, 1, index, version)).unwrap();
                        last.insert(index, (content, version));
                    }
                    last
                })
            })
            .collect();
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let (store, stop) = (store.clone(), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut handle = store.handle().unwrap();
                    let mut out = [0u8; PAGE_SIZE];
                    let mut seen = [0u64; PAGES as usize];
                    let mut hits = 0u64;
                    let mut index = r;
                    while !stop.load(Ordering::Acquire) {
                        index = (index + 5) % PAGES;
                        if handle.get(pool, 1, index, &mut out).unwrap() {
                            hits += 1;
                            assert_eq!(u64::from_le_bytes(out[..8].try_into().unwrap()), 1, "object");
                            assert_eq!(
                                u32::from_le_bytes(out[8..12].try_into().unwrap()),
                                index,
                                "another page's bytes"
                            );
                            let version = u64::from_le_bytes(out[12..20].try_into().unwrap());
                            assert!(
                                version >= seen[index as usize],
                                "page {index} went back from {} to {version}",
                                seen[index as usize]
                            );
                            seen[index as usize] = version;
                        }
                    }
                    hits
                })
            })
            .collect();
        let flusher = {
            let (store, stop) = (store.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut handle = store.handle().unwrap();
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    // Pages past PAGES are put and flushed here only.
                    let index = PAGES + n % 8;
                    handle.put(pool, 1, index, &page_of(Content::Text, 1, index, 1)).unwrap();
                    assert!(handle.flush_page(pool, 1, index).unwrap());
                    n += 1;
                }
            })
        };
        let last: Vec<HashMap<u32, (Content, u64)>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        stop.store(true, Ordering::Release);
        for r in readers {
            r.join().unwrap();
        }
        flusher.join().unwrap();
        let mut handle = store.handle().unwrap();
        let mut out = [0u8; PAGE_SIZE];
        for (index, (content, version)) in last.iter().flatten() {
            assert!(handle.get(pool, 1, *index, &mut out).unwrap(), "round {round}: page {index} lost");
            assert_eq!(out, page_of(*content, 1, *index, *version), "round {round}: page {index}");
        }
        let stats = store.stats();
        assert!(stats.remotified > 0, "the remotifier moved pages: {stats:?}");
        assert_eq!(stats.pages(), last.iter().map(|m| m.len()).sum::<usize>() as u64);
    }
}

#[test]
fn a_full_memory_node_refuses_persistent_puts_and_drops_ephemeral_pages() {
    // A small pool: a few hundred random pages fill it.
    let (_transport, store) = store(4 << 20, small(4));
    let persistent = store.create_pool(PoolKind::Persistent).unwrap();
    let mut handle = store.handle().unwrap();
    let mut stored = Vec::new();
    let mut refused = None;
    for index in 0..4096u32 {
        let page = page_of(Content::Random, 9, index, 1);
        match handle.put(persistent, 9, index, &page) {
            Ok(()) => stored.push(index),
            Err(TmemError::Full { pool, .. }) => {
                assert_eq!(pool, persistent);
                refused = Some(index);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let refused = refused.expect("a 4 MiB node fills up");
    let mut out = [0u8; PAGE_SIZE];
    assert!(!handle.get(persistent, 9, refused, &mut out).unwrap(), "the refused page is not there");
    for &index in &stored {
        assert!(handle.get(persistent, 9, index, &mut out).unwrap(), "page {index} was put with Ok");
        assert_eq!(out, page_of(Content::Random, 9, index, 1));
    }
    // Overwriting a stored page in the full store: the new version is stored (in the space the
    // old one gave back) or refused, and then the old one is gone too; never the old bytes.
    let victim = stored[0];
    match handle.put(persistent, 9, victim, &page_of(Content::Random, 9, victim, 2)) {
        Ok(()) => {
            assert!(handle.get(persistent, 9, victim, &mut out).unwrap());
            assert_eq!(out, page_of(Content::Random, 9, victim, 2));
        }
        Err(TmemError::Full { .. }) => assert!(!handle.get(persistent, 9, victim, &mut out).unwrap()),
        Err(e) => panic!("{e}"),
    }
    // Ephemeral puts into the full store succeed and store what fits; gets hit or miss.
    let ephemeral = store.create_pool(PoolKind::Ephemeral).unwrap();
    for index in 0..64 {
        handle.put(ephemeral, 1, index, &page_of(Content::Random, 1, index, 1)).unwrap();
    }
    for index in 0..64 {
        if handle.get(ephemeral, 1, index, &mut out).unwrap() {
            assert_eq!(out, page_of(Content::Random, 1, index, 1));
        }
    }
    assert!(store.stats().puts_refused >= 1);
    // Zero pages take no space: they are stored even now.
    handle.put(persistent, 10, 0, &[0; PAGE_SIZE]).unwrap();
    assert!(handle.get(persistent, 10, 0, &mut out).unwrap());
    // Flushing the persistent pool makes room again.
    handle.destroy_pool(persistent).unwrap();
    let again = store.create_pool(PoolKind::Persistent).unwrap();
    assert_ne!(again, persistent, "a new pool never takes a destroyed one's id");
    handle.put(again, 9, 0, &page_of(Content::Random, 9, 0, 3)).unwrap();
    handle.remotify().unwrap();
}

#[test]
fn misuse_is_an_error() {
    let (_transport, store) = store(16 << 20, StoreOptions::default());
    let pool = store.create_pool(PoolKind::Persistent).unwrap();
    let mut handle = store.handle().unwrap();
    let page = page_of(Content::Text, 1, 1, 1);
    handle.put(pool, 1, 1, &page).unwrap();
    assert_eq!(handle.destroy_pool(pool).unwrap(), 1);
    let mut out = [0u8; PAGE_SIZE];
    assert!(matches!(handle.put(pool, 1, 1, &page), Err(TmemError::UnknownPool(p)) if p == pool));
    assert!(matches!(handle.get(pool, 1, 1, &mut out), Err(TmemError::UnknownPool(_))));
    assert!(matches!(handle.flush_page(pool, 1, 1), Err(TmemError::UnknownPool(_))));
    assert!(matches!(handle.flush_object(pool, 1), Err(TmemError::UnknownPool(_))));
    assert!(matches!(handle.destroy_pool(pool), Err(TmemError::UnknownPool(_))));
    let bad = |options: StoreOptions| {
        let allocator =
            Allocator::new(Arc::new(LoopbackTransport::new(&[16 << 20])), AllocatorOptions::default()).unwrap();
        matches!(PageStore::new(allocator, options), Err(TmemError::InvalidOptions(_)))
    };
    assert!(bad(StoreOptions { batch: 0, ..StoreOptions::default() }));
    assert!(bad(StoreOptions { batch: 100_000, ..StoreOptions::default() }));
    assert!(bad(StoreOptions { shards: 0, ..StoreOptions::default() }));
    let (_t, clamped) = self::store(16 << 20, StoreOptions { local_capacity: 0, ..StoreOptions::default() });
    assert_eq!(clamped.options().remotify_above, 0, "remotify_above is at most local_capacity");
    let _first = store.start_remotifier().unwrap();
    assert!(matches!(store.start_remotifier(), Err(TmemError::InvalidOptions(_))), "one remotifier per store");
    let pools: Vec<_> = std::iter::from_fn(|| store.create_pool(PoolKind::Ephemeral).ok()).collect();
    assert_eq!(pools.len(), rdmem_tmem::MAX_POOLS, "the destroyed pool's slot is free again");
    assert!(matches!(store.create_pool(PoolKind::Ephemeral), Err(TmemError::InvalidOptions(_))), "all in use");
}

/// A remote block overwritten behind the store's back is reported, not returned as the page.
#[test]
fn a_remote_page_whose_bytes_changed_is_reported_corrupt() {
    let (transport, store) =
        store(16 << 20, StoreOptions { local_capacity: 0, remotify_above: 0, ..StoreOptions::default() });
    let pool = store.create_pool(PoolKind::Persistent).unwrap();
    let mut handle = store.handle().unwrap();
    let page = page_of(Content::Random, 3, 3, 1);
    handle.put(pool, 3, 3, &page).unwrap();
    assert_eq!(store.stats().remote_pages, 1);
    // Scribble over every allocated byte of the pool's data area but the allocator's metadata:
    // find the page by its bytes.
    let mut ep = transport.endpoint().unwrap();
    let size = transport.nodes()[0].pool_size;
    let mut buf = vec![0u8; 4096];
    let mut at = None;
    for offset in (0..size).step_by(4096) {
        let addr = rdmem_core::GlobalAddr::new(rdmem_core::NodeId(0), offset).unwrap();
        ep.read(addr, &mut buf).unwrap();
        if buf == page[..] {
            at = Some(addr);
            break;
        }
    }
    let at = at.expect("the page is on the node, stored as it is (random bytes do not compress)");
    ep.write(at.checked_add(100).unwrap(), &[0xEE; 8]).unwrap();
    let mut out = [0u8; PAGE_SIZE];
    assert!(
        matches!(handle.get(pool, 3, 3, &mut out), Err(TmemError::Corrupt { at: rdmem_tmem::Where::Remote(a), .. }) if a == at)
    );
    assert!(!handle.get(pool, 3, 3, &mut out).unwrap(), "dropped after the report");
}

/// A remotify batch is one doorbell (the blocks come from chunks the thread already owns).
#[test]
fn a_remotify_batch_rings_one_doorbell() {
    let options = StoreOptions { local_capacity: 1 << 20, remotify_above: 0, batch: 8, shards: 1, compress: true };
    let (transport, store) = store(16 << 20, options);
    let pool = store.create_pool(PoolKind::Persistent).unwrap();
    let mut handle = store.handle().unwrap();
    let put = |handle: &mut rdmem_tmem::StoreHandle<LoopbackTransport>, from: u32| {
        for index in from..from + 8 {
            handle.put(pool, 1, index, &page_of(Content::Text, 1, index, 1)).unwrap();
        }
    };
    put(&mut handle, 0);
    assert_eq!(handle.remotify().unwrap(), 8); // claims a chunk for the size class
    put(&mut handle, 8);
    let before = transport.doorbells();
    assert_eq!(handle.remotify().unwrap(), 8);
    assert_eq!(transport.doorbells() - before, 1, "8 pages, one doorbell");
    let before = transport.doorbells();
    let mut out = [0u8; PAGE_SIZE];
    assert!(handle.get(pool, 1, 9, &mut out).unwrap());
    assert_eq!(out, page_of(Content::Text, 1, 9, 1));
    assert_eq!(transport.doorbells() - before, 1, "a remote get is one READ");
}

/// With no local tier, every put goes remote at once while the remotifier is also at work:
/// a page the remotifier is writing out counts as leaving, so no put is refused for want of
/// room the memory node has (puts used to race the remotifier into `Full`).
#[test]
fn puts_racing_the_remotifier_are_not_refused() {
    for round in 0..5u64 {
        let options = StoreOptions { local_capacity: 0, remotify_above: 0, batch: 8, shards: 1, compress: true };
        let (_transport, store) = store(64 << 20, options);
        let pool = store.create_pool(PoolKind::Persistent).unwrap();
        let _remotifier = store.start_remotifier().unwrap();
        let threads: Vec<_> = (0..2u32)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut handle = store.handle().unwrap();
                    for i in 0..1500u32 {
                        let index = t * 10_000 + i;
                        handle.put(pool, 1, index, &page_of(Content::Random, 1, index, round)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no put was refused");
        }
        let mut handle = store.handle().unwrap();
        let mut out = [0u8; PAGE_SIZE];
        for t in 0..2u32 {
            for i in 0..1500u32 {
                let index = t * 10_000 + i;
                assert!(handle.get(pool, 1, index, &mut out).unwrap());
                assert_eq!(out, page_of(Content::Random, 1, index, round));
            }
        }
        assert_eq!(store.stats().puts_refused, 0);
    }
}
