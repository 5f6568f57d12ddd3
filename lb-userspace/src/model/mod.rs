//! Desired state: what the datapath must do, built from Kubernetes Service
//! and EndpointSlice objects. Pure: objects in, a validated `DesiredState`
//! and a list of rejected objects (each with a reason) out.
//!
//! The unit is a *service port* (namespace/name, port name, protocol,
//! scope): it has its own frontends, backends (targetPort differs per port)
//! and Maglev table, like kube-proxy's per-port chains. The scope splits a
//! port whose traffic policies differ: frontends with policy Local (a
//! ClusterIP with internalTrafficPolicy Local, external frontends with
//! externalTrafficPolicy Local) get their own table of this node's
//! endpoints only.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

mod assemble;
pub mod catalog;
#[cfg(test)]
mod catalog_tests;
mod service;
mod slice;
#[cfg(test)]
mod tests;

pub use assemble::{
    assemble, build_service, partial_reason, trim, FrontendId, Outcome, ServiceBuild,
};
pub use service::{refuse_external_ip, ServiceError, ServiceInput};
pub use slice::{validate_slice, NodeNames, ValidSlice};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services with this label are left to a headless-aware proxy.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Services with this label belong to the proxy of that name only.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Kubernetes' default sessionAffinity ClientIP timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API server's upper bound for that timeout (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Which endpoints a service port's frontends lead to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every endpoint of the service (traffic policy Cluster).
    #[default]
    Cluster,
    /// This node's endpoints only (traffic policy Local).
    Local,
}

/// Identity of one port of one Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortKey {
    pub namespace: String,
    pub name: String,
    /// Empty for an unnamed (single) port.
    pub port_name: String,
    pub protocol: Protocol,
    pub scope: Scope,
    /// A dual-stack Service has a service port per family: each family's
    /// frontends lead to that family's endpoints only.
    pub family: Family,
}

/// An IP family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    #[default]
    V4,
    V6,
}

impl Family {
    pub const fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The name Kubernetes gives the family (`ipFamilies`, `addressType`).
    pub const fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

impl ServicePortKey {
    /// `namespace/name` of the Service.
    pub fn service(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for ServicePortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.protocol)?;
        if self.scope == Scope::Local {
            f.write_str("/local")?;
        }
        // IPv4 names are as they were before IPv6.
        if self.family == Family::V6 {
            f.write_str("/IPv6")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    /// `spec.externalIPs`.
    ExternalIp,
    /// `status.loadBalancer.ingress[].ip`.
    LoadBalancer,
}

impl FrontendKind {
    /// Reached from outside the cluster: externalTrafficPolicy applies.
    pub const fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

/// An IPv4 or IPv6 prefix (loadBalancerSourceRanges, CIDR flags), host
/// bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Prefix {
    /// Whether `ip` (of either family) lies inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Prefix::masked(ip, self.len).is_some_and(|a| a == self.addr)
    }

    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    /// `ip` with its host bits past `len` cleared; `None` if `len` is too
    /// long for its family.
    fn masked(ip: IpAddr, len: u8) -> Option<IpAddr> {
        match ip {
            IpAddr::V4(a) if len <= 32 => {
                let mask = u32::MAX.checked_shl(32 - len as u32).unwrap_or(0);
                Some(Ipv4Addr::from(u32::from(a) & mask).into())
            }
            IpAddr::V6(a) if len <= 128 => {
                let mask = u128::MAX.checked_shl(128 - len as u32).unwrap_or(0);
                Some(Ipv6Addr::from(u128::from(a) & mask).into())
            }
            _ => None,
        }
    }
}

impl std::str::FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Prefix, String> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 or IPv6 CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = match len {
            None => max,
            Some(l) => l
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?} has a prefix length outside 0-{max}"))?,
        };
        Ok(Prefix {
            addr: Prefix::masked(addr, len).expect("length checked"),
            len,
        })
    }
}

/// An address, port and protocol a service port answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub kind: FrontendKind,
    /// The in-cluster view of an external frontend whose
    /// externalTrafficPolicy is Local (`FRONTEND_VIEW_IN_CLUSTER`): pods and
    /// the node reach it with the internal policy's endpoints, as
    /// kube-proxy's short-circuit rules do. It belongs to the service port
    /// of that policy's scope, alongside the ClusterIP.
    pub in_cluster: bool,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = std::net::SocketAddr::new(self.addr, self.port);
        write!(f, "{at}/{}", self.protocol)?;
        if self.in_cluster {
            f.write_str(" (in-cluster)")?;
        }
        Ok(())
    }
}

