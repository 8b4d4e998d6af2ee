//! `rdmem-run`: start a job of N processes on this machine, with memory nodes for them.
//!
//! ```sh
//! rdmem-run -n 4 ./my-program --its-flags              # starts one memory node, then 4 ranks
//! rdmem-run -n 4 --memnodes 2 --pool-size 1G my-program # two memory nodes of 1 GiB each
//! rdmem-run -n 4 --memnode 10.0.0.1:7471 my-program     # existing memory nodes (or RDMEM_MEMNODES)
//! ```
//!
//! Memory nodes: with `--memnode` (repeatable), else the ones `RDMEM_MEMNODES` or the config
//! file (`RDMEM_CONFIG`) name, rdmem-run starts none and passes the environment on, token
//! (`RDMEM_TOKEN`/`RDMEM_TOKEN_FILE`) included. Otherwise, or when `--memnodes M` is given, it
//! starts M `rdmem-memnode`s (default 1) on 127.0.0.1 with a fresh token, node ids `0..M`,
//! `--pool-size` and `--page-size` (these two only apply to nodes it starts), and the device
//! from `RDMEM_DEVICE`/`RDMEM_GID_INDEX` or the config file; it stops them when the job ends.
//!
//! Each rank `i` runs `PROGRAM ARGS...` (PROGRAM looked up on PATH like a shell does, then next
//! to rdmem-run) with:
//! - `RDMEM_RANK=i`, `RDMEM_SIZE=N`: read them with `rdmem_coherence::dsm::launch::Rank::from_env`;
//! - `RDMEM_MEMNODES=host:port,...`: the memory nodes in node-id order;
//! - `RDMEM_TOKEN=...` when rdmem-run started the nodes (and no `RDMEM_TOKEN_FILE`).
//!
//! Rank 0 gets rdmem-run's stdin, the others none. Their stdout and stderr lines come out on
//! rdmem-run's stdout and stderr, whole and prefixed with `[i] `. When a rank fails (non-zero
//! exit or a signal), rdmem-run kills the others, says which rank failed and how, and exits
//! with 1; when all succeed it prints `rdmem-run: N ranks finished in X.XXX s` to stderr and
//! exits with 0. Ranks run on this machine only; for several machines, start the same program
//! with `mpirun` or `srun` and `RDMEM_MEMNODES` set: `Rank::from_env` reads their variables too
//! (`OMPI_COMM_WORLD_RANK`, `PMI_RANK`, `SLURM_PROCID` and the matching sizes).
//!
//! Signals: SIGTERM, SIGINT or SIGHUP to rdmem-run (what Slurm, systemd, `timeout(1)` and a
//! closed terminal send) are forwarded to every running rank; ranks still running
//! [`GRACE`] later are killed (SIGKILL); then the memory nodes it started are stopped, and
//! rdmem-run exits with 128 + the signal's number (143 for SIGTERM). A signal that comes while
//! the memory nodes start stops them and starts no rank.
//!
//! Each rank runs in a process group of its own, and signals and kills go to the group, so
//! the processes a rank started (a shell's children) stop with it. The exception is rank 0
//! when rdmem-run's stdin is a terminal: it stays in rdmem-run's group so that it can read the
//! terminal, and only the rank itself is signalled.
//!
//! Limits: processes that leave their rank's process group are not stopped; rdmem-run stops
//! forwarding output once the ranks are gone and the pipes have been quiet for a second.
//! SIGKILL to rdmem-run itself cannot be caught: its ranks and memory nodes are left.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use rdmem_coherence::dsm::launch::{RANK_VAR, SIZE_VAR};
use rdmem_core::ClusterConfig;
use rdmem_transport_rdma::PageSize;
use rdmem_transport_rdma::spawn::MemnodeChild;
use rdmem_transport_rdma::spawn::{find_binary, fresh_token};

/// How often the ranks are polled for their exit.
const POLL: Duration = Duration::from_millis(10);

