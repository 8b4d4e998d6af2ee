//! Named roots: a small table in each pool's header where a program publishes the address of a
//! shared structure under a name, so that other clients (other processes, on other machines)
//! can find it. The DSM finds its control block this way; any program can do the same.
//!
//! ```
//! use std::sync::Arc;
//! use rdmem_allocator::{Allocator, AllocatorOptions};
//! use rdmem_core::{LoopbackTransport, NodeId};
//!
//! let transport = Arc::new(LoopbackTransport::new(&[16 << 20]));
//! let alloc = Allocator::new(transport, AllocatorOptions::default())?.thread()?;
//! let root = alloc.root(NodeId(0), "my-app/index")?;
//! let index = alloc.alloc_zeroed(std::alloc::Layout::from_size_align(4096, 8).unwrap())?;
//! alloc.with_endpoint(|ep| -> rdmem_allocator::Result<()> {
//!     // Publish only if nobody did: compare-and-swap from "empty".
//!     match root.compare_exchange(ep, None, Some(index))? {
//!         Ok(()) => println!("published {index}"),
//!         Err(theirs) => println!("someone published {theirs:?} first"),
//!     }
//!     assert_eq!(root.get(ep)?, Some(index));
//!     Ok(())
//! })?;
//! # Ok::<(), rdmem_allocator::AllocError>(())
//! ```
//!
//! # Format
//! [`layout::ROOTS`] holds [`layout::ROOT_SLOTS`] slots of two words: the name's 64-bit hash
//! (FNV-1a, never 0; 0 marks a free slot) and the value (a raw [`GlobalAddr`], 0 = nothing
//! published). A name takes a slot by CAS of its key from 0, probing linearly from its hash;
//! a slot once taken stays with its name for the pool's life. Two names with the same 64-bit
//! hash would share a root: pick names that say whose they are (`"rdmem-dsm/control"`).

use rdmem_core::{Endpoint, GlobalAddr, NodeId};

use crate::error::{AllocError, Result};
use crate::layout;

/// A named root on one node: read it with [`Root::get`], change it with
/// [`Root::compare_exchange`]. It holds the name and the slot's address; share it between
/// threads, or open it again (opening a name that has its slot costs one READ).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    name: String,
    value: GlobalAddr,
}

/// The key of `name` in the root table: FNV-1a, with 0 (free slot) mapped away.
fn key(name: &str) -> u64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    hash.max(1)
}

impl Root {
    /// Finds (or, with `claim`, takes) the slot of `name` in `node`'s root table, through `ep`;
    /// `None` when the name has no slot and `claim` is false.
    pub(crate) fn open<E: Endpoint>(ep: &mut E, node: NodeId, name: &str, claim: bool) -> Result<Option<Root>> {
        if name.is_empty() {
            return Err(AllocError::BadRoot { name: name.into(), reason: "a root needs a nonempty name".into() });
        }
        let key = key(name);
        let slot_at = |i: u64| {
            GlobalAddr::new(
                node,
                layout::ROOTS + ((key % layout::ROOT_SLOTS + i) % layout::ROOT_SLOTS) * layout::ROOT_SLOT_BYTES,
            )
            .expect("inside the header")
        };
        for i in 0..layout::ROOT_SLOTS {
            let slot = slot_at(i);
            let mut found = ep.read_u64(slot)?;
            if found == 0 && !claim {
                return Ok(None); // names take slots in probe order: it would be here
            }
            if found == 0 {
                found = match ep.cas(slot, 0, key)? {
                    0 => key,
                    theirs => theirs,
                };
            }
            if found == key {
                let value = slot.checked_add(8).expect("inside the header");
                return Ok(Some(Root { name: name.into(), value }));
            }
        }
        if !claim {
            return Ok(None);
        }
        Err(AllocError::BadRoot {
            name: name.into(),
            reason: format!("the root table of {node} is full ({} names)", layout::ROOT_SLOTS),
        })
    }

    /// The root's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The word that holds the root's value (a raw [`GlobalAddr`], 0 when empty).
    pub fn word(&self) -> GlobalAddr {
        self.value
    }

    /// What is published under the name, if anything (one READ).
    pub fn get<E: Endpoint>(&self, ep: &mut E) -> Result<Option<GlobalAddr>> {
        Ok(decode(ep.read_u64(self.value)?))
    }

    /// Publishes `new` (or clears the root, with `None`) if the root holds `current` now, as
    /// one compare-and-swap: `Ok(Ok(()))` when it did, `Ok(Err(what_it_holds))` when another
    /// value was there. The address 0 of node 0 cannot be published: it stands for "empty", so
    /// `Some` of it as `current` means the same as `None`.
    pub fn compare_exchange<E: Endpoint>(
        &self,
        ep: &mut E,
        current: Option<GlobalAddr>,
        new: Option<GlobalAddr>,
    ) -> Result<std::result::Result<(), Option<GlobalAddr>>> {
        if new.is_some_and(|a| a.to_raw() == 0) {
            return Err(AllocError::BadRoot {
                name: self.name.clone(),
                reason: "the address 0 of node 0 stands for 'empty' and cannot be published".into(),
            });
        }
        let expected = encode(current);
        let old = ep.cas(self.value, expected, encode(new))?;
        Ok(if old == expected { Ok(()) } else { Err(decode(old)) })
    }
}

fn encode(addr: Option<GlobalAddr>) -> u64 {
    addr.map_or(0, GlobalAddr::to_raw)
}

fn decode(raw: u64) -> Option<GlobalAddr> {
    (raw != 0).then(|| GlobalAddr::from_raw(raw))
}
