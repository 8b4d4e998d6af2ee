//! An exact least-recently-used order over the frame slots `0..capacity` of one cache shard.
//!
//! The order is a doubly linked list threaded through two index arrays, `prev` and `next`, of
//! `capacity + 1` entries each. Entry `capacity` is the sentinel: `next[sentinel]` is the least
//! recent slot (the head) and `prev[sentinel]` the most recent (the tail); an empty list is the
//! sentinel linked to itself. A per-slot `linked` marker says which slots are on the list.
//!
//! # Invariant
//! - The list holds exactly the linked slots, least recent first, most recent at the tail:
//!   walking `next` from the sentinel visits each slot with `linked[slot]` once, then returns to
//!   the sentinel; `len == linked.iter().filter(|l| **l).count() <= capacity`.
//! - `prev` is the inverse of `next` on the list: `prev[next[i]] == i` for the sentinel and every
//!   linked slot. The links of an unlinked slot are stale and never read.
//!
//! # Cost
//! Every operation is O(1) and none allocates after [`Lru::new`], which takes
//! `9 * capacity + 8` heap bytes (two `u32` links and a `bool` per slot, plus the sentinel's links).
//! [`Lru::iter_least_to_most`] is O(len).
//!
//! # Thread safety
//! None inside: a shard owns one `Lru` and only touches it under the shard's mutex.
//!
//! # Misuse
//! Linking a slot twice, touching or removing a slot that is not linked, or naming a slot out of
//! range is a bug in the cache, not bad input, so it panics with a message naming the slot.

/// An exact least-recently-used order over frame slots `0..capacity`.
///
/// ```
/// use rdmem_cache::lru::Lru;
///
/// let mut lru = Lru::new(4);
/// lru.push_most_recent(0);
/// lru.push_most_recent(1);
/// lru.touch(0); // [1, 0]
/// assert_eq!(lru.pop_least_recent(), Some(1));
/// assert_eq!(lru.iter_least_to_most().collect::<Vec<_>>(), [0]);
/// ```
#[derive(Clone)]
pub struct Lru {
    /// `prev[i]`: the slot before `i` (towards least recent), or the sentinel.
    prev: Vec<u32>,
    /// `next[i]`: the slot after `i` (towards most recent), or the sentinel.
    next: Vec<u32>,
    /// `linked[slot]`: the slot is on the list.
    linked: Vec<bool>,
    /// How many slots are linked.
    len: usize,
}

impl Lru {
    /// An empty order over the slots `0..capacity`: no slot is linked yet.
    ///
    /// # Panics
    /// If `capacity` does not fit a `u32` link (more than `u32::MAX` slots).
    pub fn new(capacity: usize) -> Lru {
        let sentinel =
            u32::try_from(capacity).unwrap_or_else(|_| panic!("Lru::new: capacity {capacity} exceeds u32::MAX slots"));
        Lru {
            prev: vec![sentinel; capacity + 1],
            next: vec![sentinel; capacity + 1],
            linked: vec![false; capacity],
            len: 0,
        }
    }

    /// How many slots the order ranges over: slots are `0..capacity()`.
    pub fn capacity(&self) -> usize {
        self.linked.len()
    }

    /// How many slots are linked.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no slot is linked.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `slot` is linked (`false` for a slot out of range).
    pub fn contains(&self, slot: usize) -> bool {
        self.linked.get(slot).copied().unwrap_or(false)
    }

    /// Links `slot`, which is not linked, as the most recent.
    ///
    /// # Panics
    /// If `slot` is out of range or already linked.
    pub fn push_most_recent(&mut self, slot: usize) {
        let capacity = self.capacity();
        assert!(slot < capacity, "Lru::push_most_recent: slot {slot} is out of range (capacity {capacity})");
        assert!(!self.linked[slot], "Lru::push_most_recent: slot {slot} is already linked");
        self.link_tail(slot);
    }

    /// Moves the linked `slot` to most recent.
    ///
    /// # Panics
    /// If `slot` is not linked.
    pub fn touch(&mut self, slot: usize) {
        self.expect_linked(slot, "touch");
        // Touching the most recent slot again, the common case for a hot page, changes nothing.
        if self.prev[self.sentinel()] as usize != slot {
            self.unlink(slot);
            self.link_tail(slot);
        }
    }

