//! Dense matrix product `C = A x B` of `n x n` matrices of `f64`.
//!
//! A, B and C are three shared allocations of `8 * n * n` bytes each, row-major. Rank 0 fills A
//! and B ([`a_at`], [`b_at`]), barrier; every rank reads its band of A's rows and all of B, and
//! writes its band of C's rows; barrier. Bands that share a page of C are written by two ranks,
//! whose diffs carry only their own bytes.
//!
//! Rank 0 then compares C with a sequential product for *exact* equality: the entries of A and
//! B are small integers (|a|, |b| <= 8), so every product and partial sum is an integer far below
//! 2^53 and exact in `f64`, whatever the order of the additions.

use std::time::Instant;

use crate::{Outcome, band};
use rdmem_coherence::dsm::{Dsm, DsmError};
use rdmem_core::Transport;

/// The matrices' size.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Rows and columns of A, B and C.
    pub n: usize,
}

impl Default for Params {
    /// 96 x 96: 72 KiB per matrix, 216 KiB shared.
    fn default() -> Self {
        Params { n: 96 }
    }
}

/// `A[i][j]`: an integer in `-8..=8`.
pub fn a_at(i: usize, j: usize) -> f64 {
    ((i * 7 + j * 3) % 17) as f64 - 8.0
}

/// `B[i][j]`: an integer in `-8..=8`.
pub fn b_at(i: usize, j: usize) -> f64 {
    ((i * 5 + j * 11 + 3) % 17) as f64 - 8.0
}

/// Runs the product on every rank; rank 0 checks C against a sequential product. See the
/// module docs.
pub fn run<T: Transport>(dsm: &Dsm<T>, params: &Params) -> Result<Outcome, DsmError> {
    let n = params.n;
    let bytes = (n * n * 8) as u64;
    let (a, b, c) = (dsm.alloc(bytes)?, dsm.alloc(bytes)?, dsm.alloc(bytes)?);
    if dsm.rank() == 0 {
        dsm.write_slice(a, &matrix(n, a_at))?;
        dsm.write_slice(b, &matrix(n, b_at))?;
    }
    dsm.barrier()?;
    let start = Instant::now();

    let rows = band(n, dsm.rank(), dsm.size());
    if !rows.is_empty() {
        let row_at = |m: rdmem_coherence::dsm::SharedAddr, i: usize| m.byte_add((i * n * 8) as u64);
        let mut a_rows = vec![0.0f64; rows.len() * n];
        let mut b_all = vec![0.0f64; n * n];
        dsm.read_slice(row_at(a, rows.start), &mut a_rows)?;
        dsm.read_slice(b, &mut b_all)?;
        dsm.write_slice(row_at(c, rows.start), &multiply(&a_rows, &b_all, n))?;
    }
    dsm.barrier()?;
    let seconds = start.elapsed().as_secs_f64();
    if dsm.rank() != 0 {
        return Ok(Outcome::unchecked(seconds));
    }

    let mut shared = vec![0.0f64; n * n];
    dsm.read_slice(c, &mut shared)?;
    let expected = multiply(&matrix(n, a_at), &matrix(n, b_at), n);
    let differ: Vec<usize> = (0..shared.len()).filter(|&k| shared[k] != expected[k]).collect();
    let detail = match differ.first() {
        None => {
            format!("{n}x{n}: all {} entries of C equal the sequential product, trace {}", n * n, trace(&shared, n))
        }
        Some(&k) => format!(
            "{} of {} entries of C differ from the sequential product; first C[{}][{}]: shared {} vs sequential {}",
            differ.len(),
            n * n,
            k / n,
            k % n,
            shared[k],
            expected[k]
        ),
    };
    Ok(Outcome { check_passed: differ.is_empty(), detail, seconds })
}

/// An `n x n` matrix, row-major, with entries `at(i, j)`.
fn matrix(n: usize, at: fn(usize, usize) -> f64) -> Vec<f64> {
    (0..n * n).map(|k| at(k / n, k % n)).collect()
}

/// `rows x n` times `n x n`, row-major (i-k-j order: B is walked along its rows).
fn multiply(a_rows: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0.0f64; a_rows.len()];
    for (a_row, c_row) in a_rows.chunks(n).zip(c.chunks_mut(n)) {
        for (&a_ik, b_row) in a_row.iter().zip(b.chunks(n)) {
            for (c_ij, &b_kj) in c_row.iter_mut().zip(b_row) {
                *c_ij += a_ik * b_kj;
            }
        }
    }
    c
}

fn trace(m: &[f64], n: usize) -> f64 {
    (0..n).map(|i| m[i * n + i]).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiply_small() {
        // [1 2; 3 4] x [5 6; 7 8] = [19 22; 43 50]
        assert_eq!(multiply(&[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0], 2), vec![19.0, 22.0, 43.0, 50.0]);
        // One band of rows: the second row alone.
        assert_eq!(multiply(&[3.0, 4.0], &[5.0, 6.0, 7.0, 8.0], 2), vec![43.0, 50.0]);
    }

    #[test]
    fn entries_are_small_integers() {
        for i in 0..40 {
            for j in 0..40 {
                for x in [a_at(i, j), b_at(i, j)] {
                    assert!(x.fract() == 0.0 && x.abs() <= 8.0, "{x}");
                }
            }
        }
    }
}
