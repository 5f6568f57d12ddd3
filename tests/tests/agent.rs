//! The agent's own behaviour, with the real binary: following the config
//! file, bad input, one agent per pin directory, and the errors a
//! user can hit at start-up.

use std::{
    net::SocketAddrV4,
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{lb_bin, Agent, ConfigFile},
    example::{yaml, Endpoint, Svc},
    netns::unique,
    servers::{tcp_who, PodServer},
    topology::{Topology, NODE_IP},
};

fn setup(backends: usize) -> (Topology, Vec<PodServer>) {
    lb_tests::require_root();
    let topo = Topology::new(backends).unwrap();
    let servers = topo.start_servers(backends).unwrap();
    (topo, servers)
}

fn web(topo: &Topology) -> Svc {
    Svc::web(topo.pods.iter().map(|p| Endpoint::ready(p.ip)).collect())
}

fn node_port(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(NODE_IP, port)
}

#[test]
fn an_in_place_rewrite_is_applied_within_a_second_and_touches_only_what_changed() {
    let (topo, _servers) = setup(2);
    let config = ConfigFile::new(&yaml(&[web(&topo)])).unwrap();
    let mut agent = Agent::start(&topo, &config.path).unwrap();
    let web_lines = agent.count_logs("service=demo/web");
    assert_eq!(web_lines, 2, "one line per service port");

    let t = Instant::now();
    config
        .rewrite(&yaml(&[web(&topo), Svc::api(topo.pods[1].ip)]))
        .unwrap();
    agent
        .wait_for_log("applied config", Duration::from_secs(3))
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "applied after {:?}",
        t.elapsed()
    );
    let applied = agent
        .wait_for_log("applied config", Duration::ZERO)
        .unwrap();
    assert!(
        applied.contains("added=1") && applied.contains("changed=0"),
        "{applied}"
    );
    assert_eq!(
        agent.count_logs("service=demo/web"),
        web_lines,
        "the unchanged service was not rewritten"
    );
    let a = topo
        .client
        .run(|| tcp_who(node_port(30443)))
        .unwrap()
        .unwrap();
    assert_eq!(a.pod, "pod-2");
}

#[test]
fn a_bad_file_keeps_the_last_good_state() {
    let (topo, _servers) = setup(1);
    let config = ConfigFile::new(&yaml(&[web(&topo)])).unwrap();
    let mut agent = Agent::start(&topo, &config.path).unwrap();
    config
        .rewrite("apiVersion: v1\nkind: List\nitems: [ {unclosed\n")
        .unwrap();
    let line = agent
        .wait_for_log("keeping the last good state", Duration::from_secs(3))
        .unwrap();
    assert!(line.contains("YAML syntax error"), "{line}");
    topo.client
        .run(|| tcp_who(node_port(30080)))
        .unwrap()
        .expect("still served");
    // A file that disappears for a moment (an editor's save) changes nothing either.
    std::fs::remove_file(&config.path).unwrap();
    agent
        .wait_for_nth_log("keeping the last good state", 2, Duration::from_secs(3))
        .unwrap();
    topo.client
        .run(|| tcp_who(node_port(30080)))
        .unwrap()
        .expect("still served");
    config.replace(&yaml(&[web(&topo)])).unwrap();
    agent
        .wait_for_log("applied config", Duration::from_secs(3))
        .unwrap();
}

/// Connections to `to` from the client, one after another, until `stop`:
/// (answered, refused or failed).
fn probe_until(
    topo: &Topology,
    to: SocketAddrV4,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u32, u32)> {
    topo.client
        .spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match tcp_who(to) {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        })
        .unwrap()
}

