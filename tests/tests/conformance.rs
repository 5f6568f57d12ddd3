//! The Kubernetes e2e tests that exercise the proxy, reproduced on our
//! namespace harness with the real `lb run`: each test names the upstream
//! test (kubernetes/kubernetes, test/e2e/network/) in its doc comment and
//! checks what that test asserts. Tests the harness cannot express are
//! listed in the README with the reason.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_tests::{
    agent::{Agent, ConfigFile},
    example::{yaml, Endpoint, Port, Svc},
    netns::Netns,
    servers::{tcp_who, udp_who, Answer, PodServer},
    topology::{Topology, NODE_IP},
};

/// A node with `backends` serving pods and one client pod (the last).
struct World {
    topo: Topology,
    _servers: Vec<PodServer>,
}

impl World {
    fn new(backends: usize) -> World {
        lb_tests::require_root();
        let topo = Topology::new(backends + 1).expect("topology");
        let servers = topo.start_servers(backends).expect("servers");
        World {
            topo,
            _servers: servers,
        }
    }

    fn backend_ips(&self) -> Vec<Ipv4Addr> {
        let pods = &self.topo.pods;
        pods[..pods.len() - 1].iter().map(|p| p.ip).collect()
    }

    fn client_pod(&self) -> &Netns {
        &self.topo.pods.last().expect("client pod").ns
    }

    fn web(&self) -> Svc {
        Svc::web(
            self.backend_ips()
                .into_iter()
                .map(Endpoint::ready)
                .collect(),
        )
    }
}

/// Which pod answers one new TCP connection from `ns` to `to`.
fn who(ns: &Netns, to: SocketAddrV4) -> String {
    answer(ns, to).pod
}

fn answer(ns: &Netns, to: SocketAddrV4) -> Answer {
    ns.run(move || tcp_who(to))
        .unwrap()
        .unwrap_or_else(|e| panic!("connecting to {to}: {e}"))
}

/// The pods answering `n` new connections (upstream's "hostnames served").
fn served_by(ns: &Netns, to: SocketAddrV4, n: usize) -> BTreeSet<String> {
    (0..n).map(|_| who(ns, to)).collect()
}

/// How a connection attempt ended, if it failed.
fn refused(ns: &Netns, to: SocketAddrV4) -> Option<std::io::ErrorKind> {
    ns.run(move || {
        std::net::TcpStream::connect_timeout(&to.into(), Duration::from_secs(2))
            .err()
            .map(|e| e.kind())
    })
    .unwrap()
}

/// Rewrites the config file with `services` and waits for the agent's
/// `nth` "applied config" since it started.
fn apply(config: &ConfigFile, agent: &mut Agent, services: &[Svc], nth: usize) {
    config.rewrite(&yaml(services)).unwrap();
    agent
        .wait_for_nth_log("applied config", nth, Duration::from_secs(5))
        .unwrap();
}

fn cluster_ip(svc: &Svc, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(svc.cluster_ip, port)
}

/// Upstream `execAffinityTestForSessionAffinityTimeout`: the same backend
/// for every request within the timeout; after waiting longer than the
/// timeout, some request reaches another one (else "Session is sticky
/// after reaching the timeout").
fn affinity_times_out(ns: &Netns, to: SocketAddrV4) {
    let first = who(ns, to);
    for _ in 0..10 {
        assert_eq!(who(ns, to), first, "sticky within the timeout");
    }
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(u64::from(AFFINITY_TIMEOUT_S) + 1));
        if who(ns, to) != first {
            return;
        }
    }
    panic!("Session is sticky after reaching the timeout");
}

/// The upstream tests' `timeoutSeconds`.
const AFFINITY_TIMEOUT_S: u32 = 2;

/// Three backends behind `web` with ClientIP affinity for `timeout_s`.
fn affinity_world(timeout_s: u32) -> (World, ConfigFile, Agent) {
    let w = World::new(3);
    let mut svc = w.web();
    svc.affinity_timeout_s = Some(timeout_s);
    let config = ConfigFile::new(&yaml(&[svc])).unwrap();
    let agent = Agent::start(&w.topo, &config.path).unwrap();
    (w, config, agent)
}

/// [sig-network] Services should have session affinity timeout work for
/// service with type clusterIP [LinuxOnly]
#[test]
fn should_have_session_affinity_timeout_work_for_service_with_type_cluster_ip() {
    let (w, _config, _agent) = affinity_world(AFFINITY_TIMEOUT_S);
    let cluster_ip = SocketAddrV4::new(w.web().cluster_ip, 80);
    affinity_times_out(w.client_pod(), cluster_ip);
}

/// [sig-network] Services should have session affinity timeout work for
/// NodePort service [LinuxOnly]
#[test]
fn should_have_session_affinity_timeout_work_for_node_port_service() {
    let (w, _config, _agent) = affinity_world(AFFINITY_TIMEOUT_S);
    affinity_times_out(&w.topo.client, SocketAddrV4::new(NODE_IP, 30080));
}

/// [sig-network] Services should serve a basic endpoint from pods
/// [Conformance]: the Service answers from its endpoint, and follows the
/// endpoints as pods are added and removed.
#[test]
fn should_serve_a_basic_endpoint_from_pods() {
    let w = World::new(2);
    let ips = w.backend_ips();
    let one = Svc::web(vec![Endpoint::ready(ips[0])]);
    let config = ConfigFile::new(&yaml(&[one.clone()])).unwrap();
    let mut agent = Agent::start(&w.topo, &config.path).unwrap();
    let to = cluster_ip(&one, 80);
    assert_eq!(
        served_by(w.client_pod(), to, 10),
        ["pod-1".to_string()].into()
    );
    apply(&config, &mut agent, &[w.web()], 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        served_by(w.client_pod(), to, 30),
        ["pod-1".to_string(), "pod-2".to_string()].into()
    );
    apply(
        &config,
        &mut agent,
        &[Svc::web(vec![Endpoint::ready(ips[1])])],
        2,
    );
    assert_eq!(
        served_by(w.client_pod(), to, 10),
        ["pod-2".to_string()].into()
    );
}

/// [sig-network] Services should serve multiport endpoints from pods
/// [Conformance]: two ports of one Service, each to its own target port.
#[test]
fn should_serve_multiport_endpoints_from_pods() {
    let w = World::new(2);
    // A second server in each backend pod, on other ports.
    let _alt: Vec<PodServer> = w.topo.pods[..2]
        .iter()
        .enumerate()
        .map(|(i, p)| PodServer::start(&p.ns, &format!("pod-{}-alt", i + 1), 9090, 9595).unwrap())
        .collect();
    let mut svc = w.web();
    svc.ports.push(Port {
        name: "alt",
        protocol: "TCP",
        port: 81,
        target: 9090,
        node_port: None,
    });
    let config = ConfigFile::new(&yaml(&[svc.clone()])).unwrap();
    let _agent = Agent::start(&w.topo, &config.path).unwrap();
    let main = served_by(w.client_pod(), cluster_ip(&svc, 80), 20);
    let alt = served_by(w.client_pod(), cluster_ip(&svc, 81), 20);
    assert!(main.iter().all(|p| !p.ends_with("-alt")), "{main:?}");
    assert!(
        !alt.is_empty() && alt.iter().all(|p| p.ends_with("-alt")),
        "{alt:?}"
    );
}

