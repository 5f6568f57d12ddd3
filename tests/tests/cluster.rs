//! Service semantics on a virtual multi-node cluster (see
//! `lb_tests::cluster`): two nodes, each running the real `lb run` with its
//! own `--node-name`, both reading the same YAML; pods with real servers on
//! both nodes; an external client behind a routed fabric.

use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, ConfigFile},
    cluster::{
        client_ip6, external_ip, external_ip6, node_ip6, node_name, pod_ip, pod_ip6, Cluster,
        CLIENT_IP,
    },
    example::{yaml, Endpoint, Extra, Svc},
    netns::Netns,
    servers::{
        tcp_bulk, tcp_echo, tcp_echo_open, tcp_upload, tcp_who, tcp_who6, tcp_who_client_closes,
        udp_big, udp_who, udp_who6, Answer, Answer6, PodServer,
    },
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const NODE_PORT: u16 = 30080;

/// Two nodes with two serving pods each ("a0", "a1", "b0", "b1"), and the
/// agents once `start` is called.
struct World {
    c: Cluster,
    _servers: Vec<PodServer>,
    agents: Vec<Agent>,
    config: Option<ConfigFile>,
}

impl World {
    fn new() -> World {
        lb_tests::require_root();
        let c = Cluster::new(&[2, 2]).expect("cluster");
        let servers = c.start_servers().expect("servers");
        World {
            c,
            _servers: servers,
            agents: Vec::new(),
            config: None,
        }
    }

    /// `new`, dual-stack: every address has its IPv6 twin, the servers
    /// listen on both families, each agent gets both node addresses.
    fn dual_stack() -> World {
        lb_tests::require_root();
        let mut c = Cluster::new(&[2, 2]).expect("cluster");
        c.add_ipv6().expect("IPv6 addresses");
        let servers = c.start_servers().expect("servers");
        World {
            c,
            _servers: servers,
            agents: Vec::new(),
            config: None,
        }
    }

    fn start(&mut self, services: &[Svc], extra: &[String]) {
        self.start_with_env(services, extra, &[]);
    }

    fn start_with_env(&mut self, services: &[Svc], extra: &[String], env: &[(&str, &str)]) {
        let config = ConfigFile::new(&yaml(services)).expect("config");
        self.agents = self
            .c
            .start_agents_with_env(&config.path, extra, env)
            .expect("agents");
        self.config = Some(config);
    }

    /// Rewrites the config and waits until every agent applied it.
    fn update(&mut self, services: &[Svc]) {
        let counts: Vec<usize> = self
            .agents
            .iter()
            .map(|a| a.count_logs("applied config"))
            .collect();
        self.config
            .as_ref()
            .unwrap()
            .replace(&yaml(services))
            .unwrap();
        for (a, n) in self.agents.iter_mut().zip(counts) {
            a.wait_for_nth_log("applied config", n + 1, Duration::from_secs(5))
                .unwrap();
        }
    }

    fn pod(&self, node: usize, i: usize) -> &Netns {
        &self.c.nodes[node].pods[i].ns
    }

    fn node_ip(&self, node: usize) -> Ipv4Addr {
        self.c.nodes[node].ip
    }
}

/// `web` (ClusterIP 198.19.0.10: TCP 80 -> 8080 with NodePort 30080, UDP
/// 53 -> 5353) on the given endpoints, as (node, pod) pairs.
fn web(endpoints: &[(usize, usize)], extra: Extra) -> Svc {
    Svc {
        extra,
        ..Svc::web(
            endpoints
                .iter()
                .map(|&(n, i)| Endpoint::ready(pod_ip(n, i)).on(&node_name(n)))
                .collect(),
        )
    }
}

fn who(ns: &Netns, to: SocketAddrV4) -> Answer {
    ns.run(move || tcp_who(to))
        .unwrap()
        .unwrap_or_else(|e| panic!("TCP {to}: {e}"))
}

fn who_udp(ns: &Netns, to: SocketAddrV4) -> Answer {
    ns.run(move || udp_who(to))
        .unwrap()
        .unwrap_or_else(|e| panic!("UDP {to}: {e}"))
}

/// A TCP connect from `ns` that is expected to be dropped: the error kind.
fn connect_error(ns: &Netns, to: SocketAddrV4) -> ErrorKind {
    ns.run(move || {
        TcpStream::connect_timeout(&to.into(), Duration::from_millis(1500))
            .err()
            .map(|e| e.kind())
    })
    .unwrap()
    .unwrap_or_else(|| panic!("connection to {to} was accepted"))
}

fn tcp(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

#[test]
fn cluster_ip_reaches_a_backend_on_another_node_and_replies_come_back() {
    let mut w = World::new();
    w.start(&[web(&[(1, 0), (1, 1)], Extra::default())], &[]);
    let client = pod_ip(0, 0);
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let a = who(w.pod(0, 0), tcp(CLUSTER_IP, 80));
        assert!(a.pod.starts_with('b'), "{a:?}");
        assert_eq!(*a.peer.ip(), client, "no SNAT for pod traffic");
        seen.insert(a.pod);
        let u = who_udp(w.pod(0, 0), tcp(CLUSTER_IP, 53));
        assert!(u.pod.starts_with('b'), "{u:?}");
        assert_eq!(*u.peer.ip(), client);
    }
    assert_eq!(seen.len(), 2, "both remote backends used: {seen:?}");
    // Tens of megabytes each way across the fabric, offloads on: every
    // byte checked by the receiver.
    let to = tcp(CLUSTER_IP, 80);
    w.pod(0, 0)
        .run(move || tcp_bulk(to, 20 << 20))
        .unwrap()
        .unwrap();
    w.pod(0, 0)
        .run(move || tcp_upload(to, 20 << 20))
        .unwrap()
        .unwrap();
}

