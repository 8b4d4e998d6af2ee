//! Device tier: Linux swaps to remote memory through rdmem-swap. A memory node (its own
//! process) and rdmem-swap run in the VM; `nbd-client` attaches the export as /dev/nbd0, which
//! becomes swap (`swapon --discard`); a workload that fills and checks three times its cgroup's
//! `memory.max` runs to the end with every word right, while `swapon --show` and rdmem-swap's
//! figures show the pages on the memory node. Then a second workload is killed mid-run: its swap
//! is freed and trimmed, and the remote pages with it (but for the few the kernel keeps: its
//! per-CPU swap slot cache, and clusters not wholly free).
//!
//! Needs root, the nbd module, nbd-client and cgroup v2 (the VM has them): run with
//! `soft-roce-setup/vm-run --device-tests`. Ignored by plain `cargo test`.
#![cfg(feature = "rdma")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdmem_allocator::{Allocator, AllocatorOptions};
use rdmem_transport_rdma::spawn::{MemnodeChild, fresh_token};
use rdmem_transport_rdma::{RdmaOptions, RdmaTransport};

const LIMIT_MIB: u64 = 48;
const WORKLOAD_MIB: u64 = 3 * LIMIT_MIB;
const CGROUP: &str = "/sys/fs/cgroup/rdmem-swap-test";
const DEVICE: &str = "/dev/nbd0";

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes of swap in use on the device (0 when it is not listed).
fn swap_used() -> u64 {
    let out = run("swapon", &["--show=NAME,USED", "--bytes", "--noheadings"]);
    out.lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .find(|(name, _)| name.trim() == DEVICE)
        .and_then(|(_, used)| used.trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes in the chunks clients claimed on the memory node, read from its pool (as
/// `rdmem-pools usage` does).
fn node_bytes_used(addr: &str, token: &str) -> u64 {
    let transport = RdmaTransport::connect(RdmaOptions::for_memnodes(&[addr], token).unwrap()).unwrap();
    let allocator = Allocator::new(Arc::new(transport), AllocatorOptions::default()).unwrap();
    allocator.thread().unwrap().usage().unwrap().iter().map(|u| u.bytes_used()).sum()
}

/// rdmem-swap, with its stderr's latest `stats` line kept.
struct Swap {
    child: Child,
    stats: Arc<Mutex<HashMap<String, String>>>,
}

impl Swap {
    fn start(memnode: &str, token: &str, socket: &Path) -> Swap {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rdmem-swap"))
            .args(["--memnode", memnode, "--size", "512M", "--local-capacity", "8M", "--stats-every", "1"])
            .arg("--socket")
            .arg(socket)
            .env("RDMEM_TOKEN", token)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rdmem-swap");
        let stderr = child.stderr.take().unwrap();
        let stats = Arc::new(Mutex::new(HashMap::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let kept = Arc::clone(&stats);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(words) = line.split_once("stats ").map(|(_, w)| w) {
                    let mut map = kept.lock().unwrap();
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
        ready_rx.recv_timeout(Duration::from_secs(120)).expect("rdmem-swap serves");
        Swap { child, stats }
    }

    /// A figure from its latest stats line (after waiting for a fresh one).
    fn figure(&self, name: &str) -> u64 {
        self.stats.lock().unwrap().clear();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = self.stats.lock().unwrap().get(name) {
                return v.parse().unwrap_or_else(|_| panic!("{name}={v}"));
            }
            assert!(Instant::now() < deadline, "rdmem-swap printed no stats line");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        let _ = Command::new("swapoff").arg(DEVICE).status();
        let _ = Command::new("nbd-client").args(["-d", DEVICE]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn workload() -> Child {
    Command::new("swap_workload")
        .args([&WORKLOAD_MIB.to_string(), "--cgroup", CGROUP, "--pause"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start swap_workload (the tmem example, on PATH in the VM)")
}

/// Waits for the workload's `filled` line.
fn wait_filled(child: &mut Child) -> BufReader<std::process::ChildStdout> {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "filled", "the workload's first pass");
    out
}

#[test]
#[ignore = "needs an RDMA device, root, nbd and cgroup v2: run with soft-roce-setup/vm-run --device-tests"]
fn device_swap_to_remote_memory_under_a_memory_limit() {
    assert!(Path::new(DEVICE).exists(), "{DEVICE} is missing: is the nbd module loaded?");
    let token = fresh_token();
    let memnode = MemnodeChild::start("memnode", &token, &["--pool-size", "384M"]).expect("memory node");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("rdmem-swap.sock");
    let swap = Swap::start(memnode.addr(), &token, &socket);
    run("nbd-client", &["-unix", socket.to_str().unwrap(), "-b", "4096", "-N", "rdmem", "-swap", DEVICE]);
    run("mkswap", &[DEVICE]);
    run("swapon", &["--discard", DEVICE]);

    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        run("mount", &["-t", "cgroup2", "none", "/sys/fs/cgroup"]);
    }
    std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory").expect("enable the memory controller");
    let _ = std::fs::create_dir(CGROUP);
    std::fs::write(format!("{CGROUP}/memory.max"), format!("{}", LIMIT_MIB << 20)).unwrap();

    // One workload to the end: three times its limit, every word checked twice.
    let mut child = workload();
    let mut out = wait_filled(&mut child);
    let used = swap_used();
    let (remote_pages, remote_bytes) = (swap.figure("remote_pages"), swap.figure("remote_bytes"));
    let node_used = node_bytes_used(memnode.addr(), &token);
    println!(
        "filled: swap used {used} bytes; rdmem-swap: {remote_pages} pages in {remote_bytes} bytes on the memory node, \
         whose pool has {node_used} bytes in claimed chunks"
    );
    assert!(node_used >= remote_bytes, "the memory node's pool holds them");
    assert!(used >= (WORKLOAD_MIB - LIMIT_MIB) << 19, "at least half of what exceeds the limit is in swap: {used}");
    assert!(remote_pages * 4096 >= used / 2, "the swapped pages went to the memory node: {remote_pages} pages");
    child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    let mut last = String::new();
    out.read_line(&mut last).unwrap();
    let status = child.wait().unwrap();
    println!("workload: {}", last.trim());
    assert!(status.success() && last.starts_with("ok "), "every word came back: {status}, {last}");

    // A second one, killed while its pages are out: its swap is freed, trimmed, and the remote
    // pages go with it (only the swap header's page and pages the kernel keeps may stay).
    let mut child = workload();
    let _out = wait_filled(&mut child);
    assert!(swap_used() > 0);
    child.kill().unwrap();
    child.wait().unwrap();
    // The kernel keeps up to 64 free slots per CPU reserved (its swap slot cache, counted as
    // used), and discards a freed slot only once its whole cluster of 256 pages is free: the
    // clusters the slot caches draw from (at most two per CPU) and the header's stay partly
    // used, so up to that many clusters of freed pages stay untrimmed (and are overwritten,
    // freeing their old blocks, when the kernel uses those slots again).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let (max_used, max_remote) = (cpus * 64 * 4096, (2 * cpus + 1) * 256);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (used, remote) = (swap_used(), swap.figure("remote_pages"));
        if used <= max_used && remote <= max_remote {
            let trimmed = swap.figure("flushed");
            println!("after the kill: swap used {used} bytes, {remote} pages still remote, {trimmed} trimmed");
            assert!(trimmed >= remote_pages / 2, "the freed swap was trimmed, which freed its remote pages");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed workload's swap stays: used {used} bytes (at most {max_used}), {remote} remote pages (at most {max_remote})"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = std::fs::remove_dir(CGROUP);
}
