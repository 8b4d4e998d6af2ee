//! Device tier: a running `rdmem-memnode` under attack from peers that hold no token, while a
//! legitimate client keeps working: a thousand idle connections, a lowered thread limit, a
//! peer that sends one byte every few seconds. Ignored by plain `cargo test`; runs in the
//! Soft-RoCE VM with `soft-roce-setup/vm-run --device-tests`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rdmem_core::{Endpoint, GlobalAddr, NodeId, Transport};
use rdmem_transport_rdma::spawn::MemnodeChild;
use rdmem_transport_rdma::{DeviceSelection, RdmaOptions, RdmaTransport};

const TOKEN: &str = "device-test-token";

fn memnode() -> MemnodeChild {
    MemnodeChild::start("memnode", TOKEN, &["--pool-size", "16M"]).unwrap_or_else(|e| panic!("rdmem-memnode: {e}"))
}

/// Connects a real client and uses it (a FAA on the pool); returns how long connecting took.
fn legitimate_client(node: &MemnodeChild) -> Duration {
    let started = Instant::now();
    let transport = RdmaTransport::connect(RdmaOptions {
        memnodes: vec![node.addr().to_owned()],
        token: TOKEN.into(),
        device: DeviceSelection::from_env().expect("RDMEM_* variables"),
        ..Default::default()
    })
    .expect("a legitimate client connects");
    let took = started.elapsed();
    let mut ep = transport.endpoint().unwrap();
    let word = GlobalAddr::new(NodeId(0), 4096).unwrap();
    let before = ep.faa(word, 1).unwrap();
    assert_eq!(ep.read_u64(word).unwrap(), before + 1);
    took
}

/// Lets this test process open many sockets.
fn raise_open_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum }).unwrap();
}

/// How long a legitimate client may take to connect while the node is attacked: an unloaded
/// node takes well under a second in the VM; the bugs this guards against took 20 s or forever.
const PROMPTLY: Duration = Duration::from_secs(10);

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_thousand_idle_connections_keep_no_client_out() {
    raise_open_files();
    let node = memnode();
    let idle: Vec<TcpStream> = (0..1100).map(|_| TcpStream::connect(node.addr()).expect("connect")).collect();
    let took = legitimate_client(&node);
    println!("connected in {took:?} with {} idle connections open", idle.len());
    assert!(took < PROMPTLY, "connecting took {took:?} with 1100 idle connections open");
    // And again, with the idle ones still there: the node is up and serving.
    assert!(legitimate_client(&node) < PROMPTLY);
    drop(idle);
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_peer_sending_a_byte_now_and_then_is_cut_off_at_the_handshake_deadline() {
    let node = memnode();
    let mut slow = TcpStream::connect(node.addr()).unwrap();
    slow.write_all(b"R").unwrap();
    // Trickle a byte every 2 s (each within any per-read timeout): the node closes it after
    // its whole-handshake deadline, and a read here then sees the end, well before 120 s.
    let began = Instant::now();
    slow.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let closed = loop {
        let mut byte = [0u8; 1];
        match slow.read(&mut byte) {
            Ok(0) => break true,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break true, // reset
            Ok(_) => panic!("the node answered a partial Hello"),
        }
        if slow.write_all(b"D").is_err() {
            break true;
        }
        if began.elapsed() > Duration::from_secs(120) {
            break false;
        }
    };
    assert!(closed, "a peer trickling bytes held its handshake open for 120 s");
    println!("trickling peer cut off after {:?}", began.elapsed());
    assert!(legitimate_client(&node) < PROMPTLY);
}

/// Runs the node's process in a cgroup whose pids.max leaves it no thread to spare, then
/// attacks it with hundreds of connections: a node that spawned a thread per connection died.
#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_lowered_thread_limit_does_not_stop_the_node() {
    raise_open_files();
    let node = memnode();
    let root = std::path::Path::new("/sys/fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        let status = std::process::Command::new("mount").args(["-t", "cgroup2", "none", "/sys/fs/cgroup"]).status();
        assert!(status.is_ok_and(|s| s.success()), "cannot mount cgroup2 at /sys/fs/cgroup");
    }
    let _ = std::fs::write(root.join("cgroup.subtree_control"), "+pids");
    let group = root.join(format!("rdmem-memnode-test-{}", std::process::id()));
    std::fs::create_dir_all(&group).expect("create a cgroup");
    std::fs::write(group.join("cgroup.procs"), node.pid().to_string()).expect("move the node into the cgroup");
    let threads = std::fs::read_dir(format!("/proc/{}/task", node.pid())).unwrap().count();
    std::fs::write(group.join("pids.max"), threads.to_string()).expect("set pids.max");
    let idle: Vec<TcpStream> = (0..400).map(|_| TcpStream::connect(node.addr()).expect("connect")).collect();
    // Half of them start a handshake and stop: the node must still be there.
    for s in idle.iter().step_by(2) {
        let _ = (&*s).write_all(b"RDMEM\0");
    }
    let took = legitimate_client(&node);
    println!("connected in {took:?} under pids.max={threads} with {} attackers", idle.len());
    assert!(took < PROMPTLY, "connecting took {took:?} under a thread limit");
    let events = std::fs::read_to_string(group.join("pids.events")).unwrap_or_default();
    println!("pids.events: {}", events.trim());
    drop(idle);
    assert!(legitimate_client(&node) < PROMPTLY, "the node stopped serving");
}
