//! What is programmed: the kernel map entries as far as successful writes
//! tell (`Held`, per service id), and which service port owns which ids
//! (`Record`). Ids are freed from here only: a service id when no record
//! owns it and no entry of any map names it, a backend id when no record
//! owns it and its slot is clear. So a failed removal keeps its ids out of
//! reach until it is retried and succeeds, and a new service can never be
//! reached through an old one's frontends.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    Backend, FrontendKey, MaglevKey, ServiceEntry, MAX_BACKENDS, MAX_SERVICES, SERVICE_F_TABLE_B,
};

use super::{
    ids::IdPool,
    maglev::TableSpec,
    maps::Snapshot,
    sorted::{SortedMap, SortedSet},
};
use crate::model::{Prefix, ServicePort, ServicePortKey};

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    SetBackend(u32, Backend),
    ClearBackend(u32),
    /// A whole table; `u64` is the spec's digest. Boxed: the largest
    /// variant sets the size of every write a plan holds.
    SetTable(MaglevKey, Box<TableSpec>, u64, TableTarget),
    RemoveTable(MaglevKey),
    SetFrontend(FrontendKey, ServiceEntry),
    RemoveFrontend(FrontendKey),
    SetRange(u32, Prefix),
    RemoveRange(u32, Prefix),
}

/// Where a table is written (see `lb_common::MaglevSlots`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableTarget {
    /// A new inner array, both halves holding the table, swapped in with
    /// one map-in-map update (which waits an RCU grace period): for a new
    /// size, or when no half is known to be unread.
    Fresh,
    /// In place, into half 0 (A) or 1 (B) of the array the maps hold,
    /// which no frontend reads; the frontends then flip to it. No wait.
    Half(usize),
}

/// One table the maps hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldTable {
    /// Digest of the spec its live half holds (0: not known).
    pub digest: u64,
    /// The half holding them; `None`: both do (a fresh array), or not
    /// known.
    pub live: Option<usize>,
}

impl HeldTable {
    /// What a write of a table of this size should target, given the
    /// halves the applied frontends read (bit 0: A, bit 1: B): the half
    /// that is not live, unless a frontend still reads it.
    pub fn target(&self, read: u8) -> TableTarget {
        let half = match self.live {
            Some(h) => h ^ 1,
            None => 1,
        };
        if read & (1 << half) == 0 {
            TableTarget::Half(half)
        } else if read & (1 << (half ^ 1)) == 0 {
            // Every frontend reads the preferred half and none the other:
            // both halves hold the table (a fresh array), or the last flip
            // did not reach every frontend.
            TableTarget::Half(half ^ 1)
        } else {
            TableTarget::Fresh
        }
    }
}

/// The half the frontends should read after a write to `target` (after a
/// fresh array, either would do: A).
pub fn half_after(target: TableTarget) -> usize {
    match target {
        TableTarget::Fresh => 0,
        TableTarget::Half(h) => h,
    }
}

/// What the maps hold for one service id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub frontends: SortedSet<FrontendKey>,
    /// Table size -> what is known of it.
    pub tables: SortedMap<u32, HeldTable>,
    pub ranges: SortedSet<Prefix>,
    pub backends: SortedSet<u32>,
}

impl Held {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
            && self.tables.is_empty()
            && self.ranges.is_empty()
            && self.backends.is_empty()
    }
}

/// A service port's ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub id: u32,
    /// The spec last programmed completely; `None` when unknown (adopted
    /// from a previous agent, or its writes failed): it is rewritten.
    pub spec: Option<Arc<ServicePort>>,
    pub backend_ids: BTreeMap<(IpAddr, u16), u32>,
}

#[derive(Debug)]
pub struct State {
    pub records: BTreeMap<ServicePortKey, Record>,
    pub frontends: HashMap<FrontendKey, ServiceEntry>,
    pub backends: HashMap<u32, Backend>,
    pub held: BTreeMap<u32, Held>,
    /// Service ids some map entry names and no record owns: what a removal
    /// that failed, or a previous agent, left. Every plan deletes them
    /// (after letting a desired service port take one over).
    pub orphans: BTreeSet<u32>,
    owned_services: HashSet<u32>,
    owned_backends: HashSet<u32>,
    pub service_ids: IdPool,
    pub backend_ids: IdPool,
}

impl Default for State {
    fn default() -> Self {
        State::with_limits(MAX_SERVICES, MAX_BACKENDS)
    }
}

impl State {
    pub fn with_limits(services: u32, backends: u32) -> State {
        State {
            records: BTreeMap::new(),
            frontends: HashMap::new(),
            backends: HashMap::new(),
            held: BTreeMap::new(),
            orphans: BTreeSet::new(),
            owned_services: HashSet::new(),
            owned_backends: HashSet::new(),
            service_ids: IdPool::new(services),
            backend_ids: IdPool::new(backends),
        }
    }

    /// What a previous agent left: every id is an orphan until a desired
    /// service port takes it over. Entries with ids outside the range we
    /// hand out are orphans too, and get deleted.
    pub fn from_snapshot(snap: Snapshot) -> State {
        let mut s = State::default();
        for (key, entry) in snap.frontends {
            s.applied(&Write::SetFrontend(key, entry));
        }
        for key in snap.tables {
            // The digest of a table we did not write is unknown: 0 never
            // matches a real one, so it is rewritten. Its live half is the
            // one its frontends read, if they agree.
            let read = s.halves_read(key);
            let live = match read {
                0b01 => TableTarget::Half(0),
                0b10 => TableTarget::Half(1),
                _ => TableTarget::Fresh,
            };
            s.applied(&Write::SetTable(key, Box::default(), 0, live));
        }
        for (id, range) in snap.source_ranges {
            s.applied(&Write::SetRange(id, range));
        }
        for (bid, b) in snap.backends {
            s.applied(&Write::SetBackend(bid, b));
        }
        s
    }

