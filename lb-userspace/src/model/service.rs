//! One Service checked and turned into service ports, by concern: whether
//! it is ours at all (labels, type, headless), its addresses (clusterIPs,
//! externalIPs under the node's policy, load-balancer IPs), its policies
//! (affinity, traffic policies, source ranges), and its ports.
//!
//! What makes the whole Service unusable is a `ServiceError` (the object is
//! rejected, with a log line naming it); what makes only a part unusable
//! (an SCTP port, an externalIP the policy refuses) leaves that part out
//! with a note, and the rest is programmed.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::{
    port_number, ExternalIpPolicy, Family, Frontend, FrontendKind, NodeConfig, Prefix, Protocol,
    Scope, ServicePort, ServicePortKey, DEFAULT_AFFINITY_TIMEOUT_S, HEADLESS_LABEL,
    MAX_AFFINITY_TIMEOUT_S, SERVICE_PROXY_NAME_LABEL,
};

/// Why a Service cannot be programmed at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("metadata.name is missing")]
    NoName,
    #[error("spec is missing")]
    NoSpec,
    #[error("spec.clusterIP is missing (a Service the API server accepted has one)")]
    NoClusterIp,
    #[error("{field}: {value:?} is not an IP address")]
    BadAddress { field: &'static str, value: String },
    #[error("sessionAffinityConfig.clientIP.timeoutSeconds {0} is out of range 1-{MAX_AFFINITY_TIMEOUT_S}")]
    AffinityTimeout(i32),
    #[error("sessionAffinity {0:?} is not None or ClientIP")]
    Affinity(String),
    #[error("{field} {value:?} is not Cluster or Local")]
    TrafficPolicy { field: &'static str, value: String },
    #[error("loadBalancerSourceRanges: {0}")]
    SourceRange(String),
    #[error("port {port:?}: protocol {protocol} is not supported (TCP and UDP are)")]
    Protocol { port: String, protocol: String },
    #[error("port name {name:?} is used twice for {protocol}")]
    DuplicatePort { name: String, protocol: Protocol },
    #[error("{0}")]
    PortRange(String),
    #[error("frontend {0} is declared twice")]
    DuplicateFrontend(String),
}

pub enum ServiceVerdict {
    Program {
        ports: Vec<ServicePort>,
        /// Parts left out (an SCTP port, a refused externalIP), for the log.
        notes: Vec<String>,
    },
    Skip(String),
}

/// What the model reads of a Service, taken from the API object when it
/// arrives (`ServiceInput::of`). The catalog keeps this instead of the
/// object: 10,000 Service objects took ~20 MB of the agent's memory (the
/// object alone is 824 bytes before any string), this takes a few hundred
/// bytes each. Everything here is independent of the node; what depends on
/// it (the proxy name, the externalIP policy, the NodePort addresses) is
/// decided when the Service is built (`validate_service`), again whenever
/// the node changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInput {
    pub namespace: String,
    /// `None`: metadata.name is missing.
    pub name: Option<String>,
    /// creationTimestamp in seconds: of two Services asking for one
    /// frontend, the older keeps it.
    pub created: Option<i64>,
    headless_label: bool,
    proxy_name: Option<String>,
    read: Result<Read, ServiceError>,
}

/// The Service's spec as read: skipped whatever the node, or what to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Read {
    Skip(String),
    Serve(Box<Spec>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Spec {
    addresses: Addresses,
    policies: Policies,
    /// TCP and UDP ports, in the Service's order.
    ports: Vec<PortSpec>,
    /// Ports left out (SCTP), for the log.
    notes: Vec<String>,
    /// healthCheckNodePort of a LoadBalancer with externalTrafficPolicy
    /// Local.
    health_check: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PortSpec {
    name: String,
    protocol: Protocol,
    port: u16,
    /// Only for NodePort and LoadBalancer Services.
    node_port: Option<u16>,
}

impl ServiceInput {
    pub fn of(svc: &Service) -> ServiceInput {
        let labels = svc.metadata.labels.as_ref();
        ServiceInput {
            namespace: svc
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: svc.metadata.name.clone().filter(|n| !n.is_empty()),
            created: svc
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second()),
            headless_label: labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)),
            proxy_name: labels
                .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
                .cloned(),
            read: read_spec(svc),
        }
    }

    /// "Service namespace/name", for log lines.
    pub fn object(&self) -> String {
        format!(
            "Service {}/{}",
            self.namespace,
            self.name.as_deref().unwrap_or("<unnamed>")
        )
    }

    /// The health-check port, if the Service is served and has one.
    pub fn health_check_port(&self) -> Option<u16> {
        match &self.read {
            Ok(Read::Serve(spec)) => spec.health_check,
            _ => None,
        }
    }
}

