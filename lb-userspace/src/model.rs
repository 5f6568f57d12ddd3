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
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

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

/// An IPv4 prefix (loadBalancerSourceRanges), host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Prefix, String> {
        let s = s.trim();
        let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 CIDR"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("{s:?} has a prefix length outside 0-32"))?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Ok(Prefix {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            len,
        })
    }
}

/// An address, port and protocol a service port answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub kind: FrontendKind,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.protocol)
    }
}

/// One endpoint address with the port this service port targets on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node (`nodeName` equals `--node-name`).
    pub local: bool,
}

impl Endpoint {
    pub const fn target(&self) -> (Ipv4Addr, u16) {
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
}

impl ServicePort {
    /// Endpoints that take new flows: the ready ones; when none is ready,
    /// the serving and terminating ones (kube-proxy's fallback, KEP-1669).
    pub fn usable_endpoints(&self) -> Vec<Endpoint> {
        let ready: Vec<Endpoint> = self.endpoints.iter().copied().filter(|e| e.ready).collect();
        if !ready.is_empty() {
            return ready;
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
    pub services: BTreeMap<ServicePortKey, ServicePort>,
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
    /// NodePorts answer on each of these.
    pub node_ips: Vec<Ipv4Addr>,
    /// `--service-proxy-name`: Services labelled
    /// `service.kubernetes.io/service-proxy-name` are ours only if the
    /// value equals this.
    pub service_proxy_name: Option<String>,
}

/// The result of building: what to program, what was refused, and what was
/// knowingly left out (headless, ExternalName, IPv6), for the logs.
#[derive(Debug, Default)]
pub struct Build {
    pub state: DesiredState,
    pub rejections: Vec<Rejection>,
    pub skipped: Vec<Rejection>,
}

/// Builds the desired state. Invalid objects are rejected one by one; every
/// other service is still built.
pub fn build(services: &[Service], slices: &[EndpointSlice], node: &NodeConfig) -> Build {
    let mut out = Build::default();
    let mut slices_by_service: BTreeMap<ObjectKey, Vec<ValidSlice>> = BTreeMap::new();
    for slice in slices {
        match validate_slice(slice) {
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
            let slices = slices_by_service
                .get(&object_key(&svc.metadata))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            build_service(svc, slices, node)
        })
        .collect();
    let mut ordered: Vec<&ServiceBuild> = built.iter().collect();
    ordered.sort_by(|a, b| a.order.cmp(&b.order));
    let assembled = assemble(ordered);
    out.state = assembled.state;
    out.rejections.extend(assembled.rejections);
    out.skipped = assembled.skipped;
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
        ports: Vec<ServicePort>,
        health_check: Option<(u16, HealthCheck)>,
    },
    Skip(String),
    Reject(String),
}

impl ServiceBuild {
    /// The frontends this service asks for (none unless programmable).
    pub fn frontends(&self) -> BTreeSet<(Ipv4Addr, u16, Protocol)> {
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
pub fn build_service(svc: &Service, slices: &[ValidSlice], node: &NodeConfig) -> ServiceBuild {
    let object = service_name(svc);
    let (ns, name) = object_key(&svc.metadata);
    let order = (
        svc.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second()),
        ns.clone(),
        name.clone(),
    );
    let outcome = match validate_service(svc, node) {
        Ok(ServiceVerdict::Program(ports)) => {
            let mut local_ready = BTreeSet::new();
            let ports = ports
                .into_iter()
                .map(|mut port| {
                    let all = endpoints_for(&port.key, slices, &node.name);
                    local_ready.extend(all.iter().filter(|e| e.local && e.ready).map(|e| e.addr));
                    port.endpoints = match port.key.scope {
                        Scope::Cluster => all,
                        Scope::Local => all.into_iter().filter(|e| e.local).collect(),
                    };
                    port
                })
                .collect();
            let health_check = health_check_port(svc).map(|port| {
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
            }
        }
        Ok(ServiceVerdict::Skip(reason)) => Outcome::Skip(reason),
        Err(reason) => Outcome::Reject(reason),
    };
    ServiceBuild {
        object,
        order,
        outcome,
    }
}

/// The desired state from services built one by one, given oldest first:
/// each frontend goes to the first service that asks for it, and a later
/// service asking for a taken one is rejected whole.
pub fn assemble<'a>(ordered: impl IntoIterator<Item = &'a ServiceBuild>) -> Build {
    let mut out = Build::default();
    let mut claimed: BTreeMap<(Ipv4Addr, u16, Protocol), &str> = BTreeMap::new();
    for b in ordered {
        let (ports, health_check) = match &b.outcome {
            Outcome::Program {
                ports,
                health_check,
            } => (ports, health_check),
            Outcome::Skip(reason) => {
                out.skipped.push(Rejection {
                    object: b.object.clone(),
                    reason: reason.clone(),
                });
                continue;
            }
            Outcome::Reject(reason) => {
                out.rejections.push(Rejection {
                    object: b.object.clone(),
                    reason: reason.clone(),
                });
                continue;
            }
        };
        let frontends = b.frontends();
        if let Some((f, owner)) = frontends
            .iter()
            .find_map(|f| claimed.get(f).map(|owner| (f, owner)))
        {
            out.rejections.push(Rejection {
                object: b.object.clone(),
                reason: format!(
                    "frontend {}:{}/{} is already used by {owner}",
                    f.0, f.1, f.2
                ),
            });
            continue;
        }
        claimed.extend(frontends.into_iter().map(|f| (f, b.object.as_str())));
        for port in ports {
            out.state.services.insert(port.key.clone(), port.clone());
        }
        if let Some((port, hc)) = health_check {
            out.state.health_checks.insert(*port, hc.clone());
        }
    }
    out
}

/// healthCheckNodePort of a LoadBalancer Service with
/// externalTrafficPolicy Local (validated with the service).
fn health_check_port(svc: &Service) -> Option<u16> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer")
        || spec.external_traffic_policy.as_deref() != Some("Local")
    {
        return None;
    }
    u16::try_from(spec.health_check_node_port?)
        .ok()
        .filter(|p| *p != 0)
}

fn service_name(s: &Service) -> String {
    format!(
        "Service {}/{}",
        s.metadata.namespace.as_deref().unwrap_or("default"),
        s.metadata.name.as_deref().unwrap_or("<unnamed>")
    )
}

fn slice_name(s: &EndpointSlice) -> String {
    format!(
        "EndpointSlice {}/{}",
        s.metadata.namespace.as_deref().unwrap_or("default"),
        s.metadata.name.as_deref().unwrap_or("<unnamed>")
    )
}

enum ServiceVerdict {
    Program(Vec<ServicePort>),
    Skip(String),
}

fn parse_protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(format!(
            "protocol {other} is not supported (TCP and UDP are)"
        )),
    }
}

