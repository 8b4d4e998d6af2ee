//! Snapshots taken and restored on the host's file system: byte-identical round trips, the
//! size of incremental snapshots, damage found and skipped, sequence numbers, pruning.

use std::fs;
use std::path::Path;

use proptest::prelude::*;
use rdmem_checkpoint::{CheckpointError, Checkpointer, Kind, MAX_CHAIN, Take, file_name, restore};

const BLOCK: usize = 4096;

/// A pool of `blocks` blocks plus a short tail, every fourth block zeros, the rest patterned.
fn pool(blocks: usize, salt: u8) -> Vec<u8> {
    let mut p = vec![0u8; blocks * BLOCK + 100];
    for (i, b) in p.iter_mut().enumerate() {
        if (i / BLOCK) % 4 != 3 {
            *b = (i as u8).wrapping_mul(31).wrapping_add(salt) | 1;
        }
    }
    p
}

fn open(dir: &Path, pool: &[u8]) -> Checkpointer {
    Checkpointer::open(dir, pool.len() as u64, BLOCK, None).unwrap()
}

#[test]
fn a_full_snapshot_restores_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(40, 7);
    let mut cp = open(dir.path(), &p);
    let r = cp.checkpoint(&p, Take::default()).unwrap();
    assert_eq!((r.seq, r.kind, r.parent), (1, Kind::Full, None));
    assert_eq!((r.data_blocks, r.zero_blocks), (31, 10), "every fourth block of 41 is zeros");
    assert!(r.file.ends_with(file_name(1)));
    let mut back = vec![0xeeu8; p.len()];
    let restored = restore(dir.path(), &mut back, None).unwrap();
    assert_eq!((restored.seq, restored.chain.as_slice()), (1, &[1][..]));
    assert!(restored.skipped.is_empty());
    assert!(back == p, "restored pool differs");
}

#[test]
fn an_incremental_snapshot_writes_only_the_changed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(1000, 1);
    let mut cp = open(dir.path(), &p);
    let full = cp.checkpoint(&p, Take::default()).unwrap();
    // 1 % of the blocks change (10 of 1000), one byte each.
    for k in 0..10 {
        p[k * 100 * BLOCK + 17] ^= 0x55;
    }
    let inc = cp.checkpoint(&p, Take::default()).unwrap();
    assert_eq!((inc.seq, inc.kind, inc.parent, inc.data_blocks), (2, Kind::Incremental, Some(1), 10));
    let ratio = inc.bytes as f64 / full.bytes as f64;
    assert!(ratio < 0.02 && inc.bytes > 10 * BLOCK as u64, "incremental is {ratio:.4} of the full one");
    // Nothing changed: an incremental snapshot of nothing.
    let none = cp.checkpoint(&p, Take::default()).unwrap();
    assert_eq!((none.data_blocks, none.zero_blocks), (0, 0));
    let mut back = vec![0u8; p.len()];
    let restored = restore(dir.path(), &mut back, None).unwrap();
    assert_eq!(restored.chain, vec![1, 2, 3]);
    assert!(back == p);
}

#[test]
fn a_block_that_becomes_zeros_is_restored_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(8, 3);
    let mut cp = open(dir.path(), &p);
    cp.checkpoint(&p, Take::default()).unwrap();
    p[..BLOCK].fill(0);
    let inc = cp.checkpoint(&p, Take::default()).unwrap();
    assert_eq!((inc.data_blocks, inc.zero_blocks), (0, 1));
    let mut back = vec![9u8; p.len()];
    restore(dir.path(), &mut back, None).unwrap();
    assert!(back == p);
}

#[test]
fn any_snapshot_of_a_chain_can_be_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(16, 0);
    let mut cp = open(dir.path(), &p);
    let mut states = Vec::new();
    for k in 0..5 {
        p[k * 3 * BLOCK] = k as u8 + 100;
        cp.checkpoint(&p, Take::default()).unwrap();
        states.push(p.clone());
    }
    for (k, want) in states.iter().enumerate() {
        let mut back = vec![0u8; p.len()];
        let r = restore(dir.path(), &mut back, Some(k as u64 + 1)).unwrap();
        assert_eq!(r.seq, k as u64 + 1);
        assert!(&back == want, "snapshot {}", k + 1);
    }
    let e = restore(dir.path(), &mut vec![0u8; p.len()], Some(9)).unwrap_err();
    assert!(e.to_string().contains("snapshot 9 is not in"), "{e}");
}