/// The node-independent checks, in the order `validate_service` reports
/// them.
fn read_spec(svc: &Service) -> Result<Read, ServiceError> {
    let spec = svc.spec.as_ref().ok_or(ServiceError::NoSpec)?;
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Ok(Read::Skip("ExternalName services have no frontend".into()));
    }
    if spec.cluster_ip.as_deref() == Some("None") {
        return Ok(Read::Skip("headless (clusterIP: None)".into()));
    }
    let cluster = cluster_ips(spec)?;
    if cluster.is_empty() {
        return Ok(Read::Skip("no clusterIP".into()));
    }
    if spec.ports.as_ref().is_none_or(|p| p.is_empty()) {
        return Ok(Read::Skip("no ports".into()));
    }
    let external = parse_ip_list("externalIPs", spec.external_ips.iter().flatten())?;
    let load_balancer = if svc_type == "LoadBalancer" {
        load_balancer_ips(svc)?
    } else {
        Vec::new()
    };
    let policies = Policies::of(spec, svc_type)?;
    let node_ports = matches!(svc_type, "NodePort" | "LoadBalancer");
    let mut notes = Vec::new();
    let ports = port_specs(spec, node_ports, &mut notes)?;
    let health_check = (svc_type == "LoadBalancer" && policies.external == Scope::Local)
        .then_some(spec.health_check_node_port)
        .flatten()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);
    Ok(Read::Serve(Box::new(Spec {
        addresses: Addresses {
            cluster,
            external,
            load_balancer,
        },
        policies,
        ports,
        notes,
        health_check,
    })))
}

pub fn validate_service(
    svc: &ServiceInput,
    node: &NodeConfig,
) -> Result<ServiceVerdict, ServiceError> {
    let name = svc.name.as_deref().ok_or(ServiceError::NoName)?;
    if let Some(skip) = not_ours(svc, node) {
        return Ok(ServiceVerdict::Skip(skip));
    }
    let spec = match svc.read.as_ref().map_err(Clone::clone)? {
        Read::Skip(reason) => return Ok(ServiceVerdict::Skip(reason.clone())),
        Read::Serve(spec) => spec,
    };
    let mut notes = Vec::new();
    let external = admitted_external_ips(&spec.addresses.external, node, &mut notes);
    notes.extend(spec.notes.iter().cloned());
    if spec.ports.is_empty() {
        notes.push("no port left to program".into());
        return Ok(ServiceVerdict::Skip(notes.join("; ")));
    }
    let addresses = Addresses {
        external,
        ..spec.addresses.clone()
    };
    let ports = service_ports(
        &spec.ports,
        &svc.namespace,
        name,
        &addresses,
        &spec.policies,
        node,
    )?;
    Ok(ServiceVerdict::Program { ports, notes })
}

/// A reason to leave the Service to someone else, if any.
fn not_ours(svc: &ServiceInput, node: &NodeConfig) -> Option<String> {
    if svc.headless_label {
        return Some(format!("labelled {HEADLESS_LABEL}"));
    }
    let proxy = svc.proxy_name.as_deref()?;
    (node.service_proxy_name.as_deref() != Some(proxy)).then(|| {
        format!(
            "{SERVICE_PROXY_NAME_LABEL}={proxy} is another proxy's (this one is {})",
            node.service_proxy_name
                .as_deref()
                .unwrap_or("unnamed: see --service-proxy-name")
        )
    })
}

// ------------------------------------------------------------ addresses

#[derive(Clone, Debug, PartialEq, Eq)]
struct Addresses {
    cluster: Vec<IpAddr>,
    external: Vec<IpAddr>,
    load_balancer: Vec<IpAddr>,
}

/// The clusterIPs (`clusterIPs`, else `clusterIP`), of both families: a
/// dual-stack Service lists one of each.
fn cluster_ips(spec: &ServiceSpec) -> Result<Vec<IpAddr>, ServiceError> {
    let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.iter().filter(|ip| !ip.is_empty()));
    }
    if ips.is_empty() {
        return Err(ServiceError::NoClusterIp);
    }
    parse_ip_list("clusterIP", ips)
}

/// externalIPs the node's policy admits; the others are noted and left out
/// (CVE-2020-8554: whoever may create a Service could otherwise take
/// traffic meant for the node or for another Service).
fn admitted_external_ips(
    all: &[IpAddr],
    node: &NodeConfig,
    notes: &mut Vec<String>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for &ip in all {
        match refuse_external_ip(ip, node) {
            None => out.push(ip),
            Some(why) => notes.push(format!("externalIP {ip} left out: {why}")),
        }
    }
    out
}

