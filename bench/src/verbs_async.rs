//! `rdmem-bench verbs --async`: the async face ([`rdmem_core::aio`]) next to the sync one, on
//! the same device and memory node, in the same run.
//!
//! - Latency: one operation outstanding, 8 bytes, each timed with the TSC: `ep.op().await`
//!   against the sync endpoint's call, with the default options and with `coalesce: false`
//!   (no yield before posting). The three endpoints take turns in blocks of [`BLOCK`]
//!   operations (the async ones inside a [`block_on`] per block), so that the VM's drifting
//!   speed hits all three alike. READ and WRITE go in place from a registered buffer on both
//!   faces (the async face moves it in and back).
//! - Throughput: 8-byte READs from one thread, with `depth` futures in flight (`depth` tasks
//!   each awaiting its READs in turn) against the sync face's batches of `depth` (one
//!   doorbell, one wait per batch), the two taking turns in blocks of [`THROUGHPUT_BLOCK`].
//!
//! Each point is measured `--rounds` times (throughput alternating sync and async); the ratio is
//! the median of the rounds' own ratios (async / sync: median latencies, or Mops).

use std::time::Instant;

use hdrhistogram::Histogram;
use rdmem_core::aio::{AsyncEndpoint, AsyncOptions, LocalFuture, block_on, join_all};
use rdmem_core::{Endpoint, GlobalAddr, LocalBuffer, Transport};
use rdmem_transport_rdma::{RdmaBuffer, RdmaEndpoint, RdmaTransport};

use crate::report::{Printer, Row, median, new_histogram};
use crate::tsc::Tsc;
use crate::verbs::{self, OpName, VerbsArgs, WARMUP};

type BoxError = Box<dyn std::error::Error>;

/// Operations per turn of each endpoint in the latency rounds.
const BLOCK: u64 = 100;