#[test]
fn a_corrupt_block_is_named_and_the_previous_snapshot_restored() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(20, 5);
    let mut cp = open(dir.path(), &p);
    cp.checkpoint(&p, Take::default()).unwrap();
    let good = p.clone();
    p[5 * BLOCK + 1] ^= 1;
    let inc = cp.checkpoint(&p, Take::default()).unwrap();
    // Flip a byte of the incremental snapshot's only data block.
    let mut bytes = fs::read(&inc.file).unwrap();
    bytes[64 + 10] ^= 0x80;
    fs::write(&inc.file, &bytes).unwrap();
    let mut back = vec![0u8; p.len()];
    let r = restore(dir.path(), &mut back, None).unwrap();
    assert_eq!(r.seq, 1, "the previous snapshot");
    assert!(back == good);
    assert_eq!(r.skipped.len(), 1);
    let reason = &r.skipped[0].reason;
    let msg = reason.to_string();
    assert!(msg.contains(&file_name(2)) && msg.contains("block 5 ") && msg.contains("checksum"), "{msg}");
    assert!(matches!(reason, CheckpointError::Corrupt { block: Some(5), .. }), "{reason:?}");
    // Asked for by number, the damaged one is an error, not a fallback.
    let e = restore(dir.path(), &mut back, Some(2)).unwrap_err();
    assert!(e.to_string().contains("block 5 "), "{e}");
}

#[test]
fn torn_and_damaged_files_are_refused_whatever_byte_is_hit() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(6, 9);
    let mut cp = open(dir.path(), &p);
    let r = cp.checkpoint(&p, Take::default()).unwrap();
    let bytes = fs::read(&r.file).unwrap();
    // Every byte of header, table and footer, and a sample of the data.
    let positions = (0..bytes.len()).filter(|&i| i < 64 || i >= bytes.len() - 200 || i % 997 == 0);
    for at in positions {
        let mut bad = bytes.clone();
        bad[at] ^= 0x04;
        fs::write(&r.file, &bad).unwrap();
        let e = restore(dir.path(), &mut vec![0u8; p.len()], None).unwrap_err();
        assert!(matches!(e, CheckpointError::NoSnapshot { .. }), "byte {at}: {e}");
        assert!(e.to_string().contains(&file_name(1)), "byte {at}: {e}");
    }
    for len in [0, 10, 64, 100, bytes.len() - 1] {
        fs::write(&r.file, &bytes[..len]).unwrap();
        let e = restore(dir.path(), &mut vec![0u8; p.len()], None).unwrap_err();
        assert!(e.to_string().contains(&file_name(1)), "torn at {len}: {e}");
    }
}

#[test]
fn a_missing_parent_or_another_pool_size_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(6, 2);
    let mut cp = open(dir.path(), &p);
    cp.checkpoint(&p, Take::default()).unwrap();
    p[0] ^= 1;
    cp.checkpoint(&p, Take::default()).unwrap();
    let e = restore(dir.path(), &mut vec![0u8; p.len() + 4096], None).unwrap_err();
    assert!(e.to_string().contains("this pool is"), "{e}");
    fs::remove_file(dir.path().join(file_name(1))).unwrap();
    let e = restore(dir.path(), &mut vec![0u8; p.len()], None).unwrap_err();
    assert!(e.to_string().contains("its parent, snapshot 1, is missing"), "{e}");
    let e = restore(tempfile::tempdir().unwrap().path(), &mut [0u8; 10], None).unwrap_err();
    assert!(e.to_string().starts_with("no complete snapshot"), "{e}");
}

#[test]
fn sequence_numbers_only_grow_and_can_be_given() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(4, 4);
    let mut cp = open(dir.path(), &p);
    assert_eq!(cp.checkpoint(&p, Take { seq: Some(10), full: false }).unwrap().seq, 10);
    assert_eq!(cp.checkpoint(&p, Take::default()).unwrap().seq, 11);
    for asked in [11, 3] {
        let e = cp.checkpoint(&p, Take { seq: Some(asked), full: false }).unwrap_err();
        assert!(matches!(e, CheckpointError::Sequence { newest: 11, .. }), "{e}");
    }
    // A new checkpointer on the same directory goes on from the newest.
    let mut again = open(dir.path(), &p);
    assert_eq!(again.newest(), 11);
    let r = again.checkpoint(&p, Take::default()).unwrap();
    assert_eq!((r.seq, r.kind), (12, Kind::Full), "nothing restored: full");
    let e = cp.checkpoint(&p[1..], Take::default()).unwrap_err();
    assert!(e.to_string().contains("bytes"), "{e}");
}

