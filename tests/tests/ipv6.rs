//! IPv6 and dual-stack Services end to end: the real `lb run` on a
//! dual-stack virtual node (`Topology::add_ipv6`, fd00::/8 only), real
//! sockets in the client and pod namespaces.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use lb_tests::{
    agent::{Agent, ConfigFile},
    netns::Netns,
    servers::{tcp_who, PodServer},
    topology::{pod_ip, pod_ip6, Topology, CLIENT_IP6, NODE_IP6, NODE_NAME},
};

const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x10);

/// A TCP and a UDP server on [::] (IPv6 only) in a pod, answering its
/// name and the peer it saw; stopped on drop. (The IPv4 ones are
/// `PodServer`, on 0.0.0.0 with the same ports.)
struct Server6 {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn v6_only_socket(ty: nix::sys::socket::SockType, port: u16) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockaddrIn6,
    };
    let fd = socket(AddressFamily::Inet6, ty, SockFlag::empty(), None).expect("socket");
    setsockopt(&fd, sockopt::Ipv6V6Only, &true).expect("IPV6_V6ONLY");
    setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    let at = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    bind(fd.as_raw_fd(), &at).expect("bind [::]");
    fd
}

impl Server6 {
    fn start(ns: &Netns, name: &str) -> Server6 {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (stop, name, tx) = (stop.clone(), name.to_string(), tx.clone());
            threads.push(
                ns.spawn(move || {
                    use nix::sys::socket::{listen, Backlog, SockType};
                    let fd = v6_only_socket(SockType::Stream, 8080);
                    listen(&fd, Backlog::new(64).unwrap()).expect("listen");
                    let l = TcpListener::from(fd);
                    l.set_nonblocking(true).unwrap();
                    tx.send(()).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        match l.accept() {
                            Ok((c, peer)) => {
                                let (name, stop) = (name.clone(), stop.clone());
                                std::thread::spawn(move || serve(c, peer, &name, &stop));
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(5)),
                        }
                    }
                })
                .unwrap(),
            );
        }
        {
            let (stop, name) = (stop.clone(), name.to_string());
            threads.push(
                ns.spawn(move || {
                    let s =
                        UdpSocket::from(v6_only_socket(nix::sys::socket::SockType::Datagram, 5353));
                    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                    tx.send(()).unwrap();
                    let mut buf = [0u8; 256];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((_, peer)) = s.recv_from(&mut buf) {
                            let _ = s.send_to(format!("{name} {peer}").as_bytes(), peer);
                        }
                    }
                })
                .unwrap(),
            );
        }
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(5))
                .expect("server started");
        }
        Server6 { stop, threads }
    }
}

impl Drop for Server6 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One connection: `WHO` gets the name and the peer; `STREAM` the name,
/// then data until the server stops or the client goes.
fn serve(mut c: TcpStream, peer: SocketAddr, name: &str, stop: &AtomicBool) {
    c.set_nonblocking(false).unwrap();
    let mut buf = [0u8; 16];
    let n = c.read(&mut buf).unwrap_or(0);
    if buf[..n].starts_with(b"STREAM") {
        let _ = c.write_all(format!("{name}\n").as_bytes());
        let chunk = vec![b'x'; 16 * 1024];
        while !stop.load(Ordering::Relaxed) && c.write_all(&chunk).is_ok() {}
        return;
    }
    let _ = c.write_all(format!("{name} {peer}\n").as_bytes());
}

/// Who answered, and the peer it saw.
fn parse(text: &str) -> (String, SocketAddr) {
    let mut it = text.split_whitespace();
    let pod = it.next().expect("a name").to_string();
    let peer = it.next().expect("a peer").parse().expect("an address");
    (pod, peer)
}

fn tcp_who6(to: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"WHO\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(parse(&text))
}

fn udp_who6(to: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
    s.connect(to)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 256];
    // A few tries: the first datagram can race neighbour discovery.
    for _ in 0..6 {
        s.send(b"WHO")?;
        if let Ok(n) = s.recv(&mut buf) {
            return Ok(parse(&String::from_utf8_lossy(&buf[..n])));
        }
    }
    Err(std::io::Error::other(format!("no UDP answer from {to}")))
}

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
    _v6: Vec<Server6>,
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
            .map(|i| Server6::start(&topo.pods[i].ns, &format!("pod-{}", i + 1)))
            .collect();
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

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(ip), port)
}

