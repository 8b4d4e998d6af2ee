//! The one error type of the transport layer, shared by every transport.

use std::fmt;

use crate::addr::{GlobalAddr, NodeId};

/// Why a memory node refused a connection or a request ([`Error::Refused`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The client's token is not the tenant's (the request's MAC does not match).
    #[error("wrong token")]
    WrongToken,
    /// The node has no tenant of the name the client gave.
    #[error("unknown tenant")]
    UnknownTenant,
    /// The client and the node speak different versions of the protocol.
    #[error("protocol version {client}, node speaks {node}")]
    Version {
        /// The client's.
        client: u16,
        /// The node's.
        node: u16,
    },
    /// The node saw this very request before (someone replayed a captured one).
    #[error("replayed request")]
    Replayed,
    /// The client's clock is too far from the node's for its request to be checked.
    #[error("clock skew: the client's clock is more than 30 s from the node's")]
    ClockSkew,
    /// The node is too busy to take the request now (try again later).
    #[error("node busy: {0}")]
    Busy(String),
    /// The request was not one the node could read.
    #[error("malformed request")]
    Malformed,
    /// Any other refusal, in the node's words.
    #[error("{0}")]
    Other(String),
}

/// The kind of a one-sided operation, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// RDMA READ.
    Read,
    /// RDMA WRITE.
    Write,
    /// Atomic compare-and-swap on 8 bytes.
    CompareSwap,
    /// Atomic fetch-and-add on 8 bytes.
    FetchAdd,
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpKind::Read => "READ",
            OpKind::Write => "WRITE",
            OpKind::CompareSwap => "compare-and-swap",
            OpKind::FetchAdd => "fetch-and-add",
        })
    }
}

/// A work completion status (`ibv_wc_status`) other than success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WcStatus {
    /// `IBV_WC_LOC_LEN_ERR`: a local length error.
    LocalLength,
    /// `IBV_WC_LOC_QP_OP_ERR`: the request was malformed for the queue pair.
    LocalQpOperation,
    /// `IBV_WC_LOC_PROT_ERR`: the local buffer is not registered for this access.
    LocalProtection,
    /// `IBV_WC_WR_FLUSH_ERR`: flushed because the queue pair went to the error state after an
    /// earlier failure (a consequence, not the cause).
    Flushed,
    /// `IBV_WC_BAD_RESP_ERR`: an unexpected response from the remote side.
    BadResponse,
    /// `IBV_WC_LOC_ACCESS_ERR`: a local access error.
    LocalAccess,
    /// `IBV_WC_REM_INV_REQ_ERR`: the remote side found the request invalid (e.g. a
    /// misaligned atomic, or more than it allows).
    RemoteInvalidRequest,
    /// `IBV_WC_REM_ACCESS_ERR`: the remote side refused the access (wrong rkey, outside the
    /// registered region, access rights).
    RemoteAccess,
    /// `IBV_WC_REM_OP_ERR`: the remote side could not complete the operation.
    RemoteOperation,
    /// `IBV_WC_RETRY_EXC_ERR`: no acknowledgement after every retry (the peer or the path is
    /// gone).
    RetryExceeded,
    /// `IBV_WC_RNR_RETRY_EXC_ERR`: the receiver was not ready after every retry.
    RnrRetryExceeded,
    /// `IBV_WC_REM_ABORT_ERR`: the remote side aborted the operation.
    RemoteAborted,
    /// `IBV_WC_FATAL_ERR`: the device failed.
    Fatal,
    /// `IBV_WC_RESP_TIMEOUT_ERR`: the response timed out.
    ResponseTimeout,
    /// `IBV_WC_GENERAL_ERR`: a transport error the device does not name.
    General,
    /// Any other status, by its number.
    Other(u32),
}