/// How long ranks get to exit after a forwarded signal before they are killed.
const GRACE: Duration = Duration::from_secs(5);

/// The signals rdmem-run forwards to its ranks before stopping.
const STOP_SIGNALS: [i32; 3] = [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP];

/// How long output pipes may stay quiet after all ranks exited before rdmem-run stops
/// forwarding them (they are still open when a rank left a background process behind).
const QUIET: Duration = Duration::from_secs(1);

/// Start N processes of a program on this machine, with memory nodes for them.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    after_help = "Each rank gets RDMEM_RANK, RDMEM_SIZE, RDMEM_MEMNODES and, \
when rdmem-run started the memory nodes, RDMEM_TOKEN. Its output lines are prefixed with `[rank] `."
)]
struct Cli {
    /// Ranks (processes) to start.
    #[arg(short = 'n', long = "ranks", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    ranks: u32,
    /// Memory nodes to start [default: 1 unless --memnode, RDMEM_MEMNODES or RDMEM_CONFIG name some].
    #[arg(long, value_name = "M", conflicts_with = "memnode", value_parser = clap::value_parser!(u16).range(1..))]
    memnodes: Option<u16>,
    /// An existing memory node `host:port` (repeatable); none is started then.
    #[arg(long, value_name = "HOST:PORT")]
    memnode: Vec<String>,
    /// Pool size of each started memory node, with an optional K, M or G suffix (binary units).
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = rdmem_core::config::parse_size)]
    pool_size: u64,
    /// Pages backing the started memory nodes' pools: 2M, 1G or none (normal pages).
    #[arg(long, value_name = "SIZE", default_value = "2M", value_parser = parse_page_size)]
    page_size: String,
    /// The program, then its arguments (passed as they are, even those starting with `-`).
    #[arg(value_name = "PROGRAM", required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

/// Checks the page size here, so a typo is a usage error rather than a memory node that fails.
fn parse_page_size(s: &str) -> Result<String, String> {
    s.parse::<PageSize>().map(|_| s.to_owned())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rdmem-run: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The memory nodes the ranks use; started ones are stopped when this is dropped.
struct Memnodes {
    addrs: Vec<String>,
    /// `Some` when rdmem-run started the nodes and chose the token.
    token: Option<String>,
    _started: Vec<MemnodeChild>,
}

fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (program, args) = cli.command.split_first().expect("clap requires PROGRAM");
    let path = resolve_program(program)?;
    // The last stop signal received (0: none), set by the handlers.
    let stop = Arc::new(AtomicUsize::new(0));
    for signal in STOP_SIGNALS {
        signal_hook::flag::register_usize(signal, Arc::clone(&stop), signal as usize)?;
    }
    let memnodes = memnodes(&cli)?;
    if let Some(code) = stopped(&stop, None) {
        drop(memnodes);
        return Ok(code);
    }
    let started = Instant::now();
    let ranks = spawn_ranks(&cli, program, &path, args, &memnodes)?;
    let (failures, signal) = wait_all(ranks, &stop);
    drop(memnodes);
    if let Some(code) = stopped(&stop, signal) {
        return Ok(code);
    }
    if failures.is_empty() {
        eprintln!("rdmem-run: {} ranks finished in {:.3} s", cli.ranks, started.elapsed().as_secs_f64());
        return Ok(ExitCode::SUCCESS);
    }
    for (rank, status) in failures {
        eprintln!("rdmem-run: rank {rank} failed: {status}");
    }
    Ok(ExitCode::FAILURE)
}

/// After a stop signal (the one forwarded, or any received): says so and gives the exit code,
/// 128 + the signal's number.
fn stopped(stop: &AtomicUsize, forwarded: Option<i32>) -> Option<ExitCode> {
    let signal = forwarded.or(match stop.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s as i32),
    })?;
    let name = signal_hook::low_level::signal_name(signal).unwrap_or("a signal");
    eprintln!("rdmem-run: stopped by {name}: ranks and the memory nodes it started are stopped");
    Some(ExitCode::from((128 + signal).clamp(0, 255) as u8))
}

