//! The semantics every [`Transport`] must have, as reusable checks (feature `conformance`).
//!
//! The loopback transport's tests and the RDMA transport's device tests call the same functions,
//! so both transports are held to one definition of READ, WRITE, compare-and-swap, fetch-and-add,
//! batches and errors. Each check panics with a message on the first violation. Each takes the
//! address of a scratch area (at least [`SCRATCH_BYTES`], 8-byte aligned, on a node the
//! transport reaches) that it may overwrite.

use std::sync::Barrier;

use crate::addr::{GlobalAddr, NodeId};
pub use crate::aio::join_all;
use crate::aio::{AsyncEndpoint, AsyncOptions, LocalFuture, Submit, block_on};
use crate::endpoint::{Endpoint, LocalBuffer, Transport};
use crate::error::{Error, OpKind};

/// Bytes of scratch space each check needs.
pub const SCRATCH_BYTES: u64 = 64 * 1024;

fn at(base: GlobalAddr, offset: u64) -> GlobalAddr {
    base.checked_add(offset).expect("scratch address in range")
}

/// READ and WRITE of byte ranges (aligned and not), zero-copy through registered buffers, and
/// the 8-byte word helpers.
pub fn read_write<T: Transport>(transport: &T, base: GlobalAddr) {
    let mut ep = transport.endpoint().expect("endpoint");
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 31 + 7) as u8).collect();
    ep.write(base, &pattern).expect("WRITE 4 KiB");
    let mut back = vec![0u8; 4096];
    ep.read(base, &mut back).expect("READ 4 KiB");
    assert_eq!(back, pattern, "READ did not return what WRITE stored");

    // Unaligned start and length: neighbours must be untouched.
    ep.write(at(base, 13), b"hello").expect("unaligned WRITE");
    let mut window = [0u8; 24];
    ep.read(at(base, 8), &mut window).expect("unaligned READ");
    let mut want = [0u8; 24];
    want.copy_from_slice(&pattern[8..32]);
    want[5..10].copy_from_slice(b"hello");
    assert_eq!(window, want, "unaligned WRITE changed bytes around it");

    // In place, through registered buffers.
    let mut buf = ep.buffer(8192).expect("registered buffer");
    buf[100..200].copy_from_slice(&pattern[..100]);
    ep.write_from(at(base, 8192), &buf, 100..200).expect("WRITE from a buffer");
    ep.read_into(at(base, 8192), &mut buf, 4000..4100).expect("READ into a buffer");
    assert_eq!(&buf[4000..4100], &pattern[..100], "READ into a registered buffer");

    ep.write_u64(at(base, 16384), 0x0123_4567_89ab_cdef).expect("write_u64");
    assert_eq!(ep.read_u64(at(base, 16384)).expect("read_u64"), 0x0123_4567_89ab_cdef);
    let mut bytes = [0u8; 8];
    ep.read(at(base, 16384), &mut bytes).expect("READ word");
    assert_eq!(bytes, 0x0123_4567_89ab_cdef_u64.to_le_bytes(), "words are little-endian");

    // Larger transfers, as the benchmarks use them.
    let big: Vec<u8> = (0..32 * 1024u32).map(|i| (i % 251) as u8).collect();
    ep.write(at(base, 32 * 1024), &big).expect("WRITE 32 KiB");
    let mut big_back = vec![0u8; big.len()];
    ep.read(at(base, 32 * 1024), &mut big_back).expect("READ 32 KiB");
    assert!(big_back == big, "32 KiB READ differs from what was written");
}

