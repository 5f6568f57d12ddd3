//! The Kubernetes e2e tests that exercise the proxy, reproduced on our
//! namespace harness with the real `lb run`: each test names the upstream
//! test (kubernetes/kubernetes, test/e2e/network/) in its doc comment and
//! checks what that test asserts. Tests the harness cannot express are
//! listed in the README with the reason.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_tests::{
    agent::{Agent, ConfigFile},
    example::{yaml, Endpoint, Svc},
    netns::Netns,
    servers::{tcp_who, PodServer},
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
    ns.run(move || tcp_who(to))
        .unwrap()
        .unwrap_or_else(|e| panic!("connecting to {to}: {e}"))
        .pod
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

fn affinity_world() -> (World, ConfigFile, Agent) {
    let w = World::new(3);
    let mut svc = w.web();
    svc.affinity_timeout_s = Some(AFFINITY_TIMEOUT_S);
    let config = ConfigFile::new(&yaml(&[svc])).unwrap();
    let agent = Agent::start(&w.topo, &config.path).unwrap();
    (w, config, agent)
}

/// [sig-network] Services should have session affinity timeout work for
/// service with type clusterIP [LinuxOnly]
#[test]
fn should_have_session_affinity_timeout_work_for_service_with_type_cluster_ip() {
    let (w, _config, _agent) = affinity_world();
    let cluster_ip = SocketAddrV4::new(w.web().cluster_ip, 80);
    affinity_times_out(w.client_pod(), cluster_ip);
}

/// [sig-network] Services should have session affinity timeout work for
/// NodePort service [LinuxOnly]
#[test]
fn should_have_session_affinity_timeout_work_for_node_port_service() {
    let (w, _config, _agent) = affinity_world();
    affinity_times_out(&w.topo.client, SocketAddrV4::new(NODE_IP, 30080));
}