    /// Unlinks the linked `slot`.
    ///
    /// # Panics
    /// If `slot` is not linked.
    pub fn remove(&mut self, slot: usize) {
        self.expect_linked(slot, "remove");
        self.unlink(slot);
    }

    /// The least recent slot, if any, left linked.
    pub fn least_recent(&self) -> Option<usize> {
        let head = self.next[self.sentinel()] as usize;
        (head != self.sentinel()).then_some(head)
    }

    /// Unlinks and returns the least recent slot, if any.
    pub fn pop_least_recent(&mut self) -> Option<usize> {
        let slot = self.least_recent()?;
        self.unlink(slot);
        Some(slot)
    }

    /// The linked slots from least to most recent (for tests and debugging).
    pub fn iter_least_to_most(&self) -> impl Iterator<Item = usize> + '_ {
        let sentinel = self.sentinel();
        let mut cursor = self.next[sentinel] as usize;
        std::iter::from_fn(move || {
            if cursor == sentinel {
                return None;
            }
            let slot = cursor;
            cursor = self.next[slot] as usize;
            Some(slot)
        })
    }

    /// Index of the sentinel entry in `prev` and `next`.
    fn sentinel(&self) -> usize {
        self.linked.len()
    }

    /// Panics unless `slot` is linked, naming the operation `op`.
    fn expect_linked(&self, slot: usize, op: &str) {
        let capacity = self.capacity();
        assert!(slot < capacity, "Lru::{op}: slot {slot} is out of range (capacity {capacity})");
        assert!(self.linked[slot], "Lru::{op}: slot {slot} is not linked");
    }

    /// Links the unlinked, in-range `slot` between the tail and the sentinel.
    fn link_tail(&mut self, slot: usize) {
        let sentinel = self.sentinel();
        let tail = self.prev[sentinel] as usize;
        // Slots and the sentinel are at most `capacity`, which `new` checked fits a u32.
        self.prev[slot] = tail as u32;
        self.next[slot] = sentinel as u32;
        self.next[tail] = slot as u32;
        self.prev[sentinel] = slot as u32;
        self.linked[slot] = true;
        self.len += 1;
    }

    /// Unlinks the linked `slot`, joining its neighbours.
    fn unlink(&mut self, slot: usize) {
        let (before, after) = (self.prev[slot], self.next[slot]);
        self.next[before as usize] = after;
        self.prev[after as usize] = before;
        self.linked[slot] = false;
        self.len -= 1;
    }
}

/// Shows the order, least recent first: `[2, 0, 1]`.
impl std::fmt::Debug for Lru {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter_least_to_most()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::Lru;
    use proptest::prelude::*;

    /// The order, least recent first.
    fn order(lru: &Lru) -> Vec<usize> {
        lru.iter_least_to_most().collect()
    }

    /// Checks the module's invariant on the raw links, and that `order` is what they hold.
    fn check(lru: &Lru, expected: &[usize]) {
        let sentinel = lru.capacity();
        assert_eq!(order(lru), expected);
        assert_eq!(lru.len(), expected.len());
        assert_eq!(lru.is_empty(), expected.is_empty());
        assert_eq!(lru.least_recent(), expected.first().copied());
        for slot in 0..lru.capacity() {
            assert_eq!(lru.contains(slot), expected.contains(&slot), "contains({slot})");
        }
        assert!(!lru.contains(sentinel), "a slot out of range is never contained");
        // prev is the inverse of next on the sentinel and every linked slot.
        let mut walk = vec![sentinel];
        walk.extend(expected);
        for (i, &at) in walk.iter().enumerate() {
            let after = walk[(i + 1) % walk.len()];
            assert_eq!(lru.next[at] as usize, after, "next[{at}]");
            assert_eq!(lru.prev[after] as usize, at, "prev[{after}]");
        }
        assert_eq!(lru.linked.iter().filter(|l| **l).count(), lru.len());
    }

