//! Device tier: locks and barrier over rxe, from several processes (`rdmem-locks`) against a
//! `rdmem-memnode` process. Ignored by plain `cargo test`; runs in the Soft-RoCE VM with
//! `soft-roce-setup/vm-run --device-tests`; without a device nothing starts and they fail.
#![cfg(feature = "rdma")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdmem_core::{Endpoint, GlobalAddr, NodeId, Transport};
use rdmem_transport_rdma::spawn::MemnodeChild;
use rdmem_transport_rdma::spawn::find_binary;
use rdmem_transport_rdma::{DeviceSelection, RdmaOptions, RdmaTransport};

const TOKEN: &str = "locks-device-test";
const COUNTER: u64 = 8192;

fn memnode() -> MemnodeChild {
    MemnodeChild::start("memnode", TOKEN, &["--pool-size", "8M"]).unwrap_or_else(|e| panic!("rdmem-memnode: {e}"))
}

fn locks(node: &MemnodeChild, args: &[&str]) -> Child {
    Command::new(find_binary("rdmem-locks"))
        .args(["--memnode", node.addr()])
        .args(args)
        .env("RDMEM_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start rdmem-locks")
}

fn wait_ok(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "rdmem-locks failed ({}): {stdout}", out.status);
    stdout
}

fn read_counter(node: &MemnodeChild) -> u64 {
    let transport = RdmaTransport::connect(RdmaOptions {
        memnodes: vec![node.addr().to_owned()],
        token: TOKEN.into(),
        device: DeviceSelection::from_env().unwrap(),
        ..Default::default()
    })
    .unwrap();
    transport.endpoint().unwrap().read_u64(GlobalAddr::new(NodeId(0), COUNTER).unwrap()).unwrap()
}

fn counter_run(cohort: bool) {
    let node = memnode();
    let (processes, threads, rounds) = (3, 2, 100);
    let children: Vec<_> = (0..processes)
        .map(|p| {
            let (p, t, r) = (p.to_string(), threads.to_string(), rounds.to_string());
            let mut args = vec!["counter", "--process", &p, "--threads", &t, "--rounds", &r];
            if cohort {
                args.push("--cohort");
            }
            locks(&node, &args)
        })
        .collect();
    for child in children {
        wait_ok(child);
    }
    assert_eq!(read_counter(&node), processes * threads * rounds, "lost increments");
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn three_processes_of_two_threads_keep_an_exact_counter() {
    counter_run(false);
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn three_processes_with_cohort_locks_keep_an_exact_counter() {
    counter_run(true);
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_holder_killed_mid_section_delays_the_others_by_about_a_lease() {
    let node = memnode();
    let lease_ms = 1000;
    let lease = lease_ms.to_string();
    // The victim completes 10 sections, then stalls holding the lock; it is killed there.
    let mut victim = locks(
        &node,
        &[
            "counter",
            "--process",
            "9",
            "--threads",
            "1",
            "--rounds",
            "100",
            "--stall-after",
            "10",
            "--lease-ms",
            &lease,
        ],
    );
    let mut line = String::new();
    BufReader::new(victim.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "holding", "the victim should be holding the lock");
    victim.kill().unwrap();
    victim.wait().unwrap();
    let started = Instant::now();
    let survivors: Vec<_> = (0..2)
        .map(|p| {
            locks(
                &node,
                &["counter", "--process", &p.to_string(), "--threads", "2", "--rounds", "50", "--lease-ms", &lease],
            )
        })
        .collect();
    for s in survivors {
        wait_ok(s);
    }
    let took = started.elapsed();
    eprintln!("survivors finished {took:?} after the kill (lease {lease_ms} ms)");
    // They waited for the dead holder's lease (about one) and then did 200 sections.
    assert!(took >= Duration::from_millis(lease_ms), "the dead holder's lease was not respected: {took:?}");
    assert_eq!(read_counter(&node), 10 + 2 * 2 * 50, "the counter must equal the completed sections");
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_barrier_over_three_processes_lets_nobody_through_early() {
    let node = memnode();
    let children: Vec<_> = (0..3)
        .map(|i| locks(&node, &["barrier", "--participants", "3", "--index", &i.to_string(), "--rounds", "20"]))
        .collect();
    for child in children {
        assert!(wait_ok(child).contains("done 20 rounds"));
    }
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn the_reader_writer_lock_is_fifo_across_three_processes() {
    use rdmem_coherence::sync::rwlock::{Mode, Section, check_history};
    let node = memnode();
    let (processes, threads, rounds) = (3, 2, 60);
    let children: Vec<_> = (0..processes)
        .map(|p| {
            let (p, t, r) = (p.to_string(), threads.to_string(), rounds.to_string());
            // A small reset threshold, so the history crosses generations.
            let args = ["rw", "--process", &p, "--threads", &t, "--rounds", &r, "--reset-threshold", "64"];
            locks(&node, &args)
        })
        .collect();
    let history: Vec<Section> = children
        .into_iter()
        .flat_map(|c| wait_ok(c).lines().filter_map(Section::from_line).collect::<Vec<_>>())
        .collect();
    assert_eq!(history.len() as u64, processes * threads * rounds, "every section reported");
    check_history(&history).unwrap_or_else(|e| panic!("{e}"));
    let writes = history.iter().filter(|s| s.mode == Mode::Write).count() as u64;
    assert!(writes > 0 && writes < history.len() as u64, "both readers and writers ran");
    assert_eq!(read_counter(&node), writes, "lost increments under the write lock");
    let generations: std::collections::HashSet<u8> = history.iter().map(|s| s.generation).collect();
    assert!(generations.len() > 2, "the word was reset past the threshold");
}
