//! Unit tests for manifest parsing and the desired-state model.

use std::net::{IpAddr, Ipv4Addr};

use crate::{
    model::{
        build, Build, ExternalIpPolicy, Family, FrontendKind, NodeConfig, Protocol, Scope,
        ServicePortKey,
    },
    source::manifest,
};

fn node() -> NodeConfig {
    NodeConfig {
        name: "node-a".into(),
        node_ips: vec![Ipv4Addr::new(198, 18, 0, 2).into()],
        service_proxy_name: None,
        ..Default::default()
    }
}

fn build_yaml(yaml: &str) -> Build {
    let o = manifest::parse(yaml).expect("valid YAML");
    assert!(o.rejections.is_empty(), "{:?}", o.rejections);
    build(&o.services, &o.slices, &node())
}

fn key(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortKey {
    ServicePortKey {
        namespace: ns.into(),
        name: name.into(),
        port_name: port.into(),
        protocol,
        family: Family::V4,
        scope: Scope::Cluster,
    }
}

#[test]
fn multi_document_stream_gives_one_service_port_per_port() {
    let b = build_yaml(include_str!("../testdata/basic.yaml"));
    assert!(b.rejections.is_empty(), "{:?}", b.rejections);
    let http = &b.state.services[&key("shop", "web", "http", Protocol::Tcp)];
    let fronts: Vec<String> = http.frontends.iter().map(|f| f.to_string()).collect();
    assert_eq!(fronts, ["198.18.0.2:30080/TCP", "198.19.0.10:80/TCP"]);
    assert_eq!(http.frontends[0].kind, FrontendKind::NodePort);
    // Target port comes from the slice port of the same name.
    assert!(http.endpoints.iter().all(|e| e.port == 8080));
    assert_eq!(http.endpoints.len(), 3);
    let dns = &b.state.services[&key("shop", "web", "dns", Protocol::Udp)];
    assert!(dns.endpoints.iter().all(|e| e.port == 5353));
    // No nodePort on that port: ClusterIP only.
    assert_eq!(dns.frontends.len(), 1);
}

#[test]
fn usable_endpoints_are_ready_ones_then_terminating_serving_ones() {
    let b = build_yaml(include_str!("../testdata/basic.yaml"));
    let http = &b.state.services[&key("shop", "web", "http", Protocol::Tcp)];
    let usable: Vec<IpAddr> = http.usable_endpoints().iter().map(|e| e.addr).collect();
    // The terminating endpoint is listed but not used while ready ones exist.
    assert_eq!(
        usable,
        [Ipv4Addr::new(198, 18, 1, 11), Ipv4Addr::new(198, 18, 1, 12)]
    );

    let only_terminating = include_str!("../testdata/basic.yaml")
        .replace(
            "conditions: {ready: true, serving: true, terminating: false}",
            "conditions: {ready: false, serving: false, terminating: true}",
        )
        .replace(
            "conditions: {ready: true}",
            "conditions: {ready: false, serving: false}",
        );
    let b = build_yaml(&only_terminating);
    let http = &b.state.services[&key("shop", "web", "http", Protocol::Tcp)];
    let usable: Vec<IpAddr> = http.usable_endpoints().iter().map(|e| e.addr).collect();
    assert_eq!(
        usable,
        [Ipv4Addr::new(198, 18, 1, 13)],
        "serving+terminating fallback"
    );
}

#[test]
fn list_kind_merges_slices_and_skips_headless_and_external_name() {
    let b = build_yaml(include_str!("../testdata/list.yaml"));
    assert!(b.rejections.is_empty(), "{:?}", b.rejections);
    assert_eq!(b.state.services.len(), 1);
    let api = &b.state.services[&key("default", "api", "", Protocol::Tcp)];
    let addrs: Vec<IpAddr> = api.endpoints.iter().map(|e| e.addr).collect();
    assert_eq!(
        addrs,
        [Ipv4Addr::new(198, 18, 1, 21), Ipv4Addr::new(198, 18, 1, 22)],
        "de-duplicated"
    );
    assert_eq!(api.affinity_timeout_s, Some(60));
    let skipped: Vec<&str> = b.skipped.iter().map(|r| r.object.as_str()).collect();
    assert_eq!(skipped, ["Service default/ext", "Service default/headless"]);
}

#[test]
fn an_invalid_service_is_rejected_alone() {
    let yaml = format!(
        "{}\n---\n{}",
        include_str!("../testdata/basic.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec:\n  clusterIP: 198.19.300.1\n  ports: [{port: 80}]\n"
    );
    let b = build_yaml(&yaml);
    assert_eq!(b.rejections.len(), 1);
    assert_eq!(b.rejections[0].object, "Service shop/bad");
    assert!(
        b.rejections[0].reason.contains("198.19.300.1"),
        "{}",
        b.rejections[0].reason
    );
    assert_eq!(
        b.state.services.len(),
        2,
        "the valid service is still built"
    );
}

#[test]
fn out_of_range_ports_are_rejected() {
    for (field, value) in [("port", "70000"), ("port", "0"), ("nodePort", "65536")] {
        let yaml = include_str!("../testdata/basic.yaml").replacen(
            if field == "port" {
                "port: 80\n"
            } else {
                "nodePort: 30080"
            },
            &if field == "port" {
                format!("port: {value}\n")
            } else {
                format!("nodePort: {value}")
            },
            1,
        );
        let b = build_yaml(&yaml);
        assert_eq!(b.rejections.len(), 1, "{field}={value}");
        assert!(
            b.rejections[0].reason.contains(value),
            "{}",
            b.rejections[0].reason
        );
        assert!(!b.state.services.keys().any(|k| k.name == "web"));
    }
}

#[test]
fn duplicate_frontend_goes_to_the_older_service() {
    let newer = "apiVersion: v1\nkind: Service\nmetadata: {name: aaa-newer, namespace: shop, creationTimestamp: \"2026-02-01T00:00:00Z\"}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{name: http, port: 80}]\n";
    let yaml = format!("{newer}---\n{}", include_str!("../testdata/basic.yaml"));
    let b = build_yaml(&yaml);
    assert_eq!(b.rejections.len(), 1);
    assert_eq!(b.rejections[0].object, "Service shop/aaa-newer");
    assert!(
        b.rejections[0].reason.contains("Service shop/web"),
        "{}",
        b.rejections[0].reason
    );
    assert!(b
        .state
        .services
        .contains_key(&key("shop", "web", "http", Protocol::Tcp)));
}

#[test]
fn invalid_slice_is_rejected_alone_and_unlabelled_ones_ignored() {
    let yaml = include_str!("../testdata/basic.yaml").replace("198.18.1.12", "not-an-ip");
    let b = build_yaml(&yaml);
    assert_eq!(b.rejections.len(), 1);
    assert_eq!(b.rejections[0].object, "EndpointSlice shop/web-abc");
    let http = &b.state.services[&key("shop", "web", "http", Protocol::Tcp)];
    assert!(
        http.endpoints.is_empty(),
        "service kept, with no endpoints (refuses at once)"
    );
}

#[test]
fn yaml_syntax_error_fails_the_file() {
    let err = manifest::parse("apiVersion: v1\nkind: Service\nmetadata: [unclosed\n").unwrap_err();
    assert!(err.to_string().contains("document 1"), "{err}");
}

#[test]
fn object_of_wrong_shape_is_rejected_by_name() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: odd, namespace: x}\nspec: {ports: [{port: eighty}]}\n";
    let o = manifest::parse(yaml).unwrap();
    assert_eq!(o.rejections.len(), 1);
    assert_eq!(o.rejections[0].object, "Service x/odd");
}