#[test]
fn a_pod_reaches_itself_through_its_service_masqueraded_to_the_node() {
    let mut w = World::new();
    w.start(&[web(&[(0, 0)], Extra::default())], &[]);
    for _ in 0..5 {
        let a = who(w.pod(0, 0), tcp(CLUSTER_IP, 80));
        assert_eq!(a.pod, "a0");
        // Like kube-proxy's masquerade: the pod sees the node, not itself.
        assert_eq!(*a.peer.ip(), w.node_ip(0), "{a:?}");
        let u = who_udp(w.pod(0, 0), tcp(CLUSTER_IP, 53));
        assert_eq!((u.pod.as_str(), *u.peer.ip()), ("a0", w.node_ip(0)));
    }
    // Another pod on the node is not masqueraded.
    let a = who(w.pod(0, 1), tcp(CLUSTER_IP, 80));
    assert_eq!(*a.peer.ip(), pod_ip(0, 1));
}

#[test]
fn node_port_to_a_remote_backend_is_snatted_with_distinct_ports() {
    let mut w = World::new();
    w.start(&[web(&[(1, 0), (1, 1)], Extra::default())], &[]);
    let np = tcp(w.node_ip(0), NODE_PORT);
    let mut ports = BTreeSet::new();
    for _ in 0..60 {
        // The client only ever talks to the node address it dialled (its
        // socket would reject anything else).
        let a = who(&w.c.client, np);
        assert!(a.pod.starts_with('b'), "{a:?}");
        assert_eq!(*a.peer.ip(), w.node_ip(0), "SNAT to node A: {a:?}");
        assert!(a.peer.port() >= lb_common::SNAT_PORT_MIN, "{a:?}");
        // A port is unique per backend (the reply's 4-tuple); two backends
        // may reuse one.
        ports.insert((a.pod, a.peer.port()));
    }
    assert_eq!(ports.len(), 60, "one SNAT port per flow and backend");
    // Concurrent connections do not collide either.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            w.c.client
                .spawn(move || (0..10).map(|_| tcp_who(np)).collect::<Vec<_>>())
                .unwrap()
        })
        .collect();
    let mut concurrent = BTreeSet::new();
    for h in handles {
        for a in h.join().unwrap() {
            let a = a.expect("concurrent connection");
            concurrent.insert((a.pod, a.peer));
        }
    }
    assert_eq!(concurrent.len(), 80);
    w.c.client
        .run(move || tcp_bulk(np, 20 << 20))
        .unwrap()
        .unwrap();
    w.c.client
        .run(move || tcp_upload(np, 20 << 20))
        .unwrap()
        .unwrap();
}

#[test]
fn a_local_backend_behind_a_node_port_sees_the_client_address() {
    let mut w = World::new();
    w.start(&[web(&[(0, 0)], Extra::default())], &[]);
    let a = who(&w.c.client, tcp(w.node_ip(0), NODE_PORT));
    assert_eq!((a.pod.as_str(), *a.peer.ip()), ("a0", CLIENT_IP));
}

#[test]
fn every_node_picks_the_same_backend_for_the_same_flow() {
    let mut w = World::new();
    w.start(
        &[web(&[(0, 0), (0, 1), (1, 0), (1, 1)], Extra::default())],
        &[],
    );
    let (a_ip, b_ip) = (w.node_ip(0), w.node_ip(1));
    let mut picked = BTreeSet::new();
    for sport in 40_000..40_024u16 {
        let via_a =
            w.c.client
                .run(move || who_from_port(sport, tcp(a_ip, NODE_PORT)))
                .unwrap();
        // The same client flow after an "ECMP change" to node B.
        let via_b =
            w.c.client
                .run(move || who_from_port(sport, tcp(b_ip, NODE_PORT)))
                .unwrap();
        assert_eq!(via_a.pod, via_b.pod, "source port {sport}");
        picked.insert(via_a.pod);
    }
    assert!(picked.len() >= 3, "flows spread: {picked:?}");
}

#[test]
fn session_affinity_picks_the_same_backend_on_every_node() {
    let mut w = World::new();
    let mut svc = web(&[(0, 0), (0, 1), (1, 0), (1, 1)], Extra::default());
    svc.affinity_timeout_s = Some(600);
    w.start(&[svc], &[]);
    // No state is shared between the nodes: the choice for a client with
    // affinity depends on its address only.
    let pods: BTreeSet<String> = (0..8)
        .flat_map(|_| {
            [
                who(&w.c.client, tcp(w.node_ip(0), NODE_PORT)).pod,
                who(&w.c.client, tcp(w.node_ip(1), NODE_PORT)).pod,
            ]
        })
        .collect();
    assert_eq!(pods.len(), 1, "{pods:?}");
}

