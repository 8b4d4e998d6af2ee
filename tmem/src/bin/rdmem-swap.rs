//! `rdmem-swap`: an NBD server whose disk is remote memory, so Linux can swap to it.
//!
//! ```sh
//! rdmem-memnode --pool-size 1G --token-file token &              # on the memory node
//! rdmem-swap --memnode 10.0.0.2 --size 2G --socket /run/rdmem-swap.sock &
//! nbd-client -unix /run/rdmem-swap.sock -b 4096 -N rdmem -swap /dev/nbd0
//! mkswap /dev/nbd0 && swapon --discard /dev/nbd0
//! ```
//! Each 4 KiB page of the export is a page of a persistent pool of the page store
//! (`rdmem_tmem`): kept compressed, first locally (`--local-capacity`), then on the memory
//! nodes. With `swapon --discard` freed swap slots are trimmed, which frees their remote
//! space. The process locks its memory (`mlockall`) so that it never waits on the swap it
//! serves; run the workloads you want to swap under a cgroup's `memory.max`, not this server.
//! Memory nodes, token and device also come from RDMEM_* variables or RDMEM_CONFIG.
//! On SIGTERM or SIGINT it prints the store's figures and exits, but not while a client is
//! connected (the kernel's swapped-out pages would be lost): it says so, and a second signal
//! stops it anyway. Stats also go to stderr every `--stats-every` seconds when given.
//! A client has [`nbd::HANDSHAKE_TIMEOUT`] for the whole handshake.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use rdmem_allocator::{Allocator, AllocatorOptions};
use rdmem_core::ClusterConfig;
use rdmem_tmem::nbd::{self, ConnectionStats, Ended, Export};
use rdmem_tmem::{PageStore, PoolKind, StoreOptions, StoreStats};
use rdmem_transport_rdma::{RdmaOptions, RdmaTransport};

/// Serve remote memory as an NBD export (for swap).
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Memory node `host:port` (repeatable; default: RDMEM_MEMNODES or the config file).
    #[arg(long = "memnode")]
    memnodes: Vec<String>,
    /// The export's size (K, M, G suffixes; a multiple of 4 KiB).
    #[arg(long, value_parser = rdmem_core::config::parse_size)]
    size: u64,
    /// The unix socket to listen on (nbd-client -unix PATH).
    #[arg(long, conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// A TCP address to listen on instead (loopback only: 127.0.0.1:PORT).
    #[arg(long)]
    listen: Option<String>,
    /// The export's name.
    #[arg(long, default_value = "rdmem")]
    name: String,
    /// Compressed pages kept locally before they go to the memory nodes (0: straight there).
    #[arg(long, default_value = "16M", value_parser = rdmem_core::config::parse_size)]
    local_capacity: u64,
    /// Keep pages as they are (same-filled pages still take no space).
    #[arg(long)]
    no_compress: bool,
    /// Connections served at once (more are closed at once).
    #[arg(long, default_value_t = 16)]
    max_connections: usize,
    /// Print the store's figures to stderr this often (seconds).
    #[arg(long)]
    stats_every: Option<u64>,
    /// Do not lock the process's memory (for tests without CAP_IPC_LOCK; not for real swap).
    #[arg(long)]
    no_mlock: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rdmem-swap: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The store's figures as `name=value` words (the swap test reads them).
