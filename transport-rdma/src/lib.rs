//! rdmem's RDMA transport: the only crate that touches verbs, through [`sideway`].
//!
//! What is here today:
//! - [`device`]: open the right device, port and GID on Soft-RoCE, RoCE or InfiniBand, with an
//!   error that says what to do when there is none.
//!
//! The data path (queue pairs connected with RDMA-CM, READ/WRITE/CAS/FAA singly and in batches),
//! huge-page memory regions and the `rdmem-memnode` daemon build on this module.
//!
//! # Device tests
//! Tests that need a device are `#[ignore]`d, so plain `cargo test` skips them. They run inside
//! the Soft-RoCE VM with `soft-roce-setup/vm-run --device-tests`, and fail (never pass) when no
//! device is present.

pub mod device;

pub use device::{Device, DeviceError, DeviceSelection};
