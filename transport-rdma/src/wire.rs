//! The connection handshake between a compute endpoint and a memory node, over TCP.
//!
//! ```text
//! client -> node  Hello:   magic "RDMEM\0" | version u16 | token_len u16 | token | QpInfo
//! node -> client  Welcome: magic | status u8 = 0 | node_id u16 | pool_base u64 | pool_size u64
//!                          | rkey u32 | QpInfo
//!              or Refused: magic | status u8 = 1 | reason_len u16 | reason (UTF-8)
//! QpInfo: qpn u32 | psn u32 | lid u16 | gid [u8; 16]          (all integers little-endian)
//! ```
//!
//! A connection may instead carry one control request (no queue pair), answered once:
//! ```text
//! client -> node  Request: magic "RDMCTL" | version u16 | token_len u16 | token | op u8
//!                          op 1, checkpoint: seq u64 (0: the next) | full u8 (0 or 1)
//!                          op 2, newest: nothing
//! node -> client  Checkpointed: magic "RDMCTL" | status u8 = 0 | node_id u16 | seq u64
//!                          | parent u64 (0: none)
//!                          | full u8 | data_blocks u64 | zero_blocks u64 | bytes u64
//!                          | scanned u64 | micros u64
//!              or Newest: magic "RDMCTL" | status u8 = 2 | node_id u16 | seq u64 (0: none)
//!              or Refused: magic "RDMCTL" | status u8 = 1 | reason_len u16 | reason (UTF-8)
//!                          (any op: wrong token, other version, no --checkpoint-dir, queue full)
//! ```
//! The version comes right after the magic so that a node can refuse any other version with a
//! message, whatever the rest of that version's Hello looks like. The TCP connection stays open
//! for the life of the queue pair: when it closes, the node destroys the queue pair.
//!
//! Why TCP and not RDMA-CM private data: sideway's RDMA-CM has no way to set private data, and
//! the handshake needs a channel that exists before any RDMA access is granted (the token is
//! checked before the node creates a queue pair with access to its pool).

use std::io::{self, Read, Write};

/// How long the other end of a control connection may be silent before its machine is taken
/// for dead: TCP keepalive probes start after [`KEEPALIVE_IDLE`] and [`KEEPALIVE_PROBES`]
/// unanswered ones, [`KEEPALIVE_INTERVAL`] apart, close the connection (unacknowledged data
/// gives up after the same bound). A machine that vanishes without a FIN or RST (powered off,
/// crashed, cut off) is therefore noticed within about this long.
/// (Generous for emulated machines, which may go unscheduled for a second or two under load.)
pub const DEAD_PEER_BOUND: std::time::Duration = std::time::Duration::from_secs(15);
/// Idle time before the first keepalive probe.
pub const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(5);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// Unanswered probes that end the connection.
pub const KEEPALIVE_PROBES: u32 = 5;

/// Turns on the keepalive of [`DEAD_PEER_BOUND`] on a control connection (both ends set it:
/// the client learns its memory node's machine died, the memory node that a client's did).
pub fn keep_alive(stream: &std::net::TcpStream) -> io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_socket_keepalive(stream, true)?;
    sockopt::set_tcp_keepidle(stream, KEEPALIVE_IDLE)?;
    sockopt::set_tcp_keepintvl(stream, KEEPALIVE_INTERVAL)?;
    sockopt::set_tcp_keepcnt(stream, KEEPALIVE_PROBES)?;
    sockopt::set_tcp_user_timeout(stream, DEAD_PEER_BOUND.as_millis() as u32)?;
    Ok(())
}

/// True when the other end of non-blocking control connection `stream` has closed it (or it
/// broke): a peek finds its end, or an error other than "nothing yet". Data waiting is left.
pub fn peer_closed(stream: &std::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted,
    }
}

/// Identifies rdmem's handshake.
pub const MAGIC: [u8; 6] = *b"RDMEM\0";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// The longest token accepted.
pub const MAX_TOKEN: usize = 1024;
/// Identifies a control request.
pub const CONTROL_MAGIC: [u8; 6] = *b"RDMCTL";
/// The most bytes a Hello or a control request of this version takes (magic, version, token
/// length, token, and a QpInfo or an op).
pub const MAX_HELLO: usize = 6 + 2 + 2 + MAX_TOKEN + 26;
const MAX_REASON: usize = 1024;

