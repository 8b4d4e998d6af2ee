//! Global addresses: which memory node, and where in its pool.
//!
//! A [`GlobalAddr`] packs a 16-bit [`NodeId`] and a 48-bit byte offset into one `u64`:
//! `raw == (node << 48) | offset`, with `offset < 2^48` (256 TiB per node). Offset 0 of every
//! pool holds the pool header, so no allocation is ever at offset 0 and the all-zero address
//! (node 0, offset 0) doubles as [`GlobalAddr::NULL`] in typed pointers. The transport itself
//! accepts any in-range address, the header included.

use std::fmt;
use std::marker::PhantomData;

/// The identity of a memory node in a cluster: its pool's tag in every [`GlobalAddr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub u16);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}", self.0)
    }
}

/// A byte address in the cluster's memory: node id in the top 16 bits, offset in the low 48.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GlobalAddr(u64);

impl GlobalAddr {
    /// Bits of the offset part.
    pub const OFFSET_BITS: u32 = 48;
    /// The largest offset plus one: 2^48 bytes (256 TiB) per node.
    pub const OFFSET_LIMIT: u64 = 1 << Self::OFFSET_BITS;
    /// Node 0, offset 0: the null address of typed pointers (it is node 0's pool header).
    pub const NULL: GlobalAddr = GlobalAddr(0);

    /// The address of byte `offset` of `node`'s pool, or `None` when `offset >= 2^48`.
    pub const fn new(node: NodeId, offset: u64) -> Option<Self> {
        if offset >= Self::OFFSET_LIMIT {
            return None;
        }
        Some(GlobalAddr(((node.0 as u64) << Self::OFFSET_BITS) | offset))
    }

    /// Rebuilds an address from [`GlobalAddr::to_raw`].
    pub const fn from_raw(raw: u64) -> Self {
        GlobalAddr(raw)
    }

    /// The packed 64-bit form, e.g. to store the address in remote memory.
    pub const fn to_raw(self) -> u64 {
        self.0
    }

    /// The memory node.
    pub const fn node(self) -> NodeId {
        NodeId((self.0 >> Self::OFFSET_BITS) as u16)
    }

    /// The byte offset in the node's pool.
    pub const fn offset(self) -> u64 {
        self.0 & (Self::OFFSET_LIMIT - 1)
    }

    /// True for [`GlobalAddr::NULL`].
    pub const fn is_null(self) -> bool {
        self.0 == 0
    }

    /// The address `bytes` further on the same node, or `None` past the 48-bit offset range.
    pub const fn checked_add(self, bytes: u64) -> Option<Self> {
        match self.offset().checked_add(bytes) {
            Some(offset) => Self::new(self.node(), offset),
            None => None,
        }
    }

    /// True when the offset is a multiple of `align` (a power of two).
    pub const fn is_aligned(self, align: u64) -> bool {
        self.offset() & (align - 1) == 0
    }
}

impl fmt::Debug for GlobalAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{:#x}", self.node().0, self.offset())
    }
}

impl fmt::Display for GlobalAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A typed [`GlobalAddr`]: where a `T` lives in remote memory. It is only an address; reading
/// and writing go through an endpoint. Null is [`RemotePtr::null`].
pub struct RemotePtr<T> {
    addr: GlobalAddr,
    _type: PhantomData<fn() -> T>,
}

impl<T> RemotePtr<T> {
    /// A pointer to the `T` at `addr`.
    pub const fn new(addr: GlobalAddr) -> Self {
        Self { addr, _type: PhantomData }
    }

    /// The null pointer.
    pub const fn null() -> Self {
        Self::new(GlobalAddr::NULL)
    }

    /// The untyped address.
    pub const fn addr(self) -> GlobalAddr {
        self.addr
    }

    /// True for the null pointer.
    pub const fn is_null(self) -> bool {
        self.addr.is_null()
    }

    /// The pointer to element `index` of an array of `T` starting here, or `None` past the
    /// offset range.
    pub fn element(self, index: u64) -> Option<Self> {
        let bytes = index.checked_mul(std::mem::size_of::<T>() as u64)?;
        Some(Self::new(self.addr.checked_add(bytes)?))
    }
}

// Manual impls: a pointer is Copy whatever T is (derive would require T: Copy).
impl<T> Clone for RemotePtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for RemotePtr<T> {}
impl<T> PartialEq for RemotePtr<T> {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr
    }
}
impl<T> Eq for RemotePtr<T> {}
impl<T> fmt::Debug for RemotePtr<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemotePtr<{}>({})", std::any::type_name::<T>(), self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn packs_and_unpacks(node: u16, offset in 0..GlobalAddr::OFFSET_LIMIT) {
            let addr = GlobalAddr::new(NodeId(node), offset).unwrap();
            prop_assert_eq!(addr.node(), NodeId(node));
            prop_assert_eq!(addr.offset(), offset);
            prop_assert_eq!(GlobalAddr::from_raw(addr.to_raw()), addr);
        }

        #[test]
        fn rejects_offsets_past_48_bits(node: u16, offset in GlobalAddr::OFFSET_LIMIT..) {
            prop_assert!(GlobalAddr::new(NodeId(node), offset).is_none());
        }

        #[test]
        fn add_never_changes_node(node: u16, offset in 0..GlobalAddr::OFFSET_LIMIT, bytes: u64) {
            let addr = GlobalAddr::new(NodeId(node), offset).unwrap();
            match addr.checked_add(bytes) {
                Some(next) => {
                    prop_assert_eq!(next.node(), addr.node());
                    prop_assert_eq!(next.offset(), offset + bytes);
                }
                None => prop_assert!(offset.checked_add(bytes).is_none_or(|o| o >= GlobalAddr::OFFSET_LIMIT)),
            }
        }
    }

    #[test]
    fn null_is_node_zero_offset_zero() {
        assert!(GlobalAddr::NULL.is_null());
        assert_eq!(GlobalAddr::new(NodeId(0), 0), Some(GlobalAddr::NULL));
        assert!(!GlobalAddr::new(NodeId(1), 0).unwrap().is_null());
        assert!(RemotePtr::<u64>::null().is_null());
    }

    #[test]
    fn element_steps_by_the_size_of_t() {
        let base = RemotePtr::<[u8; 24]>::new(GlobalAddr::new(NodeId(3), 4096).unwrap());
        assert_eq!(base.element(2).unwrap().addr(), GlobalAddr::new(NodeId(3), 4096 + 48).unwrap());
        assert!(base.element(u64::MAX).is_none());
    }
}