#[test]
fn after_a_restore_snapshots_go_on_incrementally_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(10, 6);
    let mut cp = open(dir.path(), &p);
    cp.checkpoint(&p, Take::default()).unwrap();
    p[BLOCK * 2] ^= 1;
    cp.checkpoint(&p, Take::default()).unwrap();
    drop(cp);
    let mut back = vec![0u8; p.len()];
    let restored = restore(dir.path(), &mut back, None).unwrap();
    let mut cp = Checkpointer::open(dir.path(), p.len() as u64, BLOCK, Some(&restored)).unwrap();
    back[BLOCK * 7] ^= 1;
    let r = cp.checkpoint(&back, Take::default()).unwrap();
    assert_eq!((r.seq, r.kind, r.parent, r.data_blocks), (3, Kind::Incremental, Some(2), 1));
    let mut again = vec![0u8; p.len()];
    assert_eq!(restore(dir.path(), &mut again, None).unwrap().chain, vec![1, 2, 3]);
    assert!(again == back);
    // Another block size: the next one is full.
    let mut cp = Checkpointer::open(dir.path(), p.len() as u64, 2 * BLOCK, Some(&restored)).unwrap();
    assert_eq!(cp.checkpoint(&back, Take::default()).unwrap().kind, Kind::Full);
}

#[test]
fn chains_are_bounded_and_two_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(4, 8);
    let mut cp = open(dir.path(), &p);
    let mut fulls = Vec::new();
    for k in 0..(3 * (MAX_CHAIN as usize + 1)) {
        let n = p.len();
        p[k % n] ^= 1;
        let r = cp.checkpoint(&p, Take::default()).unwrap();
        if r.kind == Kind::Full {
            fulls.push(r.seq);
        }
    }
    assert_eq!(fulls, vec![1, MAX_CHAIN as u64 + 2, 2 * MAX_CHAIN as u64 + 3]);
    let mut left: Vec<String> =
        fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left.first().unwrap(), &file_name(fulls[1]), "the first chain is gone");
    assert_eq!(left.len(), 2 * (MAX_CHAIN as usize + 1));
    let forced = cp.checkpoint(&p, Take { seq: None, full: true }).unwrap();
    assert_eq!(forced.kind, Kind::Full);
}

