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
use rdmem_core::{LoopbackTransport, Transport};

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
    run_ranks(&transport, size, |rank| DsmOptions::new(rank, size), kernel)
        .into_iter()
        .enumerate()
        .map(|(rank, r)| match r {
            Ok(outcome) => outcome,
            Err(e) => panic!("rank {rank} of {size} failed: {e}"),
        })
        .collect()
}

/// Runs `kernel` on ranks `0..size` over `transport` (threads: join with `options(rank)`, run,
/// leave); each rank's result, a panic in `kernel` (a crash) as an error.
fn run_ranks<F>(
    transport: &Arc<LoopbackTransport>,
    size: u32,
    options: impl Fn(u32) -> DsmOptions + Sync,
    kernel: F,
) -> Vec<Result<Outcome, DsmError>>
where
    F: Fn(&Dsm<LoopbackTransport>) -> Result<Outcome, DsmError> + Sync,
{
    let (tx, rx) = mpsc::channel();
    let mut results: Vec<Option<Result<Outcome, DsmError>>> = (0..size).map(|_| None).collect();
    std::thread::scope(|s| {
        // All ranks start together: `join_with` waits at a barrier for every rank.
        for rank in 0..size {
            let (transport, tx, kernel, options) = (transport.clone(), tx.clone(), &kernel, &options);
            s.spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| {
                    Dsm::join_with(transport, options(rank)).and_then(|dsm| {
                        let outcome = kernel(&dsm)?;
                        dsm.leave()?;
                        Ok(outcome)
                    })
                });
                let result = std::panic::catch_unwind(run)
                    .unwrap_or_else(|_| Err(DsmError::BadOptions(format!("rank {rank} crashed (panicked)"))));
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
    results.into_iter().map(|r| r.expect("every rank reported")).collect()
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

/// A short lease, so that a resume sees the crashed job's heartbeat stand still quickly.
fn quick(rank: u32, size: u32, resume: bool) -> DsmOptions {
    DsmOptions {
        lease: Duration::from_millis(300),
        resume,
        barrier_timeout: Duration::from_secs(20),
        ..DsmOptions::new(rank, size)
    }
}

#[test]
fn sor_resumed_from_its_checkpoint_after_every_rank_crashed_matches_the_sequential_run() {
    let params = sor::Params { rows: 50, cols: 40, iterations: 9, checkpoint_every: Some(3), ..Default::default() };
    let transport = Arc::new(LoopbackTransport::new(&[16 << 20, 16 << 20]));
    // Every rank crashes in iteration 7, its red phase done: checkpoints after 3 and 6.
    let crashed = run_ranks(
        &transport,
        3,
        |r| quick(r, 3, false),
        |dsm| sor::run_with(dsm, &params, |e| assert_ne!(e, sor::Event::Midway(7), "crash")),
    );
    assert!(crashed.iter().all(|r| r.is_err()), "{crashed:?}");
    let newest: Vec<u64> = (0..2).map(|n| transport.newest_checkpoint(rdmem_core::NodeId(n)).unwrap()).collect();
    assert_eq!(newest[0], newest[1], "one sequence number on every node");
    let restored = Arc::new(transport.restart_from(&newest).unwrap());
    let outcomes = run_ranks(
        &restored,
        3,
        |r| quick(r, 3, true),
        |dsm| {
            if dsm.rank() == 0 {
                // The crashed processes' allocators are dead: reclaiming them must leave the
                // resumed job's memory alone (taken over at the resume, before any alloc).
                let lease = Duration::from_millis(300);
                let reclaimer = rdmem_allocator::Allocator::new(
                    Arc::clone(&restored),
                    rdmem_allocator::AllocatorOptions { lease, ..Default::default() },
                )
                .unwrap();
                let done = reclaimer.reclaim_dead_clients_now().unwrap();
                assert_eq!(done.clients.len(), 6, "three ranks' two allocators each: {done:?}");
            }
            sor::run(dsm, &params)
        },
    );
    let outcomes: Vec<Outcome> = outcomes.into_iter().map(|r| r.unwrap_or_else(|e| panic!("{e}"))).collect();
    assert_passed("sor resumed", 3, &outcomes);
    let resumed = format!("resumed from checkpoint {} after iteration 6", newest[0]);
    assert!(outcomes[0].detail.contains(&resumed), "{}", outcomes[0].detail);
}

#[test]
fn a_resume_that_cannot_work_says_why() {
    let params = sor::Params { rows: 20, cols: 20, iterations: 4, checkpoint_every: Some(2), ..Default::default() };
    let resume_error = |t: &Arc<LoopbackTransport>, size: u32| {
        let results = run_ranks(t, size, |r| quick(r, size, true), |dsm| sor::run(dsm, &params));
        match results.into_iter().next().expect("a rank") {
            Err(DsmError::Resume(why)) => why,
            other => panic!("{other:?}"),
        }
    };
    // Nothing on the memory nodes.
    let empty = Arc::new(LoopbackTransport::new(&[16 << 20, 16 << 20]));
    assert!(resume_error(&empty, 1).contains("no DSM job"));
    // A job that never checkpointed (it crashed before its first).
    let never = Arc::new(LoopbackTransport::new(&[16 << 20, 16 << 20]));
    let _ = run_ranks(&never, 1, |r| quick(r, 1, false), |dsm| sor::run_with(dsm, &params, |_| panic!("crash")));
    assert!(resume_error(&never, 1).contains("never took a checkpoint"));
    // Two checkpoints; nodes restored from different ones, or with another job size.
    let two = Arc::new(LoopbackTransport::new(&[16 << 20, 16 << 20]));
    let _ = run_ranks(
        &two,
        1,
        |r| quick(r, 1, false),
        |dsm| {
            sor::run_with(dsm, &sor::Params { iterations: 6, ..params.clone() }, |e| {
                assert_ne!(e, sor::Event::Midway(5), "crash")
            })
        },
    );
    let newest = two.newest_checkpoint(rdmem_core::NodeId(0)).unwrap();
    let mixed = Arc::new(two.restart_from(&[newest, newest - 1]).unwrap());
    let why = resume_error(&mixed, 1);
    assert!(
        why.contains("memory node 1 holds checkpoint") && why.contains(&format!("--restore-seq {newest}")),
        "{why}"
    );
    let other_size = Arc::new(two.restart_from(&[newest, newest]).unwrap());
    assert!(resume_error(&other_size, 2).contains("has 1 ranks, not 2"));
    // A snapshot taken after the checkpoint, while the job ran on (as a periodic one is).
    let later: Vec<u64> = (0..2).map(|n| two.checkpoint(rdmem_core::NodeId(n), None, false).unwrap().seq).collect();
    let fuzzy = Arc::new(two.restart_from(&later).unwrap());
    let why = resume_error(&fuzzy, 1);
    assert!(why.contains(&format!("a snapshot taken after checkpoint {newest}")), "{why}");
}
