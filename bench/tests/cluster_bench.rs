//! Cluster tier: `rdmem-bench verbs --compare-perftest` between two machines. Node 0 serves a
//! memory node and perftest servers (`rdmem-bench perftest-server`); node 1 measures rdmem and
//! perftest against node 0 in one run, and every row says it was cross-machine. Ignored by
//! plain `cargo test`; runs with `soft-roce-setup/vm-cluster --device-tests`.

use std::process::{Command, Stdio};
use std::time::Duration;

use rdmem_transport_rdma::spawn::{ClusterNode, MemnodeChild, find_binary};

const TOKEN: &str = "cluster-bench-test";
const PORT: u16 = 7660;
const MEET: Duration = Duration::from_secs(600);

#[test]
#[ignore = "needs a VM cluster: run with soft-roce-setup/vm-cluster --device-tests"]
fn cluster_verbs_next_to_perftest_between_two_machines() {
    let me = ClusterNode::from_env().unwrap();
    let memnode = me.addr(0, PORT);
    let perftest_server = me.addr(0, PORT + 1);
    let served = (me.index == 0).then(|| {
        let node = MemnodeChild::start_on("memnode", &memnode, TOKEN, &["--pool-size", "160M", "--page-size", "2M"])
            .expect("memory node");
        let spawner = Command::new(find_binary("rdmem-bench"))
            .args(["perftest-server", "--listen", &perftest_server])
            .stdout(Stdio::null())
            .spawn()
            .expect("start rdmem-bench perftest-server");
        (node, spawner)
    });
    me.meet_all(PORT + 2, MEET).expect("servers up");
    if me.index == 1 {
        let out = Command::new(find_binary("rdmem-bench"))
            .args([
                "verbs",
                "--memnode",
                &memnode,
                "--perftest-server",
                &perftest_server,
                "--compare-perftest",
                "--json",
            ])
            .args(["--sizes", "8", "--ops", "read,cas", "--batches", "16", "--threads", "1", "--throughput-sizes", "8"])
            .args(["--iters", "300", "--rounds", "1", "--throughput-ops", "2048", "--perftest-port", "18600"])
            .env("RDMEM_TOKEN", TOKEN)
            .output()
            .expect("run rdmem-bench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "rdmem-bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        print!("{stdout}");
        let rows: Vec<serde_json::Value> =
            stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON row")).collect();
        for implementation in ["rdmem", "perftest"] {
            let theirs: Vec<_> = rows.iter().filter(|r| r["impl"] == implementation).collect();
            assert!(!theirs.is_empty(), "no {implementation} rows:\n{stdout}");
            assert!(theirs.iter().all(|r| r["cross_machine"] == true), "every row is cross-machine:\n{stdout}");
        }
        assert!(rows.iter().any(|r| r["impl"] == "rdmem" && r["ratio_vs_perftest"].is_number()), "{stdout}");
    }
    me.meet_all(PORT + 3, MEET).expect("done");
    if let Some((_node, mut spawner)) = served {
        let _ = spawner.kill();
        let _ = spawner.wait();
    }
}