/// [sig-network] Services should be rejected when no endpoints exist: a
/// connection to a Service without endpoints is refused at once (REJECT),
/// not left to time out.
#[test]
fn should_be_rejected_when_no_endpoints_exist() {
    let w = World::new(1);
    let svc = Svc::web(vec![]);
    let config = ConfigFile::new(&yaml(&[svc.clone()])).unwrap();
    let _agent = Agent::start(&w.topo, &config.path).unwrap();
    assert_eq!(
        refused(w.client_pod(), cluster_ip(&svc, 80)),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
}

/// [sig-network] Services should preserve source pod IP for traffic thru
/// service cluster IP [LinuxOnly]
#[test]
fn should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip() {
    let w = World::new(2);
    let svc = w.web();
    let config = ConfigFile::new(&yaml(&[svc.clone()])).unwrap();
    let _agent = Agent::start(&w.topo, &config.path).unwrap();
    let client_ip = w.topo.pods.last().unwrap().ip;
    for _ in 0..10 {
        let a = answer(w.client_pod(), cluster_ip(&svc, 80));
        assert_eq!(*a.peer.ip(), client_ip, "the backend saw {}", a.peer);
    }
}

/// [sig-network] Services should be able to up and down services: a
/// Service removed stops answering, the others keep theirs, and it answers
/// again once re-created (upstream also restarts kube-proxy in between:
/// see restart.rs for ours).
#[test]
fn should_be_able_to_up_and_down_services() {
    let w = World::new(2);
    let ips = w.backend_ips();
    let web = Svc::web(vec![Endpoint::ready(ips[0])]);
    let api = Svc::api(ips[1]);
    let config = ConfigFile::new(&yaml(&[web.clone(), api.clone()])).unwrap();
    let mut agent = Agent::start(&w.topo, &config.path).unwrap();
    assert_eq!(who(w.client_pod(), cluster_ip(&api, 8443)), "pod-2");
    apply(&config, &mut agent, &[web.clone()], 1);
    assert!(
        refused(w.client_pod(), cluster_ip(&api, 8443)).is_some(),
        "api is down"
    );
    assert_eq!(
        who(w.client_pod(), cluster_ip(&web, 80)),
        "pod-1",
        "web still up"
    );
    apply(&config, &mut agent, &[web.clone(), api.clone()], 2);
    assert_eq!(
        who(w.client_pod(), cluster_ip(&api, 8443)),
        "pod-2",
        "api is back"
    );
}

/// Upstream `execAffinityTestForNonLBServiceWithTransition`: spread without
/// affinity, one backend with ClientIP, spread again once switched off.
fn switches_affinity(w: &World, client: &Netns, to: SocketAddrV4) {
    let plain = w.web();
    let config = ConfigFile::new(&yaml(&[plain.clone()])).unwrap();
    let mut agent = Agent::start(&w.topo, &config.path).unwrap();
    assert!(
        served_by(client, to, 30).len() > 1,
        "spread without affinity"
    );
    let mut sticky = plain.clone();
    sticky.affinity_timeout_s = Some(10_800);
    apply(&config, &mut agent, &[sticky], 1);
    assert_eq!(served_by(client, to, 30).len(), 1, "ClientIP affinity");
    apply(&config, &mut agent, &[plain], 2);
    assert!(served_by(client, to, 30).len() > 1, "spread again");
}

/// [sig-network] Services should be able to switch session affinity for
/// service with type clusterIP [LinuxOnly] [Conformance]
#[test]
fn should_be_able_to_switch_session_affinity_for_service_with_type_cluster_ip() {
    let w = World::new(3);
    switches_affinity(&w, w.client_pod(), cluster_ip(&w.web(), 80));
}

/// [sig-network] Services should be able to switch session affinity for
/// NodePort service [LinuxOnly] [Conformance] (from a client outside the
/// cluster)
#[test]
fn should_be_able_to_switch_session_affinity_for_node_port_service() {
    let w = World::new(3);
    switches_affinity(&w, &w.topo.client, SocketAddrV4::new(NODE_IP, 30080));
}

/// Upstream `execAffinityTestForNonLBService`: with ClientIP affinity,
/// every one of 15 requests reaches the same backend.
fn sticks(client: &Netns, to: SocketAddrV4) {
    let served = served_by(client, to, 15);
    assert_eq!(served.len(), 1, "{to}: {served:?}");
}

/// [sig-network] Services should have session affinity work for service
/// with type clusterIP [LinuxOnly] [Conformance]
#[test]
fn should_have_session_affinity_work_for_service_with_type_cluster_ip() {
    let (w, _config, _agent) = affinity_world(10_800);
    sticks(w.client_pod(), cluster_ip(&w.web(), 80));
}

/// [sig-network] Services should have session affinity work for NodePort
/// service [LinuxOnly] [Conformance]
#[test]
fn should_have_session_affinity_work_for_node_port_service() {
    let (w, _config, _agent) = affinity_world(10_800);
    sticks(&w.topo.client, SocketAddrV4::new(NODE_IP, 30080));
}

/// [sig-network] Services should implement service.kubernetes.io/service-proxy-name
/// and [sig-network] Services should implement service.kubernetes.io/headless:
/// a Service with either label is left alone (not reachable through us),
/// and served once the label is gone.
#[test]
fn should_implement_service_proxy_name_and_headless_labels() {
    let w = World::new(2);
    let ips = w.backend_ips();
    for label in [
        ("service.kubernetes.io/service-proxy-name", "foo-bar"),
        ("service.kubernetes.io/headless", ""),
    ] {
        let mut labelled = Svc::api(ips[1]);
        labelled.extra.labels = vec![label];
        let web = Svc::web(vec![Endpoint::ready(ips[0])]);
        let config = ConfigFile::new(&yaml(&[web.clone(), labelled.clone()])).unwrap();
        let mut agent = Agent::start(&w.topo, &config.path).unwrap();
        agent
            .wait_for_log("skipped", Duration::from_secs(5))
            .unwrap();
        assert!(
            refused(w.client_pod(), cluster_ip(&labelled, 8443)).is_some(),
            "{label:?}: not served"
        );
        assert_eq!(who(w.client_pod(), cluster_ip(&web, 80)), "pod-1");
        labelled.extra.labels.clear();
        apply(&config, &mut agent, &[web, labelled.clone()], 1);
        assert_eq!(
            who(w.client_pod(), cluster_ip(&labelled, 8443)),
            "pod-2",
            "{label:?}: served once unlabelled"
        );
    }
}

/// [sig-network] Services should serve endpoints on same port and
/// different protocols [Conformance]: TCP and UDP on one port number, each
/// to its own target.
#[test]
fn should_serve_endpoints_on_same_port_and_different_protocols() {
    let w = World::new(2);
    let mut svc = w.web();
    svc.ports = vec![
        Port {
            name: "tcp",
            protocol: "TCP",
            port: 53,
            target: 8080,
            node_port: None,
        },
        Port {
            name: "udp",
            protocol: "UDP",
            port: 53,
            target: 5353,
            node_port: None,
        },
    ];
    let config = ConfigFile::new(&yaml(&[svc.clone()])).unwrap();
    let _agent = Agent::start(&w.topo, &config.path).unwrap();
    let to = cluster_ip(&svc, 53);
    assert!(who(w.client_pod(), to).starts_with("pod-"));
    let udp = w.client_pod().run(move || udp_who(to)).unwrap().unwrap();
    assert!(udp.pod.starts_with("pod-"), "{}", udp.pod);
}

/// [sig-network] Services should work after the service has been
/// recreated: deleted, then created again with the same name and address,
/// it answers again.
///
/// History: ignored for a while after 1 run in 6 of the whole file (never
/// alone) stalled on a connection whose handshake completed but whose data
/// got no answer within 3 s; the cause was not found. After the datapath's
/// verifier cost was cut tenfold (agents load and attach far faster), it
/// passed 43 runs in a row (6 of the whole file, 37 alone under two
/// parallel test suites), so it runs again. If it stalls, the agent's log
/// is printed with the failure.
#[test]
fn should_work_after_the_service_has_been_recreated() {
    let w = World::new(1);
    let svc = w.web();
    let config = ConfigFile::new(&yaml(&[svc.clone()])).unwrap();
    let mut agent = Agent::start(&w.topo, &config.path).unwrap();
    let to = cluster_ip(&svc, 80);
    assert_eq!(who(w.client_pod(), to), "pod-1");
    apply(&config, &mut agent, &[Svc::api(w.backend_ips()[0])], 1);
    assert!(refused(w.client_pod(), to).is_some(), "deleted");
    apply(&config, &mut agent, &[svc], 2);
    assert_eq!(who(w.client_pod(), to), "pod-1", "recreated");
}

/// [sig-network] Services should be able to update service type to
/// NodePort listening on same port number but different protocols, and
/// adding and deleting ports: a port added to a running Service answers, a
/// port removed stops answering, the others are untouched.
#[test]
fn should_follow_ports_added_and_deleted() {
    let w = World::new(1);
    let _alt = PodServer::start(&w.topo.pods[0].ns, "pod-1-alt", 9090, 9595).unwrap();
    let one = w.web();
    let mut two = one.clone();
    two.ports.push(Port {
        name: "alt",
        protocol: "TCP",
        port: 81,
        target: 9090,
        node_port: Some(30081),
    });
    let config = ConfigFile::new(&yaml(&[one.clone()])).unwrap();
    let mut agent = Agent::start(&w.topo, &config.path).unwrap();
    assert!(refused(w.client_pod(), cluster_ip(&one, 81)).is_some());
    apply(&config, &mut agent, &[two], 1);
    assert_eq!(who(w.client_pod(), cluster_ip(&one, 81)), "pod-1-alt");
    assert_eq!(
        who(&w.topo.client, SocketAddrV4::new(NODE_IP, 30081)),
        "pod-1-alt"
    );
    assert_eq!(who(w.client_pod(), cluster_ip(&one, 80)), "pod-1");
    apply(&config, &mut agent, &[one.clone()], 2);
    assert!(
        refused(w.client_pod(), cluster_ip(&one, 81)).is_some(),
        "port deleted"
    );
    assert_eq!(who(w.client_pod(), cluster_ip(&one, 80)), "pod-1");
}

/// `web` with externalTrafficPolicy Local, every endpoint on another node
/// (as the EndpointSlice says; the pods are this node's, so the datapath
/// reaches them all the same).
fn local_policy_endpoints_elsewhere(w: &World) -> Svc {
    let mut svc = Svc::web(
        w.backend_ips()
            .into_iter()
            .map(|ip| Endpoint::ready(ip).on("node-b"))
            .collect(),
    );
    svc.extra.external_traffic_policy = Some("Local");
    svc
}

/// externalTrafficPolicy Local is for clients outside the cluster:
/// kube-proxy's short-circuit rules ("pod traffic for <svc> external
/// destinations") send a pod reaching a NodePort to every endpoint, its
/// address kept. Here every endpoint is on another node (as the
/// EndpointSlice says): the outside client is dropped, the pod (its address
/// in `--cluster-cidr`) is served, and the backend sees the pod's address.
/// (No upstream e2e test asserts this on its own.)
#[test]
fn external_traffic_policy_local_applies_to_outside_clients_pods_reach_every_endpoint() {
    let w = World::new(2);
    let config = ConfigFile::new(&yaml(&[local_policy_endpoints_elsewhere(&w)])).unwrap();
    let pod_ip = w.topo.pods.last().unwrap().ip;
    let _agent = Agent::start_with(
        &w.topo,
        &config.path,
        &["--cluster-cidr".into(), format!("{pod_ip}/32")],
    )
    .unwrap();
    let node_port = SocketAddrV4::new(NODE_IP, 30080);
    let served = served_by(w.client_pod(), node_port, 8);
    assert!(!served.is_empty());
    let a = answer(w.client_pod(), node_port);
    assert_eq!(*a.peer.ip(), pod_ip, "the backend saw {}", a.peer);
    assert_eq!(
        refused(&w.topo.client, node_port),
        Some(std::io::ErrorKind::TimedOut),
        "a client outside the cluster is dropped: no endpoint on this node"
    );
}

/// The node's own sockets are inside the cluster too (kube-proxy: "route
/// LOCAL traffic for <svc> external destinations"): through the socket
/// hooks they reach an externalTrafficPolicy Local NodePort whose endpoints
/// are all elsewhere.
#[test]
fn external_traffic_policy_local_lets_the_nodes_own_sockets_reach_every_endpoint() {
    let w = World::new(2);
    let (_config, cg, _agent) = with_socket_lb(&w, &[local_policy_endpoints_elsewhere(&w)]);
    let node_port = SocketAddrV4::new(NODE_IP, 30080);
    let out = cg.probe(&w.topo.node, Some(node_port), None).unwrap();
    assert!(out.contains("PROBE peer 198.18.0.2:30080"), "{out}");
    assert!(out.contains("PROBE who pod-"), "{out}");
}

/// NodePorts answer on 127.0.0.1 for the node's own sockets (kube-proxy's
/// iptables mode accepts localhost NodePorts by default; here through the
/// socket hooks), and not with `--localhost-nodeports false`.
#[test]
fn node_ports_answer_on_localhost_for_the_nodes_own_sockets() {
    let w = World::new(2);
    let config = ConfigFile::new(&yaml(&[w.web()])).unwrap();
    let cg = lb_tests::cgroup::Cgroup::new().unwrap();
    let cgroup = ["--cgroup".to_string(), cg.path.display().to_string()];
    let localhost = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 30080);
    let mut agent = Agent::start_with(&w.topo, &config.path, &cgroup).unwrap();
    let out = cg.probe(&w.topo.node, Some(localhost), None).unwrap();
    assert!(out.contains("PROBE peer 127.0.0.1:30080"), "{out}");
    assert!(out.contains("PROBE who pod-"), "{out}");

    let mut off = agent.args();
    off.extend(["--localhost-nodeports".to_string(), "false".to_string()]);
    agent.restart(Some(off)).unwrap();
    let out = cg.probe(&w.topo.node, Some(localhost), None);
    assert!(
        out.as_ref().map_or(true, |o| !o.contains("PROBE who pod-")),
        "{out:?}"
    );
}

