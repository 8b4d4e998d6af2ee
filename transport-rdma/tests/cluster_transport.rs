//! Cluster tier: the transport between machines. Node 0 serves a memory node on its own address;
//! every other machine runs the transport conformance checks against it, then 2 threads each
//! add to one word (the sum must be exact); then the same with 5% packet loss on node 0's link
//! (netem), printing the slowdown. And what crosses the switch between machines (the cluster's
//! capture): connection setup and control requests, with no byte run of the token. Ignored by
//! plain `cargo test`; runs on every machine at once with `soft-roce-setup/vm-cluster
//! --device-tests`, and fails outside a cluster.

use std::time::{Duration, Instant};

use rdmem_core::conformance;
use rdmem_core::{Endpoint, GlobalAddr, NodeId, Transport};
use rdmem_transport_rdma::cm_auth;
use rdmem_transport_rdma::control::Control;
use rdmem_transport_rdma::spawn::{ClusterNode, MemnodeChild};
use rdmem_transport_rdma::{RdmaOptions, RdmaTransport};

const TOKEN: &str = "cluster-transport-test";
const PORT: u16 = 7610;
const MEET: Duration = Duration::from_secs(300);

fn connect(addr: &str) -> RdmaTransport {
    RdmaTransport::connect(RdmaOptions::for_memnodes(&[addr], TOKEN).unwrap())
        .expect("connect to the memory node on node 0")
}

/// Each client machine's own scratch area (conformance checks write there).
fn scratch(me: &ClusterNode) -> GlobalAddr {
    GlobalAddr::new(NodeId(0), (1 << 20) * (me.index as u64 + 1)).unwrap()
}

/// 2 threads of this machine, `n` fetch-and-adds of 1 each on `word`; returns the seconds.
fn add_from_two_threads(transport: &RdmaTransport, word: GlobalAddr, n: u64) -> f64 {
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let mut ep = transport.endpoint().expect("endpoint");
                for _ in 0..n {
                    ep.faa(word, 1).expect("FAA across machines");
                }
            });
        }
    });
    started.elapsed().as_secs_f64()
}

fn netem(args: &[&str]) {
    let status = std::process::Command::new("tc").args(["qdisc"]).args(args).status().expect("run tc");
    assert!(status.success(), "tc qdisc {args:?} failed");
}

#[test]
#[ignore = "needs a VM cluster: run with soft-roce-setup/vm-cluster --device-tests"]
fn cluster_transport_conformance_and_exact_sums_across_machines_with_and_without_loss() {
    let me = ClusterNode::from_env().unwrap();
    assert!(me.nodes() >= 2, "needs a memory node machine and at least one client machine");
    let server = me.addr(0, PORT);
    let _memnode = (me.index == 0).then(|| {
        MemnodeChild::start_on("memnode", &server, TOKEN, &["--pool-size", "32M"]).expect("memory node on node 0")
    });
    let clients = (me.nodes() - 1) as u64;
    let word = GlobalAddr::new(NodeId(0), 64).unwrap();
    let lossy_word = GlobalAddr::new(NodeId(0), 128).unwrap();
    let (n, lossy_n) = (500, 100);
    me.meet_all(PORT + 1, MEET).expect("everyone up");

    let mut clean = 0.0;
    if me.index != 0 {
        let transport = connect(&server);
        conformance::read_write(&transport, scratch(&me));
        conformance::atomics(&transport, scratch(&me));
        conformance::batch_mixing_all_ops(&transport, scratch(&me));
        conformance::write_behind(&transport, scratch(&me));
        conformance::bad_inputs(&transport, scratch(&me));
        clean = add_from_two_threads(&transport, word, n);
    }
    me.meet_all(PORT + 2, MEET).expect("all clients done");
    if me.index == 1 {
        let sum = connect(&server).endpoint().unwrap().read_u64(word).unwrap();
        assert_eq!(sum, clients * 2 * n, "every FAA of every machine counted once");
    }

    // 5% of the frames on the memory node's link are lost: RC retransmits, nothing is lost.
    if me.index == 0 {
        netem(&["add", "dev", "eth0", "root", "netem", "loss", "5%"]);
    }
    me.meet_all(PORT + 3, MEET).expect("loss on");
    if me.index != 0 {
        let transport = connect(&server);
        let lossy_scratch = scratch(&me).checked_add(512 << 10).unwrap();
        conformance::read_write(&transport, lossy_scratch);
        conformance::atomics(&transport, lossy_scratch);
        let lossy = add_from_two_threads(&transport, lossy_word, lossy_n);
        let per_op = |secs: f64, ops: u64| secs / (2 * ops) as f64;
        println!(
            "node {}: FAA per operation {:.1} us clean, {:.1} us with 5% loss: {:.2}x",
            me.index,
            per_op(clean, n) * 1e6,
            per_op(lossy, lossy_n) * 1e6,
            per_op(lossy, lossy_n) / per_op(clean, n)
        );
    }
    me.meet_all(PORT + 4, MEET).expect("lossy clients done");
    if me.index == 0 {
        netem(&["del", "dev", "eth0", "root"]);
    }
    if me.index == 1 {
        let sum = connect(&server).endpoint().unwrap().read_u64(lossy_word).unwrap();
        assert_eq!(sum, clients * 2 * lossy_n, "nothing lost on a lossy link");
    }
    me.meet_all(PORT + 5, MEET).expect("done");
}

