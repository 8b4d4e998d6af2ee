//! Result rows: one JSON object per line (`--json`) or a human table, and latency summaries
//! from an hdrhistogram.

use std::sync::OnceLock;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// The suite's progress line, once started: every row printed shows on it.
static PROGRESS: OnceLock<ProgressBar> = OnceLock::new();

/// `rdmem-bench suite`'s progress line on stderr: the benchmark running, the results so far
/// and the time taken (drawn only when stderr is a terminal, so logs and pipes stay clean).
pub(crate) struct Progress {
    bar: &'static ProgressBar,
}

impl Progress {
    /// A line for the benchmarks `parts`, in order.
    pub(crate) fn start(parts: &[&str]) -> Progress {
        let bar = PROGRESS.get_or_init(|| {
            let bar = ProgressBar::new(parts.len() as u64);
            let style = ProgressStyle::with_template("{elapsed_precise} [{bar:12}] {pos}/{len} {prefix}: {msg}")
                .expect("a valid template");
            bar.set_style(style.progress_chars("=> "));
            bar.enable_steady_tick(std::time::Duration::from_millis(500));
            bar
        });
        Progress { bar }
    }

    /// `name` starts (the one before it is done).
    pub(crate) fn part(&self, name: &str) {
        if !self.bar.prefix().is_empty() {
            self.bar.inc(1);
        }
        self.bar.set_prefix(name.to_owned());
        self.bar.set_message("starting");
    }

    /// The last part is done: the line goes.
    pub(crate) fn finish(&self) {
        self.bar.inc(1);
        self.bar.finish_and_clear();
    }
}

/// Shows `row` on the progress line, if there is one.
fn show_progress(row: &Row) {
    if let Some(bar) = PROGRESS.get() {
        bar.set_message(format!(
            "{} {} {} B, {} thread(s), batch {}",
            row.implementation, row.op, row.size, row.threads, row.batch
        ));
    }
}

/// One result: a latency row (p50/p99/p999) or a throughput row (Mops, GB/s).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub bench: &'static str,
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub op: &'static str,
    pub size: usize,
    pub threads: usize,
    /// Processes taking part (lock rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<usize>,
    pub batch: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p999_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbps: Option<f64>,
    /// Operations measured.
    pub ops: u64,
    /// Network operations per operation (allocator: per alloc+free pair).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdma_ops_per_op: Option<f64>,
    /// rdmem / perftest for the matching perftest row of the same run (median latency, or
    /// throughput), when one was run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_vs_perftest: Option<f64>,
    /// The async face over the sync one in the same run (`verbs --async`): latency for
    /// latency rows, throughput for throughput rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_vs_sync: Option<f64>,
    /// Share of reader-writer sections that read (lock rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_share: Option<f64>,
    /// Hits over accesses (cache rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hit_ratio: Option<f64>,
    /// The hit ratio of an ideal cache of the same size: the share of accesses to the most
    /// popular pages that fit (zipfian cache rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ideal_hit_ratio: Option<f64>,
    /// Cache capacity in bytes (cache rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_bytes: Option<u64>,
    /// Pool bytes per memory node (allocator scaling rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_bytes: Option<u64>,
    /// Memory nodes taking part (allocator scaling rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<usize>,
    /// How the figures compare, when that needs saying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The client and the memory node (and perftest's two ends) ran on different machines.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cross_machine: bool,
}

impl Row {
    /// A latency row from a histogram of nanoseconds.
    pub(crate) fn latency(
        implementation: &'static str,
        op: &'static str,
        size: usize,
        threads: usize,
        batch: usize,
        hist: &Histogram<u64>,
    ) -> Self {
        let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        Row {
            bench: "verbs",
            implementation,
            op,
            size,
            threads,
            processes: None,
            batch,
            p50_us: Some(us(0.5)),
            p99_us: Some(us(0.99)),
            p999_us: Some(us(0.999)),
            mops: None,
            gbps: None,
            ops: hist.len(),
            rdma_ops_per_op: None,
            ratio_vs_perftest: None,
            ratio_vs_sync: None,
            read_share: None,
            hit_ratio: None,
            ideal_hit_ratio: None,
            cache_bytes: None,
            pool_bytes: None,
            nodes: None,
            note: None,
            cross_machine: false,
        }
    }