/// `WHO` over a TCP connection from a fixed source port.
fn who_from_port(sport: u16, to: SocketAddrV4) -> Answer {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket syscalls on a descriptor we own.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    let one: libc::c_int = 1;
    let bind = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: sport.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(CLIENT_IP).to_be(),
        },
        sin_zero: [0; 8],
    };
    let dst = libc::sockaddr_in {
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        ..bind
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            4,
        );
        assert_eq!(
            libc::bind(fd, (&raw const bind).cast(), len),
            0,
            "bind {sport}"
        );
        assert_eq!(
            libc::connect(fd, (&raw const dst).cast(), len),
            0,
            "connect {to}"
        );
    }
    // SAFETY: fd is a connected TCP socket we own.
    let mut s = unsafe { TcpStream::from_raw_fd(fd) };
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"WHO\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let mut it = text.split_whitespace();
    Answer {
        pod: it.next().unwrap().to_string(),
        peer: it.next().unwrap().parse().unwrap(),
    }
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_drops_without_local_endpoints() {
    let mut w = World::new();
    let local = |eps: &[(usize, usize)]| {
        web(
            eps,
            Extra {
                type_: Some("LoadBalancer"),
                external_traffic_policy: Some("Local"),
                health_check_node_port: Some(31999),
                ..Extra::default()
            },
        )
    };
    w.start(&[local(&[(0, 0), (1, 0)])], &[]);
    let (a_ip, b_ip) = (w.node_ip(0), w.node_ip(1));
    for _ in 0..10 {
        let a = who(&w.c.client, tcp(a_ip, NODE_PORT));
        assert_eq!((a.pod.as_str(), *a.peer.ip()), ("a0", CLIENT_IP));
        let b = who(&w.c.client, tcp(b_ip, NODE_PORT));
        assert_eq!((b.pod.as_str(), *b.peer.ip()), ("b0", CLIENT_IP));
    }
    // ClusterIP traffic still uses every endpoint.
    let seen: BTreeSet<String> = (0..20)
        .map(|_| who(w.pod(0, 1), tcp(CLUSTER_IP, 80)).pod)
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(http_get(&w.c.client, tcp(a_ip, 31999)).0, 200);

    // Node A's endpoint starts terminating: it keeps no new external flow,
    // the health check says 503, and external traffic there is dropped
    // (not refused), while node B still serves.
    let mut svc = local(&[(1, 0)]);
    svc.endpoints
        .push(Endpoint::terminating(pod_ip(0, 0)).on("node-a"));
    w.update(&[svc]);
    let (status, body) = http_get(&w.c.client, tcp(a_ip, 31999));
    assert_eq!(status, 503, "{body}");
    // Terminating+serving local endpoints still take flows (KEP-1669) ...
    let a = who(&w.c.client, tcp(a_ip, NODE_PORT));
    assert_eq!(a.pod, "a0");
    // ... but with none at all, traffic to node A is dropped.
    w.update(&[local(&[(1, 0)])]);
    assert_eq!(
        connect_error(&w.c.client, tcp(a_ip, NODE_PORT)),
        ErrorKind::TimedOut
    );
    let (status, body) = http_get(&w.c.client, tcp(a_ip, 31999));
    assert_eq!(status, 503);
    assert!(body.contains("\"localEndpoints\":0"), "{body}");
    let (status, body) = http_get(&w.c.client, tcp(b_ip, 31999));
    assert_eq!(status, 200);
    assert!(body.contains("\"localEndpoints\":1"), "{body}");
    assert_eq!(who(&w.c.client, tcp(b_ip, NODE_PORT)).pod, "b0");
}

/// A minimal HTTP/1.0 GET: status code and body.
fn http_get(ns: &Netns, to: SocketAddrV4) -> (u16, String) {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(s, "GET /healthz HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        Ok::<_, std::io::Error>((status, body))
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("GET {to}: {e}"))
}

#[test]
fn internal_traffic_policy_local_keeps_cluster_ip_traffic_on_the_node() {
    let mut w = World::new();
    let svc = |eps: &[(usize, usize)]| {
        web(
            eps,
            Extra {
                internal_traffic_policy: Some("Local"),
                ..Extra::default()
            },
        )
    };
    w.start(&[svc(&[(0, 0), (1, 0)])], &[]);
    for _ in 0..10 {
        assert_eq!(who(w.pod(0, 1), tcp(CLUSTER_IP, 80)).pod, "a0");
        assert_eq!(who(w.pod(1, 1), tcp(CLUSTER_IP, 80)).pod, "b0");
    }
    w.update(&[svc(&[(1, 0)])]);
    assert_eq!(
        connect_error(w.pod(0, 1), tcp(CLUSTER_IP, 80)),
        ErrorKind::TimedOut
    );
    assert_eq!(who(w.pod(1, 1), tcp(CLUSTER_IP, 80)).pod, "b0");
}

#[test]
fn external_ips_and_load_balancer_ips_with_source_ranges() {
    let mut w = World::new();
    let svc = |ranges: Vec<&'static str>| {
        web(
            &[(1, 0)],
            Extra {
                type_: Some("LoadBalancer"),
                external_ips: vec![external_ip(1).into()],
                lb_ingress: vec![external_ip(2).into()],
                source_ranges: ranges,
                ..Extra::default()
            },
        )
    };
    w.start(&[svc(vec!["198.18.9.0/24"])], &[]);
    for ip in [external_ip(1), external_ip(2)] {
        let a = who(&w.c.client, tcp(ip, 80));
        // External scope, remote backend: SNAT to node A, like NodePort.
        assert_eq!((a.pod.as_str(), *a.peer.ip()), ("b0", w.node_ip(0)));
    }
    // The client's range is no longer admitted to the LB address; the
    // external IP is not subject to it (as in kube-proxy).
    w.update(&[svc(vec!["198.18.100.0/24", "10.0.0.0/8"])]);
    assert_eq!(
        connect_error(&w.c.client, tcp(external_ip(2), 80)),
        ErrorKind::TimedOut
    );
    assert_eq!(who(&w.c.client, tcp(external_ip(1), 80)).pod, "b0");
    // A /32 for the client admits it again.
    w.update(&[svc(vec!["198.18.9.2/32"])]);
    assert_eq!(who(&w.c.client, tcp(external_ip(2), 80)).pod, "b0");
}

