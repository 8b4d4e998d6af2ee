//! A lock-heavy histogram on the DSM ([`rdmem_apps::histogram`]): ranks add
//! batches of counts into shared buckets under 8 locks; rank 0 checks every bucket and the
//! total against the sequential histogram.
//!
//! On Soft-RoCE, from the workspace root:
//! ```sh
//! cargo build --release -p rdmem-apps --example histogram -p rdmem-coherence --bin rdmem-run
//! target/release/rdmem-run -n 4 target/release/examples/histogram -n 64 --values 512
//! ```
//! Rank 0 prints `histogram: n=<buckets> ranks=<N> time=<s> s check=passed|FAILED (<detail>)`;
//! the exit status is 1 when the check failed or an error occurred.

use std::process::ExitCode;

use clap::Parser;
use clap::builder::RangedU64ValueParser;
use rdmem_apps::{histogram, run_example};

/// A parallel histogram under DSM locks (start with rdmem-run).
#[derive(Parser, Debug)]
struct Args {
    /// Buckets.
    #[arg(short = 'n', long, default_value_t = histogram::Params::default().buckets,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    buckets: usize,
    /// Values each rank draws.
    #[arg(long, default_value_t = histogram::Params::default().values_per_rank)]
    values: usize,
    /// Values counted locally between two rounds of locked updates.
    #[arg(long, default_value_t = histogram::Params::default().batch,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    batch: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let params = histogram::Params {
        buckets: args.buckets,
        values_per_rank: args.values,
        batch: args.batch,
        ..Default::default()
    };
    run_example("histogram", &params.buckets.to_string(), |dsm| histogram::run(dsm, &params))
}
