//! From desired state to map writes. `diff` says which service ports
//! changed; `Programmer` turns each change into ordered writes through
//! `DatapathMaps` (the kernel maps, or an in-memory model in tests), owning
//! service-id and backend-id allocation.
//!
//! Write order keeps the datapath consistent at every step: backends before
//! the Maglev table that names them, the table before the frontends that
//! lead to it, and stale backends cleared last.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use lb_common::{
    Backend, FrontendKey, ServiceEntry, BACKEND_F_LOCAL, BACKEND_F_PRESENT, BACKEND_F_TERMINATING,
    BACKEND_F_USABLE, MAX_BACKENDS, MAX_SERVICES, SERVICE_F_AFFINITY, SERVICE_F_EXTERNAL,
    SERVICE_F_LOCAL, SERVICE_F_SOURCE_RANGES,
};

use crate::{
    maglev::{table_size_for, MaglevTable},
    model::{DesiredState, Frontend, FrontendKind, Prefix, Scope, ServicePort, ServicePortKey},
};

/// Which service ports to (re)write and which to remove.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<ServicePortKey>,
    pub changed: Vec<ServicePortKey>,
    pub removed: Vec<ServicePortKey>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

pub fn diff(old: &BTreeMap<ServicePortKey, ServicePort>, new: &DesiredState) -> Diff {
    let mut d = Diff::default();
    for (k, v) in &new.services {
        match old.get(k) {
            None => d.added.push(k.clone()),
            Some(o) if o != v => d.changed.push(k.clone()),
            Some(_) => {}
        }
    }
    d.removed = old
        .keys()
        .filter(|k| !new.services.contains_key(*k))
        .cloned()
        .collect();
    d
}

/// The writes the datapath maps accept.
pub trait DatapathMaps {
    fn set_backend(&mut self, id: u32, backend: Backend) -> anyhow::Result<()>;
    fn clear_backend(&mut self, id: u32) -> anyhow::Result<()>;
    /// For each (service id, table): swaps in the new table in one step
    /// (`Some`, slots are backend ids) or removes the service's table
    /// (`None`). One result per entry, in order. A batch, because the kernel
    /// waits an RCU grace period after every map-in-map update, and an
    /// implementation can overlap those waits.
    fn write_maglev(&mut self, tables: &[(u32, Option<&[u32]>)]) -> Vec<anyhow::Result<()>>;
    fn set_frontend(&mut self, key: FrontendKey, entry: ServiceEntry) -> anyhow::Result<()>;
    fn remove_frontend(&mut self, key: FrontendKey) -> anyhow::Result<()>;
    /// Admits `range` to the load-balancer frontends of `service_id`.
    fn set_source_range(&mut self, service_id: u32, range: Prefix) -> anyhow::Result<()>;
    fn remove_source_range(&mut self, service_id: u32, range: Prefix) -> anyhow::Result<()>;
}

/// Hands out small integer ids from `1..limit`, reusing freed ones.
#[derive(Debug)]
pub struct IdAllocator {
    next: u32,
    limit: u32,
    free: BTreeSet<u32>,
}

impl IdAllocator {
    pub fn new(limit: u32) -> Self {
        IdAllocator {
            next: 1,
            limit,
            free: BTreeSet::new(),
        }
    }

    pub fn allocate(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < self.limit).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    pub fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
}

/// What is programmed for one service port.
#[derive(Debug)]
struct Programmed {
    id: u32,
    spec: ServicePort,
    backend_ids: BTreeMap<(Ipv4Addr, u16), u32>,
}

/// A service port between `stage` and `finish`.
struct Staged {
    key: ServicePortKey,
    id: u32,
    table: Option<StagedTable>,
    stale_backends: Vec<u32>,
    stale_ranges: Vec<Prefix>,
}

struct StagedTable {
    /// Backend ids, one per Maglev slot.
    slots: Vec<u32>,
    /// How many distinct (usable) backends the table names.
    backends: u32,
}

/// Outcome of one `apply`, for the logs.
#[derive(Debug, Default)]
pub struct Report {
    pub diff: Diff,
    /// Service ports whose writes failed, with the error; they are retried
    /// on the next apply.
    pub failed: Vec<(ServicePortKey, String)>,
}

