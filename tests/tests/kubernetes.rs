//! The agent fed by the Kubernetes API: the unmodified kube client in `lb
//! run` talks over real HTTP to the test API server (`lb_tests::apiserver`),
//! which lists and watches like the real one (resourceVersions, bookmarks,
//! 410 Gone, dropped connections, outages). Real traffic from real sockets
//! follows every change.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, ConfigFile},
    apiserver::ApiServer,
    example::{yaml, Endpoint, Svc},
    netns::unique,
    servers::{tcp_who, PodServer, StreamReader},
    topology::{pod_ip, Topology, NODE_IP, NODE_NAME},
};

const API_ADDR: &str = "127.0.0.1:6443";
const PATIENCE: Duration = Duration::from_secs(20);

/// A node with `pods` serving pods, the test API server inside the node's
/// namespace (where the agent runs), and this Node object in it.
struct World {
    topo: Topology,
    _servers: Vec<PodServer>,
    api: ApiServer,
    kubeconfig: ConfigFile,
}

fn world(pods: usize) -> World {
    lb_tests::require_root();
    let topo = Topology::new(pods).unwrap();
    let servers = topo.start_servers(pods).unwrap();
    let api = ApiServer::start(&topo.node, API_ADDR.parse::<SocketAddr>().unwrap()).unwrap();
    api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\n  labels: {{topology.kubernetes.io/zone: z1}}\n\
         status:\n  addresses:\n  - {{type: Hostname, address: {NODE_NAME}}}\n  - {{type: InternalIP, address: \"{NODE_IP}\"}}\n"
    ));
    let kubeconfig = ConfigFile::new("").unwrap();
    api.kubeconfig(&kubeconfig.path).unwrap();
    World {
        topo,
        _servers: servers,
        api,
        kubeconfig,
    }
}

impl World {
    /// `lb run` with no --config and no --node-ip: Services from the API,
    /// NodePort addresses from the Node object.
    fn agent(&self) -> Agent {
        let mut agent = self.spawn_agent();
        agent.wait_for_log("datapath ready", PATIENCE).unwrap();
        agent
    }

    /// `agent` without waiting for it to be ready.
    fn spawn_agent(&self) -> Agent {
        self.spawn_agent_with(&[])
    }

    fn spawn_agent_with(&self, extra: &[&str]) -> Agent {
        let mut args = vec![
            "--kubeconfig".to_string(),
            self.kubeconfig.path.display().to_string(),
            "--node-name".into(),
            NODE_NAME.into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("lbkube")));
        Agent::spawn(&self.topo.node, &pin_dir, &args).unwrap()
    }

    /// Who answers new connections to the NodePort, over `n` tries
    /// (failures counted as "-").
    fn tally(&self, n: usize) -> BTreeMap<String, usize> {
        let mut t = BTreeMap::new();
        for _ in 0..n {
            let who = self
                .topo
                .client
                .run(|| tcp_who(node_port()))
                .unwrap()
                .map_or("-".to_string(), |a| a.pod);
            *t.entry(who).or_default() += 1;
        }
        t
    }

    /// Waits until the NodePort's answers are exactly `pods`.
    fn until_served_by(&self, pods: &[&str]) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let t = self.tally(20);
            if t.keys().map(String::as_str).eq(pods.iter().copied()) {
                return;
            }
            assert!(Instant::now() < deadline, "still {t:?}, want {pods:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn node_port() -> SocketAddrV4 {
    SocketAddrV4::new(NODE_IP, 30080)
}

fn web(pods: &[usize]) -> String {
    yaml(&[Svc::web(
        pods.iter().map(|&i| Endpoint::ready(pod_ip(i))).collect(),
    )])
}