fn figures(s: &StoreStats) -> String {
    format!(
        "pages={} filled_pages={} local_pages={} local_bytes={} remote_pages={} remote_bytes={} ratio={} puts={} refused={} hits={} misses={} flushed={}",
        s.pages(),
        s.filled_pages,
        s.local_pages,
        s.local_bytes,
        s.remote_pages,
        s.remote_bytes,
        s.compression_ratio().map_or("-".into(), |r| format!("{r:.2}")),
        s.puts,
        s.puts_refused,
        s.hits,
        s.misses,
        s.flushed
    )
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(std::net::TcpListener),
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = ClusterConfig::load(None)?;
    if !cli.memnodes.is_empty() {
        config.memnodes = cli.memnodes.clone();
    }
    let listener = match (&cli.socket, &cli.listen) {
        (Some(path), _) => {
            if path.exists() {
                // A socket left by an earlier run; anything else is not ours to remove.
                let meta = std::fs::symlink_metadata(path)?;
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(format!("{} exists and is not a socket", path.display()).into());
                }
                std::fs::remove_file(path)?;
            }
            Listener::Unix(UnixListener::bind(path)?, path.clone())
        }
        (None, Some(addr)) => {
            let l = std::net::TcpListener::bind(addr)?;
            if !l.local_addr()?.ip().is_loopback() {
                return Err(format!("--listen {addr}: only loopback addresses (NBD has no authentication)").into());
            }
            Listener::Tcp(l)
        }
        (None, None) => return Err("give --socket PATH (or --listen 127.0.0.1:PORT)".into()),
    };
    let transport = Arc::new(RdmaTransport::connect(RdmaOptions::from_config(&config)?)?);
    let allocator = Allocator::new(transport, AllocatorOptions::default())?;
    let local = usize::try_from(cli.local_capacity)?;
    let options = StoreOptions {
        local_capacity: local,
        remotify_above: local / 2,
        compress: !cli.no_compress,
        ..StoreOptions::default()
    };
    let store = PageStore::new(allocator, options)?;
    let pool = store.create_pool(PoolKind::Persistent)?;
    let export = Export { name: cli.name.clone(), pool, object: 0, size: cli.size };
    export.check()?;
    let _remotifier = store.start_remotifier()?;
    if !cli.no_mlock {
        rustix::mm::mlockall(rustix::mm::MlockAllFlags::CURRENT | rustix::mm::MlockAllFlags::FUTURE).map_err(|e| {
            format!("mlockall: {e} (raise the memlock limit, e.g. ulimit -l unlimited, or run as root)")
        })?;
    }
    let signals = Arc::new(AtomicUsize::new(0));
    {
        let mut incoming =
            signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
        let signals = Arc::clone(&signals);
        std::thread::spawn(move || {
            for _ in incoming.forever() {
                signals.fetch_add(1, Ordering::AcqRel);
            }
        });
    }
    if let Some(every) = cli.stats_every {
        let store = store.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(every.max(1)));
                eprintln!("rdmem-swap: stats {}", figures(&store.stats()));
            }
        });
    }
    let where_ = match &listener {
        Listener::Unix(_, p) => p.display().to_string(),
        Listener::Tcp(l) => l.local_addr()?.to_string(),
    };
    eprintln!("rdmem-swap: serving {} bytes as export {:?} on {where_}", export.size, export.name);
    let _ = std::io::stderr().flush();
    let open = Arc::new(AtomicUsize::new(0));
    match &listener {
        Listener::Unix(l, _) => l.set_nonblocking(true)?,
        Listener::Tcp(l) => l.set_nonblocking(true)?,
    }
    let mut warned = false;
    loop {
        match signals.load(Ordering::Acquire) {
            0 => {}
            1 if open.load(Ordering::Acquire) > 0 => {
                if !warned {
                    eprintln!(
                        "rdmem-swap: {} client(s) connected: their swapped-out pages live here. swapoff and \
                         nbd-client -d first (signal again to stop anyway)",
                        open.load(Ordering::Acquire)
                    );
                    warned = true;
                }
            }
            _ => break,
        }
        let accepted: std::io::Result<Box<dyn Conn>> = match &listener {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
        };
        let mut stream = match accepted {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                tracing::warn!("accept: {e}");
                continue;
            }
        };
        if open.load(Ordering::Acquire) >= cli.max_connections {
            tracing::warn!("refusing a connection: {} open already", cli.max_connections);
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let (store, export, open) = (store.clone(), export.clone(), Arc::clone(&open));
        std::thread::spawn(move || {
            let result = (|| -> Result<Ended, Box<dyn std::error::Error>> {
                stream.setup(Some(nbd::HANDSHAKE_TIMEOUT))?;
                let deadline = std::time::Instant::now() + nbd::HANDSHAKE_TIMEOUT;
                let handshake = nbd::handshake(&mut Deadline { conn: &mut *stream, deadline }, &export)?;
                if let Some(ended) = handshake {
                    return Ok(ended);
                }
                stream.setup(None)?;
                let mut handle = store.handle()?;
                let mut stats = ConnectionStats::default();
                let ended = nbd::transmission(&mut stream, &mut handle, &export, &mut stats)?;
                tracing::info!("connection done: {stats:?}");
                Ok(ended)
            })();
            match result {
                Ok(Ended::Disconnected) => {}
                Ok(Ended::ProtocolError(why)) => tracing::warn!("dropped a client: {why}"),
                Err(e) => tracing::warn!("connection failed: {e}"),
            }
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
    eprintln!("rdmem-swap: stopping; stats {}", figures(&store.stats()));
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// A socket whose reads fail once `deadline` has passed (each read waits at most until then).
struct Deadline<'c> {
    conn: &'c mut dyn Conn,
    deadline: std::time::Instant,
}

impl std::io::Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the handshake took too long"));
        }
        self.conn.setup(Some(left))?;
        self.conn.read(buf)
    }
}

impl std::io::Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.conn.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.conn.flush()
    }
}

/// A client's socket: blocking, with a read timeout during the handshake only.
trait Conn: std::io::Read + std::io::Write + Send {
    fn setup(&mut self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl Conn for std::os::unix::net::UnixStream {
    fn setup(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(timeout)
    }
}

impl Conn for std::net::TcpStream {
    fn setup(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_nodelay(true)?;
        self.set_read_timeout(timeout)
    }
}
