//! A virtual node: a client namespace, a node namespace and pod namespaces,
//! wired like a real node (pods on /32 routes behind veths, the client on
//! the node's "NIC"). Only 198.18.0.0/15 addresses; no default route in the
//! node, so nothing can leave the machine.
//!
//! ```text
//!  client 198.18.0.1 --eth0-- [node eth0 198.18.0.2] --p1-- pod1 198.18.1.11
//!                                                      --p2-- pod2 198.18.1.12 ...
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Context;

use crate::netns::{unique, Netns};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The node side of every pod veth carries this address (pods' gateway).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The node's name in the YAML.
pub const NODE_NAME: &str = "node-a";

pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, 10 + i as u8)
}

/// The IPv6 addresses `Topology::add_ipv6` gives (fd00::/8 only).
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 2);
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 1, 0, 0, 0, 1);

/// The IPv6 twin the fixtures and the virtual cluster give an IPv4 test
/// address: 198.18.x.y is fd00:18:0:x::y (so 198.18.0.1 is fd00:18::1,
/// `CLIENT_IP6`, and 198.18.0.2 is `NODE_IP6`).
pub fn v6_of(ip: Ipv4Addr) -> Ipv6Addr {
    let o = ip.octets();
    assert_eq!(&o[..2], &[198, 18], "{ip} has no IPv6 twin");
    Ipv6Addr::new(0xfd00, 0x18, 0, o[2] as u16, 0, 0, 0, o[3] as u16)
}

pub fn pod_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, 0, 1, 0, 0, 0, 0x10 + i as u16)
}

pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// Interface name on the node side.
    pub host_iface: String,
}

/// How the client reaches the node's NIC.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NicMode {
    /// Plain veth, offloads as the kernel sets them (CHECKSUM_PARTIAL).
    Default,
    /// The client's veth computes checksums in software: what a physical
    /// NIC hands to XDP (complete checksums). XDP_TX frames on a veth only
    /// reach a peer that runs XDP itself; see `Agent::start_peer_xdp`.
    LikePhysical,
}

pub struct Topology {
    pub client: Netns,
    pub node: Netns,
    pub pods: Vec<Pod>,
    /// The node's interface facing the client.
    pub nic: String,
}

impl Topology {
    /// A node with `pods` pod namespaces.
    pub fn new(pods: usize) -> anyhow::Result<Topology> {
        Self::with_nic(pods, NicMode::Default)
    }

    pub fn with_nic(pods: usize, nic_mode: NicMode) -> anyhow::Result<Topology> {
        let tag = unique("lb");
        let node = Netns::new(format!("{tag}-node"))?;
        let client = Netns::new(format!("{tag}-cli"))?;
        let nic = "eth0".to_string();
        node.add_veth(&nic, &client, "eth0")?;
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", &nic])?;
        node.ip(&["link", "set", &nic, "up"])?;
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;
        client.ip(&["link", "set", "eth0", "up"])?;
        // The client routes ClusterIPs (198.19.0.0/16) via the node, like an
        // external router would; the node itself has no default route.
        client.ip(&["route", "add", "198.19.0.0/16", "via", &NODE_IP.to_string()])?;
        client.ip(&["route", "add", "198.18.1.0/24", "via", &NODE_IP.to_string()])?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        if nic_mode == NicMode::LikePhysical {
            client
                .exec("ethtool", &["-K", "eth0", "tx", "off"])
                .context("ethtool")?;
        }

        let mut topo = Topology {
            client,
            node,
            pods: Vec::new(),
            nic,
        };
        for i in 1..=pods {
            topo.add_pod(i)?;
        }
        Ok(topo)
    }

