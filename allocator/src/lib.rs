//! rdmem's remote memory allocator: allocation and free done entirely from the client with
//! one-sided verbs (no memory-node CPU). Built on `rdmem-core`'s transport traits.
#![forbid(unsafe_code)]