#[test]
fn an_sctp_port_is_left_out_alone_and_a_bad_affinity_timeout_rejects() {
    let sctp = include_str!("../testdata/basic.yaml").replacen(
        "protocol: UDP\n    targetPort",
        "protocol: SCTP\n    targetPort",
        1,
    );
    let b = build_yaml(&sctp);
    assert!(b.rejections.is_empty(), "{:?}", b.rejections);
    assert_eq!(b.partial.len(), 1, "{:?}", b.partial);
    assert!(
        b.partial[0].reason.contains("port \"dns\" left out: SCTP"),
        "{:?}",
        b.partial
    );
    assert_eq!(
        b.state.services.keys().collect::<Vec<_>>(),
        [&key("shop", "web", "http", Protocol::Tcp)],
        "the TCP port is programmed"
    );
    let aff = include_str!("../testdata/list.yaml")
        .replace("timeoutSeconds: 60", "timeoutSeconds: 100000");
    let b = build_yaml(&aff);
    assert!(
        b.rejections[0].reason.contains("100000"),
        "{:?}",
        b.rejections
    );
}

#[test]
fn loadbalancer_gets_cluster_ip_and_node_ports() {
    let yaml =
        include_str!("../testdata/basic.yaml").replace("type: NodePort", "type: LoadBalancer");
    let b = build_yaml(&yaml);
    let http = &b.state.services[&key("shop", "web", "http", Protocol::Tcp)];
    assert_eq!(http.frontends.len(), 2);
    let cip = include_str!("../testdata/basic.yaml").replace("type: NodePort", "type: ClusterIP");
    let b = build_yaml(&cip);
    let http = &b.state.services[&key("shop", "web", "http", Protocol::Tcp)];
    assert_eq!(
        http.frontends.len(),
        1,
        "nodePort ignored for type ClusterIP"
    );
}

