//! The semantics every [`Transport`] must have, as reusable checks (feature `conformance`).
//!
//! The loopback transport's tests and the RDMA transport's device tests call the same functions,
//! so both transports are held to one definition of READ, WRITE, compare-and-swap, fetch-and-add,
//! batches and errors. Each check panics with a message on the first violation. Each takes the
//! address of a scratch area (at least [`SCRATCH_BYTES`], 8-byte aligned, on a node the
//! transport reaches) that it may overwrite.

use std::sync::Barrier;

use crate::addr::{GlobalAddr, NodeId};
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
