//! Runs perftest, the standard RDMA microbenchmarks (`ib_read_lat`, `ib_write_lat`, `ib_atomic_lat`,
//! `ib_read_bw`), as a server and client pair on one machine and parses the client's result table, so
//! rdmem's benchmarks can print perftest's figures next to their own.
//!
//! Both ends run on the same device: the server is started first, then the client connects to it over
//! TCP (perftest's out-of-band exchange) at [`Target::ip`]. The server needs a moment before it listens,
//! so the client is retried while it fails to connect. A deadline covers the whole run, and the server is
//! always killed and reaped before a `run_*` function returns.

#![allow(
    unreachable_pub,
    reason = "the API is `pub` so it can move to a library crate unchanged; in this binary crate nothing is reachable from outside"
)]

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io::{self, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The only message size perftest's atomic tests accept (it exits with "Message size cannot be changed
/// for Atomic tests" for any other `-s`).
const ATOMIC_SIZE: usize = 8;

/// perftest's RDMA read bandwidth tool.
const READ_BW_TOOL: &str = "ib_read_bw";

/// Bytes in perftest's "MB" (`MB/sec` columns): perftest divides by 0x100000, so these are MiB; newer
/// releases spell the unit `MiB/sec`.
const PERFTEST_MB: f64 = 1_048_576.0;

/// Bytes in a GB, the unit of [`BandwidthResult`]'s bandwidths (decimal, like network line rates).
const GB: f64 = 1e9;

/// What perftest prints (stdout or stderr) when the client could not reach the server, which usually
/// means the server is not listening yet.
const CONNECT_FAILURES: [&str; 3] = [
    "Couldn't connect to",
    "Unable to open file descriptor for socket connection",
    "Unable to init the socket connection",
];

/// How long to wait, how often to retry.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Deadline for the whole run: starting the server, every client attempt and the test itself.
    timeout: Duration,
    /// Client attempts while it cannot connect to the server.
    connect_tries: u32,
    /// Pause between two client attempts.
    retry_delay: Duration,
    /// How long the server may take to exit by itself once the client has finished.
    server_grace: Duration,
}

/// The limits of the `run_*` functions.
const LIMITS: Limits = Limits {
    timeout: Duration::from_secs(120),
    connect_tries: 20,
    retry_delay: Duration::from_millis(100),
    server_grace: Duration::from_secs(5),
};

/// How often a running child is polled for its exit.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// A perftest latency test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LatencyTest {
    /// RDMA read (`ib_read_lat`): a full round trip per operation.
    Read,
    /// RDMA write ping-pong (`ib_write_lat`): perftest reports half of the round trip.
    Write,
    /// Atomic compare-and-swap on 8 bytes (`ib_atomic_lat -A CMP_AND_SWAP`): a full round trip.
    CompareSwap,
    /// Atomic fetch-and-add on 8 bytes (`ib_atomic_lat -A FETCH_AND_ADD`): a full round trip.
    FetchAdd,
}

impl LatencyTest {
    /// The perftest program that runs this test.
    pub fn tool(self) -> &'static str {
        match self {
            Self::Read => "ib_read_lat",
            Self::Write => "ib_write_lat",
            Self::CompareSwap | Self::FetchAdd => "ib_atomic_lat",
        }
    }

    /// The `-A` operation of an atomic test, `None` for the others.
    fn atomic_type(self) -> Option<&'static str> {
        match self {
            Self::Read | Self::Write => None,
            Self::CompareSwap => Some("CMP_AND_SWAP"),
            Self::FetchAdd => Some("FETCH_AND_ADD"),
        }
    }

    /// Whether perftest reports half of a round trip (a ping-pong test) rather than a whole one.
    fn half_round_trip(self) -> bool {
        self == Self::Write
    }
}

/// Where perftest runs: the RDMA device both ends use, and how the client reaches the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `HOST:PORT` of an `rdmem-bench perftest-server` on another machine that starts the
    /// servers there (with its own device and GID), or `None` to start them here. With it,
    /// `ip` is that machine's address.
    pub remote: Option<String>,
    /// RDMA device name (`-d`), e.g. `mlx5_0` or `rxe0`.
    pub device: String,
    /// GID index (`-x`); RoCE needs the index of the device's IPv4-mapped RoCE v2 GID. `None` leaves
    /// perftest's default (no GID on InfiniBand, index 0 on Ethernet).
    pub gid_index: Option<u32>,
    /// The address the client connects to for perftest's out-of-band exchange (this machine's).
    pub ip: String,
    /// The TCP port of that exchange (`-p`); perftest's default is 18515.
    pub port: u16,
}

/// One row of a perftest latency table. Times are in microseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyResult {
    /// The test that produced it.
    pub test: LatencyTest,
    /// Message size in bytes (`#bytes`).
    pub size: usize,
    /// Measured operations (`#iterations`).
    pub iterations: u64,
    /// Fastest operation (`t_min`).
    pub min_us: f64,
    /// Slowest operation (`t_max`).
    pub max_us: f64,
    /// Median (`t_typical`).
    pub typical_us: f64,
    /// Mean (`t_avg`).
    pub avg_us: f64,
    /// Standard deviation (`t_stdev`).
    pub stdev_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Whether the times are half of a round trip (`ib_write_lat`'s ping-pong) rather than whole ones.
    pub half_round_trip: bool,
}

/// One row of perftest's `ib_read_bw` table.
#[derive(Debug, Clone, PartialEq)]
pub struct BandwidthResult {
    /// Message size in bytes (`#bytes`).
    pub size: usize,
    /// Work requests posted per `ibv_post_send` (`-l`).
    pub post_list: u32,
    /// Measured operations (`#iterations`).
    pub iterations: u64,
    /// Peak bandwidth in GB/s (10^9 bytes per second), as perftest prints it: from the shortest
    /// interval between completions its cycle counter saw, so unreliable under an emulated clock
    /// (it has read 0 in the VM); use [`BandwidthResult::bw_avg_gbps`] for comparisons.
    pub bw_peak_gbps: f64,
    /// Average bandwidth in GB/s (10^9 bytes per second).
    pub bw_avg_gbps: f64,
    /// Average message rate in millions of operations per second.
    pub msg_rate_mpps: f64,
}