#[test]
fn ipv6_clusterip_over_tcp_and_udp_reaches_both_pods_from_the_client_and_from_a_pod() {
    let n = Node::new();
    // From outside the node (routed to it), TCP: both backends in turn,
    // each seeing the client's own address.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let (pod, peer) = n
            .topo
            .client
            .run(|| tcp_who6(v6(CLUSTER_IP6, 80)))
            .unwrap()
            .expect("TCP over IPv6 to the ClusterIP");
        assert_eq!(peer.ip(), IpAddr::V6(CLIENT_IP6), "source kept");
        seen.insert(pod);
    }
    assert_eq!(seen.len(), 2, "both backends: {seen:?}");
    // From a pod, UDP.
    let (pod, peer) = n.topo.pods[2]
        .ns
        .run(|| udp_who6(v6(CLUSTER_IP6, 53)))
        .unwrap()
        .expect("UDP over IPv6 to the ClusterIP");
    assert!(pod.starts_with("pod-"), "{pod}");
    assert_eq!(peer.ip(), IpAddr::V6(pod_ip6(3)));
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
    let (pod, peer) = n
        .topo
        .client
        .run(|| tcp_who6(v6(CLUSTER_IP6, 80)))
        .unwrap()
        .expect("IPv6");
    assert!(pod.starts_with("pod-"));
    assert!(peer.is_ipv6());
    let services = n.agent.inspect(&["services"]);
    assert!(services.contains("default/web:http/TCP/IPv6"), "{services}");
    assert!(services.contains("[fd00:19::10]:80/TCP"), "{services}");
}

#[test]
fn ipv6_nodeport_reaches_the_pods_from_an_external_client() {
    let n = Node::new();
    let (pod, peer) = n
        .topo
        .client
        .run(|| tcp_who6(v6(NODE_IP6, 30080)))
        .unwrap()
        .expect("TCP over IPv6 to the NodePort");
    assert!(pod.starts_with("pod-"), "{pod}");
    // Local backends: the client's address is kept.
    assert_eq!(peer.ip(), IpAddr::V6(CLIENT_IP6));
}

#[test]
fn a_pod_reaching_itself_over_ipv6_is_masqueraded_to_the_nodes_ipv6_address() {
    let n = Node::new();
    // Pod 1 asks the ClusterIP until Maglev sends it to itself (hairpin):
    // its reply would never leave it without the source translated.
    let mut hairpin = None;
    for _ in 0..40 {
        let (pod, peer) = n.topo.pods[0]
            .ns
            .run(|| tcp_who6(v6(CLUSTER_IP6, 80)))
            .unwrap()
            .expect("TCP from pod 1");
        if pod == "pod-1" {
            hairpin = Some(peer);
            break;
        }
        assert_eq!(peer.ip(), IpAddr::V6(pod_ip6(1)), "to pod-2: source kept");
    }
    let peer = hairpin.expect("pod 1 reached itself in 40 connections");
    assert_eq!(peer.ip(), IpAddr::V6(NODE_IP6), "hairpin: SNAT to the node");
}

#[test]
fn the_nodes_own_ipv6_sockets_are_translated_by_the_socket_hooks() {
    lb_tests::require_root();
    let topo = Topology::new(2).expect("topology");
    topo.add_ipv6().expect("IPv6 addresses");
    let _v4 = topo.start_servers(1).expect("servers");
    let _v6 = Server6::start(&topo.pods[0].ns, "pod-1");
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
            Some(v6(CLUSTER_IP6, 80)),
            Some(v6(CLUSTER_IP6, 53)),
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
    let (pod, _) = n
        .topo
        .client
        .run(|| tcp_who6(v6(CLUSTER_IP6, 80)))
        .unwrap()
        .expect("a new IPv6 connection after the restart");
    assert!(pod.starts_with("pod-"));
    stream.wait_for_more(SOME, PATIENCE).unwrap();
    stream.finish().expect("the stream never broke");
}
