//! Small integer ids (service ids, backend ids) handed out lowest first.
//! The pool does not decide when an id is free: the caller marks it used
//! or free from what the kernel maps and the ownership records hold (see
//! `State::settle_service`), so an id is never handed out again while a
//! map entry still points at it.

use std::collections::BTreeSet;

#[derive(Debug)]
pub struct IdPool {
    /// Every id below `next` not in `free` is in use.
    next: u32,
    /// Ids are `1..limit`.
    limit: u32,
    free: BTreeSet<u32>,
}

impl IdPool {
    pub fn new(limit: u32) -> Self {
        IdPool {
            next: 1,
            limit,
            free: BTreeSet::new(),
        }
    }

    /// Free ids, lowest first, without taking them (a plan picks its new
    /// ids from here; running the plan marks them used).
    pub fn peek(&self) -> impl Iterator<Item = u32> + '_ {
        self.free.iter().copied().chain(self.next..self.limit)
    }

    /// Marks `id` used. False if it is outside `1..limit`.
    pub fn mark_used(&mut self, id: u32) -> bool {
        if id == 0 || id >= self.limit {
            return false;
        }
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
        } else {
            self.free.remove(&id);
        }
        true
    }

    /// Marks `id` free (idempotent).
    pub fn mark_free(&mut self, id: u32) {
        if id != 0 && id < self.next {
            self.free.insert(id);
        }
    }

    /// Ids in use.
    pub fn in_use(&self) -> usize {
        (self.next - 1) as usize - self.free.len()
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_the_lowest_free_id_and_stops_at_the_limit() {
        let mut ids = IdPool::new(4);
        assert_eq!(ids.peek().collect::<Vec<_>>(), [1, 2, 3]);
        assert!(ids.mark_used(2));
        assert_eq!(ids.peek().collect::<Vec<_>>(), [1, 3]);
        assert_eq!(ids.in_use(), 1);
        ids.mark_used(1);
        ids.mark_used(3);
        assert_eq!(ids.peek().next(), None);
        assert!(!ids.mark_used(4));
        ids.mark_free(2);
        ids.mark_free(2);
        assert_eq!(ids.peek().collect::<Vec<_>>(), [2]);
        assert_eq!(ids.in_use(), 2);
    }
}
