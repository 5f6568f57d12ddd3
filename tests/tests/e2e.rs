//! End to end: the real `lb run` on a virtual node in network namespaces,
//! real TCP and UDP sockets in client and pod namespaces, real servers in
//! pod namespaces. Each test builds its own topology (tests run in
//! parallel) and tears it down on every exit path.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, ConfigFile},
    example::{yaml, Endpoint, Svc},
    servers::{tcp_bulk, tcp_upload, tcp_who, udp_who, Answer, PodServer},
    topology::{pod_ip, NicMode, Topology, CLIENT_IP, NODE_IP},
};

const CLUSTER_TCP: &str = "198.19.0.10:80";
const CLUSTER_UDP: &str = "198.19.0.10:53";

fn addr(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn node_port() -> SocketAddrV4 {
    SocketAddrV4::new(NODE_IP, 30080)
}

/// A node with `backends` serving pods plus one client pod (the last).
struct Cluster {
    topo: Topology,
    _servers: Vec<PodServer>,
}

impl Cluster {
    fn new(backends: usize) -> Cluster {
        Self::with_nic(backends, NicMode::Default)
    }

    fn with_nic(backends: usize, nic: NicMode) -> Cluster {
        lb_tests::require_root();
        let topo = Topology::with_nic(backends + 1, nic).expect("topology");
        let servers = topo.start_servers(backends).expect("servers");
        Cluster {
            topo,
            _servers: servers,
        }
    }

    fn backend_ips(&self) -> Vec<Ipv4Addr> {
        self.topo.pods[..self.topo.pods.len() - 1]
            .iter()
            .map(|p| p.ip)
            .collect()
    }

    fn client_pod(&self) -> &lb_tests::netns::Netns {
        &self.topo.pods.last().unwrap().ns
    }

    fn web(&self) -> String {
        yaml(&[Svc::web(
            self.backend_ips()
                .into_iter()
                .map(Endpoint::ready)
                .collect(),
        )])
    }
}

/// A TCP connect from `ns`: how it ended, and how long it took.
fn timed_connect(
    ns: &lb_tests::netns::Netns,
    to: SocketAddrV4,
) -> (Result<(), ErrorKind>, Duration) {
    ns.run(move || {
        let t = Instant::now();
        let r = TcpStream::connect_timeout(&to.into(), Duration::from_secs(5));
        (r.map(drop).map_err(|e| e.kind()), t.elapsed())
    })
    .unwrap()
}

fn tally(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry(a.pod.clone()).or_default() += 1;
    }
    m
}

fn many_tcp(ns: &lb_tests::netns::Netns, to: SocketAddrV4, n: usize) -> Vec<Answer> {
    ns.run(move || {
        (0..n)
            .map(|i| tcp_who(to).unwrap_or_else(|e| panic!("connection {i} to {to}: {e}")))
            .collect()
    })
    .unwrap()
}

fn assert_fair(answers: &[Answer], backends: usize) {
    let t = tally(answers);
    let fair = answers.len() as f64 / backends as f64;
    assert_eq!(t.len(), backends, "every backend must answer: {t:?}");
    for (pod, n) in &t {
        let share = *n as f64 / fair;
        assert!(
            (0.5..=1.5).contains(&share),
            "{pod} got {n} of {} (fair {fair:.0}): {t:?}",
            answers.len()
        );
    }
}

#[test]
fn nodeport_tcp_from_a_client_is_balanced_and_keeps_the_client_address() {
    let c = Cluster::new(3);
    let config = ConfigFile::new(&c.web()).unwrap();
    let _agent = Agent::start(&c.topo, &config.path).unwrap();
    let answers = many_tcp(&c.topo.client, node_port(), 150);
    assert_fair(&answers, 3);
    assert!(
        answers.iter().all(|a| *a.peer.ip() == CLIENT_IP),
        "backends must see the client's address"
    );
}

#[test]
fn cluster_ip_tcp_and_udp_from_a_pod_are_balanced_and_keep_the_pod_address() {
    let c = Cluster::new(3);
    let config = ConfigFile::new(&c.web()).unwrap();
    let _agent = Agent::start(&c.topo, &config.path).unwrap();
    let me = pod_ip(4);
    let tcp = many_tcp(c.client_pod(), addr(CLUSTER_TCP), 150);
    assert_fair(&tcp, 3);
    assert!(tcp.iter().all(|a| *a.peer.ip() == me));
    let udp: Vec<Answer> = c
        .client_pod()
        .run(|| {
            (0..150)
                .map(|_| udp_who(addr(CLUSTER_UDP)).expect("udp answer"))
                .collect()
        })
        .unwrap();
    assert_fair(&udp, 3);
    assert!(udp
        .iter()
        .all(|a| *a.peer.ip() == me && a.peer.port() != 53));
}

const MB20: u64 = 20 * 1024 * 1024;

