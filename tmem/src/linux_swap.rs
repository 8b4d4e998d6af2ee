//! Linux swap plumbing for the swap test and benchmark: `rdmem-swap` as a child process with its
//! figures, `nbd-client`, `mkswap`/`swapon`/`swapoff`, zram, a cgroup v2 with `memory.max`, and
//! the `swap_workload` example. Needs root and the tools on PATH (the VM has them); every
//! failure is an error naming the command, never a panic.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The error type of this module: what failed, in words.
pub type Error = String;

/// Runs `program` with `args`; its stdout, or an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{program} {args:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Bytes of swap in use on `device` (`swapon --show`; 0 when it is not listed).
pub fn swap_used(device: &str) -> Result<u64, Error> {
    let out = run("swapon", &["--show=NAME,USED", "--bytes", "--noheadings"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .find(|(name, _)| name.trim() == device)
        .and_then(|(_, used)| used.trim().parse().ok())
        .unwrap_or(0))
}

/// `rdmem-swap` serving an export on a unix socket, its latest `stats` line kept. Dropping it
/// kills it.
pub struct SwapServer {
    child: Child,
    stats: Arc<Mutex<HashMap<String, String>>>,
    socket: PathBuf,
}

impl SwapServer {
    /// Starts `program` (the `rdmem-swap` binary) for memory node `memnode` with `token`, an
    /// export of `size` (e.g. "512M") on `socket`, and `more` arguments; waits until it serves.
    pub fn start(
        program: &Path,
        memnode: &str,
        token: &str,
        size: &str,
        socket: &Path,
        more: &[&str],
    ) -> Result<SwapServer, Error> {
        let mut child = Command::new(program)
            .args(["--memnode", memnode, "--size", size, "--stats-every", "1"])
            .arg("--socket")
            .arg(socket)
            .args(more)
            .env("RDMEM_TOKEN", token)
            .env_remove("RDMEM_TOKEN_FILE")
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let stats = Arc::new(Mutex::new(HashMap::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let kept = Arc::clone(&stats);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, words)) = line.split_once("stats ") {
                    let mut map = kept.lock().unwrap_or_else(|p| p.into_inner());
                    for (k, v) in words.split_whitespace().filter_map(|kv| kv.split_once('=')) {
                        map.insert(k.to_owned(), v.to_owned());
                    }
                } else {
                    eprintln!("[rdmem-swap] {line}");
                    if line.contains("serving") {
                        let _ = ready_tx.send(());
                    }
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(120)).is_err() {
            let _ = child.kill();
            return Err("rdmem-swap did not start serving within 120 s".into());
        }
        Ok(SwapServer { child, stats, socket: socket.to_owned() })
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A figure of its next `stats` line (it prints one a second).
    pub fn figure(&self, name: &str) -> Result<f64, Error> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = self.stats.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
                return v.parse().map_err(|_| format!("rdmem-swap printed {name}={v}"));
            }
            if Instant::now() > deadline {
                return Err("rdmem-swap printed no stats line for 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for SwapServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A block device in use as swap; dropping it turns the swap off (and detaches an NBD device).
pub struct SwapDevice {
    device: String,
    nbd: bool,
    on: bool,
}

impl SwapDevice {
    /// Attaches `server`'s export as `device` (`/dev/nbdN`) and swaps to it (with discard).
    pub fn nbd(server: &SwapServer, device: &str) -> Result<SwapDevice, Error> {
        if !Path::new(device).exists() {
            return Err(format!("{device} is missing: is the nbd module loaded?"));
        }
        let socket = server.socket().to_str().ok_or("socket path is not UTF-8")?;
        run("nbd-client", &["-unix", socket, "-b", "4096", "-N", "rdmem", "-swap", device])?;
        let mut swap = SwapDevice { device: device.to_owned(), nbd: true, on: false };
        run("mkswap", &[device])?;
        run("swapon", &["--discard", device])?;
        swap.on = true;
        Ok(swap)
    }

    /// Makes zram device `device` (`/dev/zramN`) of `size` bytes and swaps to it.
    pub fn zram(device: &str, size: u64) -> Result<SwapDevice, Error> {
        let name = device.trim_start_matches("/dev/");
        std::fs::write(format!("/sys/block/{name}/disksize"), size.to_string())
            .map_err(|e| format!("cannot size {device}: {e} (is the zram module loaded?)"))?;
        let mut swap = SwapDevice { device: device.to_owned(), nbd: false, on: false };
        run("mkswap", &[device])?;
        run("swapon", &[device])?;
        swap.on = true;
        Ok(swap)
    }

    /// Its path.
    pub fn path(&self) -> &str {
        &self.device
    }

    /// Turns the swap off now (the device stays attached until dropped).
    pub fn off(&mut self) -> Result<(), Error> {
        run("swapoff", &[&self.device])?;
        self.on = false;
        Ok(())
    }

    /// For zram: bytes swapped in and the bytes they take (`mm_stat`'s first two fields).
    pub fn zram_sizes(&self) -> Result<(u64, u64), Error> {
        let name = self.device.trim_start_matches("/dev/");
        let stat = std::fs::read_to_string(format!("/sys/block/{name}/mm_stat")).map_err(|e| e.to_string())?;
        let mut f = stat.split_whitespace().map(|w| w.parse::<u64>().unwrap_or(0));
        Ok((f.next().unwrap_or(0), f.next().unwrap_or(0)))
    }
}

impl Drop for SwapDevice {
    fn drop(&mut self) {
        if self.on {
            let _ = Command::new("swapoff").arg(&self.device).status();
        }
        if self.nbd {
            let _ = Command::new("nbd-client").args(["-d", &self.device]).status();
        } else {
            let name = self.device.trim_start_matches("/dev/");
            let _ = std::fs::write(format!("/sys/block/{name}/reset"), "1");
        }
    }
}

/// A cgroup v2 with a memory limit (`None`: no limit); removed when dropped.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `/sys/fs/cgroup/NAME` (mounting cgroup2 and enabling the memory controller if
    /// needed) with `memory.max` = `limit` bytes.
    pub fn new(name: &str, limit: Option<u64>) -> Result<Cgroup, Error> {
        if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            run("mount", &["-t", "cgroup2", "none", "/sys/fs/cgroup"])?;
        }
        std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory")
            .map_err(|e| format!("cannot enable the memory controller: {e}"))?;
        let path = Path::new("/sys/fs/cgroup").join(name);
        let _ = std::fs::create_dir(&path);
        let max = limit.map_or("max".to_owned(), |l| l.to_string());
        std::fs::write(path.join("memory.max"), max).map_err(|e| format!("cannot set memory.max: {e}"))?;
        Ok(Cgroup { path })
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A run of the `swap_workload` example (found on PATH) in a cgroup.
pub struct Workload {
    child: Child,
    out: Option<BufReader<ChildStdout>>,
}

/// What a finished workload reported.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadResult {
    /// Its own time from start to end, in seconds.
    pub runtime_s: f64,
    /// Its major page faults (pages read back from swap, mostly).
    pub major_faults: u64,
}

impl Workload {
    /// Starts `swap_workload MIB` in `cgroup`; with `pause`, it waits after its first pass
    /// until [`Workload::go_on`].
    pub fn start(mib: u64, cgroup: &Cgroup, pause: bool) -> Result<Workload, Error> {
        let mut cmd = Command::new("swap_workload");
        cmd.arg(mib.to_string()).arg("--cgroup").arg(cgroup.path());
        if pause {
            cmd.arg("--pause");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start swap_workload (the rdmem-tmem example, on PATH in the VM): {e}"))?;
        let out = child.stdout.take().map(BufReader::new);
        Ok(Workload { child, out })
    }

    fn line(&mut self) -> Result<String, Error> {
        let mut line = String::new();
        self.out.as_mut().expect("stdout").read_line(&mut line).map_err(|e| e.to_string())?;
        Ok(line.trim().to_owned())
    }

    /// Waits for the end of its first pass (started with `pause`).
    pub fn wait_filled(&mut self) -> Result<(), Error> {
        match self.line()? {
            l if l == "filled" => Ok(()),
            l => Err(format!("swap_workload's first pass: {l:?}")),
        }
    }

    /// Lets a paused workload go on.
    pub fn go_on(&mut self) -> Result<(), Error> {
        self.child.stdin.as_mut().expect("stdin").write_all(b"\n").map_err(|e| e.to_string())
    }

    /// Waits for its end: its figures, or an error if a word came back wrong (or it failed).
    pub fn finish(mut self) -> Result<WorkloadResult, Error> {
        let last = self.line()?;
        let status = self.child.wait().map_err(|e| e.to_string())?;
        // "ok MIB MiB, N major faults, S s"
        let words: Vec<&str> = last.split_whitespace().collect();
        match (status.success(), words.as_slice()) {
            (true, ["ok", _, "MiB,", faults, "major", "faults,", secs, "s"]) => Ok(WorkloadResult {
                runtime_s: secs.parse().map_err(|_| format!("swap_workload printed {last:?}"))?,
                major_faults: faults.parse().map_err(|_| format!("swap_workload printed {last:?}"))?,
            }),
            _ => Err(format!("swap_workload failed ({status}): {last:?}")),
        }
    }

    /// Kills it (SIGKILL) and waits for it.
    pub fn kill(mut self) -> Result<(), Error> {
        self.child.kill().map_err(|e| e.to_string())?;
        self.child.wait().map_err(|e| e.to_string())?;
        Ok(())
    }
}
