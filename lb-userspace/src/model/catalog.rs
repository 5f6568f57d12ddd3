//! The Services and EndpointSlices the agent knows, changed one object at
//! a time, and the desired state built from them incrementally: the file
//! source and the Kubernetes source both feed this, and both get the same
//! model (`model::build_service` and `model::assemble`).
//!
//! An event marks the Service it concerns dirty; `rebuild` rebuilds only
//! dirty Services and reports which service ports may have changed, so one
//! endpoint turning unready costs one Service's build and one service
//! port's map writes, whatever the cluster size. Only when the set of
//! frontends a Service asks for changes (a Service created, deleted, or
//! given another IP or port) is the frontend ownership among all Services
//! worked out again.
//!
//! The catalog is the agent's object store (kube-runtime's reflector would
//! keep a second copy of every object, and could not say which Service an
//! event touches).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    assemble, build_service, object_key, partial_reason, trim, validate_slice, DesiredState,
    FrontendId, NodeConfig, NodeNames, ObjectKey, Outcome, Rejection, ServiceBuild, ServiceInput,
    ServicePortKey, ValidSlice,
};

#[derive(Debug, Default)]
pub struct Catalog {
    node: NodeConfig,
    /// Services as the model reads them (not the API objects: see
    /// `ServiceInput`).
    services: BTreeMap<ObjectKey, ServiceInput>,
    /// Valid slices by slice key, with the Service each belongs to.
    slices: BTreeMap<ObjectKey, ValidSlice>,
    /// (Service, slice) for each slice: one set for all Services, since a
    /// set per Service costs a node of ~500 bytes for its first slice.
    slices_of: BTreeSet<(ObjectKey, ObjectKey)>,
    node_names: NodeNames,
    builds: BTreeMap<ObjectKey, ServiceBuild>,
    /// Services whose ports are in `state`.
    programmed: BTreeSet<ObjectKey>,
    /// Frontends of a Service another Service holds (from the last
    /// ownership pass), and which.
    lost: BTreeMap<ObjectKey, BTreeMap<FrontendId, String>>,
    state: DesiredState,
    dirty: BTreeSet<ObjectKey>,
    /// Problems already reported, by object: each is logged once per cause.
    reported: BTreeMap<String, String>,
    /// The parts so far of a list in progress.
    listing_services: Option<Vec<(ObjectKey, ServiceInput)>>,
    listing_slices: Option<Vec<(ObjectKey, Checked)>>,
}

/// A slice as validation left it: valid (`None`: not ours to program) or
/// rejected.
type Checked = Result<Option<ValidSlice>, Rejection>;

/// What a `rebuild` changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Service ports that may differ from before (`None`: any of them).
    pub keys: Option<BTreeSet<ServicePortKey>>,
    /// Rejections, skips and partly programmed Services not reported
    /// before.
    pub rejections: Vec<Rejection>,
    pub skipped: Vec<Rejection>,
    pub partial: Vec<Rejection>,
    /// Services rebuilt.
    pub services: usize,
}

/// The keys of `held` a completed list did not name.
fn unseen<V>(held: &BTreeMap<ObjectKey, V>, seen: &BTreeSet<ObjectKey>) -> Vec<ObjectKey> {
    held.keys()
        .filter(|k| !seen.contains(*k))
        .cloned()
        .collect()
}

