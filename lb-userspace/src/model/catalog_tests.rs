//! Unit tests for the incremental catalog: it must always equal a full
//! `model::build` of the same objects, while rebuilding only what an event
//! touched.

use std::net::Ipv4Addr;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::{
    model::catalog::Catalog,
    model::{build, NodeConfig},
    source::manifest,
};

const BASIC: &str = include_str!("../testdata/basic.yaml");
const POLICIES: &str = include_str!("../testdata/policies.yaml");

fn node() -> NodeConfig {
    NodeConfig {
        name: "node-a".into(),
        node_ips: vec![Ipv4Addr::new(198, 18, 0, 2).into()],
        service_proxy_name: None,
        ..Default::default()
    }
}

fn objects(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let o = manifest::parse(yaml).unwrap();
    (o.services, o.slices)
}

fn loaded(yaml: &str) -> Catalog {
    let (services, slices) = objects(yaml);
    let mut c = Catalog::new(node());
    c.replace_services(&services);
    c.replace_slices(&slices);
    c.rebuild();
    c
}

fn full(yaml: &str) -> crate::model::DesiredState {
    let (services, slices) = objects(yaml);
    build(&services, &slices, &node()).state
}

#[test]
fn loading_everything_equals_a_full_build() {
    for yaml in [BASIC, POLICIES] {
        assert_eq!(loaded(yaml).state(), &full(yaml));
    }
}

#[test]
fn one_endpoint_change_rebuilds_one_service_and_names_only_its_ports() {
    let mut c = loaded(&(BASIC.to_string() + "---\n" + POLICIES));
    let changed = BASIC.replace(
        "- addresses: [198.18.1.11]\n  conditions: {ready: true, serving: true, terminating: false}",
        "- addresses: [198.18.1.11]\n  conditions: {ready: false, serving: true, terminating: false}",
    );
    assert_ne!(changed, BASIC, "the fixture has this endpoint");
    let (_, slices) = objects(&changed);
    c.apply_slice(&slices[0]);
    let r = c.rebuild();
    assert_eq!(r.services, 1);
    let keys = r.keys.expect("incremental");
    assert!(
        keys.iter()
            .all(|k| k.name == "web" && k.namespace == "shop"),
        "{keys:?}"
    );
    assert_eq!(c.state(), &full(&(changed + "---\n" + POLICIES)));
    // Nothing changed since: nothing to do.
    assert!(!c.is_dirty());
}

#[test]
fn deleting_and_relisting_remove_what_is_gone() {
    let both = BASIC.to_string() + "---\n" + POLICIES;
    let mut c = loaded(&both);
    let (services, slices) = objects(BASIC);
    // A relist that no longer has the POLICIES objects.
    c.replace_services(&services);
    c.replace_slices(&slices);
    let r = c.rebuild();
    assert_eq!(r.keys, None, "services left: ownership is worked out again");
    assert_eq!(c.state(), &full(BASIC));
    // Deleting the last slice of web leaves its service without endpoints.
    c.delete_slice(&slices[0]);
    c.rebuild();
    assert_eq!(c.state(), &full(BASIC.split("---").next().unwrap()));
    c.delete_service(&services[0]);
    c.rebuild();
    assert!(c.state().services.is_empty());
}

#[test]
fn an_endpoint_moving_between_slices_is_one_consistent_change() {
    let mut c = loaded(BASIC);
    let before = c.state().clone();
    let (_, slices) = objects(BASIC);
    // Split web-abc in two slices carrying the same endpoints.
    let mut first = slices[0].clone();
    let mut second = slices[0].clone();
    second.metadata.name = Some("web-def".into());
    first.endpoints.truncate(1);
    second.endpoints.remove(0);
    c.apply_slice(&second);
    c.apply_slice(&first);
    c.rebuild();
    assert_eq!(c.state(), &before, "same endpoints, same state");
}

#[test]
fn a_service_that_loses_a_frontend_conflict_is_rejected_once_and_wins_when_the_owner_goes() {
    let clash = "---\napiVersion: v1\nkind: Service\nmetadata: {name: late, namespace: shop, creationTimestamp: \"2026-02-01T00:00:00Z\"}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{name: http, port: 80}]\n";
    let yaml = BASIC.to_string() + clash;
    let (services, slices) = objects(&yaml);
    let mut c = Catalog::new(node());
    c.replace_services(&services);
    c.replace_slices(&slices);
    let r = c.rebuild();
    assert_eq!(r.rejections.len(), 1, "{:?}", r.rejections);
    assert!(r.rejections[0].object.contains("shop/late"));
    // Rebuilding again does not report it again.
    c.replace_services(&services);
    c.set_node(node());
    assert!(c.rebuild().rejections.is_empty());
    // The owner goes: the late one takes the address.
    c.delete_service(&services[0]);
    c.rebuild();
    assert!(c.state().services.keys().all(|k| k.name == "late"));
    assert_eq!(c.state(), &full(clash));
}

#[test]
fn an_endpoint_change_keeps_a_lost_frontend_out() {
    let svc = |name: &str, day: u8, ip: &str, ext: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop, creationTimestamp: \"2026-01-{day:02}T00:00:00Z\"}}\nspec:\n  clusterIP: {ip}\n  externalIPs: [{ext}]\n  ports: [{{name: http, port: 80}}]\n"
        )
    };
    let slice = |ep: &str| {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: new-1, namespace: shop, labels: {{kubernetes.io/service-name: new}}}}\naddressType: IPv4\nports: [{{name: http, port: 80}}]\nendpoints: [{{addresses: [{ep}]}}]\n"
        )
    };
    let base =
        svc("old", 1, "198.19.0.1", "198.18.50.1") + &svc("new", 2, "198.19.0.2", "198.18.50.1");
    let (services, slices) = objects(&(base.clone() + &slice("198.18.1.1")));
    let mut c = Catalog::new(node());
    c.replace_services(&services);
    c.replace_slices(&slices);
    let first = c.rebuild();
    assert_eq!(first.partial.len(), 1, "{:?}", first.partial);
    // Only new's endpoints change: an incremental rebuild.
    let (_, slices) = objects(&(base.clone() + &slice("198.18.1.2")));
    c.replace_slices(&slices);
    let r = c.rebuild();
    assert!(r.keys.is_some(), "incremental");
    assert!(r.partial.is_empty(), "reported once: {:?}", r.partial);
    assert_eq!(c.state(), &full(&(base + &slice("198.18.1.2"))));
}

#[test]
fn a_list_in_parts_changes_nothing_until_its_last_part_then_equals_a_full_build() {
    let both = BASIC.to_string() + "---\n" + POLICIES;
    let mut c = loaded(&both);
    let before = c.state().clone();
    // A relist of BASIC alone, one object per part; an abandoned list
    // first, whose parts must not count.
    let (services, slices) = objects(BASIC);
    let (policy_services, _) = objects(POLICIES);
    c.begin_services_list();
    c.list_services(&policy_services, false);
    c.begin_services_list();
    c.begin_slices_list();
    for s in &services {
        c.list_services(std::slice::from_ref(s), false);
    }
    for s in &slices {
        assert!(c.list_slices(std::slice::from_ref(s), false).is_empty());
    }
    c.rebuild();
    assert_eq!(c.state(), &before, "parts alone change nothing");
    c.list_services(&[], true);
    assert!(c.list_slices(&[], true).is_empty());
    c.rebuild();
    assert_eq!(c.state(), &full(BASIC));
}
