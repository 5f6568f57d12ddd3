//! Unit tests for the planner: diffs, id allocation, write order.

use std::net::Ipv4Addr;

use lb_common::{BACKEND_F_PRESENT, BACKEND_F_TERMINATING, BACKEND_F_USABLE, SERVICE_F_AFFINITY};

use crate::{
    manifest,
    model::{build, DesiredState, NodeConfig, Protocol, Scope, ServicePortKey},
    planner::{diff, frontend_key, IdAllocator, MemoryMaps, Programmer},
};

fn state(yaml: &str) -> DesiredState {
    let o = manifest::parse(yaml).unwrap();
    let node = NodeConfig {
        name: "n".into(),
        node_ips: vec![Ipv4Addr::new(198, 18, 0, 2)],
        service_proxy_name: None,
    };
    build(&o.services, &o.slices, &node).state
}

fn http() -> ServicePortKey {
    ServicePortKey {
        namespace: "shop".into(),
        name: "web".into(),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
        scope: Scope::Cluster,
    }
}

const BASIC: &str = include_str!("testdata/basic.yaml");

#[test]
fn diff_sees_added_changed_removed_and_unchanged() {
    let a = state(BASIC);
    let d = diff(&Default::default(), &a);
    assert_eq!(d.added.len(), 2);
    let same = diff(&a.services, &a);
    assert!(same.is_empty(), "{same:?}");
    let b = state(&BASIC.replace("198.18.1.12", "198.18.1.14"));
    let d = diff(&a.services, &b);
    // Only the two ports whose endpoints changed.
    assert_eq!(d.changed.len(), 2);
    assert!(d.added.is_empty() && d.removed.is_empty());
    let d = diff(&a.services, &DesiredState::default());
    assert_eq!(d.removed.len(), 2);
}

#[test]
fn id_allocator_reuses_freed_ids_and_stops_at_the_limit() {
    let mut ids = IdAllocator::new(4);
    assert_eq!(
        [
            ids.allocate(),
            ids.allocate(),
            ids.allocate(),
            ids.allocate()
        ],
        [Some(1), Some(2), Some(3), None]
    );
    ids.release(2);
    assert_eq!(ids.allocate(), Some(2));
}

#[test]
fn programs_backends_table_and_frontends_consistently() {
    let mut p = Programmer::new(MemoryMaps::default());
    let s = state(BASIC);
    let r = p.apply(&s);
    assert!(r.failed.is_empty());
    let id = p.service_id(&http()).unwrap();
    let m = p.maps();
    let sp = &s.services[&http()];
    for f in &sp.frontends {
        let e = m.frontends[&frontend_key(f)];
        assert_eq!((e.id, e.backend_count, e.table_size), (id, 2, 251));
        assert_eq!(e.flags & SERVICE_F_AFFINITY, 0);
    }
    // Three listed endpoints, two usable; the table names only usable ones.
    let mine: Vec<_> = m
        .backends
        .iter()
        .filter(|(_, b)| b.service_id == id)
        .collect();
    assert_eq!(mine.len(), 3);
    let table = &m.maglev[&id];
    assert_eq!(table.len(), 251);
    for bid in table {
        let b = m.backends[bid];
        assert_ne!(b.flags & BACKEND_F_USABLE, 0);
        assert_eq!(b.service_id, id);
    }
    let term = mine
        .iter()
        .find(|(_, b)| b.addr == [198, 18, 1, 13])
        .unwrap()
        .1;
    assert_eq!(term.flags, BACKEND_F_PRESENT | BACKEND_F_TERMINATING);
    // Order: every backend of a service before its table, the table before
    // its frontends.
    let pos = |s: &str| m.log.iter().position(|l| l.starts_with(s)).unwrap();
    assert!(pos("set_backend") < pos("set_maglev"));
    assert!(pos(&format!("set_maglev {id}")) < pos("set_frontend [198, 19, 0, 10]:80"));
    assert!(pos(&format!("set_maglev {id}")) < pos("set_frontend [198, 18, 0, 2]:30080"));
}