/// Compare-and-swap success and failure (the current value comes back), fetch-and-add returns
/// the old value and wraps.
pub fn atomics<T: Transport>(transport: &T, base: GlobalAddr) {
    let mut ep = transport.endpoint().expect("endpoint");
    let word = at(base, 0);
    ep.write_u64(word, 42).expect("write_u64");
    assert_eq!(ep.cas(word, 42, 100).expect("CAS"), 42, "successful CAS returns the old value");
    assert_eq!(ep.read_u64(word).expect("read"), 100, "successful CAS stores the new value");
    assert_eq!(ep.cas(word, 42, 7).expect("CAS"), 100, "failed CAS returns the current value");
    assert_eq!(ep.read_u64(word).expect("read"), 100, "failed CAS leaves the word alone");
    assert_eq!(ep.faa(word, 5).expect("FAA"), 100, "FAA returns the old value");
    assert_eq!(ep.read_u64(word).expect("read"), 105);
    ep.write_u64(word, u64::MAX).expect("write_u64");
    assert_eq!(ep.faa(word, 2).expect("FAA"), u64::MAX);
    assert_eq!(ep.read_u64(word).expect("read"), 1, "FAA wraps around");
    assert_eq!(ep.faa(word, 1u64.wrapping_neg()).expect("FAA"), 1, "adding -1 subtracts");
    assert_eq!(ep.read_u64(word).expect("read"), 0);
}

/// One batch mixing all four operations, executed in order on one node.
pub fn batch_mixing_all_ops<T: Transport>(transport: &T, base: GlobalAddr) {
    let mut ep = transport.endpoint().expect("endpoint");
    let (counter, lock, data) = (at(base, 0), at(base, 8), at(base, 64));
    ep.write_u64(counter, 10).expect("init");
    ep.write_u64(lock, 0).expect("init");
    let mut buf = ep.buffer(256).expect("buffer");
    buf[..128].fill(0xab);
    let (mut faa_old, mut cas_ok, mut cas_fail) = (0, 0, 0);
    let (mut after, mut data_back) = ([0u8; 8], [0u8; 128]);
    let mut batch = ep.batch();
    batch
        .faa(counter, 5, &mut faa_old)
        .cas(lock, 0, 1, &mut cas_ok)
        .cas(lock, 0, 2, &mut cas_fail)
        .write_from(data, &buf, 0..128)
        .read(counter, &mut after)
        .read(data, &mut data_back);
    assert_eq!(batch.len(), 6);
    batch.submit().expect("mixed batch");
    assert_eq!(faa_old, 10, "FAA in a batch returns the old value");
    assert_eq!(cas_ok, 0, "first CAS in a batch succeeds and returns 0");
    assert_eq!(cas_fail, 1, "second CAS sees the first one's value: ops run in order");
    assert_eq!(u64::from_le_bytes(after), 15, "READ after FAA in one batch sees the sum");
    assert_eq!(data_back, [0xab; 128], "READ after WRITE in one batch sees the bytes");

    // A long batch of 64 reads of different words (one doorbell per node on RDMA).
    let mut words = vec![0u8; 64 * 8];
    let values: Vec<u8> = (0..64 * 8).map(|i| (i * 3) as u8).collect();
    ep.write(at(base, 1024), &values).expect("fill");
    let mut batch = ep.batch();
    for (i, chunk) in words.chunks_mut(8).enumerate() {
        batch.read(at(base, 1024 + 8 * i as u64), chunk);
    }
    batch.submit().expect("batch of 64 READs");
    assert_eq!(words, values, "batch of 64 READs");
    assert!(ep.batch().submit().is_ok(), "an empty batch is a no-op");

    // One registered buffer split among the operations of one batch, in place both ways.
    let mut buf = ep.buffer(64 * 8).expect("buffer");
    let mut batch = ep.batch();
    for (i, piece) in buf.reg_slice_mut().chunks(8).enumerate() {
        batch.read_into_slice(at(base, 1024 + 8 * i as u64), piece);
    }
    batch.submit().expect("batch of READs into one buffer");
    assert_eq!(&buf[..], &values[..], "READs into slices of one registered buffer");
    buf.iter_mut().for_each(|b| *b = b.wrapping_add(1));
    let mut batch = ep.batch();
    for (i, piece) in buf.reg_slice().chunks(8).enumerate() {
        batch.write_from_slice(at(base, 1024 + 8 * i as u64), piece);
    }
    batch.submit().expect("batch of WRITEs from one buffer");
    let mut back = vec![0u8; 64 * 8];
    ep.read(at(base, 1024), &mut back).expect("READ back");
    assert_eq!(&back[..], &buf[..], "WRITEs from slices of one registered buffer");
}