/// [sig-network] Services should be able to change the type from
/// ExternalName to ClusterIP, and from ClusterIP to ExternalName (and the
/// NodePort variants): a Service turned ExternalName stops answering on
/// its ClusterIP and NodePort (it has no frontend), and answers again once
/// turned back.
#[test]
fn should_be_able_to_change_the_type_between_external_name_and_cluster_ip_or_node_port() {
    let w = World::new(1);
    let svc = w.web();
    let config = ConfigFile::new(&yaml(&[svc.clone()])).unwrap();
    let mut agent = Agent::start(&w.topo, &config.path).unwrap();
    let (to, node_port) = (cluster_ip(&svc, 80), SocketAddrV4::new(NODE_IP, 30080));
    assert_eq!(who(w.client_pod(), to), "pod-1");
    assert_eq!(who(&w.topo.client, node_port), "pod-1");
    let mut external_name = svc.clone();
    external_name.extra.type_ = Some("ExternalName");
    apply(&config, &mut agent, &[external_name], 1);
    assert!(
        refused(w.client_pod(), to).is_some(),
        "ExternalName: no ClusterIP"
    );
    assert!(refused(&w.topo.client, node_port).is_some(), "nor NodePort");
    apply(&config, &mut agent, &[svc], 2);
    assert_eq!(who(&w.topo.client, node_port), "pod-1", "NodePort again");
    assert_eq!(who(w.client_pod(), to), "pod-1", "ClusterIP again");
}