    #[test]
    fn order_step_by_step() {
        let mut lru = Lru::new(4);
        check(&lru, &[]);
        lru.push_most_recent(0);
        check(&lru, &[0]); // [0] <- MRU
        lru.push_most_recent(1);
        check(&lru, &[0, 1]); // [0, 1] <- MRU
        lru.push_most_recent(2);
        check(&lru, &[0, 1, 2]); // [0, 1, 2] <- MRU
        lru.touch(0);
        check(&lru, &[1, 2, 0]); // [1, 2, 0] <- MRU
        assert_eq!(lru.pop_least_recent(), Some(1));
        check(&lru, &[2, 0]); // [2, 0] <- MRU
        lru.remove(0);
        check(&lru, &[2]); // [2] <- MRU
        lru.push_most_recent(3);
        check(&lru, &[2, 3]); // [2, 3] <- MRU
        lru.push_most_recent(1);
        check(&lru, &[2, 3, 1]); // [2, 3, 1] <- MRU
        lru.push_most_recent(0);
        check(&lru, &[2, 3, 1, 0]); // [2, 3, 1, 0] <- MRU: full
        assert_eq!(lru.pop_least_recent(), Some(2));
        check(&lru, &[3, 1, 0]); // [3, 1, 0] <- MRU
        assert_eq!(lru.pop_least_recent(), Some(3));
        check(&lru, &[1, 0]); // [1, 0] <- MRU
        assert_eq!(lru.pop_least_recent(), Some(1));
        check(&lru, &[0]); // [0] <- MRU
        assert_eq!(lru.pop_least_recent(), Some(0));
        check(&lru, &[]); // []
        assert_eq!(lru.pop_least_recent(), None);
        check(&lru, &[]); // []
    }

    #[test]
    fn touch_moves_head_middle_and_tail() {
        let mut lru = Lru::new(4);
        for slot in 0..4 {
            lru.push_most_recent(slot);
        }
        check(&lru, &[0, 1, 2, 3]); // [0, 1, 2, 3] <- MRU
        lru.touch(3);
        check(&lru, &[0, 1, 2, 3]); // [0, 1, 2, 3] <- MRU: the tail stays
        lru.touch(1);
        check(&lru, &[0, 2, 3, 1]); // [0, 2, 3, 1] <- MRU: from the middle
        lru.touch(0);
        check(&lru, &[2, 3, 1, 0]); // [2, 3, 1, 0] <- MRU: from the head
        lru.touch(3);
        check(&lru, &[2, 1, 0, 3]); // [2, 1, 0, 3] <- MRU
    }

    #[test]
    fn remove_head_middle_and_tail() {
        let mut lru = Lru::new(5);
        for slot in [4, 2, 0, 3, 1] {
            lru.push_most_recent(slot);
        }
        check(&lru, &[4, 2, 0, 3, 1]); // [4, 2, 0, 3, 1] <- MRU
        lru.remove(0);
        check(&lru, &[4, 2, 3, 1]); // [4, 2, 3, 1] <- MRU: from the middle
        lru.remove(4);
        check(&lru, &[2, 3, 1]); // [2, 3, 1] <- MRU: the head
        lru.remove(1);
        check(&lru, &[2, 3]); // [2, 3] <- MRU: the tail
        lru.push_most_recent(0);
        check(&lru, &[2, 3, 0]); // [2, 3, 0] <- MRU: a removed slot links again
        lru.remove(3);
        lru.remove(2);
        lru.remove(0);
        check(&lru, &[]); // []
    }

    #[test]
    fn capacity_zero() {
        let mut lru = Lru::new(0);
        assert_eq!(lru.capacity(), 0);
        check(&lru, &[]);
        assert!(!lru.contains(0));
        assert_eq!(lru.pop_least_recent(), None);
        check(&lru, &[]);
    }

    #[test]
    #[should_panic(expected = "Lru::push_most_recent: slot 0 is out of range (capacity 0)")]
    fn capacity_zero_push_panics() {
        Lru::new(0).push_most_recent(0);
    }

