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
    Backend, FrontendKey, ServiceEntry, BACKEND_F_PRESENT, BACKEND_F_TERMINATING, BACKEND_F_USABLE,
    MAX_BACKENDS, MAX_SERVICES, SERVICE_F_AFFINITY, SERVICE_F_NODEPORT,
};

use crate::{
    maglev::{table_size_for, MaglevTable},
    model::{DesiredState, FrontendKind, ServicePort, ServicePortKey},
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
    d.removed = old.keys().filter(|k| !new.services.contains_key(*k)).cloned().collect();
    d
}

/// The writes the datapath maps accept.
pub trait DatapathMaps {
    fn set_backend(&mut self, id: u32, backend: Backend) -> anyhow::Result<()>;
    fn clear_backend(&mut self, id: u32) -> anyhow::Result<()>;
    /// Replaces the service's Maglev table in one step (`slots` are backend ids).
    fn set_maglev(&mut self, service_id: u32, slots: &[u32]) -> anyhow::Result<()>;
    fn remove_maglev(&mut self, service_id: u32) -> anyhow::Result<()>;
    fn set_frontend(&mut self, key: FrontendKey, entry: ServiceEntry) -> anyhow::Result<()>;
    fn remove_frontend(&mut self, key: FrontendKey) -> anyhow::Result<()>;
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
        IdAllocator { next: 1, limit, free: BTreeSet::new() }
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
    pub fn apply(&mut self, desired: &DesiredState) -> Report {
        let specs: BTreeMap<ServicePortKey, ServicePort> =
            self.programmed.iter().map(|(k, p)| (k.clone(), p.spec.clone())).collect();
        let d = diff(&specs, desired);
        let mut failed = Vec::new();

        for key in &d.removed {
            if let Err(e) = self.remove(key) {
                failed.push((key.clone(), format!("{e:#}")));
            }
        }
        // Free frontends that changed hands before anyone claims them.
        for key in &d.changed {
            let new: BTreeSet<FrontendKey> = frontend_keys(&desired.services[key]).collect();
            let stale: Vec<FrontendKey> =
                frontend_keys(&self.programmed[key].spec).filter(|f| !new.contains(f)).collect();
            for f in stale {
                if let Err(e) = self.maps.remove_frontend(f) {
                    failed.push((key.clone(), format!("{e:#}")));
                }
            }
        }
        for key in d.added.iter().chain(&d.changed) {
            if let Err(e) = self.program(&desired.services[key]) {
                failed.push((key.clone(), format!("{e:#}")));
                // Forget it so the next apply rewrites it from scratch.
                if let Some(p) = self.programmed.remove(key) {
                    self.release(p);
                }
            }
        }
        Report { diff: d, failed }
    }

    fn program(&mut self, spec: &ServicePort) -> anyhow::Result<()> {
        let existing = self.programmed.remove(&spec.key);
        let id = match &existing {
            Some(p) => p.id,
            None => self
                .service_ids
                .allocate()
                .ok_or_else(|| anyhow::anyhow!("service table is full ({MAX_SERVICES} service ports)"))?,
        };
        let mut old_backends = existing.as_ref().map(|p| p.backend_ids.clone()).unwrap_or_default();
        let mut state = Programmed { id, spec: spec.clone(), backend_ids: BTreeMap::new() };

        let usable: BTreeSet<(Ipv4Addr, u16)> =
            spec.usable_endpoints().iter().map(|e| e.target()).collect();
        for e in &spec.endpoints {
            let bid = match old_backends.remove(&e.target()) {
                Some(bid) => bid,
                None => match self.backend_ids.allocate() {
                    Some(bid) => bid,
                    None => {
                        // Keep every id we hold on record so `apply` frees them.
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
            let b = Backend { addr: e.addr.octets(), port: e.port, flags, _pad: 0, service_id: id };
            if let Err(err) = self.maps.set_backend(bid, b) {
                state.backend_ids.append(&mut old_backends);
                self.programmed.insert(spec.key.clone(), state);
                return Err(err);
            }
        }
        // Whatever happens below, the ids we hold are recorded.
        let stale_backends = std::mem::take(&mut old_backends);
        self.programmed.insert(spec.key.clone(), state);

        let (table_size, count) = if usable.is_empty() {
            self.maps.remove_maglev(id)?;
            (0, 0)
        } else {
            let addrs: Vec<(Ipv4Addr, u16)> = usable.iter().copied().collect();
            let table = MaglevTable::build(&addrs, table_size_for(addrs.len()));
            let ids = &self.programmed[&spec.key].backend_ids;
            let slots: Vec<u32> = table.slots.iter().map(|&i| ids[&table.backends[i as usize]]).collect();
            self.maps.set_maglev(id, &slots)?;
            (table.size(), addrs.len() as u32)
        };

        for f in &spec.frontends {
            let mut flags = 0;
            if spec.affinity_timeout_s.is_some() {
                flags |= SERVICE_F_AFFINITY;
            }
            if f.kind == FrontendKind::NodePort {
                flags |= SERVICE_F_NODEPORT;
            }
            let entry = ServiceEntry {
                id,
                table_size,
                backend_count: count,
                affinity_timeout_s: spec.affinity_timeout_s.unwrap_or(0),
                flags,
                _pad: [0; 3],
            };
            self.maps.set_frontend(frontend_key(f), entry)?;
        }

        for (_, bid) in stale_backends {
            self.maps.clear_backend(bid)?;
            self.backend_ids.release(bid);
        }
        Ok(())
    }

    fn remove(&mut self, key: &ServicePortKey) -> anyhow::Result<()> {
        let Some(p) = self.programmed.remove(key) else { return Ok(()) };
        let result = (|| {
            for f in frontend_keys(&p.spec) {
                self.maps.remove_frontend(f)?;
            }
            self.maps.remove_maglev(p.id)?;
            for &bid in p.backend_ids.values() {
                self.maps.clear_backend(bid)?;
            }
            Ok(())
        })();
        self.release(p);
        result
    }

    fn release(&mut self, p: Programmed) {
        for bid in p.backend_ids.into_values() {
            self.backend_ids.release(bid);
        }
        self.service_ids.release(p.id);
    }
}

pub fn frontend_key(f: &crate::model::Frontend) -> FrontendKey {
    FrontendKey { addr: f.addr.octets(), port: f.port, proto: f.protocol.number(), _pad: 0 }
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
    fn set_maglev(&mut self, service_id: u32, slots: &[u32]) -> anyhow::Result<()> {
        self.log.push(format!("set_maglev {service_id}"));
        self.maglev.insert(service_id, slots.to_vec());
        Ok(())
    }
    fn remove_maglev(&mut self, service_id: u32) -> anyhow::Result<()> {
        self.log.push(format!("remove_maglev {service_id}"));
        self.maglev.remove(&service_id);
        Ok(())
    }
    fn set_frontend(&mut self, key: FrontendKey, entry: ServiceEntry) -> anyhow::Result<()> {
        self.log.push(format!("set_frontend {:?}:{}", key.addr, key.port));
        self.frontends.insert(key, entry);
        Ok(())
    }
    fn remove_frontend(&mut self, key: FrontendKey) -> anyhow::Result<()> {
        self.log.push(format!("remove_frontend {:?}:{}", key.addr, key.port));
        self.frontends.remove(&key);
        Ok(())
    }
}