/// Why a perftest run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PerftestError {
    /// The tool is not on `PATH` (Debian/Ubuntu: `apt install perftest`).
    #[error("{tool} not found on PATH (install perftest)")]
    NotInstalled {
        /// The perftest program.
        tool: &'static str,
    },
    /// The tool could not be started or waited for.
    #[error("cannot run {tool}: {source}")]
    Spawn {
        /// The perftest program.
        tool: &'static str,
        /// The operating system's error.
        source: io::Error,
    },
    /// The arguments are ones perftest would refuse.
    #[error("invalid {tool} arguments: {reason}")]
    InvalidArgument {
        /// The perftest program.
        tool: &'static str,
        /// What is wrong with them.
        reason: String,
    },
    /// The client (or the server, when it exited before the client got through) failed.
    #[error("{tool} failed ({status}):\n{output}")]
    Failed {
        /// The perftest program.
        tool: &'static str,
        /// Its exit status.
        status: ExitStatus,
        /// Its stdout followed by its stderr.
        output: String,
    },
    /// The client's output has no result table that could be read.
    #[error("cannot parse {tool} output ({reason}):\n{output}")]
    Parse {
        /// The perftest program.
        tool: &'static str,
        /// What is missing or malformed.
        reason: String,
        /// The output that was parsed.
        output: String,
    },
    /// The run did not finish within its deadline; both ends were killed.
    #[error("{tool} did not finish within {after:?}")]
    Timeout {
        /// The perftest program.
        tool: &'static str,
        /// The deadline.
        after: Duration,
    },
}

/// Runs a perftest latency test of `iterations` operations of `size` bytes between a server and a
/// client on `target`, and returns the client's figures.
///
/// Atomic tests only support `size == 8`; other sizes are refused with
/// [`PerftestError::InvalidArgument`] without running anything.
pub fn run_latency(
    target: &Target,
    test: LatencyTest,
    size: usize,
    iterations: u64,
) -> Result<LatencyResult, PerftestError> {
    let tool = test.tool();
    let mut args = common_args(target, iterations);
    match test.atomic_type() {
        // -s 8 is accepted too, but older perftest releases may refuse -s outright for atomics.
        Some(atomic_type) if size == ATOMIC_SIZE => args.extend(["-A".into(), atomic_type.into()]),
        Some(_) => {
            return Err(PerftestError::InvalidArgument {
                tool,
                reason: format!("atomic tests are on {ATOMIC_SIZE} bytes, not {size}"),
            });
        }
        None => args.extend(["-s".into(), size.to_string().into()]),
    }
    let client_args = with_server_ip(&args, target);
    let stdout = run_pair(target, tool, OsStr::new(tool), &args, &client_args, LIMITS)?;
    parse_latency(test, &stdout)
}

/// Runs `ib_read_bw` with `iterations` reads of `size` bytes, posted `post_list` at a time (`-l`), between
/// a server and a client on `target`, and returns the client's figures.
///
/// perftest requires `iterations` to be a multiple of `post_list`; other values are refused with
/// [`PerftestError::InvalidArgument`] without running anything.
pub fn run_read_bandwidth(
    target: &Target,
    size: usize,
    post_list: u32,
    iterations: u64,
) -> Result<BandwidthResult, PerftestError> {
    if post_list == 0 || iterations % u64::from(post_list) != 0 {
        return Err(PerftestError::InvalidArgument {
            tool: READ_BW_TOOL,
            reason: format!("iterations ({iterations}) must be a multiple of the post list ({post_list})"),
        });
    }
    let mut args = common_args(target, iterations);
    args.extend(["-s".into(), size.to_string().into(), "-l".into(), post_list.to_string().into()]);
    // Gb/sec has six decimals where MB/sec has two (0.44 MB/sec for 8-byte reads on Soft-RoCE).
    args.push("--report_gbits".into());
    let client_args = with_server_ip(&args, target);
    let stdout = run_pair(target, READ_BW_TOOL, OsStr::new(READ_BW_TOOL), &args, &client_args, LIMITS)?;
    parse_bandwidth(&stdout, post_list)
}

/// Parses the result table a perftest latency tool (the client) prints, e.g.
///
/// ```text
///  #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec]
///  8       1000          23.81          382.60       25.98               27.15           12.53           97.32                   382.60
/// ```
///
/// Columns are found by name, so their order and spacing do not matter; times must be in `usec`.
pub fn parse_latency(test: LatencyTest, output: &str) -> Result<LatencyResult, PerftestError> {
    let parse = || -> Result<LatencyResult, String> {
        let table = Table::find(output)?;
        let time = |name: &str| -> Result<f64, String> {
            let (value, unit) = table.number::<f64>(name)?;
            if unit != "usec" {
                return Err(format!("column {name} is in {unit:?}, expected usec"));
            }
            Ok(value)
        };
        Ok(LatencyResult {
            test,
            size: table.number("#bytes")?.0,
            iterations: table.number("#iterations")?.0,
            min_us: time("t_min")?,
            max_us: time("t_max")?,
            typical_us: time("t_typical")?,
            avg_us: time("t_avg")?,
            stdev_us: time("t_stdev")?,
            p99_us: time("99% percentile")?,
            p999_us: time("99.9% percentile")?,
            half_round_trip: test.half_round_trip(),
        })
    };
    parse().map_err(|reason| PerftestError::Parse { tool: test.tool(), reason, output: output.to_owned() })
}

/// Parses the result table `ib_read_bw` (the client) prints, e.g.
///
/// ```text
///  #bytes     #iterations    BW peak[Gb/sec]    BW average[Gb/sec]   MsgRate[Mpps]
///  8          1024           0.004936            0.004404            0.068818
/// ```
///
/// `post_list` is the `-l` the test ran with (the table does not show it). Bandwidths may be in
/// `Gb/sec` (`--report_gbits`: 10^9 bits/s, so GB/s = Gb/s / 8) or perftest's default `MB/sec` (which
/// are MiB/s, so GB/s = MB/s * 2^20 / 10^9); both are converted to GB/s (10^9 bytes/s).
pub fn parse_bandwidth(output: &str, post_list: u32) -> Result<BandwidthResult, PerftestError> {
    let parse = || -> Result<BandwidthResult, String> {
        let table = Table::find(output)?;
        let bandwidth = |name: &str| -> Result<f64, String> {
            let (value, unit) = table.number::<f64>(name)?;
            gbytes_per_sec(value, unit).ok_or_else(|| format!("column {name} is in unknown unit {unit:?}"))
        };
        let (msg_rate_mpps, unit) = table.number::<f64>("MsgRate")?;
        if unit != "Mpps" {
            return Err(format!("column MsgRate is in {unit:?}, expected Mpps"));
        }
        Ok(BandwidthResult {
            size: table.number("#bytes")?.0,
            post_list,
            iterations: table.number("#iterations")?.0,
            bw_peak_gbps: bandwidth("BW peak")?,
            bw_avg_gbps: bandwidth("BW average")?,
            msg_rate_mpps,
        })
    };
    parse().map_err(|reason| PerftestError::Parse { tool: READ_BW_TOOL, reason, output: output.to_owned() })
}

