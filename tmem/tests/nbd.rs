//! The NBD server on a socket pair, with a small client written from the protocol: the
//! handshake (NBD_OPT_GO and the old NBD_OPT_EXPORT_NAME), reads and writes aligned or not,
//! trims freeing their pages, errors for bad requests, and hostile clients.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use rdmem_allocator::{Allocator, AllocatorOptions};
use rdmem_core::LoopbackTransport;
use rdmem_tmem::nbd::{self, ConnectionStats, Ended, Export};
use rdmem_tmem::{PAGE_SIZE, PageStore, PoolKind, StoreOptions};

const SIZE: u64 = 256 * PAGE_SIZE as u64;

fn server() -> (PageStore<LoopbackTransport>, Export) {
    let transport = Arc::new(LoopbackTransport::new(&[32 << 20]));
    let allocator = Allocator::new(transport, AllocatorOptions::default()).unwrap();
    let options = StoreOptions { local_capacity: 8 * PAGE_SIZE, remotify_above: 0, shards: 2, ..Default::default() };
    let store = PageStore::new(allocator, options).unwrap();
    let pool = store.create_pool(PoolKind::Persistent).unwrap();
    (store, Export { name: "rdmem".into(), pool, object: 0, size: SIZE })
}

/// Serves one connection on a thread; returns the client's end and the server's outcome.
fn connect(
    store: &PageStore<LoopbackTransport>,
    export: &Export,
) -> (UnixStream, std::thread::JoinHandle<(std::io::Result<Ended>, ConnectionStats)>) {
    let (client, mut server) = UnixStream::pair().unwrap();
    let (store, export) = (store.clone(), export.clone());
    let t = std::thread::spawn(move || {
        let mut handle = store.handle().unwrap();
        let mut stats = ConnectionStats::default();
        let r = nbd::serve(&mut server, &mut handle, &export, &mut stats);
        (r, stats)
    });
    (client, t)
}

fn u32_of(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}

fn option(c: &mut UnixStream, option: u32, data: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    c.write_all(&m).unwrap();
}

/// Reads one option reply: (type, data).
fn option_reply(c: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), 0x0003_e889_0455_65a9);
    let mut data = vec![0; u32_of(&h[16..20]) as usize];
    c.read_exact(&mut data).unwrap();
    (u32_of(&h[12..16]), data)
}

fn greet(c: &mut UnixStream) {
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    c.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
}

fn go(c: &mut UnixStream, name: &str) -> Result<(u64, u16), u32> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
    option(c, 7, &d);
    let mut size = None;
    loop {
        let (kind, data) = option_reply(c);
        match kind {
            3 if u16::from_be_bytes(data[..2].try_into().unwrap()) == 0 => {
                size = Some((
                    u64::from_be_bytes(data[2..10].try_into().unwrap()),
                    u16::from_be_bytes(data[10..12].try_into().unwrap()),
                ))
            }
            3 => assert_eq!(u32_of(&data[6..10]), PAGE_SIZE as u32, "preferred block size"),
            1 => return Ok(size.expect("NBD_INFO_EXPORT before the ACK")),
            e => return Err(e),
        }
    }
}

/// A request's 28-byte header.
fn header(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m
}

/// Sends a request; returns the reply's error and the data of a READ.
fn request(c: &mut UnixStream, kind: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) -> (u32, Vec<u8>) {
    let mut m = header(kind, cookie, offset, len);
    m.extend_from_slice(data);
    c.write_all(&m).unwrap();
    let mut h = [0u8; 16];
    c.read_exact(&mut h).unwrap();
    assert_eq!(u32_of(&h[..4]), 0x6744_6698);
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
    let error = u32_of(&h[4..8]);
    let mut out = vec![];
    if kind == 0 && error == 0 {
        out = vec![0; len as usize];
        c.read_exact(&mut out).unwrap();
    }
    (error, out)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect()
}