/// What a peer needs to connect its queue pair to ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number.
    pub psn: u32,
    /// Port LID (InfiniBand), 0 on RoCE.
    pub lid: u16,
    /// Port GID.
    pub gid: [u8; 16],
}

/// The client's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u16,
    /// The shared token.
    pub token: Vec<u8>,
    /// The client's queue pair.
    pub qp: QpInfo,
}

/// What the node grants: its pool and its queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// The node's id (the node part of its global addresses).
    pub node_id: u16,
    /// Address of pool offset 0 in the node's memory region.
    pub pool_base: u64,
    /// Pool size in bytes.
    pub pool_size: u64,
    /// Remote key of the pool.
    pub rkey: u32,
    /// The node's queue pair.
    pub qp: QpInfo,
}

/// The node's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Connected.
    Welcome(Welcome),
    /// Refused, with the reason.
    Refused(String),
}

fn put_qp(out: &mut Vec<u8>, qp: &QpInfo) {
    out.extend_from_slice(&qp.qpn.to_le_bytes());
    out.extend_from_slice(&qp.psn.to_le_bytes());
    out.extend_from_slice(&qp.lid.to_le_bytes());
    out.extend_from_slice(&qp.gid);
}

fn get<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn get_qp(r: &mut impl Read) -> io::Result<QpInfo> {
    Ok(QpInfo {
        qpn: u32::from_le_bytes(get(r)?),
        psn: u32::from_le_bytes(get(r)?),
        lid: u16::from_le_bytes(get(r)?),
        gid: get(r)?,
    })
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads a message's magic; anything but `magic` is an error.
fn check_magic(r: &mut impl Read, magic: [u8; 6]) -> io::Result<()> {
    if get::<6>(r)? != magic {
        return Err(bad("not an rdmem peer (bad magic)"));
    }
    Ok(())
}

impl Hello {
    /// Sends the message.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut out = Vec::with_capacity(64 + self.token.len());
        out.extend_from_slice(&MAGIC);
        put_version_and_token(&mut out, self.version, &self.token)?;
        put_qp(&mut out, &self.qp);
        w.write_all(&out)?;
        w.flush()
    }

    /// Reads the magic and version; `Ok(Err(version))` when the version is not ours (the rest
    /// of the message is then not read).
    pub fn read_from(r: &mut impl Read) -> io::Result<Result<Hello, u16>> {
        check_magic(r, MAGIC)?;
        Hello::read_rest(r)
    }

    /// Reads a Hello after its magic.
    fn read_rest(r: &mut impl Read) -> io::Result<Result<Hello, u16>> {
        match get_version_and_token(r)? {
            Ok(token) => Ok(Ok(Hello { version: VERSION, token, qp: get_qp(r)? })),
            Err(version) => Ok(Err(version)),
        }
    }
}

impl Reply {
    /// Sends the message.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&MAGIC);
        match self {
            Reply::Welcome(welcome) => {
                out.push(0);
                out.extend_from_slice(&welcome.node_id.to_le_bytes());
                out.extend_from_slice(&welcome.pool_base.to_le_bytes());
                out.extend_from_slice(&welcome.pool_size.to_le_bytes());
                out.extend_from_slice(&welcome.rkey.to_le_bytes());
                put_qp(&mut out, &welcome.qp);
            }
            Reply::Refused(reason) => put_reason(&mut out, reason),
        }
        w.write_all(&out)?;
        w.flush()
    }

    /// Reads the node's answer.
    pub fn read_from(r: &mut impl Read) -> io::Result<Reply> {
        check_magic(r, MAGIC)?;
        match get::<1>(r)?[0] {
            0 => Ok(Reply::Welcome(Welcome {
                node_id: u16::from_le_bytes(get(r)?),
                pool_base: u64::from_le_bytes(get(r)?),
                pool_size: u64::from_le_bytes(get(r)?),
                rkey: u32::from_le_bytes(get(r)?),
                qp: get_qp(r)?,
            })),
            1 => Ok(Reply::Refused(get_reason(r)?)),
            other => Err(bad(format!("unknown reply status {other}"))),
        }
    }
}

