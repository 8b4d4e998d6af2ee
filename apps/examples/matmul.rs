//! Matrix product on the DSM ([`rdmem_apps::matmul`]): rank 0 fills A and B,
//! every rank computes a band of C's rows; rank 0 checks C against a sequential product.
//!
//! On Soft-RoCE, from the workspace root:
//! ```sh
//! cargo build --release -p rdmem-apps --example matmul -p rdmem-coherence --bin rdmem-run
//! target/release/rdmem-run -n 4 target/release/examples/matmul -n 96
//! ```
//! Rank 0 prints `matmul: n=<n> ranks=<N> time=<s> s check=passed|FAILED (<detail>)`; the exit
//! status is 1 when the check failed or an error occurred.

use std::process::ExitCode;

use clap::Parser;
use clap::builder::RangedU64ValueParser;
use rdmem_apps::{matmul, run_example};

/// C = A x B on the DSM (start with rdmem-run).
#[derive(Parser, Debug)]
struct Args {
    /// Rows and columns of the matrices.
    #[arg(short, long, default_value_t = matmul::Params::default().n,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    n: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let params = matmul::Params { n: args.n };
    run_example("matmul", &params.n.to_string(), |dsm| matmul::run(dsm, &params))
}
