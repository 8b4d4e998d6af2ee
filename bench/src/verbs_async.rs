//! `rdmem-bench verbs --async`: the async face ([`rdmem_core::aio`]) next to the sync one, on
//! the same device and memory node, in the same run.
//!
//! - Latency: one operation outstanding, 8 bytes, each timed with the TSC: `ep.op().await`
//!   inside one [`block_on`] against the sync endpoint's call, with the default options and
//!   with `coalesce: false` (no yield before posting). READ and WRITE go in place from
//!   a registered buffer on both faces (the async face moves it in and back).
//! - Throughput: 8-byte READs from one thread, with `depth` futures in flight (`depth` tasks
//!   each awaiting its READs in turn) against the sync face's batches of `depth` (one
//!   doorbell, one wait per batch).
//!
//! Each point is measured `--rounds` times, alternating sync and async; the ratio is the median
//! of the rounds' own ratios (async / sync for latency, async / sync for throughput).

use std::time::Instant;

use hdrhistogram::Histogram;
use rdmem_core::aio::{AsyncEndpoint, AsyncOptions, LocalFuture, block_on, join_all};
use rdmem_core::{GlobalAddr, Transport};
use rdmem_transport_rdma::RdmaTransport;

use crate::report::{Printer, Row, median, new_histogram};
use crate::tsc::Tsc;
use crate::verbs::{self, OpName, VerbsArgs, WARMUP};

type BoxError = Box<dyn std::error::Error>;