#[test]
fn services_and_slices_from_the_api_reach_the_maps_and_traffic_follows() {
    let w = world(3);
    w.api.apply_yaml(&web(&[1, 2]));
    let mut agent = w.agent();
    // No --node-ip: the NodePort answers on the Node's InternalIP.
    w.until_served_by(&["pod-1", "pod-2"]);
    let logs = agent.logs().join("\n");
    assert!(
        logs.contains("NodePorts answer on the Node's addresses"),
        "{logs}"
    );

    // An endpoint turns unready: that service's backends change, nothing else.
    let mut svc = Svc::web(vec![Endpoint::ready(pod_ip(1)), Endpoint::ready(pod_ip(2))]);
    svc.endpoints[1].ready = false;
    let before = agent.count_logs("}: programmed");
    w.api.apply_yaml(&yaml(&[svc]));
    w.until_served_by(&["pod-1"]);
    let rewritten = agent.count_logs("}: programmed") - before;
    assert!(
        rewritten <= 2,
        "only web's two ports are rewritten: {rewritten}"
    );

    // A new endpoint in a second slice; then the first slice deleted.
    w.api.apply_yaml(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-extra\n  namespace: demo\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]\n\
         endpoints:\n- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {NODE_NAME}\n",
        pod_ip(3)
    ));
    w.until_served_by(&["pod-1", "pod-3"]);
    w.api.delete("EndpointSlice", "demo", "web-1");
    w.until_served_by(&["pod-3"]);

    // The Service deleted: its NodePort is gone (the node refuses). Created
    // again, it is served by its new slice and the web-extra slice, which
    // was never deleted.
    w.api.delete("Service", "demo", "web");
    w.until_served_by(&["-"]);
    agent
        .wait_for_log("{service=demo/web:http/TCP}: removed", PATIENCE)
        .unwrap();
    w.api.apply_yaml(&web(&[2]));
    w.until_served_by(&["pod-2", "pod-3"]);
}