pub struct Programmer<M> {
    maps: M,
    programmed: BTreeMap<ServicePortKey, Programmed>,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
}

impl<M: DatapathMaps> Programmer<M> {
    pub fn new(maps: M) -> Self {
        Programmer {
            maps,
            programmed: BTreeMap::new(),
            service_ids: IdAllocator::new(MAX_SERVICES),
            backend_ids: IdAllocator::new(MAX_BACKENDS),
        }
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// The service id of a programmed service port.
    pub fn service_id(&self, key: &ServicePortKey) -> Option<u32> {
        self.programmed.get(key).map(|p| p.id)
    }

    pub fn programmed(&self) -> impl Iterator<Item = (&ServicePortKey, u32)> {
        self.programmed.iter().map(|(k, p)| (k, p.id))
    }

    /// Makes the maps equal to `desired`, touching only what changed.
    ///
    /// Works in stages across all changed services, so the Maglev swaps can
    /// go to the kernel as one batch (see `DatapathMaps::write_maglev`):
    /// removed services go first (frontends, tables, backends), then every
    /// added or changed service gets its backends, then its table, then its
    /// frontends, and stale backends are cleared last.
    pub fn apply(&mut self, desired: &DesiredState) -> Report {
        let specs: BTreeMap<ServicePortKey, ServicePort> = self
            .programmed
            .iter()
            .map(|(k, p)| (k.clone(), p.spec.clone()))
            .collect();
        let d = diff(&specs, desired);
        let mut failed = Vec::new();
        self.remove_all(&d.removed, &mut failed);

        // Free frontends that changed hands before anyone claims them.
        for key in &d.changed {
            let new: BTreeSet<FrontendKey> = frontend_keys(&desired.services[key]).collect();
            let stale: Vec<FrontendKey> = frontend_keys(&self.programmed[key].spec)
                .filter(|f| !new.contains(f))
                .collect();
            for f in stale {
                if let Err(e) = self.maps.remove_frontend(f) {
                    failed.push((key.clone(), format!("{e:#}")));
                }
            }
        }

        let mut staged = Vec::new();
        for key in d.added.iter().chain(&d.changed) {
            match self.stage(&desired.services[key]) {
                Ok(s) => staged.push(s),
                Err(e) => self.fail(key, e, &mut failed),
            }
        }
        let tables: Vec<(u32, Option<&[u32]>)> = staged
            .iter()
            .map(|s| (s.id, s.table.as_ref().map(|t| t.slots.as_slice())))
            .collect();
        let results = self.maps.write_maglev(&tables);
        for (s, result) in staged.into_iter().zip(results) {
            let key = s.key.clone();
            if let Err(e) = result.and_then(|()| self.finish(s, &desired.services[&key])) {
                self.fail(&key, e, &mut failed);
            }
        }
        Report { diff: d, failed }
    }

    /// Forgets a service whose writes failed, so the next apply rewrites it
    /// from scratch.
    fn fail(
        &mut self,
        key: &ServicePortKey,
        e: anyhow::Error,
        failed: &mut Vec<(ServicePortKey, String)>,
    ) {
        failed.push((key.clone(), format!("{e:#}")));
        if let Some(p) = self.programmed.remove(key) {
            self.release(p);
        }
    }

    /// Ids, backend entries and the new Maglev table of one service port.
    fn stage(&mut self, spec: &ServicePort) -> anyhow::Result<Staged> {
        let existing = self.programmed.remove(&spec.key);
        let id = match &existing {
            Some(p) => p.id,
            None => self.service_ids.allocate().ok_or_else(|| {
                anyhow::anyhow!("service table is full ({MAX_SERVICES} service ports)")
            })?,
        };
        let mut old_backends = existing
            .as_ref()
            .map(|p| p.backend_ids.clone())
            .unwrap_or_default();
        let old_ranges: BTreeSet<Prefix> = existing
            .as_ref()
            .map(|p| p.spec.source_ranges.iter().copied().collect())
            .unwrap_or_default();
        let mut state = Programmed {
            id,
            spec: spec.clone(),
            backend_ids: BTreeMap::new(),
        };

        let usable: BTreeSet<(Ipv4Addr, u16)> =
            spec.usable_endpoints().iter().map(|e| e.target()).collect();
        for e in &spec.endpoints {
            let bid = match old_backends.remove(&e.target()) {
                Some(bid) => bid,
                None => match self.backend_ids.allocate() {
                    Some(bid) => bid,
                    None => {
                        // Keep every id we hold on record so `fail` frees them.
                        state.backend_ids.append(&mut old_backends);
                        self.programmed.insert(spec.key.clone(), state);
                        anyhow::bail!("backend table is full ({MAX_BACKENDS} backends)");
                    }
                },
            };
            state.backend_ids.insert(e.target(), bid);
            let mut flags = BACKEND_F_PRESENT;
            if e.terminating {
                flags |= BACKEND_F_TERMINATING;
            }
            if usable.contains(&e.target()) {
                flags |= BACKEND_F_USABLE;
            }
            if e.local {
                flags |= BACKEND_F_LOCAL;
            }
            let b = Backend {
                addr: e.addr.octets(),
                port: e.port,
                flags,
                _pad: 0,
                service_id: id,
            };
            if let Err(err) = self.maps.set_backend(bid, b) {
                state.backend_ids.append(&mut old_backends);
                self.programmed.insert(spec.key.clone(), state);
                return Err(err);
            }
        }
        let table = (!usable.is_empty()).then(|| {
            let addrs: Vec<(Ipv4Addr, u16)> = usable.iter().copied().collect();
            let table = MaglevTable::build(&addrs, table_size_for(addrs.len()));
            let slots = table
                .slots
                .iter()
                .map(|&i| state.backend_ids[&table.backends[i as usize]])
                .collect();
            StagedTable {
                slots,
                backends: addrs.len() as u32,
            }
        });
        // Ranges before the frontends that check them; stale ones after.
        for r in spec
            .source_ranges
            .iter()
            .filter(|r| !old_ranges.contains(r))
        {
            if let Err(err) = self.maps.set_source_range(id, *r) {
                state.backend_ids.append(&mut old_backends);
                self.programmed.insert(spec.key.clone(), state);
                return Err(err);
            }
        }
        self.programmed.insert(spec.key.clone(), state);
        Ok(Staged {
            key: spec.key.clone(),
            id,
            table,
            stale_backends: old_backends.into_values().collect(),
            stale_ranges: old_ranges
                .into_iter()
                .filter(|r| !spec.source_ranges.contains(r))
                .collect(),
        })
    }

    /// Frontends of a staged service (its table is in place), then its
    /// stale backends.
    fn finish(&mut self, s: Staged, spec: &ServicePort) -> anyhow::Result<()> {
        let (table_size, count) = s
            .table
            .as_ref()
            .map_or((0, 0), |t| (t.slots.len() as u32, t.backends));
        for f in &spec.frontends {
            let entry = ServiceEntry {
                id: s.id,
                table_size,
                backend_count: count,
                affinity_timeout_s: spec.affinity_timeout_s.unwrap_or(0),
                flags: frontend_flags(spec, f),
                _pad: [0; 3],
            };
            self.maps.set_frontend(frontend_key(f), entry)?;
        }
        for r in s.stale_ranges {
            self.maps.remove_source_range(s.id, r)?;
        }
        for bid in s.stale_backends {
            self.maps.clear_backend(bid)?;
            self.backend_ids.release(bid);
        }
        Ok(())
    }

    /// Removes services: all their frontends first, then their tables in
    /// one batch, then their backends.
    fn remove_all(&mut self, keys: &[ServicePortKey], failed: &mut Vec<(ServicePortKey, String)>) {
        let mut gone = Vec::new();
        for key in keys {
            let Some(p) = self.programmed.remove(key) else {
                continue;
            };
            if let Some(e) = frontend_keys(&p.spec)
                .map(|f| self.maps.remove_frontend(f))
                .find_map(Result::err)
            {
                failed.push((key.clone(), format!("{e:#}")));
            }
            gone.push(p);
        }
        let tables: Vec<(u32, Option<&[u32]>)> = gone.iter().map(|p| (p.id, None)).collect();
        let results = self.maps.write_maglev(&tables);
        for (p, result) in gone.into_iter().zip(results) {
            let ranges = p
                .spec
                .source_ranges
                .iter()
                .map(|&r| self.maps.remove_source_range(p.id, r))
                .find_map(Result::err);
            let backends = p
                .backend_ids
                .values()
                .map(|&bid| self.maps.clear_backend(bid))
                .find_map(Result::err)
                .or(ranges);
            if let Some(e) = result.err().or(backends) {
                failed.push((p.spec.key.clone(), format!("{e:#}")));
            }
            self.release(p);
        }
    }

    fn release(&mut self, p: Programmed) {
        for bid in p.backend_ids.into_values() {
            self.backend_ids.release(bid);
        }
        self.service_ids.release(p.id);
    }
}

/// `SERVICE_F_*` of one frontend of a service port.
pub fn frontend_flags(spec: &ServicePort, f: &Frontend) -> u8 {
    let mut flags = 0;
    if spec.affinity_timeout_s.is_some() {
        flags |= SERVICE_F_AFFINITY;
    }
    if f.kind.is_external() {
        flags |= SERVICE_F_EXTERNAL;
    }
    if spec.key.scope == Scope::Local {
        flags |= SERVICE_F_LOCAL;
    }
    if f.kind == FrontendKind::LoadBalancer && !spec.source_ranges.is_empty() {
        flags |= SERVICE_F_SOURCE_RANGES;
    }
    flags
}

pub fn frontend_key(f: &Frontend) -> FrontendKey {
    FrontendKey {
        addr: f.addr.octets(),
        port: f.port,
        proto: f.protocol.number(),
        _pad: 0,
    }
}

fn frontend_keys(spec: &ServicePort) -> impl Iterator<Item = FrontendKey> + '_ {
    spec.frontends.iter().map(frontend_key)
}

