//! Service and EndpointSlice YAML for tests and the demo, written the way
//! `kubectl get svc,endpointslices -A -o yaml` prints them.

use std::{fmt::Write, net::Ipv4Addr};

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
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    pub fn ready(ip: Ipv4Addr) -> Endpoint {
        Endpoint {
            ip,
            ready: true,
            serving: true,
            terminating: false,
        }
    }
    pub fn terminating(ip: Ipv4Addr) -> Endpoint {
        Endpoint {
            ip,
            ready: false,
            serving: true,
            terminating: true,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Svc {
    pub namespace: &'static str,
    pub name: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<Port>,
    pub affinity_timeout_s: Option<u32>,
    pub endpoints: Vec<Endpoint>,
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
        }
    }
}

pub fn yaml(services: &[Svc]) -> String {
    let mut out = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for s in services {
        let node_port = s.ports.iter().any(|p| p.node_port.is_some());
        let _ = write!(
            out,
            "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: {}\n    namespace: {}\n  spec:\n    type: {}\n    clusterIP: {}\n    clusterIPs: [{}]\n",
            s.name,
            s.namespace,
            if node_port { "NodePort" } else { "ClusterIP" },
            s.cluster_ip,
            s.cluster_ip
        );
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
        let _ = write!(
            out,
            "- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: {}-1\n    namespace: {}\n    labels:\n      kubernetes.io/service-name: {}\n  addressType: IPv4\n  ports:\n",
            s.name, s.namespace, s.name
        );
        for p in &s.ports {
            let _ = write!(
                out,
                "  - name: {}\n    protocol: {}\n    port: {}\n",
                p.name, p.protocol, p.target
            );
        }
        if s.endpoints.is_empty() {
            out.push_str("  endpoints: []\n");
        } else {
            out.push_str("  endpoints:\n");
        }
        for e in &s.endpoints {
            let _ = write!(
                out,
                "  - addresses: [{}]\n    nodeName: {}\n    conditions: {{ready: {}, serving: {}, terminating: {}}}\n",
                e.ip,
                crate::topology::NODE_NAME,
                e.ready,
                e.serving,
                e.terminating
            );
        }
    }
    out
}