/// One endpoint address with the port this service port targets on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node (`nodeName` equals `--node-name`).
    pub local: bool,
    /// What the EndpointSlice's hints say about this node.
    pub hints: Hints,
}

/// An endpoint's topology hints (`hints.forNodes`, `hints.forZones`, set by
/// the EndpointSlice controller for `trafficDistribution: PreferSameNode`
/// / `PreferClose` and the topology-mode annotation) as seen from this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hints {
    pub node: Hint,
    pub zone: Hint,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hint {
    /// No hint of this kind.
    #[default]
    Absent,
    /// Hinted for this node (or this node's zone).
    Here,
    /// Hinted only for others (or this node's zone is not known).
    Elsewhere,
}

/// Which hints a service port's cluster-wide endpoints follow, decided as
/// kube-proxy's `topologyModeFromHints` does: node hints if every ready
/// endpoint has one and one is for this node, else zone hints likewise,
/// else none (every ready endpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    SameNode,
    SameZone,
    Anywhere,
}

impl Topology {
    pub fn of(ready: &[Endpoint]) -> Topology {
        let follows = |hint: fn(&Endpoint) -> Hint| {
            !ready.is_empty()
                && ready.iter().all(|e| hint(e) != Hint::Absent)
                && ready.iter().any(|e| hint(e) == Hint::Here)
        };
        if follows(|e| e.hints.node) {
            Topology::SameNode
        } else if follows(|e| e.hints.zone) {
            Topology::SameZone
        } else {
            Topology::Anywhere
        }
    }

    fn admits(self, e: &Endpoint) -> bool {
        match self {
            Topology::SameNode => e.hints.node == Hint::Here,
            Topology::SameZone => e.hints.zone == Hint::Here,
            Topology::Anywhere => true,
        }
    }
}

impl Endpoint {
    pub const fn target(&self) -> (IpAddr, u16) {
        (self.addr, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub key: ServicePortKey,
    /// Sorted, unique.
    pub frontends: Vec<Frontend>,
    /// Every endpoint the slices list for this port (sorted by address and
    /// port, one per target), usable or not: a flow already on an endpoint
    /// keeps it while the endpoint is listed.
    pub endpoints: Vec<Endpoint>,
    /// `Some(timeout)` with sessionAffinity ClientIP.
    pub affinity_timeout_s: Option<u32>,
    /// loadBalancerSourceRanges (sorted, unique); they apply to the
    /// `LoadBalancer` frontends. Empty: every source is admitted.
    pub source_ranges: Vec<Prefix>,
    /// The Service has an endpoint that takes new flows on some node. With
    /// scope Local and none here, kube-proxy drops when there is one
    /// elsewhere (a load balancer's health check steers clients there) and
    /// refuses when there is none anywhere.
    pub endpoints_anywhere: bool,
}

impl ServicePort {
    /// Endpoints that take new flows: the ready ones (for scope Cluster,
    /// those the topology hints give this node, see `Topology`); when none
    /// is ready, the serving and terminating ones (kube-proxy's fallback,
    /// KEP-1669).
    pub fn usable_endpoints(&self) -> Vec<Endpoint> {
        let ready: Vec<Endpoint> = self.endpoints.iter().copied().filter(|e| e.ready).collect();
        if !ready.is_empty() {
            if self.key.scope == Scope::Local {
                return ready;
            }
            let topology = Topology::of(&ready);
            return ready.into_iter().filter(|e| topology.admits(e)).collect();
        }
        self.endpoints
            .iter()
            .copied()
            .filter(|e| e.serving && e.terminating)
            .collect()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Each `Arc` shared with the Service's build and the planner's record.
    pub services: BTreeMap<ServicePortKey, Arc<ServicePort>>,
    /// healthCheckNodePort -> what the agent answers on it.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// A LoadBalancer Service with externalTrafficPolicy Local: its load
/// balancer asks every node, on `healthCheckNodePort`, whether to send
/// traffic there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints on this node (terminating ones do not count).
    pub local_endpoints: usize,
}

/// An object left out of the desired state, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// `Service ns/name` or `EndpointSlice ns/name`.
    pub object: String,
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// Node facts that shape frontends.
#[derive(Clone, Debug, Default)]
pub struct NodeConfig {
    pub name: String,
    /// NodePorts answer on each of these (both families); the first of
    /// each family is the SNAT address for that family's flows.
    pub node_ips: Vec<IpAddr>,
    /// `--service-proxy-name`: Services labelled
    /// `service.kubernetes.io/service-proxy-name` are ours only if the
    /// value equals this.
    pub service_proxy_name: Option<String>,
    /// `--service-cidr`: the cluster's Service ranges (externalIPs inside
    /// them are refused under the restricted policy).
    pub service_cidrs: Vec<Prefix>,
    /// `--external-ips`: which externalIPs are programmed.
    pub external_ips: ExternalIpPolicy,
    /// This node's `topology.kubernetes.io/zone` label (from the API), for
    /// zone hints.
    pub zone: Option<String>,
    /// NodePorts also answer on 127.0.0.1 (the node's own sockets, through
    /// the socket hooks: `--cgroup`), as kube-proxy's iptables mode does.
    pub localhost_nodeports: bool,
    /// `--nodeport-addresses CIDR,...`: the node's addresses in those
    /// ranges, where NodePorts answer instead of `node_ips`.
    pub nodeport_ips: Option<Vec<IpAddr>>,
}

impl NodeConfig {
    /// Where NodePorts answer.
    pub fn nodeport_addresses(&self) -> &[IpAddr] {
        self.nodeport_ips.as_deref().unwrap_or(&self.node_ips)
    }
}

/// Which `spec.externalIPs` are programmed. Anyone who may create a
/// Service can set externalIPs (CVE-2020-8554): `restricted` refuses those
/// that would capture traffic meant for the node or for Services.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ExternalIpPolicy {
    /// Every externalIP, as kube-proxy does.
    Allow,
    /// Not this node's addresses, nor addresses in --service-cidr, nor
    /// loopback, link-local, multicast or broadcast ones. A ClusterIP
    /// always wins over an externalIP on the same port.
    #[default]
    Restricted,
    /// No externalIP at all (like the DenyServiceExternalIPs admission
    /// plugin).
    Deny,
}

/// A port number of an object: 1-65535.
fn port_number(what: &str, n: i32) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what} {n} is out of range 1-65535"))
}

