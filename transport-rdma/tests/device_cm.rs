//! Device tests of RDMA-CM connection setup: each refusal with its own error, replays, and
//! what crosses the wire. Run inside the VM with `soft-roce-setup/vm-run --device-tests`; they
//! fail when there is no device.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use rdmem_core::{Endpoint, Error, GlobalAddr, NodeId, Refusal, Transport};
use rdmem_transport_rdma::cm::{self, ProbeAnswer};
use rdmem_transport_rdma::cm_auth::{self, DEFAULT_TENANT};
use rdmem_transport_rdma::spawn::MemnodeChild;
use rdmem_transport_rdma::{Device, DeviceSelection, RdmaOptions, RdmaTransport};

const TOKEN: &str = "device-cm-test-token";
const WAIT: Duration = Duration::from_secs(20);

fn memnode() -> MemnodeChild {
    MemnodeChild::start("memnode", TOKEN, &["--pool-size", "16M"]).unwrap_or_else(|e| panic!("rdmem-memnode: {e}"))
}

/// Where RDMA-CM reaches `node` (its loopback address stands for the device's).
fn cm_addr(node: &MemnodeChild) -> SocketAddr {
    let device = Device::open(&DeviceSelection::from_env().unwrap()).expect("an RDMA device");
    device.routable(node.addr().parse().unwrap())
}

fn refusal_of(answer: ProbeAnswer) -> cm_auth::Refusal {
    match answer {
        ProbeAnswer::Rejected { status, private } => {
            assert_eq!(status, 28, "rejected by the node itself (IB_CM_REJ_CONSUMER_DEFINED)");
            cm_auth::Refusal::from_reject(&private, cm_auth::VERSION).expect("one of our rejects")
        }
        other => panic!("expected a reject, got {other:?}"),
    }
}