    /// Pod `i` (address `pod_ip(i)`, node interface `p<i>`), wired like a
    /// CNI would; it can be added while an agent runs.
    pub fn add_pod(&mut self, i: usize) -> anyhow::Result<&Pod> {
        let ns = Netns::new(format!("{}-p{i}", self.node.name.trim_end_matches("-node")))?;
        let pod = wire_pod(&self.node, ns, format!("p{i}"), pod_ip(i), POD_GATEWAY)?;
        self.pods.push(pod);
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Deletes pod `i` (as numbered by `add_pod`), like a CNI's DEL.
    pub fn remove_pod(&mut self, i: usize) -> anyhow::Result<()> {
        let at = self
            .pods
            .iter()
            .position(|p| p.ip == pod_ip(i))
            .with_context(|| format!("no pod {i}"))?;
        let pod = self.pods.remove(at);
        unwire_pod(&self.node, pod)
    }

    /// Every interface the agent attaches TC to: the NIC and the pod veths.
    pub fn tc_ifaces(&self) -> Vec<String> {
        std::iter::once(self.nic.clone())
            .chain(self.pods.iter().map(|p| p.host_iface.clone()))
            .collect()
    }

    /// The test servers (`servers::PodServer`) in the first `n` pods,
    /// named pod-1, pod-2, ...
    pub fn start_servers(&self, n: usize) -> anyhow::Result<Vec<crate::servers::PodServer>> {
        self.pods[..n]
            .iter()
            .enumerate()
            .map(|(i, p)| {
                crate::servers::PodServer::start(&p.ns, &format!("pod-{}", i + 1), 8080, 5353)
            })
            .collect()
    }

    /// Makes the node dual-stack: IPv6 addresses on the client, the NIC
    /// and every pod present (`pod_ip6`, /128 routes like the IPv4 ones),
    /// the client routing IPv6 ClusterIPs (fd00:19::/64) and pods via the
    /// node, the node forwarding IPv6. Addresses skip duplicate address
    /// detection, so they are usable at once.
    pub fn add_ipv6(&self) -> anyhow::Result<()> {
        let (node, client) = (&self.node, &self.client);
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for ns in [node, client] {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")?;
        }
        let nic = &self.nic;
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{NODE_IP6}/64"),
            "dev",
            nic,
            "nodad",
        ])?;
        client.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{CLIENT_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        for to in ["fd00:19::/64", "fd00:18:0:1::/64"] {
            client.ip(&["-6", "route", "add", to, "via", &NODE_IP6.to_string()])?;
        }
        for (i, pod) in self.pods.iter().enumerate() {
            let ip = pod_ip6(i + 1);
            let gw = POD_GATEWAY6.to_string();
            let host = &pod.host_iface;
            node.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{gw}/128"),
                "dev",
                host,
                "nodad",
            ])?;
            node.ip(&["-6", "route", "add", &format!("{ip}/128"), "dev", host])?;
            pod.ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")?;
            pod.ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip}/128"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            pod.ns.ip(&["-6", "route", "add", &gw, "dev", "eth0"])?;
            pod.ns
                .ip(&["-6", "route", "add", "default", "via", &gw, "dev", "eth0"])?;
        }
        Ok(())
    }

    pub fn pod_ifaces(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.host_iface.clone()).collect()
    }
}

/// Wires pod namespace `ns` to `node` the way CNI plugins (bridge, ptp,
/// Calico, Cilium) do, so a running agent sees what it sees on a real node:
/// the veth pair is made inside the pod's namespace, its host end moved
/// into the node's namespace under a temporary name, renamed to
/// `host_iface`, given the pods' gateway address `gw` and a /32 route to
/// the pod; the pod gets its address and a default route via `gw`.
pub fn wire_pod(
    node: &Netns,
    ns: Netns,
    host_iface: String,
    ip: Ipv4Addr,
    gw: Ipv4Addr,
) -> anyhow::Result<Pod> {
    let tmp = plug_veth(node, &ns)?;
    configure_pod(node, ns, &tmp, host_iface, ip, gw)
}

/// The first half of `wire_pod`: the pod's veth, its host end moved into
/// `node` under a temporary name (returned). The link exists in the node's
/// namespace when this returns.
pub fn plug_veth(node: &Netns, ns: &Netns) -> anyhow::Result<String> {
    let tmp = temporary_name();
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", &tmp])?;
    ns.ip(&["link", "set", &tmp, "netns", &node.name])?;
    Ok(tmp)
}

/// The second half of `wire_pod`: rename, addresses, routes, links up.
pub fn configure_pod(
    node: &Netns,
    ns: Netns,
    tmp: &str,
    host_iface: String,
    ip: Ipv4Addr,
    gw: Ipv4Addr,
) -> anyhow::Result<Pod> {
    node.ip(&["link", "set", tmp, "name", &host_iface])?;
    node.ip(&["addr", "add", &format!("{gw}/32"), "dev", &host_iface])?;
    node.ip(&["link", "set", &host_iface, "up"])?;
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_iface])?;
    ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", &gw.to_string(), "dev", "eth0"])?;
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        &gw.to_string(),
        "dev",
        "eth0",
    ])?;
    Ok(Pod { ns, ip, host_iface })
}

/// Deletes a pod the way a CNI's DEL does: the host end of its veth first
/// (which takes the pod's end with it), then the namespace.
pub fn unwire_pod(node: &Netns, pod: Pod) -> anyhow::Result<()> {
    node.ip(&["link", "del", &pod.host_iface])?;
    drop(pod);
    Ok(())
}

/// A name no other interface of this machine's test namespaces uses right
/// now (interface names hold 15 bytes).
fn temporary_name() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "tmp{:x}x{:x}",
        std::process::id() & 0xffff,
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}