/// Converts a perftest bandwidth `value` printed in `unit` to GB/s (10^9 bytes per second), or `None`
/// for a unit perftest does not use.
///
/// * `Gb/sec` (`--report_gbits`): perftest divides bytes/s by 125,000,000, so these are 10^9 bits/s and
///   GB/s = Gb/s / 8.
/// * `MB/sec` (the default; `MiB/sec` in newer releases): perftest divides bytes/s by 0x100000, so these
///   are MiB/s (2^20 bytes, as its `--help` says) and GB/s = MB/s * 1,048,576 / 10^9, not MB/s / 1000
///   (which would be 4.9% low).
fn gbytes_per_sec(value: f64, unit: &str) -> Option<f64> {
    match unit {
        "Gb/sec" => Some(value / 8.0),
        "MB/sec" | "MiB/sec" => Some(value * PERFTEST_MB / GB),
        _ => None,
    }
}

/// The arguments both ends take: device, GID index, port, iterations, and `-F` so that a CPU frequency
/// that is not at its maximum (common with power saving) is a warning rather than an error.
fn common_args(target: &Target, iterations: u64) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["-d".into(), target.device.clone().into()];
    if let Some(gid_index) = target.gid_index {
        args.extend(["-x".into(), gid_index.to_string().into()]);
    }
    args.extend(["-p".into(), target.port.to_string().into()]);
    args.extend(["-n".into(), iterations.to_string().into(), "-F".into()]);
    args
}

/// The client's arguments: the server's, then the server's address.
fn with_server_ip(server_args: &[OsString], target: &Target) -> Vec<OsString> {
    let mut args = server_args.to_vec();
    args.push(target.ip.clone().into());
    args
}

/// Whether a client's output says it could not reach the server.
fn is_connect_failure(output: &str) -> bool {
    CONNECT_FAILURES.iter().any(|message| output.contains(message))
}

/// Starts `program` with `server_args` as the server, then with `client_args` as the client, retrying
/// the client while it cannot connect; returns the client's stdout once it succeeds. The server is
/// killed (if it has not exited by itself) and reaped before this returns, whatever happens.
fn run_pair(
    target: &Target,
    tool: &'static str,
    program: &OsStr,
    server_args: &[OsString],
    client_args: &[OsString],
    limits: Limits,
) -> Result<String, PerftestError> {
    let deadline = Instant::now() + limits.timeout;
    let timeout = PerftestError::Timeout { tool, after: limits.timeout };
    let mut server = match &target.remote {
        None => Server::Local(Running::spawn(tool, program, server_args)?),
        Some(addr) => Server::Remote(RemoteServer::start(tool, addr, server_args)?),
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        if let Some(status) = server.try_wait(tool)? {
            let (stdout, stderr) = server.output();
            let output = format!("the server exited before the client connected:\n{stdout}{stderr}");
            return Err(PerftestError::Failed { tool, status, output });
        }
        let mut client = Running::spawn(tool, program, client_args)?;
        let Some(status) = client.wait_until(tool, deadline)? else {
            return Err(timeout); // dropping the client and the server kills them
        };
        let (stdout, stderr) = client.output();
        if status.success() {
            // The server finishes the test with the client; give it a moment to exit by itself.
            let grace = deadline.min(Instant::now() + limits.server_grace);
            server.wait_until(tool, grace)?;
            return Ok(stdout);
        }
        let output = format!("{stdout}{stderr}");
        if attempt >= limits.connect_tries || !is_connect_failure(&output) {
            return Err(PerftestError::Failed { tool, status, output });
        }
        if Instant::now() + limits.retry_delay >= deadline {
            return Err(timeout);
        }
        thread::sleep(limits.retry_delay);
    }
}

/// A thread reading a child's pipe to its end.
type Reader = JoinHandle<Vec<u8>>;

/// A child process whose stdout and stderr are drained by threads (so it never blocks on a full pipe).
/// Dropping it kills the process if it is still running and reaps it.
struct Running {
    /// The process.
    child: Child,
    /// The threads reading its stdout and stderr, until [`Running::output`] takes them.
    readers: Option<(Reader, Reader)>,
}

impl Running {
    /// Starts `program` with `args`, stdin closed and stdout/stderr captured.
    fn spawn(tool: &'static str, program: &OsStr, args: &[OsString]) -> Result<Self, PerftestError> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => PerftestError::NotInstalled { tool },
                _ => PerftestError::Spawn { tool, source },
            })?;
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        let readers = stdout.zip(stderr);
        Ok(Self { child, readers })
    }

    /// The exit status if the process has exited.
    fn try_wait(&mut self, tool: &'static str) -> Result<Option<ExitStatus>, PerftestError> {
        self.child.try_wait().map_err(|source| PerftestError::Spawn { tool, source })
    }

    /// Waits until the process exits (its status) or `deadline` passes (`None`).
    fn wait_until(&mut self, tool: &'static str, deadline: Instant) -> Result<Option<ExitStatus>, PerftestError> {
        poll_until(deadline, || self.try_wait(tool))
    }

    /// Everything the process wrote to stdout and stderr. Call it only once it has exited: it waits for
    /// both pipes to close.
    fn output(&mut self) -> (String, String) {
        let Some((stdout, stderr)) = self.readers.take() else {
            return (String::new(), String::new());
        };
        let text =
            |reader: JoinHandle<Vec<u8>>| String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned();
        (text(stdout), text(stderr))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            // Errors mean it has already exited; wait() reaps it either way.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // The reader threads end by themselves now that the pipes' writer is gone.
    }
}

/// Polls `try_wait` every [`POLL_INTERVAL`] until it gives a status or `deadline` passes.
fn poll_until(
    deadline: Instant,
    mut try_wait: impl FnMut() -> Result<Option<ExitStatus>, PerftestError>,
) -> Result<Option<ExitStatus>, PerftestError> {
    loop {
        if let Some(status) = try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(POLL_INTERVAL.min(deadline - now));
    }
}

/// The server end of a perftest pair: a child here, or one that an `rdmem-bench
/// perftest-server` started on another machine.
enum Server {
    Local(Running),
    Remote(RemoteServer),
}