#[test]
fn an_endpoint_moving_between_slices_never_leaves_the_service() {
    let w = world(2);
    w.api.apply_yaml(&web(&[1, 2]));
    let _agent = w.agent();
    w.until_served_by(&["pod-1", "pod-2"]);
    // pod-2 moves from web-1 to a new slice web-2, the way the EndpointSlice
    // controller does it: the new slice first, then the old one updated.
    let moved = |pods: &[usize], name: &str| {
        yaml(&[Svc::web(
            pods.iter().map(|&i| Endpoint::ready(pod_ip(i))).collect(),
        )])
        .replace("name: web-1", &format!("name: {name}"))
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        let client = w.topo.client.name.clone();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(format!("/run/netns/{client}")).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match tcp_who(node_port()) {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    for _ in 0..5 {
        w.api.apply_yaml(&moved(&[2], "web-2"));
        w.api.apply_yaml(&moved(&[1], "web-1"));
        w.until_served_by(&["pod-1", "pod-2"]);
        w.api.apply_yaml(&moved(&[1, 2], "web-1"));
        w.api.delete("EndpointSlice", "demo", "web-2");
        w.until_served_by(&["pod-1", "pod-2"]);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = prober.join().unwrap();
    assert!(ok > 20, "{ok} connections");
    assert_eq!(failed, 0, "{failed} of {} connections failed", ok + failed);
}

#[test]
fn an_api_outage_keeps_the_datapath_serving_and_the_relist_removes_what_went_away() {
    let w = world(2);
    w.api.apply_yaml(&web(&[1, 2]));
    w.api.apply_yaml(&yaml(&[Svc::api(pod_ip(2))]));
    let mut agent = w.agent();
    w.until_served_by(&["pod-1", "pod-2"]);
    let stream = StreamReader::open(&w.topo.client, node_port()).unwrap();

    w.api.stop();
    // Long enough for several retries (backoff 0.8 s, 1.6 s, 3.2 s ...).
    std::thread::sleep(Duration::from_secs(5));
    stream.wait_for_more(256 * 1024, PATIENCE).unwrap();
    w.until_served_by(&["pod-1", "pod-2"]);
    let failures: Vec<String> = agent
        .logs()
        .into_iter()
        .filter(|l| l.contains("watch failed"))
        .collect();
    for resource in ["Services", "EndpointSlices", "Node"] {
        // The message without its timestamp: the cause. A watch cut in
        // the middle of a response fails first one way (SendRequest), then
        // another (Connect): two causes, two lines; never one per retry.
        let causes: Vec<&str> = failures
            .iter()
            .filter(|l| {
                l.contains(&format!("resource=\"{resource}\""))
                    || l.contains(&format!("resource={resource}"))
            })
            .map(|l| l.split_once(" WARN ").map_or(l.as_str(), |(_, m)| m))
            .collect();
        let distinct: std::collections::BTreeSet<&str> = causes.iter().copied().collect();
        assert!(
            !causes.is_empty() && causes.len() == distinct.len(),
            "one line per cause for {resource}, not one per retry:\n{}",
            failures.join("\n")
        );
    }

    // Meanwhile `api` is deleted and pod-1 leaves web; the history is
    // compacted, so resuming the watch gets 410 Gone and a relist.
    w.api.delete("Service", "demo", "api");
    w.api.delete("EndpointSlice", "demo", "api-1");
    w.api.apply_yaml(&web(&[2]));
    w.api.compact();
    w.api.restart().unwrap();
    agent
        .wait_for_log("{service=demo/api/TCP}: removed", PATIENCE)
        .unwrap();
    w.until_served_by(&["pod-2"]);
    let logs = agent.logs().join("\n");
    assert!(logs.contains("relisted"), "{logs}");
    assert!(logs.contains("watch is back"), "{logs}");
    let api_port = SocketAddrV4::new(NODE_IP, 30443);
    assert!(w
        .topo
        .client
        .run(move || tcp_who(api_port))
        .unwrap()
        .is_err());
    // The stream to a backend that stayed is untouched by all of it.
    if stream.backend == "pod-2" {
        stream.wait_for_more(256 * 1024, PATIENCE).unwrap();
        stream.finish().unwrap();
    }
}

#[test]
fn dropped_watch_connections_resume_and_a_410_mid_watch_relists() {
    let w = world(3);
    w.api.apply_yaml(&web(&[1]));
    let mut agent = w.agent();
    w.until_served_by(&["pod-1"]);

    // Connections cut mid-stream: the watch resumes from its
    // resourceVersion and gets what happened meanwhile.
    w.api.drop_connections().unwrap();
    w.api.apply_yaml(&web(&[2]));
    w.until_served_by(&["pod-2"]);

    // History compacted, then connections cut: the resumed watch is told
    // 410 Gone, the agent relists and programs what it missed.
    w.api.compact();
    w.api.drop_connections().unwrap();
    w.api.apply_yaml(&web(&[3]));
    w.until_served_by(&["pod-3"]);
    agent.wait_for_log("relisted", PATIENCE).unwrap();
}

/// Lists come in pages (500 objects) and reach the agent part by part
/// (see `Change::Listing`). A relist is still one change: what no part
/// named goes, and what an early part named stays.
#[test]
fn a_relist_of_many_pages_removes_only_what_went_away() {
    const FILLERS: usize = 1_200;
    let w = world(2);
    w.api.apply_yaml(&web(&[1]));
    for i in 0..FILLERS {
        let ip =
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 19, 16, 0)) + i as u32);
        w.api.apply_value(serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("filler-{i}"), "namespace": "fill"},
            "spec": {"type": "ClusterIP", "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}));
    }
    let mut agent = w.agent();
    w.until_served_by(&["pod-1"]);
    let programmed = |agent: &mut Agent| {
        agent
            .logs()
            .iter()
            .filter(|l| l.contains("programmed"))
            .count()
    };
    assert!(programmed(&mut agent) > FILLERS, "every filler programmed");

    // Gone while the API is down: one filler from the first page, one
    // from the last; pod-2 replaces pod-1. History compacted: a relist.
    w.api.stop();
    w.api.delete("Service", "fill", "filler-3");
    w.api
        .delete("Service", "fill", &format!("filler-{}", FILLERS - 2));
    w.api.apply_yaml(&web(&[2]));
    w.api.compact();
    w.api.restart().unwrap();
    w.until_served_by(&["pod-2"]);
    agent.wait_for_log("relisted", PATIENCE).unwrap();
    agent
        .wait_for_log("fill/filler-3:http/TCP}: removed", PATIENCE)
        .unwrap();
    let logs = agent.logs();
    let removed: Vec<&String> = logs.iter().filter(|l| l.ends_with("removed")).collect();
    assert_eq!(
        removed.len(),
        2,
        "exactly the two deleted fillers: {removed:#?}"
    );
    assert!(removed.iter().any(|l| l.contains("fill/filler-3:")));
    assert!(removed
        .iter()
        .any(|l| l.contains(&format!("fill/filler-{}:", FILLERS - 2))));
}

#[test]
fn a_kubernetes_fed_agent_restarts_without_cutting_a_stream_even_when_backends_change() {
    let w = world(3);
    w.api.apply_yaml(&web(&[1, 2]));
    let mut agent = w.agent();
    w.until_served_by(&["pod-1", "pod-2"]);
    let mut streams: Vec<StreamReader> = Vec::new();
    while !streams.iter().any(|s| s.backend == "pod-1") {
        streams.push(StreamReader::open(&w.topo.client, node_port()).unwrap());
    }
    let kept = streams.into_iter().find(|s| s.backend == "pod-1").unwrap();

    agent.stop_with(nix::sys::signal::Signal::SIGTERM).unwrap();
    // While no agent runs: pod-2 leaves, pod-3 joins.
    w.api.apply_yaml(&web(&[1, 3]));
    kept.wait_for_more(256 * 1024, PATIENCE).unwrap();
    agent.start_again(None).unwrap();
    let logs = agent.logs().join("\n");
    assert!(logs.contains("kept=2 deleted=0"), "{logs}");
    w.until_served_by(&["pod-1", "pod-3"]);
    kept.wait_for_more(256 * 1024, PATIENCE).unwrap();
    kept.finish().unwrap();
}

#[test]
fn every_api_call_the_agent_makes_is_allowed_by_deploy_rbac_and_nothing_more() {
    let w = world(1);
    w.api.apply_yaml(&web(&[1]));
    let _agent = w.agent();
    w.until_served_by(&["pod-1"]);
    // A relist too: the calls after 410 Gone must be allowed as well.
    w.api.compact();
    w.api.drop_connections().unwrap();
    w.api
        .apply_yaml(&web(&[1]).replace("198.19.0.10", "198.19.0.12"));
    w.until_served_by(&["pod-1"]);
    let calls = w.api.requests();
    let role = &lb_tests::deploy::load().unwrap().cluster_roles[0];
    let mut used = std::collections::BTreeSet::new();
    for c in &calls {
        let resource = c
            .resource
            .unwrap_or_else(|| panic!("a call the server does not serve: {c:?}"));
        let (group, name) = resource.rbac();
        assert!(
            lb_tests::deploy::allows(role, group, name, &c.verb),
            "deploy/rbac.yaml does not allow {} {group}/{name} ({c:?})",
            c.verb
        );
        used.insert((group.to_string(), name.to_string(), c.verb.clone()));
    }
    let granted: std::collections::BTreeSet<_> =
        lb_tests::deploy::grants(role).into_iter().collect();
    assert_eq!(granted, used, "the role grants exactly what the agent uses");
    // And the agent's own list of its calls says the same.
    let declared: std::collections::BTreeSet<_> = lb_userspace::source::API_CALLS
        .iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(declared, used);
}

/// GET `path` on the agent's status endpoint (in the node's namespace).
fn status_get(w: &World, path: &'static str) -> (u16, String) {
    lb_tests::agent::status_get(&w.topo.node, path)
}

/// The value of the first sample line starting with `prefix`.
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
}

