//! `rdmem-memnode`: serve a registered memory pool to rdmem clients over one-sided RDMA.
//!
//! ```sh
//! RDMEM_TOKEN=secret rdmem-memnode --pool-size 1G            # on the memory node
//! soft-roce-setup/vm-run rdmem-memnode --pool-size 64M       # on Soft-RoCE, in the VM
//! ```
//! It logs its pool descriptor, serves until SIGTERM or SIGINT, and stays up when clients die.
//!
//! Checkpoints: with `--checkpoint-dir DIR` it writes snapshots of the pool there when a client
//! asks (`rdmem-pools checkpoint`) and every `--checkpoint-every` (fuzzy while clients write);
//! `--restore DIR` starts it with the newest whole snapshot of DIR loaded (`--restore-seq N`
//! for that one):
//! ```sh
//! rdmem-memnode --pool-size 1G --checkpoint-dir /var/lib/rdmem --restore /var/lib/rdmem
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Parser;
use rdmem_core::config::resolve_token;
use rdmem_transport_rdma::{CheckpointConfig, DeviceSelection, Memnode, MemnodeConfig, PageSize, RestoreConfig};

/// Serve a registered memory pool to rdmem clients over one-sided RDMA.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address and port to listen on, for RDMA-CM connections and (TCP) control requests; a
    /// loopback address stands for the RDMA device's own.
    #[arg(long, default_value = "0.0.0.0:7471")]
    listen: SocketAddr,
    /// Pool size, with an optional K, M or G suffix (binary units).
    #[arg(long, default_value = "256M", value_parser = rdmem_core::config::parse_size)]
    pool_size: u64,
    /// Pages backing the pool: 2M, 1G or none (normal pages).
    #[arg(long, default_value = "2M")]
    page_size: PageSize,
    /// RDMA device (default: $RDMEM_DEVICE, else the only or first active one).
    #[arg(long, env = "RDMEM_DEVICE")]
    device: Option<String>,
    /// Device port.
    #[arg(long, env = "RDMEM_PORT")]
    port: Option<u8>,
    /// GID index (default: the RoCE v2 IPv4 GID, or GID 0 on InfiniBand).
    #[arg(long, env = "RDMEM_GID_INDEX")]
    gid_index: Option<u32>,
    /// File holding the token clients must present (or set RDMEM_TOKEN).
    #[arg(long, env = "RDMEM_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// This node's id in global addresses; give each node of a cluster its own.
    #[arg(long, default_value_t = 0)]
    node_id: u16,
    /// Serve without a token: anyone who can reach the listening port may read and write the
    /// whole pool. Without this flag (or a token) the node refuses to start.
    #[arg(long)]
    insecure_no_token: bool,
    /// Register the pool even if it is larger than the memory this machine has free (the OOM
    /// killer may then end other processes).
    #[arg(long)]
    force_pool_size: bool,
    /// Directory for snapshots of the pool, taken when a client asks (and see
    /// --checkpoint-every); without it, checkpoint requests are refused.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Also snapshot the pool this often (e.g. 30s, 5m): fuzzy while clients write.
    #[arg(long, requires = "checkpoint_dir", value_parser = rdmem_core::config::parse_duration)]
    checkpoint_every: Option<Duration>,
    /// The unit of change of incremental snapshots: a power of two, at least 4K.
    #[arg(long, default_value = "64K", value_parser = rdmem_core::config::parse_size)]
    checkpoint_block_size: u64,
    /// Start with the newest whole snapshot in this directory loaded into the pool (a damaged
    /// newer one is skipped with a warning); fails if there is none.
    #[arg(long)]
    restore: Option<PathBuf>,
    /// With --restore: this snapshot, or fail.
    #[arg(long, requires = "restore")]
    restore_seq: Option<u64>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("rdmem-memnode: error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let token_env = std::env::var("RDMEM_TOKEN").ok();
    let token = resolve_token(token_env.as_deref().filter(|t| !t.is_empty()), args.token_file.as_deref())?;
    match (token.is_empty(), args.insecure_no_token) {
        (true, false) => {
            return Err("no token: set RDMEM_TOKEN or --token-file, or pass --insecure-no-token to let anyone \
                        who can reach this node use its memory"
                .into());
        }
        (true, true) => tracing::warn!("--insecure-no-token: any client that can reach this node may use its memory"),
        (false, true) => return Err("--insecure-no-token with a token set: drop one of them".into()),
        (false, false) => {}
    }
    rdmem_transport_rdma::memnode::raise_open_files_limit();
    let config = MemnodeConfig {
        listen: args.listen,
        pool_size: args.pool_size,
        page_size: args.page_size,
        device: DeviceSelection { name: args.device, port: args.port, gid_index: args.gid_index },
        token,
        node_id: args.node_id,
        force_pool_size: args.force_pool_size,
        checkpoint: args.checkpoint_dir.map(|dir| CheckpointConfig {
            dir,
            every: args.checkpoint_every,
            block_size: usize::try_from(args.checkpoint_block_size).unwrap_or(usize::MAX),
        }),
        restore: args.restore.map(|dir| RestoreConfig { dir, seq: args.restore_seq }),
    };
    let node = Memnode::start(config)?;
    let d = node.descriptor();
    tracing::info!(
        "serving node {} on {}: pool of {} bytes on {:?} pages at {:#x}, rkey {:#x}; listening on {}",
        d.node_id,
        d.device,
        d.size,
        d.page_size,
        d.base,
        d.rkey,
        d.listen
    );
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    node.serve(&stop)?;
    tracing::info!("stopping: {} client(s) still connected lose their queue pairs", node.clients());
    Ok(())
}

#[cfg(test)]
mod tests {
    use rdmem_core::config::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999G").unwrap_err().contains("too large"));
    }
}
