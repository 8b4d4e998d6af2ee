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
//!
//! Tenants: `--tenant NAME:SIZE:TOKEN_FILE` (repeatable) serves another pool, with its own
//! token, protection domain and memory region; clients name it (`RDMEM_TENANT`). Without a
//! token of its own (`RDMEM_TOKEN`, `--token-file`) the node then has no default pool. Each
//! client connection gets a remote key of its own (a memory window bound to its queue pair),
//! revoked when it disconnects or is evicted:
//! ```sh
//! rdmem-memnode --tenant alice:1G:/etc/rdmem/alice --tenant bob:512M:/etc/rdmem/bob
//! RDMEM_TOKEN_FILE=/etc/rdmem/alice rdmem-memnode clients --memnode 10.0.0.1:7471 --tenant alice
//! RDMEM_TOKEN_FILE=/etc/rdmem/alice rdmem-memnode evict --memnode 10.0.0.1:7471 --tenant alice 17
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rdmem_core::config::resolve_token;
use rdmem_transport_rdma::control::Control;
use rdmem_transport_rdma::memnode::TenantConfig;
use rdmem_transport_rdma::{CheckpointConfig, DeviceSelection, Memnode, MemnodeConfig, PageSize, RestoreConfig};

/// Serve a registered memory pool to rdmem clients over one-sided RDMA.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    /// Administer a running node instead of serving.
    #[command(subcommand)]
    admin: Option<Admin>,
    /// Address and port to listen on, for RDMA-CM connections and (TCP) control requests; a
    /// loopback address stands for the RDMA device's own.
    #[arg(long, default_value = "0.0.0.0:7471")]
    listen: SocketAddr,
    /// The default tenant's pool size, with an optional K, M or G suffix (binary units;
    /// default 256M).
    #[arg(long, value_parser = rdmem_core::config::parse_size)]
    pool_size: Option<u64>,
    /// Another tenant, NAME:SIZE:TOKEN_FILE (repeatable): a pool of SIZE with its own token,
    /// protection domain and memory region, for clients that name NAME.
    #[arg(long = "tenant", value_name = "NAME:SIZE:TOKEN_FILE")]
    tenants: Vec<TenantConfig>,
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
    /// Hand every client of a tenant the pool's own remote key instead of a memory window of
    /// its connection's own: the key is then never revoked, and any client of the tenant can use
    /// another's. For devices whose windows misbehave, and to measure what windows cost.
    #[arg(long)]
    no_memory_windows: bool,
    /// The most connections (established or in progress) one tenant may hold at once; past
    /// it, connect requests are refused as busy.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    max_clients_per_tenant: u32,
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

/// Requests to a running node, signed with a tenant's token (`RDMEM_TOKEN` or
/// `RDMEM_TOKEN_FILE`); each tenant sees and evicts only its own clients.
#[derive(Subcommand, Debug)]
enum Admin {
    /// List the tenant's clients: id, address, established or connecting.
    Clients {
        #[command(flatten)]
        to: AdminTarget,
    },
    /// Disconnect one of the tenant's clients, its memory window (and so its key) freed first.
    Evict {
        #[command(flatten)]
        to: AdminTarget,
        /// The client's id, as `clients` lists it and the node logs it.
        client: u32,
    },
}

#[derive(clap::Args, Debug)]
struct AdminTarget {
    /// The node, HOST:PORT.
    #[arg(long)]
    memnode: String,
    /// The tenant (default: the node's default tenant).
    #[arg(long, default_value = "")]
    tenant: String,
    /// File holding the tenant's token (or set RDMEM_TOKEN).
    #[arg(long, env = "RDMEM_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

fn admin(admin: Admin) -> Result<(), Box<dyn std::error::Error>> {
    let to = match &admin {
        Admin::Clients { to } | Admin::Evict { to, .. } => to,
    };
    // A token file named (flag or RDMEM_TOKEN_FILE) wins over RDMEM_TOKEN, which may hold
    // another tenant's token.
    let token_env = std::env::var("RDMEM_TOKEN").ok().filter(|t| !t.is_empty() && to.token_file.is_none());
    let token = resolve_token(token_env.as_deref(), to.token_file.as_deref())?;
    let control = Control::new(&to.memnode, &token).tenant(&to.tenant);
    match admin {
        Admin::Clients { .. } => {
            for c in control.clients()? {
                println!("{}\t{}\t{}", c.id, c.peer, if c.established { "established" } else { "connecting" });
            }
        }
        Admin::Evict { client, .. } => {
            control.evict(client)?;
            println!("evicted client {client}");
        }
    }
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let mut args = Args::parse();
    let done = match args.admin.take() {
        Some(a) => admin(a),
        None => run(args),
    };
    if let Err(e) = done {
        eprintln!("rdmem-memnode: error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let token_env = std::env::var("RDMEM_TOKEN").ok();
    let token = resolve_token(token_env.as_deref().filter(|t| !t.is_empty()), args.token_file.as_deref())?;
    // With tenants and no token of its own, the node has no default pool.
    let default_pool = !token.is_empty() || args.insecure_no_token || args.tenants.is_empty();
    if !default_pool && args.pool_size.is_some() {
        return Err("--pool-size is the default tenant's, and it has no token: set RDMEM_TOKEN or --token-file, or \
                    drop --pool-size (the tenants have their sizes)"
            .into());
    }
    if args.insecure_no_token && !args.tenants.is_empty() {
        return Err("--insecure-no-token with --tenant: the default pool would be open to anyone while the tenants' \
                    need tokens; give the node a token, or serve only tenants"
            .into());
    }
    match (token.is_empty(), args.insecure_no_token) {
        (true, false) if !default_pool => {}
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
        pool_size: if default_pool { args.pool_size.unwrap_or(256 << 20) } else { 0 },
        tenants: args.tenants,
        memory_windows: !args.no_memory_windows,
        max_clients_per_tenant: args.max_clients_per_tenant as usize,
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
    for d in node.descriptors() {
        tracing::info!(
            "tenant {}: pool of {} bytes on {:?} pages at {:#x}, region key {:#x}",
            d.tenant,
            d.size,
            d.page_size,
            d.base,
            d.rkey
        );
    }
    let d = node.descriptor();
    tracing::info!(
        "serving node {} on {}: {} tenant(s), {}; listening on {}",
        d.node_id,
        d.device,
        node.descriptors().len(),
        match node.windows() {
            rdmem_transport_rdma::window::WindowSupport::Windows => "a memory window per client",
            rdmem_transport_rdma::window::WindowSupport::RegionKey => "the pools' own keys (no memory windows)",
        },
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
