//! Device tier: a memory node's checkpoints. A pool filled over RDMA is checkpointed, the node
//! killed with SIGKILL and restarted with `--restore`, and reads back byte-identical; an
//! incremental snapshot after 1 % of the blocks changed writes about 1 % of the bytes; a
//! damaged snapshot is refused, or skipped for the previous one, with a message naming the file
//! and block; requests that cannot be served are refused with their reason. Ignored by plain
//! `cargo test`; runs in the Soft-RoCE VM with `soft-roce-setup/vm-run --device-tests`.

use std::io::Write;
use std::path::Path;

use rdmem_core::{Endpoint, Error, GlobalAddr, NodeId, Refusal, Transport};
use rdmem_transport_rdma::spawn::MemnodeChild;
use rdmem_transport_rdma::{DeviceSelection, RdmaOptions, RdmaTransport, control};

const TOKEN: &str = "checkpoint-test-token";
const POOL: usize = 32 << 20;
const BLOCK: usize = 16 << 10;
const CHUNK: usize = 256 << 10;

fn memnode(args: &[&str]) -> MemnodeChild {
    MemnodeChild::start("memnode", TOKEN, args).unwrap_or_else(|e| panic!("rdmem-memnode: {e}"))
}

/// A node with a 32 MiB pool snapshotting into `dir` in 16 KiB blocks, plus `more` flags.
fn checkpointing_memnode(dir: &Path, more: &[&str]) -> MemnodeChild {
    let dir = dir.to_str().unwrap();
    let mut args = vec!["--pool-size", "32M", "--checkpoint-dir", dir, "--checkpoint-block-size", "16K"];
    args.extend_from_slice(more);
    memnode(&args)
}

fn connect(node: &MemnodeChild) -> RdmaTransport {
    RdmaTransport::connect(RdmaOptions {
        memnodes: vec![node.addr().to_owned()],
        token: TOKEN.into(),
        device: DeviceSelection::from_env().expect("RDMEM_* variables"),
        ..Default::default()
    })
    .expect("connect")
}

/// The known contents: every 8-byte word a hash of its index (no two blocks alike, none zero).
fn pattern(len: usize, salt: u64) -> Vec<u8> {
    (0..len as u64 / 8)
        .flat_map(|i| {
            let mut x = (i ^ salt).wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x ^= x >> 31;
            (x | 1).to_le_bytes()
        })
        .collect()
}

fn addr(offset: usize) -> GlobalAddr {
    GlobalAddr::new(NodeId(0), offset as u64).unwrap()
}

fn write_all(ep: &mut impl Endpoint, data: &[u8]) {
    for (k, chunk) in data.chunks(CHUNK).enumerate() {
        ep.write(addr(k * CHUNK), chunk).unwrap();
    }
}

fn read_all(ep: &mut impl Endpoint, len: usize) -> Vec<u8> {
    let mut back = vec![0u8; len];
    for (k, chunk) in back.chunks_mut(CHUNK).enumerate() {
        ep.read(addr(k * CHUNK), chunk).unwrap();
    }
    back
}