#[test]
fn reads_writes_trims_and_errors() {
    let (store, export) = server();
    let (mut c, t) = connect(&store, &export);
    greet(&mut c);
    // An unknown option and an unknown export are refused, and the handshake goes on.
    option(&mut c, 99, b"");
    assert_eq!(option_reply(&mut c).0, (1 << 31) + 1);
    assert_eq!(go(&mut c, "other"), Err((1 << 31) + 6));
    let (size, flags) = go(&mut c, "rdmem").unwrap();
    assert_eq!(size, SIZE);
    assert!(flags & 32 != 0 && flags & 64 != 0, "trim and write zeroes are offered: {flags:#x}");

    // Never written: zeros, and no page stored.
    assert_eq!(request(&mut c, 0, 1, 0, 8192, &[]), (0, vec![0; 8192]));
    // 40 pages, then an unaligned write across three pages, then read it all back.
    let mut disk = vec![0u8; SIZE as usize];
    let data = pattern(40 * PAGE_SIZE, 1);
    assert_eq!(request(&mut c, 1, 2, 0, data.len() as u32, &data).0, 0);
    disk[..data.len()].copy_from_slice(&data);
    let odd = pattern(2 * PAGE_SIZE + 700, 2);
    assert_eq!(request(&mut c, 1, 3, 3 * PAGE_SIZE as u64 + 1000, odd.len() as u32, &odd).0, 0);
    disk[3 * PAGE_SIZE + 1000..3 * PAGE_SIZE + 1000 + odd.len()].copy_from_slice(&odd);
    assert_eq!(request(&mut c, 3, 4, 0, 0, &[]).0, 0, "flush");
    let (e, back) = request(&mut c, 0, 5, 0, 64 * PAGE_SIZE as u32, &[]);
    assert_eq!(e, 0);
    assert!(back == disk[..64 * PAGE_SIZE], "what was written reads back");
    let (e, back) = request(&mut c, 0, 6, 5 * PAGE_SIZE as u64 + 17, 333, &[]);
    assert_eq!((e, &back[..]), (0, &disk[5 * PAGE_SIZE + 17..5 * PAGE_SIZE + 350]));
    assert_eq!(store.stats().pages(), 40);

    // TRIM of 10 whole pages frees them; a TRIM of part of a page leaves it (a hint).
    let before = store.stats();
    assert_eq!(request(&mut c, 4, 7, 10 * PAGE_SIZE as u64, 10 * PAGE_SIZE as u32, &[]).0, 0);
    assert_eq!(store.stats().pages(), before.pages() - 10);
    disk[10 * PAGE_SIZE..20 * PAGE_SIZE].fill(0);
    assert_eq!(request(&mut c, 4, 7, 25 * PAGE_SIZE as u64 + 10, 100, &[]).0, 0);
    assert_eq!(store.stats().pages(), before.pages() - 10);
    // WRITE_ZEROES of an unaligned range zeros exactly it.
    assert_eq!(request(&mut c, 6, 8, 30 * PAGE_SIZE as u64 + 5, PAGE_SIZE as u32, &[]).0, 0);
    disk[30 * PAGE_SIZE + 5..31 * PAGE_SIZE + 5].fill(0);
    let (_, back) = request(&mut c, 0, 9, 0, 64 * PAGE_SIZE as u32, &[]);
    assert!(back == disk[..64 * PAGE_SIZE]);

    // Past the end, overflowing, an unknown command: EINVAL, and the connection goes on.
    assert_eq!(request(&mut c, 0, 10, SIZE - 100, 200, &[]).0, 22);
    assert_eq!(request(&mut c, 0, 11, u64::MAX - 10, 100, &[]).0, 22);
    assert_eq!(request(&mut c, 1, 12, SIZE, 4, &[1, 2, 3, 4]).0, 28, "a WRITE past the end: ENOSPC");
    assert_eq!(request(&mut c, 42, 13, 0, 0, &[]).0, 22);
    assert_eq!(request(&mut c, 0, 14, 0, 4, &[]), (0, disk[..4].to_vec()));
    // Disconnect.
    c.write_all(&header(2, 0, 0, 0)).unwrap();
    let (ended, stats) = t.join().unwrap();
    assert!(matches!(ended.unwrap(), Ended::Disconnected));
    assert_eq!(stats.errors, 4);
    // The pages stay for the next connection, through the old handshake this time.
    let (mut c, _t) = connect(&store, &export);
    greet(&mut c);
    option(&mut c, 1, b"rdmem");
    let mut reply = [0u8; 10];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), SIZE);
    let (_, back) = request(&mut c, 0, 1, 0, 64 * PAGE_SIZE as u32, &[]);
    assert!(back == disk[..64 * PAGE_SIZE]);
}

/// Hostile clients: each is dropped (or refused) and the store keeps serving others.
#[test]
fn hostile_clients_are_dropped_and_others_are_served() {
    let (store, export) = server();
    type Attack = Box<dyn Fn(&mut UnixStream)>;
    let attacks: Vec<Attack> = vec![
        Box::new(|c| c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap()),
        Box::new(|c| c.write_all(&[0xFF; 3]).unwrap()),
        Box::new(|c| {
            greet(c);
            option(c, 7, &[0xFF, 0xFF, 0xFF, 0xFF, 1, 2]); // name length past the option
            assert_eq!(option_reply(c).0, (1 << 31) + 3);
        }),
        Box::new(|c| {
            greet(c);
            let mut m = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
            m.extend_from_slice(&7u32.to_be_bytes());
            m.extend_from_slice(&u32::MAX.to_be_bytes()); // a 4 GiB option
            c.write_all(&m).unwrap();
        }),
        Box::new(|c| {
            greet(c);
            go(c, "").unwrap();
            c.write_all(&header(1, 0, 0, u32::MAX)).unwrap(); // a 4 GiB WRITE
        }),
        Box::new(|c| {
            greet(c);
            go(c, "").unwrap();
            c.write_all(&[0x12; 28]).unwrap(); // bad request magic
        }),
        Box::new(|c| {
            greet(c);
            go(c, "").unwrap();
            let mut m = header(1, 0, 0, 8192);
            m.extend_from_slice(&[1; 100]); // then hangs up mid-WRITE
            c.write_all(&m).unwrap();
        }),
    ];
    for round in 0..3 {
        for (i, attack) in attacks.iter().enumerate() {
            let (mut c, t) = connect(&store, &export);
            attack(&mut c);
            drop(c);
            let (ended, _) = t.join().expect("the server thread does not panic");
            assert!(!matches!(ended, Ok(Ended::Disconnected)), "round {round}, attack {i}: {ended:?}");
        }
    }
    let (mut c, _t) = connect(&store, &export);
    greet(&mut c);
    go(&mut c, "rdmem").unwrap();
    let data = pattern(PAGE_SIZE, 9);
    assert_eq!(request(&mut c, 1, 1, 0, PAGE_SIZE as u32, &data).0, 0);
    assert_eq!(request(&mut c, 0, 2, 0, PAGE_SIZE as u32, &[]), (0, data));
    assert_eq!(store.stats().pages(), 1, "the attacks stored nothing");
}
