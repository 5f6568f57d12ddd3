//! The plan: from what is programmed (`State`), the desired state and the
//! service ports a change touched, the map writes to make, in phases. Pure:
//! nothing here touches a map.
//!
//! Phases keep every packet's view consistent whatever subset of the
//! writes succeeds (the executor skips a service port's later phases once
//! one of its writes failed):
//!
//! 1. `Unhook`: frontends nobody wants any more are removed.
//! 2. `Prepare`: backends and source ranges are written.
//! 3. `Tables`: Maglev tables are written whole (keyed by id and size, so
//!    a frontend still naming the old size keeps finding the old table).
//! 4. `Hook`: frontends are pointed at the new table.
//! 5. `Cleanup`: tables of other sizes, stale ranges and stale backends go.

use lb_common::addr;
use std::{
    collections::{BTreeMap, BTreeSet},
    hash::Hash,
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    Backend, FrontendKey, MaglevKey, ServiceEntry, BACKEND_F_LOCAL, BACKEND_F_PRESENT,
    BACKEND_F_TERMINATING, BACKEND_F_USABLE, FRONTEND_VIEW_ALL, FRONTEND_VIEW_IN_CLUSTER,
    SERVICE_F_AFFINITY, SERVICE_F_EXTERNAL, SERVICE_F_LOCAL, SERVICE_F_SOURCE_RANGES,
    SERVICE_F_TABLE_B,
};

use super::state::{half_after, Record, State, TableTarget, Write};
use crate::{
    model::{DesiredState, Frontend, FrontendKind, Scope, ServicePort, ServicePortKey},
    plan::maglev::{table_size_for, TableSpec},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Unhook,
    Prepare,
    Tables,
    Hook,
    Cleanup,
}

/// Whose write this is: a service port, or a service id nothing owns.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    Port(ServicePortKey),
    Orphan(u32),
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Unhook,
        Phase::Prepare,
        Phase::Tables,
        Phase::Hook,
        Phase::Cleanup,
    ];
}

/// One write, and whose it is (an index into `Plan::owners`: a plan of
/// 100,000 service ports has about a million writes, and a key per write
/// would cost tens of MiB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub owner: u32,
    pub write: Write,
}

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

