//! The smoke test of every kernel in the matrix (`cargo xtask
//! test-kernels` runs it inside each guest; `cargo xtask test` here): the
//! agent as a user starts it, in its default TC mode (TCX where the kernel
//! has it, clsact filters before 6.6), real sockets on a virtual node.
//!
//! ClusterIP and NodePort over TCP and UDP through TC; NodePort over TCP
//! and UDP through XDP, native and generic; the node's own connection
//! through the socket hooks; a restart that keeps a stream going.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use aya::programs::TcAttachType::Ingress;
use lb_tests::{
    agent::{Agent, ConfigFile},
    cgroup::Cgroup,
    example::{yaml, Endpoint, Svc},
    netns::Netns,
    servers::{tcp_who, udp_who, Answer, PodServer, StreamReader},
    topology::{NicMode, Topology, CLIENT_IP, NODE_IP},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const BACKENDS: usize = 2;
const TRIES: usize = 24;

/// `web` with a NodePort on both protocols.
fn web(topo: &Topology) -> String {
    let mut svc = Svc::web(
        topo.pods[..BACKENDS]
            .iter()
            .map(|p| Endpoint::ready(p.ip))
            .collect(),
    );
    // The UDP port gets a NodePort too.
    svc.ports[1].node_port = Some(30053);
    yaml(&[svc])
}

/// A node with two serving pods and a client pod (the last).
fn node(nic: NicMode) -> (Topology, Vec<PodServer>, ConfigFile) {
    lb_tests::require_root();
    let topo = Topology::with_nic(BACKENDS + 1, nic).expect("topology");
    let servers = topo.start_servers(BACKENDS).expect("servers");
    let config = ConfigFile::new(&web(&topo)).unwrap();
    (topo, servers, config)
}

/// `TRIES` TCP and UDP exchanges with `tcp` and `udp` from `ns`: every one
/// answered, by every backend, each seeing `source`.
fn balanced(ns: &Netns, tcp: SocketAddrV4, udp: SocketAddrV4, source: Ipv4Addr) {
    let answers: Vec<Answer> = ns
        .run(move || {
            (0..TRIES)
                .flat_map(|i| {
                    [
                        tcp_who(tcp).unwrap_or_else(|e| panic!("TCP {i} to {tcp}: {e}")),
                        udp_who(udp).unwrap_or_else(|e| panic!("UDP {i} to {udp}: {e}")),
                    ]
                })
                .collect()
        })
        .unwrap();
    let pods: BTreeSet<&str> = answers.iter().map(|a| a.pod.as_str()).collect();
    assert_eq!(pods.len(), BACKENDS, "{tcp}/{udp}: {pods:?}");
    assert!(
        answers.iter().all(|a| *a.peer.ip() == source),
        "{tcp}/{udp}: backends must see {source}"
    );
}

/// The agent chose the TC mode this kernel calls for (TCX from 6.6, clsact
/// filters before), and the programs are on the NIC that way.
fn tc_mode_fits_the_kernel(agent: &Agent, topo: &Topology) {
    let line = agent
        .logs()
        .into_iter()
        .find(|l| l.contains("TC programs attach"))
        .unwrap_or_default();
    let tcx = lb_userspace::kernel::probes::has_tcx();
    let (want, on_nic) = if tcx {
        (
            "through TCX links",
            lb_tests::agent::tcx_programs(&topo.node, &topo.nic, Ingress),
        )
    } else {
        (
            "as clsact filters: this kernel has no TCX",
            lb_tests::agent::tc_programs(&topo.node, &topo.nic, Ingress),
        )
    };
    assert!(line.contains(want), "kernel with TCX: {tcx}: {line}");
    assert_eq!(on_nic, ["lb_tc_ingress"]);
}

#[test]
fn tc_balances_cluster_ip_and_node_port_over_tcp_and_udp() {
    let (topo, _servers, config) = node(NicMode::Default);
    let agent = Agent::start(&topo, &config.path).unwrap();
    tc_mode_fits_the_kernel(&agent, &topo);
    let client_pod = &topo.pods[BACKENDS].ns;
    balanced(
        client_pod,
        SocketAddrV4::new(CLUSTER_IP, 80),
        SocketAddrV4::new(CLUSTER_IP, 53),
        topo.pods[BACKENDS].ip,
    );
    balanced(
        &topo.client,
        SocketAddrV4::new(NODE_IP, 30080),
        SocketAddrV4::new(NODE_IP, 30053),
        CLIENT_IP,
    );
}

fn xdp(mode: &str) {
    let (topo, _servers, config) = node(NicMode::LikePhysical);
    let mut extra = vec!["--xdp-iface".to_string(), format!("{}{mode}", topo.nic)];
    for i in topo.pod_ifaces() {
        extra.extend(["--iface".into(), i]);
    }
    let agent = Agent::start_with(&topo, &config.path, &extra).unwrap();
    // XDP_TX on a veth reaches the peer only if it runs XDP too (native
    // mode); generic XDP transmits through the stack.
    let _peer = (mode != ":generic").then(|| Agent::start_peer_xdp(&topo).unwrap());
    balanced(
        &topo.client,
        SocketAddrV4::new(NODE_IP, 30080),
        SocketAddrV4::new(NODE_IP, 30053),
        CLIENT_IP,
    );
    assert!(agent.stat("dnat_new") > 0);
    let status = agent.status();
    let label = if mode.is_empty() {
        "xdp"
    } else {
        "xdp_generic"
    };
    assert!(
        status.contains(&format!("{:<16} tc_egress {label}", topo.nic)),
        "{status}"
    );
}

#[test]
fn xdp_balances_node_port_over_tcp_and_udp() {
    xdp("");
}

#[test]
fn generic_xdp_balances_node_port_over_tcp_and_udp() {
    xdp(":generic");
}

#[test]
fn the_nodes_own_connections_go_through_the_socket_hooks() {
    let (topo, _servers, config) = node(NicMode::Default);
    let cg = Cgroup::new().unwrap();
    let extra = ["--cgroup".to_string(), cg.path.display().to_string()];
    let agent = Agent::start_with(&topo, &config.path, &extra).unwrap();
    let out = cg
        .probe(
            &topo.node,
            Some(SocketAddrV4::new(CLUSTER_IP, 80)),
            Some(SocketAddrV4::new(CLUSTER_IP, 53)),
        )
        .unwrap();
    assert!(out.contains("PROBE peer 198.19.0.10:80"), "{out}");
    assert!(out.contains("PROBE who pod-"), "{out}");
    assert!(out.contains("PROBE from 198.19.0.10:53 pod-"), "{out}");
    assert!(agent.stat("sock_translated") >= 2);
}

#[test]
fn a_restart_keeps_a_stream_going() {
    let (topo, _servers, config) = node(NicMode::Default);
    let mut agent = Agent::start(&topo, &config.path).unwrap();
    let stream =
        StreamReader::open(&topo.pods[BACKENDS].ns, SocketAddrV4::new(CLUSTER_IP, 80)).unwrap();
    let patience = Duration::from_secs(30);
    stream.wait_for_more(64 * 1024, patience).unwrap();
    agent.restart(None).unwrap();
    let logs = agent.logs().join("\n");
    assert!(logs.contains("replaced the programs in place"), "{logs}");
    // Swapped, not stacked: one program on the NIC, the kernel's way.
    tc_mode_fits_the_kernel(&agent, &topo);
    stream.wait_for_more(64 * 1024, patience).unwrap();
    stream.finish().unwrap();
}