/// The latency rows of `ops` and the throughput rows of `depths`, sync and async.
pub(crate) fn run(
    args: &VerbsArgs,
    transport: &RdmaTransport,
    out: &mut Printer,
    tsc: &Tsc,
    base: GlobalAddr,
) -> Result<(), BoxError> {
    let (iters, throughput_ops, rounds) = (args.iters, args.throughput_ops, args.rounds);
    let (ops, depths) = (&args.ops, &args.async_depths);
    for &op in ops.iter() {
        // The default (coalescing: one yield before posting) and coalescing off.
        let (mut sync, mut asy, mut ratios) = (Vec::new(), [Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
        let (mut sync_all, mut async_all) = (new_histogram()?, [new_histogram()?, new_histogram()?]);
        for _ in 0..rounds.max(1) {
            let s = verbs::latency(transport, tsc, base, op, 8, iters)?;
            let s50 = s.value_at_quantile(0.5) as f64 / 1000.0;
            sync.push(s50);
            sync_all.add(&s)?;
            for (k, coalesce) in [true, false].into_iter().enumerate() {
                let a = latency(transport, tsc, base, op, iters, coalesce)?;
                let a50 = a.value_at_quantile(0.5) as f64 / 1000.0;
                asy[k].push(a50);
                ratios[k].push(a50 / s50);
                async_all[k].add(&a)?;
            }
        }
        let mut row = Row::latency("rdmem", op.name(), 8, 1, 1, &sync_all);
        row.p50_us = Some(median(&sync));
        out.print(&row);
        for (k, note) in
            ["one future at a time (default options)", "one future at a time, coalesce: false"].into_iter().enumerate()
        {
            let mut row = Row::latency("rdmem-async", op.name(), 8, 1, 1, &async_all[k]);
            row.p50_us = Some(median(&asy[k]));
            row.ratio_vs_sync = Some(median(&ratios[k]));
            row.note = Some(format!("{note}; ratio = async / sync median latency"));
            out.print(&row);
        }
    }
    for &depth in depths.iter() {
        let (mut sync, mut asy, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let mut totals = ((0, 0.0), (0, 0.0));
        for _ in 0..rounds.max(1) {
            let (sn, ss) = verbs::throughput(transport, base, OpName::Read, 8, depth, 1, throughput_ops)?;
            let (an, asec) = throughput(transport, base, depth, throughput_ops)?;
            let (sm, am) = (sn as f64 / ss / 1e6, an as f64 / asec / 1e6);
            sync.push(sm);
            asy.push(am);
            ratios.push(am / sm);
            totals = ((totals.0.0 + sn, totals.0.1 + ss), (totals.1.0 + an, totals.1.1 + asec));
        }
        let mut row = Row::throughput("verbs", "rdmem", "read", 8, 1, depth, totals.0.0, totals.0.1);
        row.mops = Some(median(&sync));
        row.gbps = Some(median(&sync) * 8e6 / 1e9);
        row.note = Some(format!("sync batches of {depth}"));
        out.print(&row);
        let mut row = Row::throughput("verbs", "rdmem-async", "read", 8, 1, depth, totals.1.0, totals.1.1);
        row.mops = Some(median(&asy));
        row.gbps = Some(median(&asy) * 8e6 / 1e9);
        row.ratio_vs_sync = Some(median(&ratios));
        row.note = Some(format!("{depth} futures in flight; ratio = async / sync Mops"));
        out.print(&row);
    }
    Ok(())
}

/// One future at a time, each timed, all inside one `block_on`.
fn latency(
    transport: &RdmaTransport,
    tsc: &Tsc,
    base: GlobalAddr,
    op: OpName,
    iters: u64,
    coalesce: bool,
) -> Result<Histogram<u64>, BoxError> {
    let ep = AsyncEndpoint::with_options(transport.endpoint()?, AsyncOptions { coalesce, ..AsyncOptions::default() })?;
    let mut buf = Some(ep.buffer(8)?);
    let word = base.checked_add(4096).expect("in range");
    block_on(async {
        let mut hist = new_histogram()?;
        let mut expected = ep.read_u64(word).await?;
        for i in 0..WARMUP + iters {
            let start = tsc.now();
            match op {
                OpName::Read | OpName::Write => {
                    let b = buf.take().expect("the buffer comes back");
                    let (r, b) = if op == OpName::Read {
                        ep.read_into(base, b, 0..8).await
                    } else {
                        ep.write_from(base, b, 0..8).await
                    };
                    buf = Some(b);
                    r?;
                }
                OpName::Cas => {
                    let old = ep.cas(word, expected, expected.wrapping_add(1)).await?;
                    expected = if old == expected { expected.wrapping_add(1) } else { old };
                }
                OpName::Faa => {
                    ep.faa(word, 1).await?;
                }
            }
            let end = tsc.now();
            if i >= WARMUP {
                hist.record(tsc.nanos(start, end).max(1))?;
            }
        }
        Ok(hist)
    })
}

/// `ops` 8-byte READs with `depth` futures in flight from one thread: `depth` tasks, each
/// awaiting its READs in turn, joined with [`join_all`]; (operations, seconds). (A
/// `FuturesUnordered` refilled per completion measured 5-15% slower here: it allocates a task
/// per future, which is the harness's cost, not the endpoint's.)
fn throughput(transport: &RdmaTransport, base: GlobalAddr, depth: usize, ops: u64) -> Result<(u64, f64), BoxError> {
    let ep = AsyncEndpoint::new(transport.endpoint()?)?;
    let region = base.checked_add(verbs::THREAD_STRIDE).expect("in range");
    let addr = |k: u64| region.checked_add(8 * (k % 4096)).expect("in range");
    let per = ops.div_ceil(depth as u64);
    block_on(async {
        // Warm up (slots, queue pairs, caches), then time.
        for k in 0..WARMUP {
            ep.read_u64(addr(k)).await?;
        }
        let ep = &ep;
        let start = Instant::now();
        let tasks: Vec<LocalFuture<'_, rdmem_core::Result<()>>> = (0..depth as u64)
            .map(|t| {
                Box::pin(async move {
                    for i in 0..per {
                        ep.read_u64(addr(t * per + i)).await?;
                    }
                    Ok(())
                }) as _
            })
            .collect();
        for r in join_all(tasks).await {
            r?;
        }
        Ok((per * depth as u64, start.elapsed().as_secs_f64()))
    })
}
