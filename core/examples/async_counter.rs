//! The async face on the loopback transport, driven by rdmem's minimal executor
//! ([`rdmem_core::aio::block_on`]): runs anywhere, no RDMA needed.
//!
//! ```sh
//! cargo run -p rdmem-core --example async_counter
//! ```
//! The same code runs over RDMA with an `RdmaTransport` (see
//! `transport-rdma/examples/async_tokio.rs` for that, under tokio).

use rdmem_core::aio::{AsyncEndpoint, LocalFuture, block_on, join_all};
use rdmem_core::{GlobalAddr, LoopbackTransport, NodeId, Transport};

fn main() -> Result<(), rdmem_core::Error> {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let ep = AsyncEndpoint::new(transport.endpoint()?)?; // one per thread
    let counter = GlobalAddr::new(NodeId(0), 0).unwrap();
    let text = GlobalAddr::new(NodeId(0), 4096).unwrap();

    block_on(async {
        // 1000 fetch-and-adds in flight from this one thread (the endpoint has 128 slots; the
        // rest wait for one). Each returns the value before it: all of 0..1000, once each.
        let adds: Vec<LocalFuture<'_, rdmem_core::Result<u64>>> =
            (0..1000).map(|_| Box::pin(ep.faa(counter, 1)) as _).collect();
        let mut olds = join_all(adds).await.into_iter().collect::<Result<Vec<_>, _>>()?;
        olds.sort_unstable();
        assert!(olds.iter().copied().eq(0..1000));
        println!("1000 concurrent FAAs: counter = {}", ep.read_u64(counter).await?);

        // A batch: one doorbell, one future.
        let (mut old, mut back) = (0, [0u8; 12]);
        let mut batch = ep.batch();
        batch.write(text, b"hello, async").faa(counter, 1, &mut old).read(text, &mut back);
        batch.submit().await?;
        println!("batch: FAA saw {old}, READ after WRITE gave {:?}", std::str::from_utf8(&back).unwrap());

        // In place, any length: a registered buffer moves in and comes back.
        let mut buf = ep.buffer(1 << 16)?;
        buf.fill(7);
        let (r, buf) = ep.write_from(text, buf, 0..1 << 16).await;
        r?;
        let (r, buf) = ep.read_into(text, buf, 0..16).await;
        r?;
        println!("64 KiB written from a buffer; its first bytes read back: {:?}", &buf[..4]);
        Ok(())
    })
}
