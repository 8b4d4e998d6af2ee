//! The memory node: a registered pool that clients reach with one-sided verbs only.
//!
//! [`Memnode::start`] maps the pool (huge pages by default), registers it as one memory region
//! with remote READ, WRITE and atomic access, and listens for clients on TCP. Each client
//! connection is one handshake ([`crate::wire`]): protocol version and token are checked first,
//! and only then is a queue pair created with access to the pool. After the handshake the
//! node's CPU does nothing for that client: its thread sleeps in `read()` on the control socket
//! until the client goes away (closed, killed, or its machine gone), then the queue pair is
//! destroyed. A client that dies never disturbs the others.
//!
//! The node knows nothing of what lives in its pool: the pool starts zeroed and the layers
//! above (the allocator) format it with one-sided operations.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::completion::GenericCompletionQueue;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::QueuePair;

use crate::device::{Device, DeviceSelection};
use crate::error::RdmaError;
use crate::memory::{PageSize, Region};
use crate::queue_pair;
use crate::wire::{self, Hello, Reply, Welcome};

/// How a memory node is set up.
#[derive(Debug, Clone)]
pub struct MemnodeConfig {
    /// Where to listen for clients.
    pub listen: SocketAddr,
    /// Pool size in bytes (rounded up to whole pages).
    pub pool_size: u64,
    /// Pages backing the pool.
    pub page_size: PageSize,
    /// The RDMA device.
    pub device: DeviceSelection,
    /// The token clients must present (empty: only the empty token is accepted).
    pub token: String,
    /// This node's id, the node part of its global addresses.
    pub node_id: u16,
}

/// What a memory node serves, as it logs it at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDescriptor {
    /// Node id.
    pub node_id: u16,
    /// Device name.
    pub device: String,
    /// Pool base address in the node's address space.
    pub base: u64,
    /// Pool size in bytes.
    pub size: u64,
    /// Remote key.
    pub rkey: u32,
    /// Pages actually backing the pool.
    pub page_size: PageSize,
    /// Listening address.
    pub listen: SocketAddr,
}

struct State {
    config: MemnodeConfig,
    device: Device,
    pd: Arc<ProtectionDomain>,
    cq: GenericCompletionQueue,
    pool: Region,
    clients: AtomicUsize,
}

/// A running memory node. Dropping it stops accepting; connected clients keep their queue
/// pairs until they disconnect.
pub struct Memnode {
    state: Arc<State>,
    listener: TcpListener,
    descriptor: PoolDescriptor,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Memnode {
    /// Opens the device, maps and registers the pool, binds the listening socket.
    pub fn start(config: MemnodeConfig) -> Result<Self, RdmaError> {
        let device = Device::open(&config.device)?;
        let pd = device.context().alloc_pd().map_err(|e| RdmaError::verbs("ibv_alloc_pd", e))?;
        let len = usize::try_from(config.pool_size).map_err(|_| RdmaError::verbs("pool size", "too large"))?;
        let access =
            AccessFlags::LocalWrite | AccessFlags::RemoteRead | AccessFlags::RemoteWrite | AccessFlags::RemoteAtomic;
        let pool = Region::new(&pd, len, config.page_size, access)?;
        // The node never posts: its completion queue only has to exist for its queue pairs.
        let mut builder = device.context().create_cq_builder();
        builder.setup_cqe(16);
        let cq = GenericCompletionQueue::from(builder.build().map_err(|e| RdmaError::verbs("ibv_create_cq", e))?);
        let listener = TcpListener::bind(config.listen)
            .map_err(|e| RdmaError::io(format!("cannot listen on {}", config.listen), e))?;
        let listen = listener.local_addr().map_err(|e| RdmaError::io("local address", e))?;
        let descriptor = PoolDescriptor {
            node_id: config.node_id,
            device: device.name().to_owned(),
            base: pool.addr(),
            size: pool.len() as u64,
            rkey: pool.rkey(),
            page_size: pool.page_size(),
            listen,
        };
        let state = Arc::new(State { config, device, pd, cq, pool, clients: AtomicUsize::new(0) });
        Ok(Memnode { state, listener, descriptor, threads: Mutex::new(Vec::new()) })
    }

    /// What this node serves.
    pub fn descriptor(&self) -> &PoolDescriptor {
        &self.descriptor
    }

    /// Clients connected right now.
    pub fn clients(&self) -> usize {
        self.state.clients.load(Ordering::SeqCst)
    }

    /// Accepts clients until `stop` becomes true (checked every 50 ms). Each client gets a thread
    /// that does the handshake and then waits for the client to leave.
    pub fn serve(&self, stop: &AtomicBool) -> Result<(), RdmaError> {
        self.listener.set_nonblocking(true).map_err(|e| RdmaError::io("listener", e))?;
        while !stop.load(Ordering::SeqCst) {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    let state = Arc::clone(&self.state);
                    let handle = std::thread::Builder::new()
                        .name(format!("client {peer}"))
                        .spawn(move || serve_client(&state, stream, peer))
                        .map_err(|e| RdmaError::io("spawning a client thread", e))?;
                    let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
                    threads.retain(|t| !t.is_finished());
                    threads.push(handle);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => tracing::warn!("accept failed: {e}"),
            }
        }
        Ok(())
    }
}

