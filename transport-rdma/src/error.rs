//! The error type of the RDMA transport's setup paths (devices, memory, queue pairs, the memory
//! node). Data-path errors are `rdmem_core::Error`s, shared with every transport.

use std::io;

use rdmem_core::Resource;

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
    /// The setup asked for is not possible (a pool size that is not whole pages, ...): the
    /// message says why and what to do.
    #[error("{0}")]
    Config(String),
    /// A resource limit of this machine stops the setup (a pool larger than the free memory).
    #[error("{hint}")]
    Limit {
        /// The resource.
        resource: Resource,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
        /// Why, and what to do.
        hint: String,
    },
    /// Taking or restoring a snapshot failed.
    #[error(transparent)]
    Checkpoint(#[from] rdmem_checkpoint::CheckpointError),
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
    /// Limits become [`rdmem_core::Error::Limit`], so a program can match on them whatever
    /// the transport; the rest is wrapped as [`rdmem_core::Error::Transport`].
    fn from(e: RdmaError) -> Self {
        match e {
            RdmaError::Limit { resource, needed, available, hint } => {
                rdmem_core::Error::Limit { resource, needed, available, hint }
            }
            RdmaError::Memory(MemoryError::MemlockLimit { needed, limit, reason }) => {
                let hint = format!(
                    "registering memory failed ({reason}); raise the memlock limit with `ulimit -l unlimited` \
                     or /etc/security/limits.d (`* - memlock unlimited`)"
                );
                rdmem_core::Error::Limit { resource: Resource::LockedMemory, needed, available: limit, hint }
            }
            e => rdmem_core::Error::transport("RDMA", e),
        }
    }
}

#[cfg(test)]
mod tests {
    use rdmem_core::{Error, Resource};

    use super::*;

    #[test]
    fn limits_become_core_limits_a_program_can_match() {
        let memlock =
            RdmaError::Memory(MemoryError::MemlockLimit { needed: 1 << 30, limit: 64 << 10, reason: "ENOMEM".into() });
        let e = Error::from(memlock);
        assert!(
            matches!(e, Error::Limit { resource: Resource::LockedMemory, needed, available, .. } if needed == 1 << 30 && available == 64 << 10),
            "{e:?}"
        );
        assert!(e.to_string().contains("ulimit -l"), "{e}");
        let free = RdmaError::Limit { resource: Resource::FreeMemory, needed: 2, available: 1, hint: "smaller".into() };
        assert!(matches!(Error::from(free), Error::Limit { resource: Resource::FreeMemory, .. }));
        // Everything else stays a transport error with its source.
        let other = Error::from(RdmaError::Config("x".into()));
        assert!(matches!(other, Error::Transport { .. }), "{other:?}");
    }
}
