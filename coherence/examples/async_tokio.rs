//! The async face over RDMA under tokio: concurrent tasks on one thread share one
//! `AsyncEndpoint` (one completion queue, one doorbell per pass), an idle driver sleeps in
//! tokio's own reactor (`TokioReactor`: no helper thread), and a remote lock is taken without
//! blocking the runtime while another task holds it.
//!
//! ```sh
//! soft-roce-setup/vm-run async_tokio                          # starts a memory node itself
//! async_tokio --memnode 10.0.0.1:7471                         # with RDMEM_TOKEN set
//! ```

use std::rc::Rc;
use std::time::Duration;

use rdmem_coherence::RemoteLock;
use rdmem_core::aio::{AsyncEndpoint, AsyncOptions, TokioReactor};
use rdmem_core::{GlobalAddr, Transport};
use rdmem_transport_rdma::spawn::{MemnodeChild, fresh_token};
use rdmem_transport_rdma::{DeviceSelection, RdmaOptions, RdmaTransport};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let given: Vec<String> =
        args.chunks(2).filter(|p| p.len() == 2 && p[0] == "--memnode").map(|p| p[1].clone()).collect();
    let token = std::env::var("RDMEM_TOKEN").unwrap_or_else(|_| fresh_token());
    let child = if given.is_empty() {
        Some(MemnodeChild::start("memnode", &token, &["--pool-size", "16M", "--node-id", "0"])?)
    } else {
        None
    };
    let memnodes = child.as_ref().map_or(given, |c| vec![c.addr().to_owned()]);
    let transport = RdmaTransport::connect(RdmaOptions {
        memnodes,
        token,
        device: DeviceSelection::from_env()?,
        ..Default::default()
    })?;
    let node = transport.nodes()[0].id;

    // An endpoint's futures stay on its thread: a current-thread runtime and a LocalSet.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    // Made inside the runtime, whose reactor then watches the completion channel.
    let ep = {
        let _in = runtime.enter();
        Rc::new(AsyncEndpoint::with_reactor(transport.endpoint()?, AsyncOptions::default(), &TokioReactor)?)
    };
    local.block_on(&runtime, async move {
        let counter = GlobalAddr::new(node, 0).unwrap();
        let guarded = GlobalAddr::new(node, 8).unwrap();
        // Holder ids must be unique among the lock's users: one per task here.
        let lock_word = GlobalAddr::new(node, 64).unwrap();

        // 8 tasks: 100 FAAs each, all in flight together through the one endpoint, then 10
        // critical sections each under one remote lock (a read-modify-write that would lose
        // updates without it). A task waiting for the lock lets the others run.
        let tasks: Vec<_> = (1..=8u32)
            .map(|holder| {
                let ep = Rc::clone(&ep);
                tokio::task::spawn_local(async move {
                    for _ in 0..100 {
                        ep.faa(counter, 1).await?;
                    }
                    let lock = RemoteLock::new(lock_word, holder, Duration::from_secs(5))?;
                    for _ in 0..10 {
                        let guard = lock.lock_async(&ep).await?;
                        let v = ep.read_u64(guarded).await?;
                        tokio::task::yield_now().await;
                        ep.write_u64(guarded, v + 1).await?;
                        guard.unlock().await?;
                    }
                    Ok::<_, Box<dyn std::error::Error>>(())
                })
            })
            .collect();
        for t in tasks {
            t.await?.map_err(|e| e.to_string())?;
        }
        let (sum, sections) = (ep.read_u64(counter).await?, ep.read_u64(guarded).await?);
        println!("8 tasks x 100 FAAs: counter = {sum}; 8 x 10 locked sections: {sections}");
        println!(
            "the driver slept {} times in tokio's reactor, {} ended by a completion",
            ep.sleeps(),
            ep.event_wakes()
        );
        assert_eq!((sum, sections), (800, 80));
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    Ok(())
}
