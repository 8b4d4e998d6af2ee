//! Control requests to a memory node: one TCP connection per request, authenticated with a MAC
//! made with the token (never the token itself, see [`crate::wire`]), answered once, no queue
//! pair. Today: checkpoints, and
//! the newest one's sequence number.
//!
//! ```no_run
//! let done = rdmem_transport_rdma::control::checkpoint("10.77.0.1:7471", "0123456789abcdef-secret", None, false)?;
//! println!("snapshot {} of node {}: {} bytes", done.seq, done.node, done.bytes);
//! # Ok::<(), rdmem_core::Error>(())
//! ```
//! [`RdmaTransport`](crate::RdmaTransport) does the same for a node it is connected to
//! ([`rdmem_core::Transport::checkpoint`]).

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, SystemTime};

use rdmem_core::{Checkpoint, Error, NodeId, Result};

use crate::cm_auth;
use crate::wire::{self, Answer, Op, Request};

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the memory node at `peer` (`HOST:PORT`) for a snapshot of its pool with sequence number
/// `seq` (default: one above its newest), full if `full`, and waits until it is on disk (as
/// long as that takes; a node whose machine vanishes is noticed within
/// [`wire::DEAD_PEER_BOUND`]). A refusal (wrong token, no `--checkpoint-dir`, a sequence
/// number not above the newest, a disk error) is [`Error::Refused`] with the node's reason.
pub fn checkpoint(peer: &str, token: &str, seq: Option<u64>, full: bool) -> Result<Checkpoint> {
    if seq == Some(0) {
        return Err(Error::Config("checkpoint sequence numbers start at 1".into()));
    }
    match ask(peer, token, Op::Checkpoint { seq, full })? {
        Answer::Checkpointed(c) => Ok(Checkpoint {
            node: NodeId(c.node_id),
            seq: c.seq,
            parent: c.parent,
            data_blocks: c.data_blocks,
            zero_blocks: c.zero_blocks,
            bytes: c.bytes,
            scanned: c.scanned,
            duration: Duration::from_micros(c.micros),
        }),
        other => Err(unexpected(peer, other)),
    }
}

/// The node at `peer`'s newest snapshot: its id and the snapshot's sequence number (0: none
/// yet). Answered at once, even while the node writes a snapshot; a node without
/// `--checkpoint-dir` refuses ([`Error::Refused`]).
pub fn newest(peer: &str, token: &str) -> Result<(NodeId, u64)> {
    match ask(peer, token, Op::Newest)? {
        Answer::Newest { node_id, seq } => Ok((NodeId(node_id), seq)),
        other => Err(unexpected(peer, other)),
    }
}

/// A refusal as [`Error::Refused`]; any other answer than the one asked for is a broken peer.
fn unexpected(peer: &str, answer: Answer) -> Error {
    match answer {
        Answer::Refused(refusal) => Error::Refused { peer: peer.to_owned(), refusal },
        other => Error::Connect { peer: peer.to_owned(), reason: format!("answered {other:?}, not what was asked") },
    }
}

/// Sends one request and reads its answer.
fn ask(peer: &str, token: &str, op: Op) -> Result<Answer> {
    let fail = |reason: String| Error::Connect { peer: peer.to_owned(), reason };
    let mut stream = dial(peer, CONNECT_TIMEOUT)?;
    wire::keep_alive(&stream).map_err(|e| fail(e.to_string()))?;
    cm_auth::check_token(token.as_bytes()).map_err(Error::Config)?;
    let auth = cm_auth::Request::control(token.as_bytes(), cm_auth::DEFAULT_TENANT, SystemTime::now(), &op.to_bytes())
        .map_err(|e| fail(format!("no randomness for the request's nonce: {e}")))?;
    let request = Request { version: wire::VERSION, auth: auth.bytes, op };
    request.write_to(&mut stream).map_err(|e| fail(format!("sending the request: {e}")))?;
    Answer::read_from(&mut stream).map_err(|e| fail(format!("waiting for the answer: {e}")))
}

/// Opens a TCP connection to the memory node at `peer` (`HOST:PORT`), waiting at most
/// `timeout`; the error names the peer and what failed.
pub(crate) fn dial(peer: &str, timeout: Duration) -> Result<TcpStream> {
    let fail = |reason: String| Error::Connect { peer: peer.to_owned(), reason };
    let addr = peer
        .to_socket_addrs()
        .map_err(|e| fail(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| fail("resolves to no address".into()))?;
    TcpStream::connect_timeout(&addr, timeout).map_err(|e| fail(format!("{e} (is rdmem-memnode running there?)")))
}
