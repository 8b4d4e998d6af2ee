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
//!
//! Checkpoints: with `--checkpoint-every K` the job checkpoints its memory nodes (started with
//! `--checkpoint-dir`) after every K iterations and rank 0 prints `sor: checkpoint <seq> after
//! iteration <i>`. If it dies, restore the nodes (`rdmem-memnode --restore DIR --restore-seq
//! <seq>`) and run it again with `--resume`: it goes on from that iteration.
//! ```sh
//! rdmem-memnode --pool-size 64M --checkpoint-dir /tmp/sor --insecure-no-token &
//! rdmem-run -n 3 --memnode 127.0.0.1:7471 target/release/examples/sor -i 100 --checkpoint-every 10
//! ```

use std::process::ExitCode;

use clap::Parser;
use clap::builder::RangedU64ValueParser;
use rdmem_apps::{run_example_with, sor};

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
    /// Checkpoint the job after every K iterations (the memory nodes need --checkpoint-dir).
    #[arg(long, value_name = "K", value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    checkpoint_every: Option<usize>,
    /// Resume the job from its checkpoint, on memory nodes restored from it.
    #[arg(long)]
    resume: bool,
    /// Fault injection, for tests: every rank kills itself (SIGKILL, as a crash) in iteration
    /// I, between its red and black phases.
    #[arg(long, value_name = "I")]
    crash_at: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let params = sor::Params {
        rows: args.rows,
        cols: args.cols.unwrap_or(args.rows),
        iterations: args.iterations,
        checkpoint_every: args.checkpoint_every,
        ..Default::default()
    };
    let n =
        if params.rows == params.cols { params.rows.to_string() } else { format!("{}x{}", params.rows, params.cols) };
    run_example_with(
        "sor",
        &n,
        |options| options.resume |= args.resume,
        |dsm| {
            let rank = dsm.rank();
            sor::run_with(dsm, &params, |event| match event {
                sor::Event::Midway(iteration) if args.crash_at == Some(iteration) => {
                    eprintln!("sor: rank {rank} crashing in iteration {iteration}, as asked (--crash-at)");
                    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
                }
                sor::Event::Checkpoint { iterations, seq } if rank == 0 => {
                    println!("sor: checkpoint {seq} after iteration {iterations}");
                }
                _ => {}
            })
        },
    )
}