/// Runs a bash snippet as a process of node `n` (its namespace, and the
/// cgroup the socket hooks are attached to): stdout.
fn on_node_host(w: &World, cg: &lb_tests::cgroup::Cgroup, n: usize, script: &str) -> String {
    let out = cg
        .run(
            &w.c.nodes[n].ns,
            std::path::Path::new("/bin/bash"),
            &["-c", script],
            &[],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_nodes_own_processes_reach_cluster_ips_and_node_ports() {
    let mut w = World::new();
    let cg = lb_tests::cgroup::Cgroup::new().unwrap();
    // Both nodes' agents hook this one cgroup (the nodes share a kernel
    // here, unlike real ones): each must act only on its own node's
    // namespace, which is what --socket-lb-host-only does. Pods' sockets
    // are covered in tests/tests/node.rs.
    let extra = [
        "--cgroup".to_string(),
        cg.path.display().to_string(),
        "--socket-lb-host-only".into(),
    ];
    w.start(&[web(&[(1, 0), (1, 1)], Extra::default())], &extra);
    let tcp_who = |to: &str| format!("exec 3<>/dev/tcp/{to}; echo WHO >&3; cat <&3");
    let mut seen = BTreeSet::new();
    for _ in 0..12 {
        let out = on_node_host(&w, &cg, 0, &tcp_who("198.19.0.10/80"));
        assert!(out.starts_with('b'), "{out:?}");
        // Translated at connect(): the backend sees the node itself.
        assert!(out.contains(&w.node_ip(0).to_string()), "{out:?}");
        seen.insert(out.split_whitespace().next().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // A connected UDP socket; one read is one datagram.
    let udp = on_node_host(
        &w,
        &cg,
        0,
        "exec 3<>/dev/udp/198.19.0.10/53; printf WHO >&3; timeout 3 dd bs=512 count=1 <&3 2>/dev/null",
    );
    assert!(udp.starts_with('b'), "{udp:?}");
    // NodePort of this node and of the other one, from node A.
    let np_a = format!("{}/{NODE_PORT}", w.node_ip(0));
    assert!(on_node_host(&w, &cg, 0, &tcp_who(&np_a)).starts_with('b'));
    // Node B's agent hooks the same cgroup but acts only on node B's
    // sockets: node B's process is balanced by node B's maps.
    assert!(on_node_host(&w, &cg, 1, &tcp_who("198.19.0.10/80")).starts_with('b'));
    // getpeername() and an unconnected UDP socket's recvfrom() show the
    // frontend, not the backend (a probe process in the cgroup).
    let text = cg
        .probe(
            &w.c.nodes[0].ns,
            Some("198.19.0.10:80".parse().unwrap()),
            Some("198.19.0.10:53".parse().unwrap()),
        )
        .unwrap();
    assert!(text.contains("PROBE peer 198.19.0.10:80"), "{text}");
    assert!(text.contains("PROBE from 198.19.0.10:53 b"), "{text}");
    let translated = w.agents[0].stat("sock_translated");
    assert!(translated >= 16, "{translated}");
}

#[test]
fn path_mtu_discovery_works_through_a_smaller_link_both_ways() {
    let mut w = World::new();
    // The fabric's links to node B and to the client carry 1280 bytes, the
    // ends still believe in 1500: only ICMP "fragmentation needed" from the
    // fabric tells the senders, about packets node A translated.
    w.c.fabric
        .ip(&["link", "set", "n1", "mtu", "1280"])
        .unwrap();
    w.c.fabric
        .ip(&["link", "set", "cli", "mtu", "1280"])
        .unwrap();
    // Node A sends each translated error back through the fabric, which
    // wrote it: a Linux router drops a packet bearing its own address as a
    // martian unless told otherwise. (With more than one router between
    // node A and the client, nothing is needed.)
    w.c.fabric
        .sysctl("net.ipv4.conf.all.accept_local", "1")
        .unwrap();
    w.start(&[web(&[(1, 0)], Extra::default())], &[]);
    let np = tcp(w.node_ip(0), NODE_PORT);
    upload_and_download_through_the_small_links(&w, np);
}

/// 4 MiB up and 4 MiB down between the client and node A's NodePort `np`
/// (node B's pod behind it), every byte checked. Upload: the fabric
/// complains to node A (the SNAT source) about a packet to b0; node A hands
/// the error to the client. Download: the fabric complains to node A (the
/// NodePort) about a reply to the client; node A hands the error to b0.
/// Both errors translated, or the transfer stalls.
fn upload_and_download_through_the_small_links(w: &World, np: impl Into<SocketAddr>) {
    let np = np.into();
    w.c.client
        .run(move || tcp_upload(np, 4 << 20))
        .unwrap()
        .unwrap();
    w.c.client
        .run(move || tcp_bulk(np, 4 << 20))
        .unwrap()
        .unwrap();
    let translated = w.agents[0].stat("icmp_error_nat");
    assert!(translated >= 2, "{translated}");
}

/// UDP 54 (NodePort 30054) to pod port 9999, where nobody listens.
fn port_nobody_listens_on() -> lb_tests::example::Port {
    lb_tests::example::Port {
        name: "udp",
        protocol: "UDP",
        port: 54,
        target: 9999,
        node_port: Some(30054),
    }
}

/// One UDP datagram from `ns` to `to`, whose answer is expected to be a
/// refusal: the error the socket reports.
fn udp_refused(ns: &Netns, to: impl Into<std::net::SocketAddr>) -> ErrorKind {
    let to = to.into();
    ns.run(move || {
        let any: std::net::SocketAddr = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
            .parse()
            .unwrap();
        let s = std::net::UdpSocket::bind(any).unwrap();
        s.connect(to).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send(b"hello").unwrap();
        let mut buf = [0u8; 64];
        s.recv(&mut buf).unwrap_err().kind()
    })
    .unwrap()
}

#[test]
fn a_backends_port_unreachable_reaches_the_client_as_connection_refused() {
    let mut w = World::new();
    let mut dead = web(&[(1, 0)], Extra::default());
    dead.name = "dead";
    dead.cluster_ip = Ipv4Addr::new(198, 19, 0, 12);
    dead.ports = vec![port_nobody_listens_on()];
    w.start(&[dead], &[]);
    // Through SNAT (NodePort, remote backend) and without (pod, ClusterIP).
    let start = Instant::now();
    assert_eq!(
        udp_refused(&w.c.client, tcp(w.node_ip(0), 30054)),
        ErrorKind::ConnectionRefused
    );
    assert_eq!(
        udp_refused(w.pod(0, 0), tcp(Ipv4Addr::new(198, 19, 0, 12), 54)),
        ErrorKind::ConnectionRefused
    );
    assert!(start.elapsed() < Duration::from_secs(3));
}

/// Opens a `STREAM` connection from `ns` to `to`: the backend's name, and
/// the socket, already receiving.
fn open_stream(ns: &Netns, to: SocketAddrV4) -> (String, TcpStream) {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)).unwrap();
        s.write_all(b"STREAM\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut name = [0u8; 3];
        s.read_exact(&mut name).unwrap();
        (String::from_utf8_lossy(&name).trim().to_string(), s)
    })
    .unwrap()
}

/// Reads from `s` for `ms` milliseconds: bytes received (panics if the
/// stream stalls or breaks).
fn keeps_flowing(s: &mut TcpStream, ms: u64) -> usize {
    let mut buf = vec![0u8; 1 << 20];
    let until = Instant::now() + Duration::from_millis(ms);
    let mut got = 0;
    while Instant::now() < until {
        got += s
            .read(&mut buf)
            .expect("the established stream keeps going");
    }
    got
}

#[test]
fn terminating_endpoints_keep_their_flows_and_take_new_ones_only_as_a_last_resort() {
    let mut w = World::new();
    w.start(&[web(&[(1, 0)], Extra::default())], &[]);
    let to = tcp(CLUSTER_IP, 80);
    let (pod, mut stream) = open_stream(w.pod(0, 0), to);
    assert_eq!(pod, "b0");

    // b0 starts terminating while b1 is ready: new flows go to b1 only,
    // the established one stays on b0.
    let mut svc = web(&[(1, 1)], Extra::default());
    svc.endpoints
        .push(Endpoint::terminating(pod_ip(1, 0)).on("node-b"));
    w.update(&[svc.clone()]);
    assert!(keeps_flowing(&mut stream, 500) > 1 << 20);
    for _ in 0..20 {
        assert_eq!(who(w.pod(0, 1), to).pod, "b1");
    }
    assert!(keeps_flowing(&mut stream, 300) > 0);

    // Only the terminating (still serving) one left: it takes new flows.
    svc.endpoints.remove(0);
    w.update(&[svc]);
    for _ in 0..5 {
        assert_eq!(who(w.pod(0, 1), to).pod, "b0");
    }
    assert!(keeps_flowing(&mut stream, 300) > 0);
}

#[test]
fn many_ports_both_protocols_many_slices_and_an_endpoint_moving_between_slices() {
    use lb_tests::example::Port;
    let mut w = World::new();
    let svc = |slices: usize, endpoints: &[(usize, usize)]| {
        let mut s = web(
            endpoints,
            Extra {
                slices,
                ..Extra::default()
            },
        );
        // Port 80 on TCP and on UDP, and two more TCP ports.
        s.ports = vec![
            Port {
                name: "http",
                protocol: "TCP",
                port: 80,
                target: 8080,
                node_port: Some(NODE_PORT),
            },
            Port {
                name: "dns",
                protocol: "UDP",
                port: 80,
                target: 5353,
                node_port: None,
            },
            Port {
                name: "alt",
                protocol: "TCP",
                port: 81,
                target: 8080,
                node_port: None,
            },
            Port {
                name: "alt2",
                protocol: "TCP",
                port: 82,
                target: 8080,
                node_port: Some(30082),
            },
        ];
        s
    };
    let all = [(0, 0), (0, 1), (1, 0), (1, 1)];
    w.start(&[svc(3, &all)], &[]);
    let mut seen = BTreeSet::new();
    for _ in 0..24 {
        seen.insert(who(w.pod(0, 0), tcp(CLUSTER_IP, 80)).pod);
        seen.insert(who_udp(w.pod(0, 0), tcp(CLUSTER_IP, 80)).pod);
        seen.insert(who(w.pod(0, 0), tcp(CLUSTER_IP, 81)).pod);
        seen.insert(who(&w.c.client, tcp(w.node_ip(1), 30082)).pod);
    }
    assert_eq!(
        seen.len(),
        4,
        "every endpoint of the 3 slices used: {seen:?}"
    );

    // One endpoint moving between slices: the controller adds it to the
    // new slice, then removes it from the old one. Connections made all
    // along never fail, and the agent never withdraws the endpoint.
    let single = [(1, 0)];
    let mut moving = svc(1, &single);
    w.update(&[moving.clone()]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        w.pod(0, 0)
            .spawn(move || {
                let mut ok = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tcp_who(tcp(CLUSTER_IP, 80)).expect("no gap while the endpoint moves");
                    ok += 1;
                }
                ok
            })
            .unwrap()
    };
    // Listed in both slices (slice 2 gets a copy) ...
    moving.extra.slices = 2;
    moving.endpoints.push(moving.endpoints[0].clone());
    w.update(&[moving.clone()]);
    // ... then only in slice 2 (slice 1 empty).
    moving.endpoints[0] = Endpoint {
        ip: Ipv4Addr::new(198, 18, 250, 250).into(),
        ready: false,
        serving: false,
        ..moving.endpoints[0].clone()
    };
    w.update(&[moving]);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ok = prober.join().unwrap();
    assert!(ok > 10, "{ok} connections");
}

