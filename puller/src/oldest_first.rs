//! A map that holds at most `MAX` entries and lets its oldest go first: what
//! the daemon keeps around for readers that may come back (files opened
//! ahead, mappings of big files being read), without anyone having to say
//! when they are done.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// At most `MAX` values by key, oldest dropped first. `order` holds exactly
/// the keys of `values`, in the order they were first kept.
pub(crate) struct OldestFirst<K, V, const MAX: usize> {
    values: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K, V, const MAX: usize> Default for OldestFirst<K, V, MAX> {
    fn default() -> Self {
        OldestFirst {
            values: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<K: Eq + Hash + Clone, V, const MAX: usize> OldestFirst<K, V, MAX> {
    /// Keeps `value` under `key` (a key kept already keeps its place in the
    /// order); gives back the oldest value if this went over `MAX`, for the
    /// caller to drop where that is cheap (outside a lock).
    pub fn keep(&mut self, key: K, value: V) -> Option<V> {
        if self.values.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        if self.order.len() <= MAX {
            return None;
        }
        let oldest = self.order.pop_front()?;
        self.values.remove(&oldest)
    }

    /// The value under `key`, if kept; no longer kept then.
    pub fn take(&mut self, key: &K) -> Option<V> {
        let value = self.values.remove(key)?;
        // At most MAX entries; usually found near the front.
        if let Some(at) = self.order.iter().position(|k| k == key) {
            self.order.remove(at);
        }
        Some(value)
    }

    #[cfg(test)]
    pub fn contains(&self, key: &K) -> bool {
        self.values.contains_key(key)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// The key kept last.
    #[cfg(test)]
    pub fn newest(&self) -> Option<&K> {
        self.order.back()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounded, oldest first, a key kept twice is one entry, a key taken
    /// and kept again is the newest, and the order always holds exactly the
    /// kept keys.
    #[test]
    fn stays_bounded_and_drops_the_oldest_first() {
        let mut m = OldestFirst::<u32, u32, 4>::default();
        for k in 0..4 {
            assert_eq!(m.keep(k, k * 10), None);
        }
        assert_eq!(m.keep(2, 21), None, "kept already: nothing drops");
        assert_eq!(m.len(), 4);
        assert_eq!(m.keep(4, 40), Some(0), "over the bound: the oldest");
        assert_eq!(m.take(&2), Some(21));
        assert_eq!(m.take(&2), None, "taken once");
        assert_eq!(m.keep(5, 50), None);
        // Over the bound again: 1 is the oldest left, not 2 (taken) again.
        assert_eq!(m.keep(2, 22), Some(10));
        assert_eq!(m.newest(), Some(&2));
        assert!(!m.contains(&1) && m.contains(&3));
        assert_eq!(m.len(), 4);
        assert_eq!(m.order.len(), m.values.len());
        assert!(m.order.iter().all(|k| m.values.contains_key(k)));
    }
}