/// What a control connection asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A snapshot of the pool: with sequence number `seq` (default: the next), full if `full`.
    Checkpoint {
        /// Its sequence number.
        seq: Option<u64>,
        /// Full even if an incremental one would do.
        full: bool,
    },
    /// The newest snapshot's sequence number.
    Newest,
}

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Protocol version.
    pub version: u16,
    /// The shared token.
    pub token: Vec<u8>,
    /// What to do.
    pub op: Op,
}

/// What a checkpoint wrote, as the node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpointed {
    /// The node's id.
    pub node_id: u16,
    /// Its sequence number.
    pub seq: u64,
    /// The snapshot an incremental one applies to.
    pub parent: Option<u64>,
    /// Full or incremental.
    pub full: bool,
    /// Blocks written with their bytes.
    pub data_blocks: u64,
    /// Blocks of zeros recorded.
    pub zero_blocks: u64,
    /// The snapshot file's size.
    pub bytes: u64,
    /// Pool bytes read.
    pub scanned: u64,
    /// How long it took, in microseconds.
    pub micros: u64,
}

/// The node's answer to a control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The checkpoint is on disk.
    Checkpointed(Checkpointed),
    /// The newest snapshot's sequence number (0: none), and the node's id.
    Newest {
        /// The node's id.
        node_id: u16,
        /// The sequence number.
        seq: u64,
    },
    /// Refused or failed, with the reason.
    Refused(String),
}

/// What a connection opens with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// A queue pair's handshake (`Err(version)`: a version this build does not speak).
    Hello(Result<Hello, u16>),
    /// A control request (`Err(version)` likewise).
    Request(Result<Request, u16>),
}

impl Opening {
    /// Reads a Hello or a control request, told apart by their magic.
    pub fn read_from(r: &mut impl Read) -> io::Result<Opening> {
        let magic = get::<6>(r)?;
        if magic == CONTROL_MAGIC {
            return Request::read_rest(r).map(Opening::Request);
        }
        if magic != MAGIC {
            return Err(bad("not an rdmem peer (bad magic)"));
        }
        Hello::read_rest(r).map(Opening::Hello)
    }
}

/// Reads a version and a token; `Ok(Err(version))` for a version not ours.
fn get_version_and_token(r: &mut impl Read) -> io::Result<Result<Vec<u8>, u16>> {
    let version = u16::from_le_bytes(get(r)?);
    if version != VERSION {
        return Ok(Err(version));
    }
    let len = u16::from_le_bytes(get(r)?) as usize;
    if len > MAX_TOKEN {
        return Err(bad(format!("token longer than {MAX_TOKEN} bytes")));
    }
    let mut token = vec![0u8; len];
    r.read_exact(&mut token)?;
    Ok(Ok(token))
}

fn put_version_and_token(out: &mut Vec<u8>, version: u16, token: &[u8]) -> io::Result<()> {
    if token.len() > MAX_TOKEN {
        return Err(bad(format!("token longer than {MAX_TOKEN} bytes")));
    }
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(token.len() as u16).to_le_bytes());
    out.extend_from_slice(token);
    Ok(())
}

fn put_reason(out: &mut Vec<u8>, reason: &str) {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    out.push(1);
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
}

fn get_reason(r: &mut impl Read) -> io::Result<String> {
    let len = (u16::from_le_bytes(get(r)?) as usize).min(MAX_REASON);
    let mut reason = vec![0u8; len];
    r.read_exact(&mut reason)?;
    Ok(String::from_utf8_lossy(&reason).into_owned())
}

