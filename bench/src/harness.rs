//! What every benchmark needs: a cluster to run against, and threads timed together.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use rdmem_core::ClusterConfig;
use rdmem_transport_rdma::spawn::MemnodeChild;
use rdmem_transport_rdma::spawn::fresh_token;
use rdmem_transport_rdma::{RdmaOptions, RdmaTransport};

/// The memory nodes a benchmark runs against. `memnode` is the node the benchmark started
/// itself (killed when dropped, after the transport: fields drop in order).
pub(crate) struct Cluster {
    pub(crate) transport: RdmaTransport,
    pub(crate) memnode: Option<MemnodeChild>,
}

/// Connects to `memnodes` (else RDMEM_MEMNODES or the config file); with none configured,
/// starts `rdmem-memnode` with a pool of `pool_size` bytes on the same device. It is the real
/// daemon in its own process: a node in the benchmark's own process made 8 B READs about 8%
/// slower in the VM, and deployments run it separately anyway.
pub(crate) fn connect(memnodes: &[String], pool_size: u64) -> Result<Cluster, Box<dyn std::error::Error>> {
    connect_with(memnodes, pool_size, &[])
}

/// [`connect`]; a memory node it starts gets `memnode_args` too.
pub(crate) fn connect_with(
    memnodes: &[String],
    pool_size: u64,
    memnode_args: &[&str],
) -> Result<Cluster, Box<dyn std::error::Error>> {
    let mut config = ClusterConfig::load(None)?;
    if !memnodes.is_empty() {
        config.memnodes = memnodes.to_vec();
    }
    let memnode =
        if config.memnodes.is_empty() { Some(start_memnode(&config, pool_size, memnode_args)?) } else { None };
    if let Some(node) = &memnode {
        config.memnodes = vec![node.addr().to_owned()];
        config.token = Some(node.token().to_owned());
        config.token_file = None;
    }
    let transport = RdmaTransport::connect(RdmaOptions::from_config(&config)?)?;
    Ok(Cluster { transport, memnode })
}

fn start_memnode(
    config: &ClusterConfig,
    pool_size: u64,
    more: &[&str],
) -> Result<MemnodeChild, Box<dyn std::error::Error>> {
    start_memnode_with_token(config, pool_size, more, &fresh_token())
}

fn start_memnode_with_token(
    config: &ClusterConfig,
    pool_size: u64,
    more: &[&str],
    token: &str,
) -> Result<MemnodeChild, Box<dyn std::error::Error>> {
    let size = pool_size.to_string();
    let mut args = vec!["--pool-size", &size, "--page-size", "2M"];
    args.extend_from_slice(more);
    let gid = config.device.gid_index.map(|g| g.to_string());
    if let Some(name) = &config.device.name {
        args.extend(["--device", name]);
    }
    if let Some(gid) = &gid {
        args.extend(["--gid-index", gid]);
    }
    Ok(MemnodeChild::start("rdmem-memnode", token, &args)?)
}

/// Memory nodes a benchmark started for a sweep point, and a transport to all of them.
pub(crate) struct Nodes {
    pub(crate) transport: RdmaTransport,
    pub(crate) memnodes: Vec<MemnodeChild>,
}

/// Starts `count` memory nodes (ids 0..count) with pools of `pool_size` bytes on the
/// configured device, and connects to them all.
pub(crate) fn start_nodes(count: usize, pool_size: u64) -> Result<Nodes, Box<dyn std::error::Error>> {
    let mut config = ClusterConfig::load(None)?;
    let token = fresh_token();
    let ids: Vec<String> = (0..count).map(|i| i.to_string()).collect();
    let memnodes = ids
        .iter()
        .map(|id| start_memnode_with_token(&config, pool_size, &["--node-id", id], &token))
        .collect::<Result<Vec<_>, _>>()?;
    config.memnodes = memnodes.iter().map(|n| n.addr().to_owned()).collect();
    config.token = Some(token);
    config.token_file = None;
    let transport = RdmaTransport::connect(RdmaOptions::from_config(&config)?)?;
    Ok(Nodes { transport, memnodes })
}

/// Runs `work(t, start)` on `threads` threads; each does its setup, then waits on `start`.
/// Returns the time from the moment all were ready to the end of the last, and the results.
pub(crate) fn timed<R: Send>(threads: usize, work: impl Fn(usize, &Barrier) -> R + Sync) -> (Duration, Vec<R>) {
    let start = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (work, start) = (&work, &start);
                s.spawn(move || work(t, start))
            })
            .collect();
        start.wait();
        let began = Instant::now();
        let results = workers.into_iter().map(|w| w.join().expect("benchmark thread")).collect();
        (began.elapsed(), results)
    })
}
