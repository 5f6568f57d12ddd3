//! IPv6 and dual-stack Services end to end: the real `lb run` on a
//! dual-stack virtual node (`Topology::add_ipv6`, fd00::/8 only), real
//! sockets in the client and pod namespaces.

use std::{
    net::{Ipv6Addr, SocketAddrV6},
    time::Duration,
};

use lb_tests::{
    agent::{Agent, ConfigFile},
    servers::{tcp_who, tcp_who6, udp_who6, PodServer},
    topology::{pod_ip, pod_ip6, Topology, CLIENT_IP6, NODE_IP6, NODE_NAME},
};

const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x10);

/// The web Service, dual-stack, on pods 1..=backends (both families).
fn dual_stack_web(backends: usize) -> String {
    let v4: Vec<String> = (1..=backends)
        .map(|i| format!("- addresses: [{}]\n  nodeName: {NODE_NAME}", pod_ip(i)))
        .collect();
    let v6: Vec<String> = (1..=backends)
        .map(|i| format!("- addresses: [\"{}\"]\n  nodeName: {NODE_NAME}", pod_ip6(i)))
        .collect();
    let slice = |name: &str, family: &str, eps: &[String]| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
             namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: \
             {family}\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n- {{name: dns, port: \
             5353, protocol: UDP}}\nendpoints:\n{}\n",
            eps.join("\n")
        )
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  \
         type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  \
         clusterIP: 198.19.0.10\n  clusterIPs: [198.19.0.10, \"{CLUSTER_IP6}\"]\n  ports:\n  - \
         {{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}}\n  - {{name: \
         dns, port: 53, protocol: UDP, targetPort: 5353}}\n---\n{}---\n{}",
        slice("web-v4", "IPv4", &v4),
        slice("web-v6", "IPv6", &v6),
    )
}

/// A dual-stack node with 2 serving pods and a client pod (pod 3), and an
/// agent given the node's address of each family.
struct Node {
    topo: Topology,
    _v4: Vec<PodServer>,
    _v6: Vec<PodServer>,
    _config: ConfigFile,
    agent: Agent,
}

impl Node {
    fn new() -> Node {
        lb_tests::require_root();
        let topo = Topology::new(3).expect("topology");
        topo.add_ipv6().expect("IPv6 addresses");
        let v4 = topo.start_servers(2).expect("servers");
        let v6 = (0..2)
            .map(|i| PodServer::start_v6(&topo.pods[i].ns, &format!("pod-{}", i + 1), 8080, 5353))
            .collect::<anyhow::Result<_>>()
            .expect("IPv6 servers");
        let config = ConfigFile::new(&dual_stack_web(2)).expect("config");
        let extra = ["--node-ip".to_string(), NODE_IP6.to_string()];
        let agent = Agent::start_with(&topo, &config.path, &extra).expect("agent");
        Node {
            topo,
            _v4: v4,
            _v6: v6,
            _config: config,
            agent,
        }
    }
}

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

#[test]
fn ipv6_clusterip_over_tcp_and_udp_reaches_both_pods_from_the_client_and_from_a_pod() {
    let n = Node::new();
    // From outside the node (routed to it), TCP: both backends in turn,
    // each seeing the client's own address.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let lb_tests::servers::Answer6 { pod, peer } = n
            .topo
            .client
            .run(|| tcp_who6(v6(CLUSTER_IP6, 80)))
            .unwrap()
            .expect("TCP over IPv6 to the ClusterIP");
        assert_eq!(*peer.ip(), CLIENT_IP6, "source kept");
        seen.insert(pod);
    }
    assert_eq!(seen.len(), 2, "both backends: {seen:?}");
    // From a pod, UDP.
    let lb_tests::servers::Answer6 { pod, peer } = n.topo.pods[2]
        .ns
        .run(|| udp_who6(v6(CLUSTER_IP6, 53)))
        .unwrap()
        .expect("UDP over IPv6 to the ClusterIP");
    assert!(pod.starts_with("pod-"), "{pod}");
    assert_eq!(*peer.ip(), pod_ip6(3));
    assert!(n.agent.stat("dnat_new") >= 25);
}

#[test]
fn a_dual_stack_service_answers_on_both_families() {
    let n = Node::new();
    let four = n
        .topo
        .client
        .run(|| tcp_who("198.19.0.10:80".parse().unwrap()))
        .unwrap()
        .expect("IPv4");
    assert!(four.pod.starts_with("pod-"), "{four:?}");
    let lb_tests::servers::Answer6 { pod, peer } = n
        .topo
        .client
        .run(|| tcp_who6(v6(CLUSTER_IP6, 80)))
        .unwrap()
        .expect("IPv6");
    assert!(pod.starts_with("pod-"));
    assert_eq!(*peer.ip(), CLIENT_IP6);
    let services = n.agent.inspect(&["services"]);
    assert!(services.contains("default/web:http/TCP/IPv6"), "{services}");
    assert!(services.contains("[fd00:19::10]:80/TCP"), "{services}");
}