fn connect(node: &MemnodeChild, token: &str) -> Result<RdmaTransport, Error> {
    RdmaTransport::connect(RdmaOptions::for_memnodes(&[node.addr()], token).unwrap())
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn wrong_token_wrong_version_and_a_replay_are_each_refused_with_their_own_error() {
    let node = memnode();
    let addr = cm_addr(&node);

    // A client with the wrong token: a typed error, and the node keeps serving.
    let e = connect(&node, "not-the-device-cm-test-token").err().expect("refused");
    assert!(matches!(&e, Error::Refused { refusal: Refusal::WrongToken, .. }), "{e}");
    assert!(e.to_string().contains("wrong token"), "{e}");

    // Another version of the format: refused for its version before its MAC is looked at.
    let mut other = cm_auth::Request::new(TOKEN.as_bytes(), DEFAULT_TENANT, addr, SystemTime::now()).unwrap().bytes;
    other[2] = cm_auth::VERSION + 1;
    let refusal = refusal_of(cm::probe(addr, &other, WAIT).unwrap());
    assert_eq!(refusal, cm_auth::Refusal::Version { client: cm_auth::VERSION, node: cm_auth::VERSION });
    let typed: Refusal = cm_auth::Refusal::Version { client: cm_auth::VERSION + 1, node: cm_auth::VERSION }.into();
    assert_eq!(
        typed.to_string(),
        format!("protocol version {}, node speaks {}", cm_auth::VERSION + 1, cm_auth::VERSION)
    );

    // An unknown tenant.
    let stranger = cm_auth::Request::new(TOKEN.as_bytes(), "nobody", addr, SystemTime::now()).unwrap();
    assert_eq!(refusal_of(cm::probe(addr, &stranger.bytes, WAIT).unwrap()), cm_auth::Refusal::UnknownTenant);

    // A request made with the token is accepted once, with the node's MAC over its nonce; the
    // same bytes again (a captured request replayed) are refused as a replay.
    let request = cm_auth::Request::new(TOKEN.as_bytes(), DEFAULT_TENANT, addr, SystemTime::now()).unwrap();
    match cm::probe(addr, &request.bytes, WAIT).unwrap() {
        ProbeAnswer::Accepted { private, .. } => {
            let accept = request.check_accept(TOKEN.as_bytes(), &private).expect("the node's MAC");
            assert_eq!(accept.node, 0);
            assert_eq!(accept.size, 16 << 20);
            assert!(request.check_accept(b"some-other-token-entirely", &private).is_err());
        }
        other => panic!("a request with the token must be accepted: {other:?}"),
    }
    assert_eq!(refusal_of(cm::probe(addr, &request.bytes, WAIT).unwrap()), cm_auth::Refusal::Replayed);

    // A request on its way to this node, replayed first to another node of the same tenant
    // (same token, own replay cache): refused there, since its MAC covers its destination.
    let other_node = memnode();
    let elsewhere = cm_addr(&other_node);
    let captured = cm_auth::Request::new(TOKEN.as_bytes(), DEFAULT_TENANT, addr, SystemTime::now()).unwrap();
    assert_eq!(refusal_of(cm::probe(elsewhere, &captured.bytes, WAIT).unwrap()), cm_auth::Refusal::WrongToken);
    match cm::probe(addr, &captured.bytes, WAIT).unwrap() {
        ProbeAnswer::Accepted { .. } => {}
        other => panic!("the request must still be good where it was going: {other:?}"),
    }
    drop(other_node);

    // An old request (a clock far off, or a capture replayed after the replay window).
    let old = SystemTime::now() - cm_auth::MAX_SKEW - Duration::from_secs(5);
    let stale = cm_auth::Request::new(TOKEN.as_bytes(), DEFAULT_TENANT, addr, old).unwrap();
    assert_eq!(refusal_of(cm::probe(addr, &stale.bytes, WAIT).unwrap()), cm_auth::Refusal::ClockSkew);

    // Through all of it, a real client connects and works.
    let transport = connect(&node, TOKEN).expect("the right token connects");
    let mut ep = transport.endpoint().unwrap();
    let word = GlobalAddr::new(NodeId(0), 4096).unwrap();
    assert_eq!(ep.faa(word, 5).unwrap(), 0);
    assert_eq!(ep.read_u64(word).unwrap(), 5);
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_short_token_is_refused_before_anything_is_sent() {
    let node = memnode();
    let e = connect(&node, "short").err().expect("refused");
    assert!(matches!(&e, Error::Config(m) if m.contains("at least 16")), "{e}");
}

/// True when some 4-byte run of `token` appears in `bytes`.
fn leaks(bytes: &[u8], token: &[u8]) -> bool {
    token.windows(4).any(|w| bytes.windows(4).any(|b| b == w))
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn the_token_is_in_no_byte_of_the_private_data_or_the_control_traffic() {
    // A fake memory node that records what a client sends: an RDMA-CM listener (which rejects
    // after reading the connect request's private data) and a TCP listener on the same port
    // (which reads a control request whole).
    let device = Device::open(&DeviceSelection::from_env().unwrap()).expect("an RDMA device");
    let channel = cm::EventChannel::new().expect("event channel");
    let mut listener = cm::CmId::new(&channel).expect("id");
    listener.bind(device.routable("127.0.0.1:0".parse().unwrap())).expect("bind");
    listener.listen(4).expect("listen");
    let port = listener.local_addr().expect("bound").port();
    let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the same port on TCP");
    let addr = format!("127.0.0.1:{port}");

    let recorder = std::thread::spawn(move || {
        let event = channel.wait(std::time::Instant::now() + WAIT).unwrap().expect("a connect request");
        assert_eq!(event.kind, cm::CONNECT_REQUEST, "{event:?}");
        let private = event.private_data().to_vec();
        // SAFETY: a CONNECT_REQUEST just read from this channel, adopted once.
        let mut id = unsafe { channel.adopt(&event) };
        id.reject(&cm_auth::Refusal::Busy.to_reject()).unwrap();
        drop(listener);
        private
    });
    let e = connect_to(&addr, TOKEN).err().expect("rejected by the recorder");
    assert!(matches!(&e, Error::Refused { refusal: Refusal::Busy(_), .. }), "{e}");
    let private = recorder.join().unwrap();
    assert!(private.len() >= cm_auth::REQUEST_LEN, "{} bytes", private.len());
    assert_eq!(&private[..3], &[b'R', b'M', cm_auth::VERSION], "our connect request");
    assert_eq!(&private[4..8], &cm_auth::tenant_tag(DEFAULT_TENANT).to_le_bytes());
    assert!(!leaks(&private, TOKEN.as_bytes()), "the token is in the private data: {private:02x?}");

    let control = std::thread::spawn(move || {
        let (mut stream, _) = tcp.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 512];
        while let Ok(n) = std::io::Read::read(&mut stream, &mut chunk) {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&chunk[..n]);
        }
        bytes
    });
    let e = rdmem_transport_rdma::control::checkpoint(&addr, TOKEN, None, true).expect_err("no answer");
    println!("the control request, unanswered: {e}");
    let sent = control.join().unwrap();
    assert!(sent.starts_with(b"RDMCTL"), "a control request: {sent:02x?}");
    assert!(sent.len() > 6 + 2 + cm_auth::REQUEST_LEN, "{} bytes", sent.len());
    assert!(!leaks(&sent, TOKEN.as_bytes()), "the token is in the control request: {sent:02x?}");
}

fn connect_to(addr: &str, token: &str) -> Result<RdmaTransport, Error> {
    RdmaTransport::connect(RdmaOptions::for_memnodes(&[addr], token).unwrap())
}

/// A client that keeps working while the node is attacked: FAAs on its own word through one
/// endpoint, and a new transport (a new connection) every 50 operations. Returns how many
/// operations it made; any failure panics.
fn legitimate_client(node: &str, word: u64, stop: &std::sync::atomic::AtomicBool) -> u64 {
    let word = GlobalAddr::new(NodeId(0), word).unwrap();
    let mut done = 0u64;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) || done == 0 {
        let transport = connect_to(node, TOKEN).expect("a legitimate client connects during the attack");
        let mut ep = transport.endpoint().unwrap();
        for _ in 0..50 {
            assert_eq!(ep.faa(word, 1).expect("and works"), done);
            done += 1;
        }
    }
    done
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_thousand_abusive_connect_requests_of_each_kind_leave_the_node_serving() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let node = memnode();
    let addr = cm_addr(&node);
    let stop = AtomicBool::new(false);
    let peer = node.addr().to_owned();
    let mut random = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                random as u8
            })
            .collect()
    };
    std::thread::scope(|scope| {
        let client = scope.spawn(|| legitimate_client(&peer, 4096, &stop));
        // A failed assertion below stops the client too, so the scope ends and the test fails.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _stop_on_panic = StopOnDrop(&stop);
        let began = std::time::Instant::now();
        // 1. Garbage private data, half of it with our header so it reaches the MAC check.
        for i in 0..1000 {
            let mut data = bytes(cm_auth::REQUEST_LEN);
            if i % 2 == 0 {
                data[..4].copy_from_slice(&[b'R', b'M', cm_auth::VERSION, 0]);
                data[4..8].copy_from_slice(&cm_auth::tenant_tag(DEFAULT_TENANT).to_le_bytes());
            }
            let refusal = refusal_of(cm::probe(addr, &data, WAIT).unwrap());
            assert!(matches!(refusal, cm_auth::Refusal::Malformed | cm_auth::Refusal::WrongToken), "{refusal:?}");
        }
        // 2. Truncated requests: every length below a whole one (zero-padded by the CM).
        let whole = cm_auth::Request::new(TOKEN.as_bytes(), DEFAULT_TENANT, addr, SystemTime::now()).unwrap().bytes;
        for i in 0..1000 {
            let len = i % cm_auth::REQUEST_LEN;
            // Refused for whatever its zeros make of it (a version 0, tenant 0, a bad MAC).
            let refusal = refusal_of(cm::probe(addr, &whole[..len], WAIT).unwrap());
            assert!(!matches!(refusal, cm_auth::Refusal::Replayed | cm_auth::Refusal::Busy), "{len}: {refusal:?}");
        }
        // 3. Oversized private data cannot be sent: librdmacm refuses it before the wire.
        assert!(cm::probe(addr, &[0u8; cm_auth::REQUEST_LEN + 1], WAIT).is_err());
        // 4. Half-open connections: requests with the token, accepted, never established, 300
        //    held at a time (the node drops the oldest past 256 in progress, and each after 10 s).
        let mut held = std::collections::VecDeque::new();
        for _ in 0..1000 {
            let request = cm_auth::Request::new(TOKEN.as_bytes(), DEFAULT_TENANT, addr, SystemTime::now()).unwrap();
            match cm::probe(addr, &request.bytes, WAIT).unwrap() {
                ProbeAnswer::Accepted { private, held: half_open } => {
                    request.check_accept(TOKEN.as_bytes(), &private).expect("the node's MAC");
                    held.push_back(half_open);
                    if held.len() > 300 {
                        held.pop_front();
                    }
                }
                other => panic!("a request with the token must be accepted: {other:?}"),
            }
        }
        drop(held);
        // 5. A flood of real connections opened and closed at once.
        for _ in 0..1000 {
            drop(connect_to(&peer, TOKEN).expect("connect"));
        }
        println!("4000 abusive connection attempts in {:?}", began.elapsed());
        stop.store(true, Ordering::SeqCst);
        let done = client.join().expect("the legitimate client never failed");
        println!("the legitimate client made {done} operations meanwhile");
    });
    // The node is still up and its word holds every operation.
    let transport = connect_to(node.addr(), TOKEN).expect("connect after the attack");
    let mut ep = transport.endpoint().unwrap();
    assert!(ep.read_u64(GlobalAddr::new(NodeId(0), 4096).unwrap()).unwrap() > 0);
}
