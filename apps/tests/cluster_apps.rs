//! Cluster tier: the DSM with one rank per machine, as a batch system would start it (rank and
//! size from the environment): the litmus tests and the three programs, the memory node on
//! node 0; then SOR again with 5% packet loss on the memory node's link, printing the
//! slowdown. Ignored by plain `cargo test`; runs on every machine at once with
//! `soft-roce-setup/vm-cluster --device-tests`, and fails outside a cluster.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use rdmem_transport_rdma::spawn::{ClusterNode, MemnodeChild};

const TOKEN: &str = "cluster-apps-test";
const PORT: u16 = 7640;
const MEET: Duration = Duration::from_secs(600);

/// An example program, built by `cargo build --release --examples` (vm-cluster does).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe.parent().and_then(|deps| deps.parent()).expect("target dir").join("examples").join(name);
    assert!(path.is_file(), "{} is missing: build the examples (cargo build --release --examples)", path.display());
    path
}

/// Runs this machine's rank of `program`; returns its output, failing on a non-zero exit.
fn rank(me: &ClusterNode, job: &str, program: &str, args: &[&str]) -> String {
    rank_of(me, PORT, me.index, me.nodes(), job, program, args)
}

/// Runs rank `rank` of `size` of `program` on this machine, with the memory node on node 0's
/// `port`.
fn rank_of(me: &ClusterNode, port: u16, rank: usize, size: usize, job: &str, program: &str, args: &[&str]) -> String {
    let out = Command::new(example(program))
        .args(args)
        .env("RDMEM_RANK", rank.to_string())
        .env("RDMEM_SIZE", size.to_string())
        .env("RDMEM_MEMNODES", me.addr(0, port))
        .env("RDMEM_TOKEN", TOKEN)
        .env("RDMEM_JOB", job)
        .env_remove("RDMEM_CONFIG")
        .output()
        .expect("start the program");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rank {rank} of {program} failed ({}):\n{stdout}\n{stderr}", out.status);
    stdout
}

fn netem(args: &[&str]) {
    let status = Command::new("tc").arg("qdisc").args(args).status().expect("run tc");
    assert!(status.success(), "tc qdisc {args:?} failed");
}

#[test]
#[ignore = "needs a VM cluster: run with soft-roce-setup/vm-cluster --device-tests"]
fn cluster_dsm_programs_with_one_rank_per_machine() {
    let me = ClusterNode::from_env().unwrap();
    let _memnode = (me.index == 0).then(|| {
        MemnodeChild::start_on("memnode", &me.addr(0, PORT), TOKEN, &["--pool-size", "64M"]).expect("memory node")
    });
    let mut meet = PORT + 1;
    let mut next = || {
        meet += 1;
        me.meet_all(meet, MEET).expect("every machine at the same step");
    };
    next();
    let out = rank(&me, "litmus", "litmus", &[]);
    for check in
        ["seen by the next holder", "disjoint bytes", "every write before it", "no stale read", "lose no update"]
    {
        assert!(out.lines().any(|l| l.contains(check) && l.ends_with("ok")), "{check}:\n{out}");
    }
    for program in ["sor", "matmul", "histogram"] {
        next();
        let out = rank(&me, program, program, &[]);
        if me.index == 0 {
            assert!(out.contains("check=passed"), "{program}:\n{out}");
            print!("{out}");
        }
    }
    // The same small SOR without and with 5% loss on the memory node's link.
    let small = ["--rows", "64", "--iterations", "4"];
    let timed_sor = |job: &str| {
        let started = Instant::now();
        let out = rank(&me, job, "sor", &small);
        (out, started.elapsed().as_secs_f64())
    };
    next();
    let (clean, clean_secs) = timed_sor("sor-clean");
    next();
    if me.index == 0 {
        netem(&["add", "dev", "eth0", "root", "netem", "loss", "5%"]);
    }
    next();
    let (lossy, lossy_secs) = timed_sor("sor-lossy");
    next();
    if me.index == 0 {
        netem(&["del", "dev", "eth0", "root"]);
        assert!(clean.contains("check=passed") && lossy.contains("check=passed"), "{clean}\n{lossy}");
        println!(
            "sor 64x64, 4 iterations, {} ranks: {clean_secs:.2} s clean, {lossy_secs:.2} s with 5% loss: {:.2}x",
            me.nodes(),
            lossy_secs / clean_secs
        );
    }
    next();
}

/// The `time=` of a program's report line, in seconds.
fn reported_seconds(out: &str) -> f64 {
    let line = out.lines().find(|l| l.contains("check=")).unwrap_or_else(|| panic!("no report line:\n{out}"));
    let time = line.split_whitespace().find_map(|w| w.strip_prefix("time=")).expect("time=");
    time.parse().expect("seconds")
}

#[test]
#[ignore = "needs a VM cluster: run with soft-roce-setup/vm-cluster --device-tests"]
fn cluster_dsm_program_time_by_ranks_on_machines() {
    // SOR and matmul with 1, 2, ... ranks, one per machine: the first ranks on the machines
    // without the memory node, the last beside it on node 0. Each is checked against the
    // sequential run; the times (the program's own, on rank 0) are printed, not asserted.
    let me = ClusterNode::from_env().unwrap();
    let port = 7720; // and the next 9: no other cluster test uses them
    let _memnode = (me.index == 0).then(|| {
        MemnodeChild::start_on("memnode", &me.addr(0, port), TOKEN, &["--pool-size", "64M"]).expect("memory node")
    });
    let machines: Vec<usize> = (1..me.nodes()).chain([0]).collect();
    let my_rank = machines.iter().position(|&m| m == me.index).expect("every machine has a place");
    let mut meet = port;
    let mut next = || {
        meet += 1;
        me.meet_all(meet, MEET).expect("every machine at the same step");
    };
    next();
    for program in ["sor", "matmul"] {
        let mut times = Vec::new();
        for size in 1..=me.nodes() {
            next();
            if my_rank < size {
                let out = rank_of(&me, port, my_rank, size, &format!("{program}-{size}"), program, &[]);
                if my_rank == 0 {
                    assert!(out.contains("check=passed"), "{program} at {size} ranks:\n{out}");
                    times.push(reported_seconds(&out));
                }
            }
        }
        if my_rank == 0 {
            let relative: Vec<String> = times.iter().map(|t| format!("{:.2}", t / times[0])).collect();
            println!(
                "{program} by ranks on machines (1..{}): time {:?} s, relative to 1 rank {}",
                me.nodes(),
                times,
                relative.join(" / ")
            );
        }
    }
    next();
}