#[test]
fn services_for_other_proxies_and_headless_ones_are_left_alone() {
    let mut w = World::new();
    let labelled = |name: &'static str, ip: u8, label: (&'static str, &'static str)| {
        let mut s = web(
            &[(0, 0)],
            Extra {
                labels: vec![label],
                ..Extra::default()
            },
        );
        s.name = name;
        s.cluster_ip = Ipv4Addr::new(198, 19, 0, ip);
        s.ports.truncate(1);
        s.ports[0].node_port = None;
        s
    };
    let services = [
        labelled(
            "other",
            21,
            ("service.kubernetes.io/service-proxy-name", "other"),
        ),
        labelled(
            "ours",
            22,
            ("service.kubernetes.io/service-proxy-name", "lb"),
        ),
        labelled("headless", 23, ("service.kubernetes.io/headless", "")),
    ];
    w.start(
        &services,
        &["--service-proxy-name".to_string(), "lb".to_string()],
    );
    assert_eq!(
        who(w.pod(0, 1), tcp(Ipv4Addr::new(198, 19, 0, 22), 80)).pod,
        "a0"
    );
    for name in ["other", "headless"] {
        let line = w.agents[0]
            .logs()
            .into_iter()
            .find(|l| l.contains("skipped") && l.contains(&format!("Service demo/{name}")));
        assert!(line.is_some(), "no skip line for {name}");
    }
    // Not translated: the ClusterIP is not routed anywhere, so nothing
    // answers.
    let connected = w
        .pod(0, 1)
        .run(|| {
            TcpStream::connect_timeout(
                &tcp(Ipv4Addr::new(198, 19, 0, 21), 80).into(),
                Duration::from_millis(500),
            )
            .is_ok()
        })
        .unwrap();
    assert!(
        !connected,
        "a service labelled for another proxy was served"
    );
}

