//! `rdmem-bench swap`: a workload that needs three times its memory limit, swapping to
//! rdmem-swap (remote memory), to zram (local compressed swap, what a Linux user would pick),
//! and with no limit at all, in the same boot.
//!
//! The workload is the `swap_workload` example (rdmem-tmem): it fills `--workload-mib` MiB
//! (half of the pages compressible, half random), checks every word, then checks them all
//! again; a wrong word fails the benchmark. It runs in a cgroup v2 whose `memory.max` is
//! `--limit-mib` (none for "none"). "zram": a zram device of `--swap-mib` with the kernel's
//! default compressor. "rdmem-swap": `rdmem-swap` on a memory node of this machine (or
//! `--memnode`), attached with `nbd-client` and used with `swapon --discard`. Each is run
//! `--rounds` times, the three taking turns. Rows: `bench` "swap", `impl`, `runtime_s` (the
//! workload's own time), `major_faults`, `compression_ratio` (bytes swapped out over bytes kept,
//! read right after the first pass: zram's `mm_stat`, rdmem-swap's figures; none for "none"),
//! `swap_used_bytes` at that moment. Needs root, zram and nbd (the VM has them).

use clap::Args;
use rdmem_core::ClusterConfig;
use rdmem_tmem::linux_swap::{Cgroup, SwapDevice, SwapServer, Workload, swap_used};
use rdmem_transport_rdma::spawn::find_binary;
use serde::Serialize;

use crate::harness;

/// Options of `rdmem-bench swap`.
#[derive(Args, Debug)]
pub(crate) struct SwapArgs {
    /// Memory node `host:port` for rdmem-swap (default: RDMEM_MEMNODES or the config file, else
    /// one started on the same device).
    #[arg(long = "memnode")]
    memnodes: Vec<String>,
    /// The workload's memory limit (cgroup `memory.max`), MiB.
    #[arg(long, default_value_t = 48)]
    limit_mib: u64,
    /// The memory the workload fills and checks, MiB.
    #[arg(long, default_value_t = 144)]
    workload_mib: u64,
    /// Size of each swap device, MiB (the memory node it starts gets this plus 64 MiB).
    #[arg(long, default_value_t = 256)]
    swap_mib: u64,
    /// Runs of each.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Print one JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct SwapRow {
    bench: &'static str,
    #[serde(rename = "impl")]
    implementation: &'static str,
    workload_mib: u64,
    limit_mib: Option<u64>,
    runtime_s: f64,
    major_faults: u64,
    compression_ratio: Option<f64>,
    swap_used_bytes: u64,
}

pub(crate) fn run(args: &SwapArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.limit_mib == 0 || args.workload_mib <= args.limit_mib {
        return Err(
            format!("--workload-mib ({}) must exceed --limit-mib ({})", args.workload_mib, args.limit_mib).into()
        );
    }
    // The export's pages at most, plus the allocator's metadata.
    let cluster = harness::connect(&args.memnodes, (args.swap_mib << 20) + (64 << 20))?;
    let (memnode, token) = match &cluster.memnode {
        Some(node) => (node.addr().to_owned(), node.token().to_owned()),
        None => {
            let mut config = ClusterConfig::load(None)?;
            if !args.memnodes.is_empty() {
                config.memnodes = args.memnodes.clone();
            }
            (config.memnode_addrs()?[0].clone(), config.resolve_token()?)
        }
    };
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("rdmem-swap.sock");
    let program = find_binary("rdmem-swap");
    let size = format!("{}M", args.swap_mib);
    let mut header = false;
    for _ in 0..args.rounds.max(1) {
        for implementation in ["none", "zram", "rdmem-swap"] {
            let row = match implementation {
                "none" => {
                    let cgroup = Cgroup::new("rdmem-bench-swap", None)?;
                    measure(implementation, args, &cgroup, None, || Ok(None))?
                }
                "zram" => {
                    let swap = SwapDevice::zram("/dev/zram0", args.swap_mib << 20)?;
                    let cgroup = Cgroup::new("rdmem-bench-swap", Some(args.limit_mib << 20))?;
                    measure(implementation, args, &cgroup, Some(swap.path()), || {
                        let (orig, kept) = swap.zram_sizes()?;
                        Ok((kept > 0).then(|| orig as f64 / kept as f64))
                    })?
                }
                _ => {
                    let server = SwapServer::start(&program, &memnode, &token, &size, &socket, &[])?;
                    let swap = SwapDevice::nbd(&server, "/dev/nbd0")?;
                    let cgroup = Cgroup::new("rdmem-bench-swap", Some(args.limit_mib << 20))?;
                    let row = measure(implementation, args, &cgroup, Some(swap.path()), || {
                        let ratio = server.figure("ratio");
                        Ok(ratio.ok())
                    })?;
                    drop(cgroup);
                    drop(swap);
                    row
                }
            };
            print(&row, args.json, &mut header);
        }
    }
    Ok(())
}

/// One run of the workload in `cgroup`; `ratio` is read after its first pass.
fn measure(
    implementation: &'static str,
    args: &SwapArgs,
    cgroup: &Cgroup,
    device: Option<&str>,
    ratio: impl FnOnce() -> Result<Option<f64>, String>,
) -> Result<SwapRow, Box<dyn std::error::Error>> {
    let mut workload = Workload::start(args.workload_mib, cgroup, true)?;
    workload.wait_filled()?;
    let used = match device {
        Some(d) => swap_used(d)?,
        None => 0,
    };
    let compression_ratio = ratio()?;
    workload.go_on()?;
    let result = workload.finish()?;
    Ok(SwapRow {
        bench: "swap",
        implementation,
        workload_mib: args.workload_mib,
        limit_mib: device.map(|_| args.limit_mib),
        runtime_s: result.runtime_s,
        major_faults: result.major_faults,
        compression_ratio,
        swap_used_bytes: used,
    })
}

fn print(row: &SwapRow, json: bool, header: &mut bool) {
    if json {
        println!("{}", serde_json::to_string(row).expect("rows serialize"));
        return;
    }
    if !*header {
        println!(
            "{:<11} {:>9} {:>9} {:>10} {:>13} {:>7} {:>12}",
            "impl", "workload", "limit", "runtime s", "major faults", "ratio", "swap used"
        );
        *header = true;
    }
    println!(
        "{:<11} {:>7}Mi {:>9} {:>10.2} {:>13} {:>7} {:>12}",
        row.implementation,
        row.workload_mib,
        row.limit_mib.map_or("none".into(), |l| format!("{l}Mi")),
        row.runtime_s,
        row.major_faults,
        row.compression_ratio.map_or("-".into(), |r| format!("{r:.2}")),
        row.swap_used_bytes
    );
}