const POLICIES: &str = include_str!("../testdata/policies.yaml");

fn local(mut k: ServicePortKey) -> ServicePortKey {
    k.scope = Scope::Local;
    k
}

fn frontends_of(sp: &crate::model::ServicePort) -> Vec<String> {
    sp.frontends
        .iter()
        .map(|f| format!("{f} {:?}", f.kind))
        .collect()
}

#[test]
fn external_traffic_policy_local_splits_the_port_by_scope() {
    let b = build_yaml(POLICIES);
    assert!(b.rejections.is_empty(), "{:?}", b.rejections);
    let cluster = &b.state.services[&key("shop", "lb", "http", Protocol::Tcp)];
    // With the ClusterIP: the external frontends as pods and the node
    // reach them (kube-proxy's short-circuit: every endpoint).
    assert_eq!(
        frontends_of(cluster),
        [
            "198.18.0.2:30100/TCP (in-cluster) NodePort",
            "198.18.5.1:80/TCP (in-cluster) ExternalIp",
            "198.18.6.1:80/TCP (in-cluster) LoadBalancer",
            "198.19.0.20:80/TCP ClusterIp"
        ]
    );
    // Every endpoint, local or not (nodeName missing = remote).
    let all: Vec<(String, bool)> = cluster
        .endpoints
        .iter()
        .map(|e| (e.addr.to_string(), e.local))
        .collect();
    assert_eq!(
        all,
        [
            ("198.18.1.10".into(), true),
            ("198.18.1.11".into(), true),
            ("198.18.2.10".into(), false),
            ("198.18.3.10".into(), false)
        ]
    );
    let ext = &b.state.services[&local(key("shop", "lb", "http", Protocol::Tcp))];
    assert_eq!(
        frontends_of(ext),
        [
            "198.18.0.2:30100/TCP NodePort",
            "198.18.5.1:80/TCP ExternalIp",
            // ipMode Proxy (198.18.6.2) is the load balancer's to proxy.
            "198.18.6.1:80/TCP LoadBalancer",
        ]
    );
    let addrs: Vec<String> = ext.endpoints.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(addrs, ["198.18.1.10", "198.18.1.11"], "local only");
    assert_eq!(
        ext.usable_endpoints().len(),
        1,
        "terminating one is not used"
    );
    // Host bits cleared; the IPv6 range is the other family's.
    let ranges: Vec<String> = ext.source_ranges.iter().map(|r| r.to_string()).collect();
    assert_eq!(ranges, ["198.18.0.0/16", "198.18.0.0/24"]);
    let ranges: Vec<String> = cluster
        .source_ranges
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(
        ranges,
        ["198.18.0.0/16", "198.18.0.0/24"],
        "the LB IP's in-cluster view keeps its source ranges (kube-proxy checks pods too)"
    );
    assert_eq!(
        ext.key.to_string(),
        "shop/lb:http/TCP/local",
        "logs tell the scopes apart"
    );
}

