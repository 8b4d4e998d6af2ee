//! The one error type of the transport layer, shared by every transport.

use std::fmt;

use crate::addr::{GlobalAddr, NodeId};

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
    /// The remote side or the network failed the operation (a work completion error on RDMA).
    #[error("{op} at {addr} failed: {status}")]
    Completion {
        /// The operation.
        op: OpKind,
        /// The remote address it targeted.
        addr: GlobalAddr,
        /// The completion status, as the transport names it.
        status: String,
    },
    /// An earlier failure broke this endpoint's connection to the node; make a new endpoint.
    #[error("the connection to {node} is broken by an earlier error; create a new endpoint")]
    Broken {
        /// The node.
        node: NodeId,
    },
    /// The memory node refused the connection (wrong token, protocol version, ...).
    #[error("memory node at {peer} refused the connection: {reason}")]
    Refused {
        /// Where the node was reached.
        peer: String,
        /// What it said.
        reason: String,
    },
    /// The memory node could not be reached or the handshake broke off.
    #[error("cannot connect to memory node at {peer}: {reason}")]
    Connect {
        /// Where the node was to be reached.
        peer: String,
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
