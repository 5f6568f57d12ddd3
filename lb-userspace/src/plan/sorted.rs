//! Sets and maps of a few elements, kept sorted in one `Vec`.
//!
//! The planner keeps, per service id, what the maps hold for it (`Held`:
//! frontends, tables, source ranges, backends): 1 to ~10 elements each. A
//! std `BTreeSet`/`BTreeMap` allocates a whole node of 11 slots for its
//! first element (~100 to ~330 bytes here), which at 10,000 services was
//! ~4 MB of the agent's memory for a few bytes of content. At these sizes a
//! binary search in a Vec is as fast as a tree. No crate we use has this
//! (smallvec has no set semantics), and it is a few lines.

/// A set: sorted, each element once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SortedSet<T>(Vec<T>);

impl<T> Default for SortedSet<T> {
    fn default() -> Self {
        SortedSet(Vec::new())
    }
}

impl<T: Ord> SortedSet<T> {
    /// True if `t` was not there.
    pub fn insert(&mut self, t: T) -> bool {
        match self.0.binary_search(&t) {
            Ok(_) => false,
            Err(i) => {
                self.0.insert(i, t);
                true
            }
        }
    }

    /// True if `t` was there.
    pub fn remove(&mut self, t: &T) -> bool {
        match self.0.binary_search(t) {
            Ok(i) => {
                self.0.remove(i);
                shrink(&mut self.0);
                true
            }
            Err(_) => false,
        }
    }

    pub fn contains(&self, t: &T) -> bool {
        self.0.binary_search(t).is_ok()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A set or map that shrank a lot gives its memory back.
fn shrink<T>(v: &mut Vec<T>) {
    if v.capacity() > 2 * v.len() + 4 {
        v.shrink_to_fit();
    }
}

impl<'a, T> IntoIterator for &'a SortedSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A map: sorted by key, each key once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SortedMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for SortedMap<K, V> {
    fn default() -> Self {
        SortedMap(Vec::new())
    }
}

impl<K: Ord, V> SortedMap<K, V> {
    fn find(&self, k: &K) -> Result<usize, usize> {
        self.0.binary_search_by(|(key, _)| key.cmp(k))
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        self.find(k).ok().map(|i| &self.0[i].1)
    }

    /// The value `k` had, if any.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        match self.find(&k) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, v)),
            Err(i) => {
                self.0.insert(i, (k, v));
                None
            }
        }
    }

    pub fn remove(&mut self, k: &K) -> Option<V> {
        let i = self.find(k).ok()?;
        let (_, v) = self.0.remove(i);
        shrink(&mut self.0);
        Some(v)
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// The same operations on these and on std's trees give the same
    /// contents, in the same order.
    #[test]
    fn sorted_set_and_map_behave_like_btree_ones() {
        let mut set = SortedSet::default();
        let mut tree = BTreeSet::new();
        let mut map = SortedMap::default();
        let mut tree_map = BTreeMap::new();
        // A fixed pseudo-random walk of inserts and removes over 0..40.
        let mut x: u32 = 12345;
        for step in 0..5000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let k = (x >> 16) % 40;
            if x & 1 == 0 {
                assert_eq!(set.insert(k), tree.insert(k));
                assert_eq!(map.insert(k, step), tree_map.insert(k, step));
            } else {
                assert_eq!(set.remove(&k), tree.remove(&k));
                assert_eq!(map.remove(&k), tree_map.remove(&k));
            }
            assert_eq!(set.contains(&k), tree.contains(&k));
            assert_eq!(map.get(&k), tree_map.get(&k));
            assert!(set.iter().eq(tree.iter()));
            assert!(map.keys().eq(tree_map.keys()));
            assert_eq!(set.is_empty(), tree.is_empty());
            assert_eq!(map.is_empty(), tree_map.is_empty());
        }
    }
}