/// Write-behind ([`Endpoint::post_write`]): the next operation of the same endpoint sees a
/// posted write, other endpoints see it after `flush`, and dropping the endpoint does not lose
/// it. Many of them (more than a send queue holds, more bytes than any copy area) land in
/// order. Bad arguments fail at once and leave the endpoint usable.
pub fn write_behind<T: Transport>(transport: &T, base: GlobalAddr) {
    let mut ep = transport.endpoint().expect("endpoint");
    let mut other = transport.endpoint().expect("second endpoint");
    ep.post_write_u64(base, 7).expect("post_write");
    assert_eq!(ep.read_u64(base).expect("read"), 7, "a READ after a posted WRITE on one endpoint");
    ep.post_write_u64(base, 10).expect("post_write");
    assert_eq!(ep.faa(base, 1).expect("FAA"), 10, "an atomic after a posted WRITE on one endpoint");

    // Too long to go inline: copied.
    let long: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 1) as u8).collect();
    ep.post_write(at(base, 4096), &long).expect("long post_write");
    let mut back = vec![0u8; long.len()];
    ep.read(at(base, 4096), &mut back).expect("read");
    assert!(back == long, "a long posted WRITE");

    // Many to one word: the last one wins. Then many to distinct words, short and long mixed,
    // twice over (120 x 900 bytes is more than the RDMA transport's write-behind area).
    for i in 0..1000u64 {
        ep.post_write_u64(at(base, 8), i).expect("post_write");
    }
    for pass in 0..2u64 {
        for i in 0..60u64 {
            let piece = [(i + 100 * pass) as u8; 900];
            ep.post_write(at(base, 8192 + 900 * i), &piece).expect("post_write 900 bytes");
            ep.post_write_u64(at(base, 8 * (16 + i)), i + 1000 * pass).expect("post_write word");
        }
    }
    ep.flush_for(base.node()).expect("flush_for");
    ep.flush().expect("flush");
    assert_eq!(other.read_u64(at(base, 8)).expect("read"), 999, "posted WRITEs to one word out of order");
    let mut words = [0u8; 480];
    other.read(at(base, 128), &mut words).expect("read");
    let mut pieces = vec![0u8; 54_000];
    other.read(at(base, 8192), &mut pieces).expect("read");
    for i in 0..60usize {
        let word = u64::from_le_bytes(words[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        assert_eq!(word, i as u64 + 1000, "posted word {i} after flush");
        let piece = &pieces[900 * i..900 * (i + 1)];
        assert!(piece.iter().all(|&b| b == (i + 100) as u8), "posted piece {i} after flush");
    }

    // Bad arguments.
    let node = ep.nodes().iter().find(|n| n.id == base.node()).copied().expect("base node");
    let end = GlobalAddr::new(node.id, node.pool_size).expect("address");
    assert!(matches!(ep.post_write_u64(end, 1), Err(Error::OutOfRange { op: OpKind::Write, .. })));
    ep.flush().expect("flush after a refused post_write");

    // Dropped with a posted write outstanding: it still lands.
    ep.post_write_u64(at(base, 16), 0xfeed).expect("post_write");
    drop(ep);
    assert_eq!(other.read_u64(at(base, 16)).expect("read"), 0xfeed, "a posted WRITE lost by dropping the endpoint");
}

/// Bad arguments are refused with their own errors and nothing is posted; the endpoint stays
/// usable afterwards.
pub fn bad_inputs<T: Transport>(transport: &T, base: GlobalAddr) {
    let mut ep = transport.endpoint().expect("endpoint");
    let unknown = (0..=u16::MAX).map(NodeId).find(|id| ep.nodes().iter().all(|n| n.id != *id)).expect("a free id");
    let nowhere = GlobalAddr::new(unknown, 64).expect("address");
    assert!(matches!(ep.read_u64(nowhere), Err(Error::UnknownNode { op: OpKind::Read, .. })));
    let node = ep.nodes().iter().find(|n| n.id == base.node()).copied().expect("base node");
    let end = GlobalAddr::new(node.id, node.pool_size).expect("address");
    assert!(matches!(ep.write_u64(end, 1), Err(Error::OutOfRange { op: OpKind::Write, .. })));
    let straddle = GlobalAddr::new(node.id, node.pool_size - 4).expect("address");
    assert!(matches!(ep.read_u64(straddle), Err(Error::OutOfRange { .. })), "a READ past the pool end");
    assert!(matches!(ep.cas(at(base, 4), 0, 1), Err(Error::Misaligned { op: OpKind::CompareSwap, .. })));
    assert!(matches!(ep.faa(at(base, 1), 1), Err(Error::Misaligned { op: OpKind::FetchAdd, .. })));
    let mut buf = ep.buffer(64).expect("buffer");
    assert!(matches!(ep.read_into(base, &mut buf, 32..96), Err(Error::LocalRange { start: 32, end: 96, len: 64 })));
    // A bad operation anywhere in a batch refuses the whole batch before anything is posted.
    ep.write_u64(base, 5).expect("write");
    let (mut old, mut other) = (0, 0);
    let mut batch = ep.batch();
    batch.faa(base, 1, &mut old).faa(nowhere, 1, &mut other);
    assert!(batch.submit().is_err(), "batch with a bad op");
    assert_eq!(ep.read_u64(base).expect("read"), 5, "nothing in a refused batch took effect");
}

/// `threads` threads, each with its own endpoint, add 1 to one word `per_thread` times; the
/// word must end at exactly `threads * per_thread` and the old values must all be distinct.
pub fn concurrent_faa<T: Transport>(transport: &T, base: GlobalAddr, threads: usize, per_thread: u64) {
    let word = at(base, 0);
    transport.endpoint().expect("endpoint").write_u64(word, 0).expect("init");
    let start = Barrier::new(threads);
    let olds: Vec<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut ep = transport.endpoint().expect("endpoint per thread");
                    start.wait();
                    (0..per_thread).map(|_| ep.faa(word, 1).expect("FAA")).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let total = threads as u64 * per_thread;
    assert_eq!(transport.endpoint().expect("endpoint").read_u64(word).expect("read"), total, "lost FAA");
    let mut all: Vec<u64> = olds.into_iter().flatten().collect();
    all.sort_unstable();
    assert!(all.iter().copied().eq(0..total), "every FAA must see a distinct old value");
}

/// `threads` threads increment one word with read-free CAS loops (retrying with the value a
/// failed CAS returns); the word must end at exactly `threads * per_thread`.
pub fn concurrent_cas<T: Transport>(transport: &T, base: GlobalAddr, threads: usize, per_thread: u64) {
    let word = at(base, 8);
    transport.endpoint().expect("endpoint").write_u64(word, 0).expect("init");
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut ep = transport.endpoint().expect("endpoint per thread");
                let mut seen = 0;
                for _ in 0..per_thread {
                    loop {
                        let old = ep.cas(word, seen, seen + 1).expect("CAS");
                        if old == seen {
                            seen += 1;
                            break;
                        }
                        seen = old;
                    }
                }
            });
        }
    });
    let total = threads as u64 * per_thread;
    assert_eq!(transport.endpoint().expect("endpoint").read_u64(word).expect("read"), total, "lost CAS increment");
}

