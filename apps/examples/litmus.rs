//! Scope-consistency litmus tests across processes: `rdmem-run -n 3 litmus`.
//!
//! 1. A write made under lock L is seen by the next holder of L (message passing: data and a
//!    flag written under L by rank 0, polled under L by the others).
//! 2. Ranks writing disjoint bytes of one page under different locks both survive a barrier.
//! 3. After a barrier every rank sees every write made before it (each rank writes its share
//!    of an array, without locks; everyone checks the whole array), for several rounds.
//! 4. No stale read after acquiring a lock whose previous holder wrote the page: a counter
//!    incremented under one lock by every rank ends exact.
//! 5. Several threads per rank under several locks: counters under two locks (on their own
//!    pages and on one page they share) end exact, and every task of a queue under a third
//!    lock is taken once. A write belongs to the lock its own thread holds (the scope rule).
//!
//! Every rank checks; any failure prints what was seen and exits with 1 (rdmem-run then fails).

use std::process::ExitCode;

use rdmem_coherence::dsm::{Dsm, DsmOptions};
use rdmem_core::Transport;

fn check(ok: bool, what: String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what) }
}

fn litmus<T: Transport>(dsm: &Dsm<T>) -> Result<(), Box<dyn std::error::Error>> {
    let (rank, size) = (dsm.rank() as u64, dsm.size() as u64);

    // 1. Message passing under a lock.
    let data = dsm.alloc(4096 * 2)?;
    let flag = data.byte_add(4096);
    let _ = dsm.get::<u64>(data)?; // cache the page, so a missing invalidation would show
    dsm.barrier()?;
    if rank == 0 {
        dsm.lock(1)?;
        dsm.set(data, &42u64)?;
        dsm.set(flag, &1u64)?;
        dsm.unlock(1)?;
    } else {
        loop {
            dsm.lock(1)?;
            let (f, v) = (dsm.get::<u64>(flag)?, dsm.get::<u64>(data)?);
            dsm.unlock(1)?;
            if f == 1 {
                check(v == 42, format!("rank {rank}: flag set under lock 1 but data is {v}, not 42"))?;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    dsm.barrier()?;
    println!("rank {rank}: a write under a lock is seen by the next holder: ok");

    // 2. Disjoint bytes of one page under different locks.
    let page = dsm.alloc(4096)?;
    dsm.lock(10 + rank)?;
    dsm.set(page.byte_add(8 * rank), &(1000 + rank))?;
    dsm.unlock(10 + rank)?;
    dsm.barrier()?;
    for r in 0..size {
        let v: u64 = dsm.get(page.byte_add(8 * r))?;
        check(v == 1000 + r, format!("rank {rank}: rank {r}'s bytes of the shared page hold {v}"))?;
    }
    println!("rank {rank}: disjoint bytes of one page both survive a barrier: ok");

    // 3. Everything written before a barrier is seen after it.
    let n = 4 * 4096 / 8;
    let array = dsm.alloc(8 * n)?;
    for round in 1..=3u64 {
        for i in (rank..n).step_by(size as usize) {
            dsm.set(array.byte_add(8 * i), &(round * 100_000 + i))?;
        }
        dsm.barrier()?;
        let mut all = vec![0u64; n as usize];
        dsm.read_slice(array, &mut all)?;
        if let Some((i, v)) = all.iter().enumerate().find(|&(i, &v)| v != round * 100_000 + i as u64) {
            return Err(format!("rank {rank} round {round}: element {i} is {v} after the barrier").into());
        }
        dsm.barrier()?;
    }
    println!("rank {rank}: after a barrier every write before it is seen: ok");

    // 4. A counter under one lock.
    let counter = dsm.alloc(64)?;
    let rounds = 20;
    for _ in 0..rounds {
        dsm.lock(3)?;
        let v: u64 = dsm.get(counter)?;
        dsm.set(counter, &(v + 1))?;
        dsm.unlock(3)?;
    }
    dsm.barrier()?;
    let v: u64 = dsm.get(counter)?;
    check(v == rounds * size, format!("rank {rank}: the counter is {v}, not {}: a stale read", rounds * size))?;
    println!("rank {rank}: no stale read after acquiring a lock: ok");

    // 5. Threads of every rank under several locks, repeated.
    for repeat in 0..10 {
        threads_under_several_locks(dsm, 2 + repeat % 3, 20)?;
    }
    println!("rank {rank}: several threads per rank under several locks lose no update: ok");
    Ok(())
}

fn threads_under_several_locks<T: Transport>(
    dsm: &Dsm<T>,
    threads: u64,
    rounds: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    const LOCKS: u64 = 2;
    const TASKS: u64 = 64;
    let (rank, size) = (dsm.rank() as u64, dsm.size() as u64);
    // Every third rank's threads use both locks; the others' threads one lock each, so they
    // never read the other lock's notices (which would hide a misattributed write).
    let lock_of = |rank: u64, thread: u64| if rank % 3 == 0 { thread % LOCKS } else { rank % LOCKS };
    let own = dsm.alloc(4096 * (LOCKS + 1))?;
    let shared = own.byte_add(4096 * LOCKS);
    let queue = dsm.alloc(8 * (1 + TASKS))?;
    for l in 0..=LOCKS {
        let _: u64 = dsm.get(own.byte_add(4096 * l))?; // cached, so a missing invalidation shows
    }
    let _: u64 = dsm.get(queue)?;
    dsm.barrier()?;
    std::thread::scope(|s| -> Result<(), String> {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<(), rdmem_coherence::dsm::DsmError> {
                    let l = lock_of(rank, t);
                    for _ in 0..rounds {
                        dsm.lock(l)?;
                        let n: u64 = dsm.get(own.byte_add(4096 * l))?;
                        dsm.set(own.byte_add(4096 * l), &(n + 1))?;
                        std::thread::yield_now(); // another thread may unlock its lock now
                        let m: u64 = dsm.get(shared.byte_add(8 * l))?;
                        dsm.set(shared.byte_add(8 * l), &(m + 1))?;
                        dsm.unlock(l)?;
                    }
                    loop {
                        dsm.lock(LOCKS)?;
                        let next: u64 = dsm.get(queue)?;
                        if next == TASKS {
                            return dsm.unlock(LOCKS);
                        }
                        dsm.set(queue, &(next + 1))?;
                        let slot = queue.byte_add(8 * (1 + next));
                        let taken: u64 = dsm.get(slot)?;
                        dsm.set(slot, &(taken + 1))?;
                        dsm.unlock(LOCKS)?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "a worker thread panicked".to_string())?.map_err(|e| e.to_string())?;
        }
        Ok(())
    })?;
    dsm.barrier()?;
    for l in 0..LOCKS {
        let sections = (0..size).map(|r| (0..threads).filter(|&t| lock_of(r, t) == l).count() as u64).sum::<u64>();
        let (n, m): (u64, u64) = (dsm.get(own.byte_add(4096 * l))?, dsm.get(shared.byte_add(8 * l))?);
        check(
            n == sections * rounds && m == n,
            format!("rank {rank}: lock {l}'s counters are {n} and {m}, not {}: lost updates", sections * rounds),
        )?;
    }
    let mut taken = vec![0u64; TASKS as usize];
    dsm.read_slice(queue.byte_add(8), &mut taken)?;
    if let Some((task, n)) = taken.iter().enumerate().find(|&(_, &n)| n != 1) {
        return Err(format!("rank {rank}: task {task} was taken {n} times").into());
    }
    dsm.barrier()?;
    Ok(())
}

fn main() -> ExitCode {
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        let dsm = Dsm::join(DsmOptions::from_env()?)?;
        litmus(&dsm)?;
        dsm.leave()?;
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("litmus: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
