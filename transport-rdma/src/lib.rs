//! rdmem's RDMA transport: the only crate that touches verbs, through [`sideway`].
//!
//! - [`device`]: open the right device, port and GID on Soft-RoCE, RoCE or InfiniBand, with an
//!   error that says what to do when there is none.
//! - [`memory`]: huge-page memory regions, registered with a protection domain.
//! - [`cm`]: RDMA-CM connection setup (librdmacm): every queue pair is connected through it.
//! - [`cm_auth`]: the MACed private data of connection setup (a token that never crosses the
//!   wire, tenants, replay and clock checks).
//! - [`wire`]: control requests over TCP (checkpoints, clients, evictions), authenticated with
//!   the same MACs.
//! - [`window`]: a memory window, and so a remote key, per client connection, revoked when it
//!   ends.
//! - [`RdmaTransport`] / [`RdmaEndpoint`]: `rdmem_core`'s transport traits over RC queue pairs,
//!   one per memory node per thread; batches posted with one doorbell per node.
//! - [`control`]: requests to a memory node that are not connections (checkpoints, a tenant's
//!   clients, evictions).
//! - [`Memnode`]: the memory node (the `rdmem-memnode` binary is a thin wrapper around it);
//!   [`spawn`] runs that binary as a child process and helps programs that run on several
//!   machines of a test cluster (launchers, benchmarks, device and cluster tests).
//!
//! # Quick start (needs an RDMA device: run it with `soft-roce-setup/vm-run`)
//! ```no_run
//! use rdmem_core::{Endpoint, GlobalAddr, NodeId, Transport};
//! use rdmem_transport_rdma::{RdmaOptions, RdmaTransport};
//!
//! let transport = RdmaTransport::connect(RdmaOptions {
//!     memnodes: vec!["10.77.0.1:7471".into()],
//!     token: "change-me-to-32-random-bytes".into(), // at least 16 bytes; never sent
//!     tenant: String::new(), // the nodes' default pools, or a `--tenant` of theirs
//!     device: Default::default(), // or RDMEM_DEVICE / RDMEM_GID_INDEX
//! })?;
//! let mut ep = transport.endpoint()?; // one per thread
//! let word = GlobalAddr::new(NodeId(0), 4096).unwrap();
//! let before = ep.faa(word, 1)?; // one-sided fetch-and-add on the memory node
//! # Ok::<(), rdmem_core::Error>(())
//! ```
//!
//! # Device tests
//! Tests that need a device are `#[ignore]`d, so plain `cargo test` skips them. They run inside
//! the Soft-RoCE VM with `soft-roce-setup/vm-run --device-tests`, and fail (never pass) when no
//! device is present.

pub mod cm;
pub mod cm_auth;
pub mod control;
pub mod device;
pub mod error;
pub mod memnode;
pub mod memory;
mod queue_pair;
pub mod spawn;
pub mod transport;
pub mod window;
pub mod wire;

pub use device::{Device, DeviceError, DeviceSelection};
pub use error::RdmaError;
pub use memnode::{CheckpointConfig, Memnode, MemnodeConfig, PoolDescriptor, RestoreConfig};
pub use memory::{PageSize, Region};
pub use transport::{RdmaBuffer, RdmaEndpoint, RdmaOptions, RdmaTransport};
