//! The allocation API over RDMA: allocate, free, RemoteBox, usage per memory node.
//!
//! ```sh
//! soft-roce-setup/vm-run remote_alloc                              # starts two memory nodes itself
//! remote_alloc --memnode 10.0.0.1:7471 --memnode 10.0.0.2:7471     # with RDMEM_TOKEN set
//! ```

use std::alloc::Layout;
use std::sync::Arc;

use rdmem_allocator::{Allocator, AllocatorOptions, Mode, Placement, RemoteBox};
use rdmem_core::{Endpoint, Transport};
use rdmem_transport_rdma::spawn::MemnodeChild;
use rdmem_transport_rdma::spawn::fresh_token;
use rdmem_transport_rdma::{DeviceSelection, RdmaOptions, RdmaTransport};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Memory nodes from --memnode flags, else two started here on the same device.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let given: Vec<String> =
        args.chunks(2).filter(|p| p.len() == 2 && p[0] == "--memnode").map(|p| p[1].clone()).collect();
    let token = std::env::var("RDMEM_TOKEN").unwrap_or_else(|_| fresh_token());
    let mut children = Vec::new();
    if given.is_empty() {
        for id in ["0", "1"] {
            children.push(MemnodeChild::start("memnode", &token, &["--pool-size", "64M", "--node-id", id])?);
        }
    }
    let memnodes = if given.is_empty() { children.iter().map(|c| c.addr().to_owned()).collect() } else { given };

    let transport = Arc::new(RdmaTransport::connect(RdmaOptions {
        memnodes,
        token,
        device: DeviceSelection::from_env()?,
        ..Default::default()
    })?);
    let options = AllocatorOptions { placement: Placement::RoundRobin, mode: Mode::Stealing, ..Default::default() };
    let allocator = Allocator::new(Arc::clone(&transport), options)?;
    let alloc = allocator.thread()?; // one per thread

    // Raw blocks: a GlobalAddr (node + offset); read and write them through the endpoint.
    let a = alloc.alloc(Layout::from_size_align(100, 8)?)?;
    let b = alloc.alloc(Layout::from_size_align(100, 8)?)?;
    alloc.with_endpoint(|ep| ep.write(a, b"hello, remote memory"))?;
    let mut back = [0u8; 20];
    alloc.with_endpoint(|ep| ep.read(a, &mut back))?;
    println!("block a at {a}, block b at {b} (round-robin over the nodes): {:?}", std::str::from_utf8(&back)?);

    // A typed value, freed when dropped.
    let counter = RemoteBox::new(&alloc, 41u64)?;
    counter.write(&(counter.read()? + 1))?;
    println!("RemoteBox<u64> at {}: {}", counter.addr(), counter.read()?);

    for u in alloc.usage()? {
        println!("{}: {} of {} chunks of {} bytes in use", u.node, u.chunks_used, u.chunks_total, u.chunk_size);
    }
    alloc.free(a)?;
    alloc.free(b)?;
    drop(counter);
    println!("{} network operations in all, over {} nodes", alloc.network_ops(), transport.nodes().len());
    Ok(())
}