/// The maps as plain collections: the second implementation the planner's
/// tests need, and a model of what the kernel maps should hold.
#[derive(Debug, Default)]
pub struct MemoryMaps {
    pub backends: HashMap<u32, Backend>,
    pub maglev: HashMap<u32, Vec<u32>>,
    pub frontends: HashMap<FrontendKey, ServiceEntry>,
    pub source_ranges: BTreeSet<(u32, Prefix)>,
    /// Every write, in order, for tests that check ordering.
    pub log: Vec<String>,
}

impl DatapathMaps for MemoryMaps {
    fn set_backend(&mut self, id: u32, backend: Backend) -> anyhow::Result<()> {
        self.log.push(format!("set_backend {id}"));
        self.backends.insert(id, backend);
        Ok(())
    }
    fn clear_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.log.push(format!("clear_backend {id}"));
        self.backends.remove(&id);
        Ok(())
    }
    fn write_maglev(&mut self, tables: &[(u32, Option<&[u32]>)]) -> Vec<anyhow::Result<()>> {
        tables
            .iter()
            .map(|&(id, slots)| {
                match slots {
                    Some(slots) => {
                        self.log.push(format!("set_maglev {id}"));
                        self.maglev.insert(id, slots.to_vec());
                    }
                    None => {
                        self.log.push(format!("remove_maglev {id}"));
                        self.maglev.remove(&id);
                    }
                }
                Ok(())
            })
            .collect()
    }
    fn set_frontend(&mut self, key: FrontendKey, entry: ServiceEntry) -> anyhow::Result<()> {
        self.log
            .push(format!("set_frontend {:?}:{}", key.addr, key.port));
        self.frontends.insert(key, entry);
        Ok(())
    }
    fn remove_frontend(&mut self, key: FrontendKey) -> anyhow::Result<()> {
        self.log
            .push(format!("remove_frontend {:?}:{}", key.addr, key.port));
        self.frontends.remove(&key);
        Ok(())
    }
    fn set_source_range(&mut self, service_id: u32, range: Prefix) -> anyhow::Result<()> {
        self.log
            .push(format!("set_source_range {service_id} {range}"));
        self.source_ranges.insert((service_id, range));
        Ok(())
    }
    fn remove_source_range(&mut self, service_id: u32, range: Prefix) -> anyhow::Result<()> {
        self.log
            .push(format!("remove_source_range {service_id} {range}"));
        self.source_ranges.remove(&(service_id, range));
        Ok(())
    }
}