impl Catalog {
    pub fn new(node: NodeConfig) -> Catalog {
        Catalog {
            node,
            ..Default::default()
        }
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    pub fn node(&self) -> &NodeConfig {
        &self.node
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    /// Node facts changed (addresses): every Service is rebuilt.
    pub fn set_node(&mut self, node: NodeConfig) {
        self.node = node;
        self.dirty.extend(self.services.keys().cloned());
    }

    pub fn apply_service(&mut self, svc: &Service) {
        self.put_service(object_key(&svc.metadata), ServiceInput::of(svc));
    }

    fn put_service(&mut self, key: ObjectKey, svc: ServiceInput) {
        if self.services.get(&key) != Some(&svc) {
            self.services.insert(key.clone(), svc);
            self.dirty.insert(key);
        }
    }

    pub fn delete_service(&mut self, svc: &Service) {
        let key = object_key(&svc.metadata);
        if self.services.remove(&key).is_some() {
            self.dirty.insert(key);
        }
    }

    /// Replaces every Service (a relist, or a reread file): Services gone
    /// from `all` are deleted.
    pub fn replace_services(&mut self, all: &[Service]) {
        self.begin_services_list();
        self.list_services(all, true);
    }

    /// A list of every Service begins; it comes in parts (`list_services`)
    /// and is applied whole, as one change, with its last part.
    pub fn begin_services_list(&mut self) {
        self.listing_services = Some(Vec::new());
    }

    /// One part of the list of every Service. With the `last` one the list
    /// is applied: the Services no part named are deleted.
    pub fn list_services(&mut self, part: &[Service], last: bool) {
        let mut all = self.listing_services.take().unwrap_or_default();
        all.extend(
            part.iter()
                .map(|svc| (object_key(&svc.metadata), ServiceInput::of(svc))),
        );
        if !last {
            self.listing_services = Some(all);
            return;
        }
        let seen: BTreeSet<ObjectKey> = all.iter().map(|(key, _)| key.clone()).collect();
        for (key, svc) in all {
            self.put_service(key, svc);
        }
        for key in unseen(&self.services, &seen) {
            self.services.remove(&key);
            self.dirty.insert(key);
        }
    }

    /// Adds or updates a slice. An invalid one is rejected (returned for
    /// the log) and treated as deleted: its endpoints leave the Service.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Option<Rejection> {
        let checked = validate_slice(slice, &mut self.node_names);
        self.put_checked(object_key(&slice.metadata), checked)
    }

    /// Puts a validated slice (an invalid one is forgotten); returns its
    /// rejection if not reported before.
    fn put_checked(&mut self, key: ObjectKey, checked: Checked) -> Option<Rejection> {
        let (valid, rejection) = match checked {
            Ok(v) => (v, None),
            Err(r) => (None, Some(r)),
        };
        self.put_slice(key, valid);
        rejection.filter(|r| self.first_report(r))
    }

    pub fn delete_slice(&mut self, slice: &EndpointSlice) {
        self.forget_slice(object_key(&slice.metadata));
    }

    fn forget_slice(&mut self, key: ObjectKey) {
        self.reported
            .remove(&format!("EndpointSlice {}/{}", key.0, key.1));
        self.put_slice(key, None);
    }

    /// Replaces every slice (a relist, or a reread file); returns the
    /// rejections not reported before.
    pub fn replace_slices(&mut self, all: &[EndpointSlice]) -> Vec<Rejection> {
        self.begin_slices_list();
        self.list_slices(all, true)
    }

    /// A list of every EndpointSlice begins; it comes in parts
    /// (`list_slices`) and is applied whole, as one change, with its last
    /// part.
    pub fn begin_slices_list(&mut self) {
        self.listing_slices = Some(Vec::new());
    }

    /// One part of the list of every EndpointSlice, kept validated (a few
    /// bytes an endpoint, not the API's objects). With the `last` one the
    /// list is applied: the slices no part named are forgotten. Returns
    /// the rejections not reported before.
    pub fn list_slices(&mut self, part: &[EndpointSlice], last: bool) -> Vec<Rejection> {
        let mut all = self.listing_slices.take().unwrap_or_default();
        let names = &mut self.node_names;
        all.extend(
            part.iter()
                .map(|slice| (object_key(&slice.metadata), validate_slice(slice, names))),
        );
        if !last {
            self.listing_slices = Some(all);
            return Vec::new();
        }
        let seen: BTreeSet<ObjectKey> = all.iter().map(|(key, _)| key.clone()).collect();
        let mut rejections = Vec::new();
        for (key, checked) in all {
            rejections.extend(self.put_checked(key, checked));
        }
        for key in unseen(&self.slices, &seen) {
            self.forget_slice(key);
        }
        rejections
    }

    fn put_slice(&mut self, key: ObjectKey, valid: Option<ValidSlice>) {
        let old = match valid {
            Some(v) => {
                if self.slices.get(&key) == Some(&v) {
                    return;
                }
                let owner = v.service_key();
                self.slices_of.insert((owner.clone(), key.clone()));
                self.dirty.insert(owner);
                self.slices.insert(key.clone(), v)
            }
            None => self.slices.remove(&key),
        };
        // The slice left its old Service (deleted, or relabelled).
        if let Some(old) = old {
            let owner = old.service_key();
            let still = self.slices.get(&key).map(ValidSlice::service_key);
            if still.as_ref() != Some(&owner) {
                self.slices_of.remove(&(owner.clone(), key.clone()));
            }
            self.dirty.insert(owner);
        }
    }

    /// True if something changed since the last `rebuild`.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Rebuilds the dirty Services into the desired state.
    pub fn rebuild(&mut self) -> Rebuilt {
        let dirty = std::mem::take(&mut self.dirty);
        let mut out = Rebuilt {
            services: dirty.len(),
            ..Default::default()
        };
        let mut ownership_changed = false;
        let mut rebuilt = Vec::new();
        for key in &dirty {
            let old = self.builds.remove(key);
            let new = self.services.get(key).map(|svc| {
                let slices: Vec<&ValidSlice> = self
                    .slices_of
                    .range((key.clone(), Default::default())..)
                    .take_while(|(owner, _)| owner == key)
                    .filter_map(|(_, s)| self.slices.get(s))
                    .collect();
                build_service(svc, &slices, &self.node)
            });
            let frontends = |b: &Option<ServiceBuild>| b.as_ref().map(ServiceBuild::frontends);
            ownership_changed |= frontends(&old) != frontends(&new);
            if let Some(b) = &new {
                self.builds.insert(key.clone(), b.clone());
            }
            rebuilt.push((key.clone(), old, new));
        }
        if ownership_changed {
            let mut ordered: Vec<&ServiceBuild> = self.builds.values().collect();
            ordered.sort_by(|a, b| a.order.cmp(&b.order));
            let assembled = assemble(ordered);
            self.programmed = self
                .builds
                .iter()
                .filter(|(_, b)| match &b.outcome {
                    Outcome::Program { ports, .. } => ports
                        .iter()
                        .any(|p| assembled.state.services.contains_key(&p.key)),
                    _ => false,
                })
                .map(|(k, _)| k.clone())
                .collect();
            self.state = assembled.state;
            self.lost = assembled.lost;
            out.keys = None;
            out.rejections = assembled.rejections;
            out.skipped = assembled.skipped;
            out.partial = assembled.partial;
            // Deleted Services: a later one of the same name is new.
            let live: BTreeSet<&str> = self.builds.values().map(|b| b.object.as_str()).collect();
            self.reported.retain(|object, _| {
                live.contains(object.as_str()) || object.starts_with("EndpointSlice ")
            });
        } else {
            let mut keys = BTreeSet::new();
            for (key, old, new) in rebuilt {
                if !self.programmed.contains(&key) {
                    // A service that lost a frontend conflict, skipped or
                    // rejected, with the same (no) frontends as before.
                    if let Some(b) = &new {
                        collect_problem(b, &mut out);
                    }
                    continue;
                }
                for (k, hc_port) in ports_of(old.as_ref()) {
                    self.state.services.remove(&k);
                    if let Some(p) = hc_port {
                        self.state.health_checks.remove(&p);
                    }
                    keys.insert(k);
                }
                if let Some(Outcome::Program {
                    ports,
                    health_check,
                    notes,
                }) = new.as_ref().map(|b| &b.outcome)
                {
                    // The same frontends as before: the same ones lost.
                    let lost = self.lost.get(&key);
                    if let Some(why) = partial_reason(notes, lost) {
                        out.partial.push(Rejection {
                            object: new.as_ref().map(|b| b.object.clone()).unwrap_or_default(),
                            reason: why,
                        });
                    }
                    for p in trim(ports, lost) {
                        keys.insert(p.key.clone());
                        self.state.services.insert(p.key.clone(), p);
                    }
                    if let Some((port, hc)) = health_check {
                        self.state.health_checks.insert(*port, hc.clone());
                    }
                }
            }
            out.keys = Some(keys);
        }
        out.rejections.retain(|r| self.first_report(r));
        out.skipped.retain(|r| self.first_report(r));
        out.partial.retain(|r| self.first_report(r));
        out
    }

    /// True the first time this object has this problem.
    fn first_report(&mut self, r: &Rejection) -> bool {
        self.reported.get(&r.object) != Some(&r.reason) && {
            self.reported.insert(r.object.clone(), r.reason.clone());
            true
        }
    }
}

/// The service port keys (and health-check port) a build contributed.
fn ports_of(b: Option<&ServiceBuild>) -> Vec<(ServicePortKey, Option<u16>)> {
    match b.map(|b| &b.outcome) {
        Some(Outcome::Program {
            ports,
            health_check,
            ..
        }) => {
            let hc = health_check.as_ref().map(|(p, _)| *p);
            ports.iter().map(|p| (p.key.clone(), hc)).collect()
        }
        _ => Vec::new(),
    }
}

fn collect_problem(b: &ServiceBuild, out: &mut Rebuilt) {
    let r = |reason: &String| Rejection {
        object: b.object.clone(),
        reason: reason.clone(),
    };
    match &b.outcome {
        Outcome::Skip(reason) => out.skipped.push(r(reason)),
        Outcome::Reject(reason) => out.rejections.push(r(reason)),
        Outcome::Program { .. } => {}
    }
}
