//! `rdmem-bench lock`: distributed lock and barrier figures.
//!
//! - Uncontended acquire+release latency (p50/p99/p999), one thread: the plain CAS spinlock
//!   (`impl` "cas-spin", two CAS) and the cohort lock (`impl` "cohort").
//! - Contended throughput: `threads` threads of this process run critical sections (a READ
//!   then a WRITE of a counter) on one lock; Mops of sections. "cas-spin": every thread takes
//!   the remote lock itself; "cohort": threads hand it over locally (bounded runs).
//! - Barrier latency for 2 to 4 participants (threads of this process, each with its own
//!   endpoint): time per `wait`.
//!
//! The counter is checked after each contended run: a lost increment is an error, not a figure.

use clap::Args;
use hdrhistogram::Histogram;
use rdmem_coherence::{CohortLock, DEFAULT_LEASE, RemoteBarrier, RemoteLock};
use rdmem_core::{Endpoint, GlobalAddr, Transport};

use crate::harness;
use crate::report::{Printer, Row};
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
        let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)?;
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

    // Barrier latency, 2 to 4 participants.
    for participants in 2..=4u64 {
        let base = 1 << 20 | participants << 12;
        let (_, hists) = harness::timed(participants as usize, |_, start| -> Histogram<u64> {
            let mut ep = transport.endpoint().expect("endpoint");
            let mut barrier = RemoteBarrier::new(at(base), at(base + 8), participants).expect("barrier");
            let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).expect("histogram");
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
        let mut all = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)?;
        for h in &hists {
            all.add(h)?;
        }
        let mut row = lock_row(Row::latency("barrier", "barrier", 0, participants as usize, 1, &all));
        row.note = Some("participants are threads of one process".into());
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
