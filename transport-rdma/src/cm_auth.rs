//! The authenticated private data of an RDMA-CM connection: what a client's connect request,
//! the node's accept and the node's reject carry, so that the token never crosses the wire.
//!
//! Private data travels in plaintext (at most 56 bytes in an RC connect request, 196 in the
//! reply, 148 in a reject), so it carries MACs, never secrets:
//!
//! ```text
//! request (56 B): magic "RM" | version u8 | 0 u8 | tenant tag u32 | time ms u64 | nonce [16]
//!                 | mac [24] = HMAC-SHA256(token, "rdmem-cm-connect" | the 32 bytes before
//!                                          | destination [18])[..24]
//! accept  (59 B): magic "RM" | version u8 | 0 u8 | node u16 | pool base u64 | size u64
//!                 | rkey u32 | page u8
//!                 | mac [32] = HMAC-SHA256(token, "rdmem-cm-accept" | request nonce | the 27 bytes before)
//! reject   (4 B): magic "RM" | the node's version u8 | reason u8
//! ```
//!
//! A request on the wire is a plaintext with its MAC, so a guessable token could be found
//! offline: tokens must be random and at least [`MIN_TOKEN`] bytes (the [`Verifier`] refuses
//! shorter ones). Tenant names are not secret: a sender without the token can tell an unknown
//! tenant from a wrong token.
//!
//! The MAC also covers the request's destination (the node's IPv6 or IPv4-mapped address and
//! port, as the client addressed it and as the node received it, [`destination`]), which is
//! not sent: a request captured on its way to one node is refused by every other node of the
//! same tenant (as a wrong token), since each keeps its own replay cache.
//!
//! The tenant tag is the first 4 bytes of SHA-256 of the tenant's name. The node checks, in
//! this order: the shape, the version, the tenant, the MAC (constant time), the clock (at most
//! [`MAX_SKEW`] apart), and that the nonce was not seen while its request could still be
//! accepted (a [`ReplayCache`] per tenant). Only then does it remember the nonce, so requests
//! without the token cannot fill a cache, and one tenant cannot fill another's. The node's clock
//! is taken as never going back (the latest time seen), so a clock stepped back cannot reopen
//! a replay. The accept's MAC covers the request's nonce, so a client knows it
//! reached a node holding the token, and an old accept cannot be replayed to it. A reject carries
//! no MAC (an attacker on the path can forge one; that denies service, which such an attacker can
//! do anyway), so a client treats it as a refusal, never as proof of anything.
//!
//! Control requests over TCP (checkpoints, a tenant's clients, evictions, [`crate::wire`])
//! carry the same 56 bytes, made with [`Request::control`]: their MAC has its own label and
//! covers the destination and the operation asked for.
//! The connection setup that carries connect requests is [`crate::cm`], used by
//! [`crate::RdmaTransport`] and [`crate::Memnode`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The version of this format (2: the MAC covers the destination).
pub const VERSION: u8 = 2;

/// The shortest token a [`Verifier`] takes, in bytes (it should be random).
pub const MIN_TOKEN: usize = 16;

/// The tenant of a node's own pool (its token and `--pool-size`), and of clients that name
/// none.
pub const DEFAULT_TENANT: &str = "default";

/// Fails for a token too short to be safe (1 to [`MIN_TOKEN`] - 1 bytes); the empty token is
/// taken (no authentication: `--insecure-no-token`).
pub fn check_token(token: &[u8]) -> Result<(), String> {
    if !token.is_empty() && token.len() < MIN_TOKEN {
        return Err(format!(
            "a token of {} bytes is too short: it must be at least {MIN_TOKEN} random bytes (e.g. `head -c 32 \
             /dev/urandom | base64`), since what crosses the wire is a MAC made with it, which a short token \
             lets anyone who sees it guess offline",
            token.len()
        ));
    }
    Ok(())
}

/// The bytes of a connect request.
pub const REQUEST_LEN: usize = 56;

/// The bytes of an accept.
pub const ACCEPT_LEN: usize = 59;

/// The bytes of a reject.
pub const REJECT_LEN: usize = 4;

/// How far apart the client's and the node's clocks may be.
pub const MAX_SKEW: Duration = Duration::from_secs(30);

/// The most nonces a [`ReplayCache`] (one per tenant) holds, of requests that carried the
/// token and could still pass the clock check; beyond that the node refuses that tenant's
/// requests with [`Refusal::Busy`] rather than forget one.
pub const REPLAY_CAPACITY: usize = 1 << 16;

