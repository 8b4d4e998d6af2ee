//! The error type of the RDMA transport's setup paths (devices, memory, queue pairs, the memory
//! node). Data-path errors are `rdmem_core::Error`s, shared with every transport.

use std::io;

use crate::device::DeviceError;
use crate::memory::MemoryError;

/// Why setting up RDMA resources failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdmaError {
    /// Opening the device, port or GID failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Mapping or registering memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A verb failed (`verb` names it: `ibv_create_qp`, `ibv_modify_qp(RTR)`, ...).
    #[error("{verb} failed: {reason}")]
    Verbs {
        /// The verb.
        verb: &'static str,
        /// Its error.
        reason: String,
    },
    /// The setup asked for is not possible (a pool size that is not whole pages, or larger
    /// than the free memory, ...): the message says why and what to do.
    #[error("{0}")]
    Config(String),
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl RdmaError {
    pub(crate) fn verbs(verb: &'static str, reason: impl std::fmt::Display) -> Self {
        RdmaError::Verbs { verb, reason: reason.to_string() }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        RdmaError::Io { context: context.into(), source }
    }
}

impl From<RdmaError> for rdmem_core::Error {
    fn from(e: RdmaError) -> Self {
        rdmem_core::Error::transport("RDMA", e)
    }
}
