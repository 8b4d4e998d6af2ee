//! `rdmem-bench verbs`: latency and throughput of READ, WRITE, CAS and FAA through rdmem's RDMA
//! endpoint, optionally next to perftest on the same device in the same run.
//!
//! Latency: one operation outstanding, one thread, each operation timed with the TSC (see
//! [`crate::tsc`]: `Instant::now()` costs about 0.75 us in the VM), p50/p99/p999 from an
//! hdrhistogram. READ and WRITE use a registered buffer (in place, no copy), like perftest.
//! With `--rounds N` every compared point is measured N times, alternating rdmem and perftest;
//! the ratio reported is the median of the rounds' own ratios (a round and the perftest run
//! right after it see the same machine; the host's speed drifts by 10% over seconds), and the
//! figures are the medians of the rounds'.
//! Throughput: each thread posts batches of `batch` operations with one doorbell and waits for
//! the batch; Mops and GB/s over the whole run, timed once around it.
//!
//! Comparing like with like: `ib_read_lat` and `ib_atomic_lat` time a full round trip per
//! operation, as we do, and their `t_typical` is a median. `ib_write_lat` times a ping-pong
//! and reports half a round trip, while our WRITE waits for its acknowledgement (a full round
//! trip); the ratio for WRITE divides by twice perftest's figure, and the row says so. That is
//! fair for small writes only: perftest's round trip carries the payload both ways.
//! `ib_read_bw -l N` posts N READs per doorbell, our batch of N.

use clap::Args;
use hdrhistogram::Histogram;
use rdmem_core::{Endpoint, GlobalAddr, LocalBuffer, Transport};
use rdmem_transport_rdma::{RdmaBuffer, RdmaEndpoint, RdmaTransport};

use crate::harness;
use crate::perftest::{self, LatencyTest, Target};
use crate::report::{Printer, Row, median, new_histogram};
use crate::tsc::Tsc;

/// Options of `rdmem-bench verbs`.
#[derive(Args, Debug)]
pub(crate) struct VerbsArgs {
    /// Memory node `host:port` (repeatable; default: RDMEM_MEMNODES or the config file, else a
    /// `rdmem-memnode` process it starts on this machine, on the same device).
    #[arg(long = "memnode")]
    memnodes: Vec<String>,
    /// Operations to measure.
    #[arg(long, value_delimiter = ',', default_value = "read,write,cas,faa")]
    pub(crate) ops: Vec<OpName>,
    /// Transfer sizes in bytes for READ and WRITE latency (atomics are always 8 bytes).
    #[arg(long, value_delimiter = ',', default_value = "8,64,512,4096,65536,1048576")]
    sizes: Vec<usize>,
    /// Operations per doorbell for the throughput runs.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    batches: Vec<usize>,
    /// Thread counts for the throughput runs (each thread has its own queue pair).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Timed operations per latency round (sizes of 64 KiB and more use a tenth).
    #[arg(long, default_value_t = 3000)]
    pub(crate) iters: u64,
    /// Operations per thread per throughput point.
    #[arg(long, default_value_t = 16384)]
    pub(crate) throughput_ops: u64,
    /// Sizes for the throughput runs of READ and WRITE.
    #[arg(long, value_delimiter = ',', default_value = "8,4096")]
    throughput_sizes: Vec<usize>,
    /// Rounds per compared point, alternating rdmem and perftest; ratios and figures are
    /// medians over the rounds.
    #[arg(long, default_value_t = 7)]
    pub(crate) rounds: usize,
    /// Run the matching perftest tools on the same device in the same run and print ratios.
    #[arg(long)]
    compare_perftest: bool,
    /// TCP port perftest's server uses.
    #[arg(long, default_value_t = 18515)]
    perftest_port: u16,
    /// Across machines: `HOST:PORT` of an `rdmem-bench perftest-server` on the memory node's
    /// machine, so perftest runs between the same two machines as rdmem (needs --memnode on
    /// that machine). Rows then say `"cross_machine": true`.
    #[arg(long, requires = "memnodes")]
    perftest_server: Option<String>,
    /// Measure the async face instead: 8-byte latency of --ops next to the sync face, and
    /// 8-byte READ throughput with --async-depths futures in flight next to sync batches of
    /// the same depth.
    #[arg(long = "async", conflicts_with_all = ["compare_perftest", "perftest_server"])]
    async_face: bool,
    /// Futures in flight for the --async throughput rows.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    pub(crate) async_depths: Vec<usize>,
    /// Print one JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum OpName {
    Read,
    Write,
    Cas,
    Faa,
}