#[test]
fn ipv6_nodeport_reaches_the_pods_from_an_external_client() {
    let n = Node::new();
    let lb_tests::servers::Answer6 { pod, peer } = n
        .topo
        .client
        .run(|| tcp_who6(v6(NODE_IP6, 30080)))
        .unwrap()
        .expect("TCP over IPv6 to the NodePort");
    assert!(pod.starts_with("pod-"), "{pod}");
    // Local backends: the client's address is kept.
    assert_eq!(*peer.ip(), CLIENT_IP6);
}

#[test]
fn a_pod_reaching_itself_over_ipv6_is_masqueraded_to_the_nodes_ipv6_address() {
    let n = Node::new();
    // Pod 1 asks the ClusterIP until Maglev sends it to itself (hairpin):
    // its reply would never leave it without the source translated.
    let mut hairpin = None;
    for _ in 0..40 {
        let lb_tests::servers::Answer6 { pod, peer } = n.topo.pods[0]
            .ns
            .run(|| tcp_who6(v6(CLUSTER_IP6, 80)))
            .unwrap()
            .expect("TCP from pod 1");
        if pod == "pod-1" {
            hairpin = Some(peer);
            break;
        }
        assert_eq!(*peer.ip(), pod_ip6(1), "to pod-2: source kept");
    }
    let peer = hairpin.expect("pod 1 reached itself in 40 connections");
    assert_eq!(*peer.ip(), NODE_IP6, "hairpin: SNAT to the node");
}

#[test]
fn the_nodes_own_ipv6_sockets_are_translated_by_the_socket_hooks() {
    lb_tests::require_root();
    let topo = Topology::new(2).expect("topology");
    topo.add_ipv6().expect("IPv6 addresses");
    let _v4 = topo.start_servers(1).expect("servers");
    let _v6 = PodServer::start_v6(&topo.pods[0].ns, "pod-1", 8080, 5353).expect("server");
    let config = ConfigFile::new(&dual_stack_web(1)).expect("config");
    let cg = lb_tests::cgroup::Cgroup::new().unwrap();
    let extra = [
        "--node-ip".to_string(),
        NODE_IP6.to_string(),
        "--cgroup".to_string(),
        cg.path.display().to_string(),
    ];
    let agent = Agent::start_with(&topo, &config.path, &extra).expect("agent");
    let out = cg
        .probe_any(
            &topo.node,
            Some(v6(CLUSTER_IP6, 80).into()),
            Some(v6(CLUSTER_IP6, 53).into()),
        )
        .unwrap();
    // connect6 chose the backend; getpeername6 and recvmsg6 show the
    // frontend to the application.
    assert!(out.contains("PROBE peer [fd00:19::10]:80"), "{out}");
    assert!(out.contains("PROBE who pod-1"), "{out}");
    assert!(out.contains("PROBE from [fd00:19::10]:53 pod-1"), "{out}");
    assert!(agent.stat("sock_translated") >= 2);
}

#[test]
fn an_ipv6_stream_survives_an_agent_restart() {
    use lb_tests::servers::StreamReader;
    const SOME: u64 = 256 * 1024;
    const PATIENCE: Duration = Duration::from_secs(10);
    let mut n = Node::new();
    let stream = StreamReader::open(&n.topo.client, v6(CLUSTER_IP6, 80)).expect("stream");
    stream.wait_for_more(SOME, PATIENCE).unwrap();
    // Stopped: the pinned datapath keeps the stream going.
    let status = n
        .agent
        .stop_with(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    assert!(status.success());
    stream.wait_for_more(SOME, PATIENCE).unwrap();
    // The next agent adopts the maps: still flowing, and new IPv6 flows
    // are balanced.
    n.agent.start_again(None).unwrap();
    stream.wait_for_more(SOME, PATIENCE).unwrap();
    let lb_tests::servers::Answer6 { pod, .. } = n
        .topo
        .client
        .run(|| tcp_who6(v6(CLUSTER_IP6, 80)))
        .unwrap()
        .expect("a new IPv6 connection after the restart");
    assert!(pod.starts_with("pod-"));
    stream.wait_for_more(SOME, PATIENCE).unwrap();
    stream.finish().expect("the stream never broke");
}