#[test]
fn health_check_counts_ready_local_endpoints_only() {
    let b = build_yaml(POLICIES);
    let hc = &b.state.health_checks[&31999];
    assert_eq!((hc.namespace.as_str(), hc.name.as_str()), ("shop", "lb"));
    assert_eq!(hc.local_endpoints, 1);
    let gone = POLICIES.replacen(
        "conditions: {ready: true}",
        "conditions: {ready: false, serving: true, terminating: true}",
        1,
    );
    let b = build_yaml(&gone);
    assert_eq!(b.state.health_checks[&31999].local_endpoints, 0);
    let cluster = POLICIES.replace(
        "externalTrafficPolicy: Local",
        "externalTrafficPolicy: Cluster",
    );
    assert!(build_yaml(&cluster).state.health_checks.is_empty());
}

#[test]
fn internal_traffic_policy_local_keeps_only_local_endpoints() {
    let yaml = format!(
        "{POLICIES}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: i, namespace: shop, labels: {{kubernetes.io/service-name: internal}}}}\naddressType: IPv4\nports: [{{protocol: UDP, port: 5353}}]\nendpoints:\n- {{addresses: [198.18.1.20], nodeName: node-a}}\n- {{addresses: [198.18.2.20], nodeName: node-b}}\n"
    );
    let b = build_yaml(&yaml);
    assert!(!b
        .state
        .services
        .contains_key(&key("shop", "internal", "", Protocol::Udp)));
    let sp = &b.state.services[&local(key("shop", "internal", "", Protocol::Udp))];
    let addrs: Vec<String> = sp.endpoints.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(addrs, ["198.18.1.20"]);
}

#[test]
fn service_proxy_name_and_headless_labels_are_honoured() {
    let b = build_yaml(POLICIES);
    let skipped: Vec<&str> = b.skipped.iter().map(|s| s.object.as_str()).collect();
    assert!(
        skipped.contains(&"Service shop/headless-labelled"),
        "{skipped:?}"
    );
    assert!(skipped.contains(&"Service shop/other-proxy"), "{skipped:?}");
    assert!(
        skipped.contains(&"Service shop/our-proxy"),
        "unnamed proxy skips it"
    );
    let o = manifest::parse(POLICIES).unwrap();
    let named = NodeConfig {
        service_proxy_name: Some("lb".into()),
        ..node()
    };
    let b = build(&o.services, &o.slices, &named);
    assert!(b
        .state
        .services
        .contains_key(&key("shop", "our-proxy", "", Protocol::Tcp)));
    assert!(!b
        .state
        .services
        .contains_key(&key("shop", "other-proxy", "", Protocol::Tcp)));
}

#[test]
fn bad_traffic_policy_or_range_rejects_only_that_service() {
    let bad = POLICIES.replace(
        "externalTrafficPolicy: Local",
        "externalTrafficPolicy: Nearby",
    );
    let b = build_yaml(&bad);
    assert_eq!(b.rejections.len(), 1, "{:?}", b.rejections);
    assert_eq!(b.rejections[0].object, "Service shop/lb");
    assert!(b.rejections[0].reason.contains("Nearby"));
    assert!(b
        .state
        .services
        .contains_key(&local(key("shop", "internal", "", Protocol::Udp))));
    let bad = POLICIES.replace("198.18.0.0/24", "198.18.0.0/33");
    let b = build_yaml(&bad);
    assert!(
        b.rejections[0].reason.contains("loadBalancerSourceRanges"),
        "{:?}",
        b.rejections
    );
}

// ------------------------------------------------ conflicts and policy

/// A ClusterIP Service `name` created at `day` of 2026-01 with externalIPs.
fn svc_at(name: &str, day: u8, cluster_ip: &str, external: &[&str]) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop, creationTimestamp: \"2026-01-{day:02}T00:00:00Z\"}}\nspec:\n  clusterIP: {cluster_ip}\n  externalIPs: [{}]\n  ports: [{{name: http, port: 80}}]\n",
        external.join(", ")
    )
}

fn frontends(b: &Build, name: &str) -> Vec<String> {
    b.state.services[&key("shop", name, "http", Protocol::Tcp)]
        .frontends
        .iter()
        .map(|f| f.to_string())
        .collect()
}