/// [sig-network] Services should be possible to connect to a service via
/// ExternalIP when the external IP is not assigned to a node: a client
/// whose route to the address leads to the node reaches the Service.
#[test]
fn should_be_possible_to_connect_to_a_service_via_external_ip_not_assigned_to_a_node() {
    let w = World::new(2);
    let external = Ipv4Addr::new(198, 19, 200, 10);
    let mut svc = w.web();
    svc.extra.external_ips = vec![external.into()];
    let config = ConfigFile::new(&yaml(&[svc])).unwrap();
    let _agent = Agent::start(&w.topo, &config.path).unwrap();
    let to = SocketAddrV4::new(external, 80);
    let served = served_by(&w.topo.client, to, 20);
    assert_eq!(served.len(), 2, "{served:?}");
    assert!(
        w.topo
            .node
            .run(move || std::net::TcpListener::bind(to).is_err())
            .unwrap(),
        "not the node's address"
    );
}

/// [sig-network] Services should allow pods to hairpin back to themselves
/// through services: the only endpoint dials its own Service and reaches
/// itself (masqueraded to the node, so its reply comes back through us).
#[test]
fn should_allow_pods_to_hairpin_back_to_themselves_through_services() {
    lb_tests::require_root();
    let topo = Topology::new(1).unwrap();
    let _servers = topo.start_servers(1).unwrap();
    let pod = &topo.pods[0];
    let svc = Svc::web(vec![Endpoint::ready(pod.ip)]);
    let config = ConfigFile::new(&yaml(&[svc.clone()])).unwrap();
    let _agent = Agent::start(&topo, &config.path).unwrap();
    for _ in 0..5 {
        let a = answer(&pod.ns, cluster_ip(&svc, 80));
        assert_eq!(a.pod, "pod-1");
        assert_eq!(*a.peer.ip(), NODE_IP, "hairpin is masqueraded: {}", a.peer);
    }
}

/// Upstream's terminating-endpoint fallbacks (KEP-1669): with no ready
/// endpoint, a serving and terminating one still takes new connections,
/// for each traffic policy. `policy` sets one of the two fields; `to` is
/// what the client dials.
fn falls_back_to_a_terminating_endpoint(
    internal: Option<&'static str>,
    external: Option<&'static str>,
) {
    let w = World::new(1);
    let mut svc = Svc::web(vec![Endpoint::terminating(w.backend_ips()[0])]);
    svc.extra.internal_traffic_policy = internal;
    svc.extra.external_traffic_policy = external;
    let config = ConfigFile::new(&yaml(&[svc.clone()])).unwrap();
    let _agent = Agent::start(&w.topo, &config.path).unwrap();
    let (ns, to) = if external.is_some() {
        (&w.topo.client, SocketAddrV4::new(NODE_IP, 30080))
    } else {
        (w.client_pod(), cluster_ip(&svc, 80))
    };
    for _ in 0..5 {
        assert_eq!(who(ns, to), "pod-1");
    }
}

/// [sig-network] Services should fallback to terminating endpoints when
/// there are no ready endpoints with internalTrafficPolicy=Cluster
#[test]
fn should_fallback_to_terminating_endpoints_with_internal_traffic_policy_cluster() {
    falls_back_to_a_terminating_endpoint(Some("Cluster"), None);
}

/// [sig-network] Services should fallback to local terminating endpoints
/// when there are no ready endpoints with internalTrafficPolicy=Local
#[test]
fn should_fallback_to_local_terminating_endpoints_with_internal_traffic_policy_local() {
    falls_back_to_a_terminating_endpoint(Some("Local"), None);
}

/// [sig-network] Services should fallback to terminating endpoints when
/// there are no ready endpoints with externalTrafficPolicy=Cluster
#[test]
fn should_fallback_to_terminating_endpoints_with_external_traffic_policy_cluster() {
    falls_back_to_a_terminating_endpoint(None, Some("Cluster"));
}

/// [sig-network] Services should fallback to local terminating endpoints
/// when there are no ready endpoints with externalTrafficPolicy=Local
#[test]
fn should_fallback_to_local_terminating_endpoints_with_external_traffic_policy_local() {
    falls_back_to_a_terminating_endpoint(None, Some("Local"));
}

/// One UDP socket in `ns` connected to `to`: one source port, so one
/// conntrack entry for every datagram it sends.
struct UdpClient(std::net::UdpSocket);

impl UdpClient {
    fn new(ns: &Netns, to: SocketAddrV4) -> UdpClient {
        UdpClient(
            ns.run(move || {
                let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
                s.connect(to).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                s
            })
            .unwrap(),
        )
    }

    /// Who answers one datagram, if anyone does.
    fn ask(&self) -> Option<String> {
        let mut buf = [0u8; 256];
        self.0.send(b"WHO").ok()?;
        let n = self.0.recv(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .next()
            .map(String::from)
    }

    /// Sends until `pod` answers (10 s at most), then checks it stays.
    fn until(&self, pod: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.ask().as_deref() != Some(pod) {
            assert!(std::time::Instant::now() < deadline, "never reached {pod}");
        }
        for _ in 0..5 {
            assert_eq!(self.ask().as_deref(), Some(pod), "the same socket stays");
        }
    }
}

/// The upstream conntrack tests' Service: the UDP port only, on
/// `endpoints`, with a NodePort, and `internal` as internalTrafficPolicy.
fn udp_service(endpoints: Vec<Endpoint>, internal: Option<&'static str>) -> Svc {
    let mut s = Svc::web(endpoints);
    s.ports.retain(|p| p.protocol == "UDP");
    s.ports[0].node_port = Some(30053);
    s.extra.internal_traffic_policy = internal;
    s
}

/// Upstream's "preserve UDP traffic when server pod cycles": one client
/// socket keeps sending while the only endpoint is replaced by another
/// pod; its datagrams reach the new one (a flow whose backend left the
/// Service starts again, never blackholed, even though the old pod still
/// answers).
fn udp_traffic_follows_a_cycled_server_pod(node_port: bool, internal: Option<&'static str>) {
    let w = World::new(2);
    let [one, two] = [w.backend_ips()[0], w.backend_ips()[1]];
    let svc = |ip| udp_service(vec![Endpoint::ready(ip)], internal);
    let config = ConfigFile::new(&yaml(&[svc(one)])).unwrap();
    let mut agent = Agent::start(&w.topo, &config.path).unwrap();
    let client = if node_port {
        UdpClient::new(&w.topo.client, SocketAddrV4::new(NODE_IP, 30053))
    } else {
        UdpClient::new(w.client_pod(), cluster_ip(&svc(one), 53))
    };
    client.until("pod-1");
    apply(&config, &mut agent, &[svc(two)], 1);
    client.until("pod-2");
}

/// [sig-network] Conntrack should be able to preserve UDP traffic when
/// server pod cycles for a NodePort service
#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_node_port_service() {
    udp_traffic_follows_a_cycled_server_pod(true, None);
}

