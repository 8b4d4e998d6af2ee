//! Red-black successive over-relaxation on a `rows x cols` grid of `f64`.
//!
//! The grid is one shared allocation, row-major (`8 * rows * cols` bytes). The boundary is
//! fixed: the top row is 1.0, the other boundary cells 0.0. The interior rows `1..rows - 1` are
//! split in contiguous bands, one per rank, and each rank fills its band with [`initial`] values
//! (not zeros: every cell then changes in every phase, so a stale neighbour row shows up in the
//! check). Cell `(i, j)` is red when `i + j` is even, black otherwise, and an update is
//! `x = (1 - omega) * x + omega * (up + down + left + right) / 4`.
//!
//! Each iteration: every rank updates the red cells of its band, barrier, the black cells,
//! barrier. A rank reads its band and the row above and below it (its neighbours' edge rows,
//! written before the last barrier), and writes its band: band edges that share a page are
//! written by two ranks, whose diffs carry only their own bytes.
//!
//! Rank 0 then repeats the computation in local memory and compares every cell for *exact*
//! equality. Exact is right, not lucky: in a phase every update reads only cells of the other
//! colour, which that phase does not change, so each cell is computed from the same operands by
//! the same expression (`relax`) whatever the partition or the order of the updates, and IEEE
//! 754 arithmetic gives the same bits for the same operations.

use std::time::Instant;

use crate::{Outcome, band};
use rdmem_coherence::dsm::{Dsm, DsmError};
use rdmem_core::Transport;

/// The grid and the number of iterations.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Rows, boundary included (at least 3 for an interior).
    pub rows: usize,
    /// Columns, boundary included (at least 3 for an interior).
    pub cols: usize,
    /// Iterations, each a red and a black phase.
    pub iterations: usize,
    /// The relaxation factor, in `(0, 2)`.
    pub omega: f64,
    /// Checkpoint the job after every this many iterations (not after the last).
    pub checkpoint_every: Option<usize>,
}

impl Default for Params {
    /// 128 x 128 (128 KiB shared), 10 iterations (20 barriers), omega 1.25, no checkpoints.
    fn default() -> Self {
        Params { rows: 128, cols: 128, iterations: 10, omega: 1.25, checkpoint_every: None }
    }
}

/// Runs SOR on every rank; rank 0 checks the grid against a sequential run. See the module docs.
pub fn run<T: Transport>(dsm: &Dsm<T>, params: &Params) -> Result<Outcome, DsmError> {
    run_with(dsm, params, |_| {})
}

/// What [`run_with`] tells its caller as it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// In this iteration (counted from 0), between the red and the black phase: the shared
    /// grid is half updated (tests crash a rank here).
    Midway(usize),
    /// The job checkpointed after `iterations` iterations, as checkpoint `seq`.
    Checkpoint {
        /// Iterations done.
        iterations: usize,
        /// The checkpoint's sequence number (restore the memory nodes with it).
        seq: u64,
    },
}

