//! Device tier: the transport semantics over a real device against a running `rdmem-memnode`,
//! and what happens when clients or memory nodes die.
//!
//! Ignored by plain `cargo test`; runs in the Soft-RoCE VM with
//! `soft-roce-setup/vm-run --device-tests`. Without a device the memory node cannot start and
//! every test fails.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdmem_core::conformance::{self, SCRATCH_BYTES};
use rdmem_core::{Endpoint, Error, GlobalAddr, NodeId, OpKind, Refusal, Transport, WcStatus};
use rdmem_transport_rdma::spawn::MemnodeChild;
use rdmem_transport_rdma::{Device, DeviceSelection, RdmaOptions, RdmaTransport, cm};

const TOKEN: &str = "device-test-token";

fn memnode(node_id: u16) -> MemnodeChild {
    let id = node_id.to_string();
    MemnodeChild::start(&format!("memnode {node_id}"), TOKEN, &["--pool-size", "16M", "--node-id", &id])
        .unwrap_or_else(|e| panic!("rdmem-memnode {node_id} did not start: {e}"))
}

fn options(addrs: &[&str], token: &str) -> RdmaOptions {
    RdmaOptions {
        memnodes: addrs.iter().map(|a| a.to_string()).collect(),
        token: token.into(),
        device: DeviceSelection::from_env().expect("RDMEM_* variables"),
        ..Default::default()
    }
}

/// A memory node (node 0), a transport connected to it, and an endpoint.
fn one_node() -> (MemnodeChild, RdmaTransport, rdmem_transport_rdma::RdmaEndpoint) {
    let node = memnode(0);
    let transport = RdmaTransport::connect(options(&[node.addr()], TOKEN)).expect("connect");
    let ep = transport.endpoint().expect("endpoint");
    (node, transport, ep)
}

fn at(base: GlobalAddr, offset: u64) -> GlobalAddr {
    base.checked_add(offset).expect("in the pool")
}