impl OpName {
    pub(crate) fn name(self) -> &'static str {
        match self {
            OpName::Read => "read",
            OpName::Write => "write",
            OpName::Cas => "cas",
            OpName::Faa => "faa",
        }
    }

    fn is_atomic(self) -> bool {
        matches!(self, OpName::Cas | OpName::Faa)
    }

    fn perftest(self) -> LatencyTest {
        match self {
            OpName::Read => LatencyTest::Read,
            OpName::Write => LatencyTest::Write,
            OpName::Cas => LatencyTest::CompareSwap,
            OpName::Faa => LatencyTest::FetchAdd,
        }
    }
}

/// Each thread works in its own part of the pool, this far apart.
pub(crate) const THREAD_STRIDE: u64 = 64 << 20;
pub(crate) const WARMUP: u64 = 200;

pub(crate) fn run(args: &VerbsArgs) -> Result<(), Box<dyn std::error::Error>> {
    let max_threads = args.threads.iter().copied().max().unwrap_or(1).max(1);
    let max_size = args.sizes.iter().chain(&args.throughput_sizes).copied().max().unwrap_or(8);
    let max_batch = args.batches.iter().copied().max().unwrap_or(1).max(1);
    let need = THREAD_STRIDE * max_threads as u64;
    if max_size * max_batch > THREAD_STRIDE as usize {
        return Err(format!("size x batch must stay under {THREAD_STRIDE} bytes").into());
    }
    let cluster = harness::connect(&args.memnodes, need)?;
    let transport = &cluster.transport;
    let node = transport.nodes()[0];
    if node.pool_size < need {
        return Err(format!("{} has {} bytes; this run needs {need}", node.id, node.pool_size).into());
    }
    let device = transport.device();
    let remote_host =
        args.perftest_server.as_deref().map(|a| a.rsplit_once(':').map_or(a, |(host, _)| host).to_owned());
    let target = Target {
        remote: args.perftest_server.clone(),
        device: device.name().to_owned(),
        gid_index: Some(device.gid_index()),
        ip: remote_host.clone().unwrap_or_else(|| std::env::var("RDMEM_IP").unwrap_or_else(|_| "127.0.0.1".into())),
        port: args.perftest_port,
    };
    let cross_machine = args.perftest_server.is_some();
    if args.compare_perftest && remote_host.is_none() && std::env::var("RDMEM_IP").is_err() {
        eprintln!("rdmem-bench: RDMEM_IP is not set; perftest's server is reached at 127.0.0.1");
    }
    let mut out = Printer::new(args.json).cross_machine(cross_machine);
    let tsc = Tsc::calibrate();
    let base = GlobalAddr::new(node.id, 0).expect("offset 0");
    if args.async_face {
        if args.async_depths.iter().any(|&d| d == 0 || d > rdmem_core::aio::MAX_SLOTS as usize) {
            return Err(format!("--async-depths must be 1 to {}", rdmem_core::aio::MAX_SLOTS).into());
        }
        return crate::verbs_async::run(args, transport, &mut out, &tsc, base);
    }

    for &op in &args.ops {
        let sizes: &[usize] = if op.is_atomic() { &[8] } else { &args.sizes };
        for &size in sizes {
            let iters = if size >= 65536 { (args.iters / 10).max(100) } else { args.iters };
            // Alternate rdmem and perftest, round after round, so drifts in the VM hit both.
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let mut merged = new_histogram()?;
            for _ in 0..args.rounds.max(1) {
                let hist = latency(transport, &tsc, base, op, size, iters)?;
                ours.push(hist.value_at_quantile(0.5) as f64 / 1000.0);
                merged.add(&hist)?;
                if args.compare_perftest {
                    theirs.push(perftest::run_latency(&target, op.perftest(), size, iters)?);
                }
            }
            let mut row = Row::latency("rdmem", op.name(), size, 1, 1, &merged);
            row.p50_us = Some(median(&ours));
            if let Some(last) = theirs.last() {
                let typical = median(&theirs.iter().map(|t| t.typical_us).collect::<Vec<_>>());
                // ib_write_lat reports half a round trip: compare our round trip with twice it.
                let factor = if last.half_round_trip { 2.0 } else { 1.0 };
                // The median of each round's own ratio: a round and the perftest run right
                // after it see the same machine, so slow drifts of the host cancel out.
                let ratios: Vec<f64> = ours.iter().zip(&theirs).map(|(o, t)| o / (t.typical_us * factor)).collect();
                row.ratio_vs_perftest = Some(median(&ratios));
                if last.half_round_trip {
                    row.note = Some("ratio vs 2 x ib_write_lat (half a round trip); fair for small sizes".into());
                }
                out.print(&row);
                out.print(&Row {
                    implementation: "perftest",
                    p50_us: Some(typical),
                    p99_us: Some(median(&theirs.iter().map(|t| t.p99_us).collect::<Vec<_>>())),
                    p999_us: Some(median(&theirs.iter().map(|t| t.p999_us).collect::<Vec<_>>())),
                    ops: theirs.iter().map(|t| t.iterations).sum(),
                    ratio_vs_perftest: None,
                    note: last.half_round_trip.then(|| "half round trip".to_owned()),
                    ..row.clone()
                });
            } else {
                out.print(&row);
            }
        }
    }

    for &op in &args.ops {
        let sizes: &[usize] = if op.is_atomic() { &[8] } else { &args.throughput_sizes };
        for &size in sizes {
            for &batch in &args.batches {
                for &threads in &args.threads {
                    // perftest's ib_read_bw is one thread; compare the one-thread READ rows.
                    let compare = args.compare_perftest && op == OpName::Read && threads == 1;
                    let (mut rates, mut theirs, mut ratios, mut total) = (Vec::new(), Vec::new(), Vec::new(), (0, 0.0));
                    for _ in 0..if compare { args.rounds.max(1) } else { 1 } {
                        let (ops, seconds) =
                            throughput(transport, base, op, size, batch, threads, args.throughput_ops)?;
                        rates.push(ops as f64 / seconds / 1e6);
                        total = (total.0 + ops, total.1 + seconds);
                        if compare {
                            let iters = args.throughput_ops.div_ceil(batch as u64) * batch as u64;
                            let bw = perftest::run_read_bandwidth(&target, size, batch as u32, iters)?;
                            ratios.push(rates[rates.len() - 1] / bw.msg_rate_mpps);
                            theirs.push(bw);
                        }
                    }
                    let mut row = Row::throughput("verbs", "rdmem", op.name(), size, threads, batch, total.0, total.1);
                    row.mops = Some(median(&rates));
                    row.gbps = Some(median(&rates) * 1e6 * size as f64 / 1e9);
                    if compare {
                        row.ratio_vs_perftest = Some(median(&ratios));
                        out.print(&row);
                        let mpps = median(&theirs.iter().map(|t| t.msg_rate_mpps).collect::<Vec<_>>());
                        out.print(&Row {
                            implementation: "perftest",
                            mops: Some(mpps),
                            gbps: Some(median(&theirs.iter().map(|t| t.bw_avg_gbps).collect::<Vec<_>>())),
                            ops: theirs.iter().map(|t| t.iterations).sum(),
                            ratio_vs_perftest: None,
                            note: Some(format!("ib_read_bw -l {batch}")),
                            ..row.clone()
                        });
                    } else {
                        out.print(&row);
                    }
                }
            }
        }
    }
    Ok(())
}