#[test]
fn unchanged_services_are_not_rewritten() {
    let mut p = Programmer::new(MemoryMaps::default());
    p.apply(&state(BASIC));
    p.maps_mut().log.clear();
    let r = p.apply(&state(BASIC));
    assert!(r.diff.is_empty());
    assert!(p.maps().log.is_empty(), "{:?}", p.maps().log);
}

#[test]
fn removing_an_endpoint_keeps_other_backend_ids_and_clears_it_last() {
    let mut p = Programmer::new(MemoryMaps::default());
    p.apply(&state(BASIC));
    let id = p.service_id(&http()).unwrap();
    let before = p.maps().backends.clone();
    p.maps_mut().log.clear();
    p.apply(&state(&BASIC.replace(
        "- addresses: [198.18.1.12]\n  conditions: {ready: true}\n",
        "",
    )));
    let after = &p.maps().backends;
    let gone = before
        .iter()
        .find(|(_, b)| b.addr == [198, 18, 1, 12] && b.service_id == id)
        .unwrap()
        .0;
    assert!(!after.contains_key(gone));
    for (bid, b) in &before {
        if b.addr != [198, 18, 1, 12] {
            assert_eq!(after[bid].addr, b.addr, "surviving backends keep their ids");
        }
    }
    let log = &p.maps().log;
    let clear = log
        .iter()
        .position(|l| l == &format!("clear_backend {gone}"))
        .unwrap();
    let swap = log
        .iter()
        .position(|l| l == &format!("set_maglev {id}"))
        .unwrap();
    assert!(swap < clear, "{log:?}");
    assert_eq!(
        p.maps().maglev[&id].iter().filter(|b| *b == gone).count(),
        0
    );
}

#[test]
fn no_usable_endpoint_means_zero_backends_and_no_table() {
    let mut p = Programmer::new(MemoryMaps::default());
    let no_eps = BASIC.split("---").next().unwrap();
    p.apply(&state(no_eps));
    let id = p.service_id(&http()).unwrap();
    let e = p.maps().frontends.values().find(|e| e.id == id).unwrap();
    assert_eq!((e.backend_count, e.table_size), (0, 0));
    assert!(!p.maps().maglev.contains_key(&id));
}

#[test]
fn removing_a_service_frees_everything() {
    let mut p = Programmer::new(MemoryMaps::default());
    p.apply(&state(BASIC));
    p.apply(&DesiredState::default());
    let m = p.maps();
    assert!(m.frontends.is_empty() && m.maglev.is_empty() && m.backends.is_empty());
    assert_eq!(p.programmed().count(), 0);
}

#[test]
fn a_frontend_moving_between_services_ends_up_with_the_new_owner() {
    let mut p = Programmer::new(MemoryMaps::default());
    p.apply(&state(BASIC));
    // The cluster IP moves from web to a new service "web2" in one change.
    let moved = BASIC.replace("198.19.0.10", "198.19.0.11")
        + "---\napiVersion: v1\nkind: Service\nmetadata: {name: web2, namespace: shop}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{name: http, port: 80}]\n";
    p.apply(&state(&moved));
    let web2 = ServicePortKey {
        name: "web2".into(),
        ..http()
    };
    let owner = p
        .maps()
        .frontends
        .iter()
        .find(|(k, _)| k.addr == [198, 19, 0, 10] && k.port == 80)
        .unwrap()
        .1
        .id;
    assert_eq!(owner, p.service_id(&web2).unwrap());
}

