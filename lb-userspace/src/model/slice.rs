//! EndpointSlices checked and reduced to what the model uses, and merged
//! per service port.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    port_number, Endpoint, Family, Hint, Hints, ObjectKey, Protocol, Rejection, ServicePortKey,
    SERVICE_NAME_LABEL,
};

fn slice_name(s: &EndpointSlice) -> String {
    format!(
        "EndpointSlice {}/{}",
        s.metadata.namespace.as_deref().unwrap_or("default"),
        s.metadata.name.as_deref().unwrap_or("<unnamed>")
    )
}

/// An EndpointSlice checked and reduced to what the model uses. The
/// catalog holds one per slice in the cluster (10,000 slices of 10
/// endpoints: 100,000 endpoints), so it is kept small: ports in a short
/// list rather than a map (a map's first node alone is ~400 bytes), node
/// names shared, hints boxed since most endpoints have none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidSlice {
    namespace: String,
    service: String,
    /// (port name, protocol, target port), each (name, protocol) once.
    ports: Vec<(String, Protocol, u16)>,
    endpoints: Vec<SliceEndpoint>,
}

/// One endpoint of a slice: 32 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SliceEndpoint {
    addr: IpAddr,
    conditions: Conditions,
    node: Option<Arc<str>>,
    hints: Option<Box<SliceHints>>,
}

/// The node names endpoints name, one copy each: a node's name is shared
/// by every endpoint on it. Names no endpoint uses any more (nodes gone)
/// are dropped whenever the set has doubled since the last such pass, so
/// the passes cost O(1) per name added.
#[derive(Debug, Default)]
pub struct NodeNames {
    names: HashSet<Arc<str>>,
    after_prune: usize,
}

impl NodeNames {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        if self.names.len() >= 2 * self.after_prune.max(64) {
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.after_prune = self.names.len();
        }
        let n: Arc<str> = name.into();
        self.names.insert(n.clone());
        n
    }
}

/// `hints.forNodes` and `hints.forZones` of an endpoint (names).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SliceHints {
    nodes: Vec<String>,
    zones: Vec<String>,
}

impl SliceHints {
    /// The endpoint's hints; `None` when it has none.
    fn of(e: &k8s_openapi::api::discovery::v1::Endpoint) -> Option<Box<SliceHints>> {
        let h = e.hints.as_ref();
        let hints = SliceHints {
            nodes: h
                .and_then(|h| h.for_nodes.as_ref())
                .map(|v| v.iter().map(|n| n.name.clone()).collect())
                .unwrap_or_default(),
            zones: h
                .and_then(|h| h.for_zones.as_ref())
                .map(|v| v.iter().map(|z| z.name.clone()).collect())
                .unwrap_or_default(),
        };
        (hints != SliceHints::default()).then(|| Box::new(hints))
    }

    /// As seen from `node` in `zone`.
    fn seen_from(hints: Option<&SliceHints>, node: &str, zone: Option<&str>) -> Hints {
        let none = SliceHints::default();
        let hints = hints.unwrap_or(&none);
        let hint = |names: &[String], here: Option<&str>| {
            if names.is_empty() {
                Hint::Absent
            } else if here.is_some_and(|h| names.iter().any(|n| n == h)) {
                Hint::Here
            } else {
                Hint::Elsewhere
            }
        };
        Hints {
            node: hint(&hints.nodes, Some(node).filter(|n| !n.is_empty())),
            zone: hint(&hints.zones, zone),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Conditions {
    ready: bool,
    serving: bool,
    terminating: bool,
}

impl ValidSlice {
    /// The Service this slice belongs to.
    pub fn service_key(&self) -> ObjectKey {
        (self.namespace.clone(), self.service.clone())
    }
}

/// Checks a slice: `Ok(None)` for slices the model ignores (FQDN, or not
/// for a Service), a rejection naming it if it is invalid. Node names
/// come from (and go into) `names`.
pub fn validate_slice(
    slice: &EndpointSlice,
    names: &mut NodeNames,
) -> Result<Option<ValidSlice>, Rejection> {
    check_slice(slice, names).map_err(|reason| Rejection {
        object: slice_name(slice),
        reason,
    })
}

fn check_slice(slice: &EndpointSlice, names: &mut NodeNames) -> Result<Option<ValidSlice>, String> {
    let labels = slice.metadata.labels.as_ref();
    let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        return Ok(None);
    };
    let v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        _ => return Ok(None),
    };
    let namespace = slice
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut ports: Vec<(String, Protocol, u16)> = Vec::new();
    for p in slice.ports.iter().flatten() {
        let name = p.name.clone().unwrap_or_default();
        // Ports of other protocols (SCTP) back no service port of ours.
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            _ => continue,
        };
        // A nil port means "all ports" to some consumers; it gives no
        // target port, so it cannot back a Service port.
        let Some(n) = p.port else { continue };
        let n = port_number("port", n)?;
        // A repeated (name, protocol): the last one counts.
        match ports
            .iter_mut()
            .find(|(m, q, _)| *m == name && *q == protocol)
        {
            Some(p) => p.2 = n,
            None => ports.push((name, protocol, n)),
        }
    }
    ports.shrink_to_fit();
    // Exactly as long as needed: 10,000 slices are held at once.
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for e in &slice.endpoints {
        let c = e.conditions.as_ref();
        // API semantics: nil ready means ready; nil serving defers to ready;
        // nil terminating means not terminating.
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let conditions = Conditions {
            ready,
            serving: c.and_then(|c| c.serving).unwrap_or(ready),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
        };
        // Like kube-proxy, only an endpoint's first address is used (the
        // API says consumers may assume the others are interchangeable).
        if let Some(a) = e.addresses.first() {
            let addr: IpAddr = a
                .parse()
                .ok()
                .filter(|ip: &IpAddr| ip.is_ipv6() == v6)
                .ok_or_else(|| {
                    format!(
                        "endpoint address {a:?} is not an {} address (addressType {})",
                        slice.address_type, slice.address_type
                    )
                })?;
            endpoints.push(SliceEndpoint {
                addr,
                conditions,
                node: e.node_name.as_deref().map(|n| names.get(n)),
                hints: SliceHints::of(e),
            });
        }
    }
    Ok(Some(ValidSlice {
        namespace,
        service: service.clone(),
        ports,
        endpoints,
    }))
}

