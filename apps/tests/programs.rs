//! The application kernels (SOR, matrix product, histogram) on the loopback transport: 1 and 3
//! ranks as threads of this process, each with its own `Dsm` (its own page cache, as separate
//! processes would have) over one transport with two memory nodes. Rank 0's check compares the
//! shared result with a sequential run, cell by cell or bucket by bucket.
//!
//! The small sizes are chosen so rows do not fill whole pages: neighbouring ranks' bands share
//! pages, which exercises diffs and write notices, not just page ownership.

use std::sync::{Arc, mpsc};
use std::time::Duration;

use rdmem_apps::{CHECKED_BY_RANK_0, Outcome, histogram, matmul, sor};
use rdmem_coherence::dsm::{Dsm, DsmError, DsmOptions};
use rdmem_core::LoopbackTransport;

/// A job that takes longer has hung (a rank failed and the others wait at a barrier).
const TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `kernel` on ranks `0..size` (threads: join, run, leave) and returns each rank's outcome.
/// A rank error fails the test; a job still running after [`TIMEOUT`] aborts the process with
/// what the ranks reported so far (the scope would otherwise wait forever).
fn run_job<F>(size: u32, kernel: F) -> Vec<Outcome>
where
    F: Fn(&Dsm<LoopbackTransport>) -> Result<Outcome, DsmError> + Sync,
{
    let transport = Arc::new(LoopbackTransport::new(&[64 << 20, 64 << 20]));
    let (tx, rx) = mpsc::channel();
    let mut results: Vec<Option<Result<Outcome, DsmError>>> = (0..size).map(|_| None).collect();
    std::thread::scope(|s| {
        // All ranks start together: `join_with` waits at a barrier for every rank.
        for rank in 0..size {
            let (transport, tx, kernel) = (transport.clone(), tx.clone(), &kernel);
            s.spawn(move || {
                let result = Dsm::join_with(transport, DsmOptions::new(rank, size)).and_then(|dsm| {
                    let outcome = kernel(&dsm)?;
                    dsm.leave()?;
                    Ok(outcome)
                });
                tx.send((rank, result)).expect("the test waits for every rank");
            });
        }
        for _ in 0..size {
            match rx.recv_timeout(TIMEOUT) {
                Ok((rank, result)) => results[rank as usize] = Some(result),
                Err(_) => {
                    eprintln!("job of {size} ranks still running after {TIMEOUT:?}; results so far: {results:?}");
                    std::process::abort();
                }
            }
        }
    });
    results
        .into_iter()
        .enumerate()
        .map(|(rank, r)| match r.expect("every rank reported") {
            Ok(outcome) => outcome,
            Err(e) => panic!("rank {rank} of {size} failed: {e}"),
        })
        .collect()
}

/// Rank 0 checked and passed; the others left the check to it.
fn assert_passed(program: &str, size: u32, outcomes: &[Outcome]) {
    assert_eq!(outcomes.len(), size as usize);
    let root = &outcomes[0];
    assert!(root.check_passed, "{program} with {size} ranks: {}", root.detail);
    assert_ne!(root.detail, CHECKED_BY_RANK_0);
    for (rank, o) in outcomes.iter().enumerate().skip(1) {
        assert!(o.check_passed && o.detail == CHECKED_BY_RANK_0, "{program} rank {rank}: {o:?}");
    }
    eprintln!("{}", root.report(program, "-", size));
}

/// 50 x 40: rows of 320 bytes, 4 pages; with 3 ranks, bands of 16 rows whose edges share pages.
fn sor_params() -> sor::Params {
    sor::Params { rows: 50, cols: 40, iterations: 6, ..Default::default() }
}

#[test]
fn sor_one_rank() {
    let params = sor_params();
    assert_passed("sor", 1, &run_job(1, |dsm| sor::run(dsm, &params)));
}

#[test]
fn sor_three_ranks() {
    let params = sor_params();
    assert_passed("sor", 3, &run_job(3, |dsm| sor::run(dsm, &params)));
}

/// 40 x 40: 12.5 KiB per matrix, C's bands of 13-14 rows share pages.
fn matmul_params() -> matmul::Params {
    matmul::Params { n: 40 }
}

#[test]
fn matmul_one_rank() {
    let params = matmul_params();
    assert_passed("matmul", 1, &run_job(1, |dsm| matmul::run(dsm, &params)));
}

#[test]
fn matmul_three_ranks() {
    let params = matmul_params();
    assert_passed("matmul", 3, &run_job(3, |dsm| matmul::run(dsm, &params)));
}

/// 64 buckets over 8 locks on one page, 300 values per rank in batches of 32: 10 batches of up
/// to 9 lock-unlock pairs per rank.
fn histogram_params() -> histogram::Params {
    histogram::Params { buckets: 64, values_per_rank: 300, batch: 32, locks: 8, ..Default::default() }
}

#[test]
fn histogram_one_rank() {
    let params = histogram_params();
    assert_passed("histogram", 1, &run_job(1, |dsm| histogram::run(dsm, &params)));
}

#[test]
fn histogram_three_ranks() {
    let params = histogram_params();
    assert_passed("histogram", 3, &run_job(3, |dsm| histogram::run(dsm, &params)));
}
