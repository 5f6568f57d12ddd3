//! TC with and without TCX. Kernels before 6.6 have no TCX: the agent adds
//! a clsact qdisc where there is none and a direct-action filter of its
//! own. This kernel has TCX, so these tests ask for the other way with
//! `--tc-attach netlink` (the kernel matrix, `cargo xtask test-kernels`,
//! runs the same agent on 6.1, where it is chosen by the probe).
//!
//! What is checked: traffic is balanced through the filters; cleanup
//! removes exactly the filters and qdiscs the agent added, never another
//! tool's; a start that fails leaves nothing attached, in either mode;
//! switching mode across a restart cuts no stream.

use std::net::SocketAddrV4;

use aya::programs::TcAttachType::{Egress, Ingress};
use lb_tests::{
    agent::{clsact_filters, has_clsact, lb_in, tc_programs, ConfigFile},
    cluster::{node_name, pod_ip, Cluster},
    example::{yaml, Endpoint, Svc},
    netns::{sh, Netns},
    servers::{tcp_who, udp_who, PodServer, StreamReader},
};

const PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);
const SOME: u64 = 256 * 1024;

fn netlink() -> Vec<String> {
    vec!["--tc-attach".into(), "netlink".into()]
}

/// One node with two serving pods; `web` on both.
fn world() -> (Cluster, Vec<PodServer>, ConfigFile) {
    lb_tests::require_root();
    let c = Cluster::new(&[2]).expect("cluster");
    let servers = c.start_servers().expect("servers");
    let eps = (0..2)
        .map(|i| Endpoint::ready(pod_ip(0, i)).on(&node_name(0)))
        .collect();
    let config = ConfigFile::new(&yaml(&[Svc::web(eps)])).unwrap();
    (c, servers, config)
}

fn cluster_ip() -> SocketAddrV4 {
    SocketAddrV4::new(std::net::Ipv4Addr::new(198, 19, 0, 10), 80)
}

fn cluster_ip_udp() -> SocketAddrV4 {
    SocketAddrV4::new(std::net::Ipv4Addr::new(198, 19, 0, 10), 53)
}

/// A tool of someone else's on `iface`: a clsact qdisc with a u32 filter.
fn foreign_filter(ns: &Netns, iface: &str) {
    ns.exec("tc", &["qdisc", "add", "dev", iface, "clsact"])
        .unwrap();
    ns.exec(
        "tc",
        &[
            "filter", "add", "dev", iface, "ingress", "prio", "5", "protocol", "ip", "u32",
            "match", "u32", "0", "0", "classid", "1:1",
        ],
    )
    .unwrap();
}

fn foreign_filter_is_there(ns: &Netns, iface: &str) -> bool {
    has_clsact(ns, iface)
        && clsact_filters(ns, iface, Ingress)
            .iter()
            .any(|f| f.kind == "u32" && f.priority == 5)
}

/// No program of ours on any TC hook of the node, and no qdisc left but
/// the one another tool added on `theirs`.
fn nothing_of_ours_left(node: &lb_tests::cluster::Node, theirs: &str, what: &str) {
    for iface in node.tc_ifaces() {
        for dir in [Ingress, Egress] {
            let left = tc_programs(&node.ns, &iface, dir);
            assert!(left.is_empty(), "{what}: {iface} {dir:?}: {left:?}");
        }
        if iface != theirs {
            assert!(
                !has_clsact(&node.ns, &iface),
                "{what}: qdisc left on {iface}"
            );
        }
    }
}