#[test]
fn a_contested_external_ip_is_dropped_alone() {
    let yaml = svc_at("old", 1, "198.19.0.1", &["198.18.50.1"])
        + &svc_at("new", 2, "198.19.0.2", &["198.18.50.1", "198.18.50.2"]);
    let b = build_yaml(&yaml);
    assert!(b.rejections.is_empty(), "{:?}", b.rejections);
    assert_eq!(
        frontends(&b, "old"),
        ["198.18.50.1:80/TCP", "198.19.0.1:80/TCP"]
    );
    assert_eq!(
        frontends(&b, "new"),
        ["198.18.50.2:80/TCP", "198.19.0.2:80/TCP"]
    );
    assert_eq!(b.partial.len(), 1);
    assert_eq!(b.partial[0].object, "Service shop/new");
    assert!(
        b.partial[0].reason.contains(
            "frontend 198.18.50.1:80/TCP left out: it is already used by Service shop/old"
        ),
        "{}",
        b.partial[0].reason
    );
}

#[test]
fn a_cluster_ip_always_wins_over_an_older_services_external_ip() {
    // CVE-2020-8554: "thief" claims the ClusterIP of "victim" as an
    // externalIP, and is older.
    let yaml =
        svc_at("thief", 1, "198.19.0.1", &["198.19.0.2"]) + &svc_at("victim", 2, "198.19.0.2", &[]);
    let b = build_yaml(&yaml);
    assert_eq!(frontends(&b, "victim"), ["198.19.0.2:80/TCP"]);
    assert_eq!(frontends(&b, "thief"), ["198.19.0.1:80/TCP"]);
    assert!(b.partial[0]
        .reason
        .contains("already used by Service shop/victim"));
}

#[test]
fn the_external_ip_policy_refuses_node_and_service_addresses() {
    let yaml = svc_at(
        "x",
        1,
        "198.19.0.1",
        &["198.18.0.2", "198.19.7.7", "127.0.0.1", "198.18.50.1"],
    );
    let o = manifest::parse(&yaml).unwrap();
    let with = |policy| {
        let node = NodeConfig {
            service_cidrs: vec!["198.19.0.0/16".parse().unwrap()],
            external_ips: policy,
            ..node()
        };
        build(&o.services, &o.slices, &node)
    };
    let b = with(ExternalIpPolicy::Restricted);
    assert_eq!(
        frontends(&b, "x"),
        ["198.18.50.1:80/TCP", "198.19.0.1:80/TCP"]
    );
    let why = &b.partial[0].reason;
    assert!(
        why.contains("externalIP 198.18.0.2 left out: it is this node's address"),
        "{why}"
    );
    assert!(
        why.contains("externalIP 198.19.7.7 left out: it is inside the service CIDR 198.19.0.0/16"),
        "{why}"
    );
    assert!(
        why.contains("externalIP 127.0.0.1 left out: not a routable unicast address"),
        "{why}"
    );
    let b = with(ExternalIpPolicy::Deny);
    assert_eq!(frontends(&b, "x"), ["198.19.0.1:80/TCP"]);
    let b = with(ExternalIpPolicy::Allow);
    assert_eq!(frontends(&b, "x").len(), 5);
    assert!(b.partial.is_empty());
}

#[test]
fn only_an_endpoints_first_address_is_used_as_kube_proxy_does() {
    let yaml = include_str!("../testdata/basic.yaml").replace(
        "- addresses: [198.18.1.11]",
        "- addresses: [198.18.1.11, 198.18.1.99]",
    );
    let b = build_yaml(&yaml);
    let http = &b.state.services[&key("shop", "web", "http", Protocol::Tcp)];
    let addrs: Vec<String> = http.endpoints.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(addrs, ["198.18.1.11", "198.18.1.12", "198.18.1.13"]);
}