/// One of [`STOP_SIGNALS`] as rustix names it.
fn stop_signal(signal: i32) -> rustix::process::Signal {
    match signal {
        signal_hook::consts::SIGINT => rustix::process::Signal::INT,
        signal_hook::consts::SIGHUP => rustix::process::Signal::HUP,
        _ => rustix::process::Signal::TERM,
    }
}

/// PROGRAM as a shell finds it: a name with a `/` as it is, else the first executable file of
/// that name on PATH; failing that, next to rdmem-run (for the workspace's own binaries).
fn resolve_program(program: &OsString) -> Result<PathBuf, String> {
    let name = Path::new(program);
    let executable = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.as_encoded_bytes().contains(&b'/') {
        return if executable(name) {
            Ok(name.to_path_buf())
        } else {
            Err(format!("program {} not found or not executable", name.display()))
        };
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|p| executable(p)));
    let next_to_us = || Some(find_binary(&name.to_string_lossy())).filter(|p| p.is_absolute() && executable(p));
    on_path.or_else(next_to_us).ok_or_else(|| {
        format!("program {:?} not found: not on PATH and not next to rdmem-run; give its path", name.display())
    })
}

/// The given memory nodes, or freshly started ones (see the module docs for which).
fn memnodes(cli: &Cli) -> Result<Memnodes, Box<dyn std::error::Error>> {
    let mut config = ClusterConfig::load(None)?;
    if !cli.memnode.is_empty() {
        config.memnodes = cli.memnode.clone();
    }
    if cli.memnodes.is_none() && !config.memnodes.is_empty() {
        return Ok(Memnodes { addrs: config.memnode_addrs()?, token: None, _started: Vec::new() });
    }
    let count = cli.memnodes.unwrap_or(1);
    let token = fresh_token();
    let (pool_size, gid) = (cli.pool_size.to_string(), config.device.gid_index.map(|g| g.to_string()));
    let mut common = vec!["--pool-size", &pool_size, "--page-size", &cli.page_size];
    if let Some(device) = &config.device.name {
        common.extend(["--device", device]);
    }
    if let Some(gid) = &gid {
        common.extend(["--gid-index", gid]);
    }
    // Started side by side: each waits until its pool is registered, which takes a while.
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .map(|i| {
                let (token, common) = (&token, &common);
                s.spawn(move || {
                    let id = i.to_string();
                    let mut args = common.clone();
                    args.extend(["--node-id", &id]);
                    MemnodeChild::start(&format!("memnode {i}"), token, &args)
                        .map_err(|e| format!("memory node {i} did not start: {e}"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("memory node starter panicked")).collect()
    });
    // On an error the nodes that did start are dropped here, which stops them.
    let started = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let addrs = started.iter().map(|n| n.addr().to_owned()).collect();
    Ok(Memnodes { addrs, token: Some(token), _started: started })
}

/// A started rank: its process and whether rdmem-run killed it.
struct RankProcess {
    rank: u32,
    child: Child,
    /// Whether it leads a process group of its own (signals go to the whole group).
    group: bool,
    status: Option<ExitStatus>,
    killed: bool,
}

impl RankProcess {
    /// Sends `signal` to the rank (its process group when it has one). It may have exited
    /// just now (ESRCH): nothing to do then.
    fn signal(&self, signal: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = if self.group {
                rustix::process::kill_process_group(pid, signal)
            } else {
                rustix::process::kill_process(pid, signal)
            };
        }
    }
}

/// What the output forwarders are doing, for [`drain`].
#[derive(Default)]
struct Forwarding {
    /// Lines read so far, by all forwarders.
    progress: AtomicU64,
    /// Forwarders writing a line right now (possibly blocked on a slow reader of our output).
    busy: AtomicUsize,
}

/// The running ranks and their output forwarders.
struct Job {
    ranks: Vec<RankProcess>,
    readers_done: mpsc::Receiver<()>,
    readers: usize,
    forwarding: Arc<Forwarding>,
}

/// Starts the N ranks with their environment and output forwarders. If one cannot be started,
/// those already running are killed.
fn spawn_ranks(
    cli: &Cli,
    program: &OsString,
    path: &Path,
    args: &[OsString],
    memnodes: &Memnodes,
) -> Result<Job, String> {
    let (done_tx, readers_done) = mpsc::channel();
    let forwarding = Arc::new(Forwarding::default());
    let mut job = Job { ranks: Vec::new(), readers_done, readers: 0, forwarding };
    for rank in 0..cli.ranks {
        let mut command = Command::new(path);
        command
            .arg0(program)
            .args(args)
            .env(RANK_VAR, rank.to_string())
            .env(SIZE_VAR, cli.ranks.to_string())
            .env("RDMEM_MEMNODES", memnodes.addrs.join(","))
            .stdin(if rank == 0 { Stdio::inherit() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Rank 0 reads a terminal from rdmem-run's process group (a background group would be
        // stopped by SIGTTIN); every other rank leads a group of its own.
        let group = rank != 0 || !std::io::stdin().is_terminal();
        if group {
            command.process_group(0);
        }
        if let Some(token) = &memnodes.token {
            command.env("RDMEM_TOKEN", token).env_remove("RDMEM_TOKEN_FILE");
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                kill_all(&mut job.ranks);
                for r in &mut job.ranks {
                    let _ = r.child.wait();
                }
                return Err(format!("cannot start rank {rank} ({}): {e}", path.display()));
            }
        };
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        forward(rank, stdout, std::io::stdout, done_tx.clone(), job.forwarding.clone());
        forward(rank, stderr, std::io::stderr, done_tx.clone(), job.forwarding.clone());
        job.readers += 2;
        job.ranks.push(RankProcess { rank, child, group, status: None, killed: false });
    }
    Ok(job)
}

/// Forwards `from` line by line to `to`, each line prefixed with `[rank] ` and written whole
/// under the stream's lock (so lines of different ranks never mix). Write errors (a closed
/// stdout) are ignored and the pipe still drained, so the rank never blocks on it.
fn forward<W: Write + 'static>(
    rank: u32,
    from: impl Read + Send + 'static,
    to: fn() -> W,
    done: mpsc::Sender<()>,
    forwarding: Arc<Forwarding>,
) {
    std::thread::spawn(move || {
        let mut from = BufReader::new(from);
        let prefix = format!("[{rank}] ");
        let mut line = prefix.clone().into_bytes();
        loop {
            line.truncate(prefix.len());
            match from.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            forwarding.busy.fetch_add(1, Ordering::SeqCst);
            forwarding.progress.fetch_add(1, Ordering::SeqCst);
            if line.last() != Some(&b'\n') {
                line.push(b'\n'); // the last line, unterminated
            }
            let mut out = to();
            let _ = out.write_all(&line).and_then(|()| out.flush());
            drop(out);
            forwarding.busy.fetch_sub(1, Ordering::SeqCst);
        }
        let _ = done.send(());
    });
}

/// Waits for all ranks; at the first failure kills the others (and still reaps them). A stop
/// signal (in `stop`) is forwarded to the running ranks, which are killed [`GRACE`] later if
/// still running. Then waits for their output (see [`QUIET`]). Returns the ranks that failed on
/// their own, in the order they were seen to end, and the signal forwarded, if one was.
fn wait_all(mut job: Job, stop: &AtomicUsize) -> (Vec<(u32, ExitStatus)>, Option<i32>) {
    let mut failures = Vec::new();
    let mut forwarded: Option<(i32, Instant)> = None;
    while job.ranks.iter().any(|r| r.status.is_none()) {
        match (forwarded, stop.load(Ordering::SeqCst)) {
            (None, 0) => {}
            (None, signal) => {
                let signal = signal as i32;
                for r in job.ranks.iter_mut().filter(|r| r.status.is_none()) {
                    r.signal(stop_signal(signal));
                    r.killed = true; // stopped by rdmem-run: not a failure of its own
                }
                forwarded = Some((signal, Instant::now()));
            }
            (Some((_, at)), _) if at.elapsed() > GRACE => {
                for r in job.ranks.iter().filter(|r| r.status.is_none()) {
                    r.signal(rustix::process::Signal::KILL);
                }
            }
            (Some(_), _) => {}
        }
        for r in job.ranks.iter_mut().filter(|r| r.status.is_none()) {
            let status = match r.child.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                Err(e) => {
                    eprintln!("rdmem-run: cannot wait for rank {}: {e}", r.rank);
                    r.signal(rustix::process::Signal::KILL);
                    r.child.wait().unwrap_or_else(|_| failed_status())
                }
            };
            r.status = Some(status);
            // A rank killed by rdmem-run dies of SIGKILL; one that exits with a code failed itself
            // (unless rdmem-run forwarded a stop signal to it: then any end is expected).
            if !status.success() && (!r.killed || status.code().is_some()) && forwarded.is_none() {
                failures.push((r.rank, status));
            }
        }
        if !failures.is_empty() {
            kill_all(&mut job.ranks);
        }
        std::thread::sleep(POLL);
    }
    drain(&job);
    (failures, forwarded.map(|(signal, _)| signal))
}

/// Kills the ranks still running (SIGKILL, to their process groups), once each.
fn kill_all(ranks: &mut [RankProcess]) {
    for r in ranks.iter_mut().filter(|r| r.status.is_none() && !r.killed) {
        r.signal(rustix::process::Signal::KILL);
        r.killed = true;
    }
}

/// Waits for the forwarders to reach the end of their pipes, but only while output still comes
/// or is being written: a pipe that stays open and quiet for [`QUIET`] after its rank exited
/// belongs to a process the rank left behind.
fn drain(job: &Job) {
    let mut finished = 0;
    let mut seen = job.forwarding.progress.load(Ordering::SeqCst);
    while finished < job.readers {
        match job.readers_done.recv_timeout(QUIET) {
            Ok(()) => finished += 1,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = job.forwarding.progress.load(Ordering::SeqCst);
                if now == seen && job.forwarding.busy.load(Ordering::SeqCst) == 0 {
                    break;
                }
                seen = now;
            }
        }
    }
}