fn async_endpoint<T: Transport>(transport: &T) -> AsyncEndpoint<T::Endpoint>
where
    T::Endpoint: Submit,
{
    AsyncEndpoint::new(transport.endpoint().expect("endpoint")).expect("async endpoint")
}

/// The async face ([`crate::aio`]) does what the sync face does: READ and WRITE (aligned or
/// not, through slots and in place through registered buffers), the atomics, a mixed batch in
/// order, and the same errors for the same bad inputs. What it writes the sync face reads.
pub fn async_semantics<T: Transport>(transport: &T, base: GlobalAddr)
where
    T::Endpoint: Submit,
{
    let ep = async_endpoint(transport);
    let mut sync = transport.endpoint().expect("endpoint");
    block_on(async {
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 31 + 7) as u8).collect();
        ep.write(base, &pattern).await.expect("async WRITE 4 KiB");
        let mut back = vec![0u8; 4096];
        sync.read(base, &mut back).expect("sync READ");
        assert_eq!(back, pattern, "the sync face reads what the async face wrote");
        let mut back = vec![0u8; 4096];
        ep.read(base, &mut back).await.expect("async READ 4 KiB");
        assert_eq!(back, pattern, "async READ returns what was written");

        ep.write(at(base, 13), b"hello").await.expect("unaligned WRITE");
        let mut window = [0u8; 24];
        ep.read(at(base, 8), &mut window).await.expect("unaligned READ");
        let mut want = [0u8; 24];
        want.copy_from_slice(&pattern[8..32]);
        want[5..10].copy_from_slice(b"hello");
        assert_eq!(window, want, "unaligned async WRITE changed bytes around it");

        // In place, any length: the buffer goes in and comes back.
        let big: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        let mut buf = ep.buffer(big.len()).expect("buffer");
        buf.copy_from_slice(&big);
        let (r, buf) = ep.write_from(at(base, 8192), buf, 0..big.len()).await;
        r.expect("async WRITE from a buffer");
        let mut buf = buf;
        buf.fill(0);
        let (r, buf) = ep.read_into(at(base, 8192), buf, 1000..2000).await;
        r.expect("async READ into a buffer");
        assert_eq!(&buf[1000..2000], &big[..1000], "async READ into a registered buffer");
        assert!(buf[..1000].iter().all(|&b| b == 0), "bytes outside the range are untouched");

        let word = at(base, 4096);
        ep.write_u64(word, 42).await.expect("write_u64");
        assert_eq!(ep.cas(word, 42, 100).await.expect("CAS"), 42, "successful CAS returns the old value");
        assert_eq!(ep.cas(word, 42, 7).await.expect("CAS"), 100, "failed CAS returns the current value");
        assert_eq!(ep.faa(word, 5).await.expect("FAA"), 100, "FAA returns the old value");
        ep.write_u64(word, u64::MAX).await.expect("write_u64");
        assert_eq!(ep.faa(word, 2).await.expect("FAA"), u64::MAX);
        assert_eq!(ep.read_u64(word).await.expect("read"), 1, "FAA wraps around");
        assert_eq!(sync.read_u64(word).expect("sync read"), 1, "the sync face sees the async atomics");

        // A mixed batch runs in order.
        let (counter, lock) = (at(base, 4104), at(base, 4112));
        ep.write_u64(counter, 10).await.expect("init");
        ep.write_u64(lock, 0).await.expect("init");
        let (mut faa_old, mut cas_ok, mut cas_fail, mut after) = (0, 0, 0, [0u8; 8]);
        let mut batch = ep.batch();
        batch
            .faa(counter, 5, &mut faa_old)
            .cas(lock, 0, 1, &mut cas_ok)
            .cas(lock, 0, 2, &mut cas_fail)
            .write(at(base, 4120), b"12345678")
            .read(counter, &mut after);
        assert_eq!(batch.len(), 5);
        batch.submit().await.expect("mixed async batch");
        assert_eq!((faa_old, cas_ok, cas_fail), (10, 0, 1), "a batch's atomics run in order");
        assert_eq!(u64::from_le_bytes(after), 15, "a READ after an FAA in one batch sees the sum");
        assert!(ep.batch().submit().await.is_ok(), "an empty batch is a no-op");

        // Bad inputs: the sync face's errors, nothing posted, the endpoint still usable.
        let nodes = ep.nodes();
        let unknown = (0..=u16::MAX).map(NodeId).find(|id| nodes.iter().all(|n| n.id != *id)).expect("a free id");
        let nowhere = GlobalAddr::new(unknown, 64).expect("address");
        assert!(matches!(ep.read_u64(nowhere).await, Err(Error::UnknownNode { op: OpKind::Read, .. })));
        let node = nodes.iter().find(|n| n.id == base.node()).copied().expect("base node");
        let end = GlobalAddr::new(node.id, node.pool_size).expect("address");
        assert!(matches!(ep.write_u64(end, 1).await, Err(Error::OutOfRange { op: OpKind::Write, .. })));
        assert!(matches!(ep.cas(at(base, 4), 0, 1).await, Err(Error::Misaligned { op: OpKind::CompareSwap, .. })));
        assert!(matches!(ep.faa(at(base, 1), 1).await, Err(Error::Misaligned { op: OpKind::FetchAdd, .. })));
        let slot = ep.options().slot_bytes;
        let mut long = vec![0u8; slot + 1];
        assert!(
            matches!(ep.read(base, &mut long).await, Err(Error::TooLong { max, .. }) if max == slot as u64),
            "a copied READ longer than a slot"
        );
        let buf = ep.buffer(64).expect("buffer");
        let (r, buf) = ep.read_into(base, buf, 32..96).await;
        assert!(matches!(r, Err(Error::LocalRange { start: 32, end: 96, len: 64 })), "{r:?}");
        let (r, _buf) = ep.write_from(end, buf, 0..8).await;
        assert!(matches!(r, Err(Error::OutOfRange { .. })), "{r:?}");
        ep.write_u64(counter, 5).await.expect("write");
        let (mut a, mut b) = (0, 0);
        let mut batch = ep.batch();
        batch.faa(counter, 1, &mut a).faa(nowhere, 1, &mut b);
        assert!(batch.submit().await.is_err(), "a batch with a bad op");
        assert_eq!(ep.read_u64(counter).await.expect("read"), 5, "nothing in a refused batch took effect");
        let too_many = ep.options().slots as usize + 1;
        let mut words = vec![0u64; too_many];
        let mut batch = ep.batch();
        for w in words.iter_mut() {
            batch.faa(counter, 1, w);
        }
        assert!(matches!(batch.submit().await, Err(Error::TooManyOps { .. })), "a batch larger than the slots");
        assert_eq!(ep.faa(counter, 0).await.expect("FAA"), 5, "the endpoint is usable after every refusal");
    });
}