/// [sig-network] Conntrack should be able to preserve UDP traffic when
/// server pod cycles for a ClusterIP service
#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_cluster_ip_service() {
    udp_traffic_follows_a_cycled_server_pod(false, None);
}

/// The same for a ClusterIP with internalTrafficPolicy Local (the
/// variant issue 13 lists; both pods are this node's).
#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_with_internal_traffic_policy_local(
) {
    udp_traffic_follows_a_cycled_server_pod(false, Some("Local"));
}

/// [sig-network] Conntrack should be able to preserve UDP traffic when
/// initial unready endpoints get ready: the client socket sends while the
/// only endpoint is not ready (nothing answers), and the same socket
/// reaches it once it turns ready.
#[test]
fn should_be_able_to_preserve_udp_traffic_when_initial_unready_endpoints_get_ready() {
    let w = World::new(1);
    let ip = w.backend_ips()[0];
    let mut unready = Endpoint::ready(ip);
    unready.ready = false;
    unready.serving = false;
    let config = ConfigFile::new(&yaml(&[udp_service(vec![unready], None)])).unwrap();
    let mut agent = Agent::start(&w.topo, &config.path).unwrap();
    let client = UdpClient::new(w.client_pod(), cluster_ip(&udp_service(vec![], None), 53));
    for _ in 0..3 {
        assert_eq!(client.ask(), None, "no ready endpoint: no answer");
    }
    apply(
        &config,
        &mut agent,
        &[udp_service(vec![Endpoint::ready(ip)], None)],
        1,
    );
    client.until("pod-1");
}

// ------------------------------------------- networking.go granular checks

/// How a granular check reaches a Service.
#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Http,
    Udp,
}

/// The pods answering `n` requests from `ns` to `to` (new connections, or
/// new UDP sockets). Like upstream's checks, which dial up to a number of
/// tries and want the expected hostnames, a few failed tries are allowed:
/// at most `MAX_FAILED_TRIES`, each failure's error shown if there are more.
fn hostnames(ns: &Netns, to: SocketAddrV4, proto: Proto, n: usize) -> BTreeSet<String> {
    let (served, failed): (Vec<_>, Vec<_>) = (0..n)
        .map(|_| {
            ns.run(move || match proto {
                Proto::Http => tcp_who(to),
                Proto::Udp => lb_tests::servers::udp_who_from(fresh_udp_port(), to),
            })
            .unwrap()
        })
        .partition(Result::is_ok);
    let failed: Vec<String> = failed
        .into_iter()
        .filter_map(|r| r.err())
        .map(|e| format!("{e:#}"))
        .collect();
    assert!(
        failed.len() <= MAX_FAILED_TRIES,
        "{to}: {} of {n} tries failed: {failed:?}",
        failed.len()
    );
    served
        .into_iter()
        .filter_map(Result::ok)
        .map(|a| a.pod)
        .collect()
}