#[test]
fn healthz_readyz_and_metrics_tell_the_truth() {
    let w = world(2);
    w.api.apply_yaml(&web(&[1, 2]));
    // The API is down when the agent starts: alive, but neither attached
    // nor ready until it has a complete view.
    w.api.stop();
    let mut agent = w.spawn_agent();
    agent.wait_for_log("serving /healthz", PATIENCE).unwrap();
    assert_eq!(status_get(&w, "/readyz").0, 503);
    assert_eq!(status_get(&w, "/healthz").0, 503);
    w.api.restart().unwrap();
    agent.wait_for_log("datapath ready", PATIENCE).unwrap();
    assert_eq!(status_get(&w, "/readyz").0, 200);
    assert_eq!(status_get(&w, "/healthz").0, 200);

    w.until_served_by(&["pod-1", "pod-2"]);
    let (code, m) = status_get(&w, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        sample(&m, "lb_services_programmed "),
        2.0,
        "web's TCP and UDP ports"
    );
    assert_eq!(sample(&m, "lb_backends_programmed "), 4.0);
    assert!(sample(&m, "lb_syncs_total ") >= 1.0);
    assert!(sample(&m, "lb_sync_duration_seconds_count ") >= 1.0);
    assert!(sample(&m, "lb_datapath_packets_total{verdict=\"dnat_new\"}") >= 20.0);
    assert!(
        sample(&m, "lb_service_packets_total{namespace=\"demo\",service=\"web\",port=\"http\",protocol=\"TCP\",scope=\"Cluster\",family=\"IPv4\"}")
            >= 20.0
    );
    assert!(sample(&m, "lb_map_entries{map=\"lb_ct_tcp\"}") >= 1.0);
    assert_eq!(
        sample(&m, "lb_map_entries{map=\"lb_frontends\"}"),
        3.0,
        "ClusterIP TCP, UDP and the NodePort"
    );
    assert_eq!(
        sample(&m, "lb_map_capacity{map=\"lb_backends\"}"),
        f64::from(lb_common::MAX_BACKENDS)
    );
}

