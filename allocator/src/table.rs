//! [`ChunkTable`]: a thread arena's chunks by index, found by arithmetic on the index instead of
//! a hash lookup (the allocator's fast path does one per `free`).

use std::ops::Index;

/// Chunks per leaf of the index: 512 (a leaf is 2 KiB).
const LEAF_BITS: u32 = 9;
const LEAF: usize = 1 << LEAF_BITS;

/// A map from chunk index to `V`: a two-level table (the index's high bits pick a leaf, its
/// low bits a slot in it) naming an entry of a dense slab. Leaves exist only where the arena
/// holds chunks; the top level grows to the highest leaf used (8 bytes per 512 chunks).
pub(crate) struct ChunkTable<V> {
    leaves: Vec<Option<Box<[u32; LEAF]>>>,
    /// The entries, with their chunk; a leaf slot holds an entry's position + 1 (0: none).
    slab: Vec<Option<(u64, V)>>,
    vacant: Vec<u32>,
}

impl<V> Default for ChunkTable<V> {
    fn default() -> Self {
        ChunkTable { leaves: Vec::new(), slab: Vec::new(), vacant: Vec::new() }
    }
}

impl<V> ChunkTable<V> {
    #[inline]
    fn position(&self, chunk: u64) -> Option<usize> {
        let leaf = self.leaves.get((chunk >> LEAF_BITS) as usize)?.as_ref()?;
        match leaf[chunk as usize & (LEAF - 1)] {
            0 => None,
            p => Some(p as usize - 1),
        }
    }

    /// The entry of `chunk`.
    #[inline]
    pub(crate) fn get(&self, chunk: u64) -> Option<&V> {
        let p = self.position(chunk)?;
        self.slab[p].as_ref().map(|(_, v)| v)
    }

    /// The entry of `chunk`, to change.
    #[inline]
    pub(crate) fn get_mut(&mut self, chunk: u64) -> Option<&mut V> {
        let p = self.position(chunk)?;
        self.slab[p].as_mut().map(|(_, v)| v)
    }

    /// Sets `chunk`'s entry; the one it replaces.
    pub(crate) fn insert(&mut self, chunk: u64, value: V) -> Option<V> {
        if let Some(p) = self.position(chunk) {
            return self.slab[p].replace((chunk, value)).map(|(_, v)| v);
        }
        let p = match self.vacant.pop() {
            Some(p) => {
                self.slab[p as usize] = Some((chunk, value));
                p
            }
            None => {
                self.slab.push(Some((chunk, value)));
                u32::try_from(self.slab.len() - 1).expect("fewer than 2^32 chunks per arena")
            }
        };
        let top = (chunk >> LEAF_BITS) as usize;
        if self.leaves.len() <= top {
            self.leaves.resize_with(top + 1, || None);
        }
        self.leaves[top].get_or_insert_with(|| Box::new([0; LEAF]))[chunk as usize & (LEAF - 1)] = p + 1;
        None
    }

    /// Takes `chunk`'s entry out.
    pub(crate) fn remove(&mut self, chunk: u64) -> Option<V> {
        let p = self.position(chunk)?;
        if let Some(leaf) = self.leaves[(chunk >> LEAF_BITS) as usize].as_mut() {
            leaf[chunk as usize & (LEAF - 1)] = 0;
        }
        self.vacant.push(p as u32);
        self.slab[p].take().map(|(_, v)| v)
    }

    /// The chunks, in no particular order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter().map(|(chunk, _)| chunk)
    }

    /// The chunks and their entries, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &V)> + '_ {
        self.slab.iter().filter_map(|e| e.as_ref().map(|(chunk, v)| (*chunk, v)))
    }

    /// Takes every entry out.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (u64, V)> + '_ {
        self.leaves.clear();
        self.vacant.clear();
        self.slab.drain(..).flatten()
    }
}

impl<V> Index<u64> for ChunkTable<V> {
    type Output = V;

    fn index(&self, chunk: u64) -> &V {
        self.get(chunk).expect("a chunk of this table")
    }
}

#[cfg(test)]
mod tests {
    use super::ChunkTable;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// The same answers as a HashMap, for any sequence of inserts and removes.
        #[test]
        fn behaves_as_a_map(steps in proptest::collection::vec((any::<bool>(), 0u64..5000), 1..300)) {
            let (mut table, mut model) = (ChunkTable::default(), HashMap::new());
            for (k, (insert, chunk)) in steps.into_iter().enumerate() {
                if insert {
                    prop_assert_eq!(table.insert(chunk, k), model.insert(chunk, k));
                } else {
                    prop_assert_eq!(table.remove(chunk), model.remove(&chunk));
                }
                prop_assert_eq!(table.get(chunk), model.get(&chunk));
            }
            let mut keys: Vec<u64> = table.keys().collect();
            keys.sort_unstable();
            let mut expected: Vec<u64> = model.keys().copied().collect();
            expected.sort_unstable();
            prop_assert_eq!(keys, expected);
            let mut drained: Vec<(u64, usize)> = table.drain().collect();
            drained.sort_unstable();
            let mut all: Vec<(u64, usize)> = model.into_iter().collect();
            all.sort_unstable();
            prop_assert_eq!(drained, all);
            prop_assert_eq!(table.keys().count(), 0);
        }
    }
}