fn port_number(what: &str, n: i32) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what} {n} is out of range 1-65535"))
}

fn validate_service(svc: &Service, node: &NodeConfig) -> Result<ServiceVerdict, String> {
    let name = svc.metadata.name.as_deref().filter(|n| !n.is_empty());
    let name = name.ok_or("metadata.name is missing")?;
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        return Ok(ServiceVerdict::Skip(format!("labelled {HEADLESS_LABEL}")));
    }
    if let Some(proxy) = labels.and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL)) {
        if node.service_proxy_name.as_deref() != Some(proxy.as_str()) {
            return Ok(ServiceVerdict::Skip(format!(
                "{SERVICE_PROXY_NAME_LABEL}={proxy} is another proxy's (this one is {})",
                node.service_proxy_name
                    .as_deref()
                    .unwrap_or("unnamed: see --service-proxy-name")
            )));
        }
    }
    let spec = svc.spec.as_ref().ok_or("spec is missing")?;
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Ok(ServiceVerdict::Skip(
            "ExternalName services have no frontend".into(),
        ));
    }
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
    if cluster_ip == "None" {
        return Ok(ServiceVerdict::Skip("headless (clusterIP: None)".into()));
    }
    let mut ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if ips.is_empty() && !cluster_ip.is_empty() {
        ips.push(cluster_ip);
    }
    if ips.is_empty() {
        return Err("spec.clusterIP is missing (a Service the API server accepted has one)".into());
    }
    let mut v4 = Vec::new();
    for ip in &ips {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => v4.push(a),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => return Err(format!("clusterIP {ip:?} is not an IP address")),
        }
    }
    if v4.is_empty() {
        return Ok(ServiceVerdict::Skip(
            "no IPv4 clusterIP (IPv6 is not supported yet)".into(),
        ));
    }

    let affinity_timeout_s = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => None,
        "ClientIP" => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) if t >= 1 && t as u32 <= MAX_AFFINITY_TIMEOUT_S => Some(t as u32),
                Some(t) => {
                    return Err(format!(
                        "sessionAffinityConfig.clientIP.timeoutSeconds {t} is out of range 1-{MAX_AFFINITY_TIMEOUT_S}"
                    ))
                }
            }
        }
        other => return Err(format!("sessionAffinity {other:?} is not None or ClientIP")),
    };

    let internal_scope = traffic_policy(
        "internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    )?;
    let external_scope = traffic_policy(
        "externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    )?;
    let external_ips = parse_ipv4_list("externalIPs", spec.external_ips.iter().flatten())?;
    // ipMode Proxy (KEP-1860) means the load balancer proxies to the node
    // itself: its address must not be short-circuited here.
    let lb_ips: Vec<&String> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.as_ref())
        .collect();
    let lb_ips = if svc_type == "LoadBalancer" {
        parse_ipv4_list("status.loadBalancer.ingress[].ip", lb_ips)?
    } else {
        Vec::new()
    };
    let mut source_ranges = Vec::new();
    if svc_type == "LoadBalancer" {
        for r in spec.load_balancer_source_ranges.iter().flatten() {
            // Like kube-proxy, a list may hold IPv6 ranges for the other
            // family; they do not apply to IPv4 addresses.
            if r.contains(':') {
                continue;
            }
            source_ranges.push(
                r.parse::<Prefix>()
                    .map_err(|e| format!("loadBalancerSourceRanges: {e}"))?,
            );
        }
    }
    source_ranges.sort();
    source_ranges.dedup();

    let ports = spec.ports.as_deref().unwrap_or(&[]);
    if ports.is_empty() {
        return Ok(ServiceVerdict::Skip("no ports".into()));
    }
    let node_ports = matches!(svc_type, "NodePort" | "LoadBalancer");
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for p in ports {
        let port_name = p.name.clone().unwrap_or_default();
        let protocol = parse_protocol(p.protocol.as_deref())
            .map_err(|e| format!("port {:?}: {e}", port_name))?;
        if !seen.insert((port_name.clone(), protocol)) {
            return Err(format!(
                "port name {port_name:?} is used twice for {protocol}"
            ));
        }
        let port = port_number("port", p.port)?;
        let at = |addrs: &[Ipv4Addr], port: u16, kind: FrontendKind| -> Vec<Frontend> {
            addrs
                .iter()
                .map(|&addr| Frontend {
                    addr,
                    port,
                    protocol,
                    kind,
                })
                .collect()
        };
        let mut frontends = at(&v4, port, FrontendKind::ClusterIp);
        frontends.extend(at(&external_ips, port, FrontendKind::ExternalIp));
        frontends.extend(at(&lb_ips, port, FrontendKind::LoadBalancer));
        if let Some(np) = p.node_port.filter(|_| node_ports) {
            let np = port_number("nodePort", np)?;
            frontends.extend(at(&node.node_ips, np, FrontendKind::NodePort));
        }
        // One service port per scope its frontends use.
        for scope in [Scope::Cluster, Scope::Local] {
            let mut mine: Vec<Frontend> = frontends
                .iter()
                .copied()
                .filter(|f| {
                    let policy = if f.kind.is_external() {
                        external_scope
                    } else {
                        internal_scope
                    };
                    policy == scope
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            mine.sort();
            mine.dedup();
            let has_lb = mine.iter().any(|f| f.kind == FrontendKind::LoadBalancer);
            out.push(ServicePort {
                key: ServicePortKey {
                    namespace: namespace.clone(),
                    name: name.to_string(),
                    port_name: port_name.clone(),
                    protocol,
                    scope,
                },
                frontends: mine,
                endpoints: Vec::new(),
                affinity_timeout_s,
                source_ranges: if has_lb {
                    source_ranges.clone()
                } else {
                    Vec::new()
                },
            });
        }
    }
    // Two ports of one service may not share a frontend either.
    let mut all: Vec<(Ipv4Addr, u16, Protocol)> = out
        .iter()
        .flat_map(|p| &p.frontends)
        .map(|f| (f.addr, f.port, f.protocol))
        .collect();
    all.sort();
    if let Some(w) = all.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!(
            "frontend {}:{}/{} is declared twice",
            w[0].0, w[0].1, w[0].2
        ));
    }
    Ok(ServiceVerdict::Program(out))
}