/// The result of building: what to program, what was refused, and what was
/// knowingly left out (headless, ExternalName, IPv6), for the logs.
#[derive(Debug, Default)]
pub struct Build {
    pub state: DesiredState,
    pub rejections: Vec<Rejection>,
    pub skipped: Vec<Rejection>,
    /// Services programmed without some part (a frontend another Service
    /// holds, an SCTP port, a refused externalIP), and what.
    pub partial: Vec<Rejection>,
    /// Per Service, the frontends another Service holds, and which.
    pub lost: BTreeMap<ObjectKey, BTreeMap<FrontendId, String>>,
}

/// Builds the desired state. Invalid objects are rejected one by one; every
/// other service is still built.
pub fn build(services: &[Service], slices: &[EndpointSlice], node: &NodeConfig) -> Build {
    let mut out = Build::default();
    let mut slices_by_service: BTreeMap<ObjectKey, Vec<ValidSlice>> = BTreeMap::new();
    let mut names = NodeNames::default();
    for slice in slices {
        match validate_slice(slice, &mut names) {
            Ok(Some(v)) => slices_by_service
                .entry(v.service_key())
                .or_default()
                .push(v),
            Ok(None) => {}
            Err(rejection) => out.rejections.push(rejection),
        }
    }
    let built: Vec<ServiceBuild> = services
        .iter()
        .map(|svc| {
            let slices: Vec<&ValidSlice> = slices_by_service
                .get(&object_key(&svc.metadata))
                .into_iter()
                .flatten()
                .collect();
            build_service(&ServiceInput::of(svc), &slices, node)
        })
        .collect();
    let mut ordered: Vec<&ServiceBuild> = built.iter().collect();
    ordered.sort_by(|a, b| a.order.cmp(&b.order));
    let assembled = assemble(ordered);
    out.state = assembled.state;
    out.rejections.extend(assembled.rejections);
    out.skipped = assembled.skipped;
    out.partial = assembled.partial;
    out.lost = assembled.lost;
    out
}

/// (namespace, name) of an object; the namespace defaults to "default".
pub type ObjectKey = (String, String);

pub fn object_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}