/// Thousands of futures in flight from one thread on one endpoint (far more than its slots):
/// `futures` fetch-and-adds of 1 to one word, and as many READs of words written before. The
/// sum is exact, the old values are all distinct, and every READ returns its word.
pub fn async_many_in_flight<T: Transport>(transport: &T, base: GlobalAddr, futures: usize)
where
    T::Endpoint: Submit,
{
    let ep = async_endpoint(transport);
    let word = at(base, 0);
    let table = at(base, 64);
    let words = (futures as u64).min((SCRATCH_BYTES - 64) / 8);
    block_on(async {
        ep.write_u64(word, 0).await.expect("init");
        let values: Vec<u8> = (0..words).flat_map(|i| (i * 0x9e37_79b9).to_le_bytes()).collect();
        for (i, chunk) in values.chunks(4096).enumerate() {
            ep.write(at(table, 4096 * i as u64), chunk).await.expect("fill");
        }
        let ep = &ep;
        let mut all: Vec<LocalFuture<'_, (u64, u64)>> = Vec::new();
        for i in 0..futures as u64 {
            all.push(Box::pin(async move {
                let old = ep.faa(word, 1).await.expect("FAA in flight");
                let k = i % words;
                (old, ep.read_u64(at(table, 8 * k)).await.expect("READ in flight") ^ (k * 0x9e37_79b9))
            }));
        }
        let outs = join_all(all).await;
        assert_eq!(ep.read_u64(word).await.expect("read"), futures as u64, "lost FAA among many in flight");
        let mut olds: Vec<u64> = outs.iter().map(|o| o.0).collect();
        olds.sort_unstable();
        assert!(olds.iter().copied().eq(0..futures as u64), "every FAA in flight saw a distinct old value");
        assert!(outs.iter().all(|o| o.1 == 0), "a READ in flight returned another word's value");
    });
}

