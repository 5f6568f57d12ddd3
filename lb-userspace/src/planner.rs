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
    diff_specs(|k| old.get(k).map(Some), old.keys(), new, None)
}

/// The diff of `new` against what `old` says is programmed (`Some(None)`:
/// programmed, contents unknown), over `only` if given, else everything.
fn diff_specs<'a>(
    old: impl Fn(&ServicePortKey) -> Option<Option<&'a ServicePort>>,
    old_keys: impl Iterator<Item = &'a ServicePortKey>,
    new: &DesiredState,
    only: Option<&BTreeSet<ServicePortKey>>,
) -> Diff {
    let mut d = Diff::default();
    let mut consider = |k: &ServicePortKey, v: &ServicePort| match old(k) {
        None => d.added.push(k.clone()),
        Some(o) if o != Some(v) => d.changed.push(k.clone()),
        Some(_) => {}
    };
    match only {
        Some(keys) => keys
            .iter()
            .filter_map(|k| new.services.get_key_value(k))
            .for_each(|(k, v)| consider(k, v)),
        None => new.services.iter().for_each(|(k, v)| consider(k, v)),
    }
    d.removed = match only {
        Some(keys) => keys
            .iter()
            .filter(|k| old(k).is_some() && !new.services.contains_key(*k))
            .cloned()
            .collect(),
        None => old_keys
            .filter(|k| !new.services.contains_key(*k))
            .cloned()
            .collect(),
    };
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
    /// Reads back everything written (see `Programmer::adopt`).
    fn snapshot(&self) -> anyhow::Result<Snapshot>;
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

    /// Marks `id` as taken (an id adopted from the maps). False if it is
    /// out of range or already taken.
    pub fn claim(&mut self, id: u32) -> bool {
        if id == 0 || id >= self.limit {
            return false;
        }
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
            return true;
        }
        self.free.remove(&id)
    }

    pub fn release(&mut self, id: u32) {
        self.free.insert(id);
    }

    /// Ids handed out (or claimed) and not released.
    pub fn in_use(&self) -> usize {
        (self.next - 1) as usize - self.free.len()
    }
}

/// What the maps hold, read back: how a restarted agent learns what the
/// previous one programmed (the maps are the only record that survives).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every frontend and the service id it leads to.
    pub frontends: Vec<(FrontendKey, u32)>,
    /// Every present backend, by id.
    pub backends: Vec<(u32, Backend)>,
    /// Service ids that have a Maglev table.
    pub tables: Vec<u32>,
    pub source_ranges: Vec<(u32, Prefix)>,
}

/// A service id found in the maps at start-up, not yet matched to a
/// desired service port.
#[derive(Debug, Default)]
struct Adopted {
    frontends: BTreeSet<FrontendKey>,
    backend_ids: BTreeMap<(Ipv4Addr, u16), u32>,
    has_table: bool,
    ranges: BTreeSet<Prefix>,
}

/// What is programmed for one service port: what the maps hold for it, in
/// map terms, and the spec it came from.
#[derive(Debug)]
struct Programmed {
    id: u32,
    /// `None` for a service adopted from a previous agent: it is rewritten
    /// (with the same ids) on the first apply.
    spec: Option<ServicePort>,
    frontends: BTreeSet<FrontendKey>,
    ranges: BTreeSet<Prefix>,
    backend_ids: BTreeMap<(Ipv4Addr, u16), u32>,
    has_table: bool,
}

impl Programmed {
    fn from_adopted(id: u32, a: Adopted) -> Programmed {
        Programmed {
            id,
            spec: None,
            frontends: a.frontends,
            ranges: a.ranges,
            backend_ids: a.backend_ids,
            has_table: a.has_table,
        }
    }
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
    /// Service ids adopted from the maps and taken over by a desired
    /// service port (same ids, so established flows keep their backend).
    pub adopted: usize,
    /// Service ids adopted from the maps that nothing wants any more, and
    /// which were deleted.
    pub stale_removed: usize,
}

pub struct Programmer<M> {
    maps: M,
    programmed: BTreeMap<ServicePortKey, Programmed>,
    /// From `adopt`, until the next apply matches or deletes them.
    adopted: BTreeMap<u32, Adopted>,
    /// Service ports whose writes failed: `apply_keys` retries them with
    /// whatever keys it is given.
    retry: BTreeSet<ServicePortKey>,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
}

impl<M: DatapathMaps> Programmer<M> {
    pub fn new(maps: M) -> Self {
        Programmer {
            maps,
            programmed: BTreeMap::new(),
            adopted: BTreeMap::new(),
            retry: BTreeSet::new(),
            service_ids: IdAllocator::new(MAX_SERVICES),
            backend_ids: IdAllocator::new(MAX_BACKENDS),
        }
    }

