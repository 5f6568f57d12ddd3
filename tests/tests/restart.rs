//! Restarts and upgrades that cut nothing: on SIGTERM the agent leaves its
//! programs attached (pinned links) and its maps pinned; the next agent
//! adopts them, keeps every service and backend id, swaps its programs in,
//! and deletes only what is stale. Real streams run through the datapath
//! the whole time, on the virtual two-node cluster.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    time::Duration,
};

use lb_tests::{
    agent::{lb_bin, Agent, ConfigFile},
    cluster::{node_name, pod_ip, Cluster},
    example::{yaml, Endpoint, Svc},
    netns::{sh, Netns},
    servers::{tcp_who, PodServer, StreamReader},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const NODE_PORT: u16 = 30080;
/// Enough data to be sure packets flowed, small enough for a loaded VM.
const SOME: u64 = 256 * 1024;
const PATIENCE: Duration = Duration::from_secs(10);

struct World {
    c: Cluster,
    _servers: Vec<PodServer>,
    config: ConfigFile,
}

/// Two nodes, two serving pods each; `web` on the pods given as (node, pod).
fn world(endpoints: &[(usize, usize)]) -> World {
    lb_tests::require_root();
    let c = Cluster::new(&[2, 2]).expect("cluster");
    let servers = c.start_servers().expect("servers");
    let config = ConfigFile::new(&yaml(&[web(endpoints)])).unwrap();
    World {
        c,
        _servers: servers,
        config,
    }
}

fn web(endpoints: &[(usize, usize)]) -> Svc {
    Svc::web(
        endpoints
            .iter()
            .map(|&(n, i)| Endpoint::ready(pod_ip(n, i)).on(&node_name(n)))
            .collect(),
    )
}

impl World {
    /// The agent of node A only (node B forwards nothing in these tests).
    fn agent_a(&self, extra: &[String]) -> Agent {
        let mut agents = self
            .c
            .start_agents(&self.config.path, extra)
            .expect("agents");
        agents.truncate(1);
        agents.pop().unwrap()
    }

    fn pod(&self, node: usize, i: usize) -> &Netns {
        &self.c.nodes[node].pods[i].ns
    }

    fn node_port(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.c.nodes[0].ip, NODE_PORT)
    }
}

fn cluster_ip() -> SocketAddrV4 {
    SocketAddrV4::new(CLUSTER_IP, 80)
}

/// TC ingress programs attached at `iface` in `ns`, by name (TCX links
/// and clsact filters).
fn attached(ns: &Netns, iface: &str) -> Vec<String> {
    lb_tests::agent::tc_programs(ns, iface, aya::programs::TcAttachType::Ingress)
}

/// TC without TCX, as on kernels before 6.6 (this kernel has TCX; the
/// agent is told to use clsact filters instead).
fn netlink() -> Vec<String> {
    vec!["--tc-attach".into(), "netlink".into()]
}

#[test]
fn established_streams_survive_an_agent_restart_and_flow_while_no_agent_runs() {
    streams_survive_a_restart(&[]);
}

/// The same through clsact filters: the next agent replaces the program
/// in each filter in place.
#[test]
fn established_streams_survive_a_restart_with_tc_filters_replaced_in_place() {
    streams_survive_a_restart(&netlink());
}