/// 20 MB down and up through the NodePort from outside, and through the
/// ClusterIP from a pod: downloads carry GSO replies through reverse NAT,
/// uploads carry GSO segments through DNAT.
fn transfer_20mb_each_way(c: &Cluster) {
    c.topo
        .client
        .run(|| tcp_bulk(node_port(), MB20))
        .unwrap()
        .expect("NodePort download");
    c.topo
        .client
        .run(|| tcp_upload(node_port(), MB20))
        .unwrap()
        .expect("NodePort upload");
    c.client_pod()
        .run(|| tcp_bulk(addr(CLUSTER_TCP), MB20))
        .unwrap()
        .expect("ClusterIP download");
    c.client_pod()
        .run(|| tcp_upload(addr(CLUSTER_TCP), MB20))
        .unwrap()
        .expect("ClusterIP upload");
}

/// Offloads as the kernel sets them: the pods' and the client's packets
/// carry CHECKSUM_PARTIAL seeds through the datapath.
#[test]
fn twenty_megabytes_each_way_with_offloads_on() {
    let c = Cluster::new(3);
    let config = ConfigFile::new(&c.web()).unwrap();
    let _agent = Agent::start(&c.topo, &config.path).unwrap();
    transfer_20mb_each_way(&c);
}

/// Same transfers, but the node's egress interfaces finish checksums in
/// software, so every receiver verifies checksums computed from the seeds
/// our datapath rewrote: a wrong CHECKSUM_PARTIAL update would drop
/// segments and stall the transfer.
#[test]
fn twenty_megabytes_with_checksums_verified_by_the_receivers() {
    let c = Cluster::new(3);
    for iface in c.topo.tc_ifaces() {
        c.topo
            .node
            .exec("ethtool", &["-K", &iface, "tx", "off"])
            .unwrap();
    }
    let config = ConfigFile::new(&c.web()).unwrap();
    let _agent = Agent::start(&c.topo, &config.path).unwrap();
    transfer_20mb_each_way(&c);
}

#[test]
fn removing_a_backend_stops_new_connections_and_spares_established_ones() {
    let c = Cluster::new(3);
    let config = ConfigFile::new(&c.web()).unwrap();
    let mut agent = Agent::start(&c.topo, &config.path).unwrap();

    // A long-lived stream through the ClusterIP; it tells us its backend.
    let (stream_pod, mut stream) = c
        .client_pod()
        .run(|| {
            let mut s = TcpStream::connect(addr(CLUSTER_TCP)).unwrap();
            s.write_all(b"STREAM\n").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut first = [0u8; 6];
            s.read_exact(&mut first).unwrap();
            (String::from_utf8_lossy(&first).to_string(), s)
        })
        .unwrap();
    let keep: usize = stream_pod
        .trim()
        .trim_start_matches("pod-")
        .parse()
        .unwrap();
    let victim = if keep == 1 { 2 } else { 1 };

    let mut eps: Vec<Endpoint> = c.backend_ips().into_iter().map(Endpoint::ready).collect();
    eps.remove(victim - 1);
    let changed = Instant::now();
    config.replace(&yaml(&[Svc::web(eps)])).unwrap();
    agent
        .wait_for_log("applied config", Duration::from_secs(2))
        .unwrap();
    assert!(
        changed.elapsed() < Duration::from_secs(1),
        "applied in {:?}",
        changed.elapsed()
    );

    // The stream is still flowing after the change.
    let mut buf = vec![0u8; 1 << 20];
    let until = Instant::now() + Duration::from_millis(700);
    let mut after = 0usize;
    while Instant::now() < until {
        after += stream
            .read(&mut buf)
            .expect("the established stream keeps going");
    }
    assert!(after > 1 << 20, "only {after} bytes after the change");

    let answers = many_tcp(c.client_pod(), addr(CLUSTER_TCP), 100);
    let t = tally(&answers);
    assert!(
        !t.contains_key(&format!("pod-{victim}")),
        "removed backend got new connections: {t:?}"
    );
    assert_eq!(t.len(), 2, "{t:?}");
    drop(stream);
}