    pub fn held(&self, id: u32) -> Option<&Held> {
        self.held.get(&id)
    }

    /// The halves of table `key` that applied frontend entries read: bit 0
    /// for A, bit 1 for B.
    pub fn halves_read(&self, key: MaglevKey) -> u8 {
        let Some(held) = self.held.get(&key.service_id) else {
            return 0;
        };
        held.frontends
            .iter()
            .filter_map(|f| self.frontends.get(f))
            .filter(|e| e.table_size == key.table_size)
            .fold(0, |read, e| {
                read | if e.flags & SERVICE_F_TABLE_B != 0 {
                    0b10
                } else {
                    0b01
                }
            })
    }

    /// Records what a successful write changed in the maps.
    pub fn applied(&mut self, w: &Write) {
        match *w {
            Write::SetBackend(bid, b) => {
                if let Some(old) = self.backends.insert(bid, b) {
                    self.held_mut(old.service_id).backends.remove(&bid);
                    self.settle_service(old.service_id);
                }
                self.held_mut(b.service_id).backends.insert(bid);
                self.settle_service(b.service_id);
                self.settle_backend(bid);
            }
            Write::ClearBackend(bid) => {
                if let Some(old) = self.backends.remove(&bid) {
                    self.held_mut(old.service_id).backends.remove(&bid);
                    self.settle_service(old.service_id);
                }
                self.settle_backend(bid);
            }
            Write::SetTable(key, _, digest, target) => {
                let live = match target {
                    TableTarget::Fresh => None,
                    TableTarget::Half(h) => Some(h),
                };
                self.held_mut(key.service_id)
                    .tables
                    .insert(key.table_size, HeldTable { digest, live });
                self.settle_service(key.service_id);
            }
            Write::RemoveTable(key) => {
                self.held_mut(key.service_id).tables.remove(&key.table_size);
                self.settle_service(key.service_id);
            }
            Write::SetFrontend(key, entry) => {
                if let Some(old) = self.frontends.insert(key, entry) {
                    self.held_mut(old.id).frontends.remove(&key);
                    self.settle_service(old.id);
                }
                self.held_mut(entry.id).frontends.insert(key);
                self.settle_service(entry.id);
            }
            Write::RemoveFrontend(key) => {
                if let Some(old) = self.frontends.remove(&key) {
                    self.held_mut(old.id).frontends.remove(&key);
                    self.settle_service(old.id);
                }
            }
            Write::SetRange(id, r) => {
                self.held_mut(id).ranges.insert(r);
                self.settle_service(id);
            }
            Write::RemoveRange(id, r) => {
                self.held_mut(id).ranges.remove(&r);
                self.settle_service(id);
            }
        }
    }

    /// Sets (`Some`) or drops (`None`) the record of a service port.
    pub fn set_record(&mut self, key: &ServicePortKey, record: Option<Record>) {
        let new_id = record.as_ref().map(|r| r.id);
        let new_bids: BTreeSet<u32> = record
            .iter()
            .flat_map(|r| r.backend_ids.values().copied())
            .collect();
        let old = match record {
            Some(r) => self.records.insert(key.clone(), r),
            None => self.records.remove(key),
        };
        if let Some(id) = new_id {
            self.owned_services.insert(id);
        }
        self.owned_backends.extend(&new_bids);
        if let Some(old) = old {
            for bid in old.backend_ids.values() {
                if !new_bids.contains(bid) {
                    self.owned_backends.remove(bid);
                    self.settle_backend(*bid);
                }
            }
            if new_id != Some(old.id) {
                self.owned_services.remove(&old.id);
                self.settle_service(old.id);
            }
        }
        if let Some(id) = new_id {
            self.settle_service(id);
        }
        for bid in new_bids {
            self.settle_backend(bid);
        }
    }

    /// Forgets the spec of a record whose writes failed, so the next plan
    /// rewrites it.
    pub fn mark_unknown(&mut self, key: &ServicePortKey) {
        if let Some(r) = self.records.get_mut(key) {
            r.spec = None;
        }
    }

    fn held_mut(&mut self, id: u32) -> &mut Held {
        self.held.entry(id).or_default()
    }

    /// Brings the pool, `held` and the orphan set in line for one service
    /// id.
    fn settle_service(&mut self, id: u32) {
        let held = self.held.get(&id).is_some_and(|h| !h.is_empty());
        if !held {
            self.held.remove(&id);
        }
        let owned = self.owned_services.contains(&id);
        if held || owned {
            self.service_ids.mark_used(id);
        } else {
            self.service_ids.mark_free(id);
        }
        if held && !owned {
            self.orphans.insert(id);
        } else {
            self.orphans.remove(&id);
        }
    }

    fn settle_backend(&mut self, bid: u32) {
        if self.backends.contains_key(&bid) || self.owned_backends.contains(&bid) {
            self.backend_ids.mark_used(bid);
        } else {
            self.backend_ids.mark_free(bid);
        }
    }
}
