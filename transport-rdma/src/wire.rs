//! The connection handshake between a compute endpoint and a memory node, over TCP.
//!
//! ```text
//! client -> node  Hello:   magic "RDMEM\0" | version u16 | token_len u16 | token | QpInfo
//! node -> client  Welcome: magic | status u8 = 0 | node_id u16 | pool_base u64 | pool_size u64
//!                          | rkey u32 | QpInfo
//!              or Refused: magic | status u8 = 1 | reason_len u16 | reason (UTF-8)
//! QpInfo: qpn u32 | psn u32 | lid u16 | gid [u8; 16]          (all integers little-endian)
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

/// Identifies rdmem's handshake.
pub const MAGIC: [u8; 6] = *b"RDMEM\0";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// The longest token accepted.
pub const MAX_TOKEN: usize = 1024;
/// The most bytes a Hello of this version takes (magic, version, token length, token, QpInfo).
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

fn check_magic(r: &mut impl Read) -> io::Result<()> {
    if get::<6>(r)? != MAGIC {
        return Err(bad("not an rdmem peer (bad magic)"));
    }
    Ok(())
}

impl Hello {
    /// Sends the message.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        if self.token.len() > MAX_TOKEN {
            return Err(bad(format!("token longer than {MAX_TOKEN} bytes")));
        }
        let mut out = Vec::with_capacity(64 + self.token.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.token.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.token);
        put_qp(&mut out, &self.qp);
        w.write_all(&out)?;
        w.flush()
    }

    /// Reads the magic and version; `Ok(Err(version))` when the version is not ours (the rest
    /// of the message is then not read).
    pub fn read_from(r: &mut impl Read) -> io::Result<Result<Hello, u16>> {
        check_magic(r)?;
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
        Ok(Ok(Hello { version, token, qp: get_qp(r)? }))
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
            Reply::Refused(reason) => {
                let reason = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
                out.push(1);
                out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
                out.extend_from_slice(reason);
            }
        }
        w.write_all(&out)?;
        w.flush()
    }

    /// Reads the node's answer.
    pub fn read_from(r: &mut impl Read) -> io::Result<Reply> {
        check_magic(r)?;
        match get::<1>(r)?[0] {
            0 => Ok(Reply::Welcome(Welcome {
                node_id: u16::from_le_bytes(get(r)?),
                pool_base: u64::from_le_bytes(get(r)?),
                pool_size: u64::from_le_bytes(get(r)?),
                rkey: u32::from_le_bytes(get(r)?),
                qp: get_qp(r)?,
            })),
            1 => {
                let len = (u16::from_le_bytes(get(r)?) as usize).min(MAX_REASON);
                let mut reason = vec![0u8; len];
                r.read_exact(&mut reason)?;
                Ok(Reply::Refused(String::from_utf8_lossy(&reason).into_owned()))
            }
            other => Err(bad(format!("unknown reply status {other}"))),
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
    fn tokens_compare_exactly() {
        assert!(tokens_match(b"abc", b"abc"));
        assert!(!tokens_match(b"abc", b"abd"));
        assert!(!tokens_match(b"abc", b"ab"));
        assert!(tokens_match(b"", b""));
    }
}
