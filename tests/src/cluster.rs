//! A virtual cluster: node namespaces, each with its own pods, joined by a
//! routed fabric namespace, and an external client behind the fabric. The
//! fabric holds static routes to each node's pod range (what a cloud route
//! table or BGP would advertise) and to the "load-balancer" range, which it
//! sends to node A. Only 198.18.0.0/15; nothing has a route out of the
//! fabric, so no packet can leave the machine. `Cluster::add_ipv6` makes
//! it dual-stack: every address and route gets its twin in fd00:18::/32
//! (`topology::v6_of`: 198.18.x.y is fd00:18:0:x::y).
//!
//! ```text
//!                        client 198.18.9.2
//!                               |
//!                 fabric .9.1 / .10.1 / .11.1
//!                  /                        \
//!   node-a eth0 198.18.10.2          node-b eth0 198.18.11.2
//!    pods 198.18.1.10, .11 ...        pods 198.18.2.10, .11 ...
//! ```

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    agent::Agent,
    netns::{unique, Netns},
    topology::{v6_of, wire_pod, Pod},
};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 2);
pub const FABRIC_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 1);
/// Addresses the fabric routes to node A: external IPs and load-balancer
/// ingress IPs live here.
pub const EXTERNAL_RANGE: &str = "198.18.20.0/24";

pub fn external_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 20, i)
}

/// Node names, in order: node-a, node-b, ...
pub fn node_name(n: usize) -> String {
    format!("node-{}", (b'a' + n as u8) as char)
}

pub fn node_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 10 + n as u8, 2)
}

fn fabric_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 10 + n as u8, 1)
}

/// Pod `i` (from 0) of node `n`.
pub fn pod_ip(n: usize, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1 + n as u8, 10 + i as u8)
}

fn pod_gateway(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1 + n as u8, 1)
}

pub struct Node {
    pub ns: Netns,
    pub name: String,
    pub ip: Ipv4Addr,
    pub pods: Vec<Pod>,
}

impl Node {
    /// Interfaces the agent attaches TC to: the NIC and the pod veths.
    pub fn tc_ifaces(&self) -> Vec<String> {
        std::iter::once("eth0".to_string())
            .chain(self.pods.iter().map(|p| p.host_iface.clone()))
            .collect()
    }
}

pub struct Cluster {
    pub fabric: Netns,
    pub client: Netns,
    pub nodes: Vec<Node>,
    /// `add_ipv6` ran: agents get each node's IPv6 address too.
    pub dual_stack: bool,
}

/// The IPv6 twin of `node_ip(n)`.
pub fn node_ip6(n: usize) -> Ipv6Addr {
    v6_of(node_ip(n))
}

/// The IPv6 twin of `pod_ip(n, i)`.
pub fn pod_ip6(n: usize, i: usize) -> Ipv6Addr {
    v6_of(pod_ip(n, i))
}

/// The IPv6 twin of `CLIENT_IP`.
pub fn client_ip6() -> Ipv6Addr {
    v6_of(CLIENT_IP)
}

/// The IPv6 twin of `external_ip(i)`.
pub fn external_ip6(i: u8) -> Ipv6Addr {
    v6_of(external_ip(i))
}