const MAGIC: [u8; 2] = *b"RM";
const REQUEST_MAC_LEN: usize = 24;
const CONNECT_LABEL: &[u8] = b"rdmem-cm-connect";
const ACCEPT_LABEL: &[u8] = b"rdmem-cm-accept";
const CONTROL_LABEL: &[u8] = b"rdmem-control";

type HmacSha256 = Hmac<Sha256>;

/// Why a node refused a connect request: what its reject carries, and what the client's error
/// says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a request of this format (too short, too long, wrong magic).
    #[error("malformed connect request")]
    Malformed,
    /// Another version of the format.
    #[error("protocol version {client}, node speaks {node}")]
    Version {
        /// The client's.
        client: u8,
        /// The node's.
        node: u8,
    },
    /// No tenant of that name on this node.
    #[error("unknown tenant")]
    UnknownTenant,
    /// The MAC does not match: the client's token is not the tenant's.
    #[error("wrong token")]
    WrongToken,
    /// The request's time is more than [`MAX_SKEW`] from the node's.
    #[error("clock skew: the client's clock is more than {}s from the node's", MAX_SKEW.as_secs())]
    ClockSkew,
    /// The same request was seen before.
    #[error("replayed request")]
    Replayed,
    /// Too many connections: the tenant holds as many as the node allows it, or too many came
    /// in the last minute to remember their nonces.
    #[error("node busy: too many connections (try again later)")]
    Busy,
}

impl Refusal {
    /// Its code on the wire, in connect rejects and control answers alike (0 is no refusal of
    /// this list: another reason, in words).
    pub(crate) fn code(self) -> u8 {
        match self {
            Refusal::Malformed => 1,
            Refusal::Version { .. } => 2,
            Refusal::UnknownTenant => 3,
            Refusal::WrongToken => 4,
            Refusal::ClockSkew => 5,
            Refusal::Replayed => 6,
            Refusal::Busy => 7,
        }
    }

    /// The reject's private data.
    pub fn to_reject(self) -> [u8; REJECT_LEN] {
        [MAGIC[0], MAGIC[1], VERSION, self.code()]
    }

    /// A reject's private data, read by the client whose request had `client_version`. `None`
    /// when it is not one of ours (a reject by something else, or garbage).
    pub fn from_reject(data: &[u8], client_version: u8) -> Option<Refusal> {
        let [m0, m1, node, code] = *data.get(..REJECT_LEN)? else { return None };
        if [m0, m1] != MAGIC {
            return None;
        }
        Refusal::of_code(code, client_version, node)
    }

    /// The refusal `code` names ([`Refusal::Version`] with the versions given); `None` for a
    /// code of no refusal of this list.
    pub(crate) fn of_code(code: u8, client: u8, node: u8) -> Option<Refusal> {
        Some(match code {
            1 => Refusal::Malformed,
            2 => Refusal::Version { client, node },
            3 => Refusal::UnknownTenant,
            4 => Refusal::WrongToken,
            5 => Refusal::ClockSkew,
            6 => Refusal::Replayed,
            7 => Refusal::Busy,
            _ => return None,
        })
    }

    /// The refusal of this list a typed one is (`None` for [`rdmem_core::Refusal::Other`]).
    pub(crate) fn of(refusal: &rdmem_core::Refusal) -> Option<Refusal> {
        use rdmem_core::Refusal as R;
        Some(match refusal {
            R::Malformed => Refusal::Malformed,
            R::Version { client, node } => Refusal::Version {
                client: u8::try_from(*client).unwrap_or(u8::MAX),
                node: u8::try_from(*node).unwrap_or(u8::MAX),
            },
            R::UnknownTenant => Refusal::UnknownTenant,
            R::WrongToken => Refusal::WrongToken,
            R::ClockSkew => Refusal::ClockSkew,
            R::Replayed => Refusal::Replayed,
            R::Busy(_) => Refusal::Busy,
            _ => return None,
        })
    }
}

impl From<Refusal> for rdmem_core::Refusal {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Malformed => rdmem_core::Refusal::Malformed,
            Refusal::Version { client, node } => {
                rdmem_core::Refusal::Version { client: u16::from(client), node: u16::from(node) }
            }
            Refusal::UnknownTenant => rdmem_core::Refusal::UnknownTenant,
            Refusal::WrongToken => rdmem_core::Refusal::WrongToken,
            Refusal::ClockSkew => rdmem_core::Refusal::ClockSkew,
            Refusal::Replayed => rdmem_core::Refusal::Replayed,
            Refusal::Busy => rdmem_core::Refusal::Busy("too many connections (try again later)".into()),
        }
    }
}

