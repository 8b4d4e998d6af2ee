//! Device tier: the DSM launcher over rxe: `rdmem-run` stops its ranks and the memory node it
//! started when it is stopped. (The DSM programs across processes are `rdmem-apps`'s device
//! tests.) Ignored by plain `cargo test`; runs in the Soft-RoCE VM with
//! `soft-roce-setup/vm-run --device-tests`.
#![cfg(feature = "rdma")]

use std::process::Command;

use rdmem_transport_rdma::spawn::find_binary;

mod common;
use common::alive;

/// The processes whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some((head, rest)) = stat.rsplit_once(") ") else { continue };
        let ppid = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            found.push((pid, head.split_once(" (").map_or(String::new(), |(_, comm)| comm.to_owned())));
        }
    }
    found
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn sigterm_to_rdmem_run_stops_its_ranks_and_the_memory_node_it_started() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(find_binary("rdmem-run"))
        .args(["-n", "2", "--pool-size", "16M", "sh", "-c", "echo ready; exec sleep 600"])
        .env_remove("RDMEM_MEMNODES")
        .env_remove("RDMEM_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start rdmem-run");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        let line = lines.next().expect("a rank's line").expect("stdout");
        assert!(line.ends_with("ready"), "{line}");
    }
    let started = children_of(child.id());
    assert!(started.iter().any(|(_, comm)| comm == "rdmem-memnode"), "a memory node runs: {started:?}");
    // A rank that printed "ready" may not have exec'd sleep yet: it is still its shell then.
    let ranks = started.iter().filter(|(_, comm)| comm == "sleep" || comm == "sh").count();
    assert_eq!(ranks, 2, "two ranks run: {started:?}");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{status}");
    for (pid, comm) in started {
        assert!(!alive(pid), "{comm} (pid {pid}) outlived rdmem-run");
    }
}
