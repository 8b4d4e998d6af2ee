//! rdmem's shared-memory layer: distributed locks and barrier from RDMA atomics, the page cache
//! and scope consistency. Built on `rdmem-core` and `rdmem-allocator`.
#![forbid(unsafe_code)]