/// The first offset where `a` and `b` differ, for a readable failure.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_checkpointed_pool_survives_sigkill_and_reads_back_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = checkpointing_memnode(dir.path(), &[]);
    let mut expected = pattern(POOL, 1);
    {
        let transport = connect(&node);
        let mut ep = transport.endpoint().unwrap();
        write_all(&mut ep, &expected);
        let full = transport.checkpoint(NodeId(0), None, false).unwrap();
        assert_eq!((full.node, full.seq, full.parent), (NodeId(0), 1, None));
        assert_eq!((full.data_blocks, full.zero_blocks), ((POOL / BLOCK) as u64, 0));
        assert_eq!(full.scanned, POOL as u64);
        // 1 % of the blocks change: 20 of 2048, one word in each.
        for k in 0..20 {
            let at = k * 100 * BLOCK + 8;
            expected[at..at + 8].copy_from_slice(&0xdead_beef_u64.to_le_bytes());
            ep.write_u64(addr(at), 0xdead_beef).unwrap();
        }
        let inc = transport.checkpoint(NodeId(0), None, false).unwrap();
        assert_eq!((inc.seq, inc.parent, inc.data_blocks), (2, Some(1), 20));
        let ratio = inc.bytes as f64 / full.bytes as f64;
        println!(
            "full: {} bytes in {:?}; incremental: {} bytes ({ratio:.4} of full) in {:?}",
            full.bytes, full.duration, inc.bytes, inc.duration
        );
        assert!(
            (0.009..0.011).contains(&ratio),
            "an incremental snapshot of 1 % of the blocks is {ratio:.4} of the full"
        );
    }
    node.kill(); // SIGKILL: no chance to write anything on the way out
    let dir_arg = dir.path().to_str().unwrap();
    let node = checkpointing_memnode(dir.path(), &["--restore", dir_arg]);
    let transport = connect(&node);
    let mut ep = transport.endpoint().unwrap();
    let back = read_all(&mut ep, POOL);
    assert!(back == expected, "restored pool differs first at byte {:?}", first_difference(&back, &expected));
    // The chain goes on from the restored snapshot: nothing changed, nothing written.
    let next = transport.checkpoint(NodeId(0), None, false).unwrap();
    assert_eq!((next.seq, next.parent, next.data_blocks), (3, Some(2), 0));
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_damaged_snapshot_is_named_and_refused_or_skipped_for_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = checkpointing_memnode(dir.path(), &[]);
    let first = pattern(1 << 20, 2);
    {
        let transport = connect(&node);
        let mut ep = transport.endpoint().unwrap();
        write_all(&mut ep, &first);
        assert_eq!(transport.checkpoint(NodeId(0), None, false).unwrap().seq, 1);
        ep.write_u64(addr(3 * BLOCK), 42).unwrap(); // block 3 changes
        let inc = transport.checkpoint(NodeId(0), None, false).unwrap();
        assert_eq!((inc.seq, inc.data_blocks), (2, 1));
    }
    node.kill();
    // Flip one byte of snapshot 2's one data block (right after the 64-byte header).
    let file = dir.path().join(rdmem_checkpoint::file_name(2));
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[64 + 100] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let name = rdmem_checkpoint::file_name(2);
    let dir_arg = dir.path().to_str().unwrap();
    // Asked for snapshot 2 by number: the node refuses to start, naming file and block.
    let refused =
        MemnodeChild::start("memnode", TOKEN, &["--pool-size", "32M", "--restore", dir_arg, "--restore-seq", "2"]);
    let e = refused.err().expect("a damaged snapshot asked for by number is refused").to_string();
    assert!(e.contains(&name) && e.contains("block 3 "), "{e}");
    // Asked for the newest: snapshot 1, with a warning naming file and block.
    let node = memnode(&["--pool-size", "32M", "--restore", dir_arg]);
    let warned = node.warnings().join("\n");
    assert!(warned.contains(&name) && warned.contains("block 3 "), "warnings: {warned}");
    let transport = connect(&node);
    let mut ep = transport.endpoint().unwrap();
    let back = read_all(&mut ep, 1 << 20);
    assert!(back == first, "snapshot 1 differs first at byte {:?}", first_difference(&back, &first));
    assert_eq!(ep.read_u64(addr(POOL - 8)).unwrap(), 0, "the rest of the pool is zeros");
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn checkpoint_requests_that_cannot_be_served_are_refused_with_their_reason() {
    // No --checkpoint-dir.
    let plain = memnode(&["--pool-size", "16M"]);
    let e = connect(&plain).checkpoint(NodeId(0), None, false).unwrap_err();
    assert!(matches!(&e, Error::Checkpoint { reason, .. } if reason.contains("--checkpoint-dir")), "{e}");
    assert!(
        connect(&plain).checkpoint(NodeId(5), None, false).unwrap_err().to_string().contains("no such memory node")
    );
    drop(plain);

    let dir = tempfile::tempdir().unwrap();
    let node = checkpointing_memnode(dir.path(), &[]);
    let e = control::checkpoint(node.addr(), "not-the-checkpoint-token", None, false).unwrap_err();
    assert!(matches!(&e, Error::Refused { refusal: Refusal::WrongToken, .. }), "{e}");
    assert!(matches!(control::checkpoint(node.addr(), TOKEN, Some(0), false), Err(Error::Config(_))));
    let transport = connect(&node);
    assert_eq!(transport.checkpoint(NodeId(0), Some(5), false).unwrap().seq, 5);
    for seq in [5, 4] {
        let e = transport.checkpoint(NodeId(0), Some(seq), false).unwrap_err();
        assert!(e.to_string().contains("is not above the newest snapshot's, 5"), "{e}");
    }
    // Garbage and half requests on the listener: refused, and the node goes on serving.
    for junk in [&b"RDMCTL\x01\x00\x00\x00\x09"[..], b"RDMCTL", b"RDMCTL\x07\x00", b"RDMEM\0\x01\x00\xff\xff"] {
        let mut s = std::net::TcpStream::connect(node.addr()).unwrap();
        s.write_all(junk).unwrap();
    }
    let full = transport.checkpoint(NodeId(0), None, true).unwrap();
    assert_eq!((full.seq, full.parent), (6, None));
    // Two clients asking at once: one after the other, each answered.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| control::checkpoint(node.addr(), TOKEN, None, false));
        let b = s.spawn(|| control::checkpoint(node.addr(), TOKEN, None, false));
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    let mut seqs = [a.seq, b.seq];
    seqs.sort();
    assert_eq!(seqs, [7, 8]);
    drop(transport);
    drop(node);
    // A restore into a pool of another size is refused at start, saying so.
    let dir_arg = dir.path().to_str().unwrap();
    let e = MemnodeChild::start("memnode", TOKEN, &["--pool-size", "16M", "--restore", dir_arg]).err().unwrap();
    assert!(e.to_string().contains("this pool is 16777216 bytes"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = MemnodeChild::start("memnode", TOKEN, &["--pool-size", "16M", "--restore", empty.path().to_str().unwrap()])
        .err()
        .unwrap();
    assert!(e.to_string().contains("no complete snapshot"), "{e}");
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn periodic_snapshots_while_a_client_writes_then_a_quiet_one_restores_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = checkpointing_memnode(dir.path(), &["--checkpoint-every", "200ms"]);
    let transport = connect(&node);
    let mut ep = transport.endpoint().unwrap();
    // Writes go on while fuzzy snapshots are taken underneath (many rounds).
    let mut expected = vec![0u8; 4 << 20];
    for round in 0..40u64 {
        let data = pattern(expected.len(), round);
        let at = (round as usize * 7 * BLOCK) % (expected.len() - CHUNK);
        expected[at..at + CHUNK].copy_from_slice(&data[..CHUNK]);
        ep.write(addr(at), &data[..CHUNK]).unwrap();
    }
    // Quiet now: the snapshot asked for is a consistent cut.
    let done = transport.checkpoint(NodeId(0), None, false).unwrap();
    println!("periodic snapshots before the requested one: {}", done.seq - 1);
    drop(ep);
    drop(transport);
    node.kill();
    let dir_arg = dir.path().to_str().unwrap();
    let node = memnode(&["--pool-size", "32M", "--restore", dir_arg, "--restore-seq", &done.seq.to_string()]);
    let transport = connect(&node);
    let mut ep = transport.endpoint().unwrap();
    let back = read_all(&mut ep, expected.len());
    assert!(back == expected, "restored pool differs first at byte {:?}", first_difference(&back, &expected));
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_checkpoint_asked_for_by_number_outlives_the_snapshots_asked_for_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let node = memnode(&["--pool-size", "16M", "--checkpoint-dir", dir.path().to_str().unwrap()]);
    let transport = connect(&node);
    let mut ep = transport.endpoint().unwrap();
    ep.write_u64(addr(0), 1).unwrap();
    let pinned = transport.checkpoint(NodeId(0), Some(5), false).unwrap();
    // Enough unnumbered snapshots (as periodic ones are) for three full ones after it.
    for k in 0..3 * (rdmem_checkpoint::MAX_CHAIN as u64 + 1) {
        ep.write_u64(addr(8), k).unwrap();
        transport.checkpoint(NodeId(0), None, false).unwrap();
    }
    let mut back = vec![0u8; 16 << 20];
    let restored = rdmem_checkpoint::restore(dir.path(), &mut back, Some(pinned.seq))
        .unwrap_or_else(|e| panic!("the pinned snapshot {} is gone: {e}", pinned.seq));
    assert_eq!(restored.chain.last(), Some(&5));
    assert_eq!(u64::from_le_bytes(back[..8].try_into().unwrap()), 1);
}