    #[test]
    fn capacity_one() {
        let mut lru = Lru::new(1);
        assert_eq!(lru.capacity(), 1);
        check(&lru, &[]);
        lru.push_most_recent(0);
        check(&lru, &[0]); // [0] <- MRU
        lru.touch(0);
        check(&lru, &[0]); // [0] <- MRU
        assert_eq!(lru.pop_least_recent(), Some(0));
        check(&lru, &[]); // []
        assert_eq!(lru.pop_least_recent(), None);
        lru.push_most_recent(0);
        check(&lru, &[0]); // [0] <- MRU
        lru.remove(0);
        check(&lru, &[]); // []
    }

    #[test]
    fn debug_shows_the_order() {
        let mut lru = Lru::new(3);
        lru.push_most_recent(2);
        lru.push_most_recent(0);
        lru.push_most_recent(1);
        lru.touch(2);
        assert_eq!(format!("{lru:?}"), "[0, 1, 2]");
    }

    #[test]
    #[should_panic(expected = "Lru::push_most_recent: slot 1 is already linked")]
    fn push_linked_panics() {
        let mut lru = Lru::new(2);
        lru.push_most_recent(1);
        lru.push_most_recent(1);
    }

    #[test]
    #[should_panic(expected = "Lru::push_most_recent: slot 2 is out of range (capacity 2)")]
    fn push_out_of_range_panics() {
        Lru::new(2).push_most_recent(2);
    }

    #[test]
    #[should_panic(expected = "Lru::touch: slot 0 is not linked")]
    fn touch_unlinked_panics() {
        let mut lru = Lru::new(2);
        lru.push_most_recent(1);
        lru.touch(0);
    }

    #[test]
    #[should_panic(expected = "Lru::touch: slot 5 is out of range (capacity 2)")]
    fn touch_out_of_range_panics() {
        Lru::new(2).touch(5);
    }

    #[test]
    #[should_panic(expected = "Lru::remove: slot 0 is not linked")]
    fn remove_unlinked_panics() {
        let mut lru = Lru::new(2);
        lru.push_most_recent(0);
        lru.remove(0);
        lru.remove(0);
    }

    #[test]
    #[should_panic(expected = "Lru::remove: slot 2 is out of range (capacity 2)")]
    fn remove_out_of_range_panics() {
        Lru::new(2).remove(2);
    }

    /// One step of a random sequence. `pick` chooses among the slots the step applies to (the
    /// unlinked ones for a push, the linked ones for touch and remove), so every step is valid.
    #[derive(Clone, Copy, Debug)]
    enum Op {
        Push { pick: usize },
        Touch { pick: usize },
        Remove { pick: usize },
        Pop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => any::<usize>().prop_map(|pick| Op::Push { pick }),
            3 => any::<usize>().prop_map(|pick| Op::Touch { pick }),
            1 => any::<usize>().prop_map(|pick| Op::Remove { pick }),
            1 => Just(Op::Pop),
        ]
    }

    const CAPACITY: usize = 8;

    proptest! {
        /// The order matches a Vec kept least recent first after every step.
        #[test]
        fn matches_vec_model(ops in prop::collection::vec(op(), 0..200)) {
            let mut lru = Lru::new(CAPACITY);
            let mut model: Vec<usize> = Vec::new();
            for op in ops {
                match op {
                    Op::Push { pick } => {
                        let unlinked: Vec<usize> = (0..CAPACITY).filter(|s| !model.contains(s)).collect();
                        if let Some(&slot) = unlinked.get(pick % unlinked.len().max(1)) {
                            lru.push_most_recent(slot);
                            model.push(slot);
                        }
                    }
                    Op::Touch { pick } => {
                        if !model.is_empty() {
                            let slot = model[pick % model.len()];
                            lru.touch(slot);
                            model.retain(|&s| s != slot);
                            model.push(slot);
                        }
                    }
                    Op::Remove { pick } => {
                        if !model.is_empty() {
                            let slot = model.remove(pick % model.len());
                            lru.remove(slot);
                        }
                    }
                    Op::Pop => {
                        let expected = (!model.is_empty()).then(|| model.remove(0));
                        prop_assert_eq!(lru.pop_least_recent(), expected);
                    }
                }
                prop_assert_eq!(order(&lru), model.clone());
                prop_assert_eq!(lru.len(), model.len());
                check(&lru, &model);
            }
        }
    }
}
