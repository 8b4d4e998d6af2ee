//! Control requests to a memory node, over TCP: one request per connection, answered once.
//! (Queue pairs are connected with RDMA-CM, [`crate::cm`]; this is what is not a connection.)
//!
//! ```text
//! client -> node  Request: magic "RDMCTL" | version u16 | auth [56] | op u8
//!                          op 1, checkpoint: seq u64 (0: the next) | full u8 (0 or 1)
//!                          op 2, newest: nothing
//!                 auth: cm_auth::Request::control over the op's bytes (tenant tag, time,
//!                 nonce, HMAC-SHA256 keyed by the token): the token never crosses the wire
//! node -> client  Checkpointed: magic "RDMCTL" | status u8 = 0 | node_id u16 | seq u64
//!                          | parent u64 (0: none)
//!                          | full u8 | data_blocks u64 | zero_blocks u64 | bytes u64
//!                          | scanned u64 | micros u64
//!              or Newest: magic "RDMCTL" | status u8 = 2 | node_id u16 | seq u64 (0: none)
//!              or Refused: magic "RDMCTL" | status u8 = 1 | reason_len u16 | reason (UTF-8)
//!                          | code u8 (a [`Refusal`]: 0 other, 1 malformed, 2 version, 3 unknown
//!                          tenant, 4 wrong token, 5 clock skew, 6 replayed, 7 busy)
//!                          (any op: wrong token, other version, no --checkpoint-dir, queue full)
//! ```
//! (all integers little-endian). The version comes right after the magic so that a node can
//! refuse any other version with a message, whatever the rest of that version's request looks
//! like. Answers carry no MAC: a client takes them as reports, not proof.
//!
//! A client of version 1 (before RDMA-CM) opened with `"RDMEM\0" | version 1 | token ...` on
//! this port; the node answers it with [`LEGACY_REFUSAL`]'s message in version 1's format
//! instead of reading its token.

use std::io::{self, Read, Write};

use rdmem_core::Refusal;

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

/// The magic of version 1's queue pair handshake (refused, see the module docs).
pub const LEGACY_MAGIC: [u8; 6] = *b"RDMEM\0";
/// What a version 1 client is told.
pub const LEGACY_REFUSAL: &str =
    "this memory node connects queue pairs over RDMA-CM (protocol version 2); this client speaks version 1: upgrade it";
/// The protocol version this build speaks (2: RDMA-CM, MACs instead of tokens).
pub const VERSION: u16 = 2;
/// Identifies a control request.
pub const CONTROL_MAGIC: [u8; 6] = *b"RDMCTL";
/// The most bytes a control request of this version takes (magic, version, auth, op).
pub const MAX_REQUEST: usize = 6 + 2 + crate::cm_auth::REQUEST_LEN + 10;
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

fn get<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
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
    /// End a client's connection and revoke its key (one of the requester's tenant).
    Evict {
        /// The client's id, as [`Op::Clients`] lists it and the node logs it.
        client: u32,
    },
    /// The requester's tenant's clients whose ids are above `after`, in id order, at most
    /// [`CLIENTS_PER_ANSWER`] (ask again after the last for more).
    Clients {
        /// Ids up to this one are left out (0: from the start).
        after: u32,
    },
}

/// The most clients one [`Answer::Clients`] lists: small enough that the answer fits a fresh
/// connection's send buffer, so the node never waits on a slow reader.
pub const CLIENTS_PER_ANSWER: usize = 48;
/// The longest peer address a [`ClientEntry`] carries, in bytes.
pub const MAX_PEER: usize = 64;

/// A client of the node, as [`Op::Clients`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEntry {
    /// Its id on the node (its queue pair's number there): what [`Op::Evict`] takes.
    pub id: u32,
    /// Where it connected from (at most [`MAX_PEER`] bytes: a socket address fits).
    pub peer: String,
    /// Its connection is established; `false`: accepted (with its key) and not yet
    /// established, which a connection may stay for at most
    /// [`HANDSHAKE_DEADLINE`](crate::memnode::HANDSHAKE_DEADLINE).
    pub established: bool,
}

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Protocol version.
    pub version: u16,
    /// Its authentication: [`crate::cm_auth::Request::control`] over [`Op::to_bytes`].
    pub auth: [u8; crate::cm_auth::REQUEST_LEN],
    /// What to do.
    pub op: Op,
}