/// A ClusterIP Service whose slice lists `endpoints` (address, ready,
/// zones hinted, nodes hinted), built on node-a in `zone`.
fn hinted(
    endpoints: &[(&str, bool, &[&str], &[&str])],
    zone: Option<&str>,
    local: bool,
) -> Vec<String> {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
         spec:\n  clusterIP: 198.19.0.30\n",
    );
    if local {
        yaml += "  internalTrafficPolicy: Local\n";
    }
    yaml += "  trafficDistribution: PreferClose\n  ports: [{protocol: TCP, port: 80, targetPort: 8080}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nports: [{protocol: TCP, port: 8080}]\nendpoints:\n";
    for (addr, ready, zones, nodes) in endpoints {
        yaml += &format!(
            "- addresses: [{addr}]\n  nodeName: node-a\n  conditions: {{ready: {ready}}}\n"
        );
        if !zones.is_empty() || !nodes.is_empty() {
            let list = |v: &[&str]| {
                v.iter()
                    .map(|n| format!("{{name: {n}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            yaml += &format!(
                "  hints: {{forZones: [{}], forNodes: [{}]}}\n",
                list(zones),
                list(nodes)
            );
        }
    }
    let o = manifest::parse(&yaml).expect("valid YAML");
    let node = NodeConfig {
        zone: zone.map(String::from),
        ..node()
    };
    let b = build(&o.services, &o.slices, &node);
    assert!(b.rejections.is_empty(), "{:?}", b.rejections);
    let sp = b.state.services.values().next().expect("one service port");
    sp.usable_endpoints()
        .iter()
        .map(|e| e.addr.to_string())
        .collect()
}

/// kube-proxy's CategorizeEndpoints / topologyModeFromHints
/// (pkg/proxy/topology.go), case by case.
#[test]
fn topology_hints_choose_endpoints_as_kube_proxy_does() {
    const A: &str = "198.18.1.1";
    const B: &str = "198.18.1.2";
    const C: &str = "198.18.1.3";
    let z1 = Some("z1");
    // Every ready endpoint hinted, one for this zone: only those.
    assert_eq!(
        hinted(
            &[
                (A, true, &["z1"], &[]),
                (B, true, &["z2"], &[]),
                (C, true, &["z1"], &[])
            ],
            z1,
            false
        ),
        [A, C]
    );
    // One ready endpoint without a hint: no topology.
    assert_eq!(
        hinted(&[(A, true, &["z1"], &[]), (B, true, &[], &[])], z1, false),
        [A, B]
    );
    // An unready endpoint without a hint does not count.
    assert_eq!(
        hinted(
            &[
                (A, true, &["z1"], &[]),
                (B, false, &[], &[]),
                (C, true, &["z2"], &[])
            ],
            z1,
            false
        ),
        [A]
    );
    // None for this zone: every endpoint.
    assert_eq!(
        hinted(
            &[(A, true, &["z2"], &[]), (B, true, &["z3"], &[])],
            z1,
            false
        ),
        [A, B]
    );
    // This node's zone unknown (no label): every endpoint.
    assert_eq!(
        hinted(
            &[(A, true, &["z1"], &[]), (B, true, &["z2"], &[])],
            None,
            false
        ),
        [A, B]
    );
    // Node hints (PreferSameNode) come first when every ready endpoint has one.
    assert_eq!(
        hinted(
            &[
                (A, true, &["z1"], &["node-a"]),
                (B, true, &["z1"], &["node-b"])
            ],
            z1,
            false
        ),
        [A]
    );
    // Node hints, none for this node: zone hints decide.
    assert_eq!(
        hinted(
            &[
                (A, true, &["z2"], &["node-c"]),
                (B, true, &["z1"], &["node-b"])
            ],
            z1,
            false
        ),
        [B]
    );
    // No endpoint ready (none serving either): nothing to use.
    assert!(hinted(&[(A, false, &["z2"], &[])], z1, false).is_empty());
    // Traffic policy Local: hints do not apply (local endpoints only).
    assert_eq!(
        hinted(
            &[(A, true, &["z2"], &[]), (B, true, &["z1"], &[])],
            z1,
            true
        ),
        [A, B]
    );
}

#[test]
fn dual_stack_services_get_a_service_port_per_family_with_that_familys_endpoints() {
    let mut node = node();
    node.node_ips.push("fd00:18::2".parse().unwrap());
    let o = manifest::parse(include_str!("../testdata/dualstack.yaml")).unwrap();
    assert!(o.rejections.is_empty(), "{:?}", o.rejections);
    let b = build(&o.services, &o.slices, &node);
    assert!(b.rejections.is_empty(), "{:?}", b.rejections);
    let at = |sp: &crate::model::ServicePort| -> Vec<String> {
        sp.frontends.iter().map(|f| f.to_string()).collect()
    };
    let eps = |sp: &crate::model::ServicePort| -> Vec<String> {
        sp.endpoints.iter().map(|e| e.addr.to_string()).collect()
    };
    let web4 = &b.state.services[&key("shop", "web", "http", Protocol::Tcp)];
    let web6_key = ServicePortKey {
        family: Family::V6,
        ..key("shop", "web", "http", Protocol::Tcp)
    };
    let web6 = &b.state.services[&web6_key];
    assert_eq!(web6_key.to_string(), "shop/web:http/TCP/IPv6");
    assert_eq!(at(web4), ["198.18.0.2:30090/TCP", "198.19.0.30:80/TCP"]);
    assert_eq!(eps(web4), ["198.18.1.31"]);
    assert_eq!(at(web6), ["[fd00:18::2]:30090/TCP", "[fd00:19::30]:80/TCP"]);
    assert_eq!(eps(web6), ["fd00:18::1:31", "fd00:18::1:32"]);

    // IPv6 only: one IPv6 service port, no NodePort on the IPv4 address.
    let six: Vec<_> = b
        .state
        .services
        .values()
        .filter(|sp| sp.key.name == "six")
        .collect();
    assert_eq!(six.len(), 1);
    assert_eq!(six[0].key.family, Family::V6);
    assert_eq!(at(six[0]), ["[fd00:19::40]:53/UDP"]);
    assert_eq!(eps(six[0]), ["fd00:18::1:41"]);

    // IPv4 only: its IPv6 externalIP and load-balancer IP are left out (as
    // kube-proxy's IPv6 proxier skips a Service without an IPv6
    // clusterIP), and only its IPv4 source ranges apply.
    let four: Vec<_> = b
        .state
        .services
        .values()
        .filter(|sp| sp.key.name == "four")
        .collect();
    assert!(
        four.iter().all(|sp| sp.key.family == Family::V4),
        "{four:?}"
    );
    assert!(
        four.iter()
            .flat_map(|sp| &sp.frontends)
            .all(|f| f.addr.is_ipv4()),
        "{four:?}"
    );
    let ranges: Vec<String> = four
        .iter()
        .flat_map(|sp| &sp.source_ranges)
        .map(|r| r.to_string())
        .collect();
    assert_eq!(ranges, ["198.18.0.0/24"]);
}

#[test]
fn an_endpoint_address_of_the_other_family_rejects_its_slice() {
    let yaml = include_str!("../testdata/dualstack.yaml").replace(
        "- addresses: [\"fd00:18::1:41\"]",
        "- addresses: [198.18.1.41]",
    );
    let b = build_yaml(&yaml);
    assert_eq!(b.rejections.len(), 1, "{:?}", b.rejections);
    assert_eq!(b.rejections[0].object, "EndpointSlice shop/six-a");
    assert!(
        b.rejections[0].reason.contains("not an IPv6 address"),
        "{}",
        b.rejections[0].reason
    );
    // The rest is programmed.
    assert!(b.state.services.keys().any(|k| k.name == "web"));
}

#[test]
fn prefixes_of_both_families_parse_and_contain() {
    use crate::model::Prefix;
    let p: Prefix = "fd00:18::1:0/112".parse().unwrap();
    assert_eq!(p.to_string(), "fd00:18::1:0/112");
    assert!(p.contains("fd00:18::1:31".parse().unwrap()));
    assert!(!p.contains("fd00:18::2:31".parse().unwrap()));
    assert!(!p.contains("198.18.1.31".parse().unwrap()));
    let q: Prefix = "fd00:18::1:5/112".parse().unwrap();
    assert_eq!(q, p, "host bits cleared");
    assert!("fd00::/129".parse::<Prefix>().is_err());
    let v4: Prefix = "198.18.1.0/24".parse().unwrap();
    assert!(v4.contains("198.18.1.31".parse().unwrap()));
    assert!(!v4.contains("fd00:18::1:31".parse().unwrap()));
    let host: Prefix = "fd00::1".parse().unwrap();
    assert_eq!(host.len, 128);
}