/// Operations per turn of each face in the throughput rounds.
const THROUGHPUT_BLOCK: u64 = 4096;

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
            let [s, a, b] = latency(transport, tsc, base, op, iters)?;
            let s50 = s.value_at_quantile(0.5) as f64 / 1000.0;
            sync.push(s50);
            sync_all.add(&s)?;
            for (k, a) in [a, b].into_iter().enumerate() {
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
            let ((sn, ss), (an, asec)) = throughput(transport, base, depth, throughput_ops)?;
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

/// One round of latency: `iters` operations on each of a sync endpoint, an async one with the
/// default options and one with `coalesce: false`, taking turns in blocks of [`BLOCK`]; their
/// histograms in that order.
fn latency(
    transport: &RdmaTransport,
    tsc: &Tsc,
    base: GlobalAddr,
    op: OpName,
    iters: u64,
) -> Result<[Histogram<u64>; 3], BoxError> {
    let mut sync = transport.endpoint()?;
    let mut sync_buf = sync.buffer(8)?;
    let mut faces = Vec::new();
    for coalesce in [true, false] {
        let ep =
            AsyncEndpoint::with_options(transport.endpoint()?, AsyncOptions { coalesce, ..AsyncOptions::default() })?;
        let buf = Some(ep.buffer(8)?);
        faces.push((ep, buf));
    }
    let word = base.checked_add(4096).expect("in range");
    // Every CAS succeeds, as in ib_atomic_lat: the three endpoints share the expected value.
    let mut expected = sync.read_u64(word)?;
    let mut hists = [new_histogram()?, new_histogram()?, new_histogram()?];
    // A first untimed turn each (warm-up), then the timed ones.
    let turns = iters.div_ceil(BLOCK);
    for turn in 0..=turns {
        let n = if turn == 0 { WARMUP.min(BLOCK) } else { BLOCK.min(iters - (turn - 1) * BLOCK) };
        let [hs, ha, hb] = &mut hists;
        let timed = turn > 0;
        verbs::timed_ops(&mut sync, &mut sync_buf, tsc, (base, word), op, 8, n, &mut expected, timed.then_some(hs))?;
        for ((ep, buf), h) in faces.iter_mut().zip([ha, hb]) {
            async_turn(ep, buf, tsc, (base, word), op, n, &mut expected, timed.then_some(h))?;
        }
    }
    Ok(hists)
}

/// [`verbs::timed_ops`] (8 bytes) on an async endpoint: one future at a time inside one
/// `block_on`, each timed into `hist` (if any).
#[allow(clippy::too_many_arguments, reason = "one turn of the loop above, spelled out")]
#[inline(never)] // a frame of its own, for profilers (as timed_ops)
fn async_turn(
    ep: &AsyncEndpoint<RdmaEndpoint>,
    buf: &mut Option<RdmaBuffer>,
    tsc: &Tsc,
    at: (GlobalAddr, GlobalAddr),
    op: OpName,
    n: u64,
    expected: &mut u64,
    mut hist: Option<&mut Histogram<u64>>,
) -> Result<(), BoxError> {
    let (base, word) = at;
    block_on(async {
        for _ in 0..n {
            let start = tsc.now();
            match op {
                OpName::Read | OpName::Write => {
                    let b = buf.take().expect("the buffer comes back");
                    let (r, b) = if op == OpName::Read {
                        ep.read_into(base, b, 0..8).await
                    } else {
                        ep.write_from(base, b, 0..8).await
                    };
                    *buf = Some(b);
                    r?;
                }
                OpName::Cas => {
                    *expected =
                        verbs::next_expected(*expected, ep.cas(word, *expected, expected.wrapping_add(1)).await?);
                }
                OpName::Faa => {
                    ep.faa(word, 1).await?;
                }
            }
            verbs::record(hist.as_deref_mut(), tsc, start)?;
        }
        Ok(())
    })
}

/// One round of throughput: `ops` 8-byte READs from one thread on each face, taking turns in
/// blocks of [`THROUGHPUT_BLOCK`]: the sync face in batches of `depth` (one doorbell, one wait
/// each), the async one with `depth` futures in flight (`depth` tasks, each awaiting its READs
/// in turn, joined with [`join_all`]); (operations, seconds) of each. (A `FuturesUnordered`
/// refilled per completion measured 5-15% slower here: it allocates a task per future, which is
/// the harness's cost, not the endpoint's.)
#[allow(clippy::type_complexity, reason = "two (operations, seconds) pairs")]
fn throughput(
    transport: &RdmaTransport,
    base: GlobalAddr,
    depth: usize,
    ops: u64,
) -> Result<((u64, f64), (u64, f64)), BoxError> {
    let mut sync = transport.endpoint()?;
    let mut buf = sync.buffer(8 * depth)?;
    let ep = AsyncEndpoint::new(transport.endpoint()?)?;
    let region = base.checked_add(verbs::THREAD_STRIDE).expect("in range");
    let addr = |k: u64| region.checked_add(8 * (k % 4096)).expect("in range");
    let per_block = THROUGHPUT_BLOCK.div_ceil(depth as u64); // per task, or batches per block
    let blocks = ops.div_ceil(per_block * depth as u64);
    let (mut sync_secs, mut async_secs) = (0.0, 0.0);
    // Warm up both (queue pairs, slots, caches), then time.
    for k in 0..WARMUP {
        sync.read_u64(addr(k))?;
        block_on(ep.read_u64(addr(k)))?;
    }
    for _ in 0..blocks {
        let start = Instant::now();
        for _ in 0..per_block {
            let mut b = sync.batch();
            for (i, piece) in buf.reg_slice_mut().chunks(8).enumerate() {
                b.read_into_slice(addr(i as u64), piece);
            }
            b.submit()?;
        }
        sync_secs += start.elapsed().as_secs_f64();
        let ep = &ep;
        block_on(async {
            let start = Instant::now();
            let tasks: Vec<LocalFuture<'_, rdmem_core::Result<()>>> = (0..depth as u64)
                .map(|t| {
                    Box::pin(async move {
                        for i in 0..per_block {
                            ep.read_u64(addr(t * per_block + i)).await?;
                        }
                        Ok(())
                    }) as _
                })
                .collect();
            for r in join_all(tasks).await {
                r?;
            }
            async_secs += start.elapsed().as_secs_f64();
            Ok::<_, rdmem_core::Error>(())
        })?;
    }
    let n = blocks * per_block * depth as u64;
    Ok(((n, sync_secs), (n, async_secs)))
}