/// A source port no earlier request of this test binary used: each UDP
/// request is a new flow, as upstream's checks mean it. (A port the kernel
/// picks can be one an earlier request used, and its flow still names the
/// backend it had: a zone test once saw a backend of the zone before.)
/// Below the ephemeral range, so no other socket takes it.
fn fresh_udp_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(20_000);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Tries of a granular check that may fail (a full `cargo xtask test` run
/// once saw one hairpin TCP connection of 30 fail; cause not known yet).
const MAX_FAILED_TRIES: usize = 2;

/// A Service with a TCP (80, NodePort 30080) and a UDP (53, NodePort
/// 30053) port on the world's backends, `affinity` for ClientIP.
fn granular_world(affinity: bool) -> (World, Svc, ConfigFile, Agent) {
    let w = World::new(2);
    let mut svc = w.web();
    svc.ports[1].node_port = Some(30053);
    if affinity {
        svc.affinity_timeout_s = Some(10_800);
    }
    let config = ConfigFile::new(&yaml(&[svc.clone()])).unwrap();
    let agent = Agent::start(&w.topo, &config.path).unwrap();
    (w, svc, config, agent)
}

/// The Service's ClusterIP and NodePort addresses for `proto`.
fn granular_targets(svc: &Svc, proto: Proto) -> [SocketAddrV4; 2] {
    match proto {
        Proto::Http => [cluster_ip(svc, 80), SocketAddrV4::new(NODE_IP, 30080)],
        Proto::Udp => [cluster_ip(svc, 53), SocketAddrV4::new(NODE_IP, 30053)],
    }
}

/// Granular Checks: every endpoint answers the client `from` picks, on the
/// ClusterIP and on the NodePort (pod-Service: a client pod;
/// endpoint-Service: an endpoint, itself included, by hairpin).
fn every_endpoint_answers(from: fn(&World) -> &Netns, proto: Proto) {
    let (w, svc, _config, _agent) = granular_world(false);
    for to in granular_targets(&svc, proto) {
        let served = hostnames(from(&w), to, proto, 30);
        assert_eq!(served, ["pod-1", "pod-2"].map(String::from).into(), "{to}");
    }
}

fn pod_service(proto: Proto) {
    every_endpoint_answers(|w| w.client_pod(), proto);
}

/// [sig-network] Networking Granular Checks: Services should function for
/// pod-Service: http
#[test]
fn granular_checks_should_function_for_pod_service_http() {
    pod_service(Proto::Http);
}

/// [sig-network] Networking Granular Checks: Services should function for
/// pod-Service: udp
#[test]
fn granular_checks_should_function_for_pod_service_udp() {
    pod_service(Proto::Udp);
}

fn endpoint_service(proto: Proto) {
    every_endpoint_answers(|w| &w.topo.pods[0].ns, proto);
}

/// [sig-network] Networking Granular Checks: Services should function for
/// endpoint-Service: http
#[test]
fn granular_checks_should_function_for_endpoint_service_http() {
    endpoint_service(Proto::Http);
}

/// [sig-network] Networking Granular Checks: Services should function for
/// endpoint-Service: udp
#[test]
fn granular_checks_should_function_for_endpoint_service_udp() {
    endpoint_service(Proto::Udp);
}

/// Granular Checks: Services should update endpoints: an endpoint removed
/// stops being reached on the ClusterIP and the NodePort.
fn update_endpoints(proto: Proto) {
    let (w, mut svc, config, mut agent) = granular_world(false);
    svc.endpoints.truncate(1);
    apply(&config, &mut agent, &[svc.clone()], 1);
    for to in granular_targets(&svc, proto) {
        let served = hostnames(w.client_pod(), to, proto, 20);
        assert_eq!(served, ["pod-1"].map(String::from).into(), "{to}");
    }
}

/// [sig-network] Networking Granular Checks: Services should update
/// endpoints: http
#[test]
fn granular_checks_should_update_endpoints_http() {
    update_endpoints(Proto::Http);
}

/// [sig-network] Networking Granular Checks: Services should update
/// endpoints: udp
#[test]
fn granular_checks_should_update_endpoints_udp() {
    update_endpoints(Proto::Udp);
}

/// Granular Checks: Services should function for client IP based session
/// affinity: every request of one client reaches one endpoint.
fn client_ip_affinity(proto: Proto) {
    let (w, svc, _config, _agent) = granular_world(true);
    for to in granular_targets(&svc, proto) {
        let served = hostnames(w.client_pod(), to, proto, 20);
        assert_eq!(served.len(), 1, "{to}: {served:?}");
    }
}

/// [sig-network] Networking Granular Checks: Services should function for
/// client IP based session affinity: http [LinuxOnly]
#[test]
fn granular_checks_should_function_for_client_ip_based_session_affinity_http() {
    client_ip_affinity(Proto::Http);
}

/// [sig-network] Networking Granular Checks: Services should function for
/// client IP based session affinity: udp [LinuxOnly]
#[test]
fn granular_checks_should_function_for_client_ip_based_session_affinity_udp() {
    client_ip_affinity(Proto::Udp);
}

/// [sig-network] Networking Granular Checks: Services should be able to
/// handle large requests: udp (upstream sends 1,500 bytes and more; here a
/// 3,000-byte datagram, fragmented on the way, and its 3,000-byte answer,
/// on the ClusterIP and the NodePort)
#[test]
fn granular_checks_should_be_able_to_handle_large_requests_udp() {
    let (w, svc, _config, _agent) = granular_world(false);
    for to in granular_targets(&svc, Proto::Udp) {
        large_udp(w.client_pod(), to);
    }
}

/// A 3,000-byte datagram (fragmented on the way) and its 3,000-byte answer.
fn large_udp(ns: &Netns, to: SocketAddrV4) {
    let (_, len) = ns
        .run(move || lb_tests::servers::udp_big(to, 3000))
        .unwrap()
        .unwrap_or_else(|e| panic!("{to}: {e}"));
    assert_eq!(len, 3000, "{to}");
}

/// [sig-network] Networking Granular Checks: Services should function for
/// node-Service: http and udp: the node's own processes (through the
/// socket hooks, `--cgroup`) reach every endpoint on the ClusterIP and on
/// the NodePort.
#[test]
fn granular_checks_should_function_for_node_service_http_and_udp() {
    let w = World::new(2);
    let mut svc = w.web();
    svc.ports[1].node_port = Some(30053);
    let (_config, cg, _agent) = with_socket_lb(&w, &[svc.clone()]);
    for [http, udp] in [
        [cluster_ip(&svc, 80), cluster_ip(&svc, 53)],
        [
            SocketAddrV4::new(NODE_IP, 30080),
            SocketAddrV4::new(NODE_IP, 30053),
        ],
    ] {
        let (tcp_pods, udp_pods) = node_hostnames(&cg, &w.topo.node, http, udp, 24);
        let both = ["pod-1", "pod-2"].map(String::from).into();
        assert_eq!(tcp_pods, both, "{http}");
        assert_eq!(udp_pods, both, "{udp}");
    }
}

/// An agent for `services` with the socket hooks on a cgroup of their own
/// (`--cgroup`): what a process of the node started in that cgroup does
/// goes through them.
fn with_socket_lb(w: &World, services: &[Svc]) -> (ConfigFile, lb_tests::cgroup::Cgroup, Agent) {
    let config = ConfigFile::new(&yaml(services)).unwrap();
    let cg = lb_tests::cgroup::Cgroup::new().unwrap();
    let agent = Agent::start_with(
        &w.topo,
        &config.path,
        &["--cgroup".into(), cg.path.display().to_string()],
    )
    .unwrap();
    (config, cg, agent)
}

/// Who answers `n` TCP connections to `http` and `n` UDP requests to `udp`
/// made by processes in cgroup `cg` (the socket hooks' scope) in `ns`.
fn node_hostnames(
    cg: &lb_tests::cgroup::Cgroup,
    ns: &Netns,
    http: SocketAddrV4,
    udp: SocketAddrV4,
    n: usize,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut tcp_pods, mut udp_pods) = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..n {
        let out = cg.probe(ns, Some(http), Some(udp)).unwrap();
        for l in out.lines() {
            if let Some(p) = l.strip_prefix("PROBE who ") {
                tcp_pods.insert(p.split_whitespace().next().unwrap_or("").to_string());
            }
            if let Some(rest) = l.strip_prefix("PROBE from ") {
                udp_pods.insert(rest.split_whitespace().nth(1).unwrap_or("").to_string());
            }
        }
    }
    (tcp_pods, udp_pods)
}

/// `--nodeport-addresses` (kube-proxy's flag): with a CIDR, NodePorts
/// answer on every address of the node in it, followed as addresses are
/// added and removed while the agent runs; by default (`primary`) only on
/// the node's address.
#[test]
fn node_port_addresses_follow_the_nodes_addresses_in_the_given_ranges() {
    let w = World::new(1);
    let config = ConfigFile::new(&yaml(&[w.web()])).unwrap();
    let second = Ipv4Addr::new(198, 18, 0, 3);
    let (primary_np, second_np) = (
        SocketAddrV4::new(NODE_IP, 30080),
        SocketAddrV4::new(second, 30080),
    );
    // Default: the primary address only.
    let agent = Agent::start(&w.topo, &config.path).unwrap();
    w.topo
        .node
        .ip(&["addr", "add", "198.18.0.3/24", "dev", "eth0"])
        .unwrap();
    assert_eq!(who(&w.topo.client, primary_np), "pod-1");
    assert!(
        refused(&w.topo.client, second_np).is_some(),
        "not on another address"
    );
    drop(agent);
    w.topo
        .node
        .ip(&["addr", "del", "198.18.0.3/24", "dev", "eth0"])
        .unwrap();

    let mut agent = Agent::start_with(
        &w.topo,
        &config.path,
        &["--nodeport-addresses".into(), "198.18.0.0/24".into()],
    )
    .unwrap();
    assert_eq!(who(&w.topo.client, primary_np), "pod-1");
    assert!(
        refused(&w.topo.client, second_np).is_some(),
        "not yet an address"
    );
    w.topo
        .node
        .ip(&["addr", "add", "198.18.0.3/24", "dev", "eth0"])
        .unwrap();
    agent
        .wait_for_log("--nodeport-addresses", Duration::from_secs(5))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while refused(&w.topo.client, second_np).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new address never answered"
        );
    }
    assert_eq!(who(&w.topo.client, second_np), "pod-1");
    w.topo
        .node
        .ip(&["addr", "del", "198.18.0.3/24", "dev", "eth0"])
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while agent.count_logs("--nodeport-addresses") < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the removal was not seen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(who(&w.topo.client, primary_np), "pod-1");
}

