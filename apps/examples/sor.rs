//! Red-black SOR on the DSM ([`rdmem_apps::sor`]): row bands per rank, two
//! barriers per iteration; rank 0 checks every cell against a sequential run.
//!
//! On Soft-RoCE, from the workspace root:
//! ```sh
//! cargo build --release -p rdmem-apps --example sor -p rdmem-coherence --bin rdmem-run
//! target/release/rdmem-run -n 4 target/release/examples/sor --rows 128 --iterations 10
//! ```
//! Rank 0 prints `sor: n=<rows>[x<cols>] ranks=<N> time=<s> s check=passed|FAILED (<detail>)`;
//! the exit status is 1 when the check failed or an error occurred.

use std::process::ExitCode;

use clap::Parser;
use clap::builder::RangedU64ValueParser;
use rdmem_apps::{run_example, sor};

/// Red-black successive over-relaxation on the DSM (start with rdmem-run).
#[derive(Parser, Debug)]
struct Args {
    /// Grid rows, boundary included.
    #[arg(short = 'n', long, default_value_t = sor::Params::default().rows,
          value_parser = RangedU64ValueParser::<usize>::new().range(3..))]
    rows: usize,
    /// Grid columns, boundary included [default: the rows].
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(3..))]
    cols: Option<usize>,
    /// Iterations (a red and a black phase each).
    #[arg(short, long, default_value_t = sor::Params::default().iterations)]
    iterations: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let params = sor::Params {
        rows: args.rows,
        cols: args.cols.unwrap_or(args.rows),
        iterations: args.iterations,
        ..Default::default()
    };
    let n =
        if params.rows == params.cols { params.rows.to_string() } else { format!("{}x{}", params.rows, params.cols) };
    run_example("sor", &n, |dsm| sor::run(dsm, &params))
}
