//! `rdmem-bench lock`: distributed lock and barrier figures.
//!
//! - Uncontended acquire+release latency (p50/p99/p999), one thread: the plain CAS spinlock
//!   (`impl` "cas-spin", two CAS) and the cohort lock (`impl` "cohort").
//! - Contended throughput: `threads` threads of this process run critical sections (a READ
//!   then a WRITE of a counter) on one lock; Mops of sections. "cas-spin": every thread takes
//!   the remote lock itself; "cohort": threads hand it over locally (bounded runs).
//! - Reader-writer throughput by read share: `threads` threads on the fair reader-writer lock
//!   (`impl` "rwlock"); writers READ then WRITE a counter, readers READ it. `read_share` is the
//!   fraction of sections that read.
//! - Barrier latency for 2 to 4 participants: threads of this process (`impl` "barrier-threads")
//!   and separate processes (`impl` "barrier", `processes` 2..4; this program starts copies of
//!   itself as `rdmem-bench barrier-worker`): time per `wait`.
//!
//! The counter is checked after each contended run: a lost increment is an error, not a figure.

use clap::Args;
use hdrhistogram::Histogram;
use rdmem_coherence::rwlock::Mode;
use rdmem_coherence::{CohortLock, DEFAULT_LEASE, RemoteBarrier, RemoteLock, RwLock};
use rdmem_core::{Endpoint, GlobalAddr, Transport};

use crate::harness;
use crate::report::{Printer, Row, new_histogram};
use crate::tsc::Tsc;

/// Options of `rdmem-bench lock`.
#[derive(Args, Debug)]
pub(crate) struct LockArgs {
    /// Memory node `host:port` (default: RDMEM_MEMNODES or the config file, else one started
    /// on the same device).
    #[arg(long = "memnode")]
    memnodes: Vec<String>,
    /// Thread counts for the contended runs.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    threads: Vec<usize>,
    /// Critical sections per thread in a contended run.
    #[arg(long, default_value_t = 2000)]
    sections: u64,
    /// Timed operations for the latency rows.
    #[arg(long, default_value_t = 2000)]
    iters: u64,
    /// Longest run of local handovers of the cohort lock.
    #[arg(long, default_value_t = 16)]
    max_handovers: u32,
    /// Print one JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &LockArgs) -> Result<(), Box<dyn std::error::Error>> {
    let cluster = harness::connect(&args.memnodes, 64 << 20)?;
    let transport = &cluster.transport;
    let node = transport.nodes()[0].id;
    let at = |offset: u64| GlobalAddr::new(node, offset).expect("offset");
    let tsc = Tsc::calibrate();
    let mut out = Printer::new(args.json);

    // Uncontended latency of acquire + release.
    let mut ep = transport.endpoint()?;
    for (name, cohort) in [("cas-spin", false), ("cohort", true)] {
        let remote = RemoteLock::new(at(4096), 1, DEFAULT_LEASE)?;
        let shared = CohortLock::new(remote, args.max_handovers);
        let mut hist = new_histogram()?;
        for i in 0..200 + args.iters {
            let start = tsc.now();
            if cohort {
                shared.lock(&mut ep)?.unlock()?;
            } else {
                remote.lock(&mut ep)?.unlock()?;
            }
            let end = tsc.now();
            if i >= 200 {
                hist.record(tsc.nanos(start, end).max(1))?;
            }
        }
        out.print(&lock_row(Row::latency(name, "acquire_release", 0, 1, 1, &hist)));
    }

