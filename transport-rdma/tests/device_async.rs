//! Device tier: the async face ([`rdmem_core::aio`]) over a real device against a running
//! `rdmem-memnode`: the shared conformance checks, the idle path through the completion
//! channel, and failures (a killed node, a failed post or poll, a deadline) as errors, not hangs.
//!
//! Ignored by plain `cargo test`; runs in the Soft-RoCE VM with
//! `soft-roce-setup/vm-run --device-tests`. Without a device the memory node cannot start and
//! every test fails.

use std::future::Future;
use std::time::{Duration, Instant};

use rdmem_core::aio::{AsyncEndpoint, AsyncOptions, LocalFuture, Submit, TokioReactor, block_on};
use rdmem_core::conformance::{self, join_all};
use rdmem_core::{Error, GlobalAddr, NodeId, OpKind, Result, Transport, WcStatus};
use rdmem_transport_rdma::spawn::MemnodeChild;
use rdmem_transport_rdma::{DeviceSelection, RdmaBuffer, RdmaOptions, RdmaTransport};

const TOKEN: &str = "device-async-token";

fn memnode(node_id: u16) -> MemnodeChild {
    let id = node_id.to_string();
    MemnodeChild::start(&format!("memnode {node_id}"), TOKEN, &["--pool-size", "16M", "--node-id", &id])
        .unwrap_or_else(|e| panic!("rdmem-memnode {node_id} did not start: {e}"))
}

fn connect(nodes: &[&MemnodeChild]) -> RdmaTransport {
    let options = RdmaOptions {
        memnodes: nodes.iter().map(|n| n.addr().to_string()).collect(),
        token: TOKEN.into(),
        device: DeviceSelection::from_env().expect("RDMEM_* variables"),
        ..Default::default()
    };
    RdmaTransport::connect(options).expect("connect")
}

fn scratch(node: u16) -> GlobalAddr {
    GlobalAddr::new(NodeId(node), 1 << 20).unwrap()
}