/// `--external-cluster-ip`: a client outside the cluster (routed to the
/// node) reaching a ClusterIP, once the pod ranges are known: masqueraded
/// by default (the backend sees the node, as with kube-proxy), dropped
/// with `drop` (as Cilium), or translated only with `direct` (the backend
/// sees the client); pods keep their address in every mode.
#[test]
fn a_cluster_ip_reached_from_outside_the_cluster_is_masqueraded_dropped_or_direct() {
    let w = World::new(1);
    let svc = w.web();
    let config = ConfigFile::new(&yaml(&[svc.clone()])).unwrap();
    let pods = "198.18.1.0/24".to_string();
    let to = cluster_ip(&svc, 80);
    let pod_ip = w.topo.pods.last().unwrap().ip;
    for mode in ["masquerade", "drop", "direct"] {
        let _agent = Agent::start_with(
            &w.topo,
            &config.path,
            &[
                "--cluster-cidr".into(),
                pods.clone(),
                "--external-cluster-ip".into(),
                mode.into(),
            ],
        )
        .unwrap();
        match mode {
            "drop" => assert_eq!(
                refused(&w.topo.client, to),
                Some(std::io::ErrorKind::TimedOut),
                "{mode}"
            ),
            _ => {
                let seen = *answer(&w.topo.client, to).peer.ip();
                let want = if mode == "masquerade" {
                    NODE_IP
                } else {
                    lb_tests::topology::CLIENT_IP
                };
                assert_eq!(seen, want, "{mode}");
            }
        }
        assert_eq!(
            *answer(w.client_pod(), to).peer.ip(),
            pod_ip,
            "{mode}: a pod"
        );
    }
}

/// [sig-network] Services should be able to create a functioning NodePort
/// service [Conformance]: a client outside the cluster reaches every
/// endpoint on the node's address and the NodePort, over TCP and UDP.
#[test]
fn should_be_able_to_create_a_functioning_node_port_service() {
    let (w, svc, _config, _agent) = granular_world(false);
    for proto in [Proto::Http, Proto::Udp] {
        let [_, node_port] = granular_targets(&svc, proto);
        let served = hostnames(&w.topo.client, node_port, proto, 30);
        assert_eq!(
            served,
            ["pod-1", "pod-2"].map(String::from).into(),
            "{node_port}"
        );
    }
}

/// `web` with internalTrafficPolicy Local: pod-1 on this node, pod-2 on
/// another (as the EndpointSlice says).
fn internal_local(w: &World) -> Svc {
    let ips = w.backend_ips();
    let mut svc = Svc::web(vec![
        Endpoint::ready(ips[0]),
        Endpoint::ready(ips[1]).on("node-b"),
    ]);
    svc.extra.internal_traffic_policy = Some("Local");
    svc
}

/// [sig-network] Services should respect internalTrafficPolicy=Local Pod
/// to Pod: a pod reaches only its node's endpoint, over TCP and UDP; on a
/// node without one, its connection is dropped (kube-proxy: "has no local
/// endpoints", DROP).
#[test]
fn should_respect_internal_traffic_policy_local_pod_to_pod() {
    let w = World::new(2);
    let mut svc = internal_local(&w);
    let config = ConfigFile::new(&yaml(&[svc.clone()])).unwrap();
    let mut agent = Agent::start(&w.topo, &config.path).unwrap();
    let local: BTreeSet<String> = ["pod-1".to_string()].into();
    assert_eq!(
        hostnames(w.client_pod(), cluster_ip(&svc, 80), Proto::Http, 20),
        local
    );
    assert_eq!(
        hostnames(w.client_pod(), cluster_ip(&svc, 53), Proto::Udp, 20),
        local
    );
    svc.endpoints[0] = svc.endpoints[0].clone().on("node-b");
    apply(&config, &mut agent, &[svc.clone()], 1);
    assert_eq!(
        refused(w.client_pod(), cluster_ip(&svc, 80)),
        Some(std::io::ErrorKind::TimedOut),
        "no local endpoint: dropped"
    );
}

/// [sig-network] Services should respect internalTrafficPolicy=Local Pod
/// (hostNetwork: true) to Pod: the node's own processes (socket hooks,
/// `--cgroup`) reach only the node's endpoint.
#[test]
fn should_respect_internal_traffic_policy_local_pod_host_network_to_pod() {
    let w = World::new(2);
    let svc = internal_local(&w);
    let (_config, cg, _agent) = with_socket_lb(&w, &[svc.clone()]);
    let local: BTreeSet<String> = ["pod-1".to_string()].into();
    let (tcp, udp) = node_hostnames(
        &cg,
        &w.topo.node,
        cluster_ip(&svc, 80),
        cluster_ip(&svc, 53),
        12,
    );
    assert_eq!((tcp, udp), (local.clone(), local));
}

/// [sig-network] Services should respect internalTrafficPolicy=Local Pod
/// and Node, to Pod (hostNetwork: true): the local endpoint is a server in
/// the node's own namespace (the slice's address is the node's); a pod and
/// the node reach it and never the endpoint on the other node.
#[test]
fn should_respect_internal_traffic_policy_local_pod_and_node_to_pod_host_network() {
    let w = World::new(1);
    let _host = PodServer::start_on(&w.topo.node, "host", NODE_IP, 8080, 5353).unwrap();
    let mut svc = Svc::web(vec![
        Endpoint::ready(NODE_IP),
        Endpoint::ready(w.backend_ips()[0]).on("node-b"),
    ]);
    svc.extra.internal_traffic_policy = Some("Local");
    let (_config, cg, _agent) = with_socket_lb(&w, &[svc.clone()]);
    let host: BTreeSet<String> = ["host".to_string()].into();
    let (http, udp) = (cluster_ip(&svc, 80), cluster_ip(&svc, 53));
    assert_eq!(
        hostnames(w.client_pod(), http, Proto::Http, 10),
        host,
        "pod"
    );
    assert_eq!(hostnames(w.client_pod(), udp, Proto::Udp, 10), host, "pod");
    let node = node_hostnames(&cg, &w.topo.node, http, udp, 6);
    assert_eq!(node, (host.clone(), host), "node");
}