#[test]
fn policies_become_frontend_and_backend_flags_and_source_ranges() {
    use lb_common::{
        BACKEND_F_LOCAL, SERVICE_F_EXTERNAL, SERVICE_F_LOCAL, SERVICE_F_SOURCE_RANGES,
    };
    let o = manifest::parse(include_str!("testdata/policies.yaml")).unwrap();
    let node = NodeConfig {
        name: "node-a".into(),
        node_ips: vec![Ipv4Addr::new(198, 18, 0, 2)],
        service_proxy_name: None,
    };
    let desired = build(&o.services, &o.slices, &node).state;
    let mut p = Programmer::new(MemoryMaps::default());
    assert!(p.apply(&desired).failed.is_empty());
    let m = p.maps();
    let flags_of = |addr: [u8; 4], port: u16| {
        m.frontends
            .iter()
            .find(|(k, _)| k.addr == addr && k.port == port)
            .map(|(_, e)| (e.flags, e.id, e.backend_count))
            .unwrap()
    };
    let (cip, cluster_id, n) = flags_of([198, 19, 0, 20], 80);
    assert_eq!((cip, n), (0, 3), "ClusterIP: cluster-wide, 3 ready");
    let (np, local_id, n) = flags_of([198, 18, 0, 2], 30100);
    assert_eq!((np, n), (SERVICE_F_EXTERNAL | SERVICE_F_LOCAL, 1));
    assert_ne!(cluster_id, local_id);
    let (lb, _, _) = flags_of([198, 18, 6, 1], 80);
    assert_eq!(
        lb,
        SERVICE_F_EXTERNAL | SERVICE_F_LOCAL | SERVICE_F_SOURCE_RANGES
    );
    let (eip, _, _) = flags_of([198, 18, 5, 1], 80);
    assert_eq!(
        eip,
        SERVICE_F_EXTERNAL | SERVICE_F_LOCAL,
        "ranges are for LB IPs"
    );
    let ranges: Vec<String> = m
        .source_ranges
        .iter()
        .map(|(id, r)| format!("{id} {r}"))
        .collect();
    assert_eq!(
        ranges,
        [
            format!("{local_id} 198.18.0.0/16"),
            format!("{local_id} 198.18.0.0/24")
        ]
    );
    let local_backends = m
        .backends
        .values()
        .filter(|b| b.flags & BACKEND_F_LOCAL != 0)
        .count();
    assert_eq!(local_backends, 2 + 2, "two local endpoints, in both scopes");

    // Dropping a range removes it after the frontends; deleting the
    // service removes the rest.
    let one = include_str!("testdata/policies.yaml").replace(", \"198.18.7.9/16\"", "");
    let desired = build(&manifest::parse(&one).unwrap().services, &o.slices, &node).state;
    assert!(p.apply(&desired).failed.is_empty());
    assert_eq!(p.maps().source_ranges.len(), 1);
    let log = &p.maps().log;
    let removed = log
        .iter()
        .position(|l| l.starts_with("remove_source_range"))
        .unwrap();
    let last_frontend = log
        .iter()
        .rposition(|l| l.starts_with("set_frontend"))
        .unwrap();
    assert!(removed > last_frontend, "{log:?}");
    assert!(p.apply(&DesiredState::default()).failed.is_empty());
    assert!(p.maps().source_ranges.is_empty());
    assert!(p.maps().frontends.is_empty());
}

/// A second programmer over the maps the first one filled, as after an
/// agent restart.
fn restarted(p: Programmer<MemoryMaps>) -> Programmer<MemoryMaps> {
    let mut maps = p.into_maps();
    maps.log.clear();
    Programmer::adopt(maps).unwrap()
}

