//! EndpointSlices checked and reduced to what the model uses, and merged
//! per service port.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    port_number, Endpoint, Hint, Hints, ObjectKey, Protocol, Rejection, ServicePortKey,
    SERVICE_NAME_LABEL,
};

fn slice_name(s: &EndpointSlice) -> String {
    format!(
        "EndpointSlice {}/{}",
        s.metadata.namespace.as_deref().unwrap_or("default"),
        s.metadata.name.as_deref().unwrap_or("<unnamed>")
    )
}

/// What a valid slice contributes.
/// An EndpointSlice checked and reduced to what the model uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidSlice {
    namespace: String,
    service: String,
    /// (port name, protocol) -> target port.
    ports: BTreeMap<(String, Protocol), u16>,
    /// Address, conditions, nodeName, hints.
    endpoints: Vec<(Ipv4Addr, Conditions, Option<String>, SliceHints)>,
}

/// `hints.forNodes` and `hints.forZones` of an endpoint (names).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SliceHints {
    nodes: Vec<String>,
    zones: Vec<String>,
}

impl SliceHints {
    fn of(e: &k8s_openapi::api::discovery::v1::Endpoint) -> SliceHints {
        let h = e.hints.as_ref();
        SliceHints {
            nodes: h
                .and_then(|h| h.for_nodes.as_ref())
                .map(|v| v.iter().map(|n| n.name.clone()).collect())
                .unwrap_or_default(),
            zones: h
                .and_then(|h| h.for_zones.as_ref())
                .map(|v| v.iter().map(|z| z.name.clone()).collect())
                .unwrap_or_default(),
        }
    }

    /// As seen from `node` in `zone`.
    fn seen_from(&self, node: &str, zone: Option<&str>) -> Hints {
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
            node: hint(&self.nodes, Some(node).filter(|n| !n.is_empty())),
            zone: hint(&self.zones, zone),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Conditions {
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// `Ok(None)` for slices we knowingly ignore (not IPv4, no service label).
impl ValidSlice {
    /// The Service this slice belongs to.
    pub fn service_key(&self) -> ObjectKey {
        (self.namespace.clone(), self.service.clone())
    }
}

/// Checks a slice: `Ok(None)` for slices the model ignores (not IPv4, or
/// not for a Service), a rejection naming it if it is invalid.
pub fn validate_slice(slice: &EndpointSlice) -> Result<Option<ValidSlice>, Rejection> {
    check_slice(slice).map_err(|reason| Rejection {
        object: slice_name(slice),
        reason,
    })
}

fn check_slice(slice: &EndpointSlice) -> Result<Option<ValidSlice>, String> {
    let labels = slice.metadata.labels.as_ref();
    let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        return Ok(None);
    };
    if slice.address_type != "IPv4" {
        return Ok(None);
    }
    let namespace = slice
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut ports = BTreeMap::new();
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
        ports.insert((name, protocol), port_number("port", n)?);
    }
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
            let addr: Ipv4Addr = a
                .parse()
                .map_err(|_| format!("endpoint address {a:?} is not an IPv4 address"))?;
            endpoints.push((addr, conditions, e.node_name.clone(), SliceHints::of(e)));
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
    slices: &[ValidSlice],
    node_name: &str,
    zone: Option<&str>,
) -> Vec<Endpoint> {
    let mut merged: BTreeMap<(Ipv4Addr, u16), Endpoint> = BTreeMap::new();
    for s in slices {
        let Some(&port) = s.ports.get(&(key.port_name.clone(), key.protocol)) else {
            continue;
        };
        for (addr, c, node, hints) in &s.endpoints {
            let local = !node_name.is_empty() && node.as_deref() == Some(node_name);
            let e = merged.entry((*addr, port)).or_insert(Endpoint {
                addr: *addr,
                port,
                ready: c.ready,
                serving: c.serving,
                terminating: c.terminating,
                local,
                hints: hints.seen_from(node_name, zone),
            });
            e.ready |= c.ready;
            e.serving |= c.serving;
            e.terminating &= c.terminating;
            e.local |= local;
        }
    }
    merged.into_values().collect()
}