/// `kubectl get svc,endpointslices -A -o yaml > services.yaml` truncates
/// the file, waits for the API, then writes: the agent applies neither the
/// empty moment nor a half-written file.
#[test]
fn truncating_rewrites_refuse_no_connection() {
    use std::io::Write;
    let (topo, _servers) = setup(2);
    let text = yaml(&[web(&topo)]);
    let config = ConfigFile::new(&text).unwrap();
    let agent = Agent::start(&topo, &config.path).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = probe_until(&topo, node_port(30080), stop.clone());
    let half = text.len() / 2;
    for _ in 0..8 {
        let mut f = std::fs::File::create(&config.path).unwrap();
        // The API takes its time: the agent sees the empty file settle.
        std::thread::sleep(Duration::from_millis(700));
        f.write_all(&text.as_bytes()[..half]).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        f.write_all(&text.as_bytes()[half..]).unwrap();
        drop(f);
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = prober.join().unwrap();
    assert_eq!(failed, 0, "{ok} answered, {failed} refused or failed");
    assert!(ok > 50, "only {ok} probes answered");
    assert!(agent.count_logs("is empty: keeping every service") >= 1);
    // The same content each time: nothing was removed or rewritten (one
    // "programmed" line per service port, from the start).
    assert_eq!(
        agent.count_logs("service=demo/web"),
        2,
        "{:?}",
        agent.logs()
    );
}

/// An emptied file is taken at its word only after it stays empty.
#[test]
fn an_emptied_file_removes_the_services_after_the_grace() {
    let (topo, _servers) = setup(1);
    let config = ConfigFile::new(&yaml(&[web(&topo)])).unwrap();
    let mut agent = Agent::start(&topo, &config.path).unwrap();
    let t = Instant::now();
    config.rewrite("").unwrap();
    agent
        .wait_for_log("is empty: keeping every service", Duration::from_secs(3))
        .unwrap();
    topo.client
        .run(|| tcp_who(node_port(30080)))
        .unwrap()
        .expect("still served while the file may be being written");
    let line = agent
        .wait_for_log(
            "has stayed empty for 5 s",
            lb_tests::patience(Duration::from_secs(10)),
        )
        .unwrap();
    assert!(line.contains("removing every service"), "{line}");
    assert!(
        t.elapsed() >= lb_userspace::source::EMPTY_GRACE,
        "after {:?}",
        t.elapsed()
    );
    agent
        .wait_for_line(
            |l| l.contains("service=demo/web") && l.contains("removed"),
            1,
            "demo/web removed",
            Duration::from_secs(3),
        )
        .unwrap();
    assert!(
        topo.client
            .run(|| tcp_who(node_port(30080)))
            .unwrap()
            .is_err(),
        "removed"
    );
}

#[test]
fn an_invalid_object_is_skipped_alone_with_a_log_line_naming_it() {
    let (topo, _servers) = setup(1);
    let mut bad = Svc::api(topo.pods[0].ip);
    bad.name = "broken";
    bad.ports[0].node_port = Some(30080); // the NodePort web already uses
    let text = yaml(&[web(&topo), bad]).replace("198.19.0.11", "198.19.0.300");
    let config = ConfigFile::new(&text).unwrap();
    let agent = Agent::start(&topo, &config.path).unwrap();
    let rejected: Vec<String> = agent
        .logs()
        .into_iter()
        .filter(|l| l.contains("rejected"))
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0].contains("Service demo/broken") && rejected[0].contains("198.19.0.300"),
        "{}",
        rejected[0]
    );
    topo.client
        .run(|| tcp_who(node_port(30080)))
        .unwrap()
        .expect("the valid service works");
}

/// Names of the TCX ingress programs on the node's NIC (bpftool 7.1
/// predates TCX, so we ask the kernel through aya from inside the node).
#[test]
fn a_second_agent_on_the_same_pin_dir_refuses_to_start() {
    let (topo, _servers) = setup(1);
    let config = ConfigFile::new(&yaml(&[web(&topo)])).unwrap();
    let first = Agent::start(&topo, &config.path).unwrap();
    let args: Vec<String> = [
        "--config",
        &config.path.display().to_string(),
        "--iface",
        "eth0",
        "--node-ip",
        "198.18.0.2",
        "--node-name",
        "n",
    ]
    .map(String::from)
    .to_vec();
    let mut second = Agent::spawn(&topo.node, &first.pin_dir, &args).unwrap();
    let status = second.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(!status.success());
    let logs = second.logs().join("\n");
    assert!(
        logs.contains("another lb agent is already running with pin directory"),
        "{logs}"
    );
    // The first one is untouched.
    topo.client
        .run(|| tcp_who(node_port(30080)))
        .unwrap()
        .expect("first agent still serving");
}

/// Runs `lb run` with `args` (in the root namespace: every case here fails
/// before touching an interface) and returns its exit status and stderr.
fn lb_fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "lb should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn run_args(config: &str, iface: &str) -> Vec<String> {
    run_args_pinned(config, iface, &format!("/sys/fs/bpf/{}", unique("lberr")))
}