impl WcStatus {
    /// The status for `ibv_wc_status` number `code` (0, success, is not an error: `Other(0)`).
    pub fn from_code(code: u32) -> WcStatus {
        match code {
            1 => WcStatus::LocalLength,
            2 => WcStatus::LocalQpOperation,
            4 => WcStatus::LocalProtection,
            5 => WcStatus::Flushed,
            7 => WcStatus::BadResponse,
            8 => WcStatus::LocalAccess,
            9 => WcStatus::RemoteInvalidRequest,
            10 => WcStatus::RemoteAccess,
            11 => WcStatus::RemoteOperation,
            12 => WcStatus::RetryExceeded,
            13 => WcStatus::RnrRetryExceeded,
            16 => WcStatus::RemoteAborted,
            19 => WcStatus::Fatal,
            20 => WcStatus::ResponseTimeout,
            21 => WcStatus::General,
            other => WcStatus::Other(other),
        }
    }

    /// The `ibv_wc_status` number.
    pub fn code(self) -> u32 {
        match self {
            WcStatus::LocalLength => 1,
            WcStatus::LocalQpOperation => 2,
            WcStatus::LocalProtection => 4,
            WcStatus::Flushed => 5,
            WcStatus::BadResponse => 7,
            WcStatus::LocalAccess => 8,
            WcStatus::RemoteInvalidRequest => 9,
            WcStatus::RemoteAccess => 10,
            WcStatus::RemoteOperation => 11,
            WcStatus::RetryExceeded => 12,
            WcStatus::RnrRetryExceeded => 13,
            WcStatus::RemoteAborted => 16,
            WcStatus::Fatal => 19,
            WcStatus::ResponseTimeout => 20,
            WcStatus::General => 21,
            WcStatus::Other(code) => code,
        }
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?} (status {})", self.code())
    }
}

/// A resource whose limit a setup ran into ([`Error::Limit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Resource {
    /// The locked-memory limit (`ulimit -l`, RLIMIT_MEMLOCK): registered memory is pinned.
    LockedMemory,
    /// The memory this machine has free (`MemAvailable`, free huge pages).
    FreeMemory,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::LockedMemory => "locked memory",
            Resource::FreeMemory => "free memory",
        })
    }
}