/// One client: handshake, queue pair, then wait for it to leave.
fn serve_client(state: &State, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_nodelay(true);
    let refuse = |stream: &mut TcpStream, reason: String| {
        tracing::warn!("refused {peer}: {reason}");
        let _ = Reply::Refused(reason).write_to(stream);
    };
    let hello = match Hello::read_from(&mut stream) {
        Ok(Ok(hello)) => hello,
        Ok(Err(version)) => {
            let reason = format!(
                "protocol version {version} is not supported; this memory node speaks version {}",
                wire::VERSION
            );
            return refuse(&mut stream, reason);
        }
        Err(e) => return tracing::warn!("handshake with {peer} failed: {e}"),
    };
    if !wire::tokens_match(&hello.token, state.config.token.as_bytes()) {
        return refuse(&mut stream, "wrong token".into());
    }
    let result = (|| {
        let (mut qp, limits) = queue_pair::create(&state.device, &state.pd, &state.cq, 1)?;
        let psn = queue_pair::random_psn(qp.qp_number());
        let access =
            AccessFlags::LocalWrite | AccessFlags::RemoteRead | AccessFlags::RemoteWrite | AccessFlags::RemoteAtomic;
        queue_pair::connect(&state.device, &mut qp, &limits, psn, &hello.qp, access)?;
        let welcome = Welcome {
            node_id: state.config.node_id,
            pool_base: state.pool.addr(),
            pool_size: state.pool.len() as u64,
            rkey: state.pool.rkey(),
            qp: queue_pair::local_info(&state.device, &qp, psn),
        };
        Reply::Welcome(welcome).write_to(&mut stream).map_err(|e| RdmaError::io("handshake reply", e))?;
        Ok::<_, RdmaError>(qp)
    })();
    let qp = match result {
        Ok(qp) => qp,
        Err(e) => return refuse(&mut stream, format!("memory node error: {e}")),
    };
    let now = state.clients.fetch_add(1, Ordering::SeqCst) + 1;
    tracing::info!("client {peer} connected (queue pair {}, {now} connected)", qp.qp_number());
    // The data path is one-sided: nothing to do until the client closes its control socket.
    let _ = stream.set_read_timeout(None);
    let mut sink = [0u8; 64];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    let qpn = qp.qp_number();
    drop(qp);
    let now = state.clients.fetch_sub(1, Ordering::SeqCst) - 1;
    tracing::info!("client {peer} left (queue pair {qpn} destroyed, {now} connected)");
}