fn streams_survive_a_restart(extra: &[String]) {
    // Backends on node B only: the NodePort stream is SNATed by node A, the
    // ClusterIP stream from a pod of node A is DNATed.
    let w = world(&[(1, 0), (1, 1)]);
    let mut agent = w.agent_a(extra);
    let node = &w.c.nodes[0].ns;
    let filters_before =
        lb_tests::agent::clsact_filters(node, "eth0", aya::programs::TcAttachType::Ingress);
    let snat = StreamReader::open(&w.c.client, w.node_port()).unwrap();
    let dnat = StreamReader::open(w.pod(0, 0), cluster_ip()).unwrap();
    for s in [&snat, &dnat] {
        s.wait_for_more(SOME, PATIENCE).unwrap();
    }

    let status = agent.stop_with(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(status.success());
    assert!(
        agent
            .logs()
            .iter()
            .any(|l| l.contains("datapath left running for the next agent")),
        "{:?}",
        agent.logs()
    );
    // No agent at all: the pinned links and maps keep both streams going,
    // and new connections are balanced too.
    assert_eq!(attached(&w.c.nodes[0].ns, "eth0"), ["lb_tc_ingress"]);
    for s in [&snat, &dnat] {
        s.wait_for_more(SOME, PATIENCE).unwrap();
    }
    let a = w.c.client.run(move || tcp_who(w_node_port())).unwrap();
    assert!(a.is_ok(), "new NodePort connection while stopped: {a:?}");

    agent.start_again(None).unwrap();
    let logs = agent.logs().join("\n");
    assert!(
        logs.contains("adopting the datapath a previous agent left running"),
        "{logs}"
    );
    assert!(logs.contains("replaced the programs in place"), "{logs}");
    assert!(logs.contains("kept=2 deleted=0"), "{logs}");
    assert!(!logs.contains("recreating"), "{logs}");
    // Exactly one program per interface: swapped, not stacked.
    assert_eq!(attached(&w.c.nodes[0].ns, "eth0"), ["lb_tc_ingress"]);
    let filters_after =
        lb_tests::agent::clsact_filters(node, "eth0", aya::programs::TcAttachType::Ingress);
    if extra.is_empty() {
        assert!(filters_before.is_empty() && filters_after.is_empty());
    } else {
        // The same filter (priority, handle) now runs the new program.
        let (b, a) = (&filters_before[0], &filters_after[0]);
        assert_eq!((filters_before.len(), filters_after.len()), (1, 1));
        assert_eq!((b.priority, b.handle), (a.priority, a.handle));
        assert_ne!(b.program_id, a.program_id, "the program was not replaced");
    }
    for s in [&snat, &dnat] {
        s.wait_for_more(SOME, PATIENCE).unwrap();
    }
    let established = agent.stat("dnat_established");
    assert!(established > 0);
    let (snat_backend, dnat_backend) = (snat.backend.clone(), dnat.backend.clone());
    let (a, b) = (snat.finish().unwrap(), dnat.finish().unwrap());
    eprintln!("streams: {snat_backend} {a} bytes (SNAT), {dnat_backend} {b} bytes (DNAT)");
}

/// Node A's NodePort (a fn so the closure above can be 'static).
fn w_node_port() -> SocketAddrV4 {
    SocketAddrV4::new(lb_tests::cluster::node_ip(0), NODE_PORT)
}

#[test]
fn a_restart_that_changes_the_backend_set_keeps_streams_whose_backend_remains() {
    let w = world(&[(1, 0), (1, 1)]);
    let mut agent = w.agent_a(&[]);
    // Streams until both backends carry one.
    let mut streams = Vec::new();
    for _ in 0..16 {
        streams.push(StreamReader::open(&w.c.client, w.node_port()).unwrap());
        let names: std::collections::BTreeSet<&str> =
            streams.iter().map(|s| s.backend.as_str()).collect();
        if names.len() == 2 {
            break;
        }
    }
    let kept = streams
        .iter()
        .position(|s| s.backend == "b0")
        .expect("a stream on b0");
    let kept = streams.swap_remove(kept);
    kept.wait_for_more(SOME, PATIENCE).unwrap();

    // While the agent is down, b1 leaves and a0 (on node A) joins.
    agent.stop_with(nix::sys::signal::Signal::SIGTERM).unwrap();
    w.config.replace(&yaml(&[web(&[(1, 0), (0, 0)])])).unwrap();
    agent.start_again(None).unwrap();
    let logs = agent.logs().join("\n");
    assert!(logs.contains("kept=2 deleted=0"), "{logs}");

    kept.wait_for_more(SOME, PATIENCE).unwrap();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..40 {
        let a =
            w.c.client
                .run(move || tcp_who(w_node_port()))
                .unwrap()
                .expect("new connection");
        *seen.entry(a.pod).or_default() += 1;
    }
    assert!(
        !seen.contains_key("b1"),
        "the removed backend got new flows: {seen:?}"
    );
    assert_eq!(seen.len(), 2, "b0 and a0 share new flows: {seen:?}");
    kept.wait_for_more(SOME, PATIENCE).unwrap();
    kept.finish().unwrap();
}

#[test]
fn cleanup_on_exit_and_lb_cleanup_detach_and_unpin_everything() {
    cleanup_detaches_everything(&[]);
}

#[test]
fn cleanup_on_exit_and_lb_cleanup_remove_tc_filters_and_the_qdisc_added() {
    cleanup_detaches_everything(&netlink());
}

fn cleanup_detaches_everything(extra: &[String]) {
    let w = world(&[(0, 0)]);
    let node = &w.c.nodes[0].ns;
    let mut cleanup = vec!["--cleanup-on-exit".to_string()];
    cleanup.extend_from_slice(extra);

    // --cleanup-on-exit: SIGTERM and SIGINT both detach and unpin.
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let mut agent = w.agent_a(&cleanup);
        assert_eq!(attached(node, "eth0"), ["lb_tc_ingress"]);
        let status = agent.stop_with(signal).unwrap();
        assert!(status.success(), "{signal}: {status}");
        assert!(attached(node, "eth0").is_empty(), "{signal}");
        assert!(
            !lb_tests::agent::has_clsact(node, "eth0"),
            "{signal}: qdisc left"
        );
        assert!(!agent.pin_dir.exists(), "{signal}: pins left");
        let after = w.c.client.run(|| tcp_who(w_node_port())).unwrap();
        assert!(
            after.is_err(),
            "{signal}: NodePort still translated after exit"
        );
    }

    // Without it the datapath stays; `lb cleanup` removes it, and refuses
    // while an agent runs.
    let mut agent = w.agent_a(extra);
    let pin_dir = agent.pin_dir.clone();
    let running = Command::new(lb_bin())
        .args(["cleanup", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .unwrap();
    assert!(!running.status.success());
    assert!(
        String::from_utf8_lossy(&running.stderr).contains("another lb agent is already running")
    );
    agent.stop_with(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(attached(node, "eth0"), ["lb_tc_ingress"]);
    assert!(pin_dir.join("lb_frontends").exists());
    assert_eq!(pin_dir.join("links").exists(), extra.is_empty());
    w.c.client
        .run(|| tcp_who(w_node_port()))
        .unwrap()
        .expect("still served with no agent");
    sh(lb_tests::agent::lb_in(node)
        .args(["cleanup", "--pin-dir"])
        .arg(&pin_dir))
    .unwrap();
    assert!(attached(node, "eth0").is_empty());
    assert!(!lb_tests::agent::has_clsact(node, "eth0"), "qdisc left");
    assert!(!pin_dir.exists(), "pins left in {}", pin_dir.display());
}

#[test]
fn interfaces_no_longer_asked_for_are_detached_on_restart() {
    let w = world(&[(0, 0)]);
    let node = &w.c.nodes[0].ns;
    let mut agent = w.agent_a(&[]);
    let pod_iface = w.c.nodes[0].pods[1].host_iface.clone();
    assert_eq!(attached(node, &pod_iface), ["lb_tc_ingress"]);
    // The same agent told to leave the second pod's interface alone.
    let mut args = agent.args.clone();
    args.extend(["--exclude-iface".to_string(), pod_iface.clone()]);
    agent.restart(Some(args)).unwrap();
    assert!(attached(node, &pod_iface).is_empty());
    assert_eq!(attached(node, "eth0"), ["lb_tc_ingress"]);
    let logs = agent.logs().join("\n");
    assert!(logs.contains(&format!("link=tc_{pod_iface}")), "{logs}");
    assert!(
        logs.contains(&format!("link=tcegress_{pod_iface}")),
        "{logs}"
    );
}

#[test]
fn maps_of_an_incompatible_layout_are_recreated_and_the_service_works() {
    let w = world(&[(0, 0)]);
    let node = &w.c.nodes[0];
    let pin_dir =
        std::path::PathBuf::from(format!("/sys/fs/bpf/{}", lb_tests::netns::unique("lbold")));
    std::fs::create_dir_all(&pin_dir).unwrap();
    // An "older agent's" lb_frontends: another value size.
    sh(Command::new("bpftool")
        .args(["map", "create"])
        .arg(pin_dir.join("lb_frontends"))
        .args([
            "type",
            "hash",
            "key",
            "12",
            "value",
            "8",
            "entries",
            "1024",
            "name",
            "lb_frontends",
        ]))
    .unwrap();
    let args = vec![
        "--config".to_string(),
        w.config.path.display().to_string(),
        "--node-ip".into(),
        node.ip.to_string(),
        "--node-name".into(),
        node.name.clone(),
    ];
    let mut agent = Agent::spawn(&node.ns, &pin_dir, &args).unwrap();
    agent.wait_for_log("datapath ready", PATIENCE).unwrap();
    let line = agent
        .wait_for_log("recreating every map", PATIENCE)
        .unwrap();
    assert!(
        line.contains("lb_frontends") && line.contains("value size 8"),
        "{line}"
    );
    w.c.client
        .run(|| tcp_who(w_node_port()))
        .unwrap()
        .expect("served after recreating the maps");
}