#[test]
fn a_service_with_no_endpoint_refuses_at_once() {
    let c = Cluster::new(1);
    let config = ConfigFile::new(&yaml(&[Svc::web(vec![])])).unwrap();
    let _agent = Agent::start(&c.topo, &config.path).unwrap();
    for (ns, label) in [
        (&c.topo.client, "client via NodePort"),
        (c.client_pod(), "pod via ClusterIP"),
    ] {
        let target = if label.starts_with("client") {
            node_port()
        } else {
            addr(CLUSTER_TCP)
        };
        let (tcp, tcp_took) = timed_connect(ns, target);
        assert_eq!(tcp, Err(ErrorKind::ConnectionRefused), "{label}");
        assert!(
            tcp_took < Duration::from_secs(1),
            "{label}: refused after {tcp_took:?}"
        );
    }
    let (udp, took) = c
        .client_pod()
        .run(|| {
            let t = Instant::now();
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(addr(CLUSTER_UDP)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.send(b"WHO").unwrap();
            let mut buf = [0u8; 64];
            (
                s.recv(&mut buf).map(drop).map_err(|e| e.kind()),
                t.elapsed(),
            )
        })
        .unwrap();
    assert_eq!(udp, Err(ErrorKind::ConnectionRefused));
    assert!(took < Duration::from_secs(1), "UDP refused after {took:?}");
}

#[test]
fn session_affinity_keeps_each_client_on_one_backend() {
    let c = Cluster::new(3);
    let mut svc = Svc::web(c.backend_ips().into_iter().map(Endpoint::ready).collect());
    svc.affinity_timeout_s = Some(600);
    let config = ConfigFile::new(&yaml(&[svc])).unwrap();
    let _agent = Agent::start(&c.topo, &config.path).unwrap();
    let from_client = tally(&many_tcp(&c.topo.client, node_port(), 40));
    assert_eq!(from_client.len(), 1, "{from_client:?}");
    let from_pod = tally(&many_tcp(c.client_pod(), addr(CLUSTER_TCP), 40));
    assert_eq!(from_pod.len(), 1, "{from_pod:?}");
}

#[test]
fn xdp_on_a_nic_with_complete_checksums() {
    let c = Cluster::with_nic(3, NicMode::LikePhysical);
    let config = ConfigFile::new(&c.web()).unwrap();
    let mut extra = vec!["--xdp-iface".to_string(), c.topo.nic.clone()];
    for i in c.topo.pod_ifaces() {
        extra.push("--iface".into());
        extra.push(i);
    }
    let _agent = Agent::start_with(&c.topo, &config.path, &extra).unwrap();
    let _peer = Agent::start_peer_xdp(&c.topo).unwrap();
    let answers = many_tcp(&c.topo.client, node_port(), 120);
    assert_fair(&answers, 3);
    assert!(answers.iter().all(|a| *a.peer.ip() == CLIENT_IP));
    c.topo
        .client
        .run(|| tcp_upload(node_port(), MB20))
        .unwrap()
        .unwrap();
}

#[test]
fn xdp_refuses_at_once_too() {
    let c = Cluster::with_nic(1, NicMode::LikePhysical);
    let config = ConfigFile::new(&yaml(&[Svc::web(vec![])])).unwrap();
    let extra = vec!["--xdp-iface".to_string(), c.topo.nic.clone()];
    let _agent = Agent::start_with(&c.topo, &config.path, &extra).unwrap();
    let _peer = Agent::start_peer_xdp(&c.topo).unwrap();
    let (r, took) = timed_connect(&c.topo.client, node_port());
    assert_eq!(r, Err(ErrorKind::ConnectionRefused));
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
}

#[test]
fn multiple_services_and_ports_coexist() {
    let c = Cluster::new(3);
    let ips = c.backend_ips();
    let other = Svc::api(ips[2]);
    let config = ConfigFile::new(&yaml(&[
        Svc::web(ips.iter().copied().map(Endpoint::ready).collect()),
        other,
    ]))
    .unwrap();
    let _agent = Agent::start(&c.topo, &config.path).unwrap();
    let api = tally(&many_tcp(
        &c.topo.client,
        SocketAddrV4::new(NODE_IP, 30443),
        20,
    ));
    assert_eq!(api.keys().collect::<Vec<_>>(), ["pod-3"]);
    let via_cluster_ip = tally(&many_tcp(c.client_pod(), addr("198.19.0.11:8443"), 20));
    assert_eq!(via_cluster_ip.keys().collect::<Vec<_>>(), ["pod-3"]);
    assert_fair(&many_tcp(c.client_pod(), addr(CLUSTER_TCP), 90), 3);
}

#[test]
fn terminating_endpoints_take_new_flows_only_when_no_ready_one_is_left() {
    let c = Cluster::new(2);
    let ips = c.backend_ips();
    let config = ConfigFile::new(&yaml(&[Svc::web(vec![
        Endpoint::ready(ips[0]),
        Endpoint::terminating(ips[1]),
    ])]))
    .unwrap();
    let mut agent = Agent::start(&c.topo, &config.path).unwrap();
    let t = tally(&many_tcp(c.client_pod(), addr(CLUSTER_TCP), 40));
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        ["pod-1"],
        "a ready endpoint exists: {t:?}"
    );

    // The ready one goes away; the serving, terminating one takes over.
    config
        .replace(&yaml(&[Svc::web(vec![Endpoint::terminating(ips[1])])]))
        .unwrap();
    agent
        .wait_for_log("applied config", Duration::from_secs(3))
        .unwrap();
    let t = tally(&many_tcp(c.client_pod(), addr(CLUSTER_TCP), 40));
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        ["pod-2"],
        "fallback to serving+terminating: {t:?}"
    );
}
