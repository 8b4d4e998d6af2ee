//! Control requests to a memory node: one TCP connection per request, authenticated with a MAC
//! made with a tenant's token (never the token itself, see [`crate::wire`]), answered once, no
//! queue pair. Checkpoints and the newest one's sequence number (of the default tenant's
//! pool), and a tenant's connected clients and their eviction.
//!
//! ```no_run
//! use rdmem_transport_rdma::control::{self, Control};
//!
//! let done = control::checkpoint("10.77.0.1:7471", "0123456789abcdef-secret", None, false)?;
//! println!("snapshot {} of node {}: {} bytes", done.seq, done.node, done.bytes);
//!
//! // Tenant alice's clients of that node, and one of them evicted: its key is revoked at once.
//! let alice = Control::new("10.77.0.1:7471", "alice-token-0123456789").tenant("alice");
//! for client in alice.clients()? {
//!     println!("client {} from {}", client.id, client.peer);
//! }
//! alice.evict(17)?;
//! # Ok::<(), rdmem_core::Error>(())
//! ```
//! [`RdmaTransport`](crate::RdmaTransport) does the same for a node it is connected to
//! ([`rdmem_core::Transport::checkpoint`]).

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, SystemTime};

use rdmem_core::{Checkpoint, Error, NodeId, Result};

use crate::cm_auth;
use crate::wire::{self, Answer, Op, Request};

pub use crate::wire::ClientEntry;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the memory node at `peer` (`HOST:PORT`) for a snapshot of its (default tenant's) pool;
/// [`Control::checkpoint`].
pub fn checkpoint(peer: &str, token: &str, seq: Option<u64>, full: bool) -> Result<Checkpoint> {
    Control::new(peer, token).checkpoint(seq, full)
}

/// The node at `peer`'s newest snapshot; [`Control::newest`].
pub fn newest(peer: &str, token: &str) -> Result<(NodeId, u64)> {
    Control::new(peer, token).newest()
}

/// Where a control request goes and whose token signs it.
#[derive(Clone)]
pub struct Control<'a> {
    peer: &'a str,
    token: &'a str,
    tenant: &'a str,
}

impl std::fmt::Debug for Control<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("peer", &self.peer).field("tenant", &self.tenant).finish_non_exhaustive()
    }
}

impl<'a> Control<'a> {
    /// Requests to the node at `peer` (`HOST:PORT`) as its default tenant, with `token`.
    pub fn new(peer: &'a str, token: &'a str) -> Self {
        Control { peer, token, tenant: cm_auth::DEFAULT_TENANT }
    }

    /// As tenant `tenant` (empty: the default tenant), whose token `token` must be.
    pub fn tenant(mut self, tenant: &'a str) -> Self {
        self.tenant = if tenant.is_empty() { cm_auth::DEFAULT_TENANT } else { tenant };
        self
    }

    /// Asks for a snapshot of the node's default tenant's pool with sequence number `seq`
    /// (default: one above its newest), full if `full`, and waits until it is on disk (as long
    /// as that takes; a node whose machine vanishes is noticed within
    /// [`wire::DEAD_PEER_BOUND`]). A refusal (wrong token, another tenant, no
    /// `--checkpoint-dir`, a sequence number not above the newest, a disk error) is
    /// [`Error::Refused`] with the node's reason.
    pub fn checkpoint(&self, seq: Option<u64>, full: bool) -> Result<Checkpoint> {
        if seq == Some(0) {
            return Err(Error::Config("checkpoint sequence numbers start at 1".into()));
        }
        match self.ask(Op::Checkpoint { seq, full })? {
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
            other => Err(unexpected(self.peer, other)),
        }
    }

    /// The node's id and its newest snapshot's sequence number (0: none yet). Answered at
    /// once, even while the node writes a snapshot; a node without `--checkpoint-dir` refuses
    /// ([`Error::Refused`]).
    pub fn newest(&self) -> Result<(NodeId, u64)> {
        match self.ask(Op::Newest)? {
            Answer::Newest { node_id, seq } => Ok((NodeId(node_id), seq)),
            other => Err(unexpected(self.peer, other)),
        }
    }

    /// The tenant's clients, by id: those established, and those accepted (with their key)
    /// and not yet established. Asked for [`wire::CLIENTS_PER_ANSWER`] at a time, so a list
    /// that changes meanwhile may miss a client that came in between.
    pub fn clients(&self) -> Result<Vec<ClientEntry>> {
        let mut all: Vec<ClientEntry> = Vec::new();
        loop {
            let after = all.last().map_or(0, |c| c.id);
            match self.ask(Op::Clients { after })? {
                Answer::Clients(page) => {
                    let last = page.len() < wire::CLIENTS_PER_ANSWER;
                    if page.iter().any(|c| c.id <= after) {
                        return Err(Error::Connect {
                            peer: self.peer.to_owned(),
                            reason: format!("listed clients out of order (after {after})"),
                        });
                    }
                    all.extend(page);
                    if last {
                        return Ok(all);
                    }
                }
                other => return Err(unexpected(self.peer, other)),
            }
        }
    }

    /// Ends the tenant's client `client` (an id from [`Control::clients`] or the node's log):
    /// its memory window is deallocated before the answer comes, so its key opens nothing
    /// afterwards, and its queue pair is destroyed. (A node without windows, see
    /// `--no-memory-windows`, only destroys the queue pair: the tenant's one key stays valid for
    /// its other clients, and for any process that still holds the token.) A client of another
    /// tenant, or none, is [`Error::Refused`].
    pub fn evict(&self, client: u32) -> Result<()> {
        match self.ask(Op::Evict { client })? {
            Answer::Evicted { client: gone } if gone == client => Ok(()),
            other => Err(unexpected(self.peer, other)),
        }
    }

    /// Sends one request and reads its answer.
    fn ask(&self, op: Op) -> Result<Answer> {
        let peer = self.peer;
        let fail = |reason: String| Error::Connect { peer: peer.to_owned(), reason };
        cm_auth::check_token(self.token.as_bytes()).map_err(Error::Config)?;
        let mut stream = dial(peer, CONNECT_TIMEOUT)?;
        wire::keep_alive(&stream).map_err(|e| fail(e.to_string()))?;
        let to = stream.peer_addr().map_err(|e| fail(format!("the connection's address: {e}")))?;
        let auth = cm_auth::Request::control(self.token.as_bytes(), self.tenant, to, SystemTime::now(), &op.to_bytes())
            .map_err(|e| fail(format!("no randomness for the request's nonce: {e}")))?;
        let request = Request { version: wire::VERSION, auth: auth.bytes, op };
        request.write_to(&mut stream).map_err(|e| fail(format!("sending the request: {e}")))?;
        Answer::read_from(&mut stream).map_err(|e| fail(format!("waiting for the answer: {e}")))
    }
}

/// A refusal as [`Error::Refused`]; any other answer than the one asked for is a broken peer.
fn unexpected(peer: &str, answer: Answer) -> Error {
    match answer {
        Answer::Refused(refusal) => Error::Refused { peer: peer.to_owned(), refusal },
        other => Error::Connect { peer: peer.to_owned(), reason: format!("answered {other:?}, not what was asked") },
    }
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