fn scratch(node: u16) -> GlobalAddr {
    GlobalAddr::new(NodeId(node), 1 << 20).unwrap()
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn semantics_match_the_loopback_transport() {
    let node = memnode(0);
    let transport = RdmaTransport::connect(options(&[node.addr()], TOKEN)).expect("connect");
    assert_eq!(transport.nodes()[0].pool_size, 16 << 20);
    conformance::read_write(&transport, scratch(0));
    conformance::atomics(&transport, scratch(0));
    conformance::batch_mixing_all_ops(&transport, scratch(0));
    conformance::write_behind(&transport, scratch(0));
    conformance::bad_inputs(&transport, scratch(0));
    conformance::concurrent_cas(&transport, scratch(0), 4, 100);
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn four_threads_each_on_its_own_queue_pair_hammer_one_word() {
    let node = memnode(0);
    let transport = RdmaTransport::connect(options(&[node.addr()], TOKEN)).expect("connect");
    // Each thread takes its own endpoint: its own queue pair, completion queue and staging.
    conformance::concurrent_faa(&transport, scratch(0), 4, 1000);
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn batches_span_two_memory_nodes_and_large_transfers_go_in_place() {
    let (a, b) = (memnode(3), memnode(4));
    let transport = RdmaTransport::connect(options(&[a.addr(), b.addr()], TOKEN)).expect("connect");
    let ids: Vec<u16> = transport.nodes().iter().map(|n| n.id.0).collect();
    assert_eq!(ids, vec![3, 4]);
    let mut ep = transport.endpoint().unwrap();
    let (mut old3, mut old4, mut again3) = (0, 0, 0);
    let mut batch = ep.batch();
    batch.faa(scratch(3), 3, &mut old3).faa(scratch(4), 4, &mut old4).faa(scratch(3), 30, &mut again3);
    batch.submit().expect("batch over two nodes");
    assert_eq!((old3, old4, again3), (0, 0, 3), "in order per node");
    assert_eq!((ep.read_u64(scratch(3)).unwrap(), ep.read_u64(scratch(4)).unwrap()), (33, 4));

    // 1 MiB through registered buffers (in place) and through the copying path (staging grows).
    let mut buf = ep.buffer(1 << 20).unwrap();
    buf.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 253) as u8);
    let want = buf.to_vec();
    ep.write_from(scratch(4), &buf, 0..1 << 20).unwrap();
    let mut copied = vec![0u8; 1 << 20];
    ep.read(scratch(4), &mut copied).unwrap();
    assert!(copied == want, "1 MiB copied READ");
    buf.fill(0);
    ep.read_into(scratch(4), &mut buf, 0..1 << 20).unwrap();
    assert!(buf[..] == want[..], "1 MiB in-place READ");
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_wrong_token_is_refused_with_a_message() {
    let node = memnode(0);
    let err =
        RdmaTransport::connect(options(&[node.addr()], "not-the-device-test-token")).err().expect("must be refused");
    assert!(matches!(&err, Error::Refused { refusal: Refusal::WrongToken, .. }), "{err}");
    // The node is unaffected.
    RdmaTransport::connect(options(&[node.addr()], TOKEN)).expect("the right token still works");
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_client_killed_mid_run_leaves_the_node_serving_others() {
    let node = memnode(0);
    let word = scratch(0);
    let transport = RdmaTransport::connect(options(&[node.addr()], TOKEN)).expect("connect");
    let mut ep = transport.endpoint().unwrap();
    ep.write_u64(word, 0).unwrap();
    let mut pinger = Command::new(env!("CARGO_BIN_EXE_rdmem-ping"))
        .args([
            "--memnode",
            node.addr(),
            "--op",
            "faa",
            "--offset",
            &word.offset().to_string(),
            "--count",
            "0",
            "--quiet",
        ])
        .env("RDMEM_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start rdmem-ping");
    let mut line = String::new();
    BufReader::new(pinger.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("connected"), "rdmem-ping: {line}");
    // Let it run until it has done real work, then kill it in the middle of its loop.
    while ep.read_u64(word).unwrap() < 200 {
        std::thread::yield_now();
    }
    pinger.kill().unwrap();
    pinger.wait().unwrap();

    // The node still serves this client and new ones, and nothing it did was lost or doubled.
    let base = ep.read_u64(word).unwrap();
    conformance::concurrent_faa(&transport, scratch(0).checked_add(SCRATCH_BYTES).unwrap(), 2, 200);
    let fresh = RdmaTransport::connect(options(&[node.addr()], TOKEN)).expect("new client after the kill");
    assert_eq!(
        fresh.endpoint().unwrap().faa(word, 1).unwrap(),
        base,
        "the word was left as the killed client's last FAA made it"
    );
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_killed_memory_node_gives_an_error_not_a_hang() {
    let mut node = memnode(0);
    let transport = RdmaTransport::connect(options(&[node.addr()], TOKEN)).expect("connect");
    let mut ep = transport.endpoint().unwrap();
    ep.faa(scratch(0), 1).expect("FAA while the node is up");
    node.kill();
    let started = Instant::now();
    let err = ep.faa(scratch(0), 1).expect_err("FAA on a dead node must fail");
    let took = started.elapsed();
    eprintln!("dead memory node reported after {took:?}: {err}");
    // The closed control socket says so within milliseconds; the retry counter (rarely) first.
    assert!(
        matches!(err, Error::NodeGone { .. } | Error::Completion { status: WcStatus::RetryExceeded, .. }),
        "{err:?}"
    );
    // The deadline guards against a hang only.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(matches!(ep.faa(scratch(0), 1), Err(Error::Broken { .. })), "the connection stays broken");
    let err = RdmaTransport::connect(options(&[node.addr()], TOKEN)).err().expect("nobody listens any more");
    assert!(matches!(err, Error::Connect { .. }), "{err}");
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_failed_poll_abandons_the_round_before_returning() {
    let (_node, transport, mut ep) = one_node();
    ep.write_u64(scratch(0), 7).expect("write");
    // A READ into a registered buffer whose poll fails: the error must come only after the
    // queue pair was stopped (so the device no longer writes into the buffer), which shows as
    // the connection being broken afterwards, not usable as if nothing happened.
    let mut buf = ep.buffer(4096).expect("buffer");
    ep.inject_poll_failure();
    let e = ep.read_into(scratch(0), &mut buf, 0..4096).expect_err("the poll failed");
    assert!(matches!(e, Error::Poll { op: OpKind::Read, errno: 5, .. }), "{e:?}");
    assert!(e.to_string().contains("polling the completion queue failed"), "{e}");
    let after = ep.read_u64(scratch(0)).expect_err("the round was abandoned: its queue pair is stopped");
    assert!(matches!(after, Error::Broken { node: NodeId(0) }), "{after}");
    // The buffer is the caller's again, and a new endpoint works.
    buf[..8].copy_from_slice(&1u64.to_le_bytes());
    let mut fresh = transport.endpoint().expect("endpoint");
    assert_eq!(fresh.read_u64(scratch(0)).expect("read"), 7);
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_node_that_never_answers_the_connect_request_times_out_with_that_message() {
    // An RDMA-CM listener that never reads its connect requests (not a memory node, or a hung
    // one).
    let device = Device::open(&DeviceSelection::from_env().unwrap()).expect("device");
    let channel = cm::EventChannel::new().expect("event channel");
    let mut listener = cm::CmId::new(&channel).expect("id");
    listener.bind(device.routable("127.0.0.1:0".parse().unwrap())).expect("bind");
    listener.listen(4).expect("listen");
    let port = listener.local_addr().expect("bound").port();
    let e = RdmaTransport::connect(options(&[&format!("127.0.0.1:{port}")], TOKEN)).err().expect("no answer");
    assert!(e.to_string().contains("timed out"), "{e}");
    drop(listener);
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_refused_access_is_a_completion_error_with_its_status() {
    let (_node, transport, mut ep) = one_node();
    ep.inject_wrong_rkey(NodeId(0));
    let e = ep.read_u64(scratch(0)).expect_err("the node refuses a wrong rkey");
    assert!(
        matches!(e, Error::Completion { op: OpKind::Read, status: WcStatus::RemoteAccess, addr, .. } if addr == scratch(0)),
        "{e:?}"
    );
    assert!(matches!(ep.read_u64(scratch(0)), Err(Error::Broken { .. })), "the connection is broken after it");
    assert_eq!(transport.endpoint().expect("endpoint").read_u64(scratch(0)).expect("read"), 0);
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_failed_write_behind_is_reported_by_the_next_operation_to_its_node_even_a_lone_one() {
    // A lone operation checks the completion it polls for its own success; a write-behind's
    // failure in that poll (on its connection or another) must still be reported, naming the
    // write, by the next operation to the write's node, and by no operation to another node.
    let (a, b) = (memnode(0), memnode(1));
    let transport = RdmaTransport::connect(options(&[a.addr(), b.addr()], TOKEN)).expect("connect");
    for round in 0..10u64 {
        // Same node: the lone FAA behind the failed write reports the write.
        let mut ep = transport.endpoint().expect("endpoint");
        ep.inject_wrong_rkey(NodeId(0));
        ep.post_write_u64(scratch(0), round).expect("posted");
        let e = ep.faa(at(scratch(0), 8), 1).expect_err("the write failed");
        assert!(
            matches!(e, Error::Completion { op: OpKind::Write, status: WcStatus::RemoteAccess, addr, .. } if addr == scratch(0)),
            "round {round}: {e:?}"
        );
        assert!(matches!(ep.read_u64(scratch(0)), Err(Error::Broken { node: NodeId(0) })), "round {round}");
        assert_eq!(ep.faa(scratch(1), 1).expect("node 1 is untouched"), 2 * round, "round {round}");

        // Other node: lone operations on node 1 succeed while node 0's write fails; the next
        // operation to node 0 reports it, once.
        let mut ep = transport.endpoint().expect("endpoint");
        ep.inject_wrong_rkey(NodeId(0));
        ep.post_write_u64(scratch(0), round).expect("posted");
        for _ in 0..3 {
            ep.read_u64(scratch(1)).expect("node 1 reads");
        }
        assert_eq!(ep.faa(scratch(1), 1).expect("node 1 is untouched"), 2 * round + 1, "round {round}");
        let e = ep.read_u64(at(scratch(0), 8)).expect_err("the write failed");
        assert!(
            matches!(e, Error::Completion { op: OpKind::Write, status: WcStatus::RemoteAccess, addr, .. } if addr == scratch(0)),
            "round {round}: {e:?}"
        );
        assert!(matches!(ep.read_u64(scratch(0)), Err(Error::Broken { node: NodeId(0) })), "round {round}");
    }
    let mut ep = transport.endpoint().expect("endpoint");
    assert_eq!(ep.read_u64(scratch(0)).expect("read"), 0, "no failed write landed");
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_failed_post_is_a_post_error_and_breaks_only_that_connection() {
    let (a, b) = (memnode(0), memnode(1));
    let transport = RdmaTransport::connect(options(&[a.addr(), b.addr()], TOKEN)).expect("connect");
    let mut ep = transport.endpoint().expect("endpoint");
    ep.inject_post_failure();
    let e = ep.faa(scratch(1), 1).expect_err("the post failed");
    assert!(matches!(e, Error::Post { op: OpKind::FetchAdd, errno: 12, addr } if addr == scratch(1)), "{e:?}");
    assert!(matches!(ep.faa(scratch(1), 1), Err(Error::Broken { node: NodeId(1) })));
    assert_eq!(ep.faa(scratch(0), 1).expect("node 0 is untouched"), 0);
    assert_eq!(transport.endpoint().expect("endpoint").read_u64(scratch(1)).expect("read"), 0, "nothing was posted");
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn an_operation_past_its_deadline_times_out_and_stops_its_queue_pair() {
    let (_node, transport, mut ep) = one_node();
    // A 15 MiB READ takes rxe far longer than the few thousand empty polls after which a zero
    // deadline is checked (and found past).
    let len = 15 << 20;
    let mut buf = ep.buffer(len).expect("buffer");
    ep.set_completion_deadline(Duration::ZERO);
    let e = ep.read_into(GlobalAddr::new(NodeId(0), 0).unwrap(), &mut buf, 0..len).expect_err("past the deadline");
    assert!(matches!(e, Error::Timeout { op: OpKind::Read, waited, .. } if waited == Duration::ZERO), "{e:?}");
    assert!(matches!(ep.read_u64(scratch(0)), Err(Error::Broken { .. })), "its queue pair is stopped");
    buf[..8].copy_from_slice(&1u64.to_le_bytes()); // the buffer is the caller's again
    assert_eq!(transport.endpoint().expect("endpoint").read_u64(scratch(0)).expect("read"), 0);
}
