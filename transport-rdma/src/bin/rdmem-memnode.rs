//! `rdmem-memnode`: serve a registered memory pool to rdmem clients over one-sided RDMA.
//!
//! ```sh
//! RDMEM_TOKEN=secret rdmem-memnode --pool-size 1G            # on the memory node
//! soft-roce-setup/vm-run rdmem-memnode --pool-size 64M       # on Soft-RoCE, in the VM
//! ```
//! It logs its pool descriptor, serves until SIGTERM or SIGINT, and stays up when clients die.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Parser;
use rdmem_core::config::resolve_token;
use rdmem_transport_rdma::{DeviceSelection, Memnode, MemnodeConfig, PageSize};

/// Serve a registered memory pool to rdmem clients over one-sided RDMA.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address and port to listen on for client handshakes.
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
    if token.is_empty() {
        tracing::warn!(
            "no token set (--token-file or RDMEM_TOKEN): any client that can reach this node may use its memory"
        );
    }
    let config = MemnodeConfig {
        listen: args.listen,
        pool_size: args.pool_size,
        page_size: args.page_size,
        device: DeviceSelection { name: args.device, port: args.port, gid_index: args.gid_index },
        token,
        node_id: args.node_id,
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