/// Upstream's large HTTP request ("42" 1,000 times, 2,000 bytes) and a
/// 64 KiB one, echoed back whole over one connection.
fn large_http_echo(ns: &Netns, to: SocketAddrV4) {
    ns.run(move || -> anyhow::Result<()> {
        let (_, mut s) = lb_tests::servers::tcp_echo_open(to)?;
        for line in ["42".repeat(1000), "42".repeat(32 * 1024)] {
            lb_tests::servers::tcp_echo(&mut s, &line)?;
        }
        Ok(())
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("{to}: {e:#}"));
}

/// [sig-network] Networking Granular Checks: Services should be able to
/// handle large requests: http (on the ClusterIP and the NodePort)
#[test]
fn granular_checks_should_be_able_to_handle_large_requests_http() {
    let (w, svc, _config, _agent) = granular_world(false);
    for to in granular_targets(&svc, Proto::Http) {
        large_http_echo(w.client_pod(), to);
    }
}

/// [sig-network] Networking Granular Checks: Services should function for
/// service endpoints using hostNetwork: the endpoint is a server in the
/// node's own namespace; a pod reaches it on the ClusterIP and the
/// NodePort over http and udp, the node too (socket hooks), and large
/// requests pass both ways.
#[test]
fn granular_checks_should_function_for_service_endpoints_using_host_network() {
    let w = World::new(0);
    let _host = PodServer::start_on(&w.topo.node, "host", NODE_IP, 8080, 5353).unwrap();
    let mut svc = Svc::web(vec![Endpoint::ready(NODE_IP)]);
    svc.ports[1].node_port = Some(30053);
    let (_config, cg, _agent) = with_socket_lb(&w, &[svc.clone()]);
    let host: BTreeSet<String> = ["host".to_string()].into();
    for proto in [Proto::Http, Proto::Udp] {
        for to in granular_targets(&svc, proto) {
            assert_eq!(
                hostnames(w.client_pod(), to, proto, 10),
                host,
                "pod to {to}"
            );
        }
    }
    let [http, udp] = [Proto::Http, Proto::Udp].map(|p| granular_targets(&svc, p));
    for (h, u) in http.into_iter().zip(udp) {
        let node = node_hostnames(&cg, &w.topo.node, h, u, 6);
        assert_eq!(node, (host.clone(), host.clone()), "node to {h} and {u}");
    }
    for to in http {
        large_http_echo(w.client_pod(), to);
    }
    for to in udp {
        large_udp(w.client_pod(), to);
    }
}

/// [sig-network] Conntrack proxy implementation should not be vulnerable
/// to the invalid conntrack state bug [Privileged]: upstream's "boom"
/// server sends its client a segment far outside the TCP window. Under
/// kube-proxy, netfilter marks it INVALID and, unless dropped, it reaches
/// the client un-NATed (from the pod's address); the client answers with a
/// RST that kills the connection. Our flow table keeps no TCP window: the
/// segment is translated like every reply, so the client sees it from the
/// ClusterIP, no RST reaches the server, and the connection lives on.
#[test]
fn proxy_implementation_should_not_be_vulnerable_to_the_invalid_conntrack_state_bug() {
    use lb_tests::{
        packet::{Spec, TCP_ACK},
        raw::{send_ipv4, TcpWatch},
    };
    let w = World::new(1);
    let svc = w.web();
    let config = ConfigFile::new(&yaml(&[svc.clone()])).unwrap();
    let _agent = Agent::start(&w.topo, &config.path).unwrap();
    let to = cluster_ip(&svc, 80);
    let (server, client) = (&w.topo.pods[0], w.topo.pods.last().unwrap());
    let (name, mut stream) = client
        .ns
        .run(move || lb_tests::servers::tcp_echo_open(to))
        .unwrap()
        .unwrap();
    let Ok(std::net::SocketAddr::V4(local)) = stream.local_addr() else {
        panic!("an IPv4 client socket");
    };
    let at_client = client.ns.run(TcpWatch::open).unwrap().unwrap();
    let at_server = server.ns.run(TcpWatch::open).unwrap().unwrap();
    // From the server's address and port: sequence 1000, out of window
    // (the connection's sequence numbers start at random).
    let mut boom = Spec::tcp(server.ip, 8080, client.ip, local.port());
    boom.tcp_flags = TCP_ACK | 0x08; // PSH
    boom.payload = b"boom".to_vec();
    let frame = boom.build();
    server
        .ns
        .run(move || send_ipv4(&frame[14..]))
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        lb_tests::servers::tcp_echo(&mut stream, "still here").unwrap(),
        name,
        "the connection lives on"
    );
    let (client_saw, server_saw) = (
        at_client.collect(Duration::from_millis(300)),
        at_server.collect(Duration::from_millis(300)),
    );
    assert!(
        client_saw
            .iter()
            .any(|s| s.src == to && s.dst == local && s.seq == 1000),
        "the boom reached the client translated: {client_saw:?}"
    );
    assert!(
        client_saw.iter().all(|s| *s.src.ip() != server.ip),
        "nothing reached the client from the pod's own address: {client_saw:?}"
    );
    assert!(
        server_saw.iter().all(|s| s.flags & 0x04 == 0),
        "no RST reached the server: {server_saw:?}"
    );
}

/// `web` on three endpoints hinted by zone (pod-1 and pod-2 for zone-a,
/// pod-3 for zone-b), as the EndpointSlice controller hints them for
/// `trafficDistribution: PreferClose`.
fn zoned_world() -> (World, Svc, ConfigFile) {
    let w = World::new(3);
    let ips = w.backend_ips();
    let svc = Svc::web(vec![
        Endpoint::ready(ips[0]).hinted_for("zone-a"),
        Endpoint::ready(ips[1]).hinted_for("zone-a"),
        Endpoint::ready(ips[2]).hinted_for("zone-b"),
    ]);
    let config = ConfigFile::new(&yaml(&[svc.clone()])).unwrap();
    (w, svc, config)
}

/// Who a pod of this node reaches on `svc`'s ClusterIP, over TCP and UDP
/// (the same set both ways, else the test fails).
fn zone_served(w: &World, svc: &Svc) -> BTreeSet<String> {
    let tcp = hostnames(w.client_pod(), cluster_ip(svc, 80), Proto::Http, 30);
    let udp = hostnames(w.client_pod(), cluster_ip(svc, 53), Proto::Udp, 30);
    assert_eq!(tcp, udp, "TCP and UDP follow the same hints");
    tcp
}

fn pods(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// [sig-network] Traffic Distribution when Service has
/// trafficDistribution=PreferClose should route traffic to an endpoint
/// that is close to the client: on a node in zone-a (`--zone`; from the
/// API, the Node's topology.kubernetes.io/zone label: kubernetes.rs) a pod
/// reaches only the zone-a endpoints; on a node whose zone is not known,
/// every endpoint (kube-proxy ignores zone hints then).
#[test]
fn traffic_distribution_prefer_close_should_route_traffic_to_an_endpoint_close_to_the_client() {
    let (w, svc, config) = zoned_world();
    let mut agent = Agent::start(&w.topo, &config.path).unwrap();
    assert_eq!(zone_served(&w, &svc), pods(&["pod-1", "pod-2", "pod-3"]));
    let mut args = agent.args();
    args.extend(["--zone".into(), "zone-a".into()]);
    agent.restart(Some(args)).unwrap();
    assert_eq!(zone_served(&w, &svc), pods(&["pod-1", "pod-2"]));
}

/// [sig-network] Feature:Topology Hints should distribute endpoints evenly:
/// the proxy's half (the other half is the EndpointSlice controller's):
/// each zone's node sends its pods to the endpoints hinted for its zone,
/// and a node in a zone no endpoint is hinted for uses them all
/// (kube-proxy's topologyModeFromHints).
#[test]
fn topology_hints_each_zones_node_reaches_its_zones_endpoints() {
    let (w, svc, config) = zoned_world();
    let mut agent =
        Agent::start_with(&w.topo, &config.path, &["--zone".into(), "zone-b".into()]).unwrap();
    assert_eq!(zone_served(&w, &svc), pods(&["pod-3"]));
    for (z, want) in [
        ("zone-a", pods(&["pod-1", "pod-2"])),
        ("zone-c", pods(&["pod-1", "pod-2", "pod-3"])),
    ] {
        let mut args = agent.args();
        let at = args.iter().position(|a| a == "--zone").unwrap();
        args[at + 1] = z.to_string();
        agent.restart(Some(args)).unwrap();
        assert_eq!(zone_served(&w, &svc), want, "{z}");
    }
}