impl Op {
    /// The operation's bytes on the wire (what a request's MAC covers).
    pub fn to_bytes(&self) -> smallvec::SmallVec<[u8; 10]> {
        let mut out = smallvec::SmallVec::new();
        match *self {
            Op::Checkpoint { seq, full } => {
                out.push(1);
                out.extend_from_slice(&seq.unwrap_or(0).to_le_bytes());
                out.push(full as u8);
            }
            Op::Newest => out.push(2),
            Op::Evict { client } => {
                out.push(3);
                out.extend_from_slice(&client.to_le_bytes());
            }
            Op::Clients { after } => {
                out.push(4);
                out.extend_from_slice(&after.to_le_bytes());
            }
        }
        out
    }
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
    /// Refused or failed, and why.
    Refused(Refusal),
    /// The client is gone (its window, if the node has them, deallocated first).
    Evicted {
        /// Its id.
        client: u32,
    },
    /// The tenant's clients asked for (at most [`CLIENTS_PER_ANSWER`]).
    Clients(Vec<ClientEntry>),
}

/// What a connection opens with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// A control request (`Err(version)`: a version this build does not speak).
    Request(Result<Request, u16>),
    /// Version 1's queue pair handshake (answer it with [`Opening::legacy_refusal`]).
    Legacy,
}

impl Opening {
    /// Reads a control request, or the start of version 1's handshake.
    pub fn read_from(r: &mut impl Read) -> io::Result<Opening> {
        let magic = get::<6>(r)?;
        if magic == LEGACY_MAGIC {
            return Ok(Opening::Legacy);
        }
        if magic != CONTROL_MAGIC {
            return Err(bad("not an rdmem peer (bad magic)"));
        }
        Request::read_rest(r).map(Opening::Request)
    }

    /// Version 1's refusal: magic | status 1 | reason, telling that client to upgrade.
    pub fn legacy_refusal() -> Vec<u8> {
        let mut out = LEGACY_MAGIC.to_vec();
        put_reason(&mut out, LEGACY_REFUSAL);
        out
    }
}

/// A refusal's code on the wire (after its reason, where version 1 readers stop): connect
/// rejects' codes ([`crate::cm_auth::Refusal`]), 0 for any other.
pub(crate) fn refusal_code(refusal: &Refusal) -> u8 {
    crate::cm_auth::Refusal::of(refusal).map_or(0, |r| r.code())
}