fn sleepy() -> AsyncOptions {
    AsyncOptions { spin: Duration::ZERO, ..AsyncOptions::default() }
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn async_face_matches_the_loopback_transport() {
    let node = memnode(0);
    let transport = connect(&[&node]);
    conformance::all_async(&transport, scratch(0));
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn an_idle_driver_sleeps_on_the_completion_channel_and_is_woken() {
    let node = memnode(0);
    let transport = connect(&[&node]);
    let ep = AsyncEndpoint::with_options(transport.endpoint().unwrap(), sleepy()).unwrap();
    sleeps_and_is_woken_by_completions(&transport, &ep, |f| block_on(f));
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn an_idle_driver_sleeps_in_tokios_reactor_and_is_woken_by_the_channel() {
    let node = memnode(0);
    let transport = connect(&[&node]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    let ep = {
        let _in = rt.enter();
        AsyncEndpoint::with_reactor(transport.endpoint().unwrap(), sleepy(), &TokioReactor).unwrap()
    };
    sleeps_and_is_woken_by_completions(&transport, &ep, |f| rt.block_on(f));
}

/// READs of 15 MiB until the driver has slept and a completion event (not only an idle check)
/// has woken it, each READ checked; then many small operations in flight through the same path.
fn sleeps_and_is_woken_by_completions<E: Submit<Buffer = RdmaBuffer>>(
    transport: &RdmaTransport,
    ep: &AsyncEndpoint<E>,
    run: impl for<'f> Fn(LocalFuture<'f, ()>),
) {
    // A 15 MiB READ takes rxe many milliseconds: with no spin the driver sleeps meanwhile, once
    // its few hundred polls before the first look at the clock find nothing. A loaded host can
    // finish one READ within them (seen once in CI), so READs go on until one has slept and
    // been woken by its completion, each checked; a driver that cannot sleep still fails.
    let len = 15 << 20;
    let mut sync = transport.endpoint().unwrap();
    let pattern: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    rdmem_core::Endpoint::write(&mut sync, GlobalAddr::new(NodeId(0), 0).unwrap(), &pattern).unwrap();
    let mut buf = Some(ep.buffer(len).unwrap());
    for _ in 0..20 {
        run(Box::pin(async {
            let (r, back) = ep.read_into(GlobalAddr::new(NodeId(0), 0).unwrap(), buf.take().unwrap(), 0..len).await;
            r.expect("READ 15 MiB");
            assert!(back[..] == pattern[..], "a READ completed through the sleeping path returned other bytes");
            buf = Some(back);
        }));
        if ep.sleeps() > 0 && ep.event_wakes() > 0 {
            break;
        }
    }
    assert!(ep.sleeps() > 0, "the driver never slept with spin = 0 in 20 READs of 15 MiB");
    assert!(ep.event_wakes() > 0, "no sleep was ended by a completion event in 20 READs of 15 MiB");
    // Many small operations through the same path, in flight together: exact sums.
    run(Box::pin(async {
        ep.write_u64(scratch(0), 0).await.unwrap();
        for round in 0..20u64 {
            let futs: Vec<LocalFuture<'_, Result<u64>>> =
                (0..64).map(|_| Box::pin(ep.faa(scratch(0), 1)) as _).collect();
            for old in join_all(futs).await {
                old.expect("FAA");
            }
            assert_eq!(ep.read_u64(scratch(0)).await.unwrap(), 64 * (round + 1));
        }
    }));
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn two_nodes_and_two_threads_of_async_endpoints_lose_nothing() {
    let (a, b) = (memnode(0), memnode(1));
    let transport = connect(&[&a, &b]);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let transport = &transport;
            s.spawn(move || {
                let options = if t == 0 { AsyncOptions::default() } else { sleepy() };
                let ep = AsyncEndpoint::with_options(transport.endpoint().unwrap(), options).unwrap();
                let futs: Vec<LocalFuture<'_, Result<u64>>> =
                    (0..2000).map(|i| Box::pin(ep.faa(scratch((i % 2) as u16), 1)) as _).collect();
                for old in block_on(join_all(futs)) {
                    old.expect("FAA");
                }
            });
        }
    });
    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    assert_eq!(block_on(ep.read_u64(scratch(0))).unwrap(), 2000);
    assert_eq!(block_on(ep.read_u64(scratch(1))).unwrap(), 2000);
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn futures_on_a_killed_memory_node_fail_instead_of_hanging() {
    let mut node = memnode(0);
    let transport = connect(&[&node]);
    let ep = AsyncEndpoint::with_options(transport.endpoint().unwrap(), sleepy()).unwrap();
    block_on(ep.faa(scratch(0), 1)).expect("FAA while the node is up");
    node.kill();
    let started = Instant::now();
    let futs: Vec<LocalFuture<'_, Result<u64>>> = (0..32).map(|_| Box::pin(ep.faa(scratch(0), 1)) as _).collect();
    let outs = block_on(join_all(futs));
    let took = started.elapsed();
    for out in &outs {
        match out {
            Err(Error::NodeGone { .. }) | Err(Error::Broken { .. }) => {}
            Err(Error::Completion { status: WcStatus::RetryExceeded | WcStatus::Flushed, .. }) => {}
            other => panic!("an FAA on a dead node: {other:?}"),
        }
    }
    eprintln!("32 async FAAs on a dead node failed after {took:?}: {:?}", outs[0]);
    assert!(matches!(block_on(ep.faa(scratch(0), 1)), Err(Error::Broken { .. })), "the connection stays broken");
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_failed_post_fails_its_futures_and_breaks_only_that_node() {
    let (a, b) = (memnode(0), memnode(1));
    let transport = connect(&[&a, &b]);
    let mut raw = transport.endpoint().unwrap();
    raw.inject_post_failure();
    let ep = AsyncEndpoint::new(raw).unwrap();
    let e = block_on(ep.faa(scratch(1), 1)).expect_err("the post failed");
    assert!(matches!(e, Error::Post { op: OpKind::FetchAdd, errno: 12, addr } if addr == scratch(1)), "{e:?}");
    assert!(matches!(block_on(ep.faa(scratch(1), 1)), Err(Error::Broken { node: NodeId(1) })));
    assert_eq!(block_on(ep.faa(scratch(0), 1)).expect("node 0 is untouched"), 0);
    let fresh = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    assert_eq!(block_on(fresh.read_u64(scratch(1))).unwrap(), 0, "nothing was posted");
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_failed_poll_stops_the_queue_pairs_before_failing_the_futures() {
    let node = memnode(0);
    let transport = connect(&[&node]);
    let mut raw = transport.endpoint().unwrap();
    raw.inject_poll_failure();
    let ep = AsyncEndpoint::new(raw).unwrap();
    let buf = ep.buffer(1 << 20).unwrap();
    let (r, mut buf) = block_on(ep.read_into(scratch(0), buf, 0..1 << 20));
    assert!(matches!(r, Err(Error::Poll { op: OpKind::Read, errno: 5, .. })), "{r:?}");
    buf[..8].copy_from_slice(&1u64.to_le_bytes()); // ours again
    assert!(matches!(block_on(ep.read_u64(scratch(0))), Err(Error::Broken { .. })));
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn an_operation_past_its_deadline_times_out() {
    let node = memnode(0);
    let transport = connect(&[&node]);
    let mut raw = transport.endpoint().unwrap();
    raw.set_completion_deadline(Duration::ZERO);
    let ep = AsyncEndpoint::with_options(raw, sleepy()).unwrap();
    let len = 15 << 20;
    let buf = ep.buffer(len).unwrap();
    let (r, _buf) = block_on(ep.read_into(GlobalAddr::new(NodeId(0), 0).unwrap(), buf, 0..len));
    assert!(matches!(r, Err(Error::Timeout { op: OpKind::Read, .. })), "{r:?}");
    assert!(matches!(block_on(ep.read_u64(scratch(0))), Err(Error::Broken { .. })));
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn dropping_futures_and_the_endpoint_mid_flight_is_safe() {
    let node = memnode(0);
    let transport = connect(&[&node]);
    let noop = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(noop);
    for round in 0..20 {
        let ep = AsyncEndpoint::with_options(transport.endpoint().unwrap(), sleepy()).unwrap();
        let buf = ep.buffer(8 << 20).unwrap();
        let mut dst = vec![0u8; 4096];
        {
            let mut big = Box::pin(ep.read_into(GlobalAddr::new(NodeId(0), 0).unwrap(), buf, 0..8 << 20));
            let mut small = Box::pin(ep.read(scratch(0), &mut dst));
            let mut add = Box::pin(ep.faa(scratch(0).checked_add(8192).unwrap(), 1));
            // Each polled until it is in flight (or done): twice at most.
            let (mut b, mut s, mut a) = (false, false, false);
            for _ in 0..2 {
                b = b || big.as_mut().poll(&mut cx).is_ready();
                s = s || small.as_mut().poll(&mut cx).is_ready();
                a = a || add.as_mut().poll(&mut cx).is_ready();
            }
        }
        dst.fill(0xee); // the READ was dropped: its destination is ours
        if round % 2 == 0 {
            drop(ep); // with the 8 MiB READ (and its buffer) possibly still in flight
        } else {
            assert!(block_on(ep.faa(scratch(0).checked_add(16384).unwrap(), 1)).is_ok());
        }
        assert!(dst.iter().all(|&b| b == 0xee), "a dropped READ wrote into its memory");
    }
    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    assert_eq!(block_on(ep.read_u64(scratch(0).checked_add(16384).unwrap())).unwrap(), 10);
}
