//! A parallel histogram: lock-heavy read-modify-writes on one shared page.
//!
//! One shared allocation holds `buckets` counts (`u64`) and then a total (`u64`). Every rank
//! draws `values_per_rank` deterministic pseudo-random values ([`value`]) and counts them
//! locally, `batch` values at a time. After each batch it adds its counts into the shared
//! buckets: for each lock group `g` in `0..locks` that the batch touched, `lock(g)`, then
//! get-add-set every bucket `b` with `b % locks == g`, then `unlock(g)`; and it adds the batch's
//! size to the total under lock 0. Barrier at the end.
//!
//! All buckets and the total share a page or two, written under different locks: the diffs and
//! write notices must keep every rank's updates (a lost update shows up as a count that is too
//! low). Invariants rank 0 checks after the barrier:
//! `bucket[b] == number of values v of all ranks with v % buckets == b` for every `b`, and
//! `total == sum(bucket) == ranks * values_per_rank`.

use std::time::Instant;

use crate::Outcome;
use rdmem_coherence::dsm::{Dsm, DsmError, SharedAddr};
use rdmem_core::Transport;

/// Sizes of the histogram and of the work.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Buckets (at least 1; 0 counts as 1).
    pub buckets: usize,
    /// Values each rank draws.
    pub values_per_rank: usize,
    /// Values counted locally between two rounds of shared updates (at least 1; 0 counts as 1).
    pub batch: usize,
    /// Lock groups: bucket `b` is updated under DSM lock `b % locks` (1 to the DSM's lock count;
    /// 0 counts as 1).
    pub locks: usize,
    /// Seeds the values.
    pub seed: u64,
}

impl Default for Params {
    /// 64 buckets, 512 values per rank in batches of 64, 8 locks: per rank 8 batches of up to
    /// 9 lock-unlock pairs (the groups, and lock 0 again for the total).
    fn default() -> Self {
        Params { buckets: 64, values_per_rank: 512, batch: 64, locks: 8, seed: 0x5eed }
    }
}

/// The `i`-th value of `rank` (splitmix64 of the seed, rank and index).
pub fn value(seed: u64, rank: u32, i: usize) -> u64 {
    let mut z = seed.wrapping_add((((rank as u64) << 32) | i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Runs the histogram on every rank; rank 0 checks every bucket and the total against the
/// sequential histogram of all ranks' values. See the module docs.
pub fn run<T: Transport>(dsm: &Dsm<T>, params: &Params) -> Result<Outcome, DsmError> {
    let (buckets, batch, locks) = (params.buckets.max(1), params.batch.max(1), params.locks.max(1));
    let shared = dsm.alloc((buckets as u64 + 1) * 8)?;
    let bucket_at = |b: usize| shared.byte_add(b as u64 * 8);
    let total_at = bucket_at(buckets);
    dsm.barrier()?;
    let start = Instant::now();

    let indices: Vec<usize> = (0..params.values_per_rank).collect();
    let mut counts = vec![0u64; buckets];
    for chunk in indices.chunks(batch) {
        counts.fill(0);
        for &i in chunk {
            counts[(value(params.seed, dsm.rank(), i) % buckets as u64) as usize] += 1;
        }
        for group in 0..locks {
            let touched: Vec<usize> = (group..buckets).step_by(locks).filter(|&b| counts[b] > 0).collect();
            if touched.is_empty() {
                continue;
            }
            with_lock(dsm, group as u64, || touched.iter().try_for_each(|&b| add(dsm, bucket_at(b), counts[b])))?;
        }
        with_lock(dsm, 0, || add(dsm, total_at, chunk.len() as u64))?;
    }
    dsm.barrier()?;
    let seconds = start.elapsed().as_secs_f64();
    if dsm.rank() != 0 {
        return Ok(Outcome::unchecked(seconds));
    }

    let mut got = vec![0u64; buckets + 1];
    dsm.read_slice(shared, &mut got)?;
    let total = got.pop().expect("the total follows the buckets");
    let mut expected = vec![0u64; buckets];
    for rank in 0..dsm.size() {
        for i in 0..params.values_per_rank {
            expected[(value(params.seed, rank, i) % buckets as u64) as usize] += 1;
        }
    }
    let expected_total = dsm.size() as u64 * params.values_per_rank as u64;
    let differ: Vec<usize> = (0..buckets).filter(|&b| got[b] != expected[b]).collect();
    let passed = differ.is_empty() && total == expected_total;
    let detail = match differ.first() {
        None if passed => format!("{buckets} buckets over {locks} locks: every bucket and the total ({total}) exact"),
        None => format!("every bucket exact, but the total is {total}, expected {expected_total}"),
        Some(&b) => format!(
            "{} of {buckets} buckets wrong (counted {} of {expected_total} values); first bucket {b}: {} vs {} expected; total {total}",
            differ.len(),
            got.iter().sum::<u64>(),
            got[b],
            expected[b]
        ),
    };
    Ok(Outcome { check_passed: passed, detail, seconds })
}

/// Adds `n` to the count at `addr` (the caller holds its lock).
fn add<T: Transport>(dsm: &Dsm<T>, addr: SharedAddr, n: u64) -> Result<(), DsmError> {
    let count: u64 = dsm.get(addr)?;
    dsm.set(addr, &(count + n))
}

/// Runs `f` holding lock `id`, and releases it even when `f` fails (the first error wins).
fn with_lock<T: Transport>(dsm: &Dsm<T>, id: u64, f: impl FnOnce() -> Result<(), DsmError>) -> Result<(), DsmError> {
    dsm.lock(id)?;
    let result = f();
    let released = dsm.unlock(id);
    result.and(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_differ_by_rank_and_index_and_spread_over_buckets() {
        assert_ne!(value(1, 0, 1), value(1, 1, 0));
        assert_ne!(value(1, 0, 0), value(2, 0, 0));
        let mut counts = [0u32; 64];
        for i in 0..6400 {
            counts[(value(7, 3, i) % 64) as usize] += 1;
        }
        // 100 expected per bucket.
        assert!(counts.iter().all(|&c| (50..150).contains(&c)), "{counts:?}");
    }
}
