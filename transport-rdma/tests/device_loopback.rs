//! Device tier: a real RDMA WRITE then READ through an RC queue pair connected to itself.
//!
//! Ignored by plain `cargo test`; runs in the Soft-RoCE VM with
//! `soft-roce-setup/vm-run --device-tests`. It fails, never passes, when no device is present:
//! opening the device is the first step and its error is the test's failure.

use std::time::{Duration, Instant};

use rdmem_transport_rdma::{Device, DeviceSelection};
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::AddressHandleAttribute;
use sideway::ibverbs::completion::GenericCompletionQueue;
use sideway::ibverbs::device_context::{Mtu, PortState};
use sideway::ibverbs::queue_pair::{
    GenericQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState, SendOperationFlags,
    SetScatterGatherEntry, WorkRequestFlags,
};

const LEN: usize = 4096;

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn write_then_read_on_loopback_rc_queue_pair() {
    let selection = DeviceSelection::from_env().expect("RDMEM_* variables");
    let device = Device::open(&selection).unwrap_or_else(|e| panic!("no usable RDMA device: {e}"));
    let ctx = device.context();
    let port = ctx.query_port(device.port()).expect("ibv_query_port");
    assert_eq!(port.port_state(), PortState::Active, "port {} of {} is not active", device.port(), device.name());

    let pd = ctx.alloc_pd().expect("ibv_alloc_pd");
    // The "remote" memory and two local buffers: the WRITE's source and the READ's target.
    let mut remote = vec![0u8; LEN].into_boxed_slice();
    let mut source: Box<[u8]> = (0..LEN).map(|i| (i * 7 + 3) as u8).collect();
    let mut target = vec![0u8; LEN].into_boxed_slice();
    let remote_access = AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead;
    // SAFETY: the three buffers outlive their regions (dropped at the end of the test, after the
    // regions) and are not touched by the CPU while a work request that uses them is in flight.
    let (remote_mr, source_mr, target_mr) = unsafe {
        (
            pd.reg_mr(remote.as_mut_ptr() as usize, LEN, remote_access).expect("ibv_reg_mr remote"),
            pd.reg_mr(source.as_mut_ptr() as usize, LEN, AccessFlags::LocalWrite).expect("ibv_reg_mr source"),
            pd.reg_mr(target.as_mut_ptr() as usize, LEN, AccessFlags::LocalWrite).expect("ibv_reg_mr target"),
        )
    };

    // A basic CQ: extended CQs are broken on rxe with rdma-core < 55 (see the notes).
    let mut cq_builder = ctx.create_cq_builder();
    cq_builder.setup_cqe(16);
    let cq = GenericCompletionQueue::from(cq_builder.build().expect("ibv_create_cq"));
    let mut qp_builder = pd.create_qp_builder();
    qp_builder
        .setup_max_send_wr(16)
        .setup_max_recv_wr(1)
        .setup_max_inline_data(0)
        .setup_send_cq(cq.clone())
        .setup_recv_cq(cq.clone())
        .setup_send_ops_flags(SendOperationFlags::Write | SendOperationFlags::Read);
    let mut qp: GenericQueuePair = qp_builder.build_ex().expect("ibv_create_qp_ex").into();
    connect_to_itself(&device, &mut qp, remote_access);

    // WRITE the pattern into the remote buffer, then check it landed there.
    post_and_wait(&mut qp, &cq, 1, |guard| {
        let wr =
            guard.construct_wr(1, WorkRequestFlags::Signaled).setup_write(remote_mr.rkey(), remote.as_ptr() as u64);
        // SAFETY: `source` is registered by `source_mr` and stays untouched until the completion.
        unsafe { wr.setup_sge(source_mr.lkey(), source.as_ptr() as u64, LEN as u32) };
    });
    assert_eq!(&remote[..], &source[..], "RDMA WRITE did not put the bytes in the remote buffer");

    // READ it back into a third buffer.
    post_and_wait(&mut qp, &cq, 2, |guard| {
        let wr = guard.construct_wr(2, WorkRequestFlags::Signaled).setup_read(remote_mr.rkey(), remote.as_ptr() as u64);
        // SAFETY: `target` is registered by `target_mr` and stays untouched until the completion.
        unsafe { wr.setup_sge(target_mr.lkey(), target.as_ptr() as u64, LEN as u32) };
    });
    assert_eq!(&target[..], &source[..], "RDMA READ returned other bytes than were written");
}

/// Moves `qp` through INIT, RTR and RTS with itself as the destination.
fn connect_to_itself(device: &Device, qp: &mut GenericQueuePair, access: AccessFlags) {
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::Init).setup_pkey_index(0).setup_port(device.port()).setup_access_flags(access);
    qp.modify(&attr).expect("modify QP to INIT");

    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::ReadyToReceive)
        .setup_path_mtu(Mtu::Mtu1024)
        .setup_dest_qp_num(qp.qp_number())
        .setup_rq_psn(1)
        .setup_max_dest_read_atomic(16)
        .setup_min_rnr_timer(12);
    let mut ah = AddressHandleAttribute::new();
    ah.setup_port(device.port()).setup_dest_lid(device.lid());
    if !device.is_infiniband() || device.lid() == 0 {
        ah.setup_grh_src_gid_index(device.gid_index() as u8).setup_grh_dest_gid(&device.gid()).setup_grh_hop_limit(64);
    }
    attr.setup_address_vector(&ah);
    qp.modify(&attr).expect("modify QP to RTR");

    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::ReadyToSend)
        .setup_sq_psn(1)
        .setup_timeout(14)
        .setup_retry_cnt(7)
        .setup_rnr_retry(7)
        .setup_max_read_atomic(16);
    qp.modify(&attr).expect("modify QP to RTS");
}

/// Posts what `build` sets up and waits for the completion with `wr_id`, which must succeed.
fn post_and_wait(
    qp: &mut GenericQueuePair,
    cq: &GenericCompletionQueue,
    wr_id: u64,
    build: impl FnOnce(&mut <GenericQueuePair as QueuePair>::Guard<'_>),
) {
    let mut guard = qp.start_post_send();
    build(&mut guard);
    guard.post().expect("ibv_wr_complete");
    // The deadline only turns a lost completion into a failure instead of a hang.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut poller) = cq.start_poll() {
            if let Some(wc) = poller.next() {
                assert_eq!(wc.wr_id(), wr_id, "unexpected completion");
                assert_eq!(wc.status(), 0, "work request {wr_id} completed with status {}", wc.status());
                return;
            }
        }
        assert!(Instant::now() < deadline, "no completion for work request {wr_id} within 30 s");
        std::thread::yield_now();
    }
}