/// Why the policy refuses `ip` as an externalIP, if it does.
pub fn refuse_external_ip(ip: IpAddr, node: &NodeConfig) -> Option<String> {
    match node.external_ips {
        ExternalIpPolicy::Allow => None,
        ExternalIpPolicy::Deny => Some("externalIPs are refused (--external-ips deny)".into()),
        ExternalIpPolicy::Restricted => {
            if !routable_unicast(ip) {
                Some("not a routable unicast address".into())
            } else if node.node_ips.contains(&ip) || node.nodeport_addresses().contains(&ip) {
                Some("it is this node's address (--external-ips allow admits it)".into())
            } else {
                node.service_cidrs
                    .iter()
                    .find(|c| c.contains(ip))
                    .map(|cidr| {
                        format!(
                            "it is inside the service CIDR {cidr} (--external-ips allow admits it)"
                        )
                    })
            }
        }
    }
}

/// `status.loadBalancer.ingress[].ip`, except those with ipMode Proxy
/// (KEP-1860: the load balancer proxies to the node itself, so its address
/// must not be short-circuited here).
fn load_balancer_ips(svc: &Service) -> Result<Vec<IpAddr>, ServiceError> {
    let ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.as_ref());
    parse_ip_list("status.loadBalancer.ingress[].ip", ips)
}

/// Whether `ip` may be an externalIP: not unspecified, loopback,
/// multicast, broadcast or link-local.
fn routable_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_broadcast()
                || a.is_link_local())
        }
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_unicast_link_local()
                || a.to_ipv4_mapped().is_some())
        }
    }
}

/// The addresses of a list, of both families.
fn parse_ip_list<'a>(
    field: &'static str,
    list: impl IntoIterator<Item = &'a String>,
) -> Result<Vec<IpAddr>, ServiceError> {
    let mut out = Vec::new();
    for ip in list {
        match ip.parse::<IpAddr>() {
            // An IPv4-mapped IPv6 address stands for IPv4 in the maps.
            Ok(IpAddr::V6(a)) if a.to_ipv4_mapped().is_some() => {
                return Err(ServiceError::BadAddress {
                    field,
                    value: ip.clone(),
                })
            }
            Ok(a) => out.push(a),
            Err(_) => {
                return Err(ServiceError::BadAddress {
                    field,
                    value: ip.clone(),
                })
            }
        }
    }
    Ok(out)
}

// ------------------------------------------------------------- policies

#[derive(Clone, Debug, PartialEq, Eq)]
struct Policies {
    affinity_timeout_s: Option<u32>,
    internal: Scope,
    external: Scope,
    source_ranges: Vec<Prefix>,
}

impl Policies {
    fn of(spec: &ServiceSpec, svc_type: &str) -> Result<Policies, ServiceError> {
        Ok(Policies {
            affinity_timeout_s: affinity(spec)?,
            internal: traffic_policy(
                "internalTrafficPolicy",
                spec.internal_traffic_policy.as_deref(),
            )?,
            external: traffic_policy(
                "externalTrafficPolicy",
                spec.external_traffic_policy.as_deref(),
            )?,
            source_ranges: if svc_type == "LoadBalancer" {
                source_ranges(spec)?
            } else {
                Vec::new()
            },
        })
    }

    fn scope_of(&self, f: &Frontend) -> Scope {
        if f.kind.is_external() && !f.in_cluster {
            self.external
        } else {
            self.internal
        }
    }
}

fn affinity(spec: &ServiceSpec) -> Result<Option<u32>, ServiceError> {
    match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => Ok(None),
        "ClientIP" => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT_S)),
                Some(t) if t >= 1 && t as u32 <= MAX_AFFINITY_TIMEOUT_S => Ok(Some(t as u32)),
                Some(t) => Err(ServiceError::AffinityTimeout(t)),
            }
        }
        other => Err(ServiceError::Affinity(other.into())),
    }
}

fn traffic_policy(field: &'static str, value: Option<&str>) -> Result<Scope, ServiceError> {
    match value.unwrap_or("Cluster") {
        "Cluster" => Ok(Scope::Cluster),
        "Local" => Ok(Scope::Local),
        other => Err(ServiceError::TrafficPolicy {
            field,
            value: other.into(),
        }),
    }
}

/// loadBalancerSourceRanges, sorted and unique, of both families; each
/// applies to the frontends of its own family.
fn source_ranges(spec: &ServiceSpec) -> Result<Vec<Prefix>, ServiceError> {
    let mut out = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        out.push(r.parse::<Prefix>().map_err(ServiceError::SourceRange)?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

// ---------------------------------------------------------------- ports

/// The TCP and UDP ports, checked; SCTP ports are noted and left out.
fn port_specs(
    spec: &ServiceSpec,
    node_ports: bool,
    notes: &mut Vec<String>,
) -> Result<Vec<PortSpec>, ServiceError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for p in spec.ports.as_deref().unwrap_or(&[]) {
        let port_name = p.name.clone().unwrap_or_default();
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => {
                notes.push(format!(
                    "port {port_name:?} left out: SCTP is not supported (TCP and UDP are)"
                ));
                continue;
            }
            other => {
                return Err(ServiceError::Protocol {
                    port: port_name,
                    protocol: other.into(),
                })
            }
        };
        if !seen.insert((port_name.clone(), protocol)) {
            return Err(ServiceError::DuplicatePort {
                name: port_name,
                protocol,
            });
        }
        let port = port_number("port", p.port).map_err(ServiceError::PortRange)?;
        let node_port = match p.node_port.filter(|_| node_ports) {
            Some(np) => Some(port_number("nodePort", np).map_err(ServiceError::PortRange)?),
            None => None,
        };
        out.push(PortSpec {
            name: port_name,
            protocol,
            port,
            node_port,
        });
    }
    Ok(out)
}

