//! `rdmem-bench plot RESULTS.jsonl --out DIR`: SVG charts of a run's JSON lines (from
//! `rdmem-bench suite --json`, or any benchmark's `--json`): latency percentiles of rdmem and
//! perftest per operation, throughput by batch size, lock throughput by threads and processes,
//! the cache's hit ratio against the ideal, and allocator throughput by threads. A chart whose
//! rows are missing from the file is skipped (and said so); a line that is not a result row is
//! an error naming it.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde_json::Value;

type BoxError = Box<dyn std::error::Error>;

/// Options of `rdmem-bench plot`.
#[derive(clap::Args, Debug)]
pub(crate) struct PlotArgs {
    /// JSON lines of results, as `--json` prints them.
    results: PathBuf,
    /// Where the SVG files go (made if missing).
    #[arg(long)]
    out: PathBuf,
}

/// The colours of the lines, in order.
const COLOURS: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(148, 103, 189)];

/// Draws one chart from the rows into the file; false when the rows have nothing for it.
type Chart = fn(&[Value], &Path) -> Result<bool, BoxError>;

/// A series: its name and points.
type Series = (String, Vec<(f64, f64)>);

pub(crate) fn run(args: &PlotArgs) -> Result<(), BoxError> {
    let text = std::fs::read_to_string(&args.results).map_err(|e| format!("{}: {e}", args.results.display()))?;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row: Value = serde_json::from_str(line)
            .map_err(|e| format!("{} line {}: not a JSON result row ({e})", args.results.display(), n + 1))?;
        if row.get("bench").and_then(Value::as_str).is_none() {
            return Err(format!("{} line {}: a JSON object without \"bench\"", args.results.display(), n + 1).into());
        }
        rows.push(row);
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let charts: [(&str, Chart); 6] = [
        ("latency.svg", latency),
        ("throughput.svg", throughput),
        ("locks.svg", locks),
        ("cache.svg", cache),
        ("alloc.svg", alloc),
        ("alloc-scaling.svg", alloc_scaling),
    ];
    for (name, chart) in charts {
        let path = args.out.join(name);
        if chart(&rows, &path)? {
            println!("wrote {}", path.display());
        } else {
            println!("skipped {name}: no rows for it in {}", args.results.display());
        }
    }
    Ok(())
}

fn str_of<'a>(row: &'a Value, key: &str) -> &'a str {
    row.get(key).and_then(Value::as_str).unwrap_or("")
}

fn num_of(row: &Value, key: &str) -> Option<f64> {
    row.get(key).and_then(Value::as_f64)
}

/// Rows of `bench` with `op`, implementation `imp` and every `(key, value)` of `with`.
fn select<'a>(rows: &'a [Value], bench: &str, imp: &str, op: &str, with: &[(&str, f64)]) -> Vec<&'a Value> {
    rows.iter()
        .filter(|r| str_of(r, "bench") == bench && str_of(r, "impl") == imp && str_of(r, "op") == op)
        .filter(|r| with.iter().all(|(k, v)| num_of(r, k) == Some(*v)))
        .collect()
}

/// Draws `series` on `area`, their x values being positions among `x_labels` (evenly spaced,
/// whatever the values they stand for), y from 0.
fn draw(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[Series],
    x_labels: &[String],
) -> Result<(), BoxError> {
    let y_max = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)).fold(0.0f64, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.3..x_labels.len() as f64 - 0.7, 0.0..y_max.max(1e-9))?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(x_labels.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                x_labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()?;
    lines(&mut chart, series)?;
    Ok(())
}

/// The distinct x values of `series`, in order, as labels; the series with each x replaced by
/// its position among them.
fn positions(series: Vec<Series>) -> (Vec<Series>, Vec<String>) {
    let mut xs: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let at = |x: f64| xs.iter().position(|&v| v == x).expect("an x of the series") as f64;
    let placed = series.into_iter().map(|(name, p)| (name, p.into_iter().map(|(x, y)| (at(x), y)).collect())).collect();
    (placed, xs.iter().map(|x| x.to_string()).collect())
}