/// `web` with its UDP port on NodePort 30053 too.
fn web_udp_node_port(endpoints: &[(usize, usize)]) -> Svc {
    let mut s = web(endpoints, Extra::default());
    s.ports[1].node_port = Some(30053);
    s
}

/// `n` new UDP flows to `to`, one datagram each from its own source port.
fn udp_flood(to: SocketAddrV4, n: u32) -> u32 {
    let mut sent = 0;
    for i in 0..n {
        let port = 10_000 + (i % 50_000) as u16;
        if let Ok(s) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
            if s.send_to(b"WHO", to).is_ok() {
                sent += 1;
            }
        }
    }
    sent
}

/// The value of the sample line of `/metrics` starting with `prefix`.
fn metric(ns: &Netns, prefix: &str) -> f64 {
    let (code, text) = lb_tests::agent::status_get(ns, "/metrics");
    assert_eq!(code, 200);
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

/// Idle TCP connections through a NodePort (to a local and a remote
/// backend, SNATed) survive a flood of new UDP flows several times the
/// size of every conntrack table, sent while a backend joins the service:
/// none is reset, none moves to another backend.
#[test]
fn idle_connections_survive_a_udp_flood_while_a_backend_joins() {
    let mut w = World::new();
    w.start_with_env(
        &[web_udp_node_port(&[(0, 0), (1, 0)])],
        &["--conntrack-max".into(), "4096".into()],
        &[("LB_CT_SWEEP_MS", "300")],
    );
    let np = tcp(w.node_ip(0), NODE_PORT);
    let mut conns: Vec<(String, TcpStream)> = (0..24)
        .map(|_| w.c.client.run(move || tcp_echo_open(np)).unwrap().unwrap())
        .collect();
    let pods: BTreeSet<&str> = conns.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(pods.len(), 2, "both backends hold connections: {pods:?}");
    let capacity = metric(&w.c.nodes[0].ns, "lb_map_capacity{map=\"lb_ct_udp\"}");
    let flows = 20_000;
    assert!(flows as f64 >= 2.0 * capacity, "capacity {capacity}");
    let udp_np = SocketAddrV4::new(w.node_ip(0), 30053);
    let flood = w.c.client.spawn(move || udp_flood(udp_np, flows)).unwrap();
    w.update(&[web_udp_node_port(&[(0, 0), (1, 0), (1, 1)])]);
    let sent = flood.join().unwrap();
    assert!(sent > flows * 9 / 10, "sent {sent}");
    for (i, (pod, s)) in conns.iter_mut().enumerate() {
        let now = tcp_echo(s, &format!("ping {i}"))
            .unwrap_or_else(|e| panic!("connection {i} (to {pod}) broke: {e}"));
        assert_eq!(&now, pod, "connection {i} moved");
    }
    // The flood overflowed the UDP table, and /metrics says so once the
    // agent's sweep has looked.
    let node = &w.c.nodes[0].ns;
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(node, "lb_conntrack_evictions_total{map=\"lb_ct_udp\"}") == 0.0 {
        assert!(Instant::now() < deadline, "no UDP evictions reported");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        metric(node, "lb_conntrack_evictions_total{map=\"lb_ct_tcp\"}"),
        0.0,
        "no established TCP entry was evicted"
    );
}

/// More short connections through a SNATed NodePort to one remote backend
/// than the SNAT range has ports (4,536), one after another, each closed by
/// the client: each closed connection frees its port for the next ones,
/// and all of them succeed. (When the backend closes first, see the
/// README's SNAT limits: its TIME_WAIT can cost a reused port one SYN
/// retransmission.)
#[test]
fn ten_thousand_short_connections_through_a_snatted_node_port_all_succeed() {
    let mut w = World::new();
    w.start(&[web(&[(1, 0)], Extra::default())], &[]);
    let np = tcp(w.node_ip(0), NODE_PORT);
    let (ok, ports, failures) =
        w.c.client
            .run(move || {
                let mut ok = 0u32;
                let mut ports = BTreeSet::new();
                let mut failures = Vec::new();
                for i in 0..10_000u32 {
                    match tcp_who_client_closes(np) {
                        Ok(a) => {
                            ok += 1;
                            ports.insert(a.peer.port());
                        }
                        Err(e) => failures.push(format!("#{i}: {e}")),
                    }
                    if failures.len() == 3 {
                        break;
                    }
                }
                (ok, ports, failures)
            })
            .unwrap();
    assert_eq!(ok, 10_000, "failures: {failures:?}");
    assert!(ports.len() > 4_000, "{} SNAT ports used", ports.len());
    assert_eq!(w.agents[0].stat("drop_snat_exhausted"), 0);
}

/// A 3,000-byte UDP datagram to a ClusterIP (three fragments on these
/// 1,500-byte links) reaches a backend on another node, and its 3,000-byte
/// answer comes back, both translated fragment by fragment.
#[test]
fn a_3000_byte_udp_datagram_and_its_3000_byte_answer_cross_a_cluster_ip() {
    let mut w = World::new();
    w.start(&[web(&[(1, 0)], Extra::default())], &[]);
    let to = SocketAddrV4::new(CLUSTER_IP, 53);
    let (answer, len) = w.pod(0, 0).run(move || udp_big(to, 3000)).unwrap().unwrap();
    assert_eq!(answer.pod, "b0", "{answer:?}");
    assert_eq!(len, 3000);
    assert!(w.agents[0].stat("fragment_nat") >= 4);
}

// ---- IPv6 on the dual-stack cluster ----

const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x10);

