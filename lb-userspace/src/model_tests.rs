//! Unit tests for manifest parsing and the desired-state model.

use std::net::Ipv4Addr;

use crate::{
    manifest,
    model::{build, Build, FrontendKind, NodeConfig, Protocol, ServicePortKey},
};

fn node() -> NodeConfig {
    NodeConfig {
        name: "node-a".into(),
        node_ips: vec![Ipv4Addr::new(198, 18, 0, 2)],
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
    }
}

#[test]
fn multi_document_stream_gives_one_service_port_per_port() {
    let b = build_yaml(include_str!("testdata/basic.yaml"));
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
    let b = build_yaml(include_str!("testdata/basic.yaml"));
    let http = &b.state.services[&key("shop", "web", "http", Protocol::Tcp)];
    let usable: Vec<Ipv4Addr> = http.usable_endpoints().iter().map(|e| e.addr).collect();
    // The terminating endpoint is listed but not used while ready ones exist.
    assert_eq!(
        usable,
        [Ipv4Addr::new(198, 18, 1, 11), Ipv4Addr::new(198, 18, 1, 12)]
    );

    let only_terminating = include_str!("testdata/basic.yaml")
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
    let usable: Vec<Ipv4Addr> = http.usable_endpoints().iter().map(|e| e.addr).collect();
    assert_eq!(
        usable,
        [Ipv4Addr::new(198, 18, 1, 13)],
        "serving+terminating fallback"
    );
}

#[test]
fn list_kind_merges_slices_and_skips_headless_and_external_name() {
    let b = build_yaml(include_str!("testdata/list.yaml"));
    assert!(b.rejections.is_empty(), "{:?}", b.rejections);
    assert_eq!(b.state.services.len(), 1);
    let api = &b.state.services[&key("default", "api", "", Protocol::Tcp)];
    let addrs: Vec<Ipv4Addr> = api.endpoints.iter().map(|e| e.addr).collect();
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
        include_str!("testdata/basic.yaml"),
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
        let yaml = include_str!("testdata/basic.yaml").replacen(
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
    let yaml = format!("{newer}---\n{}", include_str!("testdata/basic.yaml"));
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
    let yaml = include_str!("testdata/basic.yaml").replace("198.18.1.12", "not-an-ip");
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
fn sctp_and_bad_affinity_timeout_are_rejected() {
    let sctp = include_str!("testdata/basic.yaml").replacen(
        "protocol: UDP\n    targetPort",
        "protocol: SCTP\n    targetPort",
        1,
    );
    let b = build_yaml(&sctp);
    assert!(
        b.rejections[0].reason.contains("SCTP"),
        "{:?}",
        b.rejections
    );
    let aff =
        include_str!("testdata/list.yaml").replace("timeoutSeconds: 60", "timeoutSeconds: 100000");
    let b = build_yaml(&aff);
    assert!(
        b.rejections[0].reason.contains("100000"),
        "{:?}",
        b.rejections
    );
}

#[test]
fn loadbalancer_gets_cluster_ip_and_node_ports() {
    let yaml = include_str!("testdata/basic.yaml").replace("type: NodePort", "type: LoadBalancer");
    let b = build_yaml(&yaml);
    let http = &b.state.services[&key("shop", "web", "http", Protocol::Tcp)];
    assert_eq!(http.frontends.len(), 2);
    let cip = include_str!("testdata/basic.yaml").replace("type: NodePort", "type: ClusterIP");
    let b = build_yaml(&cip);
    let http = &b.state.services[&key("shop", "web", "http", Protocol::Tcp)];
    assert_eq!(
        http.frontends.len(),
        1,
        "nodePort ignored for type ClusterIP"
    );
}