/// The diff of `new` against a map of programmed specs.
pub fn diff(old: &BTreeMap<ServicePortKey, Arc<ServicePort>>, new: &DesiredState) -> Diff {
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

#[derive(Debug, Default)]
pub struct Plan {
    /// Ownership records to set (`Some`) or drop (`None`) before writing.
    pub records: Vec<(ServicePortKey, Option<Record>)>,
    /// Whose the writes are.
    pub owners: Vec<Owner>,
    /// The writes, by phase (`Phase::ALL` order), each owner's in order.
    pub phases: [Vec<Step>; 5],
    pub diff: Diff,
    /// Service ports that took over a service id a previous agent (or a
    /// failed removal) left, keeping its backends' ids.
    pub adopted: usize,
    /// Orphaned service ids being deleted.
    pub orphans: usize,
    /// Service ports that could not be planned at all (a table is full).
    pub refused: Vec<(ServicePortKey, String)>,
}

impl Plan {
    /// Adds an owner's writes.
    fn add(&mut self, owner: Owner, writes: Vec<(Phase, Write)>) {
        if writes.is_empty() {
            return;
        }
        let owner_index = self.owners.len() as u32;
        self.owners.push(owner);
        for (phase, write) in writes {
            self.phases[phase as usize].push(Step {
                owner: owner_index,
                write,
            });
        }
    }

    /// Every write, in the order the executor runs them.
    pub fn steps(&self) -> impl Iterator<Item = (Phase, &Step)> {
        Phase::ALL
            .iter()
            .zip(&self.phases)
            .flat_map(|(&phase, steps)| steps.iter().map(move |s| (phase, s)))
    }
}

/// Plans the writes that bring the maps from `state` to `desired`, over
/// the service ports in `only` (every one if `None`). Orphaned ids are
/// always cleaned up.
pub fn plan(
    state: &State,
    desired: &DesiredState,
    only: Option<&BTreeSet<ServicePortKey>>,
) -> Plan {
    let mut p = Plan::default();
    let keys: BTreeSet<&ServicePortKey> = match only {
        Some(keys) => keys.iter().collect(),
        None => desired
            .services
            .keys()
            .chain(state.records.keys())
            .collect(),
    };
    let mut fresh_services = state.service_ids.peek();
    let mut fresh_backends = state.backend_ids.peek();
    let mut adopted_ids = BTreeSet::new();
    for key in keys {
        let record = state.records.get(key);
        let Some(spec) = desired.services.get(key) else {
            if let Some(r) = record {
                p.diff.removed.push(key.clone());
                p.records.push((key.clone(), None));
                p.add(Owner::Port(key.clone()), remove_held(state, r.id));
            }
            continue;
        };
        let record = match record {
            Some(r) if r.spec.as_ref() == Some(spec) => continue,
            Some(r) => {
                p.diff.changed.push(key.clone());
                r.clone()
            }
            None => match take_over(state, spec, &adopted_ids) {
                Some(r) => {
                    p.diff.changed.push(key.clone());
                    p.adopted += 1;
                    adopted_ids.insert(r.id);
                    r
                }
                None => {
                    let Some(id) = fresh_services.next() else {
                        p.refused.push((
                            key.clone(),
                            format!(
                                "the service table is full ({} service ports)",
                                state.service_ids.limit() - 1
                            ),
                        ));
                        continue;
                    };
                    p.diff.added.push(key.clone());
                    Record {
                        id,
                        spec: None,
                        backend_ids: BTreeMap::new(),
                    }
                }
            },
        };
        match plan_port(state, spec, record, &mut fresh_backends) {
            Ok((record, writes)) => {
                p.records.push((key.clone(), Some(record)));
                p.add(Owner::Port(key.clone()), writes);
            }
            Err(why) => p.refused.push((key.clone(), why)),
        }
    }
    for &id in state.orphans.difference(&adopted_ids) {
        p.orphans += 1;
        p.add(Owner::Orphan(id), remove_held(state, id));
    }
    p
}

/// The orphaned service id one of `spec`'s frontends leads to, as a record
/// that keeps its backends' ids (matched by address and port).
fn take_over(state: &State, spec: &ServicePort, taken: &BTreeSet<u32>) -> Option<Record> {
    let id = spec
        .frontends
        .iter()
        .filter_map(|f| state.frontends.get(&frontend_key(f)))
        .map(|e| e.id)
        .find(|id| state.orphans.contains(id) && !taken.contains(id))?;
    let mut backend_ids = BTreeMap::new();
    for &bid in &state.held(id)?.backends {
        let b = state.backends[&bid];
        backend_ids
            .entry((addr::to_ip(&b.addr), b.port))
            .or_insert(bid);
    }
    Some(Record {
        id,
        spec: None,
        backend_ids,
    })
}

/// The writes for one desired service port, and its new record.
fn plan_port(
    state: &State,
    spec: &Arc<ServicePort>,
    old: Record,
    fresh_backends: &mut impl Iterator<Item = u32>,
) -> Result<(Record, Vec<(Phase, Write)>), String> {
    let id = old.id;
    let mut steps = Vec::new();
    let mut step = |phase, write| steps.push((phase, write));
    let empty = Default::default();
    let held = state.held(id).unwrap_or(&empty);

    let usable: BTreeSet<(IpAddr, u16)> =
        spec.usable_endpoints().iter().map(|e| e.target()).collect();
    let mut backend_ids = BTreeMap::new();
    for e in &spec.endpoints {
        let bid = match old.backend_ids.get(&e.target()) {
            Some(&bid) => bid,
            None => fresh_backends.next().ok_or_else(|| {
                format!(
                    "the backend table is full ({} backends)",
                    state.backend_ids.limit() - 1
                )
            })?,
        };
        backend_ids.insert(e.target(), bid);
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
            addr: addr::from_ip(e.addr),
            port: e.port,
            flags,
            _pad: 0,
            service_id: id,
        };
        if state.backends.get(&bid) != Some(&b) {
            step(Phase::Prepare, Write::SetBackend(bid, b));
        }
    }
    for r in &spec.source_ranges {
        if !held.ranges.contains(r) {
            step(Phase::Prepare, Write::SetRange(id, *r));
        }
    }

    // The half of the table the frontends are to read.
    let mut half = 0;
    let (table_size, count) = if usable.is_empty() {
        (0, 0)
    } else {
        let size = table_size_for(usable.len());
        let table = TableSpec::new(usable.iter().map(|t| (*t, backend_ids[t])).collect(), size);
        let digest = table.digest();
        let count = table.backends.len() as u32;
        let key = MaglevKey {
            service_id: id,
            table_size: size,
        };
        match held.tables.get(&size) {
            Some(t) if t.digest == digest => half = t.live.unwrap_or(0),
            held_table => {
                let target = match held_table {
                    Some(t) => t.target(state.halves_read(key)),
                    None => TableTarget::Fresh,
                };
                half = half_after(target);
                step(
                    Phase::Tables,
                    Write::SetTable(key, Box::new(table), digest, target),
                );
            }
        }
        (size, count)
    };

    let wanted: BTreeSet<FrontendKey> = spec.frontends.iter().map(frontend_key).collect();
    for &f in held.frontends.iter().filter(|f| !wanted.contains(f)) {
        step(Phase::Unhook, Write::RemoveFrontend(f));
    }
    for f in &spec.frontends {
        let entry = ServiceEntry {
            id,
            table_size,
            backend_count: count,
            affinity_timeout_s: spec.affinity_timeout_s.unwrap_or(0),
            flags: frontend_flags(spec, f) | if half == 1 { SERVICE_F_TABLE_B } else { 0 },
            _pad: [0; 3],
        };
        let key = frontend_key(f);
        if state.frontends.get(&key) != Some(&entry) {
            step(Phase::Hook, Write::SetFrontend(key, entry));
        }
    }

    for &size in held.tables.keys().filter(|&&s| s != table_size) {
        let key = MaglevKey {
            service_id: id,
            table_size: size,
        };
        step(Phase::Cleanup, Write::RemoveTable(key));
    }
    for r in held
        .ranges
        .iter()
        .filter(|r| !spec.source_ranges.contains(r))
    {
        step(Phase::Cleanup, Write::RemoveRange(id, *r));
    }
    let kept: BTreeSet<u32> = backend_ids.values().copied().collect();
    for &bid in held.backends.iter().filter(|b| !kept.contains(b)) {
        step(Phase::Cleanup, Write::ClearBackend(bid));
    }
    let record = Record {
        id,
        spec: Some(spec.clone()),
        backend_ids,
    };
    Ok((record, steps))
}