/// `web` made dual-stack (ClusterIPs 198.19.0.10 and fd00:19::10), each
/// endpoint (node, pod) listed in both families' slices.
fn web_dual(endpoints: &[(usize, usize)], extra: Extra) -> Svc {
    let mut eps: Vec<Endpoint> = endpoints
        .iter()
        .map(|&(n, i)| Endpoint::ready(pod_ip(n, i)).on(&node_name(n)))
        .collect();
    eps.extend(
        endpoints
            .iter()
            .map(|&(n, i)| Endpoint::ready(pod_ip6(n, i)).on(&node_name(n))),
    );
    let mut svc = Svc::web(eps);
    svc.extra = Extra {
        cluster_ip6: Some(CLUSTER_IP6),
        ..extra
    };
    svc
}

fn tcp6(addr: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(addr, port, 0, 0)
}

fn who6(ns: &Netns, to: SocketAddrV6) -> Answer6 {
    ns.run(move || tcp_who6(to))
        .unwrap()
        .unwrap_or_else(|e| panic!("TCP {to}: {e}"))
}

#[test]
fn ipv6_cluster_ip_and_node_port_reach_backends_on_another_node() {
    let mut w = World::dual_stack();
    w.start(&[web_dual(&[(1, 0), (1, 1)], Extra::default())], &[]);
    // A pod on node A to the IPv6 ClusterIP: node B's pods, the pod's
    // address kept, over TCP and UDP.
    let mut seen = BTreeSet::new();
    for _ in 0..16 {
        let a = who6(w.pod(0, 0), tcp6(CLUSTER_IP6, 80));
        assert!(a.pod.starts_with('b'), "{a:?}");
        assert_eq!(*a.peer.ip(), pod_ip6(0, 0), "no SNAT for pod traffic");
        seen.insert(a.pod);
        let u = w
            .pod(0, 0)
            .run(|| udp_who6(tcp6(CLUSTER_IP6, 53)))
            .unwrap()
            .expect("UDP over IPv6");
        assert_eq!(*u.peer.ip(), pod_ip6(0, 0), "{u:?}");
    }
    assert_eq!(seen.len(), 2, "both remote backends: {seen:?}");
    // The outside client to node A's IPv6 NodePort: SNAT to node A's IPv6
    // address with a distinct port per flow, so node B's replies return.
    let np = tcp6(node_ip6(0), NODE_PORT);
    let mut ports = BTreeSet::new();
    for _ in 0..30 {
        let a = who6(&w.c.client, np);
        assert!(a.pod.starts_with('b'), "{a:?}");
        assert_eq!(*a.peer.ip(), node_ip6(0), "SNAT to node A: {a:?}");
        assert!(a.peer.port() >= lb_common::SNAT_PORT_MIN, "{a:?}");
        ports.insert((a.pod, a.peer.port()));
    }
    assert_eq!(ports.len(), 30, "one SNAT port per flow and backend");
    // Megabytes each way, every byte checked.
    w.c.client
        .run(move || tcp_bulk(np, 8 << 20))
        .unwrap()
        .unwrap();
    w.c.client
        .run(move || tcp_upload(np, 8 << 20))
        .unwrap()
        .unwrap();
    // The IPv4 half of the same Service still works beside it.
    let a = who(&w.c.client, tcp(w.node_ip(0), NODE_PORT));
    assert!(a.pod.starts_with('b'), "{a:?}");
}