/// [`run`], calling `on` at each [`Event`] on this rank.
pub fn run_with<T: Transport>(dsm: &Dsm<T>, params: &Params, mut on: impl FnMut(Event)) -> Result<Outcome, DsmError> {
    let Params { rows, cols, iterations, omega, checkpoint_every } = *params;
    let grid = dsm.alloc((rows * cols * 8) as u64)?;
    // Iterations done when the last checkpoint was taken.
    let progress = dsm.alloc(8)?;
    let row_at = |i: usize| grid.byte_add((i * cols * 8) as u64);
    // This rank's interior rows `lo..hi`, and the block it reads: rows `lo - 1..hi + 1`.
    let interior = band(rows.saturating_sub(2), dsm.rank(), dsm.size());
    let (lo, hi) = (interior.start + 1, interior.end + 1);
    let first = match dsm.resumed_from() {
        Some(_) => dsm.get::<u64>(progress)? as usize,
        None => {
            if dsm.rank() == 0 {
                dsm.write_slice(grid, &vec![1.0f64; cols])?;
            }
            if hi > lo {
                dsm.write_slice(row_at(lo), &initial_rows(lo..hi, cols))?;
            }
            0
        }
    };
    dsm.barrier()?;
    let start = Instant::now();

    let mut block = vec![0.0f64; (hi - lo + 2) * cols];
    for iteration in first..iterations {
        for color in [RED, BLACK] {
            if color == BLACK {
                on(Event::Midway(iteration));
            }
            if hi > lo {
                dsm.read_slice(row_at(lo - 1), &mut block)?;
                sweep(&mut block, cols, lo - 1, color, omega);
                dsm.write_slice(row_at(lo), &block[cols..(hi - lo + 1) * cols])?;
            }
            dsm.barrier()?;
        }
        let done = iteration + 1;
        if checkpoint_every.is_some_and(|k| k > 0 && done % k == 0 && done < iterations) {
            if dsm.rank() == 0 {
                dsm.set(progress, &(done as u64))?; // home at the checkpoint's barrier
            }
            let seq = dsm.checkpoint()?;
            on(Event::Checkpoint { iterations: done, seq });
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if dsm.rank() != 0 {
        return Ok(Outcome::unchecked(seconds));
    }

    let mut shared = vec![0.0f64; rows * cols];
    dsm.read_slice(grid, &mut shared)?;
    let expected = sequential(params);
    let differ: Vec<usize> = (0..shared.len()).filter(|&k| shared[k].to_bits() != expected[k].to_bits()).collect();
    let resumed = match dsm.resumed_from() {
        Some(seq) => format!(", resumed from checkpoint {seq} after iteration {first}"),
        None => String::new(),
    };
    let detail = match differ.first() {
        None => format!(
            "{rows}x{cols}, {iterations} iterations{resumed}: all {} cells equal the sequential run, sum {:.6}",
            shared.len(),
            shared.iter().sum::<f64>()
        ),
        Some(&k) => format!(
            "{} of {} cells differ from the sequential run; first ({}, {}): shared {} vs sequential {}",
            differ.len(),
            shared.len(),
            k / cols,
            k % cols,
            shared[k],
            expected[k]
        ),
    };
    Ok(Outcome { check_passed: differ.is_empty(), detail, seconds })
}

/// Red cells: `(i + j) % 2 == RED`.
const RED: usize = 0;
/// Black cells: `(i + j) % 2 == BLACK`.
const BLACK: usize = 1;

/// The same computation in local memory: the grid after `params.iterations` iterations.
pub fn sequential(params: &Params) -> Vec<f64> {
    let Params { rows, cols, iterations, omega, .. } = *params;
    let mut grid = vec![0.0f64; rows * cols];
    grid[..cols.min(rows * cols)].fill(1.0);
    if rows > 2 {
        grid[cols..(rows - 1) * cols].copy_from_slice(&initial_rows(1..rows - 1, cols));
    }
    for _ in 0..iterations {
        for color in [RED, BLACK] {
            sweep(&mut grid, cols, 0, color, omega);
        }
    }
    grid
}

/// The interior's value at the start, in `[0, 1)`; the boundary columns are 0.0.
pub fn initial(i: usize, j: usize) -> f64 {
    ((i * 7 + j * 13) % 32) as f64 / 32.0
}

/// Whole grid rows `rows` at the start: [`initial`] inside, 0.0 in the boundary columns.
fn initial_rows(rows: std::ops::Range<usize>, cols: usize) -> Vec<f64> {
    let first = rows.start;
    let mut values = vec![0.0f64; rows.len() * cols];
    for (r, row) in values.chunks_mut(cols).enumerate() {
        for (j, x) in row.iter_mut().enumerate().take(cols.saturating_sub(1)).skip(1) {
            *x = initial(first + r, j);
        }
    }
    values
}

/// Updates the cells of `color` in the inner rows of `block`, a run of whole grid rows whose
/// first row is grid row `first_row`; the block's first and last rows and the boundary columns
/// are only read.
fn sweep(block: &mut [f64], cols: usize, first_row: usize, color: usize, omega: f64) {
    let rows = block.len() / cols.max(1);
    for r in 1..rows.saturating_sub(1) {
        // The first interior column of this colour in grid row `first_row + r`.
        let j0 = 1 + (first_row + r + 1 + color) % 2;
        for j in (j0..cols.saturating_sub(1)).step_by(2) {
            let at = r * cols + j;
            block[at] = relax(block[at], block[at - cols], block[at + cols], block[at - 1], block[at + 1], omega);
        }
    }
}

/// One cell's update.
fn relax(x: f64, up: f64, down: f64, left: f64, right: f64, omega: f64) -> f64 {
    (1.0 - omega) * x + omega * 0.25 * (up + down + left + right)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_updates_only_its_colour() {
        // 4 x 4: interior cells (1,1) (1,2) (2,1) (2,2); red ones have i + j even.
        let mut grid = vec![0.0; 16];
        grid[..4].fill(1.0);
        sweep(&mut grid, 4, 0, RED, 1.0);
        // (1,1) = (1 + 0 + 0 + 0) / 4; (2,2) reads only zeros; black cells unchanged.
        assert_eq!(grid[5], 0.25);
        assert_eq!(grid[10], 0.0);
        assert_eq!((grid[6], grid[9]), (0.0, 0.0));
        sweep(&mut grid, 4, 0, BLACK, 1.0);
        // (1,2) = (1 + 0 + 0.25 + 0) / 4, (2,1) = (0.25 + 0 + 0 + 0) / 4.
        assert_eq!(grid[6], 0.3125);
        assert_eq!(grid[9], 0.0625);
    }

    #[test]
    fn a_block_sweeps_like_the_whole_grid() {
        // Rows 3..6 of a 9 x 7 grid, swept as a block with halo rows 2 and 6, match the full sweep.
        let params = Params { rows: 9, cols: 7, iterations: 2, omega: 1.5, checkpoint_every: None };
        let mut grid = sequential(&params);
        let mut block = grid[2 * 7..7 * 7].to_vec();
        sweep(&mut grid, 7, 0, BLACK, 1.5);
        sweep(&mut block, 7, 2, BLACK, 1.5);
        assert_eq!(&block[7..4 * 7], &grid[3 * 7..6 * 7]);
    }
}