    /// A programmer for maps a previous agent filled: it reads them back,
    /// and its first `apply` keeps the service and backend ids of every
    /// service port it finds there (matched by frontend, and backends by
    /// address) and deletes only what the desired state no longer has.
    /// Established flows therefore keep their backends across a restart:
    /// conntrack entries name backends by id.
    pub fn adopt(maps: M) -> anyhow::Result<Self> {
        let snap = maps.snapshot()?;
        let mut p = Programmer::new(maps);
        let mut by_id: BTreeMap<u32, Adopted> = BTreeMap::new();
        for (key, id) in snap.frontends {
            by_id.entry(id).or_default().frontends.insert(key);
        }
        for id in snap.tables {
            by_id.entry(id).or_default().has_table = true;
        }
        for (id, range) in snap.source_ranges {
            by_id.entry(id).or_default().ranges.insert(range);
        }
        let mut stray_backends = Vec::new();
        for (bid, b) in snap.backends {
            if !p.backend_ids.claim(bid) {
                continue;
            }
            let target = (Ipv4Addr::from(b.addr), b.port);
            let owner = by_id.entry(b.service_id).or_default();
            if let Some(dup) = owner.backend_ids.insert(target, bid) {
                stray_backends.push(dup);
            }
        }
        // Ids outside the range we hand out cannot be ours to keep.
        by_id.retain(|&id, a| {
            let ok = p.service_ids.claim(id);
            if !ok {
                stray_backends.extend(a.backend_ids.values().copied());
            }
            ok
        });
        for bid in stray_backends {
            p.maps.clear_backend(bid)?;
            p.backend_ids.release(bid);
        }
        p.adopted = by_id;
        Ok(p)
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    pub fn into_maps(self) -> M {
        self.maps
    }

    /// The service id of a programmed service port.
    pub fn service_id(&self, key: &ServicePortKey) -> Option<u32> {
        self.programmed.get(key).map(|p| p.id)
    }

    pub fn programmed(&self) -> impl Iterator<Item = (&ServicePortKey, u32)> {
        self.programmed.iter().map(|(k, p)| (k, p.id))
    }

    /// Backends currently written, over all service ports.
    pub fn backend_count(&self) -> usize {
        self.backend_ids.in_use()
    }

    /// Service ports programmed.
    pub fn service_count(&self) -> usize {
        self.programmed.len()
    }

    /// Makes the maps equal to `desired`, touching only what changed.
    pub fn apply(&mut self, desired: &DesiredState) -> Report {
        self.apply_to(desired, None)
    }

    /// `apply`, looking only at the service ports in `keys` (the ones an
    /// event touched): the cost follows the change, not the cluster size.
    pub fn apply_keys(
        &mut self,
        desired: &DesiredState,
        keys: &BTreeSet<ServicePortKey>,
    ) -> Report {
        self.apply_to(desired, Some(keys))
    }

    /// Works in stages across all changed services, so the Maglev swaps can
    /// go to the kernel as one batch (see `DatapathMaps::write_maglev`):
    /// removed services go first (frontends, tables, backends), then every
    /// added or changed service gets its backends, then its table, then its
    /// frontends, and stale backends are cleared last.
    fn apply_to(
        &mut self,
        desired: &DesiredState,
        only: Option<&BTreeSet<ServicePortKey>>,
    ) -> Report {
        let mut failed = Vec::new();
        let (adopted, stale_removed) = if self.adopted.is_empty() {
            (0, 0)
        } else {
            self.take_over_adopted(desired, &mut failed)
        };
        let programmed = &self.programmed;
        let d = diff_specs(
            |k| programmed.get(k).map(|p| p.spec.as_ref()),
            programmed.keys(),
            desired,
            only,
        );
        self.remove_all(&d.removed, &mut failed);

        // Free frontends that changed hands before anyone claims them.
        for key in &d.changed {
            let new: BTreeSet<FrontendKey> = frontend_keys(&desired.services[key]).collect();
            let p = self
                .programmed
                .get_mut(key)
                .expect("changed means programmed");
            let stale: Vec<FrontendKey> = p.frontends.difference(&new).copied().collect();
            for f in stale {
                match self.maps.remove_frontend(f) {
                    Ok(()) => {
                        p.frontends.remove(&f);
                    }
                    Err(e) => failed.push((key.clone(), format!("{e:#}"))),
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
        self.retry = failed.iter().map(|(k, _)| k.clone()).collect();
        Report {
            diff: d,
            failed,
            adopted,
            stale_removed,
        }
    }

    /// Gives each desired service port the adopted service id that one of
    /// its frontends leads to, and deletes the adopted ids left over.
    fn take_over_adopted(
        &mut self,
        desired: &DesiredState,
        failed: &mut Vec<(ServicePortKey, String)>,
    ) -> (usize, usize) {
        let mut owner: HashMap<FrontendKey, u32> = HashMap::new();
        for (&id, a) in &self.adopted {
            owner.extend(a.frontends.iter().map(|&f| (f, id)));
        }
        let mut taken = 0;
        for (key, spec) in &desired.services {
            if self.programmed.contains_key(key) {
                continue;
            }
            let id = frontend_keys(spec).find_map(|f| owner.get(&f).copied());
            if let Some(a) = id.and_then(|id| self.adopted.remove(&id)) {
                let id = id.expect("matched");
                self.programmed
                    .insert(key.clone(), Programmed::from_adopted(id, a));
                taken += 1;
            }
        }
        let stale = std::mem::take(&mut self.adopted);
        let count = stale.len();
        let gone = stale
            .into_iter()
            .map(|(id, a)| (None, Programmed::from_adopted(id, a)))
            .collect();
        self.remove_programmed(gone, failed);
        (taken, count)
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
        let (mut old_backends, old_ranges, frontends, had_table) = match existing {
            Some(p) => (p.backend_ids, p.ranges, p.frontends, p.has_table),
            None => Default::default(),
        };
        let mut state = Programmed {
            id,
            spec: Some(spec.clone()),
            frontends,
            ranges: old_ranges.clone(),
            backend_ids: BTreeMap::new(),
            has_table: had_table,
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
        // The table is swapped in (or removed) right after staging.
        state.has_table = table.is_some();
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
            state.ranges.insert(*r);
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
    /// stale source ranges and backends.
    fn finish(&mut self, s: Staged, spec: &ServicePort) -> anyhow::Result<()> {
        let (table_size, count) = s
            .table
            .as_ref()
            .map_or((0, 0), |t| (t.slots.len() as u32, t.backends));
        let p = self
            .programmed
            .get_mut(&s.key)
            .expect("staged services are programmed");
        for f in &spec.frontends {
            let entry = ServiceEntry {
                id: s.id,
                table_size,
                backend_count: count,
                affinity_timeout_s: spec.affinity_timeout_s.unwrap_or(0),
                flags: frontend_flags(spec, f),
                _pad: [0; 3],
            };
            let key = frontend_key(f);
            self.maps.set_frontend(key, entry)?;
            p.frontends.insert(key);
        }
        for r in s.stale_ranges {
            self.maps.remove_source_range(s.id, r)?;
            p.ranges.remove(&r);
        }
        for bid in s.stale_backends {
            self.maps.clear_backend(bid)?;
            self.backend_ids.release(bid);
        }
        Ok(())
    }

    /// Removes services: all their frontends first, then their tables in
    /// one batch, then their source ranges and backends.
    fn remove_all(&mut self, keys: &[ServicePortKey], failed: &mut Vec<(ServicePortKey, String)>) {
        let gone = keys
            .iter()
            .filter_map(|k| Some((Some(k.clone()), self.programmed.remove(k)?)))
            .collect();
        self.remove_programmed(gone, failed);
    }

    /// Deletes what each of `gone` holds in the maps and frees its ids.
    /// Failures are reported under the service port's key; adopted ids that
    /// no service port took (key `None`) only get a log line.
    fn remove_programmed(
        &mut self,
        gone: Vec<(Option<ServicePortKey>, Programmed)>,
        failed: &mut Vec<(ServicePortKey, String)>,
    ) {
        let mut frontend_errors: Vec<Option<anyhow::Error>> = gone
            .iter()
            .map(|(_, p)| {
                p.frontends
                    .iter()
                    .map(|&f| self.maps.remove_frontend(f))
                    .find_map(Result::err)
            })
            .collect();
        let tables: Vec<(u32, Option<&[u32]>)> = gone
            .iter()
            .filter(|(_, p)| p.has_table)
            .map(|(_, p)| (p.id, None))
            .collect();
        let mut table_results = self.maps.write_maglev(&tables).into_iter();
        for (i, (key, p)) in gone.into_iter().enumerate() {
            let table = p
                .has_table
                .then(|| table_results.next().and_then(Result::err))
                .flatten();
            let ranges = p
                .ranges
                .iter()
                .map(|&r| self.maps.remove_source_range(p.id, r))
                .find_map(Result::err);
            let backends = p
                .backend_ids
                .values()
                .map(|&bid| self.maps.clear_backend(bid))
                .find_map(Result::err);
            if let Some(e) = frontend_errors[i].take().or(table).or(ranges).or(backends) {
                match key {
                    Some(k) => failed.push((k, format!("{e:#}"))),
                    None => tracing::warn!(service_id = p.id, "removing a stale service: {e:#}"),
                }
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
    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut s = Snapshot {
            frontends: self.frontends.iter().map(|(k, e)| (*k, e.id)).collect(),
            backends: self.backends.iter().map(|(id, b)| (*id, *b)).collect(),
            tables: self.maglev.keys().copied().collect(),
            source_ranges: self.source_ranges.iter().copied().collect(),
        };
        // Deterministic, like a map walk would be for the same contents.
        s.frontends.sort_by_key(|(k, _)| (k.addr, k.port, k.proto));
        s.backends.sort_by_key(|(id, _)| *id);
        s.tables.sort_unstable();
        Ok(s)
    }
}
