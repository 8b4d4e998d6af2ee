//! `rdmem-locks`: run lock and barrier workloads against memory nodes, from several processes.
//!
//! ```sh
//! rdmem-locks --memnode 10.0.0.1:7471 counter --process 0 --threads 2 --rounds 1000 [--cohort]
//! rdmem-locks --memnode 10.0.0.1:7471 barrier --participants 3 --index 0 --rounds 20
//! rdmem-locks --memnode 10.0.0.1:7471 rw --process 0 --threads 2 --rounds 200 --read-percent 50
//! ```
//! `counter` increments a counter with a non-atomic READ then WRITE inside the lock; it prints
//! one line per completed section with `--verbose` and `done N` at the end. `--stall-after N`
//! completes N sections, then takes the lock, prints `holding`, and stalls (to be killed).
//! `barrier` checks that nobody passes a round before everyone arrived; it exits non-zero on a
//! violation. `rw` takes the fair reader-writer lock: writers increment the counter (READ then
//! WRITE) and rewrite a 4-word record, readers check the record is not torn; each section
//! prints `section <r|w> <generation> <position> <enter> <exit>` (a remote event clock read
//! with FAA inside the section), so the caller can check the order across processes with
//! `rdmem_coherence::sync::rwlock::check_history`. Offsets are raw pool offsets on node 0 (a fresh memory node's pool is zeroed).

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rdmem_coherence::sync::rwlock::{Mode, Section};
use rdmem_coherence::{CohortLock, RemoteBarrier, RemoteLock, RwLock};
use rdmem_core::{ClusterConfig, Endpoint, GlobalAddr, NodeId, Transport};
use rdmem_transport_rdma::{RdmaOptions, RdmaTransport};

/// Run lock and barrier workloads against memory nodes.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Memory node `host:port` (default: RDMEM_MEMNODES or the config file).
    #[arg(long = "memnode", global = true)]
    memnodes: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Lock-protected increments of a counter.
    Counter {
        /// This process's number (holder ids derive from it).
        #[arg(long)]
        process: u32,
        /// Threads, each with its own endpoint.
        #[arg(long, default_value_t = 2)]
        threads: u32,
        /// Critical sections per thread.
        #[arg(long, default_value_t = 100)]
        rounds: u64,
        /// Use a cohort lock (threads hand over locally) instead of one remote lock per thread.
        #[arg(long)]
        cohort: bool,
        /// Lease in milliseconds.
        #[arg(long, default_value_t = 2000)]
        lease_ms: u64,
        /// Lock word offset.
        #[arg(long, default_value_t = 4096)]
        lock_offset: u64,
        /// Counter offset.
        #[arg(long, default_value_t = 8192)]
        counter_offset: u64,
        /// Complete this many sections (thread 0), then hold the lock and stall.
        #[arg(long)]
        stall_after: Option<u64>,
        /// Print a line per completed section.
        #[arg(long)]
        verbose: bool,
    },
    /// Barrier rounds with a check that nobody passes early.
    Barrier {
        /// Participants in all.
        #[arg(long)]
        participants: u64,
        /// This participant's index (0..participants).
        #[arg(long)]
        index: u64,
        /// Rounds.
        #[arg(long, default_value_t = 20)]
        rounds: u64,
        /// Offset of the barrier's two words (counter, then epoch).
        #[arg(long, default_value_t = 64)]
        barrier_offset: u64,
        /// Offset of the participants' round slots.
        #[arg(long, default_value_t = 16384)]
        slots_offset: u64,
    },
    /// Reader-writer lock sections, printed as a history.
    Rw {
        /// This process's number (only used to vary the read/write pattern).
        #[arg(long)]
        process: u64,
        /// Threads, each with its own endpoint.
        #[arg(long, default_value_t = 2)]
        threads: u64,
        /// Sections per thread.
        #[arg(long, default_value_t = 100)]
        rounds: u64,
        /// Percentage of sections that read.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=100))]
        read_percent: u64,
        /// Reset the lock word after this many tickets (small values cross many generations).
        #[arg(long)]
        reset_threshold: Option<u16>,
        /// Lock word offset.
        #[arg(long, default_value_t = 4096)]
        lock_offset: u64,
        /// Counter offset (the 4-word record follows it, the event clock follows that).
        #[arg(long, default_value_t = 8192)]
        counter_offset: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rdmem-locks: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn at(offset: u64) -> GlobalAddr {
    GlobalAddr::new(NodeId(0), offset).expect("offset below 2^48")
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = ClusterConfig::load(None)?;
    if !cli.memnodes.is_empty() {
        config.memnodes = cli.memnodes.clone();
    }
    let transport = RdmaTransport::connect(RdmaOptions::from_config(&config)?)?;
    match cli.command {
        Command::Counter {
            process,
            threads,
            rounds,
            cohort,
            lease_ms,
            lock_offset,
            counter_offset,
            stall_after,
            verbose,
        } => {
            let lease = Duration::from_millis(lease_ms);
            let (word, counter) = (at(lock_offset), at(counter_offset));
            let shared =
                CohortLock::with_endpoint(RemoteLock::new(word, process + 1, lease)?, 8, transport.endpoint()?);
            let started = Instant::now();
            let results: Vec<Result<u64, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let (transport, shared) = (&transport, &shared);
                        s.spawn(move || -> Result<u64, String> {
                            let mut ep = transport.endpoint().map_err(|e| e.to_string())?;
                            let plain = RemoteLock::new(word, (process + 1) * 1000 + t + 1, lease)
                                .map_err(|e| e.to_string())?;
                            let mut done = 0;
                            for i in 0..rounds {
                                let stall = t == 0 && stall_after == Some(i);
                                if cohort {
                                    let mut g = shared.lock_own().map_err(|e| e.to_string())?;
                                    section(g.endpoint(), counter, stall)?;
                                    g.unlock().map_err(|e| e.to_string())?;
                                } else {
                                    let mut g = plain.lock(&mut ep).map_err(|e| e.to_string())?;
                                    section(g.endpoint(), counter, stall)?;
                                    g.unlock().map_err(|e| e.to_string())?;
                                }
                                done += 1;
                                if verbose {
                                    println!("section {process}.{t}.{i} done");
                                }
                            }
                            Ok(done)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into()))).collect()
            });
            let mut total = 0;
            for r in results {
                total += r?;
            }
            println!("done {total} in {:.3} s", started.elapsed().as_secs_f64());
        }
        Command::Rw { process, threads, rounds, read_percent, reset_threshold, lock_offset, counter_offset } => {
            let mut lock = RwLock::new(at(lock_offset), Duration::from_secs(2))?;
            if let Some(t) = reset_threshold {
                lock = lock.with_reset_threshold(t);
            }
            let (counter, record, clock) = (at(counter_offset), at(counter_offset + 8), at(counter_offset + 40));
            let results: Vec<Result<Vec<Section>, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let transport = &transport;
                        s.spawn(move || {
                            let mut ep = transport.endpoint().map_err(|e| e.to_string())?;
                            (0..rounds)
                                .map(|i| {
                                    // A fixed pseudo-random pattern with the asked-for read share.
                                    let mix = (process * 7919 + t * 104_729 + i * 2_654_435_761) % 100;
                                    let mode = if mix < read_percent { Mode::Read } else { Mode::Write };
                                    rw_section(&lock, &mut ep, mode, counter, record, clock)
                                })
                                .collect()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into()))).collect()
            });
            let mut out = std::io::stdout().lock();
            for sections in results {
                for section in sections? {
                    writeln!(out, "{}", section.to_line())?;
                }
            }
            writeln!(out, "done")?;
        }
        Command::Barrier { participants, index, rounds, barrier_offset, slots_offset } => {
            let mut ep = transport.endpoint()?;
            let mut barrier = RemoteBarrier::new(at(barrier_offset), at(barrier_offset + 8), participants)?;
            let slot = |i: u64| at(slots_offset + 8 * i);
            for r in 1..=rounds {
                ep.write_u64(slot(index), r)?;
                barrier.wait(&mut ep)?;
                for other in 0..participants {
                    let seen = ep.read_u64(slot(other))?;
                    if seen < r {
                        return Err(format!(
                            "participant {index} passed round {r} before {other} arrived (it is at {seen})"
                        )
                        .into());
                    }
                }
                barrier.wait(&mut ep)?;
            }
            println!("done {rounds} rounds");
        }
    }
    Ok(())
}

