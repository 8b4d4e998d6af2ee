//! rdmem's foundation: global addresses, the transport traits, errors, cluster configuration,
//! and the loopback transport. Nothing here touches RDMA verbs; `rdmem-transport-rdma` does.
//!
//! # Quick start
//! ```
//! use rdmem_core::{Endpoint, GlobalAddr, LoopbackTransport, NodeId, Transport};
//!
//! // Two in-process "memory nodes" of 1 MiB each; the RDMA transport has the same API.
//! let transport = LoopbackTransport::new(&[1 << 20, 1 << 20]);
//! let mut ep = transport.endpoint()?; // one per thread
//! let counter = GlobalAddr::new(NodeId(1), 4096).unwrap();
//!
//! assert_eq!(ep.faa(counter, 5)?, 0); // fetch-and-add returns the old value
//! assert_eq!(ep.cas(counter, 7, 9)?, 5); // failed compare-and-swap: returns the current value
//!
//! // A batch: posted together, waited on together.
//! let (mut old, mut bytes) = (0, [0u8; 8]);
//! let mut batch = ep.batch();
//! batch.write(counter.checked_add(8).unwrap(), b"rdmem!!!").faa(counter, 1, &mut old).read(counter, &mut bytes);
//! batch.submit()?;
//! assert_eq!((old, u64::from_le_bytes(bytes)), (5, 6));
//! # Ok::<(), rdmem_core::Error>(())
//! ```
//!
//! # Model
//! - [`GlobalAddr`]: node id (16 bits) and byte offset (48 bits) in one `u64`; [`RemotePtr`]
//!   is its typed form.
//! - [`Transport`]: shared by a process; hands each thread an [`Endpoint`].
//! - [`Endpoint`]: READ, WRITE, compare-and-swap, fetch-and-add, singly or as a [`Batch`];
//!   registered [`LocalBuffer`]s for zero-copy transfers.
//! - [`LoopbackTransport`]: the same traits over in-process pools, with latency and fault
//!   injection, for tests of everything built on top.
//! - [`ClusterConfig`]: memory nodes, token and device, from a TOML file, the environment and flags.
//! - [`aio::AsyncEndpoint`]: the same operations as futures, many in flight from one thread,
//!   on any executor.
//! - [`heartbeat`]: a thread that moves a remote word, so others can tell live participants
//!   from dead ones.
//!
//! # Thread safety
//! Transports are `Send + Sync`; endpoints are `Send` but used by one thread at a time (`&mut`),
//! which is what keeps the data path free of locks.
//!
//! # Failure
//! Bad arguments (unknown node, out of range, misaligned atomic, oversized transfer) are refused
//! before anything is posted. A failed operation stops its batch and breaks the endpoint's
//! connection to that node ([`Error::Broken`] afterwards); the other nodes stay usable. See
//! [`endpoint`] for exactly what took effect.
// One exception, `aio::TokioReactor`'s registration of a descriptor it owns with tokio.
#![deny(unsafe_code)]

pub mod addr;
pub mod aio;
pub mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod endpoint;
pub mod error;
pub mod heartbeat;
pub mod loopback;

pub use addr::{GlobalAddr, NodeId, RemotePtr};
pub use config::{ClusterConfig, DEFAULT_PORT, DeviceConfig};
pub use endpoint::{Batch, Checkpoint, Endpoint, LocalBuffer, NodeInfo, Op, RegSlice, RegSliceMut, Transport};
pub use error::{Error, OpKind, Refusal, Resource, Result, WcStatus};
pub use loopback::{KillSwitch, LoopbackBuffer, LoopbackEndpoint, LoopbackOptions, LoopbackTransport};