/// Futures dropped at every stage (before their first poll, queued and not posted, posted and
/// in flight, with borrowed or moved-in memory) leave the endpoint consistent: no slot is lost
/// (more operations than slots succeed afterwards), a dropped READ never writes into the memory
/// it borrowed, and the memory can be reused at once.
pub fn async_cancellation<T: Transport>(transport: &T, base: GlobalAddr, rounds: usize)
where
    T::Endpoint: Submit,
{
    let ep = AsyncEndpoint::with_options(
        transport.endpoint().expect("endpoint"),
        AsyncOptions { slots: 8, ..AsyncOptions::default() },
    )
    .expect("async endpoint");
    let noop = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(noop);
    let word = at(base, 0);
    block_on(ep.write(at(base, 64), &[0x5a; 4096])).expect("fill");
    block_on(ep.write_u64(word, 0)).expect("init");
    let mut added = 0u64;
    for round in 0..rounds {
        let mut dsts = vec![[0u8; 64]; 12];
        let buf = ep.buffer(1 << 16).expect("buffer");
        {
            let mut futs: Vec<LocalFuture<'_, ()>> = Vec::new();
            for dst in dsts.iter_mut() {
                futs.push(Box::pin(async { ep.read(at(base, 64), dst).await.expect("READ") }));
            }
            for _ in 0..4 {
                futs.push(Box::pin(async {
                    ep.faa(word, 1).await.expect("FAA");
                }));
            }
            futs.push(Box::pin(async {
                let _ = ep.read_into(at(base, 0), buf, 0..1 << 16).await;
            }));
            // Poll some of them 0, 1 or 2 times (not queued, queued, posted), then drop all.
            for (k, f) in futs.iter_mut().enumerate() {
                for _ in 0..(k + round) % 3 {
                    if f.as_mut().poll(&mut cx).is_ready() {
                        break;
                    }
                }
            }
        }
        // The READs were dropped: their destinations are ours again, and stay as we leave them.
        dsts.iter_mut().for_each(|d| d.fill(0xee));
        // More operations than slots: a lost slot would leave one waiting for ever.
        for _ in 0..20 {
            added += 1;
            block_on(ep.faa(word, 1)).expect("FAA after cancellation");
        }
        assert!(dsts.iter().all(|d| d.iter().all(|&b| b == 0xee)), "a dropped READ wrote into its memory");
    }
    let now = block_on(ep.read_u64(word)).expect("read");
    assert!(now >= added && now <= added + 4 * rounds as u64, "FAAs after cancellation lost: {now} < {added}");
}

/// Every check above, in order, on one scratch area.
pub fn all<T: Transport>(transport: &T, base: GlobalAddr) {
    read_write(transport, base);
    atomics(transport, base);
    batch_mixing_all_ops(transport, base);
    write_behind(transport, base);
    bad_inputs(transport, base);
    concurrent_faa(transport, base, 4, 500);
    concurrent_cas(transport, base, 4, 200);
}

/// The async face's checks, in order, on one scratch area.
pub fn all_async<T: Transport>(transport: &T, base: GlobalAddr)
where
    T::Endpoint: Submit,
{
    async_semantics(transport, base);
    async_many_in_flight(transport, base, 4096);
    async_cancellation(transport, base, 30);
}