/// True when `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
#[ignore = "needs a VM cluster: run with soft-roce-setup/vm-cluster --device-tests"]
fn cluster_the_token_is_in_no_frame_that_crosses_the_switch() {
    const TOKEN: &str = "cluster-capture-token-Zq7#Lm2!";
    const PORT: u16 = 7700;
    let me = ClusterNode::from_env().unwrap();
    assert!(me.nodes() >= 2, "needs a memory node machine and a client machine");
    let capture = std::env::var("RDMEM_CAPTURE").expect("vm-cluster names its capture in RDMEM_CAPTURE");
    let server = me.addr(0, PORT);
    let _memnode = (me.index == 0).then(|| {
        MemnodeChild::start_on("memnode", &server, TOKEN, &["--pool-size", "16M"]).expect("memory node on node 0")
    });
    me.meet_all(PORT + 1, MEET).expect("memory node up");
    if me.index == 1 {
        // Connection setup (RDMA-CM across machines), data, and control requests.
        let transport = RdmaTransport::connect(RdmaOptions::for_memnodes(&[&server], TOKEN).unwrap()).unwrap();
        let mut ep = transport.endpoint().unwrap();
        ep.faa(GlobalAddr::new(NodeId(0), 64).unwrap(), 1).unwrap();
        // Listed once the node has read the connection's ESTABLISHED event.
        let control = Control::new(&server, TOKEN);
        let deadline = Instant::now() + Duration::from_secs(30);
        while control.clients().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "this client is never listed");
            std::thread::sleep(Duration::from_millis(20));
        }
        let e = Control::new(&server, TOKEN).checkpoint(None, false).unwrap_err();
        assert!(e.to_string().contains("--checkpoint-dir"), "{e}");
    }
    me.meet_all(PORT + 2, MEET).expect("client done");
    if me.index == 0 {
        let frames = std::fs::read(&capture).expect("the switch's capture");
        // What the client sent crossed the switch, so the capture holds it: the connect
        // request's header (magic, version, reserved byte, tenant tag) and the control magic.
        let mut header = vec![b'R', b'M', cm_auth::VERSION, 0];
        header.extend_from_slice(&cm_auth::tenant_tag(cm_auth::DEFAULT_TENANT).to_le_bytes());
        assert!(contains(&frames, &header), "no connect request in {} bytes of capture", frames.len());
        assert!(contains(&frames, b"RDMCTL"), "no control request in the capture");
        // No run of 6 bytes of the token anywhere (a random match in a few MB is ~1e-7).
        let leaked: Vec<&[u8]> = TOKEN.as_bytes().windows(6).filter(|w| contains(&frames, w)).collect();
        assert!(leaked.is_empty(), "token bytes on the wire: {leaked:?}");
        println!("capture: {} bytes of setup and control frames checked; no token bytes", frames.len());
    }
    me.meet_all(PORT + 3, MEET).expect("checked");
}