/// One service port per port and scope its frontends use.
fn service_ports(
    specs: &[PortSpec],
    namespace: &str,
    name: &str,
    addrs: &Addresses,
    policies: &Policies,
    node: &NodeConfig,
) -> Result<Vec<ServicePort>, ServiceError> {
    let mut out = Vec::new();
    let families: Vec<Family> = addrs.cluster.iter().map(|a| Family::of(*a)).collect();
    for p in specs {
        let (port_name, protocol, port) = (&p.name, p.protocol, p.port);
        fn at(
            addrs: &[IpAddr],
            port: u16,
            protocol: Protocol,
            kind: FrontendKind,
        ) -> impl Iterator<Item = Frontend> + '_ {
            addrs.iter().map(move |&addr| Frontend {
                addr,
                port,
                protocol,
                kind,
                in_cluster: false,
            })
        }
        let mut frontends: Vec<Frontend> =
            at(&addrs.cluster, port, protocol, FrontendKind::ClusterIp)
                .chain(at(
                    &addrs.external,
                    port,
                    protocol,
                    FrontendKind::ExternalIp,
                ))
                .chain(at(
                    &addrs.load_balancer,
                    port,
                    protocol,
                    FrontendKind::LoadBalancer,
                ))
                .collect();
        if let Some(np) = p.node_port {
            frontends.extend(at(
                node.nodeport_addresses(),
                np,
                protocol,
                FrontendKind::NodePort,
            ));
            if node.localhost_nodeports {
                frontends.extend(at(
                    &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
                    np,
                    protocol,
                    FrontendKind::NodePort,
                ));
            }
        }
        // Only the families of the Service's clusterIPs: kube-proxy runs a
        // proxier per family, and one skips a Service without a clusterIP
        // of its family, with its externalIPs, load-balancer IPs and
        // NodePorts of that family.
        frontends.retain(|f| families.contains(&Family::of(f.addr)));
        // externalTrafficPolicy Local applies to clients outside the
        // cluster: pods and the node reach the external frontends through
        // an in-cluster view with the internal policy's endpoints.
        if policies.external == Scope::Local {
            let views: Vec<Frontend> = frontends
                .iter()
                .filter(|f| f.kind.is_external())
                .map(|f| Frontend {
                    in_cluster: true,
                    ..*f
                })
                .collect();
            frontends.extend(views);
        }
        for scope in [Scope::Cluster, Scope::Local] {
            for family in [Family::V4, Family::V6] {
                let mut mine: Vec<Frontend> = frontends
                    .iter()
                    .copied()
                    .filter(|f| policies.scope_of(f) == scope && Family::of(f.addr) == family)
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                mine.sort();
                mine.dedup();
                let has_lb = mine.iter().any(|f| f.kind == FrontendKind::LoadBalancer);
                out.push(ServicePort {
                    key: ServicePortKey {
                        namespace: namespace.into(),
                        name: name.into(),
                        port_name: port_name.clone(),
                        protocol,
                        scope,
                        family,
                    },
                    frontends: mine,
                    endpoints: Vec::new(),
                    affinity_timeout_s: policies.affinity_timeout_s,
                    source_ranges: if has_lb {
                        policies
                            .source_ranges
                            .iter()
                            .copied()
                            .filter(|r| r.family() == family)
                            .collect()
                    } else {
                        Vec::new()
                    },
                    endpoints_anywhere: false,
                });
            }
        }
    }
    // Two ports of one service may not share a frontend either.
    let mut all: Vec<(IpAddr, u16, Protocol, bool)> = out
        .iter()
        .flat_map(|p| &p.frontends)
        .map(|f| (f.addr, f.port, f.protocol, f.in_cluster))
        .collect();
    all.sort();
    if let Some(w) = all.windows(2).find(|w| w[0] == w[1]) {
        return Err(ServiceError::DuplicateFrontend(format!(
            "{}/{}",
            std::net::SocketAddr::new(w[0].0, w[0].1),
            w[0].2
        )));
    }
    Ok(out)
}