    /// A throughput row.
    #[allow(clippy::too_many_arguments, reason = "one argument per JSON field")]
    pub(crate) fn throughput(
        bench: &'static str,
        implementation: &'static str,
        op: &'static str,
        size: usize,
        threads: usize,
        batch: usize,
        ops: u64,
        seconds: f64,
    ) -> Self {
        Row {
            bench,
            implementation,
            op,
            size,
            threads,
            processes: None,
            batch,
            p50_us: None,
            p99_us: None,
            p999_us: None,
            mops: Some(ops as f64 / seconds / 1e6),
            gbps: Some(ops as f64 * size as f64 / seconds / 1e9),
            ops,
            rdma_ops_per_op: None,
            ratio_vs_perftest: None,
            ratio_vs_sync: None,
            read_share: None,
            hit_ratio: None,
            ideal_hit_ratio: None,
            cache_bytes: None,
            pool_bytes: None,
            nodes: None,
            note: None,
            cross_machine: false,
        }
    }

    /// True for latency rows.
    pub(crate) fn is_latency(&self) -> bool {
        self.p50_us.is_some()
    }
}

/// Prints rows as they come: JSON lines, or a table with a header before the first row of
/// each kind.
pub(crate) struct Printer {
    json: bool,
    last_kind: Option<bool>,
    cross_machine: bool,
}

impl Printer {
    pub(crate) fn new(json: bool) -> Self {
        Printer { json, last_kind: None, cross_machine: false }
    }

    /// Marks every row printed as measured across machines.
    pub(crate) fn cross_machine(mut self, yes: bool) -> Self {
        self.cross_machine = yes;
        self
    }

    pub(crate) fn print(&mut self, row: &Row) {
        show_progress(row);
        // Printed around the progress line, which is redrawn below it.
        match PROGRESS.get() {
            Some(bar) => bar.suspend(|| self.print_row(row)),
            None => self.print_row(row),
        }
    }

    fn print_row(&mut self, row: &Row) {
        let marked;
        let row = if self.cross_machine {
            marked = Row { cross_machine: true, ..row.clone() };
            &marked
        } else {
            row
        };
        if self.json {
            println!("{}", serde_json::to_string(row).expect("rows serialize"));
            return;
        }
        let latency = row.is_latency();
        if self.last_kind != Some(latency) {
            if latency {
                println!(
                    "\n{:<9} {:<6} {:>8} {:>3} {:>5} {:>10} {:>10} {:>10} {:>8}  note",
                    "impl", "op", "size", "thr", "batch", "p50 us", "p99 us", "p999 us", "ratio"
                );
            } else {
                println!(
                    "\n{:<9} {:<6} {:>8} {:>3} {:>5} {:>10} {:>10} {:>10} {:>8}  note",
                    "impl", "op", "size", "thr", "batch", "Mops", "GB/s", "ops", "ratio"
                );
            }
            self.last_kind = Some(latency);
        }
        let ratio = row
            .ratio_vs_perftest
            .map(|r| format!("{r:.3}"))
            .or(row.rdma_ops_per_op.map(|r| format!("{r:.4}/op")))
            .unwrap_or_else(|| "-".into());
        let note = match (row.note.as_deref(), row.cross_machine) {
            (Some(note), true) => format!("cross-machine; {note}"),
            (None, true) => "cross-machine".to_owned(),
            (note, false) => note.unwrap_or("").to_owned(),
        };
        if latency {
            println!(
                "{:<9} {:<6} {:>8} {:>3} {:>5} {:>10.2} {:>10.2} {:>10.2} {:>8}  {note}",
                row.implementation,
                row.op,
                row.size,
                row.threads,
                row.batch,
                row.p50_us.unwrap_or(0.0),
                row.p99_us.unwrap_or(0.0),
                row.p999_us.unwrap_or(0.0),
                ratio
            );
        } else {
            println!(
                "{:<9} {:<6} {:>8} {:>3} {:>5} {:>10.4} {:>10.4} {:>10} {:>8}  {note}",
                row.implementation,
                row.op,
                row.size,
                row.threads,
                row.batch,
                row.mops.unwrap_or(0.0),
                row.gbps.unwrap_or(0.0),
                row.ops,
                ratio
            );
        }
    }
}

/// A histogram of nanoseconds, from 1 ns to 10 minutes, 3 significant digits: what every latency
/// row is built from.
pub(crate) fn new_histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3)
}

/// The median of a non-empty list (the mean of the middle two for an even count).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
}