#[test]
fn ipv6_external_and_load_balancer_ips_with_source_ranges_and_traffic_policy_local() {
    let mut w = World::dual_stack();
    let extra = Extra {
        type_: Some("LoadBalancer"),
        external_traffic_policy: Some("Local"),
        external_ips: vec![external_ip6(1).into()],
        lb_ingress: vec![external_ip6(2).into()],
        source_ranges: vec!["198.18.9.0/24", "fd00:18:0:9::/64"],
        ..Extra::default()
    };
    // a0 on node A (where the fabric sends the external range), b0 on B.
    w.start(&[web_dual(&[(0, 0), (1, 0)], extra)], &[]);
    let lb = tcp6(external_ip6(2), 80);
    for to in [lb, tcp6(external_ip6(1), 80)] {
        for _ in 0..5 {
            // Local: only node A's endpoint, the client's address kept.
            let a = who6(&w.c.client, to);
            assert_eq!(
                (a.pod.as_str(), *a.peer.ip()),
                ("a0", client_ip6()),
                "{to}: {a:?}"
            );
        }
    }
    // A pod of node B is outside the source ranges: dropped.
    let kind = w
        .pod(1, 0)
        .run(move || {
            TcpStream::connect_timeout(&lb.into(), Duration::from_millis(1500))
                .err()
                .map(|e| e.kind())
        })
        .unwrap()
        .expect("a source outside the ranges was let in");
    assert!(
        matches!(kind, ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "{kind:?}"
    );
    // Node B's own datapath drops it, as kube-proxy's rules on every node
    // would: the pod's packet never reaches the fabric.
    assert!(w.agents[1].stat("drop_source_range") >= 1);
}

#[test]
fn ipv6_path_mtu_discovery_works_through_a_smaller_link_both_ways() {
    let mut w = World::dual_stack();
    // The fabric's links to node B and to the client carry 1280 bytes
    // (IPv6's minimum), the ends still believe in 1500. IPv6 routers never
    // fragment: only the fabric's packet too big, about packets node A
    // translated, tells the senders.
    for link in ["n1", "cli"] {
        w.c.fabric
            .ip(&["link", "set", link, "mtu", "1280"])
            .unwrap();
    }
    w.start(&[web_dual(&[(1, 0)], Extra::default())], &[]);
    let np = tcp6(node_ip6(0), NODE_PORT);
    upload_and_download_through_the_small_links(&w, np);
}

/// Refusals over IPv6, both kinds: a Service without endpoints answers
/// ICMPv6 port unreachable itself; a backend's own port unreachable,
/// about a SNATed or DNATed flow, reaches the client translated back.
#[test]
fn ipv6_refusals_reach_the_client_as_connection_refused() {
    let mut w = World::dual_stack();
    let mut dead = web_dual(&[(1, 0)], Extra::default());
    dead.name = "dead";
    dead.cluster_ip = Ipv4Addr::new(198, 19, 0, 12);
    dead.extra.cluster_ip6 = Some(Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x12));
    dead.ports = vec![port_nobody_listens_on()];
    let empty = web_dual(&[], Extra::default());
    w.start(&[dead, empty], &[]);
    let start = Instant::now();
    // The backend refuses, through SNAT (NodePort, remote backend) and
    // without (pod, ClusterIP).
    assert_eq!(
        udp_refused(&w.c.client, tcp6(node_ip6(0), 30054)),
        ErrorKind::ConnectionRefused
    );
    let dead_ip6 = Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x12);
    assert_eq!(
        udp_refused(w.pod(0, 0), tcp6(dead_ip6, 54)),
        ErrorKind::ConnectionRefused
    );
    // No endpoint at all: the datapath refuses, TCP and UDP.
    let kind = w
        .c
        .client
        .run(|| {
            TcpStream::connect_timeout(&tcp6(node_ip6(0), NODE_PORT).into(), Duration::from_secs(2))
                .unwrap_err()
                .kind()
        })
        .unwrap();
    assert_eq!(kind, ErrorKind::ConnectionRefused);
    assert_eq!(
        udp_refused(w.pod(0, 0), tcp6(CLUSTER_IP6, 53)),
        ErrorKind::ConnectionRefused
    );
    assert!(start.elapsed() < Duration::from_secs(4));
    assert!(w.agents[0].stat("icmp_error_nat") >= 2);
    assert!(w.agents[0].stat("reject_no_backend") >= 2);
}

#[test]
fn ipv6_internal_traffic_policy_local_and_session_affinity() {
    let mut w = World::dual_stack();
    let local = web_dual(
        &[(0, 0), (1, 0)],
        Extra {
            internal_traffic_policy: Some("Local"),
            ..Extra::default()
        },
    );
    let mut sticky = web_dual(&[(0, 0), (0, 1), (1, 0), (1, 1)], Extra::default());
    sticky.name = "sticky";
    sticky.cluster_ip = Ipv4Addr::new(198, 19, 0, 13);
    let sticky_ip6 = Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x13);
    sticky.extra.cluster_ip6 = Some(sticky_ip6);
    sticky.affinity_timeout_s = Some(300);
    for p in &mut sticky.ports {
        p.node_port = None;
    }
    w.start(&[local, sticky], &[]);
    // internalTrafficPolicy Local: each node's pods get its own endpoint.
    for _ in 0..10 {
        assert_eq!(who6(w.pod(0, 1), tcp6(CLUSTER_IP6, 80)).pod, "a0");
        assert_eq!(who6(w.pod(1, 1), tcp6(CLUSTER_IP6, 80)).pod, "b0");
    }
    // ClientIP affinity: every connection of a client to the same pod,
    // whichever node's datapath chose it.
    for client in [w.pod(0, 1), w.pod(1, 1)] {
        let first = who6(client, tcp6(sticky_ip6, 80)).pod;
        for _ in 0..15 {
            assert_eq!(who6(client, tcp6(sticky_ip6, 80)).pod, first);
        }
    }
    assert!(w.agents[0].stat("dnat_affinity") >= 15);
}
