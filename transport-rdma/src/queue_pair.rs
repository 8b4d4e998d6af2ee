//! Creating RC queue pairs and connecting them to a peer (INIT -> RTR -> RTS) as RDMA-CM
//! negotiated ([`crate::cm`]).
//!
//! Both sides of a connection use these: the compute endpoint and the memory node. Queue pairs
//! are extended (`ibv_create_qp_ex`, the `ibv_wr_*` posting API) with the atomic operations
//! enabled explicitly (without them rxe's provider crashes on a CAS), attached to a basic
//! completion queue (extended CQs are broken on rxe with rdma-core < 55). Read/atomic depth is
//! the device's maximum, so batches of READs and atomics pipeline.

use std::sync::Arc;

use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::GenericCompletionQueue;
use sideway::ibverbs::device_context::Mtu;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    ExtendedQueuePair, QueuePair, QueuePairAttribute, QueuePairState, SendOperationFlags,
};

use crate::cm::Negotiated;
use crate::device::Device;
use crate::error::RdmaError;

/// Limits a queue pair was created with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QpLimits {
    /// Send queue depth.
    pub send_depth: u32,
    /// Largest inline WRITE the queue pair accepts (0: none).
    pub max_inline: u32,
    /// Outstanding READs/atomics, as initiator and as responder.
    pub read_atomic_depth: u8,
}

/// Creates an RC queue pair on `pd` using `cq` for both queues, in state RESET; with
/// `bind_windows`, its send queue can also bind memory windows (a memory node's: some devices
/// size their send queue entries by the operations named here).
pub(crate) fn create(
    device: &Device,
    pd: &Arc<ProtectionDomain>,
    cq: &GenericCompletionQueue,
    send_depth: u32,
    bind_windows: bool,
) -> Result<(ExtendedQueuePair, QpLimits), RdmaError> {
    let attr = device.context().query_device().map_err(|e| RdmaError::verbs("ibv_query_device", e))?;
    let send_depth = send_depth.min(attr.max_qp_wr().max(1) as u32);
    let read_atomic_depth = attr.max_qp_rd_atom().clamp(1, 255).min(attr.max_qp_init_rd_atom().max(1)) as u8;
    let mut ops = SendOperationFlags::Write
        | SendOperationFlags::Read
        | SendOperationFlags::AtomicCompareAndSwap
        | SendOperationFlags::AtomicFetchAndAdd;
    if bind_windows {
        ops |= SendOperationFlags::BindMemoryWindow;
    }
    // Ask for inline data, then less, then none: devices differ in what they accept.
    let mut last_error = None;
    for max_inline in [256, 64, 0] {
        let mut builder = pd.create_qp_builder();
        builder
            .setup_max_send_wr(send_depth)
            .setup_max_recv_wr(1)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_max_inline_data(max_inline)
            .setup_send_cq(cq.clone())
            .setup_recv_cq(cq.clone())
            .setup_send_ops_flags(ops);
        match builder.build_ex() {
            Ok(qp) => return Ok((qp, QpLimits { send_depth, max_inline, read_atomic_depth })),
            Err(e) => last_error = Some(e),
        }
    }
    Err(RdmaError::verbs("ibv_create_qp_ex", last_error.expect("tried at least once")))
}

/// Moves `qp` from RESET to RTS, connected as RDMA-CM negotiated (the peer's queue pair, both
/// starting PSNs, which the kernel's CM picks at random, and our GID index). `access` is what
/// the peer may do to our memory through this queue pair (nothing for clients;
/// READ/WRITE/atomics for nodes).
pub(crate) fn connect(
    device: &Device,
    qp: &mut ExtendedQueuePair,
    limits: &QpLimits,
    negotiated: &Negotiated,
    access: AccessFlags,
) -> Result<(), RdmaError> {
    let (remote, local_psn) = (&negotiated.remote, negotiated.local_psn);
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::Init).setup_pkey_index(0).setup_port(device.port()).setup_access_flags(access);
    qp.modify(&attr).map_err(|e| RdmaError::verbs("ibv_modify_qp(INIT)", e))?;

    let mtu = device.context().query_port(device.port()).map(|p| p.active_mtu()).unwrap_or(Mtu::Mtu1024);
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::ReadyToReceive)
        .setup_path_mtu(mtu)
        .setup_dest_qp_num(remote.qpn)
        .setup_rq_psn(remote.psn)
        .setup_max_dest_read_atomic(limits.read_atomic_depth)
        .setup_min_rnr_timer(12);
    let mut ah = AddressHandleAttribute::new();
    ah.setup_port(device.port()).setup_dest_lid(remote.lid).setup_service_level(0);
    // RoCE always routes by GID; InfiniBand by LID, with a GRH only without one.
    if !device.is_infiniband() || remote.lid == 0 {
        ah.setup_grh_src_gid_index(negotiated.sgid_index)
            .setup_grh_dest_gid(&Gid { raw: remote.gid })
            .setup_grh_hop_limit(64);
    }
    attr.setup_address_vector(&ah);
    qp.modify(&attr).map_err(|e| RdmaError::verbs("ibv_modify_qp(RTR)", e))?;

    // timeout 14: 4.096 us * 2^14 = 67 ms per try; 7 retries: a dead peer is reported in about
    // half a second to a few seconds (rxe's timers are coarser), never hangs.
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::ReadyToSend)
        .setup_sq_psn(local_psn)
        .setup_timeout(14)
        .setup_retry_cnt(7)
        .setup_rnr_retry(7)
        .setup_max_read_atomic(limits.read_atomic_depth);
    qp.modify(&attr).map_err(|e| RdmaError::verbs("ibv_modify_qp(RTS)", e))
}

/// Moves `qp` to the error state: outstanding requests are flushed and the device stops
/// touching their memory.
pub(crate) fn set_error(qp: &mut ExtendedQueuePair) {
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::Error);
    if let Err(e) = qp.modify(&attr) {
        tracing::warn!("cannot move queue pair {} to the error state: {e}", qp.qp_number());
    }
}