    // Contended throughput: threads of one process, one lock.
    let counter = at(8192);
    for &threads in &args.threads {
        for (name, cohort) in [("cas-spin", false), ("cohort", true)] {
            ep.write_u64(counter, 0)?;
            let word = at(4096 + 64 * threads as u64 + if cohort { 8 } else { 0 });
            let shared = CohortLock::new(RemoteLock::new(word, 1, DEFAULT_LEASE)?, args.max_handovers);
            let (elapsed, results) =
                harness::timed(threads, |t, start| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
                    let mut ep = transport.endpoint()?;
                    let own = RemoteLock::new(word, 2 + t as u32, DEFAULT_LEASE)?;
                    start.wait();
                    for _ in 0..args.sections {
                        if cohort {
                            let mut g = shared.lock(&mut ep)?;
                            let n = g.endpoint().read_u64(counter)?;
                            g.endpoint().write_u64(counter, n + 1)?;
                            g.unlock()?;
                        } else {
                            let mut g = own.lock(&mut ep)?;
                            let n = g.endpoint().read_u64(counter)?;
                            g.endpoint().write_u64(counter, n + 1)?;
                            g.unlock()?;
                        }
                    }
                    Ok(())
                });
            for r in results {
                r.map_err(|e| e.to_string())?;
            }
            let sections = args.sections * threads as u64;
            let got = ep.read_u64(counter)?;
            if got != sections {
                return Err(format!("{name}: the counter is {got} after {sections} sections: the lock failed").into());
            }
            let mut row = Row::throughput("lock", name, "counter", 0, threads, 1, sections, elapsed.as_secs_f64());
            row.gbps = None;
            out.print(&lock_row(row));
        }
    }

    // Reader-writer throughput by read share, at the largest thread count.
    let threads = args.threads.iter().copied().max().unwrap_or(1);
    for (i, read_share) in [0.0, 0.5, 0.9, 1.0].into_iter().enumerate() {
        ep.write_u64(counter, 0)?;
        let lock = RwLock::new(at(1 << 19 | (i as u64) << 6), DEFAULT_LEASE)?;
        let (elapsed, results) =
            harness::timed(threads, |t, start| -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
                let mut ep = transport.endpoint()?;
                let mut writes = 0;
                start.wait();
                for k in 0..args.sections {
                    // A fixed pattern with the asked-for share of reads.
                    let reads = ((t as u64 * 7 + k * 13) % 100) < (read_share * 100.0) as u64;
                    let mut g = lock.lock(&mut ep, if reads { Mode::Read } else { Mode::Write })?;
                    let n = g.endpoint().read_u64(counter)?;
                    if !reads {
                        g.endpoint().write_u64(counter, n + 1)?;
                        writes += 1;
                    }
                    g.unlock()?;
                }
                Ok(writes)
            });
        let mut writes = 0;
        for r in results {
            writes += r.map_err(|e| e.to_string())?;
        }
        let got = ep.read_u64(counter)?;
        if got != writes {
            return Err(format!("rwlock: the counter is {got} after {writes} write sections: the lock failed").into());
        }
        let sections = args.sections * threads as u64;
        let mut row = Row::throughput("lock", "rwlock", "rw", 0, threads, 1, sections, elapsed.as_secs_f64());
        row.gbps = None;
        row.read_share = Some(read_share);
        out.print(&lock_row(row));
    }

    // Barrier latency, 2 to 4 participants: threads of this process, then processes.
    for participants in 2..=4u64 {
        let base = 1 << 20 | participants << 12;
        let (_, hists) = harness::timed(participants as usize, |_, start| -> Histogram<u64> {
            let mut ep = transport.endpoint().expect("endpoint");
            let mut barrier = RemoteBarrier::new(at(base), at(base + 8), participants).expect("barrier");
            let mut hist = new_histogram().expect("histogram");
            start.wait();
            for i in 0..50 + args.iters / 4 {
                let t0 = tsc.now();
                barrier.wait(&mut ep).expect("barrier wait");
                if i >= 50 {
                    hist.record(tsc.nanos(t0, tsc.now()).max(1)).expect("record");
                }
            }
            hist
        });
        let mut all = new_histogram()?;
        for h in &hists {
            all.add(h)?;
        }
        out.print(&lock_row(Row::latency("barrier-threads", "barrier", 0, participants as usize, 1, &all)));
    }
    for processes in 2..=4u64 {
        let hist =
            barrier_processes(&cluster, &args.memnodes, processes, 1 << 21 | processes << 12, 50 + args.iters / 4)?;
        let mut row = Row::latency("barrier", "barrier", 0, 1, 1, &hist);
        row.bench = "lock";
        row.processes = Some(processes as usize);
        out.print(&row);
    }
    Ok(())
}

/// A lock-bench row: `bench` "lock", one process.
fn lock_row(mut row: Row) -> Row {
    row.bench = "lock";
    row.processes = Some(1);
    row
}

/// Options of the hidden `rdmem-bench barrier-worker`: one participant of a barrier measured
/// across processes. Prints `samples <ns> <ns> ...` (the waits after a warm-up of 50).
#[derive(Args, Debug)]
pub(crate) struct BarrierWorkerArgs {
    /// Memory node `host:port`.
    #[arg(long = "memnode")]
    memnodes: Vec<String>,
    /// Participants in all.
    #[arg(long)]
    participants: u64,
    /// Offset of the barrier's counter on the first node (the epoch follows it).
    #[arg(long)]
    offset: u64,
    /// Waits, warm-up included.
    #[arg(long)]
    waits: u64,
}

/// Runs `processes` copies of this program as barrier workers against the cluster and merges
/// their samples.
fn barrier_processes(
    cluster: &harness::Cluster,
    memnodes: &[String],
    processes: u64,
    offset: u64,
    waits: u64,
) -> Result<Histogram<u64>, Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let (participants, offset, waits) = (processes.to_string(), offset.to_string(), waits.to_string());
    let children = (0..processes)
        .map(|_| {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["barrier-worker", "--participants", &participants, "--offset", &offset, "--waits", &waits]);
            match &cluster.memnode {
                Some(node) => {
                    cmd.args(["--memnode", node.addr()])
                        .env("RDMEM_TOKEN", node.token())
                        .env_remove("RDMEM_TOKEN_FILE");
                }
                None => {
                    for m in memnodes {
                        cmd.args(["--memnode", m]);
                    }
                }
            }
            cmd.stdout(std::process::Stdio::piped()).spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut hist = new_histogram()?;
    for child in children {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(format!("barrier worker failed ({})", out.status).into());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let samples =
            text.lines().find_map(|l| l.strip_prefix("samples ")).ok_or("barrier worker printed no samples")?;
        for ns in samples.split(' ') {
            hist.record(ns.parse::<u64>()?.max(1))?;
        }
    }
    Ok(hist)
}

/// `rdmem-bench barrier-worker`.
pub(crate) fn barrier_worker(args: &BarrierWorkerArgs) -> Result<(), Box<dyn std::error::Error>> {
    let cluster = harness::connect(&args.memnodes, 64 << 20)?;
    if cluster.memnode.is_some() {
        return Err("barrier-worker needs --memnode (it joins a running benchmark)".into());
    }
    let node = cluster.transport.nodes()[0].id;
    let at = |offset: u64| GlobalAddr::new(node, offset).expect("offset");
    let mut ep = cluster.transport.endpoint()?;
    let mut barrier = RemoteBarrier::new(at(args.offset), at(args.offset + 8), args.participants)?;
    let tsc = Tsc::calibrate();
    let mut samples = Vec::with_capacity(args.waits as usize);
    for i in 0..args.waits {
        let t0 = tsc.now();
        barrier.wait(&mut ep)?;
        if i >= 50 {
            samples.push(tsc.nanos(t0, tsc.now()).to_string());
        }
    }
    println!("samples {}", samples.join(" "));
    Ok(())
}