impl Request {
    /// Sends the request.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut out = Vec::with_capacity(32 + self.token.len());
        out.extend_from_slice(&CONTROL_MAGIC);
        put_version_and_token(&mut out, self.version, &self.token)?;
        match self.op {
            Op::Checkpoint { seq, full } => {
                out.push(1);
                out.extend_from_slice(&seq.unwrap_or(0).to_le_bytes());
                out.push(full as u8);
            }
            Op::Newest => out.push(2),
        }
        w.write_all(&out)?;
        w.flush()
    }

    /// Reads a request after its magic.
    fn read_rest(r: &mut impl Read) -> io::Result<Result<Request, u16>> {
        let (version, token) = match get_version_and_token(r)? {
            Ok(token) => (VERSION, token),
            Err(version) => return Ok(Err(version)),
        };
        let op = match get::<1>(r)?[0] {
            1 => {
                let seq = u64::from_le_bytes(get(r)?);
                let full = match get::<1>(r)?[0] {
                    0 => false,
                    1 => true,
                    f => return Err(bad(format!("checkpoint flag {f} is not 0 or 1"))),
                };
                Op::Checkpoint { seq: (seq != 0).then_some(seq), full }
            }
            2 => Op::Newest,
            other => return Err(bad(format!("unknown control operation {other}"))),
        };
        Ok(Ok(Request { version, token, op }))
    }
}

impl Answer {
    /// Sends the answer.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut out = Vec::with_capacity(80);
        out.extend_from_slice(&CONTROL_MAGIC);
        match self {
            Answer::Checkpointed(c) => {
                out.push(0);
                out.extend_from_slice(&c.node_id.to_le_bytes());
                for v in [c.seq, c.parent.unwrap_or(0)] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.push(c.full as u8);
                for v in [c.data_blocks, c.zero_blocks, c.bytes, c.scanned, c.micros] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Answer::Newest { node_id, seq } => {
                out.push(2);
                out.extend_from_slice(&node_id.to_le_bytes());
                out.extend_from_slice(&seq.to_le_bytes());
            }
            Answer::Refused(reason) => put_reason(&mut out, reason),
        }
        w.write_all(&out)?;
        w.flush()
    }

    /// Reads the node's answer.
    pub fn read_from(r: &mut impl Read) -> io::Result<Answer> {
        check_magic(r, CONTROL_MAGIC)?;
        fn word(r: &mut impl Read) -> io::Result<u64> {
            get::<8>(r).map(u64::from_le_bytes)
        }
        match get::<1>(r)?[0] {
            0 => {
                let node_id = u16::from_le_bytes(get(r)?);
                let (seq, parent) = (word(r)?, word(r)?);
                let full = get::<1>(r)?[0] != 0;
                Ok(Answer::Checkpointed(Checkpointed {
                    node_id,
                    seq,
                    parent: (parent != 0).then_some(parent),
                    full,
                    data_blocks: word(r)?,
                    zero_blocks: word(r)?,
                    bytes: word(r)?,
                    scanned: word(r)?,
                    micros: word(r)?,
                }))
            }
            1 => Ok(Answer::Refused(get_reason(r)?)),
            2 => Ok(Answer::Newest { node_id: u16::from_le_bytes(get(r)?), seq: word(r)? }),
            other => Err(bad(format!("unknown answer status {other}"))),
        }
    }
}