impl Server {
    fn try_wait(&mut self, tool: &'static str) -> Result<Option<ExitStatus>, PerftestError> {
        match self {
            Server::Local(running) => running.try_wait(tool),
            Server::Remote(remote) => remote.try_wait(tool),
        }
    }

    fn wait_until(&mut self, tool: &'static str, deadline: Instant) -> Result<Option<ExitStatus>, PerftestError> {
        poll_until(deadline, || self.try_wait(tool))
    }

    fn output(&mut self) -> (String, String) {
        match self {
            Server::Local(running) => running.output(),
            Server::Remote(remote) => (String::new(), remote.said.clone()),
        }
    }
}

/// A perftest server on another machine, through its `rdmem-bench perftest-server`: the
/// request is one line (the arguments, tab-separated), the answers `started` and then
/// `exit CODE` (with the server's output before it if it failed). Dropping the connection
/// kills the server there.
struct RemoteServer {
    stream: std::net::TcpStream,
    said: String,
    status: Option<ExitStatus>,
}

impl RemoteServer {
    fn start(tool: &'static str, addr: &str, args: &[OsString]) -> Result<Self, PerftestError> {
        use std::io::{BufRead, Write};
        let spawn_error = |source: io::Error| PerftestError::Spawn { tool, source };
        let mut stream = std::net::TcpStream::connect(addr).map_err(spawn_error)?;
        let mut line = tool.to_owned();
        for a in args {
            line.push('\t');
            line.push_str(&a.to_string_lossy());
        }
        line.push('\n');
        stream.write_all(line.as_bytes()).map_err(spawn_error)?;
        let mut reader = io::BufReader::new(stream.try_clone().map_err(spawn_error)?);
        let mut answer = String::new();
        reader.read_line(&mut answer).map_err(spawn_error)?;
        if answer.trim() != "started" {
            return Err(spawn_error(io::Error::other(format!("the perftest server at {addr} said: {answer}"))));
        }
        stream.set_nonblocking(true).map_err(spawn_error)?;
        Ok(RemoteServer { stream, said: String::new(), status: None })
    }

    fn try_wait(&mut self, tool: &'static str) -> Result<Option<ExitStatus>, PerftestError> {
        use std::io::Read as _;
        use std::os::unix::process::ExitStatusExt;
        if self.status.is_some() {
            return Ok(self.status);
        }
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.said.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(source) => return Err(PerftestError::Spawn { tool, source }),
            }
        }
        // The connection ended: the last line is "exit CODE".
        let code = self.said.lines().last().and_then(|l| l.strip_prefix("exit ")).and_then(|c| c.parse::<i32>().ok());
        self.status = Some(ExitStatus::from_raw(code.unwrap_or(1) << 8));
        Ok(self.status)
    }
}

/// `rdmem-bench perftest-server`: starts perftest servers on this machine for clients on other
/// machines (see [`Target::remote`]), one per connection, with this machine's device and GID
/// (`RDMEM_DEVICE`, `RDMEM_GID_INDEX`). Only perftest's tools are started.
pub fn serve(listen: &str) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind(listen)?;
    eprintln!("rdmem-bench: perftest servers on request at {listen}");
    for stream in listener.incoming() {
        let mut stream = stream?;
        let mut line = String::new();
        io::BufReader::new(stream.try_clone()?).read_line(&mut line)?;
        let mut words = line.trim_end().split('\t');
        let tool = words.next().unwrap_or_default().to_owned();
        if !["ib_read_lat", "ib_write_lat", "ib_atomic_lat", READ_BW_TOOL].contains(&tool.as_str()) {
            let _ = writeln!(stream, "not a perftest tool: {tool:?}");
            continue;
        }
        // This machine's own device and GID replace the client's.
        let mut args: Vec<String> = Vec::new();
        let mut given = words.map(str::to_owned);
        while let Some(a) = given.next() {
            if a == "-d" || a == "-x" {
                given.next();
            } else {
                args.push(a);
            }
        }
        if let Ok(device) = std::env::var("RDMEM_DEVICE") {
            args.extend(["-d".into(), device]);
        }
        if let Ok(gid) = std::env::var("RDMEM_GID_INDEX") {
            args.extend(["-x".into(), gid]);
        }
        let spawned =
            Command::new(&tool).args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = writeln!(stream, "cannot start {tool}: {e}");
                continue;
            }
        };
        let (stdout, stderr) = (child.stdout.take().map(drain), child.stderr.take().map(drain));
        writeln!(stream, "started")?;
        // A client that goes away (its connection closes) takes its server with it.
        let child = std::sync::Arc::new(std::sync::Mutex::new(child));
        let watcher = {
            let (child, mut conn) = (std::sync::Arc::clone(&child), stream.try_clone()?);
            thread::spawn(move || {
                let _ = io::Read::read(&mut conn, &mut [0u8; 1]);
                let _ = child.lock().map(|mut c| c.kill());
            })
        };
        let status = loop {
            if let Some(status) = child.lock().map_err(|_| "poisoned")?.try_wait()? {
                break status;
            }
            thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            for reader in [stdout, stderr].into_iter().flatten() {
                let _ = stream.write_all(&reader.join().unwrap_or_default());
            }
        }
        let _ = writeln!(stream, "exit {}", status.code().unwrap_or(1));
        drop(stream);
        drop(watcher); // it ends once the client closes its side
    }
    Ok(())
}

/// Reads `pipe` to its end on a new thread.
fn drain(mut pipe: impl Read + Send + 'static) -> Reader {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        // A read error just ends the output early.
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// A perftest result table: the column names of its `#bytes` header line and the values of the first
/// data row below it.
#[derive(Debug)]
struct Table<'a> {
    /// Column names as printed, e.g. `#bytes`, `t_min[usec]`, `99% percentile[usec]`.
    columns: Vec<String>,
    /// The data row's values, one per column.
    values: Vec<&'a str>,
}

impl<'a> Table<'a> {
    /// Finds the header line (the first starting with `#bytes`) and the first data row after it: the
    /// first line made of numbers only. Lines in between are skipped (perftest may print warnings
    /// there, e.g. "Conflicting CPU frequency values detected"); a `---` separator ends the search.
    fn find(output: &'a str) -> Result<Self, String> {
        let mut lines = output.lines();
        let header = lines
            .by_ref()
            .find(|line| line.trim_start().starts_with("#bytes"))
            .ok_or("no result table (no line starting with #bytes)")?;
        let columns = column_names(header);
        for line in lines {
            let line = line.trim();
            if line.starts_with("---") {
                break;
            }
            let values: Vec<&str> = line.split_whitespace().collect();
            let numeric = !values.is_empty() && values.iter().all(|value| value.parse::<f64>().is_ok());
            if !numeric {
                continue;
            }
            if values.len() != columns.len() {
                return Err(format!("the data row has {} values for {} columns", values.len(), columns.len()));
            }
            return Ok(Self { columns, values });
        }
        Err("no data row after the #bytes header".to_owned())
    }