/// Merges every slice of a service for one port: each endpoint once, with
/// the best conditions any slice gives it (a pod moving between slices is
/// listed twice for a moment). An endpoint is local when its nodeName is
/// this node's name; one without nodeName is remote (SNAT keeps its replies
/// right wherever it runs).
pub(super) fn endpoints_for(
    key: &ServicePortKey,
    slices: &[&ValidSlice],
    node_name: &str,
    zone: Option<&str>,
) -> Vec<Endpoint> {
    let mut merged: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    for s in slices {
        let Some(&(_, _, port)) = s
            .ports
            .iter()
            .find(|(name, protocol, _)| *name == key.port_name && *protocol == key.protocol)
        else {
            continue;
        };
        for se in &s.endpoints {
            // Each family's frontends lead to that family's endpoints.
            if Family::of(se.addr) != key.family {
                continue;
            }
            let c = &se.conditions;
            let local = !node_name.is_empty() && se.node.as_deref() == Some(node_name);
            let e = merged.entry((se.addr, port)).or_insert(Endpoint {
                addr: se.addr,
                port,
                ready: c.ready,
                serving: c.serving,
                terminating: c.terminating,
                local,
                hints: SliceHints::seen_from(se.hints.as_deref(), node_name, zone),
            });
            e.ready |= c.ready;
            e.serving |= c.serving;
            e.terminating &= c.terminating;
            e.local |= local;
        }
    }
    merged.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, nodes: &[String]) -> EndpointSlice {
        let endpoints: Vec<serde_json::Value> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| serde_json::json!({"addresses": [format!("198.18.1.{}", i + 1)], "nodeName": n}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints}))
        .expect("a valid EndpointSlice")
    }

    /// Endpoints on one node share one copy of its name, across slices;
    /// names no endpoint holds any more are dropped as new ones come.
    #[test]
    fn node_names_are_shared_and_the_unused_ones_dropped() {
        let mut names = NodeNames::default();
        let a = validate_slice(&slice("a", &["n1".into(), "n1".into()]), &mut names)
            .unwrap()
            .unwrap();
        let b = validate_slice(&slice("b", &["n1".into()]), &mut names)
            .unwrap()
            .unwrap();
        let n = |s: &ValidSlice, i: usize| s.endpoints[i].node.clone().unwrap();
        assert!(Arc::ptr_eq(&n(&a, 0), &n(&a, 1)));
        assert!(Arc::ptr_eq(&n(&a, 0), &n(&b, 0)));

        // 1,000 nodes come and go (their slices dropped); "n1" stays.
        for i in 0..1000 {
            let s = validate_slice(&slice("c", &[format!("gone-{i}")]), &mut names);
            drop(s);
        }
        assert!(names.names.len() < 200, "{} names held", names.names.len());
        assert!(names.names.contains("n1"));
        let again = validate_slice(&slice("d", &["n1".into()]), &mut names)
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(&n(&a, 0), &n(&again, 0)));
    }
}