/// A destination as a request's MAC covers it: the address as IPv6 (an IPv4 address mapped),
/// then the port, big-endian.
pub fn destination(to: SocketAddr) -> [u8; 18] {
    let ip = match to.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    };
    let mut out = [0u8; 18];
    out[..16].copy_from_slice(&ip.octets());
    out[16..].copy_from_slice(&to.port().to_be_bytes());
    out
}

/// The tag that names tenant `name` in a request: the first 4 bytes of its SHA-256.
pub fn tenant_tag(name: &str) -> u32 {
    let digest = Sha256::digest(name.as_bytes());
    u32::from_le_bytes(digest[..4].try_into().expect("4 bytes"))
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn mac_of(token: &[u8], label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(token).expect("HMAC takes a key of any length");
    mac.update(label);
    for part in parts {
        mac.update(part);
    }
    mac
}

/// 16 random bytes from the system.
fn random_nonce() -> std::io::Result<[u8; 16]> {
    let mut nonce = [0u8; 16];
    let mut filled = 0;
    while filled < nonce.len() {
        filled += rustix::rand::getrandom(&mut nonce[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(nonce)
}

/// A client's connect request, and what it needs to check the node's accept.
#[derive(Debug, Clone)]
pub struct Request {
    /// The private data to send.
    pub bytes: [u8; REQUEST_LEN],
    nonce: [u8; 16],
}

impl Request {
    /// A request to tenant `tenant` of the node at `to` (the address RDMA-CM connects to)
    /// holding `token`, at `now`, with a fresh random nonce. Fails only when the system has no
    /// randomness to give.
    pub fn new(token: &[u8], tenant: &str, to: SocketAddr, now: SystemTime) -> std::io::Result<Request> {
        Ok(Request::with_nonce(token, tenant, to, now, random_nonce()?))
    }

    /// [`Request::new`] with a given nonce (for tests).
    pub fn with_nonce(token: &[u8], tenant: &str, to: SocketAddr, now: SystemTime, nonce: [u8; 16]) -> Request {
        Request::made(token, tenant, now, nonce, CONNECT_LABEL, &[&destination(to)])
    }

    /// The authentication of a control request (over TCP, to the node at `to`) that asks for
    /// `op` (its bytes on the wire): the same 56 bytes, with a MAC under another label that
    /// also covers `op`, so it cannot pass for a connect request, nor its operation be changed.
    pub fn control(token: &[u8], tenant: &str, to: SocketAddr, now: SystemTime, op: &[u8]) -> std::io::Result<Request> {
        Ok(Request::made(token, tenant, now, random_nonce()?, CONTROL_LABEL, &[&destination(to), op]))
    }

    fn made(token: &[u8], tenant: &str, now: SystemTime, nonce: [u8; 16], label: &[u8], bound: &[&[u8]]) -> Request {
        let mut bytes = [0u8; REQUEST_LEN];
        bytes[..2].copy_from_slice(&MAGIC);
        bytes[2] = VERSION;
        bytes[4..8].copy_from_slice(&tenant_tag(tenant).to_le_bytes());
        bytes[8..16].copy_from_slice(&millis(now).to_le_bytes());
        bytes[16..32].copy_from_slice(&nonce);
        let tag = {
            let mut parts: smallvec::SmallVec<[&[u8]; 3]> = smallvec::smallvec![&bytes[..32]];
            parts.extend_from_slice(bound);
            mac_of(token, label, &parts).finalize().into_bytes()
        };
        bytes[32..].copy_from_slice(&tag[..REQUEST_MAC_LEN]);
        Request { bytes, nonce }
    }

    /// Checks the node's accept: it must carry the MAC of a node holding `token` over this
    /// request's nonce. `Err(Refusal::WrongToken)` when it does not (not a node holding the
    /// token, or an accept meant for another request), `Malformed` for the wrong shape.
    pub fn check_accept(&self, token: &[u8], data: &[u8]) -> Result<Accept, Refusal> {
        if data.len() < ACCEPT_LEN || data[ACCEPT_LEN..].iter().any(|&b| b != 0) || data[..2] != MAGIC || data[3] != 0 {
            return Err(Refusal::Malformed);
        }
        if data[2] != VERSION {
            return Err(Refusal::Version { client: VERSION, node: data[2] });
        }
        let (body, tag) = data[..ACCEPT_LEN].split_at(ACCEPT_LEN - 32);
        mac_of(token, ACCEPT_LABEL, &[&self.nonce, body]).verify_slice(tag).map_err(|_| Refusal::WrongToken)?;
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        Ok(Accept {
            node: u16::from_le_bytes([body[4], body[5]]),
            base: u64_at(6),
            size: u64_at(14),
            rkey: u32::from_le_bytes(body[22..26].try_into().expect("4 bytes")),
            page: body[26],
        })
    }
}

/// What a node's accept tells the client: the memory it may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accept {
    /// The node's id.
    pub node: u16,
    /// The pool's base address in the node's address space.
    pub base: u64,
    /// The pool's size in bytes.
    pub size: u64,
    /// The key this connection reaches the pool with.
    pub rkey: u32,
    /// The pool's page size, as the node's descriptor codes it.
    pub page: u8,
}

impl Accept {
    /// The accept's private data for the request whose nonce was `nonce` (from
    /// [`Verified::nonce`]), MACed with the tenant's `token`.
    pub fn to_bytes(&self, token: &[u8], nonce: &[u8; 16]) -> [u8; ACCEPT_LEN] {
        let mut out = [0u8; ACCEPT_LEN];
        out[..2].copy_from_slice(&MAGIC);
        out[2] = VERSION;
        out[4..6].copy_from_slice(&self.node.to_le_bytes());
        out[6..14].copy_from_slice(&self.base.to_le_bytes());
        out[14..22].copy_from_slice(&self.size.to_le_bytes());
        out[22..26].copy_from_slice(&self.rkey.to_le_bytes());
        out[26] = self.page;
        let tag = mac_of(token, ACCEPT_LABEL, &[nonce, &out[..27]]).finalize().into_bytes();
        out[27..].copy_from_slice(&tag);
        out
    }
}

/// A request that passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The index of its tenant in the [`Verifier`]'s list.
    pub tenant: usize,
    /// Its nonce (the accept's MAC covers it).
    pub nonce: [u8; 16],
}

/// The nonces of accepted requests, each kept at least until its request's time plus
/// [`MAX_SKEW`] (after which the clock check refuses it anyway), so that none is accepted twice.
/// Expired ones are dropped only when the cache is full.
#[derive(Debug, Default)]
pub struct ReplayCache {
    /// Nonce, and the time (ms) after which its request would be refused for its clock.
    seen: HashMap<[u8; 16], u64>,
}

impl ReplayCache {
    /// Remembers `nonce` of a request made at `sent` (ms), at `now` (ms). False when it was
    /// seen before; `Err(Busy)` when the cache is full of requests still within their time.
    fn insert(&mut self, nonce: [u8; 16], sent: u64, now: u64) -> Result<bool, Refusal> {
        if self.seen.contains_key(&nonce) {
            return Ok(false);
        }
        if self.seen.len() >= REPLAY_CAPACITY {
            self.seen.retain(|_, expires| *expires >= now);
            if self.seen.len() >= REPLAY_CAPACITY {
                return Err(Refusal::Busy);
            }
        }
        self.seen.insert(nonce, sent.saturating_add(MAX_SKEW.as_millis() as u64));
        Ok(true)
    }

    /// Nonces remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// A node's check of connect requests for its tenants.
pub struct Verifier {
    /// Per tenant: its tag, and its token.
    tenants: Vec<(u32, Vec<u8>)>,
    /// Per tenant.
    replay: Vec<ReplayCache>,
    /// The latest time (ms) a request was checked at: the clock never goes back.
    latest: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens.
        f.debug_struct("Verifier").field("tenants", &self.tenants.len()).finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for `tenants` (name, token), in order ([`Verified::tenant`] indexes them).
    /// Fails for no tenant, a token shorter than [`MIN_TOKEN`], or two names with the same tag
    /// (rename one). The empty token is taken (a node started with `--insecure-no-token`):
    /// anyone can make its MACs, so it authenticates nothing.
    pub fn new(tenants: &[(&str, &[u8])]) -> Result<Verifier, String> {
        if tenants.is_empty() {
            return Err("a memory node needs at least one tenant".into());
        }
        let mut list: Vec<(u32, Vec<u8>)> = Vec::with_capacity(tenants.len());
        for (i, (name, token)) in tenants.iter().enumerate() {
            check_token(token).map_err(|e| format!("tenant {name:?}: {e}"))?;
            let tag = tenant_tag(name);
            if let Some(j) = list.iter().position(|(t, _)| *t == tag) {
                return Err(format!("tenants {:?} and {name:?} have the same tag {tag:#x}: rename one", tenants[j].0));
            }
            debug_assert_eq!(list.len(), i);
            list.push((tag, token.to_vec()));
        }
        let replay = list.iter().map(|_| ReplayCache::default()).collect();
        Ok(Verifier { tenants: list, replay, latest: 0 })
    }

    /// Checks a connect request's private data, received at `at` (the address and port it was
    /// sent to), at `now` (see the module docs for the order).
    pub fn verify(&mut self, data: &[u8], at: SocketAddr, now: SystemTime) -> Result<Verified, Refusal> {
        self.verify_with(data, CONNECT_LABEL, &[&destination(at)], now)
    }

    /// Checks the authentication of a control request for `op` ([`Request::control`]),
    /// received at `at`, with the same checks and replay caches as connect requests.
    pub fn verify_control(
        &mut self,
        data: &[u8],
        at: SocketAddr,
        op: &[u8],
        now: SystemTime,
    ) -> Result<Verified, Refusal> {
        if data.len() != REQUEST_LEN {
            return Err(Refusal::Malformed);
        }
        self.verify_with(data, CONTROL_LABEL, &[&destination(at), op], now)
    }

    fn verify_with(
        &mut self,
        data: &[u8],
        label: &[u8],
        bound: &[&[u8]],
        now: SystemTime,
    ) -> Result<Verified, Refusal> {
        // RDMA-CM may pad the private data with zeros up to its limit: only the first
        // REQUEST_LEN bytes count, and the rest must be zeros.
        if data.len() < REQUEST_LEN || data[REQUEST_LEN..].iter().any(|&b| b != 0) || data[..2] != MAGIC || data[3] != 0
        {
            return Err(Refusal::Malformed);
        }
        let data = &data[..REQUEST_LEN];
        if data[2] != VERSION {
            return Err(Refusal::Version { client: data[2], node: VERSION });
        }
        let tag = u32::from_le_bytes(data[4..8].try_into().expect("4 bytes"));
        let tenant = self.tenants.iter().position(|(t, _)| *t == tag).ok_or(Refusal::UnknownTenant)?;
        let mut parts: smallvec::SmallVec<[&[u8]; 3]> = smallvec::smallvec![&data[..32]];
        parts.extend_from_slice(bound);
        mac_of(&self.tenants[tenant].1, label, &parts)
            .verify_truncated_left(&data[32..])
            .map_err(|_| Refusal::WrongToken)?;
        let sent = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
        let now = millis(now).max(self.latest);
        self.latest = now;
        if sent.abs_diff(now) > MAX_SKEW.as_millis() as u64 {
            return Err(Refusal::ClockSkew);
        }
        let nonce: [u8; 16] = data[16..32].try_into().expect("16 bytes");
        if !self.replay[tenant].insert(nonce, sent, now)? {
            return Err(Refusal::Replayed);
        }
        Ok(Verified { tenant, nonce })
    }

    /// The token of tenant `tenant` (to MAC its accept).
    pub fn token(&self, tenant: usize) -> &[u8] {
        &self.tenants[tenant].1
    }

    /// The nonces of tenant `tenant` remembered against replay.
    pub fn replay_cache(&self, tenant: usize) -> &ReplayCache {
        &self.replay[tenant]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &[u8] = b"tenant-a-token-0123";
    const DEFAULT: &[u8] = b"default-token-0123";

    fn verifier() -> Verifier {
        Verifier::new(&[("default", DEFAULT), ("a", TOKEN)]).unwrap()
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    const NOW: u64 = 1_800_000_000_000;

    /// Where the requests of these tests go.
    const TO: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 77, 0, 1)), 7471);

    #[test]
    fn a_request_is_refused_by_any_other_destination_than_its_own() {
        let mut v = verifier();
        let other_node: SocketAddr = "10.77.0.2:7471".parse().unwrap();
        let other_port: SocketAddr = "10.77.0.1:7472".parse().unwrap();
        let req = Request::new(TOKEN, "a", TO, at(NOW)).unwrap();
        // Captured on its way to TO and replayed to another node (or port) of the tenant.
        assert_eq!(v.verify(&req.bytes, other_node, at(NOW)), Err(Refusal::WrongToken));
        assert_eq!(v.verify(&req.bytes, other_port, at(NOW)), Err(Refusal::WrongToken));
        assert!(v.verify(&req.bytes, TO, at(NOW)).is_ok());
        let op = [4u8];
        let control = Request::control(TOKEN, "a", TO, at(NOW), &op).unwrap();
        assert_eq!(v.verify_control(&control.bytes, other_node, &op, at(NOW)), Err(Refusal::WrongToken));
        assert!(v.verify_control(&control.bytes, TO, &op, at(NOW)).is_ok());
        // An IPv4 address and its IPv6-mapped form are one destination.
        let mapped =
            SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv4Addr::new(10, 77, 0, 1).to_ipv6_mapped()), 7471);
        assert_eq!(destination(TO), destination(mapped));
        let again = Request::new(TOKEN, "a", TO, at(NOW)).unwrap();
        assert!(v.verify(&again.bytes, mapped, at(NOW)).is_ok());
    }

    #[test]
    fn a_request_with_the_token_is_accepted_once_and_its_accept_checks() {
        let mut v = verifier();
        let req = Request::new(TOKEN, "a", TO, at(NOW)).unwrap();
        let ok = v.verify(&req.bytes, TO, at(NOW + 5)).unwrap();
        assert_eq!(ok.tenant, 1);
        assert_eq!(v.verify(&req.bytes, TO, at(NOW + 6)), Err(Refusal::Replayed));
        let accept = Accept { node: 3, base: 0x7f00_0000_0000, size: 1 << 30, rkey: 0xabcd, page: 2 };
        let bytes = accept.to_bytes(v.token(ok.tenant), &ok.nonce);
        assert_eq!(req.check_accept(TOKEN, &bytes), Ok(accept));
        // Another request's accept, or one MACed with another token, is refused.
        let other = Request::new(TOKEN, "a", TO, at(NOW)).unwrap();
        assert_eq!(other.check_accept(TOKEN, &bytes), Err(Refusal::WrongToken));
        assert_eq!(req.check_accept(DEFAULT, &bytes), Err(Refusal::WrongToken));
        let mut flipped = bytes;
        flipped[10] ^= 1; // the pool base, changed on the way
        assert_eq!(req.check_accept(TOKEN, &flipped), Err(Refusal::WrongToken));
    }

    #[test]
    fn the_token_is_nowhere_in_the_bytes_on_the_wire() {
        let token = b"a-token-long-enough-to-find";
        let mut v = Verifier::new(&[("t", &token[..])]).unwrap();
        let req = Request::new(token, "t", TO, at(NOW)).unwrap();
        let ok = v.verify(&req.bytes, TO, at(NOW)).unwrap();
        let accept = Accept { node: 0, base: 1, size: 2, rkey: 3, page: 0 }.to_bytes(token, &ok.nonce);
        for wire in [&req.bytes[..], &accept[..], &Refusal::WrongToken.to_reject()[..]] {
            for n in 4..=token.len() {
                assert!(!wire.windows(n).any(|w| token.windows(n).any(|t| t == w)), "{n} token bytes on the wire");
            }
        }
    }

    #[test]
    fn each_refusal_has_its_reason_and_survives_the_reject() {
        let mut v = verifier();
        let wrong = Request::new(b"not-the-token", "a", TO, at(NOW)).unwrap();
        assert_eq!(v.verify(&wrong.bytes, TO, at(NOW)), Err(Refusal::WrongToken));
        let mut version = Request::new(TOKEN, "a", TO, at(NOW)).unwrap().bytes;
        version[2] = 1; // the version before destinations
        let refusal = v.verify(&version, TO, at(NOW)).unwrap_err();
        assert_eq!(refusal.to_string(), "protocol version 1, node speaks 2");
        assert_eq!(Refusal::from_reject(&refusal.to_reject(), 1), Some(refusal));
        let unknown = Request::new(TOKEN, "b", TO, at(NOW)).unwrap();
        assert_eq!(v.verify(&unknown.bytes, TO, at(NOW)), Err(Refusal::UnknownTenant));
        let old = Request::new(TOKEN, "a", TO, at(NOW - 31_000)).unwrap();
        assert_eq!(v.verify(&old.bytes, TO, at(NOW)), Err(Refusal::ClockSkew));
        let future = Request::new(TOKEN, "a", TO, at(NOW + 31_000)).unwrap();
        assert_eq!(v.verify(&future.bytes, TO, at(NOW)), Err(Refusal::ClockSkew));
        for r in [
            Refusal::Malformed,
            Refusal::UnknownTenant,
            Refusal::WrongToken,
            Refusal::ClockSkew,
            Refusal::Replayed,
            Refusal::Busy,
        ] {
            assert_eq!(Refusal::from_reject(&r.to_reject(), 1), Some(r));
        }
        assert_eq!(Refusal::from_reject(b"XX\x01\x04", 1), None);
        assert_eq!(Refusal::from_reject(b"RM\x01\x63", 1), None);
        assert_eq!(Refusal::from_reject(b"RM", 1), None);
        // No refusal was remembered against replay.
        assert!(v.replay_cache(0).is_empty() && v.replay_cache(1).is_empty());
    }

    #[test]
    fn garbage_truncated_and_oversized_data_is_malformed_and_never_panics() {
        let mut v = verifier();
        let good = Request::new(TOKEN, "a", TO, at(NOW)).unwrap().bytes;
        assert_eq!(v.verify(&[], TO, at(NOW)), Err(Refusal::Malformed));
        for n in 0..REQUEST_LEN {
            assert_eq!(v.verify(&good[..n], TO, at(NOW)), Err(Refusal::Malformed), "truncated to {n}");
        }
        // Padding with zeros (as the CM may do) is fine; anything else past the end is not.
        let mut padded = good.to_vec();
        padded.resize(196, 0);
        assert!(v.verify(&padded, TO, at(NOW)).is_ok());
        let mut oversized = Request::new(TOKEN, "a", TO, at(NOW)).unwrap().bytes.to_vec();
        oversized.extend_from_slice(&[1; 100]);
        assert_eq!(v.verify(&oversized, TO, at(NOW)), Err(Refusal::Malformed));
        // Every single-bit flip of a good request is refused, for some reason.
        let fresh = Request::new(TOKEN, "a", TO, at(NOW)).unwrap().bytes;
        for byte in 0..REQUEST_LEN {
            for bit in 0..8 {
                let mut bad = fresh;
                bad[byte] ^= 1 << bit;
                assert!(v.verify(&bad, TO, at(NOW)).is_err(), "bit {bit} of byte {byte} flipped was accepted");
            }
        }
        // Random garbage: many lengths, many fillings.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 200) as usize;
            let mut data: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            // Half of them pass the shape checks (a valid header and tenant), to reach the MAC.
            if x % 2 == 0 && len >= REQUEST_LEN {
                data[..8].copy_from_slice(&fresh[..8]);
                data[REQUEST_LEN..].fill(0);
            }
            assert!(v.verify(&data, TO, at(NOW)).is_err());
        }
        // The good one still passes after all that.
        assert!(v.verify(&fresh, TO, at(NOW)).is_ok());
    }

    #[test]
    fn the_replay_cache_forgets_only_requests_past_their_time_and_is_bounded() {
        let mut cache = ReplayCache::default();
        for i in 0..REPLAY_CAPACITY as u64 {
            let mut nonce = [0u8; 16];
            nonce[..8].copy_from_slice(&i.to_le_bytes());
            assert_eq!(cache.insert(nonce, NOW, NOW), Ok(true));
        }
        // Full of requests still within their time: refuse rather than forget.
        assert_eq!(cache.insert([0xff; 16], NOW, NOW + 1), Err(Refusal::Busy));
        // Once they are past it, they make room (a replay of one is refused for its clock).
        assert_eq!(cache.insert([0xff; 16], NOW + 40_000, NOW + 40_000), Ok(true));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.insert([0xff; 16], NOW + 40_000, NOW + 40_001), Ok(false));
    }

    #[test]
    fn tenants_must_have_tokens_and_distinct_tags() {
        assert!(Verifier::new(&[]).is_err());
        assert!(Verifier::new(&[("a", &b""[..])]).is_ok(), "the empty token of --insecure-no-token");
        assert!(Verifier::new(&[("a", &b"x"[..])]).unwrap_err().contains("at least 16"));
        assert!(Verifier::new(&[("a", &b"fifteen-bytes.."[..])]).unwrap_err().contains("at least 16"));
        assert!(Verifier::new(&[("a", TOKEN), ("a", DEFAULT)]).unwrap_err().contains("same tag"));
        let shown = format!("{:?}", verifier());
        assert!(
            !shown.contains("default-token") && !shown.contains("tenant-a-token"),
            "Debug printed a token: {shown}"
        );
    }

    #[test]
    fn the_clock_and_replay_boundaries_hold() {
        // A replay is refused as a replay up to the last instant its request passes the clock
        // check, and for its clock after that; never accepted.
        let mut v = verifier();
        let req = Request::new(TOKEN, "a", TO, at(NOW)).unwrap();
        assert!(v.verify(&req.bytes, TO, at(NOW)).is_ok());
        assert_eq!(v.verify(&req.bytes, TO, at(NOW + 30_000)), Err(Refusal::Replayed));
        assert_eq!(v.verify(&req.bytes, TO, at(NOW + 30_001)), Err(Refusal::ClockSkew));
        // The node's clock stepped back: it counts as the latest time seen, so the replay is
        // still refused for its clock.
        assert_eq!(v.verify(&req.bytes, TO, at(NOW)), Err(Refusal::ClockSkew));
        // A request exactly MAX_SKEW from the node's clock passes; one ms more does not.
        let mut v = verifier();
        assert!(v.verify(&Request::new(TOKEN, "a", TO, at(NOW - 30_000)).unwrap().bytes, TO, at(NOW)).is_ok());
        assert_eq!(
            v.verify(&Request::new(TOKEN, "a", TO, at(NOW - 30_001)).unwrap().bytes, TO, at(NOW)),
            Err(Refusal::ClockSkew)
        );
    }

    #[test]
    fn a_full_cache_keeps_nonces_until_their_time_is_over() {
        let mut cache = ReplayCache::default();
        for i in 0..REPLAY_CAPACITY as u64 {
            let mut nonce = [0u8; 16];
            nonce[..8].copy_from_slice(&i.to_le_bytes());
            cache.insert(nonce, NOW, NOW).unwrap();
        }
        assert_eq!(cache.insert([0xee; 16], NOW, NOW + 30_000), Err(Refusal::Busy));
        assert_eq!(cache.insert([0xee; 16], NOW + 30_001, NOW + 30_001), Ok(true));
    }

    #[test]
    fn one_tenant_filling_its_cache_does_not_refuse_another() {
        let mut v = verifier();
        for _ in 0..REPLAY_CAPACITY {
            v.verify(&Request::new(TOKEN, "a", TO, at(NOW)).unwrap().bytes, TO, at(NOW)).unwrap();
        }
        assert_eq!(v.verify(&Request::new(TOKEN, "a", TO, at(NOW)).unwrap().bytes, TO, at(NOW)), Err(Refusal::Busy));
        assert!(v.verify(&Request::new(DEFAULT, "default", TO, at(NOW)).unwrap().bytes, TO, at(NOW)).is_ok());
    }

    #[test]
    fn a_malformed_accept_is_refused() {
        let v = verifier();
        let req = Request::new(TOKEN, "a", TO, at(NOW)).unwrap();
        let good = Accept { node: 1, base: 2, size: 3, rkey: 4, page: 0 }.to_bytes(v.token(1), &req.nonce);
        for n in 0..ACCEPT_LEN {
            assert_eq!(req.check_accept(TOKEN, &good[..n]), Err(Refusal::Malformed), "truncated to {n}");
        }
        let mut magic = good;
        magic[0] = b'X';
        assert_eq!(req.check_accept(TOKEN, &magic), Err(Refusal::Malformed));
        let mut version = good;
        version[2] = 9;
        assert_eq!(req.check_accept(TOKEN, &version), Err(Refusal::Version { client: VERSION, node: 9 }));
        let mut trailing = good.to_vec();
        trailing.push(1);
        assert_eq!(req.check_accept(TOKEN, &trailing), Err(Refusal::Malformed));
        let mut padded = good.to_vec();
        padded.resize(196, 0);
        assert!(req.check_accept(TOKEN, &padded).is_ok());
    }

    #[test]
    fn control_requests_are_bound_to_their_operation_and_cannot_pass_for_connects() {
        let mut v = verifier();
        let now = SystemTime::now();
        let op = [1u8, 9, 0, 0, 0, 0, 0, 0, 0, 1];
        let control = Request::control(DEFAULT, "default", TO, now, &op).unwrap();
        assert!(v.verify_control(&control.bytes, TO, &op, now).is_ok());
        // The same bytes again: a replay, as for connect requests.
        assert_eq!(v.verify_control(&control.bytes, TO, &op, now), Err(Refusal::Replayed));
        // Another operation under the same MAC, or a control request sent as a connect request
        // (and the other way round): the MAC does not match.
        let fresh = Request::control(DEFAULT, "default", TO, now, &op).unwrap();
        assert_eq!(v.verify_control(&fresh.bytes, TO, &[2], now), Err(Refusal::WrongToken));
        assert_eq!(v.verify(&fresh.bytes, TO, now), Err(Refusal::WrongToken));
        let connect = Request::new(DEFAULT, "default", TO, now).unwrap();
        assert_eq!(v.verify_control(&connect.bytes, TO, &[], now), Err(Refusal::WrongToken));
        // Padding is a connect request's (RDMA-CM's) only: a control request is exact.
        let mut padded = fresh.bytes.to_vec();
        padded.push(0);
        assert_eq!(v.verify_control(&padded, TO, &op, now), Err(Refusal::Malformed));
        assert!(v.verify_control(&fresh.bytes, TO, &op, now).is_ok());
        assert!(check_token(b"").is_ok() && check_token(&[7; MIN_TOKEN]).is_ok());
        assert!(check_token(&[7; MIN_TOKEN - 1]).unwrap_err().contains("at least 16"));
    }
}