/// One operation at a time, each timed.
pub(crate) fn latency(
    transport: &RdmaTransport,
    tsc: &Tsc,
    base: GlobalAddr,
    op: OpName,
    size: usize,
    iters: u64,
) -> Result<Histogram<u64>, Box<dyn std::error::Error>> {
    let mut ep = transport.endpoint()?;
    let mut buf = ep.buffer(size)?;
    let mut hist = new_histogram()?;
    let word = base.checked_add(4096).expect("in range");
    let mut expected = ep.read_u64(word)?;
    let mut run = |n, hist| timed_ops(&mut ep, &mut buf, tsc, (base, word), op, size, n, &mut expected, hist);
    run(WARMUP, None)?;
    run(iters, Some(&mut hist))?;
    Ok(hist)
}

/// `n` operations `op` on `ep`, one at a time, each timed into `hist` (if any): READ and WRITE
/// of `size` bytes at `at.0` in place from `buf`, CAS and FAA on the word at `at.1`. Every CAS
/// succeeds, as in ib_atomic_lat: `expected` follows the word.
#[allow(clippy::too_many_arguments, reason = "the loop of a latency run, shared by verbs and verbs --async")]
#[inline(never)] // a frame of its own, for profilers
pub(crate) fn timed_ops(
    ep: &mut RdmaEndpoint,
    buf: &mut RdmaBuffer,
    tsc: &Tsc,
    at: (GlobalAddr, GlobalAddr),
    op: OpName,
    size: usize,
    n: u64,
    expected: &mut u64,
    mut hist: Option<&mut Histogram<u64>>,
) -> Result<(), Box<dyn std::error::Error>> {
    let (base, word) = at;
    for _ in 0..n {
        let start = tsc.now();
        match op {
            OpName::Read => ep.read_into(base, buf, 0..size)?,
            OpName::Write => ep.write_from(base, buf, 0..size)?,
            OpName::Cas => *expected = next_expected(*expected, ep.cas(word, *expected, expected.wrapping_add(1))?),
            OpName::Faa => {
                ep.faa(word, 1)?;
            }
        }
        record(hist.as_deref_mut(), tsc, start)?;
    }
    Ok(())
}