/// Compares tokens in time that depends only on their lengths.
pub fn tokens_match(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const QP: QpInfo = QpInfo { qpn: 0x11, psn: 0xabcdef, lid: 3, gid: [7; 16] };

    #[test]
    fn hello_round_trips() {
        let hello = Hello { version: VERSION, token: b"secret".to_vec(), qp: QP };
        let mut wire = Vec::new();
        hello.write_to(&mut wire).unwrap();
        assert_eq!(Hello::read_from(&mut wire.as_slice()).unwrap(), Ok(hello));
    }

    #[test]
    fn other_versions_are_reported_not_parsed() {
        let hello = Hello { version: VERSION + 1, token: vec![], qp: QP };
        let mut wire = Vec::new();
        hello.write_to(&mut wire).unwrap();
        wire.truncate(8); // a future version may send anything after its version
        assert_eq!(Hello::read_from(&mut wire.as_slice()).unwrap(), Err(VERSION + 1));
    }

    #[test]
    fn replies_round_trip() {
        let welcome = Reply::Welcome(Welcome { node_id: 2, pool_base: 1 << 40, pool_size: 1 << 30, rkey: 99, qp: QP });
        let refused = Reply::Refused("wrong token".into());
        for reply in [welcome, refused] {
            let mut wire = Vec::new();
            reply.write_to(&mut wire).unwrap();
            assert_eq!(Reply::read_from(&mut wire.as_slice()).unwrap(), reply);
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Hello::read_from(&mut &b"GET / HTTP/1.1\r\n"[..]).is_err());
        assert!(Reply::read_from(&mut &b"RDMEM\0\x07"[..]).is_err());
        assert!(Hello::read_from(&mut &b"RDM"[..]).is_err(), "short input");
        let mut long = MAGIC.to_vec();
        long.extend_from_slice(&VERSION.to_le_bytes());
        long.extend_from_slice(&(MAX_TOKEN as u16 + 1).to_le_bytes());
        assert!(Hello::read_from(&mut long.as_slice()).is_err(), "oversized token");
    }

    #[test]
    fn control_requests_and_answers_round_trip() {
        for op in [Op::Checkpoint { seq: None, full: false }, Op::Checkpoint { seq: Some(42), full: true }, Op::Newest]
        {
            let request = Request { version: VERSION, token: b"t".to_vec(), op };
            let mut wire = Vec::new();
            request.write_to(&mut wire).unwrap();
            assert_eq!(Opening::read_from(&mut wire.as_slice()).unwrap(), Opening::Request(Ok(request)));
        }
        let done = Answer::Checkpointed(Checkpointed {
            node_id: 2,
            seq: 3,
            parent: Some(2),
            full: false,
            data_blocks: 4,
            zero_blocks: 5,
            bytes: 6,
            scanned: 7,
            micros: 8,
        });
        let no_parent = Answer::Checkpointed(Checkpointed {
            node_id: 0,
            seq: 1,
            parent: None,
            full: true,
            data_blocks: 0,
            zero_blocks: 0,
            bytes: 0,
            scanned: 0,
            micros: 0,
        });
        let newest = Answer::Newest { node_id: 3, seq: 17 };
        for answer in [done, no_parent, newest, Answer::Refused("no --checkpoint-dir".into())] {
            let mut wire = Vec::new();
            answer.write_to(&mut wire).unwrap();
            assert_eq!(Answer::read_from(&mut wire.as_slice()).unwrap(), answer);
        }
        // A Hello still reads as one.
        let hello = Hello { version: VERSION, token: vec![], qp: QP };
        let mut wire = Vec::new();
        hello.write_to(&mut wire).unwrap();
        assert_eq!(Opening::read_from(&mut wire.as_slice()).unwrap(), Opening::Hello(Ok(hello)));
    }

    #[test]
    fn bad_control_requests_are_errors() {
        let mut wire = CONTROL_MAGIC.to_vec();
        wire.extend_from_slice(&VERSION.to_le_bytes());
        wire.extend_from_slice(&0u16.to_le_bytes());
        let mut unknown = wire.clone();
        unknown.push(9);
        assert!(Opening::read_from(&mut unknown.as_slice()).unwrap_err().to_string().contains("unknown control"));
        let mut flag = wire.clone();
        flag.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        assert!(Opening::read_from(&mut flag.as_slice()).is_err());
        assert!(Opening::read_from(&mut wire.as_slice()).is_err(), "short");
        let mut other = CONTROL_MAGIC.to_vec();
        other.extend_from_slice(&(VERSION + 1).to_le_bytes());
        assert_eq!(Opening::read_from(&mut other.as_slice()).unwrap(), Opening::Request(Err(VERSION + 1)));
        // A long reason is cut at a character boundary.
        let long = "é".repeat(MAX_REASON);
        let mut wire = Vec::new();
        Answer::Refused(long).write_to(&mut wire).unwrap();
        let Answer::Refused(back) = Answer::read_from(&mut wire.as_slice()).unwrap() else { panic!() };
        assert!(back.len() <= MAX_REASON && back.chars().all(|c| c == 'é'), "{back}");
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(tokens_match(b"abc", b"abc"));
        assert!(!tokens_match(b"abc", b"abd"));
        assert!(!tokens_match(b"abc", b"ab"));
        assert!(tokens_match(b"", b""));
    }
}