/// The status of a rank that could not be waited for: exit code 1.
fn failed_status() -> ExitStatus {
    std::os::unix::process::ExitStatusExt::from_raw(1 << 8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdmem_core::config::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("0M").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999G").unwrap_err().contains("too large"));
    }

    #[test]
    fn cli() {
        let cli = Cli::try_parse_from(["rdmem-run", "-n", "3", "prog", "-n", "--flag", "x"]).unwrap();
        assert_eq!(cli.ranks, 3);
        assert_eq!(cli.command, ["prog", "-n", "--flag", "x"]);
        assert_eq!((cli.pool_size, cli.page_size.as_str(), cli.memnodes), (256 << 20, "2M", None));
        assert!(Cli::try_parse_from(["rdmem-run", "-n", "0", "prog"]).is_err());
        assert!(Cli::try_parse_from(["rdmem-run", "-n", "2"]).is_err());
        assert!(Cli::try_parse_from(["rdmem-run", "-n", "2", "--page-size", "3M", "prog"]).is_err());
        assert!(Cli::try_parse_from(["rdmem-run", "-n", "2", "--memnodes", "2", "--memnode", "a:1", "prog"]).is_err());
        let cli =
            Cli::try_parse_from(["rdmem-run", "-n", "1", "--memnode", "a:1", "--memnode", "b:2", "--", "p"]).unwrap();
        assert_eq!((cli.memnode, cli.command), (vec!["a:1".to_owned(), "b:2".to_owned()], vec![OsString::from("p")]));
    }
}