fn run_args_pinned(config: &str, iface: &str, pin: &str) -> Vec<String> {
    [
        "run",
        "--config",
        config,
        "--iface",
        iface,
        "--node-ip",
        "198.18.0.2",
        "--node-name",
        "n",
        "--pin-dir",
        pin,
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn startup_errors_say_what_to_do() {
    lb_tests::require_root();
    let config = ConfigFile::new("apiVersion: v1\nkind: List\nitems: []\n").unwrap();
    let path = config.path.display().to_string();

    let e = lb_fails(Command::new(lb_bin()).args(run_args("/nonexistent/services.yaml", "lo")));
    assert!(
        e.contains("cannot read config file /nonexistent/services.yaml"),
        "{e}"
    );

    let e = lb_fails(Command::new(lb_bin()).args(run_args(&path, "no-such-if0")));
    assert!(
        e.contains("interface \"no-such-if0\" does not exist"),
        "{e}"
    );

    // Without privileges: an unprivileged user, every capability dropped.
    let e = lb_fails(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(lb_bin())
            .args(run_args(&path, "lo")),
    );
    assert!(
        e.contains("needs CAP_BPF and CAP_NET_ADMIN") && e.contains("run it as root"),
        "{e}"
    );

    let not_bpffs = std::env::temp_dir().join(unique("not-bpffs")).join("lb");
    let e = lb_fails(Command::new(lb_bin()).args(run_args_pinned(
        &path,
        "lo",
        &not_bpffs.display().to_string(),
    )));
    assert!(e.contains("is not on a bpf filesystem"), "{e}");

    // SNAT ports a local socket could also get.
    let mut args = run_args(&path, "lo");
    args.extend(["--snat-ports".to_string(), "40000-50000".to_string()]);
    let e = lb_fails(Command::new(lb_bin()).args(args));
    assert!(
        e.contains("overlaps this node's ephemeral ports")
            && e.contains("net.ipv4.ip_local_port_range")
            && e.contains("Give --snat-ports outside it"),
        "{e}"
    );
}

/// The NodePort range is added to the node's reserved ports (what was
/// there stays), so the node's own sockets never get a local port there;
/// the root namespace's setting is untouched.
#[test]
fn the_node_port_range_is_reserved_for_node_ports() {
    let (topo, _servers) = setup(1);
    let read = |ns: Option<&lb_tests::netns::Netns>| match ns {
        Some(ns) => ns
            .exec("cat", &["/proc/sys/net/ipv4/ip_local_reserved_ports"])
            .unwrap(),
        None => std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap(),
    };
    let root_before = read(None);
    topo.node
        .sysctl("net.ipv4.ip_local_reserved_ports", "8080")
        .unwrap();
    let config = ConfigFile::new(&yaml(&[web(&topo)])).unwrap();
    let agent = Agent::start(&topo, &config.path).unwrap();
    assert_eq!(read(Some(&topo.node)).trim(), "8080,30000-32767");
    assert!(agent
        .logs()
        .iter()
        .any(|l| l.contains("reserved the NodePort range")));
    assert_eq!(read(None), root_before);
}

#[test]
fn bpftool_dumps_pinned_maps_with_named_fields() {
    let (topo, _servers) = setup(1);
    let config = ConfigFile::new(&yaml(&[web(&topo)])).unwrap();
    let agent = Agent::start(&topo, &config.path).unwrap();
    let dump = |map: &str| {
        lb_tests::netns::sh(
            Command::new("bpftool")
                .args(["map", "dump", "pinned"])
                .arg(agent.pin_dir.join(map)),
        )
        .unwrap()
    };
    let frontends = dump("lb_frontends");
    for field in [
        "\"octets\": [0,0,0,0,0,0,0,0,0,0,255,255,198,19,0,10",
        "\"port\": 80",
        "\"proto\": 6",
        "\"backend_count\": 1",
        "\"table_size\": 251",
    ] {
        assert!(
            frontends.contains(field),
            "{field} missing from:\n{frontends}"
        );
    }
    topo.client
        .run(|| tcp_who(node_port(30080)))
        .unwrap()
        .unwrap();
    assert_eq!(agent.stat("dnat_new"), 1);
    let ct = dump("lb_ct_tcp");
    for field in [
        "\"octets\": [0,0,0,0,0,0,0,0,0,0,255,255,198,18,0,1",
        "\"nat_port\": 8080",
        "\"nat_port\": 30080",
        "\"direction\": 1",
        "\"direction\": 2",
    ] {
        assert!(ct.contains(field), "{field} missing from:\n{ct}");
    }
}

/// Guard for the test rules: the harness's sysctls land in the test's own
/// namespace, never in the root namespace.
#[test]
fn harness_sysctls_stay_in_the_test_namespace() {
    lb_tests::require_root();
    let ns = lb_tests::netns::Netns::new(unique("lbsys")).unwrap();
    let root_before = std::fs::read_to_string("/proc/sys/net/ipv4/conf/lo/forwarding").unwrap();
    let flipped = if root_before.trim() == "1" { "0" } else { "1" };
    ns.sysctl("net.ipv4.conf.lo.forwarding", flipped).unwrap();
    let inside = ns
        .exec("cat", &["/proc/sys/net/ipv4/conf/lo/forwarding"])
        .unwrap();
    assert_eq!(inside.trim(), flipped);
    let root_after = std::fs::read_to_string("/proc/sys/net/ipv4/conf/lo/forwarding").unwrap();
    assert_eq!(root_after, root_before);
}