fn traffic_policy(field: &str, value: Option<&str>) -> Result<Scope, String> {
    match value.unwrap_or("Cluster") {
        "Cluster" => Ok(Scope::Cluster),
        "Local" => Ok(Scope::Local),
        other => Err(format!("{field} {other:?} is not Cluster or Local")),
    }
}

/// IPv4 addresses of a list; IPv6 ones are skipped (not supported yet).
fn parse_ipv4_list<'a>(
    field: &str,
    list: impl IntoIterator<Item = &'a String>,
) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for ip in list {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => out.push(a),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => return Err(format!("{field}: {ip:?} is not an IP address")),
        }
    }
    Ok(out)
}

/// What a valid slice contributes.
/// An EndpointSlice checked and reduced to what the model uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidSlice {
    namespace: String,
    service: String,
    /// (port name, protocol) -> target port.
    ports: BTreeMap<(String, Protocol), u16>,
    /// Address, conditions, nodeName.
    endpoints: Vec<(Ipv4Addr, Conditions, Option<String>)>,
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
        let protocol =
            parse_protocol(p.protocol.as_deref()).map_err(|e| format!("port {name:?}: {e}"));
        let Ok(protocol) = protocol else { continue };
        // A nil port means "all ports" to some consumers; it gives no
        // target port, so it cannot back a Service port.
        let Some(n) = p.port else { continue };
        ports.insert((name, protocol), port_number("port", n)?);
    }
    let mut endpoints = Vec::new();
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
        for a in &e.addresses {
            let addr: Ipv4Addr = a
                .parse()
                .map_err(|_| format!("endpoint address {a:?} is not an IPv4 address"))?;
            endpoints.push((addr, conditions, e.node_name.clone()));
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
fn endpoints_for(key: &ServicePortKey, slices: &[ValidSlice], node_name: &str) -> Vec<Endpoint> {
    let mut merged: BTreeMap<(Ipv4Addr, u16), Endpoint> = BTreeMap::new();
    for s in slices {
        let Some(&port) = s.ports.get(&(key.port_name.clone(), key.protocol)) else {
            continue;
        };
        for (addr, c, node) in &s.endpoints {
            let local = !node_name.is_empty() && node.as_deref() == Some(node_name);
            let e = merged.entry((*addr, port)).or_insert(Endpoint {
                addr: *addr,
                port,
                ready: c.ready,
                serving: c.serving,
                terminating: c.terminating,
                local,
            });
            e.ready |= c.ready;
            e.serving |= c.serving;
            e.terminating &= c.terminating;
            e.local |= local;
        }
    }
    merged.into_values().collect()
}
