//! Service and EndpointSlice YAML for tests and the demo, written the way
//! `kubectl get svc,endpointslices -A -o yaml` prints them.

use std::{
    fmt::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

#[derive(Clone, Debug)]
pub struct Port {
    pub name: &'static str,
    pub protocol: &'static str,
    pub port: u16,
    pub target: u16,
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Either family: IPv6 endpoints go into the Service's IPv6 slices.
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `nodeName`; `None` leaves the field out.
    pub node: Option<String>,
    /// `hints.forZones` (one zone), as the EndpointSlice controller sets it
    /// for `trafficDistribution: PreferClose`.
    pub zone_hint: Option<&'static str>,
}

impl Endpoint {
    /// A ready endpoint on `topology::NODE_NAME`.
    pub fn ready(ip: impl Into<IpAddr>) -> Endpoint {
        Endpoint {
            ip: ip.into(),
            ready: true,
            serving: true,
            terminating: false,
            node: Some(crate::topology::NODE_NAME.into()),
            zone_hint: None,
        }
    }
    pub fn terminating(ip: impl Into<IpAddr>) -> Endpoint {
        Endpoint {
            ready: false,
            terminating: true,
            ..Endpoint::ready(ip)
        }
    }
    /// The same endpoint hinted for `zone`.
    pub fn hinted_for(self, zone: &'static str) -> Endpoint {
        Endpoint {
            zone_hint: Some(zone),
            ..self
        }
    }
    /// The same endpoint on another node.
    pub fn on(self, node: &str) -> Endpoint {
        Endpoint {
            node: Some(node.into()),
            ..self
        }
    }
}

/// Service fields most tests leave at their defaults.
#[derive(Clone, Debug, Default)]
pub struct Extra {
    /// `spec.type`; by default NodePort when a port has a nodePort.
    pub type_: Option<&'static str>,
    pub external_traffic_policy: Option<&'static str>,
    pub internal_traffic_policy: Option<&'static str>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub lb_ingress: Vec<IpAddr>,
    /// An IPv6 ClusterIP as well: the Service becomes dual-stack
    /// (`ipFamilies: [IPv4, IPv6]`, `RequireDualStack`).
    pub cluster_ip6: Option<Ipv6Addr>,
    pub source_ranges: Vec<&'static str>,
    pub health_check_node_port: Option<u16>,
    pub labels: Vec<(&'static str, &'static str)>,
    /// Endpoints split over this many slices (round robin); 0 or 1: one.
    pub slices: usize,
}

#[derive(Clone, Debug)]
pub struct Svc {
    pub namespace: &'static str,
    pub name: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<Port>,
    pub affinity_timeout_s: Option<u32>,
    pub endpoints: Vec<Endpoint>,
    pub extra: Extra,
}

impl Svc {
    /// The example service: ClusterIP 198.19.0.10, TCP 80 -> 8080 with
    /// NodePort 30080, UDP 53 -> 5353, on the given endpoints.
    pub fn web(endpoints: Vec<Endpoint>) -> Svc {
        Svc {
            namespace: "demo",
            name: "web",
            cluster_ip: Ipv4Addr::new(198, 19, 0, 10),
            ports: vec![
                Port {
                    name: "http",
                    protocol: "TCP",
                    port: 80,
                    target: 8080,
                    node_port: Some(30080),
                },
                Port {
                    name: "dns",
                    protocol: "UDP",
                    port: 53,
                    target: 5353,
                    node_port: None,
                },
            ],
            affinity_timeout_s: None,
            endpoints,
            extra: Extra::default(),
        }
    }
}

impl Svc {
    /// A second service: ClusterIP 198.19.0.11, unnamed TCP port 8443 ->
    /// 8080 with NodePort 30443, on one endpoint.
    pub fn api(endpoint: Ipv4Addr) -> Svc {
        Svc {
            namespace: "demo",
            name: "api",
            cluster_ip: Ipv4Addr::new(198, 19, 0, 11),
            ports: vec![Port {
                name: "",
                protocol: "TCP",
                port: 8443,
                target: 8080,
                node_port: Some(30443),
            }],
            affinity_timeout_s: None,
            endpoints: vec![Endpoint::ready(endpoint)],
            extra: Extra::default(),
        }
    }
}

pub fn yaml(services: &[Svc]) -> String {
    let mut out = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for s in services {
        service_yaml(&mut out, s);
        let n = s.extra.slices.max(1);
        // One set of slices per family, as the EndpointSlice controller
        // writes them; an IPv4 slice always (perhaps empty), an IPv6 one
        // for a dual-stack Service.
        let families = [
            ("IPv4", "", true),
            ("IPv6", "-v6", s.extra.cluster_ip6.is_some()),
        ];
        for (family, suffix, wanted) in families {
            if !wanted {
                continue;
            }
            let of_family: Vec<&Endpoint> = s
                .endpoints
                .iter()
                .filter(|e| e.ip.is_ipv6() == (family == "IPv6"))
                .collect();
            for k in 0..n {
                let eps: Vec<&Endpoint> = of_family.iter().copied().skip(k).step_by(n).collect();
                let name = format!("{}{suffix}-{}", s.name, k + 1);
                slice_yaml(&mut out, s, &name, family, &eps);
            }
        }
    }
    out
}

fn service_yaml(out: &mut String, s: &Svc) {
    let x = &s.extra;
    let node_port = s.ports.iter().any(|p| p.node_port.is_some());
    let type_ = x
        .type_
        .unwrap_or(if node_port { "NodePort" } else { "ClusterIP" });
    let _ = write!(
        out,
        "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: {}\n    namespace: {}\n",
        s.name, s.namespace
    );
    if !x.labels.is_empty() {
        out.push_str("    labels:\n");
        for (k, v) in &x.labels {
            let _ = writeln!(out, "      {k}: \"{v}\"");
        }
    }
    let _ = write!(
        out,
        "  spec:\n    type: {type_}\n    clusterIP: {}\n",
        s.cluster_ip
    );
    match x.cluster_ip6 {
        None => {
            let _ = writeln!(out, "    clusterIPs: [{}]", s.cluster_ip);
        }
        Some(ip6) => {
            let _ = write!(out, "    clusterIPs: [{}, \"{ip6}\"]\n    ipFamilies: [IPv4, IPv6]\n    ipFamilyPolicy: RequireDualStack\n", s.cluster_ip);
        }
    }
    if let Some(p) = x.external_traffic_policy {
        let _ = writeln!(out, "    externalTrafficPolicy: {p}");
    }
    if let Some(p) = x.internal_traffic_policy {
        let _ = writeln!(out, "    internalTrafficPolicy: {p}");
    }
    if let Some(p) = x.health_check_node_port {
        let _ = writeln!(out, "    healthCheckNodePort: {p}");
    }
    if !x.external_ips.is_empty() {
        let ips: Vec<String> = x.external_ips.iter().map(|i| i.to_string()).collect();
        let _ = writeln!(out, "    externalIPs: [{}]", quoted(&ips));
    }
    if !x.source_ranges.is_empty() {
        let _ = writeln!(
            out,
            "    loadBalancerSourceRanges: [{}]",
            x.source_ranges.join(", ")
        );
    }
    if let Some(t) = s.affinity_timeout_s {
        let _ = write!(out, "    sessionAffinity: ClientIP\n    sessionAffinityConfig:\n      clientIP:\n        timeoutSeconds: {t}\n");
    }
    out.push_str("    ports:\n");
    for p in &s.ports {
        let _ = write!(
            out,
            "    - name: {}\n      protocol: {}\n      port: {}\n      targetPort: {}\n",
            p.name, p.protocol, p.port, p.target
        );
        if let Some(np) = p.node_port {
            let _ = writeln!(out, "      nodePort: {np}");
        }
    }
    if !x.lb_ingress.is_empty() {
        out.push_str("  status:\n    loadBalancer:\n      ingress:\n");
        for ip in &x.lb_ingress {
            let _ = writeln!(out, "      - ip: \"{ip}\"");
        }
    }
}

fn slice_yaml(out: &mut String, s: &Svc, name: &str, family: &str, endpoints: &[&Endpoint]) {
    let _ = write!(
        out,
        "- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: {}\n    namespace: {}\n    labels:\n      kubernetes.io/service-name: {}\n  addressType: {family}\n  ports:\n",
        name, s.namespace, s.name
    );
    for p in &s.ports {
        let _ = write!(
            out,
            "  - name: {}\n    protocol: {}\n    port: {}\n",
            p.name, p.protocol, p.target
        );
    }
    if endpoints.is_empty() {
        out.push_str("  endpoints: []\n");
    } else {
        out.push_str("  endpoints:\n");
    }
    for e in endpoints {
        let _ = writeln!(out, "  - addresses: [\"{}\"]", e.ip);
        if let Some(n) = &e.node {
            let _ = writeln!(out, "    nodeName: {n}");
        }
        let _ = writeln!(
            out,
            "    conditions: {{ready: {}, serving: {}, terminating: {}}}",
            e.ready, e.serving, e.terminating
        );
        if let Some(z) = e.zone_hint {
            let _ = writeln!(out, "    hints: {{forZones: [{{name: {z}}}]}}");
        }
    }
}

/// YAML flow-sequence items, quoted (an IPv6 address is not a plain scalar
/// everywhere: `::1` would start a mapping key).
fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}