/// Polls `path` until it answers `code`.
fn until_status(w: &World, path: &'static str, code: u16, within: Duration) -> String {
    let deadline = Instant::now() + lb_tests::patience(within);
    loop {
        let (c, body) = status_get(w, path);
        if c == code {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still answers {c}: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// kube-proxy's healthz rule: 503 once a change has waited longer than the
/// health timeout; here, the API watch is gone, so changes may be waiting.
#[test]
fn healthz_fails_like_kube_proxys_when_the_api_watch_is_gone_and_recovers() {
    let w = world(1);
    w.api.apply_yaml(&web(&[1]));
    let mut agent = w.spawn_agent_with(&["--health-timeout", "2"]);
    agent.wait_for_log("datapath ready", PATIENCE).unwrap();
    let body = until_status(&w, "/healthz", 200, PATIENCE);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["lastUpdated"].as_str().unwrap().ends_with('Z'), "{body}");
    assert!(v["currentTime"].as_str().unwrap().ends_with('Z'), "{body}");
    assert_eq!(status_get(&w, "/proxyMode"), (200, "ebpf".to_string()));
    assert_eq!(status_get(&w, "/livez").0, 200);

    w.api.stop();
    agent.wait_for_log("watch failed", PATIENCE).unwrap();
    let body = until_status(&w, "/healthz", 503, Duration::from_secs(10));
    assert!(body.contains("pendingSeconds"), "{body}");
    assert_eq!(status_get(&w, "/readyz").0, 503);
    assert_eq!(
        status_get(&w, "/livez").0,
        200,
        "alive: a restart would not help"
    );
    w.until_served_by(&["pod-1"]);

    w.api.restart().unwrap();
    // Something happens in the cluster: the watches report it.
    w.api.apply_yaml(&yaml(&[Svc::api(pod_ip(1))]));
    until_status(&w, "/healthz", 200, Duration::from_secs(60));
    assert_eq!(status_get(&w, "/readyz").0, 200);
}

/// The Node's spec.podCIDRs are inside the cluster: from the API, with no
/// --cluster-cidr, a pod in them reaches an externalTrafficPolicy Local
/// NodePort whose endpoints are all on another node (kube-proxy's
/// short-circuit); once the Node no longer lists that range, the pod is
/// treated as outside and dropped.
#[test]
fn the_nodes_pod_cidrs_make_pods_inside_the_cluster_for_local_policy() {
    let w = world(3);
    let node = |cidrs: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\n\
             spec:\n  podCIDRs: [{cidrs}]\n\
             status:\n  addresses:\n  - {{type: InternalIP, address: \"{NODE_IP}\"}}\n"
        )
    };
    // Pods 1 and 2 serve; pod 3 is the client.
    let client = w.topo.pods[2].ip;
    w.api
        .apply_yaml(&node(&format!("\"{client}/32\", \"fd00:10::/64\"")));
    let mut svc = Svc::web(vec![
        Endpoint::ready(pod_ip(1)).on("node-b"),
        Endpoint::ready(pod_ip(2)).on("node-b"),
    ]);
    svc.extra.external_traffic_policy = Some("Local");
    w.api.apply_yaml(&yaml(&[svc]));
    let agent = w.agent();
    let pod = &w.topo.pods[2].ns;
    let reach = || pod.run(|| tcp_who(node_port())).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let served = loop {
        match reach() {
            Ok(a) => break a,
            Err(e) => assert!(Instant::now() < deadline, "the pod is not served: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(*served.peer.ip(), client, "the pod's address is kept");
    let logs = agent.logs().join("\n");
    assert!(logs.contains("podCIDRs"), "{logs}");

    w.api.apply_yaml(&node("\"198.18.200.0/24\""));
    let deadline = Instant::now() + PATIENCE;
    while reach().is_ok() {
        assert!(Instant::now() < deadline, "the pod is still served");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Topology hints from the API (`trafficDistribution: PreferClose`, as the
/// EndpointSlice controller fills them): the node (zone z1) uses only the
/// endpoint hinted for z1; when the Node's zone label changes to z2, only
/// the one hinted for z2 (kube-proxy's topologyModeFromHints).
#[test]
fn zone_hints_follow_the_nodes_zone_label() {
    let w = world(2);
    let node = |zone: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\n  labels: {{topology.kubernetes.io/zone: {zone}}}\n\
             status:\n  addresses:\n  - {{type: InternalIP, address: \"{NODE_IP}\"}}\n"
        )
    };
    let (p1, p2) = (w.topo.pods[0].ip, w.topo.pods[1].ip);
    w.api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\n\
         spec:\n  type: NodePort\n  clusterIP: 198.19.0.10\n  trafficDistribution: PreferClose\n\
         \x20 ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\nendpoints:\n\
         - addresses: [\"{p1}\"]\n  conditions: {{ready: true}}\n  hints: {{forZones: [{{name: z2}}]}}\n\
         - addresses: [\"{p2}\"]\n  conditions: {{ready: true}}\n  hints: {{forZones: [{{name: z1}}]}}\n"
    ));
    let _agent = w.agent();
    w.until_served_by(&["pod-2"]);
    w.api.apply_yaml(&node("z2"));
    w.until_served_by(&["pod-1"]);
}

/// A dual-stack Node (an InternalIP of each family, as the kubelet lists
/// them) and no --node-ip: the NodePort answers on both, each family's
/// SNAT address is the Node's, and an IPv6 Service from the API is served.
#[test]
fn a_dual_stack_nodes_addresses_from_the_api_serve_both_families() {
    use lb_tests::{
        servers::tcp_who6,
        topology::{pod_ip6, CLIENT_IP6, NODE_IP6},
    };
    use std::net::{Ipv6Addr, SocketAddrV6};
    let w = world(2);
    w.topo.add_ipv6().unwrap();
    let _v6: Vec<PodServer> = (0..2)
        .map(|i| PodServer::start_v6(&w.topo.pods[i].ns, &format!("pod-{}", i + 1), 8080, 5353))
        .collect::<anyhow::Result<_>>()
        .unwrap();
    w.api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\n\
         status:\n  addresses:\n  - {{type: Hostname, address: {NODE_NAME}}}\n  \
         - {{type: InternalIP, address: \"{NODE_IP}\"}}\n  - {{type: InternalIP, address: \"{NODE_IP6}\"}}\n"
    ));
    let mut svc = Svc::web(
        [
            pod_ip(1).into(),
            pod_ip(2).into(),
            pod_ip6(1).into(),
            pod_ip6(2).into(),
        ]
        .into_iter()
        .map(|ip: std::net::IpAddr| Endpoint::ready(ip))
        .collect(),
    );
    svc.extra.cluster_ip6 = Some(Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x10));
    w.api.apply_yaml(&yaml(&[svc]));
    let mut agent = w.agent();
    agent
        .wait_for_log("NodePorts answer on the Node's addresses", PATIENCE)
        .unwrap();
    let line = agent
        .logs()
        .into_iter()
        .find(|l| l.contains("NodePorts answer on the Node's addresses"))
        .unwrap();
    assert!(line.contains(&NODE_IP6.to_string()), "{line}");
    w.until_served_by(&["pod-1", "pod-2"]);
    let np6 = SocketAddrV6::new(NODE_IP6, 30080, 0, 0);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let a = w
            .topo
            .client
            .run(move || tcp_who6(np6))
            .unwrap()
            .expect("IPv6 NodePort");
        assert_eq!(*a.peer.ip(), CLIENT_IP6, "{a:?}");
        seen.insert(a.pod);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // A pod reaching itself through the IPv6 ClusterIP is masqueraded to
    // the Node's IPv6 address: the SNAT address came from the Node too.
    let vip = SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x10), 80, 0, 0);
    let mut hairpin = None;
    for _ in 0..40 {
        let a = w.topo.pods[0]
            .ns
            .run(move || tcp_who6(vip))
            .unwrap()
            .unwrap();
        if a.pod == "pod-1" {
            hairpin = Some(a.peer);
            break;
        }
    }
    let peer = hairpin.expect("pod 1 reached itself in 40 connections");
    assert_eq!(*peer.ip(), NODE_IP6);
    // Each family's service port has its own series.
    let (_, m) = status_get(&w, "/metrics");
    let series = |family: &str| {
        format!("lb_service_packets_total{{namespace=\"demo\",service=\"web\",port=\"http\",protocol=\"TCP\",scope=\"Cluster\",family=\"{family}\"}}")
    };
    assert!(sample(&m, &series("IPv6")) >= 21.0, "{m}");
    assert!(sample(&m, &series("IPv4")) >= 20.0, "{m}");
}