#[test]
fn services_are_balanced_through_clsact_filters_without_tcx() {
    let (c, _servers, config) = world();
    let node = &c.nodes[0];
    let mut agents = c.start_agents(&config.path, &netlink()).unwrap();
    let agent = &agents[0];
    assert!(
        agent
            .logs()
            .iter()
            .any(|l| l.contains("TC programs attach as clsact filters")),
        "{:?}",
        agent.logs()
    );
    for iface in node.tc_ifaces() {
        assert_eq!(
            tc_programs(&node.ns, &iface, Ingress),
            ["lb_tc_ingress"],
            "{iface}"
        );
        assert_eq!(
            tc_programs(&node.ns, &iface, Egress),
            ["lb_tc_egress"],
            "{iface}"
        );
        // Not TCX: the filter is the only attachment.
        assert!(lb_tests::agent::tcx_programs(&node.ns, &iface, Ingress).is_empty());
        let f = &clsact_filters(&node.ns, &iface, Ingress)[0];
        assert!(f.qdisc_ours(), "{iface}: the agent added the qdisc");
    }
    // A pod of the node reaches the ClusterIP over TCP and UDP, spread
    // over both pods; a client off the node reaches the NodePort.
    let pod = &node.pods[0].ns;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..24 {
        seen.insert(pod.run(|| tcp_who(cluster_ip())).unwrap().unwrap().pod);
        seen.insert(pod.run(|| udp_who(cluster_ip_udp())).unwrap().unwrap().pod);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    let np = SocketAddrV4::new(node.ip, 30080);
    c.client.run(move || tcp_who(np)).unwrap().unwrap();
    assert!(agents[0].stat("dnat_new") > 0);
    let status = agents[0].status();
    assert!(
        status.contains("TC attachment: clsact filters (netlink)"),
        "{status}"
    );
    assert!(
        status.contains("eth0             tc_egress tc_ingress"),
        "{status}"
    );
    agents.clear();
}

#[test]
fn cleanup_removes_only_our_filters_and_the_qdiscs_we_added() {
    let (c, _servers, config) = world();
    let node = &c.nodes[0];
    // Pod 1's veth already has another tool's qdisc and filter.
    let theirs = node.pods[1].host_iface.clone();
    foreign_filter(&node.ns, &theirs);

    for how in ["--cleanup-on-exit", "lb cleanup"] {
        let mut extra = netlink();
        if how == "--cleanup-on-exit" {
            extra.push(how.into());
        }
        let mut agents = c.start_agents(&config.path, &extra).unwrap();
        let mut agent = agents.pop().unwrap();
        // Ours sits before theirs on the shared qdisc, which we did not add.
        let on_theirs = clsact_filters(&node.ns, &theirs, Ingress);
        assert!(on_theirs[0].is_ours(&["lb_tc_ingress"]) && !on_theirs[0].qdisc_ours());
        assert!(
            on_theirs[1..].iter().all(|f| f.kind == "u32"),
            "{on_theirs:?}"
        );
        agent.stop_with(nix::sys::signal::Signal::SIGTERM).unwrap();
        if how == "lb cleanup" {
            assert_eq!(tc_programs(&node.ns, "eth0", Ingress), ["lb_tc_ingress"]);
            sh(lb_in(&node.ns)
                .args(["cleanup", "--pin-dir"])
                .arg(&agent.pin_dir))
            .unwrap();
        }
        nothing_of_ours_left(node, &theirs, how);
        assert!(
            foreign_filter_is_there(&node.ns, &theirs),
            "{how}: another tool's qdisc or filter was removed"
        );
        // Nothing of ours translates any more.
        let pod = &node.pods[0].ns;
        assert!(pod.run(|| tcp_who(cluster_ip())).unwrap().is_err(), "{how}");
    }
}

/// A start that fails after attaching (here: the cgroup for the socket
/// hooks does not exist) takes back what it attached, in both modes.
#[test]
fn a_failed_start_leaves_no_program_attached() {
    let (c, _servers, config) = world();
    let node = &c.nodes[0];
    let theirs = node.pods[1].host_iface.clone();
    foreign_filter(&node.ns, &theirs);
    for mode in ["tcx", "netlink"] {
        let extra = vec![
            "--tc-attach".to_string(),
            mode.into(),
            "--cgroup".into(),
            "/nonexistent-cgroup".into(),
        ];
        let pin_dir =
            std::path::PathBuf::from(format!("/sys/fs/bpf/{}", lb_tests::netns::unique("lbfail")));
        let mut args = vec!["--config".to_string(), config.path.display().to_string()];
        args.extend(["--node-ip".into(), node.ip.to_string()]);
        args.extend(extra);
        let mut agent = lb_tests::agent::Agent::spawn(&node.ns, &pin_dir, &args).unwrap();
        let status = agent.wait_exit(PATIENCE).unwrap();
        assert!(!status.success(), "{mode}");
        let logs = agent.logs().join("\n");
        assert!(logs.contains("/nonexistent-cgroup"), "{mode}: {logs}");
        assert!(
            logs.contains("attached"),
            "{mode}: it got as far as attaching: {logs}"
        );
        nothing_of_ours_left(node, &theirs, mode);
        assert!(foreign_filter_is_there(&node.ns, &theirs), "{mode}");
        assert!(
            lb_userspace::kernel::pins::pinned_links(&pin_dir).is_empty(),
            "{mode}"
        );
    }
}

/// A restart that changes how TC attaches (say `--tc-attach` set, or the
/// node's kernel upgraded in place) attaches the new way first and only
/// then removes the old: streams keep flowing.
#[test]
fn switching_between_tcx_and_clsact_filters_across_restarts_cuts_no_stream() {
    let (c, _servers, config) = world();
    let node = &c.nodes[0];
    let mut agents = c.start_agents(&config.path, &[]).unwrap();
    let mut agent = agents.pop().unwrap();
    let stream = StreamReader::open(&node.pods[0].ns, cluster_ip()).unwrap();
    stream.wait_for_more(SOME, PATIENCE).unwrap();
    let mut tcx_args = agent.args.clone();
    let mut netlink_args = agent.args.clone();
    tcx_args.extend(["--tc-attach".into(), "tcx".into()]);
    netlink_args.extend(netlink());
    for (args, want_tcx) in [
        (netlink_args.clone(), false),
        (tcx_args, true),
        (netlink_args, false),
    ] {
        agent.restart(Some(args)).unwrap();
        let tcx = lb_tests::agent::tcx_programs(&node.ns, "eth0", Ingress);
        let filters = clsact_filters(&node.ns, "eth0", Ingress);
        if want_tcx {
            assert_eq!((tcx.len(), filters.len()), (1, 0));
            assert!(!has_clsact(&node.ns, "eth0"), "the qdisc we added is gone");
        } else {
            assert_eq!((tcx.len(), filters.len()), (0, 1));
        }
        stream.wait_for_more(SOME, PATIENCE).unwrap();
    }
    stream.finish().unwrap();
}
