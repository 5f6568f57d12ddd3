//! Every pod on the node reaches every Service, as on a real node: pods are
//! created and deleted while the agent runs (wired the way a CNI does it:
//! veth made in the pod's namespace, host end moved into the node's and
//! renamed), and the agent is given no `--iface`: it follows the node's
//! interfaces through rtnetlink. Also: replies of a backend in the node's
//! own namespace (hostNetwork), and socket load balancing in pods'
//! namespaces.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Command,
    time::Duration,
};

use aya::programs::TcAttachType;
use lb_tests::{
    agent::{status_get, tcx_programs, Agent, ConfigFile},
    cgroup::Cgroup,
    example::{yaml, Endpoint, Extra, Port, Svc},
    netns::sh,
    servers::{tcp_who, udp_who, PodServer},
    topology::{pod_ip, wire_pod, Topology, CLIENT_IP, NODE_IP, POD_GATEWAY},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const PATIENCE: Duration = Duration::from_secs(10);

fn tcp(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// The `web` service (TCP 80, NodePort 30080, UDP 53) on pods `on`.
fn web(on: &[usize]) -> Svc {
    Svc::web(on.iter().map(|&i| Endpoint::ready(pod_ip(i))).collect())
}

/// A node with `servers` serving pods (pod-1 ...), and the agent running
/// on `services` with `extra` flags and no `--iface`.
fn node(
    servers: usize,
    services: &[Svc],
    extra: &[String],
) -> (Topology, Vec<PodServer>, ConfigFile, Agent) {
    lb_tests::require_root();
    let topo = Topology::new(servers).expect("topology");
    let running = topo.start_servers(servers).expect("servers");
    let config = ConfigFile::new(&yaml(services)).unwrap();
    let agent = Agent::start_with(&topo, &config.path, extra).unwrap();
    (topo, running, config, agent)
}

/// Who answers the client on the node's NodePort `port`.
fn node_port_who(topo: &Topology, port: u16) -> lb_tests::servers::Answer {
    topo.client
        .run(move || tcp_who(tcp(NODE_IP, port)))
        .unwrap()
        .unwrap()
}

/// Waits for the agent's line saying its programs are on `iface`: the
/// CNI-like wiring creates the veth under a temporary name, so that is
/// "attached iface=tmp..." then "interface renamed ... iface=<iface>", or,
/// when the rename came first, "attached iface=<iface>".
fn attached(agent: &mut Agent, iface: &str) {
    let on = format!("iface={iface} ");
    agent
        .wait_for_line(
            |l| l.contains(&on) && (l.contains("attached") || l.contains("links follow it")),
            1,
            &format!("programs on {iface}"),
            PATIENCE,
        )
        .unwrap();
}

/// Pin names under the agent's `links/`.
fn link_pins(agent: &Agent) -> BTreeSet<String> {
    lb_userspace::kernel::pins::pinned_links(&agent.pin_dir)
        .into_iter()
        .collect()
}

#[test]
fn a_pod_created_after_the_agent_started_reaches_cluster_ips_over_tcp_and_udp() {
    let (mut topo, _servers, _config, mut agent) = node(2, &[web(&[1, 2])], &[]);
    let ip = topo.add_pod(3).unwrap().ip;
    attached(&mut agent, "p3");
    // The first connection after the attach, no retry: the hook is in
    // place before the pod's first packet can need it.
    let pod = &topo.pods[2].ns;
    let a = pod.run(|| tcp_who(tcp(CLUSTER_IP, 80))).unwrap().unwrap();
    assert!(a.pod.starts_with("pod-"), "{a:?}");
    assert_eq!(*a.peer.ip(), ip, "the backend sees the pod's own address");
    let u = pod.run(|| udp_who(tcp(CLUSTER_IP, 53))).unwrap().unwrap();
    assert_eq!(*u.peer.ip(), ip);
    // The set in force, in `lb status` and in /metrics.
    let status = agent.status();
    for iface in ["eth0", "p1", "p2", "p3"] {
        assert!(
            status
                .lines()
                .any(|l| l.trim_start().starts_with(iface) && l.ends_with("tc_egress tc_ingress")),
            "{iface} in:\n{status}"
        );
    }
    assert!(status.contains("interfaces: 4"), "{status}");
    assert!(
        status.contains("socket LB scope: off (no --cgroup)"),
        "{status}"
    );
    let (code, metrics) = status_get(&topo.node, "/metrics");
    assert_eq!(code, 200);
    for hook in ["tc_ingress", "tc_egress"] {
        let line = format!("lb_interface_attached{{interface=\"p3\",hook=\"{hook}\"}} 1");
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
}

#[test]
fn iface_patterns_narrow_and_exclude_patterns_remove_followed_interfaces() {
    let extra = ["--iface", "p*", "--exclude-iface", "p2"].map(String::from);
    let (mut topo, _servers, _config, mut agent) = node(2, &[web(&[1])], &extra);
    topo.add_pod(3).unwrap();
    attached(&mut agent, "p3");
    let status = agent.status();
    let listed: Vec<&str> = status
        .lines()
        .filter(|l| l.starts_with("  ") && l.contains("tc_ingress"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(listed, ["p1", "p3"], "{status}");
    // TC on p3 balances the new pod's connection; eth0 carries nothing.
    let a = topo.pods[2]
        .ns
        .run(|| tcp_who(tcp(CLUSTER_IP, 80)))
        .unwrap()
        .unwrap();
    assert_eq!(a.pod, "pod-1");
    assert!(tcx_programs(&topo.node, "eth0", TcAttachType::Ingress).is_empty());
}

#[test]
fn a_backend_pod_created_later_serves_a_node_port_with_its_replies_translated() {
    let (mut topo, _servers, config, mut agent) = node(1, &[web(&[1]), Svc::api(pod_ip(4))], &[]);
    let pod = topo.add_pod(4).unwrap();
    let _server = PodServer::start(&pod.ns, "pod-4", 8080, 5353).unwrap();
    attached(&mut agent, "p4");
    // The backend's replies cross only its own veth on their way back:
    // translated there, and the client keeps its address.
    let a = node_port_who(&topo, 30443);
    assert_eq!(a.pod, "pod-4");
    assert_eq!(*a.peer.ip(), CLIENT_IP);
    assert!(agent.stat("reply_nat") > 0);
    drop(config);
}

/// Prog ids of the TC programs behind this agent's link pins.
fn our_programs(agent: &Agent) -> BTreeSet<u64> {
    link_pins(agent)
        .iter()
        .map(|pin| {
            let out = sh(Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(agent.pin_dir.join("links").join(pin)))
            .unwrap();
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            v["prog_id"].as_u64().unwrap()
        })
        .collect()
}

/// Kernel links (live or defunct) running one of `progs`.
fn links_running(progs: &BTreeSet<u64>) -> usize {
    let out = sh(Command::new("bpftool").args(["-j", "link", "show"])).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| progs.contains(&p)))
        .count()
}

fn open_fds(agent: &Agent) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", agent.pid().unwrap()))
        .unwrap()
        .count()
}

/// Backend addresses in `lb_backends` (every slot read).
fn programmed_backends(pin_dir: &Path) -> BTreeSet<Ipv4Addr> {
    let data = aya::maps::MapData::from_pin(pin_dir.join(lb_common::map_names::BACKENDS)).unwrap();
    let backends: aya::maps::Array<_, lb_common::Backend> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
    backends
        .iter()
        .filter_map(Result::ok)
        .filter(|b| b.flags & lb_common::BACKEND_F_PRESENT != 0)
        .map(|b| Ipv4Addr::from(lb_common::addr::v4(&b.addr)))
        .collect()
}

#[test]
fn deleted_pods_leave_nothing_behind_and_fifty_come_and_go_without_a_leak() {
    let (mut topo, _servers, config, mut agent) = node(1, &[web(&[1])], &[]);
    let pins_before = link_pins(&agent);
    let progs = our_programs(&agent);
    let links_before = links_running(&progs);
    assert_eq!(pins_before.len(), 4, "{pins_before:?}");
    assert_eq!(links_before, 4, "eth0 and p1, ingress and egress");

    // A backend pod that goes: the CNI deletes it, the slice drops it.
    let pod = topo.add_pod(5).unwrap();
    let _server = PodServer::start(&pod.ns, "pod-5", 8080, 5353).unwrap();
    attached(&mut agent, "p5");
    config.replace(&yaml(&[web(&[1, 5])])).unwrap();
    agent
        .wait_for_log("applied config added=0 changed=2", PATIENCE)
        .unwrap();
    assert!(programmed_backends(&agent.pin_dir).contains(&pod_ip(5)));
    drop(_server);
    topo.remove_pod(5).unwrap();
    agent
        .wait_for_log("detached (interface gone) iface=p5", PATIENCE)
        .unwrap();
    config.replace(&yaml(&[web(&[1])])).unwrap();
    agent
        .wait_for_nth_log("applied config added=0 changed=2", 2, PATIENCE)
        .unwrap();
    assert_eq!(link_pins(&agent), pins_before);
    assert_eq!(links_running(&progs), links_before);
    assert_eq!(
        programmed_backends(&agent.pin_dir),
        BTreeSet::from([pod_ip(1)])
    );

    // Fifty more, one after the other.
    let fds_before = open_fds(&agent);
    for i in 0..50 {
        let n = 10 + i;
        topo.add_pod(n).unwrap();
        attached(&mut agent, &format!("p{n}"));
        topo.remove_pod(n).unwrap();
        agent
            .wait_for_log(&format!("detached (interface gone) iface=p{n}"), PATIENCE)
            .unwrap();
    }
    assert_eq!(link_pins(&agent), pins_before);
    assert_eq!(links_running(&progs), links_before);
    let fds_after = open_fds(&agent);
    assert!(
        fds_after <= fds_before + 2,
        "file descriptors {fds_before} -> {fds_after}"
    );
    // Each pod once, whether its veth was caught before or after the
    // rename.
    let renamed = agent.count_logs("interface renamed");
    let direct = agent.count_logs("attached iface=p");
    assert_eq!(renamed + direct, 52, "{renamed} + {direct}");
    assert_eq!(agent.count_logs("detached (interface gone)"), 51);
    // Still serving.
    let a = node_port_who(&topo, 30080);
    assert_eq!(a.pod, "pod-1");
}

/// A flood of link events while the agent is busy attaching, with its
/// netlink buffer shrunk so that the kernel drops events: the agent sees
/// the overrun, lists every interface again, and ends with exactly the
/// interfaces that exist, attached, and nothing of those that went.
#[test]
fn a_flood_of_interfaces_overrunning_the_event_socket_is_caught_up_by_a_relist() {
    lb_tests::require_root();
    let topo = Topology::new(1).unwrap();
    let config = ConfigFile::new(&yaml(&[web(&[1])])).unwrap();
    let agent =
        Agent::start_with_env(&topo, &config.path, &[], &[("LB_NETLINK_RCVBUF", "4096")]).unwrap();
    let batch = |verb: &str| {
        let script: String = (0..40)
            .map(|i| match verb {
                "add" => format!("link add fl{i} type veth peer name fp{i}\n"),
                _ => format!("link del fl{i}\n"),
            })
            .collect();
        let path = std::env::temp_dir().join(lb_tests::netns::unique("lbflood-batch"));
        std::fs::write(&path, script).unwrap();
        topo.node
            .ip(&["-batch", &path.display().to_string()])
            .unwrap();
        let _ = std::fs::remove_file(path);
    };
    batch("add");
    // 80 new interfaces + eth0 + p1, two hooks each.
    let settled = |want: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while link_pins(&agent).len() != want {
            assert!(
                std::time::Instant::now() < deadline,
                "{} pins, want {want}",
                link_pins(&agent).len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    settled(2 * 82);
    assert!(
        agent.count_logs("link events were lost") > 0,
        "no overrun: the test did not test what it says"
    );
    batch("del");
    settled(4);
    let links = links_running(&our_programs(&agent));
    assert_eq!(links, 4);
    // Still serving: the pod reaches the ClusterIP.
    let pod = &topo.pods[0].ns;
    let _server = PodServer::start(pod, "pod-1", 8080, 5353).unwrap();
    let a = node_port_who(&topo, 30080);
    assert_eq!(a.pod, "pod-1");
}

#[test]
fn sockets_in_pod_namespaces_are_balanced_at_connect_and_show_the_cluster_ip() {
    let cg = Cgroup::new().unwrap();
    let extra = ["--cgroup".to_string(), cg.path.display().to_string()];
    let (mut topo, _servers, _config, mut agent) = node(2, &[web(&[1, 2])], &extra);
    let pod = topo.add_pod(3).unwrap();
    let ip = pod.ip;
    attached(&mut agent, "p3");
    let probe = |cg: &Cgroup, topo: &Topology| {
        cg.probe(
            &topo.pods[2].ns,
            Some(tcp(CLUSTER_IP, 80)),
            Some(tcp(CLUSTER_IP, 53)),
        )
        .unwrap()
    };
    let dnat_before = agent.stat("dnat_new");
    let out = probe(&cg, &topo);
    // getpeername() and recvfrom() show the ClusterIP; the backend saw the
    // pod's own address.
    assert!(out.contains("PROBE peer 198.19.0.10:80"), "{out}");
    assert!(out.contains("PROBE who pod-"), "{out}");
    assert!(
        out.contains(&format!(" {ip}:")),
        "backend saw the pod: {out}"
    );
    assert!(out.contains("PROBE from 198.19.0.10:53 pod-"), "{out}");
    // Translated at the socket: TC on the pod's veth saw backend packets.
    assert!(agent.stat("sock_translated") >= 2);
    assert_eq!(agent.stat("dnat_new"), dnat_before);
    assert!(agent
        .status()
        .contains("socket LB scope: every network namespace"));

    // --socket-lb-host-only: the pod dials the ClusterIP itself, TC
    // balances it on the veth, and the application sees the same.
    let mut args = agent.args.clone();
    args.push("--socket-lb-host-only".into());
    agent.restart(Some(args)).unwrap();
    let translated = agent.stat("sock_translated");
    let out = probe(&cg, &topo);
    assert!(out.contains("PROBE peer 198.19.0.10:80"), "{out}");
    assert!(out.contains(&format!(" {ip}:")), "{out}");
    assert!(out.contains("PROBE from 198.19.0.10:53 pod-"), "{out}");
    assert_eq!(agent.stat("sock_translated"), translated);
    assert!(agent.stat("dnat_new") >= dnat_before + 2);
    assert!(agent
        .status()
        .contains("socket LB scope: the node's network namespace only"));
}

/// The `kubernetes` Service of a control-plane node: its endpoint is the
/// node's own address (the API server runs with hostNetwork).
fn host_service() -> Svc {
    Svc {
        namespace: "default",
        name: "kubernetes",
        cluster_ip: Ipv4Addr::new(198, 19, 0, 1),
        ports: vec![
            Port {
                name: "https",
                protocol: "TCP",
                port: 443,
                target: 6443,
                node_port: None,
            },
            Port {
                name: "dns",
                protocol: "UDP",
                port: 53,
                target: 6453,
                node_port: None,
            },
        ],
        affinity_timeout_s: None,
        endpoints: vec![Endpoint::ready(NODE_IP)],
        extra: Extra::default(),
    }
}

#[test]
fn a_host_network_backend_is_reached_from_a_pod_through_tc_alone_and_with_socket_lb() {
    let (topo, _servers, _config, agent) = node(1, &[host_service()], &[]);
    // The "API server": a server in the node's own namespace.
    let _host = PodServer::start_on(&topo.node, "host", NODE_IP, 6443, 6453).unwrap();
    let api = tcp(Ipv4Addr::new(198, 19, 0, 1), 443);
    let dns = tcp(Ipv4Addr::new(198, 19, 0, 1), 53);
    let pod = &topo.pods[0];
    // TC alone: DNAT on the pod's veth, local delivery, and the reply the
    // node's stack sends out of the veth translated by TC egress.
    let a = pod.ns.run(move || tcp_who(api)).unwrap().unwrap();
    assert_eq!((a.pod.as_str(), *a.peer.ip()), ("host", pod.ip));
    let u = pod.ns.run(move || udp_who(dns)).unwrap().unwrap();
    assert_eq!((u.pod.as_str(), *u.peer.ip()), ("host", pod.ip));
    assert!(agent.stat("reply_nat") >= 2);
    drop(agent);

    // With socket LB in the pod's namespace.
    let cg = Cgroup::new().unwrap();
    let extra = ["--cgroup".to_string(), cg.path.display().to_string()];
    let agent = Agent::start_with(&topo, &_config.path, &extra).unwrap();
    let out = cg.probe(&pod.ns, Some(api), Some(dns)).unwrap();
    assert!(out.contains("PROBE peer 198.19.0.1:443"), "{out}");
    assert!(
        out.contains(&format!("PROBE who host {}:", pod.ip)),
        "{out}"
    );
    assert!(out.contains("PROBE from 198.19.0.1:53 host"), "{out}");
    assert!(agent.stat("sock_translated") >= 2);
}

#[test]
fn external_traffic_policy_local_node_port_reaches_a_local_backend_with_no_iface() {
    let mut svc = Svc::web(vec![
        Endpoint::ready(pod_ip(1)),
        Endpoint::ready(pod_ip(2)).on("node-b"),
    ]);
    svc.extra.external_traffic_policy = Some("Local");
    let (topo, _servers, _config, agent) = node(2, &[svc], &[]);
    for _ in 0..10 {
        let a = node_port_who(&topo, 30080);
        // The local endpoint only, and the client's own address.
        assert_eq!((a.pod.as_str(), *a.peer.ip()), ("pod-1", CLIENT_IP));
    }
    assert!(agent.stat("reply_nat") >= 10);
}

#[test]
fn a_restarted_agent_adopts_interfaces_that_came_and_went_while_it_was_down() {
    let (mut topo, _servers, _config, mut agent) = node(3, &[web(&[1])], &[]);
    let status = agent.stop_with(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(status.success());
    // While no agent runs: pod 2 goes, pods 4 and 5 come, and pod 3's veth
    // is renamed p3x while a new pod's veth takes the name p3.
    topo.remove_pod(2).unwrap();
    topo.add_pod(4).unwrap();
    topo.add_pod(5).unwrap();
    for args in [
        &["link", "set", "p3", "down"][..],
        &["link", "set", "p3", "name", "p3x"],
        &["link", "set", "p3x", "up"],
        // Taking a link down flushes its routes.
        &["route", "add", "198.18.1.13/32", "dev", "p3x"],
    ] {
        topo.node.ip(args).unwrap();
    }
    topo.pods[1].host_iface = "p3x".into();
    let ns = lb_tests::netns::Netns::new(format!("{}-p6", topo.node.name)).unwrap();
    let pod6 = wire_pod(&topo.node, ns, "p3".into(), pod_ip(6), POD_GATEWAY).unwrap();
    topo.pods.push(pod6);
    agent.start_again(None).unwrap();
    let logs = agent.logs().join("\n");
    for iface in ["eth0", "p1"] {
        assert!(
            logs.contains(&format!("replaced the programs in place iface={iface} ")),
            "{logs}"
        );
    }
    for iface in ["p3", "p3x", "p4", "p5"] {
        assert!(logs.contains(&format!("attached iface={iface} ")), "{logs}");
    }
    let pins = link_pins(&agent);
    assert!(!pins.iter().any(|p| p.ends_with("_p2")), "{pins:?}");
    assert_eq!(pins.len(), 12, "{pins:?}");
    // One program per interface and direction: none left over, none missing.
    for iface in ["eth0", "p1", "p3", "p3x", "p4", "p5"] {
        for (direction, name) in [
            (TcAttachType::Ingress, "lb_tc_ingress"),
            (TcAttachType::Egress, "lb_tc_egress"),
        ] {
            assert_eq!(
                tcx_programs(&topo.node, iface, direction),
                [name],
                "{iface}"
            );
        }
    }
    for pod in &topo.pods[1..] {
        let a = pod
            .ns
            .run(|| tcp_who(tcp(CLUSTER_IP, 80)))
            .unwrap()
            .unwrap();
        assert_eq!((a.pod.as_str(), *a.peer.ip()), ("pod-1", pod.ip));
    }
}
