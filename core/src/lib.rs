//! rdmem's foundation: global addresses, the transport traits, errors, cluster configuration and
//! the loopback transport. Nothing here touches RDMA verbs; `rdmem-transport-rdma` does.
#![forbid(unsafe_code)]