impl Cluster {
    /// `pods[n]` pods on node n.
    pub fn new(pods: &[usize]) -> anyhow::Result<Cluster> {
        let tag = unique("lbc");
        let fabric = Netns::new(format!("{tag}-fab"))?;
        let client = Netns::new(format!("{tag}-cli"))?;
        fabric.sysctl("net.ipv4.ip_forward", "1")?;
        fabric.add_veth("cli", &client, "eth0")?;
        fabric.ip(&[
            "addr",
            "add",
            &format!("{FABRIC_CLIENT_SIDE}/24"),
            "dev",
            "cli",
        ])?;
        fabric.ip(&["link", "set", "cli", "up"])?;
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;
        client.ip(&["link", "set", "eth0", "up"])?;
        client.ip(&[
            "route",
            "add",
            "default",
            "via",
            &FABRIC_CLIENT_SIDE.to_string(),
        ])?;

        let mut nodes = Vec::new();
        for (n, &count) in pods.iter().enumerate() {
            let name = node_name(n);
            let ns = Netns::new(format!("{tag}-{}", &name[5..]))?;
            let link = format!("n{n}");
            fabric.add_veth(&link, &ns, "eth0")?;
            fabric.ip(&["addr", "add", &format!("{}/24", fabric_ip(n)), "dev", &link])?;
            fabric.ip(&["link", "set", &link, "up"])?;
            let ip = node_ip(n);
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["link", "set", "lo", "up"])?;
            ns.ip(&["route", "add", "default", "via", &fabric_ip(n).to_string()])?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
            // The pod range of this node, advertised on the fabric.
            fabric.ip(&[
                "route",
                "add",
                &format!("198.18.{}.0/24", 1 + n),
                "via",
                &ip.to_string(),
            ])?;
            let mut node = Node {
                ns,
                name,
                ip,
                pods: Vec::new(),
            };
            for i in 0..count {
                add_pod(&mut node, n, i, &tag)?;
            }
            nodes.push(node);
        }
        if !nodes.is_empty() {
            fabric.ip(&[
                "route",
                "add",
                EXTERNAL_RANGE,
                "via",
                &nodes[0].ip.to_string(),
            ])?;
        }
        Ok(Cluster {
            fabric,
            client,
            nodes,
            dual_stack: false,
        })
    }

    /// Makes the cluster dual-stack: every address above gets its IPv6
    /// twin (/64 links, /128 pods), the fabric routes each node's pod /64
    /// and the external /64 like their IPv4 ranges, everything forwards
    /// IPv6. Addresses skip duplicate address detection (usable at once).
    pub fn add_ipv6(&mut self) -> anyhow::Result<()> {
        let six = |ip: Ipv4Addr| v6_of(ip).to_string();
        let on = |ns: &Netns, ip: Ipv4Addr, len: u8, dev: &str| {
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{}/{len}", six(ip)),
                "dev",
                dev,
                "nodad",
            ])
        };
        let mut all: Vec<&Netns> = vec![&self.fabric, &self.client];
        all.extend(self.nodes.iter().map(|n| &n.ns));
        for ns in all {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        on(&self.fabric, FABRIC_CLIENT_SIDE, 64, "cli")?;
        on(&self.client, CLIENT_IP, 64, "eth0")?;
        let via = six(FABRIC_CLIENT_SIDE);
        self.client
            .ip(&["-6", "route", "add", "default", "via", &via])?;
        for (n, node) in self.nodes.iter().enumerate() {
            on(&self.fabric, fabric_ip(n), 64, &format!("n{n}"))?;
            on(&node.ns, node.ip, 64, "eth0")?;
            node.ns
                .ip(&["-6", "route", "add", "default", "via", &six(fabric_ip(n))])?;
            let pods = format!("{}/64", six(Ipv4Addr::new(198, 18, 1 + n as u8, 0)));
            self.fabric
                .ip(&["-6", "route", "add", &pods, "via", &six(node.ip)])?;
            for (i, pod) in node.pods.iter().enumerate() {
                let (ip, gw) = (six(pod_ip(n, i)), six(pod_gateway(n)));
                on(&node.ns, pod_gateway(n), 128, &pod.host_iface)?;
                node.ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    &format!("{ip}/128"),
                    "dev",
                    &pod.host_iface,
                ])?;
                pod.ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")?;
                on(&pod.ns, pod_ip(n, i), 128, "eth0")?;
                pod.ns.ip(&["-6", "route", "add", &gw, "dev", "eth0"])?;
                pod.ns
                    .ip(&["-6", "route", "add", "default", "via", &gw, "dev", "eth0"])?;
            }
        }
        if let Some(a) = self.nodes.first() {
            let external = format!("{}/64", six(external_ip(0)));
            self.fabric
                .ip(&["-6", "route", "add", &external, "via", &six(a.ip)])?;
        }
        self.dual_stack = true;
        Ok(())
    }

    /// The test servers (`servers::PodServer`) in every pod, named by node
    /// letter and index: a0, a1, b0, ...; on both families once
    /// `add_ipv6` ran.
    pub fn start_servers(&self) -> anyhow::Result<Vec<crate::servers::PodServer>> {
        let mut servers = Vec::new();
        for node in &self.nodes {
            for (i, p) in node.pods.iter().enumerate() {
                let name = format!("{}{i}", &node.name[5..]);
                servers.push(crate::servers::PodServer::start(&p.ns, &name, 8080, 5353)?);
                if self.dual_stack {
                    servers.push(crate::servers::PodServer::start_v6(
                        &p.ns, &name, 8080, 5353,
                    )?);
                }
            }
        }
        Ok(servers)
    }

    /// The real `lb run` on every node, all reading `config`, each with its
    /// own `--node-name` and `--node-ip`, following every interface of its
    /// node; `extra` is added to every one.
    pub fn start_agents(&self, config: &Path, extra: &[String]) -> anyhow::Result<Vec<Agent>> {
        self.start_agents_with_env(config, extra, &[])
    }

    /// `start_agents`, each agent given extra environment variables.
    pub fn start_agents_with_env(
        &self,
        config: &Path,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Vec<Agent>> {
        self.nodes
            .iter()
            .map(|node| {
                let mut args = vec![
                    "--config".to_string(),
                    config.display().to_string(),
                    "--node-ip".into(),
                    node.ip.to_string(),
                    "--node-name".into(),
                    node.name.clone(),
                ];
                if self.dual_stack {
                    args.extend(["--node-ip".into(), v6_of(node.ip).to_string()]);
                }
                args.extend_from_slice(extra);
                let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("lbnode")));
                let mut agent = Agent::spawn_with_env(&node.ns, &pin_dir, &args, env)?;
                agent.wait_for_log("datapath ready", Duration::from_secs(20))?;
                Ok(agent)
            })
            .collect()
    }
}

fn add_pod(node: &mut Node, n: usize, i: usize, tag: &str) -> anyhow::Result<()> {
    let ns = Netns::new(format!("{tag}-{}{i}", &node.name[5..]))?;
    let pod = wire_pod(&node.ns, ns, format!("p{i}"), pod_ip(n, i), pod_gateway(n))?;
    node.pods.push(pod);
    Ok(())
}