/// Why an operation, a connection or a configuration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address names a node this endpoint is not connected to.
    #[error("{op} at {addr}: no memory node {} in this cluster", addr.node().0)]
    UnknownNode {
        /// The operation.
        op: OpKind,
        /// The address.
        addr: GlobalAddr,
    },
    /// The range `[addr, addr + len)` is not inside the node's pool.
    #[error("{op} of {len} bytes at {addr} is outside the pool of {} ({pool_size} bytes)", addr.node())]
    OutOfRange {
        /// The operation.
        op: OpKind,
        /// The start of the range.
        addr: GlobalAddr,
        /// The length of the range.
        len: u64,
        /// The size of the node's pool.
        pool_size: u64,
    },
    /// Atomics need an 8-byte aligned address.
    #[error("{op} at {addr}: atomics need an 8-byte aligned address")]
    Misaligned {
        /// The operation.
        op: OpKind,
        /// The address.
        addr: GlobalAddr,
    },
    /// A local range does not fit in its buffer.
    #[error("local range {start}..{end} is outside a buffer of {len} bytes")]
    LocalRange {
        /// Start of the range.
        start: usize,
        /// End of the range.
        end: usize,
        /// Length of the buffer.
        len: usize,
    },
    /// A single transfer is longer than the transport allows (2 GiB on RDMA).
    #[error("{op} of {len} bytes at {addr} is longer than the largest transfer ({max} bytes)")]
    TooLong {
        /// The operation.
        op: OpKind,
        /// The address.
        addr: GlobalAddr,
        /// Requested length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The device completed the operation with an error status (a work completion error on
    /// RDMA): the remote side refused it, or the network failed it.
    #[error("{op} at {addr} failed: {status} (vendor error {vendor_err:#x})")]
    Completion {
        /// The operation.
        op: OpKind,
        /// The remote address it targeted.
        addr: GlobalAddr,
        /// The work completion status.
        status: WcStatus,
        /// The device's own error code (0 when it gives none).
        vendor_err: u32,
    },
    /// The operation could not be posted (`ibv_post_send` failed: the send queue is full, or
    /// the queue pair is in the error state), so it did not take effect. In a batch, the
    /// operations before it to the same node may have been posted and taken effect; the
    /// connection to that node is broken afterwards.
    #[error("{op} at {addr} could not be posted: {}", std::io::Error::from_raw_os_error(*errno))]
    Post {
        /// The operation.
        op: OpKind,
        /// The remote address it targeted.
        addr: GlobalAddr,
        /// The error number the post returned.
        errno: i32,
    },
    /// The memory node went away while an operation waited on it (its process stopped or
    /// died, its machine is gone); whether the operation took effect is unknown.
    #[error("{op} at {addr}: the memory node at {peer} is gone (its connection closed or stopped answering)")]
    NodeGone {
        /// The operation.
        op: OpKind,
        /// The remote address it targeted.
        addr: GlobalAddr,
        /// Where the node was reached.
        peer: String,
    },
    /// No completion came within the transport's deadline; whether the operation took effect
    /// is unknown.
    #[error("{op} at {addr}: no completion within {waited:?}")]
    Timeout {
        /// The operation.
        op: OpKind,
        /// The remote address it targeted.
        addr: GlobalAddr,
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// The device failed while completions were awaited (`ibv_poll_cq` returned an error);
    /// whether the operation took effect is unknown.
    #[error("{op} at {addr}: polling the completion queue failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Poll {
        /// The operation waited for.
        op: OpKind,
        /// The remote address it targeted.
        addr: GlobalAddr,
        /// The error number the poll returned.
        errno: i32,
    },
    /// A resource limit of this machine stops the setup (locked memory, free memory, ...).
    #[error("{resource} limit: {needed} bytes needed, {available} available; {hint}")]
    Limit {
        /// The resource.
        resource: Resource,
        /// What was needed, in bytes.
        needed: u64,
        /// What the limit allows, in bytes.
        available: u64,
        /// What to do about it.
        hint: String,
    },
    /// An async batch has more operations than its endpoint has slots, so it could never be
    /// in flight at once ([`crate::aio::AsyncOptions::slots`]).
    #[error(
        "a batch of {ops} operations does not fit the endpoint's {slots} slots; split it or raise AsyncOptions::slots"
    )]
    TooManyOps {
        /// Operations in the batch.
        ops: usize,
        /// The endpoint's slots.
        slots: u32,
    },
    /// An earlier failure broke this endpoint's connection to the node; make a new endpoint.
    #[error("the connection to {node} is broken by an earlier error; create a new endpoint")]
    Broken {
        /// The node.
        node: NodeId,
    },
    /// The memory node refused the connection or the request (wrong token, protocol version,
    /// replayed request, unknown tenant, ...): [`Refusal`] says which.
    #[error("memory node at {peer} refused the connection: {refusal}")]
    Refused {
        /// Where the node was reached.
        peer: String,
        /// Why.
        refusal: Refusal,
    },
    /// The memory node could not be reached or connection setup broke off.
    #[error("cannot connect to memory node at {peer}: {reason}")]
    Connect {
        /// Where the node was to be reached.
        peer: String,
        /// What went wrong.
        reason: String,
    },
    /// A memory node could not take a checkpoint (none configured, a sequence number not above
    /// its newest, a disk error, ...): `reason` says which.
    #[error("checkpoint of {node}: {reason}")]
    Checkpoint {
        /// The node.
        node: NodeId,
        /// What went wrong.
        reason: String,
    },
    /// The cluster configuration is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// A fault injected by the loopback transport.
    #[error("{op} at {addr}: injected fault")]
    Injected {
        /// The operation.
        op: OpKind,
        /// The address.
        addr: GlobalAddr,
    },
    /// A failure inside a transport that the variants above do not describe (device setup,
    /// memory registration, ...), with the transport's own error as the source.
    #[error("{context}: {source}")]
    Transport {
        /// What was being done.
        context: String,
        /// The transport's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Wraps a transport-specific error with what was being done.
    pub fn transport(context: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::Transport { context: context.into(), source: source.into() }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
