//! Services built one by one, then put together: who owns a frontend two
//! Services ask for is decided here, per frontend.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use super::{
    service::{validate_service, ServiceInput, ServiceVerdict},
    slice::endpoints_for,
    Build, Frontend, FrontendKind, HealthCheck, NodeConfig, ObjectKey, Protocol, Rejection, Scope,
    ServicePort, ValidSlice,
};

/// One Service built on its own, with its slices: everything except what
/// depends on other services (who owns a contested frontend).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceBuild {
    /// `Service ns/name`, for log lines.
    pub object: String,
    /// Older services keep a contested frontend (then by namespace and
    /// name): a new object cannot take an address away from a running one.
    pub order: (Option<i64>, String, String),
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Program {
        /// Shared with the desired state and the planner's records: one
        /// copy of each service port however many hold it.
        ports: Vec<Arc<ServicePort>>,
        health_check: Option<(u16, HealthCheck)>,
        /// Parts left out by validation (an SCTP port, a refused
        /// externalIP), for the log.
        notes: Vec<String>,
    },
    Skip(String),
    Reject(String),
}

/// (address, port, protocol): what two Services cannot share.
pub type FrontendId = (IpAddr, u16, Protocol);

impl ServiceBuild {
    pub fn key(&self) -> ObjectKey {
        (self.order.1.clone(), self.order.2.clone())
    }

    /// The frontends this service asks for (none unless programmable).
    pub fn frontends(&self) -> BTreeSet<(IpAddr, u16, Protocol)> {
        match &self.outcome {
            Outcome::Program { ports, .. } => ports
                .iter()
                .flat_map(|p| &p.frontends)
                .map(|f| (f.addr, f.port, f.protocol))
                .collect(),
            _ => BTreeSet::new(),
        }
    }
}

/// Builds one Service from its (validated) slices.
pub fn build_service(
    svc: &ServiceInput,
    slices: &[&ValidSlice],
    node: &NodeConfig,
) -> ServiceBuild {
    let object = svc.object();
    let (ns, name) = (svc.namespace.clone(), svc.name.clone().unwrap_or_default());
    let order = (svc.created, ns.clone(), name.clone());
    let outcome = match validate_service(svc, node) {
        Ok(ServiceVerdict::Program { ports, notes }) => {
            let mut local_ready = BTreeSet::new();
            let ports = ports
                .into_iter()
                .map(|mut port| {
                    let all = endpoints_for(&port.key, slices, &node.name, node.zone.as_deref());
                    local_ready.extend(all.iter().filter(|e| e.local && e.ready).map(|e| e.addr));
                    port.endpoints = all.clone();
                    port.endpoints_anywhere = !port.usable_endpoints().is_empty();
                    port.endpoints = match port.key.scope {
                        Scope::Cluster => all,
                        Scope::Local => all.into_iter().filter(|e| e.local).collect(),
                    };
                    Arc::new(port)
                })
                .collect();
            let health_check = svc.health_check_port().map(|port| {
                (
                    port,
                    HealthCheck {
                        namespace: ns,
                        name,
                        local_endpoints: local_ready.len(),
                    },
                )
            });
            Outcome::Program {
                ports,
                health_check,
                notes,
            }
        }
        Ok(ServiceVerdict::Skip(reason)) => Outcome::Skip(reason),
        Err(e) => Outcome::Reject(e.to_string()),
    };
    ServiceBuild {
        object,
        order,
        outcome,
    }
}

/// The desired state from services built one by one, given oldest first.
/// Conflicts are settled per frontend: ClusterIPs are claimed first (a
/// ClusterIP always wins over another Service's externalIP, load-balancer
/// IP or NodePort on the same address and port), then every other
/// frontend, oldest Service first. A frontend that is taken is left out of
/// the later Service with a log line; the rest of it is programmed.
pub fn assemble<'a>(ordered: impl IntoIterator<Item = &'a ServiceBuild>) -> Build {
    let ordered: Vec<&ServiceBuild> = ordered.into_iter().collect();
    let mut out = Build::default();
    let mut claimed: BTreeMap<FrontendId, &str> = BTreeMap::new();
    for cluster_ips in [true, false] {
        for b in &ordered {
            let Outcome::Program { ports, .. } = &b.outcome else {
                continue;
            };
            for f in ports.iter().flat_map(|p| &p.frontends) {
                if (f.kind == FrontendKind::ClusterIp) != cluster_ips {
                    continue;
                }
                let id = (f.addr, f.port, f.protocol);
                match claimed.get(&id) {
                    Some(owner) if *owner != b.object.as_str() => {
                        out.lost
                            .entry(b.key())
                            .or_default()
                            .insert(id, owner.to_string());
                    }
                    Some(_) => {}
                    None => {
                        claimed.insert(id, &b.object);
                    }
                }
            }
        }
    }
    for b in ordered {
        let reject = |reason: &String| Rejection {
            object: b.object.clone(),
            reason: reason.clone(),
        };
        match &b.outcome {
            Outcome::Skip(reason) => out.skipped.push(reject(reason)),
            Outcome::Reject(reason) => out.rejections.push(reject(reason)),
            Outcome::Program {
                ports,
                health_check,
                notes,
            } => {
                let lost = out.lost.get(&b.key());
                let kept = trim(ports, lost);
                if kept.is_empty() {
                    let why = partial_reason(&[], lost).unwrap_or_default();
                    out.rejections.push(reject(&why));
                    continue;
                }
                if let Some(why) = partial_reason(notes, lost) {
                    out.partial.push(reject(&why));
                }
                for port in kept {
                    out.state.services.insert(port.key.clone(), port);
                }
                if let Some((port, hc)) = health_check {
                    out.state.health_checks.insert(*port, hc.clone());
                }
            }
        }
    }
    out
}

/// `ports` without the frontends another Service holds; ports left with
/// no frontend are dropped.
pub fn trim(
    ports: &[Arc<ServicePort>],
    lost: Option<&BTreeMap<FrontendId, String>>,
) -> Vec<Arc<ServicePort>> {
    let is_lost =
        |f: &Frontend| lost.is_some_and(|l| l.contains_key(&(f.addr, f.port, f.protocol)));
    ports
        .iter()
        .filter_map(|p| {
            if !p.frontends.iter().any(is_lost) {
                return Some(p.clone());
            }
            let mut p = ServicePort::clone(p);
            p.frontends.retain(|f| !is_lost(f));
            (!p.frontends.is_empty()).then(|| Arc::new(p))
        })
        .collect()
}

/// One log line for whatever was left out of a Service, if anything.
pub fn partial_reason(
    notes: &[String],
    lost: Option<&BTreeMap<FrontendId, String>>,
) -> Option<String> {
    let mut parts: Vec<String> = notes.to_vec();
    for ((addr, port, proto), owner) in lost.into_iter().flatten() {
        parts.push(format!(
            "frontend {addr}:{port}/{proto} left out: it is already used by {owner}"
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}