/// The refusal a code and its reason name (a version's numbers stay in the reason's words).
fn refusal_of(code: u8, reason: String) -> Refusal {
    match crate::cm_auth::Refusal::of_code(code, 0, 0) {
        Some(crate::cm_auth::Refusal::Busy) => {
            Refusal::Busy(reason.strip_prefix("node busy: ").unwrap_or(&reason).to_owned())
        }
        Some(crate::cm_auth::Refusal::Version { .. }) | None => Refusal::Other(reason),
        Some(refusal) => refusal.into(),
    }
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
        let mut out = Vec::with_capacity(MAX_REQUEST);
        out.extend_from_slice(&CONTROL_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.auth);
        out.extend_from_slice(&self.op.to_bytes());
        w.write_all(&out)?;
        w.flush()
    }

    /// Reads a request after its magic.
    fn read_rest(r: &mut impl Read) -> io::Result<Result<Request, u16>> {
        let version = u16::from_le_bytes(get(r)?);
        if version != VERSION {
            return Ok(Err(version));
        }
        let auth = get::<{ crate::cm_auth::REQUEST_LEN }>(r)?;
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
            3 => Op::Evict { client: u32::from_le_bytes(get(r)?) },
            4 => Op::Clients { after: u32::from_le_bytes(get(r)?) },
            other => return Err(bad(format!("unknown control operation {other}"))),
        };
        Ok(Ok(Request { version, auth, op }))
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
            Answer::Refused(refusal) => {
                put_reason(&mut out, &refusal.to_string());
                out.push(refusal_code(refusal));
            }
            Answer::Evicted { client } => {
                out.push(3);
                out.extend_from_slice(&client.to_le_bytes());
            }
            Answer::Clients(list) => {
                let list = &list[..list.len().min(CLIENTS_PER_ANSWER)];
                out.push(4);
                out.extend_from_slice(&(list.len() as u16).to_le_bytes());
                for c in list {
                    let mut end = c.peer.len().min(MAX_PEER);
                    while !c.peer.is_char_boundary(end) {
                        end -= 1;
                    }
                    out.extend_from_slice(&c.id.to_le_bytes());
                    out.push(c.established as u8);
                    out.push(end as u8);
                    out.extend_from_slice(&c.peer.as_bytes()[..end]);
                }
            }
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
            1 => {
                let reason = get_reason(r)?;
                // Version 1 nodes sent no code: the reason is all there is.
                let code = get::<1>(r).map_or(0, |c| c[0]);
                Ok(Answer::Refused(refusal_of(code, reason)))
            }
            2 => Ok(Answer::Newest { node_id: u16::from_le_bytes(get(r)?), seq: word(r)? }),
            3 => Ok(Answer::Evicted { client: u32::from_le_bytes(get(r)?) }),
            4 => {
                let n = u16::from_le_bytes(get(r)?) as usize;
                if n > CLIENTS_PER_ANSWER {
                    return Err(bad(format!("{n} clients listed, more than {CLIENTS_PER_ANSWER}")));
                }
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = u32::from_le_bytes(get(r)?);
                    let established = match get::<1>(r)?[0] {
                        0 => false,
                        1 => true,
                        f => return Err(bad(format!("client state {f} is not 0 or 1"))),
                    };
                    let mut peer = vec![0u8; (get::<1>(r)?[0] as usize).min(MAX_PEER)];
                    r.read_exact(&mut peer)?;
                    list.push(ClientEntry { id, peer: String::from_utf8_lossy(&peer).into_owned(), established });
                }
                Ok(Answer::Clients(list))
            }
            other => Err(bad(format!("unknown answer status {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTH: [u8; crate::cm_auth::REQUEST_LEN] = [7; crate::cm_auth::REQUEST_LEN];

    #[test]
    fn control_requests_and_answers_round_trip() {
        for op in [
            Op::Checkpoint { seq: None, full: false },
            Op::Checkpoint { seq: Some(42), full: true },
            Op::Newest,
            Op::Evict { client: 0x1234_5678 },
            Op::Clients { after: 0 },
            Op::Clients { after: u32::MAX },
        ] {
            let request = Request { version: VERSION, auth: AUTH, op };
            let mut wire = Vec::new();
            request.write_to(&mut wire).unwrap();
            assert!(wire.len() <= MAX_REQUEST);
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
        let refusals = [
            Refusal::Other("no --checkpoint-dir".into()),
            Refusal::Malformed,
            Refusal::UnknownTenant,
            Refusal::WrongToken,
            Refusal::ClockSkew,
            Refusal::Replayed,
            Refusal::Busy("16 checkpoint requests are waiting".into()),
        ];
        let refused = refusals.into_iter().map(Answer::Refused);
        let evicted = Answer::Evicted { client: 17 };
        let clients = Answer::Clients(vec![
            ClientEntry { id: 17, peer: "10.77.0.2:40001".into(), established: true },
            ClientEntry { id: 18, peer: String::new(), established: false },
        ]);
        let none = Answer::Clients(Vec::new());
        for answer in [done, no_parent, newest, evicted, clients, none].into_iter().chain(refused) {
            let mut wire = Vec::new();
            answer.write_to(&mut wire).unwrap();
            assert_eq!(Answer::read_from(&mut wire.as_slice()).unwrap(), answer);
        }
    }

    #[test]
    fn client_lists_are_bounded_both_ways() {
        let many: Vec<ClientEntry> = (0..CLIENTS_PER_ANSWER as u32 + 10)
            .map(|id| ClientEntry { id, peer: "é".repeat(200), established: true })
            .collect();
        let mut wire = Vec::new();
        Answer::Clients(many).write_to(&mut wire).unwrap();
        // The longest answer fits a fresh connection's smallest send buffer (4 KiB, tcp_wmem's
        // minimum, and 16 KiB by default).
        assert!(wire.len() <= 4 << 10, "{}", wire.len());
        match Answer::read_from(&mut wire.as_slice()).unwrap() {
            Answer::Clients(list) => {
                assert_eq!(list.len(), CLIENTS_PER_ANSWER);
                // Cut at a character boundary: 32 two-byte characters.
                assert!(list.iter().all(|c| c.peer == "é".repeat(32)), "{:?}", list[0].peer);
            }
            other => panic!("{other:?}"),
        }
        // A count above the bound is refused before anything is allocated for it.
        let mut forged = CONTROL_MAGIC.to_vec();
        forged.push(4);
        forged.extend_from_slice(&u16::MAX.to_le_bytes());
        assert!(Answer::read_from(&mut forged.as_slice()).unwrap_err().to_string().contains("more than"));
        // Truncated entries are errors, not panics.
        let mut wire = Vec::new();
        Answer::Clients(vec![ClientEntry { id: 1, peer: "abc".into(), established: true }])
            .write_to(&mut wire)
            .unwrap();
        for cut in 0..wire.len() {
            assert!(Answer::read_from(&mut &wire[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn version_1_handshakes_are_told_to_upgrade_in_their_format() {
        // Version 1's Hello: magic, version 1, token length, token, QpInfo.
        let mut hello = LEGACY_MAGIC.to_vec();
        hello.extend_from_slice(&1u16.to_le_bytes());
        hello.extend_from_slice(&6u16.to_le_bytes());
        hello.extend_from_slice(b"secret");
        assert_eq!(Opening::read_from(&mut hello.as_slice()).unwrap(), Opening::Legacy);
        // Version 1's Reply::Refused: magic | 1 | len u16 | reason.
        let refusal = Opening::legacy_refusal();
        assert_eq!(&refusal[..7], b"RDMEM\0\x01");
        let len = u16::from_le_bytes([refusal[7], refusal[8]]) as usize;
        assert_eq!(&refusal[9..], LEGACY_REFUSAL.as_bytes());
        assert_eq!(len, LEGACY_REFUSAL.len());
    }

    #[test]
    fn bad_control_requests_are_errors() {
        let mut wire = CONTROL_MAGIC.to_vec();
        wire.extend_from_slice(&VERSION.to_le_bytes());
        wire.extend_from_slice(&AUTH);
        let mut unknown = wire.clone();
        unknown.push(9);
        assert!(Opening::read_from(&mut unknown.as_slice()).unwrap_err().to_string().contains("unknown control"));
        let mut flag = wire.clone();
        flag.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        assert!(Opening::read_from(&mut flag.as_slice()).is_err());
        assert!(Opening::read_from(&mut wire.as_slice()).is_err(), "short");
        assert!(Opening::read_from(&mut &b"GET / HTTP/1.1\r\n"[..]).is_err());
        assert!(Answer::read_from(&mut &b"RDMCTL\x07"[..]).is_err());
        let mut other = CONTROL_MAGIC.to_vec();
        other.extend_from_slice(&(VERSION + 1).to_le_bytes());
        assert_eq!(Opening::read_from(&mut other.as_slice()).unwrap(), Opening::Request(Err(VERSION + 1)));
        // A long reason is cut at a character boundary.
        let long = "é".repeat(MAX_REASON);
        let mut wire = Vec::new();
        Answer::Refused(Refusal::Other(long)).write_to(&mut wire).unwrap();
        let Answer::Refused(Refusal::Other(back)) = Answer::read_from(&mut wire.as_slice()).unwrap() else { panic!() };
        assert!(back.len() <= MAX_REASON && back.chars().all(|c| c == 'é'), "{back}");
        // A version 1 node's refusal, without the code, reads as its words.
        let mut old = CONTROL_MAGIC.to_vec();
        put_reason(&mut old, "wrong token");
        assert_eq!(
            Answer::read_from(&mut old.as_slice()).unwrap(),
            Answer::Refused(Refusal::Other("wrong token".into()))
        );
    }
}