/// Every write that deletes what the maps hold for service id `id`:
/// frontends first, the rest once nothing leads to it.
fn remove_held(state: &State, id: u32) -> Vec<(Phase, Write)> {
    let mut steps = Vec::new();
    let Some(held) = state.held(id) else {
        return steps;
    };
    let mut step = |phase, write| steps.push((phase, write));
    for &f in &held.frontends {
        step(Phase::Unhook, Write::RemoveFrontend(f));
    }
    for &size in held.tables.keys() {
        let key = MaglevKey {
            service_id: id,
            table_size: size,
        };
        step(Phase::Cleanup, Write::RemoveTable(key));
    }
    for &r in &held.ranges {
        step(Phase::Cleanup, Write::RemoveRange(id, r));
    }
    for &bid in &held.backends {
        step(Phase::Cleanup, Write::ClearBackend(bid));
    }
    steps
}

/// `SERVICE_F_*` of one frontend of a service port.
pub fn frontend_flags(spec: &ServicePort, f: &Frontend) -> u8 {
    let mut flags = 0;
    if spec.affinity_timeout_s.is_some() {
        flags |= SERVICE_F_AFFINITY;
    }
    // The in-cluster view is reached like a ClusterIP: no masquerade for
    // a backend on another node (kube-proxy's short-circuit keeps the pod's
    // address too).
    if f.kind.is_external() && !f.in_cluster {
        flags |= SERVICE_F_EXTERNAL;
    }
    // Local with no endpoint anywhere is refused like any service without
    // endpoints (kube-proxy's REJECT); with endpoints elsewhere only, the
    // datapath drops (see `ServicePort::endpoints_anywhere`).
    if spec.key.scope == Scope::Local && spec.endpoints_anywhere {
        flags |= SERVICE_F_LOCAL;
    }
    if f.kind == FrontendKind::LoadBalancer && !spec.source_ranges.is_empty() {
        flags |= SERVICE_F_SOURCE_RANGES;
    }
    flags
}

pub fn frontend_key(f: &Frontend) -> FrontendKey {
    FrontendKey {
        addr: addr::from_ip(f.addr),
        port: f.port,
        proto: f.protocol.number(),
        view: if f.in_cluster {
            FRONTEND_VIEW_IN_CLUSTER
        } else {
            FRONTEND_VIEW_ALL
        },
    }
}