    /// The value of the column called `name` (its name without the `[unit]` suffix), parsed, with the
    /// column's unit (empty when it has none).
    fn number<T: FromStr>(&self, name: &str) -> Result<(T, &str), String> {
        let (index, unit) = self
            .columns
            .iter()
            .enumerate()
            .find_map(|(index, column)| {
                let (base, unit) = match column.split_once('[') {
                    Some((base, unit)) => (base, unit.trim_end_matches(']')),
                    None => (column.as_str(), ""),
                };
                (base == name).then_some((index, unit))
            })
            .ok_or_else(|| {
                let mut reason = format!("no column {name} among");
                for column in &self.columns {
                    let _ = write!(reason, " {column:?}");
                }
                reason
            })?;
        let value = self.values[index];
        let parsed = value.parse().map_err(|_| format!("column {name} has malformed value {value:?}"))?;
        Ok((parsed, unit))
    }
}

/// Splits a header line into column names. Names may contain spaces (`99% percentile[usec]`,
/// `BW peak[MB/sec]`), so a name runs until a word that ends with its `[unit]`; `#bytes` and
/// `#iterations` have no unit and are names by themselves.
fn column_names(header: &str) -> Vec<String> {
    let mut columns = Vec::new();
    let mut pending = String::new();
    for word in header.split_whitespace() {
        if !pending.is_empty() {
            pending.push(' ');
        }
        pending.push_str(word);
        if word.starts_with('#') || word.ends_with(']') {
            columns.push(std::mem::take(&mut pending));
        }
    }
    if !pending.is_empty() {
        columns.push(pending);
    }
    columns
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;

    // Client stdout captured in soft-roce-setup/vm-run's VM (Soft-RoCE rxe0, perftest 6.06), trimmed.
    // The tabs in the data rows are perftest's.

    /// `ib_read_lat -d rxe0 -x 1 -p 18601 -s 8 -n 200 10.77.0.1`
    const READ_LAT: &str = r#"---------------------------------------------------------------------------------------
                    RDMA_Read Latency Test
 Dual-port       : OFF		Device         : rxe0
 GID index       : 1
---------------------------------------------------------------------------------------
 local address: LID 0000 QPN 0x0011 PSN 0x8fb9a8 OUT 0x80 RKey 0x0002f1 VAddr 0x00561839d68000
---------------------------------------------------------------------------------------
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] 
 8       200          26.00          169.93       26.43    	       27.61       	7.44   		116.78  		169.93 
---------------------------------------------------------------------------------------
"#;

    /// `ib_write_lat -d rxe0 -x 1 -p 18601 -s 8 -n 200 10.77.0.1`
    const WRITE_LAT: &str = r#"---------------------------------------------------------------------------------------
                    RDMA_Write Latency Test
 Dual-port       : OFF		Device         : rxe0
 GID index       : 1
---------------------------------------------------------------------------------------
 local address: LID 0000 QPN 0x0014 PSN 0x5420c8 RKey 0x000424 VAddr 0x0056287ee41000
---------------------------------------------------------------------------------------
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] 
 8       200          8.87           208.45       8.95     	       9.76        	9.25   		139.43  		208.45 
---------------------------------------------------------------------------------------
"#;

    /// `ib_atomic_lat -d rxe0 -x 1 -p 18601 -A CMP_AND_SWAP -n 200 10.77.0.1`
    const CAS_LAT: &str = r#"---------------------------------------------------------------------------------------
                    Atomic CMP_AND_SWAP Latency Test
 Dual-port       : OFF		Device         : rxe0
 GID index       : 1
---------------------------------------------------------------------------------------
 local address: LID 0000 QPN 0x0016 PSN 0xd21de
---------------------------------------------------------------------------------------
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] 
 8       200          16.44          129.42       16.66    	       17.03       	2.83   		47.96   		129.42 
---------------------------------------------------------------------------------------
"#;

    /// `ib_atomic_lat -d rxe0 -x 1 -p 18601 -A FETCH_AND_ADD -s 8 -n 200 10.77.0.1`
    const FAA_LAT: &str = r#"---------------------------------------------------------------------------------------
                    Atomic FETCH_AND_ADD Latency Test
 Dual-port       : OFF		Device         : rxe0
 GID index       : 1
---------------------------------------------------------------------------------------
 local address: LID 0000 QPN 0x0018 PSN 0xbabcea
---------------------------------------------------------------------------------------
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] 
 8       200          16.53          125.54       16.73    	       17.07       	2.71   		49.82   		125.54 
---------------------------------------------------------------------------------------
"#;

    /// `ib_atomic_lat ... -A FETCH_AND_ADD -s 16`: exit status 1, complete stdout.
    const ATOMIC_SIZE_REFUSED: &str = r#"---------------------------------------------------------------------------------------
Message size cannot be changed for Atomic tests 
"#;

    /// `ib_read_bw -d rxe0 -x 1 -p 18601 -s 8 -l 16 -n 1024 --report_gbits 10.77.0.1`
    const READ_BW_GBITS: &str = r#"---------------------------------------------------------------------------------------
Post List requested - CQ moderation will be the size of the post list
---------------------------------------------------------------------------------------
                    RDMA_Read Post List BW Test
 Dual-port       : OFF		Device         : rxe0
 Post List       : 16
 GID index       : 1
---------------------------------------------------------------------------------------
 local address: LID 0000 QPN 0x0014 PSN 0xdea0ed OUT 0x80 RKey 0x000587 VAddr 0x005633a7b9e000
---------------------------------------------------------------------------------------
 #bytes     #iterations    BW peak[Gb/sec]    BW average[Gb/sec]   MsgRate[Mpps]
 8          1024           0.004936            0.004404            0.068818
---------------------------------------------------------------------------------------
"#;

    /// `ib_read_bw -d rxe0 -x 1 -p 18601 -s 8 -l 16 -n 1024 10.77.0.1` (default unit, MB/sec = MiB/s)
    const READ_BW_MB: &str = r#"---------------------------------------------------------------------------------------