/// The critical section: READ the counter, WRITE it plus one; or, when `stall`, READ, say
/// `holding` and never finish.
fn section<E: Endpoint>(ep: &mut E, counter: GlobalAddr, stall: bool) -> Result<(), String> {
    let n = ep.read_u64(counter).map_err(|e| e.to_string())?;
    if stall {
        println!("holding");
        let _ = std::io::stdout().flush();
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    // Posted, not waited for: the release comes after it on the same queue pair.
    ep.post_write_u64(counter, n + 1).map_err(|e| e.to_string())
}

/// One reader-writer section: a writer increments the counter and rewrites the record with its
/// value, a reader checks the record's four words agree. Reads the event clock on entry and
/// exit.
fn rw_section<E: Endpoint>(
    lock: &RwLock,
    ep: &mut E,
    mode: Mode,
    counter: GlobalAddr,
    record: GlobalAddr,
    clock: GlobalAddr,
) -> Result<Section, String> {
    let fail = |e: &dyn std::fmt::Display| e.to_string();
    let mut g = lock.lock(ep, mode).map_err(|e| fail(&e))?;
    let ticket = g.ticket();
    let ep = g.endpoint();
    let enter = ep.faa(clock, 1).map_err(|e| fail(&e))?;
    if mode == Mode::Write {
        let n = ep.read_u64(counter).map_err(|e| fail(&e))? + 1;
        ep.write_u64(counter, n).map_err(|e| fail(&e))?;
        // One WRITE per word, so a reader let in too early could see a mix.
        for w in 0..4 {
            ep.write_u64(record.checked_add(8 * w).expect("in the pool"), n).map_err(|e| fail(&e))?;
        }
    } else {
        let mut words = [0u8; 32];
        ep.read(record, &mut words).map_err(|e| fail(&e))?;
        if !words.chunks(8).all(|w| w == &words[..8]) {
            return Err(format!("torn record under the read lock: {words:?}"));
        }
    }
    let exit = ep.faa(clock, 1).map_err(|e| fail(&e))?;
    g.unlock().map_err(|e| fail(&e))?;
    Ok(Section { mode, generation: ticket.generation, position: ticket.position(), enter, exit })
}
