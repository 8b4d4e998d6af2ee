//! `rdmem-bench lock`: distributed lock and barrier figures.
//!
//! - Uncontended acquire+release latency (p50/p99/p999), one thread: the plain CAS spinlock
//!   (`impl` "cas-spin", two CAS) and the cohort lock (`impl` "cohort").
//! - Contended throughput: `threads` threads of this process run critical sections on one
//!   lock; Mops of sections, the same section code for both locks. `op` "acquire_release": the
//!   lock alone, the section increments a counter in this process. `op` "counter": the section
//!   READs a remote counter and posts the WRITE of its successor without waiting
//!   ([`Endpoint::post_write`]). "cas-spin": every thread takes the remote lock itself, on its
//!   own endpoint, and releases it with a CAS posted behind the WRITE; "cohort": threads hand
//!   the lock (and its endpoint) over locally (bounded runs), so the next holder's READ goes
//!   behind the WRITE on the same queue pair. Then the same across 2 and 4 processes
//!   (`processes`; this program starts copies of itself as `rdmem-bench lock-worker`).
//! - Reader-writer throughput by read share: `threads` threads on the fair reader-writer lock
//!   (`impl` "rwlock"); writers READ then WRITE a counter, readers READ it. `read_share` is the
//!   fraction of sections that read.
//! - Barrier latency for 2 to 4 participants: threads of this process (`impl` "barrier-threads")
//!   and separate processes (`impl` "barrier", `processes` 2..4; this program starts copies of
//!   itself as `rdmem-bench barrier-worker`): time per `wait`.
//!
//! The counter is checked after each contended run: a lost increment is an error, not a figure.

use std::sync::atomic::{AtomicU64, Ordering};