/// The next CAS's expected value, from the old value the last one returned.
pub(crate) fn next_expected(expected: u64, old: u64) -> u64 {
    if old == expected { expected.wrapping_add(1) } else { old }
}

/// Records the time since TSC reading `start` into `hist`, if any.
pub(crate) fn record(
    hist: Option<&mut Histogram<u64>>,
    tsc: &Tsc,
    start: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let end = tsc.now();
    if let Some(h) = hist {
        h.record(tsc.nanos(start, end).max(1))?;
    }
    Ok(())
}

/// `threads` threads, each posting `ops_per_thread` operations in batches of `batch`.
pub(crate) fn throughput(
    transport: &RdmaTransport,
    base: GlobalAddr,
    op: OpName,
    size: usize,
    batch: usize,
    threads: usize,
    ops_per_thread: u64,
) -> Result<(u64, f64), Box<dyn std::error::Error>> {
    let rounds = ops_per_thread.div_ceil(batch as u64);
    let (elapsed, results) = harness::timed(threads, |t, start| -> Result<(), rdmem_core::Error> {
        let mut ep = transport.endpoint()?;
        let mut buf = ep.buffer(size * batch)?;
        let region = base.checked_add(THREAD_STRIDE * t as u64).expect("in range");
        let mut olds = vec![0u64; batch];
        start.wait();
        for _ in 0..rounds {
            let mut b = ep.batch();
            match op {
                OpName::Read => {
                    for (i, piece) in buf.reg_slice_mut().chunks(size).enumerate() {
                        b.read_into_slice(region.checked_add((i * size) as u64).expect("in range"), piece);
                    }
                }
                OpName::Write => {
                    for (i, piece) in buf.reg_slice().chunks(size).enumerate() {
                        b.write_from_slice(region.checked_add((i * size) as u64).expect("in range"), piece);
                    }
                }
                OpName::Cas => {
                    for (i, old) in olds.iter_mut().enumerate() {
                        b.cas(region.checked_add(8 * i as u64).expect("in range"), 0, 0, old);
                    }
                }
                OpName::Faa => {
                    for (i, old) in olds.iter_mut().enumerate() {
                        b.faa(region.checked_add(8 * i as u64).expect("in range"), 1, old);
                    }
                }
            }
            b.submit()?;
        }
        Ok(())
    });
    for r in results {
        r?;
    }
    Ok((rounds * batch as u64 * threads as u64, elapsed.as_secs_f64()))
}