/// Draws each series as a line with its points, and the legend.
fn lines<'a>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    series: &[Series],
) -> Result<(), BoxError> {
    for (k, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
    Ok(())
}

/// A file with one chart of `series` (x values placed by [`positions`] unless `labels` says
/// what the positions stand for).
fn one_chart(
    path: &Path,
    title: &str,
    axes: (&str, &str),
    series: Vec<Series>,
    labels: Option<Vec<String>>,
) -> Result<(), BoxError> {
    let (series, labels) = match labels {
        Some(labels) => (series, labels),
        None => positions(series),
    };
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    draw(&root, title, axes, &series, &labels)?;
    root.present()?;
    Ok(())
}

/// p50, p99 and p99.9 of 8-byte READ, WRITE, CAS and FAA, rdmem next to perftest.
fn latency(rows: &[Value], path: &Path) -> Result<bool, BoxError> {
    let ops: Vec<&str> = ["read", "write", "cas", "faa"]
        .into_iter()
        .filter(|op| !select(rows, "verbs", "rdmem", op, &[("size", 8.0), ("batch", 1.0), ("threads", 1.0)]).is_empty())
        .collect();
    if ops.is_empty() {
        return Ok(false);
    }
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let labels = ["p50".to_owned(), "p99".to_owned(), "p99.9".to_owned()];
    for (area, op) in root.split_evenly((2, 2)).iter().zip(&ops) {
        let mut series = Vec::new();
        for imp in ["rdmem", "perftest"] {
            let Some(r) = select(rows, "verbs", imp, op, &[("size", 8.0), ("batch", 1.0), ("threads", 1.0)])
                .into_iter()
                .find(|r| num_of(r, "p50_us").is_some())
            else {
                continue;
            };
            let points = ["p50_us", "p99_us", "p999_us"]
                .iter()
                .enumerate()
                .filter_map(|(i, k)| num_of(r, k).map(|v| (i as f64, v)))
                .collect();
            series.push((imp.to_owned(), points));
        }
        draw(area, &format!("8-byte {} latency", op.to_uppercase()), ("percentile", "us"), &series, &labels)?;
    }
    root.present()?;
    Ok(true)
}

/// 8-byte READ throughput by operations per doorbell: rdmem (1 and 2 threads) and perftest.
fn throughput(rows: &[Value], path: &Path) -> Result<bool, BoxError> {
    let mut series = Vec::new();
    for (imp, threads) in [("rdmem", 1.0), ("rdmem", 2.0), ("perftest", 1.0)] {
        let mut points: Vec<(f64, f64)> = select(rows, "verbs", imp, "read", &[("size", 8.0), ("threads", threads)])
            .into_iter()
            .filter_map(|r| Some((num_of(r, "batch")?, num_of(r, "mops")?)))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        if !points.is_empty() {
            series.push((format!("{imp}, {threads} thread{}", if threads > 1.0 { "s" } else { "" }), points));
        }
    }
    if series.is_empty() {
        return Ok(false);
    }
    one_chart(path, "8-byte READ throughput by batch", ("operations per doorbell", "Mops"), series, None)?;
    Ok(true)
}

/// Lock throughput (acquire and release, nothing inside) by threads x processes.
fn locks(rows: &[Value], path: &Path) -> Result<bool, BoxError> {
    let mut configs: Vec<(f64, f64)> = select(rows, "lock", "cohort", "acquire_release", &[])
        .into_iter()
        .filter(|r| num_of(r, "mops").is_some())
        .filter_map(|r| Some((num_of(r, "threads")?, num_of(r, "processes")?)))
        .collect();
    configs.sort_by(|a, b| (a.1, a.0).partial_cmp(&(b.1, b.0)).expect("numbers"));
    configs.dedup();
    if configs.is_empty() {
        return Ok(false);
    }
    let labels: Vec<String> = configs.iter().map(|(t, p)| format!("{t}x{p}")).collect();
    let series: Vec<Series> = ["cas-spin", "cohort"]
        .iter()
        .map(|imp| {
            let points = configs
                .iter()
                .enumerate()
                .filter_map(|(i, &(t, p))| {
                    select(rows, "lock", imp, "acquire_release", &[("threads", t), ("processes", p)])
                        .into_iter()
                        .find_map(|r| num_of(r, "mops"))
                        .map(|m| (i as f64, m))
                })
                .collect();
            (imp.to_string(), points)
        })
        .collect();
    one_chart(path, "Lock throughput", ("threads x processes", "Mops"), series, Some(labels))?;
    Ok(true)
}

/// Hit ratio of zipfian reads by cache size, next to the ideal cache of that size.
fn cache(rows: &[Value], path: &Path) -> Result<bool, BoxError> {
    let zipf = select(rows, "cache", "cache", "zipf", &[]);
    let pages = |r: &Value| num_of(r, "cache_bytes").map(|b| b / 4096.0);
    let mut measured: Vec<(f64, f64)> =
        zipf.iter().filter_map(|r| Some((pages(r)?, num_of(r, "hit_ratio")?))).collect();
    let mut ideal: Vec<(f64, f64)> =
        zipf.iter().filter_map(|r| Some((pages(r)?, num_of(r, "ideal_hit_ratio")?))).collect();
    if measured.is_empty() {
        return Ok(false);
    }
    measured.sort_by(|a, b| a.0.total_cmp(&b.0));
    ideal.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut series = vec![("rdmem cache (LRU)".to_owned(), measured)];
    if !ideal.is_empty() {
        series.push(("ideal (most popular pages)".to_owned(), ideal));
    }
    one_chart(path, "Cache hit ratio, zipfian reads", ("cache size (pages)", "hit ratio"), series, None)?;
    Ok(true)
}

/// Allocator alloc+free throughput by threads, per block size (the plain sweep: rows without
/// `pool_bytes`).
fn alloc(rows: &[Value], path: &Path) -> Result<bool, BoxError> {
    let mut all = select(rows, "alloc", "rdmem", "alloc_free", &[]);
    all.retain(|r| num_of(r, "pool_bytes").is_none());
    let mut sizes: Vec<f64> = all.iter().filter_map(|r| num_of(r, "size")).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    let series: Vec<Series> = sizes
        .iter()
        .map(|&size| {
            let mut points: Vec<(f64, f64)> = all
                .iter()
                .filter(|r| num_of(r, "size") == Some(size))
                .filter_map(|r| Some((num_of(r, "threads")?, num_of(r, "mops")?)))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            (format!("{size} B blocks"), points)
        })
        .collect();
    if series.is_empty() {
        return Ok(false);
    }
    one_chart(path, "Remote allocation: alloc+free pairs", ("threads", "Mops"), series, None)?;
    Ok(true)
}

/// How the allocator's cost grows (`rdmem-bench alloc --pool-sizes --nodes`): network
/// operations per alloc+free pair by pool size, one thread, a line per block size and number of
/// memory nodes.
fn alloc_scaling(rows: &[Value], path: &Path) -> Result<bool, BoxError> {
    let mut all = select(rows, "alloc", "rdmem", "alloc_free", &[]);
    all.retain(|r| num_of(r, "pool_bytes").is_some());
    let mut lines: Vec<(f64, f64)> =
        all.iter().filter_map(|r| Some((num_of(r, "size")?, num_of(r, "nodes")?))).collect();
    lines.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    lines.dedup();
    let series: Vec<Series> = lines
        .iter()
        .map(|&(size, n)| {
            let mut points: Vec<(f64, f64)> = all
                .iter()
                .filter(|r| num_of(r, "size") == Some(size) && num_of(r, "nodes") == Some(n))
                .filter(|r| num_of(r, "threads").is_none_or(|t| t == 1.0))
                .filter_map(|r| Some((num_of(r, "pool_bytes")? / f64::from(1 << 20), num_of(r, "rdma_ops_per_op")?)))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            (format!("{size} B blocks, {n} node{}", if n == 1.0 { "" } else { "s" }), points)
        })
        .collect();
    if series.is_empty() {
        return Ok(false);
    }
    let title = "Remote allocation as pools grow, half of them held: network operations per pair";
    one_chart(path, title, ("pool per node (MiB)", "network operations per alloc+free pair"), series, None)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::{PlotArgs, run};

    fn plot(lines: &str) -> (tempfile::TempDir, Result<(), super::BoxError>) {
        let dir = tempfile::tempdir().unwrap();
        let results = dir.path().join("results.jsonl");
        std::fs::write(&results, lines).unwrap();
        let out = dir.path().join("charts");
        let r = run(&PlotArgs { results, out });
        (dir, r)
    }

    #[test]
    fn charts_are_drawn_from_rows_and_missing_ones_skipped() {
        let rows = r#"{"bench":"verbs","impl":"rdmem","op":"read","size":8,"threads":1,"batch":1,"p50_us":20.0,"p99_us":80.0,"p999_us":200.0,"ops":10}
{"bench":"verbs","impl":"perftest","op":"read","size":8,"threads":1,"batch":1,"p50_us":19.0,"p99_us":70.0,"p999_us":190.0,"ops":10}
{"bench":"verbs","impl":"rdmem","op":"read","size":8,"threads":1,"batch":16,"mops":0.05,"ops":10}
{"bench":"verbs","impl":"rdmem","op":"read","size":8,"threads":1,"batch":1,"mops":0.02,"ops":10}
"#;
        let (dir, r) = plot(rows);
        r.unwrap();
        let charts = dir.path().join("charts");
        for name in ["latency.svg", "throughput.svg"] {
            let svg = std::fs::read_to_string(charts.join(name)).unwrap();
            assert!(svg.contains("<svg") && svg.contains("rdmem"), "{name} is a chart with its legend");
        }
        assert!(!charts.join("locks.svg").exists(), "no lock rows, no lock chart");
    }

    #[test]
    fn scaling_rows_get_their_own_chart_and_stay_out_of_the_plain_one() {
        let rows = r#"{"bench":"alloc","impl":"rdmem","op":"alloc_free","size":4096,"threads":1,"batch":1,"mops":1.0,"ops":10,"rdma_ops_per_op":0.05,"pool_bytes":33554432,"nodes":1}
{"bench":"alloc","impl":"rdmem","op":"alloc_free","size":4096,"threads":1,"batch":1,"mops":1.0,"ops":10,"rdma_ops_per_op":0.08,"pool_bytes":67108864,"nodes":1}
{"bench":"alloc","impl":"rdmem","op":"alloc_free","size":4096,"threads":1,"batch":1,"mops":1.0,"ops":10,"rdma_ops_per_op":0.05,"pool_bytes":33554432,"nodes":2}
"#;
        let (dir, r) = plot(rows);
        r.unwrap();
        let charts = dir.path().join("charts");
        let svg = std::fs::read_to_string(charts.join("alloc-scaling.svg")).unwrap();
        assert!(svg.contains("4096 B blocks, 1 node") && svg.contains("4096 B blocks, 2 nodes"), "a line each");
        assert!(!charts.join("alloc.svg").exists(), "scaling rows are not the plain sweep's");
    }

    #[test]
    fn a_line_that_is_not_a_result_is_an_error_naming_it() {
        let (_dir, r) = plot("{\"bench\":\"verbs\"}\nnot json\n");
        assert!(r.unwrap_err().to_string().contains("line 2"));
        let (_dir, r) = plot("{\"op\":\"read\"}\n");
        assert!(r.unwrap_err().to_string().contains("without \"bench\""));
    }
}