use clap::Args;
use hdrhistogram::Histogram;
use rdmem_coherence::sync::rwlock::Mode;
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
        let shared = CohortLock::with_endpoint(remote, args.max_handovers, transport.endpoint()?);
        let mut hist = new_histogram()?;
        for i in 0..200 + args.iters {
            let start = tsc.now();
            if cohort {
                shared.lock_own()?.unlock()?;
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

    // Contended throughput, the lock alone (a local section) and with the remote counter
    // section: threads of this process, then processes of 1 or 2 threads.
    let counter = at(8192);
    let mut lock_words = (0..).map(|i| at(4096 + 64 + 8 * i));
    let runs = args.threads.iter().map(|&t| (1u64, t)).chain([(2, 1), (2, 2), (4, 1), (4, 2)]);
    for (processes, threads) in runs {
        for (op, remote_section) in [("acquire_release", false), ("counter", true)] {
            for (name, cohort) in [("cas-spin", false), ("cohort", true)] {
                ep.write_u64(counter, 0)?;
                let word = lock_words.next().expect("endless");
                let max_handovers = args.max_handovers;
                let run = Contended { cohort, remote_section, word, counter, sections: args.sections, max_handovers };
                let (seconds, locals) = if processes == 1 {
                    let (elapsed, local) = run.run(transport, threads, 0, &|| Ok(()))?;
                    (elapsed.as_secs_f64(), vec![local])
                } else {
                    // The start barrier: a counter word and its epoch.
                    let start = lock_words.next().expect("endless");
                    lock_words.next();
                    run.across_processes(&cluster, &args.memnodes, processes, threads, start)?
                };
                let per_process = args.sections * threads as u64;
                let sections = per_process * processes;
                let lost = if remote_section {
                    ep.read_u64(counter)? != sections
                } else {
                    locals.iter().any(|&local| local != per_process)
                };
                if lost {
                    return Err(
                        format!("{name}: a counter lost updates in {processes} x {threads}: the lock failed").into()
                    );
                }
                let mut row = Row::throughput("lock", name, op, 0, threads, 1, sections, seconds);
                row.gbps = None;
                row.processes = Some(processes as usize);
                out.print(&row);
            }
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

/// The contended runs' critical section: increment a counter with a separate load and store.
#[derive(Clone, Copy)]
struct Section<'a> {
    /// The remote counter: READ it, post the WRITE of its successor.
    remote: Option<GlobalAddr>,
    /// Else this process's counter.
    local: &'a AtomicU64,
}

impl Section<'_> {
    fn run<E: Endpoint>(self, ep: &mut E) -> rdmem_core::Result<()> {
        match self.remote {
            Some(counter) => {
                let n = ep.read_u64(counter)?;
                ep.post_write_u64(counter, n + 1)
            }
            None => {
                self.local.store(self.local.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                Ok(())
            }
        }
    }
}

/// One contended run, the same in this process and in worker processes.
#[derive(Clone, Copy)]
struct Contended {
    /// The cohort lock (else every thread takes the remote lock itself).
    cohort: bool,
    /// The remote counter section (else the local one).
    remote_section: bool,
    word: GlobalAddr,
    counter: GlobalAddr,
    sections: u64,
    max_handovers: u32,
}

impl Contended {
    /// Runs `threads` threads of `sections` sections each; `process` keeps holder ids unique
    /// across processes. Thread 0 calls `ready` once every thread has its endpoint, and timing
    /// starts after it returns. Returns the time and this process's local counter.
    fn run<T: Transport>(
        self,
        transport: &T,
        threads: usize,
        process: u32,
        ready: &(dyn Fn() -> Result<(), String> + Sync),
    ) -> Result<(std::time::Duration, u64), Box<dyn std::error::Error>> {
        let local = AtomicU64::new(0);
        let remote = RemoteLock::new(self.word, process + 1, DEFAULT_LEASE)?;
        // The lock's own endpoint goes to each holder: a section's posted WRITE is waited for by
        // neither the handover nor the release.
        let shared = CohortLock::with_endpoint(remote, self.max_handovers, transport.endpoint()?);
        let section = Section { remote: self.remote_section.then_some(self.counter), local: &local };
        let (elapsed, results) = harness::timed(threads, |t, start| -> Result<(), String> {
            let holder = 1000 * (process + 1) + t as u32 + 1;
            let setup = (|| {
                // Every thread has its own endpoint; the spinlock's threads each take the lock as
                // their own holder.
                let ep = transport.endpoint().map_err(|e| e.to_string())?;
                let own = match self.cohort {
                    true => None,
                    false => Some(RemoteLock::new(self.word, holder, DEFAULT_LEASE).map_err(|e| e.to_string())?),
                };
                if t == 0 {
                    ready()?;
                }
                Ok::<_, String>((ep, own))
            })();
            // Every thread meets the start line, even one whose setup failed (no deadlock).
            start.wait();
            let (mut ep, own) = setup?;
            let fail = |e: &dyn std::fmt::Display| e.to_string();
            for _ in 0..self.sections {
                match &own {
                    None => {
                        let mut g = shared.lock_own().map_err(|e| fail(&e))?;
                        section.run(g.endpoint()).map_err(|e| fail(&e))?;
                        g.unlock().map_err(|e| fail(&e))?;
                    }
                    Some(lock) => {
                        let mut g = lock.lock(&mut ep).map_err(|e| fail(&e))?;
                        section.run(g.endpoint()).map_err(|e| fail(&e))?;
                        g.unlock().map_err(|e| fail(&e))?;
                    }
                }
            }
            Ok(())
        });
        for r in results {
            r?;
        }
        Ok((elapsed, local.load(Ordering::Relaxed)))
    }

    /// Runs `processes` worker processes (`rdmem-bench lock-worker`) of `threads` threads each,
    /// which start together at a barrier at `start`. Returns the slowest worker's time in
    /// seconds and each worker's local counter.
    fn across_processes(
        self,
        cluster: &harness::Cluster,
        memnodes: &[String],
        processes: u64,
        threads: usize,
        start: GlobalAddr,
    ) -> Result<(f64, Vec<u64>), Box<dyn std::error::Error>> {
        let reset = [start, start.checked_add(8).expect("in the pool")];
        let outputs = spawn_workers(cluster, memnodes, processes, &reset, |process| {
            let mut words = vec!["lock-worker".to_string()];
            for (flag, value) in [
                ("--processes", processes.to_string()),
                ("--process", process.to_string()),
                ("--threads", threads.to_string()),
                ("--sections", self.sections.to_string()),
                ("--word", self.word.offset().to_string()),
                ("--counter", self.counter.offset().to_string()),
                ("--start", start.offset().to_string()),
                ("--max-handovers", self.max_handovers.to_string()),
            ] {
                words.extend([flag.to_string(), value]);
            }
            words.extend(self.cohort.then(|| "--cohort".to_string()));
            words.extend(self.remote_section.then(|| "--remote-section".to_string()));
            words
        })?;
        let (mut slowest, mut locals) = (0u64, Vec::with_capacity(outputs.len()));
        for text in &outputs {
            let done = text.lines().find_map(|l| l.strip_prefix("done ")).ok_or("lock worker printed no result")?;
            let (ns, local) = done.split_once(' ').ok_or("lock worker: bad result line")?;
            slowest = slowest.max(ns.parse()?);
            locals.push(local.parse()?);
        }
        Ok((slowest as f64 / 1e9, locals))
    }
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
    let words = |_| {
        let args = ["barrier-worker", "--participants", &processes.to_string(), "--offset", &offset.to_string()];
        let mut words: Vec<String> = args.iter().map(|w| w.to_string()).collect();
        words.extend(["--waits".to_string(), waits.to_string()]);
        words
    };
    let node = cluster.transport.nodes()[0].id;
    let reset = [offset, offset + 8].map(|o| GlobalAddr::new(node, o).expect("offset"));
    let mut hist = new_histogram()?;
    for text in spawn_workers(cluster, memnodes, processes, &reset, words)? {
        let samples =
            text.lines().find_map(|l| l.strip_prefix("samples ")).ok_or("barrier worker printed no samples")?;
        for ns in samples.split(' ') {
            hist.record(ns.parse::<u64>()?.max(1))?;
        }
    }
    Ok(hist)
}

/// Runs `processes` copies of this program, worker `i` with the arguments `words(i)` plus the
/// cluster's memory nodes, after zeroing the words in `reset`; returns their standard outputs
/// once all succeeded, or stops them all when one fails.
fn spawn_workers(
    cluster: &harness::Cluster,
    memnodes: &[String],
    processes: u64,
    reset: &[GlobalAddr],
    words: impl Fn(u64) -> Vec<String>,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    // Words the workers synchronize on start from zero (an external node may hold a previous
    // run's values).
    let mut ep = cluster.transport.endpoint()?;
    for &word in reset {
        ep.write_u64(word, 0)?;
    }
    let mut children = (0..processes)
        .map(|i| {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(words(i));
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
    // Wait for all; when one fails, the others would wait for it at their barrier forever:
    // stop them. (Their output is a line or two, well within a pipe's buffer.)
    let mut running = children.len();
    while running > 0 {
        running = 0;
        for child in &mut children {
            match child.try_wait()? {
                Some(status) if !status.success() => {
                    for other in &mut children {
                        let _ = other.kill();
                        let _ = other.wait();
                    }
                    return Err(format!("a worker process failed ({status})").into());
                }
                Some(_) => {}
                None => running += 1,
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut outputs = Vec::with_capacity(children.len());
    for child in children {
        outputs.push(String::from_utf8_lossy(&child.wait_with_output()?.stdout).into_owned());
    }
    Ok(outputs)
}

/// Options of the hidden `rdmem-bench lock-worker`: one process of a contended run across
/// processes. Prints `done <ns> <local counter>`.
#[derive(Args, Debug)]
pub(crate) struct LockWorkerArgs {
    /// Memory node `host:port`.
    #[arg(long = "memnode")]
    memnodes: Vec<String>,
    /// Processes in the run (they meet at a barrier before timing starts).
    #[arg(long)]
    processes: u64,
    /// This process's index.
    #[arg(long)]
    process: u32,
    /// Threads of this process.
    #[arg(long)]
    threads: usize,
    /// Sections per thread.
    #[arg(long)]
    sections: u64,
    /// Offset of the lock word on the first node.
    #[arg(long)]
    word: u64,
    /// Offset of the remote counter.
    #[arg(long)]
    counter: u64,
    /// Offset of the start barrier's counter (its epoch follows).
    #[arg(long)]
    start: u64,
    /// Longest run of local handovers of the cohort lock.
    #[arg(long)]
    max_handovers: u32,
    /// Use the cohort lock.
    #[arg(long)]
    cohort: bool,
    /// Use the remote counter section.
    #[arg(long)]
    remote_section: bool,
}

/// `rdmem-bench lock-worker`.
pub(crate) fn lock_worker(args: &LockWorkerArgs) -> Result<(), Box<dyn std::error::Error>> {
    let cluster = harness::connect(&args.memnodes, 64 << 20)?;
    if cluster.memnode.is_some() {
        return Err("lock-worker needs --memnode (it joins a running benchmark)".into());
    }
    let node = cluster.transport.nodes()[0].id;
    let at = |offset: u64| GlobalAddr::new(node, offset).expect("offset");
    let run = Contended {
        cohort: args.cohort,
        remote_section: args.remote_section,
        word: at(args.word),
        counter: at(args.counter),
        sections: args.sections,
        max_handovers: args.max_handovers,
    };
    // Start together: one wait at a barrier of all the workers.
    let ready = || {
        let mut ep = cluster.transport.endpoint().map_err(|e| e.to_string())?;
        let mut barrier =
            RemoteBarrier::new(at(args.start), at(args.start + 8), args.processes).map_err(|e| e.to_string())?;
        barrier.wait(&mut ep).map_err(|e| e.to_string())
    };
    let (elapsed, local) = run.run(&cluster.transport, args.threads, args.process, &ready)?;
    println!("done {} {local}", elapsed.as_nanos());
    Ok(())
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
