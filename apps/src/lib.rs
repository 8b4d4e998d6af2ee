//! Application kernels on the DSM ([`rdmem_coherence::dsm::Dsm`]), in the spirit of the JIAJIA and
//! TreadMarks suites: each one computes in shared memory, then rank 0 checks the result against
//! the same computation done sequentially in local memory.
//!
//! | kernel          | sharing                                   | synchronization                    |
//! |-----------------|-------------------------------------------|------------------------------------|
//! | [`sor`]         | row bands, neighbours' edge rows          | 2 barriers per iteration           |
//! | [`matmul`]      | A and B read by all, C written in bands   | 2 barriers                         |
//! | [`histogram`]   | buckets of one page, read-modify-write    | a lock per batch and lock group    |
//!
//! Every kernel is `run(&dsm, &params) -> Result<Outcome, DsmError>`, called by every rank with
//! the same params (its allocations are collective). The time in [`Outcome::seconds`] runs from
//! the end of the first barrier after initialization to the end of the last barrier of the
//! computation; rank 0's sequential check is not timed. Ranks other than 0 report
//! `check_passed = true` with the detail [`CHECKED_BY_RANK_0`].
//!
//! The programs are in `apps/examples/`: `sor`, `matmul` and `histogram` (each a thin command
//! line around its kernel, started with `rdmem-run -n N`), and `litmus`, the scope-consistency
//! litmus tests. `tests/programs.rs` runs the kernels on the loopback transport (ranks as
//! threads), `tests/device_apps.rs` runs the programs across processes over rxe, and
//! `tests/cluster_apps.rs` with one rank per machine.
//!
//! The defaults keep the shared data to a few hundred KiB at most and the synchronizations to a
//! few dozen per rank, so a run of 4 ranks stays well under 20 s on an emulated device where a
//! remote operation costs ~25-40 µs and a page miss ~80 µs.

pub mod histogram;
pub mod matmul;
pub mod sor;

use std::ops::Range;
use std::process::ExitCode;

use rdmem_coherence::dsm::{Dsm, DsmError, DsmOptions};

/// The detail that ranks other than 0 report: only rank 0 checks.
pub const CHECKED_BY_RANK_0: &str = "checked by rank 0";

/// What a kernel run produced on this rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Rank 0: the shared result equals the sequential one. Other ranks: always true.
    pub check_passed: bool,
    /// Rank 0: what was compared, or where the first difference is. Others: [`CHECKED_BY_RANK_0`].
    pub detail: String,
    /// Seconds from the end of the first barrier to the end of the computation's last barrier.
    pub seconds: f64,
}

impl Outcome {
    /// The outcome of a rank that does not check.
    pub(crate) fn unchecked(seconds: f64) -> Outcome {
        Outcome { check_passed: true, detail: CHECKED_BY_RANK_0.into(), seconds }
    }

    /// The line the example programs print:
    /// `<program>: n=<n> ranks=<ranks> time=<seconds> s check=passed|FAILED (<detail>)`.
    pub fn report(&self, program: &str, n: &str, ranks: u32) -> String {
        let check = if self.check_passed { "passed" } else { "FAILED" };
        format!("{program}: n={n} ranks={ranks} time={:.3} s check={check} ({})", self.seconds, self.detail)
    }
}

/// What each example program's `main` does: joins over RDMA (rank and size from the
/// environment), runs `kernel`, prints rank 0's [`Outcome::report`] line with `n`, leaves, and
/// exits with 1 when the check failed or an error occurred (printed as `<program>: error: ...`).
pub fn run_example(
    program: &str,
    n: &str,
    kernel: impl FnOnce(&Dsm<rdmem_transport_rdma::RdmaTransport>) -> Result<Outcome, DsmError>,
) -> ExitCode {
    run_example_with(program, n, |_| {}, kernel)
}

/// [`run_example`], with the options from the environment changed by `configure` first (a
/// program's `--resume` flag, say).
pub fn run_example_with(
    program: &str,
    n: &str,
    configure: impl FnOnce(&mut DsmOptions),
    kernel: impl FnOnce(&Dsm<rdmem_transport_rdma::RdmaTransport>) -> Result<Outcome, DsmError>,
) -> ExitCode {
    let run = || -> Result<bool, DsmError> {
        let mut options = DsmOptions::from_env()?;
        configure(&mut options);
        let dsm = Dsm::join(options)?;
        let outcome = kernel(&dsm)?;
        if dsm.rank() == 0 {
            println!("{}", outcome.report(program, n, dsm.size()));
        }
        dsm.leave()?;
        Ok(outcome.check_passed)
    };
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("{program}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The items `rank` owns when `items` are split in `size` contiguous bands whose lengths differ
/// by at most one: `band(r).end == band(r + 1).start`, and the bands cover `0..items`.
pub(crate) fn band(items: usize, rank: u32, size: u32) -> Range<usize> {
    let at = |r: u32| (items as u128 * r as u128 / size.max(1) as u128) as usize;
    at(rank)..at(rank + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_cover_the_items_without_overlap() {
        for items in [0, 1, 5, 126, 127] {
            for size in 1..=7 {
                let bands: Vec<_> = (0..size).map(|r| band(items, r, size)).collect();
                assert_eq!(bands[0].start, 0);
                assert_eq!(bands[size as usize - 1].end, items);
                for w in bands.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len().abs_diff(w[1].len()) <= 1);
                }
            }
        }
    }

    #[test]
    fn report_line() {
        let outcome = Outcome { check_passed: false, detail: "cell (1, 2) differs".into(), seconds: 1.23456 };
        assert_eq!(
            outcome.report("sor", "128", 4),
            "sor: n=128 ranks=4 time=1.235 s check=FAILED (cell (1, 2) differs)"
        );
    }
}