Post List requested - CQ moderation will be the size of the post list
---------------------------------------------------------------------------------------
                    RDMA_Read Post List BW Test
 Dual-port       : OFF		Device         : rxe0
 Post List       : 16
 GID index       : 1
---------------------------------------------------------------------------------------
 local address: LID 0000 QPN 0x0012 PSN 0x1d48ee OUT 0x80 RKey 0x00025a VAddr 0x00556726c85000
---------------------------------------------------------------------------------------
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 8          1024             0.59               0.44   		   0.058118
---------------------------------------------------------------------------------------
"#;

    /// `ib_read_bw -d rxe0 -x 1 -p 18601 -s 65536 -l 4 -n 200 10.77.0.1`
    const READ_BW_64K: &str = r#"---------------------------------------------------------------------------------------
Post List requested - CQ moderation will be the size of the post list
---------------------------------------------------------------------------------------
                    RDMA_Read Post List BW Test
 Dual-port       : OFF		Device         : rxe0
 Post List       : 4
 GID index       : 1
---------------------------------------------------------------------------------------
 local address: LID 0000 QPN 0x0015 PSN 0x6a5862 OUT 0x80 RKey 0x00064f VAddr 0x007f39b269e000
---------------------------------------------------------------------------------------
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 65536      200              69.13              66.34  		   0.001061
---------------------------------------------------------------------------------------
"#;

    fn assert_close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() <= expected.abs() * 1e-9, "{actual} != {expected}");
    }

    fn parse_error_reason(result: Result<impl std::fmt::Debug, PerftestError>) -> String {
        match result {
            Err(PerftestError::Parse { reason, .. }) => reason,
            other => panic!("expected a Parse error, got {other:?}"),
        }
    }

    #[test]
    fn parses_read_latency() {
        let result = parse_latency(LatencyTest::Read, READ_LAT).unwrap();
        assert_eq!(
            result,
            LatencyResult {
                test: LatencyTest::Read,
                size: 8,
                iterations: 200,
                min_us: 26.00,
                max_us: 169.93,
                typical_us: 26.43,
                avg_us: 27.61,
                stdev_us: 7.44,
                p99_us: 116.78,
                p999_us: 169.93,
                half_round_trip: false,
            }
        );
    }

    #[test]
    fn parses_write_latency_as_half_round_trip() {
        let result = parse_latency(LatencyTest::Write, WRITE_LAT).unwrap();
        assert!(result.half_round_trip);
        assert_eq!((result.size, result.iterations), (8, 200));
        assert_eq!((result.min_us, result.typical_us, result.avg_us), (8.87, 8.95, 9.76));
        assert_eq!((result.p99_us, result.p999_us, result.max_us), (139.43, 208.45, 208.45));
    }

    #[test]
    fn parses_atomic_latencies() {
        let cas = parse_latency(LatencyTest::CompareSwap, CAS_LAT).unwrap();
        assert_eq!(
            (cas.test, cas.size, cas.iterations, cas.half_round_trip),
            (LatencyTest::CompareSwap, 8, 200, false)
        );
        assert_eq!((cas.min_us, cas.typical_us, cas.avg_us, cas.stdev_us), (16.44, 16.66, 17.03, 2.83));
        assert_eq!((cas.p99_us, cas.p999_us, cas.max_us), (47.96, 129.42, 129.42));

        let faa = parse_latency(LatencyTest::FetchAdd, FAA_LAT).unwrap();
        assert_eq!((faa.test, faa.size, faa.iterations, faa.half_round_trip), (LatencyTest::FetchAdd, 8, 200, false));
        assert_eq!((faa.min_us, faa.typical_us, faa.avg_us, faa.stdev_us), (16.53, 16.73, 17.07, 2.71));
        assert_eq!((faa.p99_us, faa.p999_us, faa.max_us), (49.82, 125.54, 125.54));
    }

    #[test]
    fn latency_parsing_ignores_warnings_and_line_endings() {
        // On hosts with CPU frequency scaling perftest prints warnings between the header and the row.
        let warning =
            "Conflicting CPU frequency values detected: 1200.000000 != 3591.635000. CPU Frequency is not max.\n";
        let header_end = READ_LAT.find("\n 8 ").unwrap() + 1;
        let warned = format!("{}{warning}{warning}{}", &READ_LAT[..header_end], &READ_LAT[header_end..]);
        let expected = parse_latency(LatencyTest::Read, READ_LAT).unwrap();
        assert_eq!(parse_latency(LatencyTest::Read, &warned).unwrap(), expected);
        // The VM's serial console turns line ends into CRLF.
        assert_eq!(parse_latency(LatencyTest::Read, &READ_LAT.replace('\n', "\r\n")).unwrap(), expected);
    }

    #[test]
    fn latency_columns_are_found_by_name() {
        let output = " #bytes t_avg[usec] 99.9% percentile[usec] t_stdev[usec] 99% percentile[usec] t_typical[usec] \
                      t_max[usec] t_min[usec] #iterations\n 64 2.5 9.0 0.5 4.0 2.4 10.0 2.0 1000\n";
        let result = parse_latency(LatencyTest::Read, output).unwrap();
        assert_eq!((result.size, result.iterations), (64, 1000));
        assert_eq!((result.min_us, result.max_us, result.typical_us, result.avg_us), (2.0, 10.0, 2.4, 2.5));
        assert_eq!((result.stdev_us, result.p99_us, result.p999_us), (0.5, 4.0, 9.0));
    }

    #[test]
    fn parses_read_bandwidth_in_gbits() {
        let result = parse_bandwidth(READ_BW_GBITS, 16).unwrap();
        assert_eq!((result.size, result.post_list, result.iterations), (8, 16, 1024));
        assert_close(result.bw_peak_gbps, 0.004936 / 8.0);
        assert_close(result.bw_avg_gbps, 0.004404 / 8.0);
        assert_eq!(result.msg_rate_mpps, 0.068818);
        // Consistency: bandwidth = size * message rate (8 B * 68,818 /s = 0.55 MB/s).
        let from_rate = result.size as f64 * result.msg_rate_mpps * 1e6 / 1e9;
        assert!((result.bw_avg_gbps - from_rate).abs() / from_rate < 0.01, "{result:?}");
    }

    #[test]
    fn parses_read_bandwidth_in_perftest_megabytes() {
        let small = parse_bandwidth(READ_BW_MB, 16).unwrap();
        assert_eq!((small.size, small.post_list, small.iterations), (8, 16, 1024));
        assert_close(small.bw_peak_gbps, 0.59 * 1_048_576.0 / 1e9);
        assert_close(small.bw_avg_gbps, 0.44 * 1_048_576.0 / 1e9);
        assert_eq!(small.msg_rate_mpps, 0.058118);

        let large = parse_bandwidth(READ_BW_64K, 4).unwrap();
        assert_eq!((large.size, large.post_list, large.iterations), (65536, 4, 200));
        assert_close(large.bw_avg_gbps, 66.34 * 1_048_576.0 / 1e9);
        assert_eq!(large.msg_rate_mpps, 0.001061);
        // perftest's MB are MiB: 65536 B * 1061 /s = 69.5e6 B/s = 66.3 MiB/s, so MB/s / 1000 would be 4.9% low.
        let from_rate = large.size as f64 * large.msg_rate_mpps * 1e6 / 1e9;
        assert!((large.bw_avg_gbps - from_rate).abs() / from_rate < 0.005, "{large:?}");
    }

    #[test]
    fn converts_bandwidth_units_to_gigabytes() {
        assert_eq!(gbytes_per_sec(100.0, "Gb/sec"), Some(12.5));
        assert_close(gbytes_per_sec(10_000.0, "MB/sec").unwrap(), 10.48576);
        assert_close(gbytes_per_sec(10_000.0, "MiB/sec").unwrap(), 10.48576);
        assert_eq!(gbytes_per_sec(1.0, "furlongs/sec"), None);
    }

    #[test]
    fn garbage_is_a_parse_error() {
        for garbage in ["", "hello\nworld\n", "#bytes\n", "\u{0}\u{1}binary junk 1 2 3"] {
            parse_error_reason(parse_latency(LatencyTest::Read, garbage));
            parse_error_reason(parse_bandwidth(garbage, 1));
        }
        // The output of a refused test has no table.
        let reason = parse_error_reason(parse_latency(LatencyTest::FetchAdd, ATOMIC_SIZE_REFUSED));
        assert!(reason.contains("#bytes"), "{reason}");
        // A latency table is not a bandwidth table, and the other way round.
        assert!(parse_error_reason(parse_bandwidth(READ_LAT, 1)).contains("no column MsgRate"));
        assert!(parse_error_reason(parse_latency(LatencyTest::Read, READ_BW_GBITS)).contains("no column t_min"));
    }

    #[test]
    fn malformed_tables_are_parse_errors() {
        let header = " #bytes #iterations t_min[usec] t_max[usec] t_typical[usec] t_avg[usec] t_stdev[usec] \
                      99% percentile[usec] 99.9% percentile[usec]\n";
        let missing_value = format!("{header} 8 200 1 2 1.5 1.6 0.1 1.9\n");
        assert!(parse_error_reason(parse_latency(LatencyTest::Read, &missing_value)).contains("8 values for 9"));
        let no_row =
            format!("{header} Conflicting CPU frequency values detected\n-----\n 8 200 1 2 1.5 1.6 0.1 1.9 2\n");
        assert!(parse_error_reason(parse_latency(LatencyTest::Read, &no_row)).contains("no data row"));
        let cycles = header.replace("usec", "cycles") + " 8 200 1 2 1.5 1.6 0.1 1.9 2\n";
        assert!(parse_error_reason(parse_latency(LatencyTest::Read, &cycles)).contains("expected usec"));
        let fractional_size = format!("{header} 8.5 200 1 2 1.5 1.6 0.1 1.9 2\n");
        assert!(parse_error_reason(parse_latency(LatencyTest::Read, &fractional_size)).contains("#bytes"));
    }

    #[test]
    fn splits_header_into_column_names() {
        let header = " #bytes #iterations    t_min[usec]  \t 99% percentile[usec]   99.9% percentile[usec] ";
        assert_eq!(
            column_names(header),
            ["#bytes", "#iterations", "t_min[usec]", "99% percentile[usec]", "99.9% percentile[usec]"]
        );
        let header = " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]";
        assert_eq!(
            column_names(header),
            ["#bytes", "#iterations", "BW peak[MB/sec]", "BW average[MB/sec]", "MsgRate[Mpps]"]
        );
    }

    #[test]
    fn builds_perftest_arguments() {
        let mut target =
            Target { remote: None, device: "rxe0".into(), gid_index: Some(1), ip: "10.77.0.1".into(), port: 18600 };
        let args = common_args(&target, 200);
        assert_eq!(args, ["-d", "rxe0", "-x", "1", "-p", "18600", "-n", "200", "-F"]);
        assert_eq!(with_server_ip(&args, &target).last().unwrap(), "10.77.0.1");
        target.gid_index = None;
        assert_eq!(common_args(&target, 5), ["-d", "rxe0", "-p", "18600", "-n", "5", "-F"]);
    }

    #[test]
    fn refuses_arguments_perftest_would_refuse() {
        let target = Target { remote: None, device: "none".into(), gid_index: None, ip: "127.0.0.1".into(), port: 1 };
        for test in [LatencyTest::CompareSwap, LatencyTest::FetchAdd] {
            let error = run_latency(&target, test, 16, 100).unwrap_err();
            assert!(matches!(error, PerftestError::InvalidArgument { tool: "ib_atomic_lat", .. }), "{error:?}");
        }
        for (post_list, iterations) in [(16, 1000), (0, 1000)] {
            let error = run_read_bandwidth(&target, 8, post_list, iterations).unwrap_err();
            assert!(matches!(error, PerftestError::InvalidArgument { tool: "ib_read_bw", .. }), "{error:?}");
        }
    }

    #[test]
    fn recognises_connect_failures() {
        // What the client prints (on stderr) when no server listens yet, as seen in the VM.
        let refused = "Couldn't connect to 10.77.0.1:18600\n\
                       Unable to open file descriptor for socket connection Unable to init the socket connection\n";
        assert!(is_connect_failure(refused));
        assert!(!is_connect_failure("Number of iterations must be a multiple of post list size\n"));
    }

    // run_pair with sh standing in for perftest.

    /// A fresh scratch directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rdmem-perftest-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn sh(script: String) -> Vec<OsString> {
        vec!["-c".into(), script.into()]
    }

    const FAST: Limits = Limits {
        timeout: Duration::from_secs(20),
        connect_tries: 5,
        retry_delay: Duration::from_millis(10),
        server_grace: Duration::from_millis(100),
    };

    /// A server that records its pid and then waits to be killed.
    fn pid_recording_server(dir: &std::path::Path) -> Vec<OsString> {
        sh(format!("echo $$ > {}/server.pid; exec sleep 60", dir.display()))
    }

    /// Whether the process whose pid the server recorded in `dir` is gone (killed and reaped).
    fn server_is_gone(dir: &std::path::Path) -> bool {
        let pid = std::fs::read_to_string(dir.join("server.pid")).unwrap();
        !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists()
    }

    #[test]
    fn missing_tool_is_not_installed() {
        let error =
            run_pair(&local(), "ib_nothing", OsStr::new("rdmem-no-such-perftest-tool"), &[], &[], FAST).unwrap_err();
        assert!(matches!(error, PerftestError::NotInstalled { tool: "ib_nothing" }), "{error:?}");
    }

    #[test]
    fn retries_the_client_until_it_connects_and_reaps_the_server() {
        let dir = scratch("retry");
        let client = sh(format!(
            "n=$(cat {dir}/tries 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {dir}/tries
             if [ $n -lt 3 ]; then echo \"Couldn't connect to 10.77.0.1:18515\" >&2; exit 1; fi
             echo ' #bytes #iterations'; echo ' 8 200'",
            dir = dir.display()
        ));
        let stdout = run_pair(&local(), "fake", OsStr::new("sh"), &pid_recording_server(&dir), &client, FAST).unwrap();
        assert_eq!(stdout, " #bytes #iterations\n 8 200\n");
        assert_eq!(std::fs::read_to_string(dir.join("tries")).unwrap().trim(), "3");
        assert!(server_is_gone(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn gives_up_after_the_last_try() {
        let dir = scratch("give-up");
        let client = sh(format!("echo x >> {}/tries; echo \"Couldn't connect to here\" >&2; exit 1", dir.display()));
        let error =
            run_pair(&local(), "fake", OsStr::new("sh"), &pid_recording_server(&dir), &client, FAST).unwrap_err();
        assert!(
            matches!(&error, PerftestError::Failed { output, .. } if output.contains("Couldn't connect")),
            "{error:?}"
        );
        assert_eq!(std::fs::read_to_string(dir.join("tries")).unwrap().lines().count(), 5);
        assert!(server_is_gone(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn other_client_failures_are_not_retried() {
        let dir = scratch("no-retry");
        let client = sh(format!("echo x >> {}/tries; echo 'Message size cannot be changed'; exit 1", dir.display()));
        let error =
            run_pair(&local(), "fake", OsStr::new("sh"), &pid_recording_server(&dir), &client, FAST).unwrap_err();
        match &error {
            PerftestError::Failed { tool: "fake", status, output } => {
                assert_eq!(status.code(), Some(1));
                assert_eq!(output, "Message size cannot be changed\n");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert_eq!(std::fs::read_to_string(dir.join("tries")).unwrap().lines().count(), 1);
        assert!(server_is_gone(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_server_that_exits_early_fails_the_run() {
        let server = sh("echo 'Number of iterations must be a multiple of post list size' >&2; exit 1".into());
        // The client keeps failing to connect, as it would with no server.
        let client = sh("sleep 0.05; echo \"Couldn't connect to here\" >&2; exit 1".into());
        let error = run_pair(&local(), "fake", OsStr::new("sh"), &server, &client, FAST).unwrap_err();
        match &error {
            PerftestError::Failed { status, output, .. } => {
                assert_eq!(status.code(), Some(1));
                assert!(output.contains("server exited") && output.contains("multiple of post list"), "{output}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn a_hung_client_times_out_and_both_ends_are_killed() {
        let dir = scratch("timeout");
        let client = sh(format!("echo $$ > {}/client.pid; exec sleep 60", dir.display()));
        let limits = Limits { timeout: Duration::from_millis(300), ..FAST };
        let started = Instant::now();
        let error =
            run_pair(&local(), "fake", OsStr::new("sh"), &pid_recording_server(&dir), &client, limits).unwrap_err();
        assert!(matches!(error, PerftestError::Timeout { tool: "fake", .. }), "{error:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(server_is_gone(&dir));
        let client_pid = std::fs::read_to_string(dir.join("client.pid")).unwrap();
        assert!(!std::path::Path::new(&format!("/proc/{}", client_pid.trim())).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The target soft-roce-setup/vm-run describes in its environment.
    /// A target whose servers run here.
    fn local() -> Target {
        Target { remote: None, device: "none".into(), gid_index: None, ip: "127.0.0.1".into(), port: 1 }
    }

    fn target_from_env() -> Target {
        let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run in vm-run"));
        Target {
            remote: None,
            device: var("RDMEM_DEVICE"),
            gid_index: std::env::var("RDMEM_GID_INDEX").ok().map(|index| index.parse().unwrap()),
            ip: var("RDMEM_IP"),
            port: 18700,
        }
    }

    #[test]
    #[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
    fn runs_perftest_on_the_device() {
        let target = target_from_env();
        for test in [LatencyTest::Read, LatencyTest::Write, LatencyTest::CompareSwap, LatencyTest::FetchAdd] {
            let result = run_latency(&target, test, 8, 200).unwrap();
            eprintln!("{result:?}");
            assert_eq!((result.test, result.size, result.iterations), (test, 8, 200));
            assert!(result.min_us > 0.0 && result.min_us <= result.typical_us && result.typical_us <= result.max_us);
            assert!(result.avg_us > 0.0 && result.p99_us >= result.typical_us && result.p999_us >= result.p99_us);
            assert_eq!(result.half_round_trip, test == LatencyTest::Write);
        }
        // ib_read_bw wants the iterations to be a multiple of the post list: 1024, not 1000.
        let result = run_read_bandwidth(&target, 8, 16, 1024).unwrap();
        eprintln!("{result:?}");
        assert_eq!((result.size, result.post_list, result.iterations), (8, 16, 1024));
        // The average and the message rate both come from the whole run's duration: they must
        // agree (bytes per second = operations per second x size). The peak comes from the
        // shortest interval perftest's cycle counter saw between completions, which under the
        // VM's emulated clock has printed 0, so it is only checked to be a number.
        assert!(result.bw_avg_gbps > 0.0 && result.msg_rate_mpps > 0.0, "{result:?}");
        let from_rate = result.msg_rate_mpps * 1e6 * result.size as f64 / 1e9;
        assert!((result.bw_avg_gbps / from_rate - 1.0).abs() < 0.05, "average {result:?} vs rate {from_rate} GB/s");
        assert!(result.bw_peak_gbps.is_finite() && result.bw_peak_gbps >= 0.0, "{result:?}");
    }
}