#[test]
fn a_leftover_temporary_file_is_removed_and_bad_settings_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join(format!(".{}.tmp", file_name(1)));
    fs::write(&tmp, b"half a snapshot").unwrap();
    let _cp = Checkpointer::open(dir.path(), 4096, BLOCK, None).unwrap();
    assert!(!tmp.exists());
    for bs in [0, 100, 4095, 6000] {
        assert!(Checkpointer::open(dir.path(), 4096, bs, None).is_err(), "block size {bs}");
    }
    assert!(Checkpointer::open(dir.path(), 0, BLOCK, None).is_err());
    let file = dir.path().join("a-file");
    fs::write(&file, b"").unwrap();
    let e = Checkpointer::open(&file, 4096, BLOCK, None).err().unwrap();
    assert!(e.to_string().contains("a-file"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Any mix of writes, zeroings and snapshots (forced full now and then): each snapshot kept
    /// restores to the pool as it was when it was taken.
    #[test]
    fn every_snapshot_restores_the_pool_as_it_was(
        steps in proptest::collection::vec((0usize..9 * BLOCK, any::<u8>(), 0u8..6), 1..40)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut p = vec![0u8; 8 * BLOCK + 512];
        let mut cp = open(dir.path(), &p);
        let mut taken = Vec::new();
        for (at, value, what) in steps {
            let at = at % p.len();
            match what {
                0 => {
                    let r = cp.checkpoint(&p, Take::default()).unwrap();
                    taken.push((r.seq, p.clone()));
                }
                1 => {
                    let r = cp.checkpoint(&p, Take { seq: None, full: true }).unwrap();
                    taken.push((r.seq, p.clone()));
                }
                2 => {
                    let b = at / BLOCK * BLOCK;
                    let end = (b + BLOCK).min(p.len());
                    p[b..end].fill(0);
                }
                _ => p[at] = value,
            }
        }
        // Pruning keeps the last two chains: those snapshots are still there (the newest is).
        prop_assert!(taken.last().is_none_or(|(seq, _)| dir.path().join(file_name(*seq)).exists()));
        for (seq, want) in taken.iter().filter(|(seq, _)| dir.path().join(file_name(*seq)).exists()) {
            let mut back = vec![0x5au8; p.len()];
            restore(dir.path(), &mut back, Some(*seq)).unwrap();
            prop_assert!(&back == want, "snapshot {}", seq);
        }
    }
}

#[test]
fn a_snapshot_asked_for_by_number_outlives_any_number_of_periodic_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(4, 1);
    let mut cp = open(dir.path(), &p);
    cp.checkpoint(&p, Take::default()).unwrap();
    p[3] ^= 1;
    let pinned = cp.checkpoint(&p, Take { seq: Some(100), full: false }).unwrap();
    let at_pin = p.clone();
    for k in 0..(4 * (MAX_CHAIN as usize + 1)) {
        p[k % 64] ^= 1;
        cp.checkpoint(&p, Take::default()).unwrap();
    }
    let mut back = vec![0u8; p.len()];
    let r = restore(dir.path(), &mut back, Some(pinned.seq)).unwrap();
    assert_eq!(r.chain, vec![1, 100], "the pinned snapshot's chain is still there");
    assert!(back == at_pin);
}

#[test]
fn restoring_an_older_snapshot_sets_the_newer_ones_aside() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(4, 2);
    let mut cp = open(dir.path(), &p);
    let mut states = Vec::new();
    for k in 0..5 {
        p[k] ^= 1;
        cp.checkpoint(&p, Take::default()).unwrap();
        states.push(p.clone());
    }
    drop(cp);
    let mut back = vec![0u8; p.len()];
    let restored = restore(dir.path(), &mut back, Some(2)).unwrap();
    let mut cp = Checkpointer::open(dir.path(), p.len() as u64, BLOCK, Some(&restored)).unwrap();
    for seq in 3..=5 {
        assert!(!dir.path().join(file_name(seq)).exists(), "snapshot {seq} of the timeline given up");
        assert!(dir.path().join(format!("abandoned-{}", file_name(seq))).exists());
    }
    // The timeline goes on from 2; a restore of the newest never picks an abandoned one.
    back[0] ^= 0x40;
    let next = cp.checkpoint(&back, Take::default()).unwrap();
    assert_eq!((next.seq, next.parent), (3, Some(2)));
    let mut again = vec![0u8; p.len()];
    assert_eq!(restore(dir.path(), &mut again, None).unwrap().chain, vec![1, 2, 3]);
    assert!(again == back);
    cp.checkpoint(&back, Take { seq: None, full: true }).unwrap();
    let left = fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("abandoned-"));
    assert_eq!(left.count(), 0, "set-aside snapshots go at the next full one");
}

#[test]
fn a_renamed_file_or_a_sequence_number_at_the_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(4, 3);
    let mut cp = open(dir.path(), &p);
    cp.checkpoint(&p, Take::default()).unwrap();
    // Snapshot 1 under snapshot 7's name: its header says otherwise.
    fs::rename(dir.path().join(file_name(1)), dir.path().join(file_name(7))).unwrap();
    let e = restore(dir.path(), &mut vec![0u8; p.len()], None).unwrap_err();
    assert!(e.to_string().contains("its header says it is snapshot 1, its name 7"), "{e}");
    // A name that is not exactly a snapshot's is not one.
    fs::rename(dir.path().join(file_name(7)), dir.path().join("snapshot-1.rdmem")).unwrap();
    let e = restore(dir.path(), &mut vec![0u8; p.len()], None).unwrap_err();
    assert!(matches!(e, CheckpointError::NoSnapshot { ref skipped, .. } if skipped.is_empty()), "{e}");
    let e = cp.checkpoint(&p, Take { seq: Some(u64::MAX), full: false }).unwrap_err();
    assert!(matches!(e, CheckpointError::Sequence { .. }), "{e}");
}
