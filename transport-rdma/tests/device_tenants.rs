//! Device tests of isolation and revocation: tenants with pools, protection domains and regions
//! of their own; a memory window, and so a remote key, per connection, which the device accepts
//! on that connection's queue pair only and which is revoked when the connection ends or the
//! client is evicted. Every refusal here is the device's (a completion error for a request the
//! test forged with a raw key), not the library's. Run inside the VM with
//! `soft-roce-setup/vm-run --device-tests`; they fail when there is no device.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use rdmem_core::{Endpoint, Error, GlobalAddr, NodeId, Refusal, Transport, WcStatus};
use rdmem_transport_rdma::control::Control;
use rdmem_transport_rdma::memnode::TenantConfig;
use rdmem_transport_rdma::window::WindowSupport;
use rdmem_transport_rdma::{
    DeviceSelection, Memnode, MemnodeConfig, PageSize, PoolDescriptor, RdmaEndpoint, RdmaOptions, RdmaTransport,
};

const TOKEN: &str = "device-tenants-default-token";
const TOKEN_B: &str = "device-tenants-token-of-bob";
const POOL: u64 = 8 << 20;

/// A memory node served from a thread of this test (so the test sees its regions' own keys),
/// stopped when dropped.
struct Node {
    addr: String,
    descriptors: Vec<PoolDescriptor>,
    windows: WindowSupport,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Node {
    fn start(tenants: Vec<TenantConfig>) -> Node {
        Node::start_with(tenants, true, 4096)
    }

    fn start_with(tenants: Vec<TenantConfig>, memory_windows: bool, max_clients_per_tenant: usize) -> Node {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config = MemnodeConfig {
            listen,
            pool_size: POOL,
            force_pool_size: false,
            page_size: PageSize::Normal,
            device: DeviceSelection::from_env().unwrap(),
            token: TOKEN.into(),
            tenants,
            memory_windows,
            max_clients_per_tenant,
            node_id: 0,
            checkpoint: None,
            restore: None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let node = match Memnode::start(config) {
                Ok(node) => node,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = tx.send(Ok((node.descriptors().to_vec(), node.windows())));
            node.serve(&stopping).expect("serve");
        });
        let (descriptors, windows) = rx.recv().unwrap().unwrap_or_else(|e| panic!("memory node: {e}"));
        Node { addr: listen.to_string(), descriptors, windows, stop, thread: Some(thread) }
    }

    fn connect(&self, tenant: &str, token: &str) -> Result<RdmaTransport, Error> {
        let mut options = RdmaOptions::for_memnodes(&[&self.addr], token).unwrap();
        options.tenant = tenant.into();
        RdmaTransport::connect(options)
    }

    fn descriptor(&self, tenant: &str) -> &PoolDescriptor {
        self.descriptors.iter().find(|d| d.tenant == tenant).expect("tenant served")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn word(offset: u64) -> GlobalAddr {
    GlobalAddr::new(NodeId(0), offset).unwrap()
}

/// A fresh endpoint of `transport` that reads `addr` with base `base` and key `rkey` instead
/// of its own: the request the device must refuse.
fn forged_read(transport: &RdmaTransport, base: u64, rkey: u32, addr: GlobalAddr) -> Result<u64, Error> {
    let mut ep = transport.endpoint().unwrap();
    ep.forge_remote_key(NodeId(0), base, rkey);
    ep.read_u64(addr)
}

/// The device refused it: a completion error naming a remote access (or, once the queue pair
/// is in error, a flush).
fn refused_by_the_device(result: Result<u64, Error>, what: &str) {
    match result {
        Err(Error::Completion { status: WcStatus::RemoteAccess, .. }) => {}
        other => panic!("{what}: expected a remote access error from the device, got {other:?}"),
    }
}

/// The ids `control` lists that are not in `before`, once there are `want` of them (the node
/// lists a client once it has read its connection's ESTABLISHED event).
fn new_clients(control: &Control<'_>, before: &[u32], want: usize) -> Vec<u32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ids: Vec<u32> = control.clients().unwrap().iter().map(|c| c.id).filter(|id| !before.contains(id)).collect();
        if ids.len() >= want || std::time::Instant::now() >= deadline {
            return ids;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn key_of(ep: &RdmaEndpoint) -> (u64, u32) {
    ep.remote_key(NodeId(0)).expect("connected to node 0")
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn each_connection_gets_its_own_key_which_no_other_connection_can_use() {
    let node = Node::start(Vec::new());
    assert_eq!(node.windows, WindowSupport::Windows, "rxe has type-2 memory windows");
    let transport = node.connect("", TOKEN).unwrap();
    let mut a = transport.endpoint().unwrap();
    let mut b = transport.endpoint().unwrap();
    let region = node.descriptor("default");
    let (base_a, key_a) = key_of(&a);
    let (_, key_b) = key_of(&b);
    assert_eq!(base_a, region.base);
    assert_ne!(key_a, key_b, "each connection has a key of its own");
    assert_ne!(key_a, region.rkey, "clients are never told the region's key");

    a.write_u64(word(64), 0xa11ce).unwrap();
    assert_eq!(b.read_u64(word(64)).unwrap(), 0xa11ce, "both reach the pool with their own keys");

    for round in 0..20 {
        // Another connection's key, and the region's own key: the device refuses both.
        refused_by_the_device(forged_read(&transport, base_a, key_a, word(64)), "a's key on another connection");
        refused_by_the_device(forged_read(&transport, region.base, region.rkey, word(64)), "the region's own key");
        // The owners are not disturbed.
        assert_eq!(a.faa(word(128), 1).unwrap(), round);
        assert_eq!(b.read_u64(word(128)).unwrap(), round + 1);
    }
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_key_is_revoked_when_its_connection_ends() {
    let node = Node::start(Vec::new());
    let transport = node.connect("", TOKEN).unwrap();
    let control = Control::new(&node.addr, TOKEN);
    let mut keeper = transport.endpoint().unwrap();
    assert_eq!(new_clients(&control, &[], 1).len(), 1, "the keeper is listed");
    for round in 0..10u64 {
        let before: Vec<u32> = control.clients().unwrap().iter().map(|c| c.id).collect();
        let mut gone = transport.endpoint().unwrap();
        gone.write_u64(word(8), round).unwrap();
        let (base, key) = key_of(&gone);
        let id = new_clients(&control, &before, 1);
        assert_eq!(id.len(), 1, "the new client is listed: {id:?}");
        drop(gone);
        // The node has seen the disconnect once it lists the client no more (milliseconds).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while control.clients().unwrap().iter().any(|c| c.id == id[0]) {
            assert!(std::time::Instant::now() < deadline, "the node never saw the disconnect");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        refused_by_the_device(forged_read(&transport, base, key, word(8)), "a disconnected client's key");
        // The keeper works throughout, and sees what the gone client wrote.
        assert_eq!(keeper.read_u64(word(8)).unwrap(), round);
        assert_eq!(keeper.faa(word(16), 1).unwrap(), round);
    }
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn an_evicted_client_fails_at_once_and_others_of_its_tenant_keep_working() {
    let node = Node::start(Vec::new());
    let control = Control::new(&node.addr, TOKEN);
    for round in 0..10u64 {
        let before: Vec<u32> = control.clients().unwrap().iter().map(|c| c.id).collect();
        let victim_transport = node.connect("", TOKEN).unwrap();
        let mut victim = victim_transport.endpoint().unwrap();
        victim.write_u64(word(24), round).unwrap();
        let ids = new_clients(&control, &before, 1);
        assert_eq!(ids.len(), 1, "one new client: {ids:?}");
        let (base, key) = key_of(&victim);
        control.evict(ids[0]).unwrap();
        match victim.read_u64(word(24)) {
            Err(Error::Completion { .. } | Error::NodeGone { .. } | Error::Post { .. } | Error::Connect { .. }) => {}
            other => panic!("the evicted client's read must fail, got {other:?}"),
        }
        // Its key, on a live connection, opens nothing.
        let other = node.connect("", TOKEN).unwrap();
        refused_by_the_device(forged_read(&other, base, key, word(24)), "an evicted client's key");
        let mut fresh = other.endpoint().unwrap();
        assert_eq!(fresh.read_u64(word(24)).unwrap(), round, "a new client of the tenant works");
    }
    // Evicting a client that does not exist, or with the wrong token, is refused.
    assert!(matches!(control.evict(u32::MAX), Err(Error::Refused { .. })));
    let stranger = Control::new(&node.addr, "not-the-tenants-token-at-all");
    assert!(matches!(stranger.clients(), Err(Error::Refused { refusal: Refusal::WrongToken, .. })));
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_tenant_cannot_reach_another_tenants_memory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bob.token");
    std::fs::write(&file, format!("{TOKEN_B}\n")).unwrap();
    let bob_config: TenantConfig = format!("bob:4M:{}", file.display()).parse().unwrap();
    let node = Node::start(vec![bob_config]);
    let alice = node.connect("", TOKEN).unwrap();
    let bob = node.connect("bob", TOKEN_B).unwrap();
    assert_eq!(alice.nodes()[0].pool_size, POOL);
    assert_eq!(bob.nodes()[0].pool_size, 4 << 20, "bob's own pool");
    let mut a = alice.endpoint().unwrap();
    let mut b = bob.endpoint().unwrap();
    let bobs = node.descriptor("bob");
    assert_ne!(bobs.base, node.descriptor("default").base);

    // The same offset is a different word in each tenant's pool.
    a.write_u64(word(0), 0xaaaa).unwrap();
    b.write_u64(word(0), 0xbbbb).unwrap();
    assert_eq!(a.read_u64(word(0)).unwrap(), 0xaaaa);
    assert_eq!(b.read_u64(word(0)).unwrap(), 0xbbbb);

    let (bob_base, bob_key) = key_of(&b);
    for round in 0..20u64 {
        // Alice forges bob's connection key, and bob's region key, with bob's addresses.
        refused_by_the_device(forged_read(&alice, bob_base, bob_key, word(0)), "bob's connection key from alice");
        refused_by_the_device(forged_read(&alice, bobs.base, bobs.rkey, word(0)), "bob's region key from alice");
        // Bob keeps working, and his word is untouched.
        assert_eq!(b.faa(word(8), 1).unwrap(), round);
        assert_eq!(b.read_u64(word(0)).unwrap(), 0xbbbb);
    }

    // A tenant's token is its own; an unknown tenant is told apart.
    let e = node.connect("bob", TOKEN).err().expect("refused");
    assert!(matches!(&e, Error::Refused { refusal: Refusal::WrongToken, .. }), "{e}");
    let e = node.connect("carol", TOKEN).err().expect("refused");
    assert!(matches!(&e, Error::Refused { refusal: Refusal::UnknownTenant, .. }), "{e}");
    // Each tenant lists and evicts only its own clients; checkpoints are the default's.
    let bob_control = Control::new(&node.addr, TOKEN_B).tenant("bob");
    let bobs_clients = bob_control.clients().unwrap();
    let alices_clients = Control::new(&node.addr, TOKEN).clients().unwrap();
    assert!(!bobs_clients.is_empty() && !alices_clients.is_empty());
    assert!(bobs_clients.iter().all(|c| alices_clients.iter().all(|d| d.id != c.id)));
    let e = bob_control.evict(alices_clients[0].id).unwrap_err();
    assert!(e.to_string().contains("no client"), "{e}");
    assert_eq!(a.read_u64(word(0)).unwrap(), 0xaaaa, "alice's client was not evicted by bob");
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn without_windows_the_clients_of_a_tenant_share_its_region_key() {
    // What the tests above would see without windows (`--no-memory-windows`, or a device
    // without them): one key for all, which the device accepts from any connection.
    let node = Node::start_with(Vec::new(), false, 4096);
    assert_eq!(node.windows, WindowSupport::RegionKey);
    let transport = node.connect("", TOKEN).unwrap();
    let mut a = transport.endpoint().unwrap();
    let b = transport.endpoint().unwrap();
    let region = node.descriptor("default");
    assert_eq!(key_of(&a), (region.base, region.rkey));
    assert_eq!(key_of(&b), (region.base, region.rkey));
    a.write_u64(word(64), 77).unwrap();
    assert_eq!(forged_read(&transport, region.base, region.rkey, word(64)).unwrap(), 77);
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_tenant_at_its_connection_limit_is_refused_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bob.token");
    std::fs::write(&file, TOKEN_B).unwrap();
    let bob_config: TenantConfig = format!("bob:4M:{}", file.display()).parse().unwrap();
    let node = Node::start_with(vec![bob_config], true, 3);
    let control = Control::new(&node.addr, TOKEN);
    let alice = node.connect("", TOKEN).unwrap();
    let mut held: Vec<RdmaEndpoint> = (0..3).map(|_| alice.endpoint().unwrap()).collect();
    for _ in 0..5 {
        let e = alice.endpoint().err().expect("a fourth connection is refused");
        assert!(matches!(&e, Error::Refused { refusal: Refusal::Busy(_), .. }), "{e}");
    }
    // Another tenant is not held back by this one.
    let bob = node.connect("bob", TOKEN_B).unwrap();
    let mut b = bob.endpoint().unwrap();
    b.write_u64(word(0), 5).unwrap();
    // A connection that ends makes room (once the node has seen it end).
    let before = control.clients().unwrap().len();
    assert_eq!(before, 3);
    held.pop();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while control.clients().unwrap().len() >= before {
        assert!(std::time::Instant::now() < deadline, "the node never saw the disconnect");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut again = alice.endpoint().expect("room again");
    again.write_u64(word(0), 7).unwrap();
    assert_eq!(held[0].read_u64(word(0)).unwrap(), 7);
    assert_eq!(b.read_u64(word(0)).unwrap(), 5);
}