#[test]
fn a_restarted_programmer_keeps_every_id_and_rewrites_the_same_contents() {
    let mut first = Programmer::new(MemoryMaps::default());
    first.apply(&state(BASIC));
    let ids: Vec<(ServicePortKey, u32)> =
        first.programmed().map(|(k, id)| (k.clone(), id)).collect();
    let (backends, tables, frontends) = (
        first.maps().backends.clone(),
        first.maps().maglev.clone(),
        first.maps().frontends.clone(),
    );
    let mut second = restarted(first);
    let r = second.apply(&state(BASIC));
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!((r.adopted, r.stale_removed), (2, 0));
    let again: Vec<(ServicePortKey, u32)> =
        second.programmed().map(|(k, id)| (k.clone(), id)).collect();
    assert_eq!(again, ids);
    let m = second.maps();
    assert_eq!(m.backends, backends);
    assert_eq!(
        m.maglev, tables,
        "same backends give the same Maglev tables"
    );
    assert_eq!(m.frontends, frontends);
    assert!(
        !m.log
            .iter()
            .any(|l| l.starts_with("remove") || l.starts_with("clear")),
        "{:?}",
        m.log
    );
    // Adoption is over: the next apply is an ordinary one.
    let mut second = second;
    second.maps_mut().log.clear();
    assert!(second.apply(&state(BASIC)).diff.is_empty());
    assert!(second.maps().log.is_empty());
}

#[test]
fn a_restarted_programmer_deletes_only_what_went_away_meanwhile() {
    let two_services = BASIC.to_string()
        + "---\napiVersion: v1\nkind: Service\nmetadata: {name: old, namespace: shop}\nspec:\n  clusterIP: 198.19.0.20\n  ports: [{name: http, port: 80}]\n";
    let mut first = Programmer::new(MemoryMaps::default());
    first.apply(&state(&two_services));
    let web = first.service_id(&http()).unwrap();
    let kept = *first
        .maps()
        .backends
        .iter()
        .find(|(_, b)| b.addr == [198, 18, 1, 11] && b.service_id == web)
        .unwrap()
        .0;
    // A backend no service owns (say, left by a crash mid-update).
    first.maps_mut().backends.insert(
        9999,
        lb_common::Backend {
            addr: [198, 18, 1, 99],
            port: 1,
            flags: BACKEND_F_PRESENT,
            _pad: 0,
            service_id: 777,
        },
    );
    let mut second = restarted(first);
    // Meanwhile: "old" was deleted, 198.18.1.12 left web, a new service came.
    let now = BASIC.replace("- addresses: [198.18.1.12]\n  conditions: {ready: true}\n", "")
        + "---\napiVersion: v1\nkind: Service\nmetadata: {name: new, namespace: shop}\nspec:\n  clusterIP: 198.19.0.30\n  ports: [{name: http, port: 80}]\n";
    let r = second.apply(&state(&now));
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(
        r.stale_removed, 2,
        "the deleted service and the stray backend's id"
    );
    assert_eq!(second.service_id(&http()), Some(web));
    let m = second.maps();
    assert_eq!(
        m.backends[&kept].addr,
        [198, 18, 1, 11],
        "a remaining backend keeps its id"
    );
    assert!(!m
        .backends
        .values()
        .any(|b| b.addr == [198, 18, 1, 12] || b.addr == [198, 18, 1, 99]));
    assert!(!m.frontends.keys().any(|k| k.addr == [198, 19, 0, 20]));
    let new = ServicePortKey {
        name: "new".into(),
        ..http()
    };
    let new_id = second.service_id(&new).unwrap();
    assert!(
        second.programmed().filter(|(_, id)| *id == new_id).count() == 1,
        "no id is handed out twice"
    );
    // Everything in the maps belongs to a programmed service.
    let live: std::collections::BTreeSet<u32> = second.programmed().map(|(_, id)| id).collect();
    assert!(m.frontends.values().all(|e| live.contains(&e.id)));
    assert!(m.backends.values().all(|b| live.contains(&b.service_id)));
    assert!(m.maglev.keys().all(|id| live.contains(id)));
}

#[test]
fn backend_count_follows_adds_and_removals() {
    let mut p = Programmer::new(MemoryMaps::default());
    p.apply(&state(BASIC));
    assert_eq!(p.backend_count(), p.maps().backends.len());
    p.apply(&state(&BASIC.replace(
        "- addresses: [198.18.1.12]\n  conditions: {ready: true}\n",
        "",
    )));
    assert_eq!(p.backend_count(), p.maps().backends.len());
    p.apply(&DesiredState::default());
    assert_eq!(p.backend_count(), 0);
}
