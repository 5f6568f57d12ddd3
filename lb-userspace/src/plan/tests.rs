//! Unit tests for the planner: diffs, id allocation, write order.

use lb_common::addr::from_v4 as v4;
use std::net::Ipv4Addr;

use std::collections::HashMap;

use lb_common::{
    FrontendKey, ServiceEntry, BACKEND_F_PRESENT, BACKEND_F_TERMINATING, BACKEND_F_USABLE,
    SERVICE_F_AFFINITY, SERVICE_F_TABLE_B,
};

use crate::{
    model::{build, DesiredState, NodeConfig, Protocol, Scope, ServicePortKey},
    plan::{diff, frontend_key, MemoryMaps, Programmer},
    source::manifest,
};

fn state(yaml: &str) -> DesiredState {
    let o = manifest::parse(yaml).unwrap();
    let node = NodeConfig {
        name: "n".into(),
        node_ips: vec![Ipv4Addr::new(198, 18, 0, 2).into()],
        service_proxy_name: None,
        ..Default::default()
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
        family: crate::model::Family::V4,
    }
}

const BASIC: &str = include_str!("../testdata/basic.yaml");

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
    let table = m.tables_of(id)[0];
    assert_eq!(table.len(), 251);
    for bid in table {
        let b = m.backends[bid];
        assert_ne!(b.flags & BACKEND_F_USABLE, 0);
        assert_eq!(b.service_id, id);
    }
    let term = mine
        .iter()
        .find(|(_, b)| b.addr == v4([198, 18, 1, 13]))
        .unwrap()
        .1;
    assert_eq!(term.flags, BACKEND_F_PRESENT | BACKEND_F_TERMINATING);
    // Order: every backend of a service before its table, the table before
    // its frontends.
    let pos = |s: &str| m.log.iter().position(|l| l.starts_with(s)).unwrap();
    assert!(pos("set_backend") < pos("set_maglev"));
    assert!(pos(&format!("set_maglev {id}/")) < pos("set_frontend 198.19.0.10:80"));
    assert!(pos(&format!("set_maglev {id}/")) < pos("set_frontend 198.18.0.2:30080"));
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
        .find(|(_, b)| b.addr == v4([198, 18, 1, 12]) && b.service_id == id)
        .unwrap()
        .0;
    assert!(!after.contains_key(gone));
    for (bid, b) in &before {
        if b.addr != v4([198, 18, 1, 12]) {
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
        .position(|l| l.starts_with(&format!("set_maglev {id}/")))
        .unwrap();
    assert!(swap < clear, "{log:?}");
    assert_eq!(
        p.maps().tables_of(id)[0]
            .iter()
            .filter(|b| *b == gone)
            .count(),
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
    assert!(p.maps().tables_of(id).is_empty());
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
        .find(|(k, _)| k.addr == v4([198, 19, 0, 10]) && k.port == 80)
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
    let o = manifest::parse(include_str!("../testdata/policies.yaml")).unwrap();
    let node = NodeConfig {
        name: "node-a".into(),
        node_ips: vec![Ipv4Addr::new(198, 18, 0, 2).into()],
        service_proxy_name: None,
        ..Default::default()
    };
    let desired = build(&o.services, &o.slices, &node).state;
    let mut p = Programmer::new(MemoryMaps::default());
    assert!(p.apply(&desired).failed.is_empty());
    let m = p.maps();
    let view_of = |addr: [u8; 4], port: u16, view: u8| {
        m.frontends
            .iter()
            .find(|(k, _)| k.addr == v4(addr) && k.port == port && k.view == view)
            .map(|(_, e)| (e.flags, e.id, e.backend_count))
            .unwrap()
    };
    let flags_of = |addr: [u8; 4], port: u16| view_of(addr, port, lb_common::FRONTEND_VIEW_ALL);
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
    // Their in-cluster views lead to the ClusterIP's endpoints, reached
    // like the ClusterIP (no masquerade); an LB IP's keeps its ranges.
    let in_cluster = lb_common::FRONTEND_VIEW_IN_CLUSTER;
    assert_eq!(
        view_of([198, 18, 0, 2], 30100, in_cluster),
        (0, cluster_id, 3)
    );
    assert_eq!(view_of([198, 18, 5, 1], 80, in_cluster), (0, cluster_id, 3));
    assert_eq!(
        view_of([198, 18, 6, 1], 80, in_cluster),
        (SERVICE_F_SOURCE_RANGES, cluster_id, 3)
    );
    assert!(
        m.frontends.keys().all(|k| k.view == 0
            || [
                v4([198, 18, 0, 2]),
                v4([198, 18, 5, 1]),
                v4([198, 18, 6, 1])
            ]
            .contains(&k.addr)),
        "only external frontends with policy Local have an in-cluster view"
    );
    let ranges: Vec<String> = m
        .source_ranges
        .iter()
        .map(|(id, r)| format!("{id} {r}"))
        .collect();
    let mut want = vec![
        format!("{local_id} 198.18.0.0/16"),
        format!("{local_id} 198.18.0.0/24"),
        format!("{cluster_id} 198.18.0.0/16"),
        format!("{cluster_id} 198.18.0.0/24"),
    ];
    want.sort();
    let mut ranges = ranges;
    ranges.sort();
    assert_eq!(ranges, want);
    let local_backends = m
        .backends
        .values()
        .filter(|b| b.flags & BACKEND_F_LOCAL != 0)
        .count();
    assert_eq!(local_backends, 2 + 2, "two local endpoints, in both scopes");

    // Dropping a range removes it after the frontends; deleting the
    // service removes the rest.
    let one = include_str!("../testdata/policies.yaml").replace(", \"198.18.7.9/16\"", "");
    let desired = build(&manifest::parse(&one).unwrap().services, &o.slices, &node).state;
    assert!(p.apply(&desired).failed.is_empty());
    assert_eq!(
        p.maps().source_ranges.len(),
        2,
        "one range left, for both scopes"
    );
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
    // The same entries, but reading the other half: the adopted tables
    // were rewritten in place (no fresh array, so no RCU wait), into the
    // half no frontend read.
    let unflipped = |f: &HashMap<FrontendKey, ServiceEntry>| -> Vec<(FrontendKey, ServiceEntry)> {
        let mut v: Vec<_> = f
            .iter()
            .map(|(k, e)| {
                (
                    *k,
                    ServiceEntry {
                        flags: e.flags & !SERVICE_F_TABLE_B,
                        ..*e
                    },
                )
            })
            .collect();
        v.sort_by_key(|(k, _)| (k.addr, k.port, k.proto, k.view));
        v
    };
    assert_eq!(unflipped(&m.frontends), unflipped(&frontends));
    assert!(m
        .frontends
        .values()
        .all(|e| e.flags & SERVICE_F_TABLE_B != 0));
    assert!(
        m.log
            .iter()
            .all(|l| !l.starts_with("set_maglev") || l.ends_with("Half(1)")),
        "{:?}",
        m.log
    );
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
        .find(|(_, b)| b.addr == v4([198, 18, 1, 11]) && b.service_id == web)
        .unwrap()
        .0;
    // A backend no service owns (say, left by a crash mid-update).
    first.maps_mut().backends.insert(
        9999,
        lb_common::Backend {
            addr: v4([198, 18, 1, 99]),
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
        v4([198, 18, 1, 11]),
        "a remaining backend keeps its id"
    );
    assert!(!m
        .backends
        .values()
        .any(|b| b.addr == v4([198, 18, 1, 12]) || b.addr == v4([198, 18, 1, 99])));
    assert!(!m.frontends.keys().any(|k| k.addr == v4([198, 19, 0, 20])));
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
    assert!(m.maglev.keys().all(|k| live.contains(&k.service_id)));
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

// ------------------------------------------------------------ failures
//
// Every write of a change is failed in turn (one alone, and every write
// from it on, as a crash would); after each, nothing in the maps may lead
// a frontend to backends that are not its own service's, a frontend's
// table size always names a table that exists, and once writes succeed
// again the retries converge to exactly what a clean run writes.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::Backend;

use crate::{
    model::Prefix,
    plan::{DatapathMaps, Snapshot, TableWrite},
};

/// `MemoryMaps` that fail the writes `fail` picks, by number (counted from
/// 1 over every single write, each table of a batch too) and description.
struct Faulty {
    inner: MemoryMaps,
    count: usize,
    fail: Box<dyn Fn(usize, &str) -> bool>,
}

impl Faulty {
    fn new(inner: MemoryMaps) -> Faulty {
        Faulty {
            inner,
            count: 0,
            fail: Box::new(|_, _| false),
        }
    }

    fn check(&mut self, what: String) -> anyhow::Result<()> {
        self.count += 1;
        if (self.fail)(self.count, &what) {
            anyhow::bail!("injected failure of write {}: {what}", self.count);
        }
        Ok(())
    }
}

impl DatapathMaps for Faulty {
    fn set_backend(&mut self, id: u32, backend: Backend) -> anyhow::Result<()> {
        self.check(format!("set_backend {id}"))?;
        self.inner.set_backend(id, backend)
    }
    fn clear_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.check(format!("clear_backend {id}"))?;
        self.inner.clear_backend(id)
    }
    fn write_maglev(&mut self, tables: &[TableWrite]) -> Vec<anyhow::Result<()>> {
        tables
            .iter()
            .map(|t| {
                let what = format!(
                    "maglev {}/{} {}",
                    t.0.service_id,
                    t.0.table_size,
                    t.1.is_some()
                );
                self.check(what)?;
                self.inner.write_maglev(std::slice::from_ref(t)).remove(0)
            })
            .collect()
    }
    fn set_frontend(&mut self, key: FrontendKey, entry: ServiceEntry) -> anyhow::Result<()> {
        self.check(format!(
            "set_frontend {}",
            lb_common::addr::to_ip(&key.addr)
        ))?;
        self.inner.set_frontend(key, entry)
    }
    fn remove_frontend(&mut self, key: FrontendKey) -> anyhow::Result<()> {
        self.check(format!(
            "remove_frontend {}",
            lb_common::addr::to_ip(&key.addr)
        ))?;
        self.inner.remove_frontend(key)
    }
    fn set_source_range(&mut self, service_id: u32, range: Prefix) -> anyhow::Result<()> {
        self.check(format!("set_source_range {service_id}"))?;
        self.inner.set_source_range(service_id, range)
    }
    fn remove_source_range(&mut self, service_id: u32, range: Prefix) -> anyhow::Result<()> {
        self.check(format!("remove_source_range {service_id}"))?;
        self.inner.remove_source_range(service_id, range)
    }
    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        self.inner.snapshot()
    }
}

/// A ClusterIP Service `name` (NodePort `np` if given) with one port and
/// ready endpoints `eps` (last octets in 198.18.1.0/24), and its slice.
fn svc(name: &str, ip: &str, np: Option<u16>, eps: &[u8]) -> String {
    let (kind, node_port) = match np {
        Some(p) => ("NodePort", format!(", nodePort: {p}")),
        None => ("ClusterIP", String::new()),
    };
    let mut y = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  type: {kind}\n  clusterIP: {ip}\n  loadBalancerSourceRanges: []\n  \
         ports: [{{name: http, port: 80, targetPort: 8080{node_port}}}]\n"
    );
    if !eps.is_empty() {
        y += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
        );
        for e in eps {
            y += &format!("- addresses: [198.18.1.{e}]\n");
        }
    }
    y
}

fn lb(name: &str, ip: &str, lb_ip: &str, ranges: &[&str], eps: &[u8]) -> String {
    svc(name, ip, Some(30100), eps)
        .replace("type: NodePort", "type: LoadBalancer")
        .replace(
            "loadBalancerSourceRanges: []",
            &format!("loadBalancerSourceRanges: [{}]", ranges.join(", ")),
        )
        .replacen(
            "\n---\napiVersion: discovery",
            &format!("\nstatus: {{loadBalancer: {{ingress: [{{ip: {lb_ip}}}]}}}}\n---\napiVersion: discovery"),
            1,
        )
}

/// Changes worth failing part-way: (name, before, after).
fn changes() -> Vec<(&'static str, String, String)> {
    let many: Vec<u8> = (10..40).collect();
    vec![
        (
            "endpoints change and the table shrinks",
            svc("a", "198.19.0.1", Some(30001), &many),
            svc("a", "198.19.0.1", Some(30001), &[10, 50, 51]),
        ),
        (
            "the table grows",
            svc("a", "198.19.0.1", None, &[10]),
            svc("a", "198.19.0.1", None, &many),
        ),
        (
            "a service goes and another comes (ids must not be reused early)",
            svc("a", "198.19.0.1", Some(30001), &[10, 11]),
            svc("b", "198.19.0.2", Some(30002), &[20, 21]),
        ),
        (
            "a ClusterIP moves from one service to another",
            svc("a", "198.19.0.1", None, &[10, 11]) + &svc("b", "198.19.0.2", None, &[20]),
            svc("a", "198.19.0.3", None, &[10, 11]) + &svc("b", "198.19.0.1", None, &[20]),
        ),
        (
            "the last endpoint goes",
            svc("a", "198.19.0.1", None, &[10, 11]),
            svc("a", "198.19.0.1", None, &[]),
        ),
        (
            "source ranges change",
            lb("a", "198.19.0.1", "198.18.9.1", &["198.18.0.0/16"], &[10]),
            lb(
                "a",
                "198.19.0.1",
                "198.18.9.1",
                &["198.18.5.0/24", "198.18.6.0/24"],
                &[10, 11],
            ),
        ),
    ]
}

/// Every endpoint target a frontend may lead to in any of `states`.
fn allowed(states: &[&DesiredState]) -> BTreeMap<FrontendKey, BTreeSet<(lb_common::Addr, u16)>> {
    let mut out: BTreeMap<FrontendKey, BTreeSet<(lb_common::Addr, u16)>> = BTreeMap::new();
    for s in states {
        for sp in s.services.values() {
            for f in &sp.frontends {
                out.entry(frontend_key(f)).or_default().extend(
                    sp.endpoints
                        .iter()
                        .map(|e| (lb_common::addr::from_ip(e.addr), e.port)),
                );
            }
        }
    }
    out
}

/// What the datapath can do with the maps right now is safe: each
/// frontend's table exists at the size the frontend names, and every
/// backend it can reach is an endpoint it had or has.
fn assert_safe(m: &MemoryMaps, states: &[&DesiredState], what: &str) {
    let allowed = allowed(states);
    for (f, e) in &m.frontends {
        let ok = allowed.get(f);
        assert!(ok.is_some(), "{what}: frontend {f:?} was never asked for");
        if e.table_size == 0 {
            continue;
        }
        let table = m.table_for(e).unwrap_or_else(|| {
            panic!(
                "{what}: frontend {f:?} names table {}/{} that is not there",
                e.id, e.table_size
            )
        });
        assert_eq!(table.len() as u32, e.table_size, "{what}");
        for bid in table {
            // The datapath takes a backend only if it names this service.
            let Some(b) = m.backends.get(bid).filter(|b| b.service_id == e.id) else {
                continue;
            };
            assert!(
                ok.unwrap().contains(&(b.addr, b.port)),
                "{what}: frontend {f:?} leads to {:?}:{}, not one of its endpoints",
                b.addr,
                b.port
            );
        }
    }
}

/// The maps without their ids: what each frontend does, and that nothing
/// else is left.
fn canonical(m: &MemoryMaps) -> (Vec<String>, usize, usize, usize) {
    let mut frontends: Vec<String> = m
        .frontends
        .iter()
        .map(|(f, e)| {
            let slots: Vec<String> = m
                .table_for(e)
                .into_iter()
                .flatten()
                .map(|bid| {
                    let b = &m.backends[bid];
                    format!("{:?}:{}:{}", b.addr, b.port, b.flags)
                })
                .collect();
            let ranges: Vec<String> = m
                .source_ranges
                .iter()
                .filter(|(id, _)| *id == e.id)
                .map(|(_, r)| r.to_string())
                .collect();
            format!(
                "{f:?} size={} count={} flags={} aff={} ranges={ranges:?} slots={slots:?}",
                e.table_size,
                e.backend_count,
                // Which half holds the table depends on the history.
                e.flags & !SERVICE_F_TABLE_B,
                e.affinity_timeout_s
            )
        })
        .collect();
    frontends.sort();
    (
        frontends,
        m.backends.len(),
        m.maglev.len(),
        m.source_ranges.len(),
    )
}

fn all_writes_of(before: &DesiredState, after: &DesiredState) -> usize {
    let mut p = Programmer::new(Faulty::new(MemoryMaps::default()));
    assert!(p.apply(before).failed.is_empty());
    let start = p.maps().count;
    assert!(p.apply(after).failed.is_empty());
    p.maps().count - start
}

fn clean(before: &DesiredState, after: &DesiredState) -> MemoryMaps {
    let mut p = Programmer::new(MemoryMaps::default());
    p.apply(before);
    p.apply(after);
    p.into_maps()
}

#[test]
fn every_failed_write_is_safe_and_converges_once_writes_succeed() {
    let far = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    for (name, before, after) in changes() {
        let (before, after) = (state(&before), state(&after));
        let n = all_writes_of(&before, &after);
        assert!(n > 0, "{name}: the change writes something");
        let expected = canonical(&clean(&before, &after));
        for i in 1..=n {
            for from_on in [false, true] {
                let what = format!(
                    "{name}: write {i} of {n} failing{}",
                    if from_on { " and every one after" } else { "" }
                );
                let mut p = Programmer::new(Faulty::new(MemoryMaps::default()));
                assert!(p.apply(&before).failed.is_empty());
                let start = p.maps().count;
                p.maps_mut().fail = Box::new(move |c, _| {
                    let k = c - start;
                    if from_on {
                        k >= i
                    } else {
                        k == i
                    }
                });
                let r = p.apply(&after);
                assert!(
                    !r.failed.is_empty() || p.state().orphans.len() + p.pending() > 0,
                    "{what}: the failure is reported"
                );
                assert_safe(&p.maps().inner, &[&before, &after], &what);
                assert!(p.next_retry().is_some(), "{what}: a retry is scheduled");

                // Writes work again: retries (not a new event) converge.
                p.maps_mut().fail = Box::new(|_, _| false);
                for _ in 0..3 {
                    if p.next_retry().is_none() {
                        break;
                    }
                    p.retry_due(&after, far);
                    assert_safe(&p.maps().inner, &[&before, &after], &what);
                }
                assert_eq!(p.next_retry(), None, "{what}: retries are over");
                assert_eq!(canonical(&p.maps().inner), expected, "{what}: converged");
                assert!(p.state().orphans.is_empty(), "{what}");
            }
        }
    }
}

#[test]
fn a_service_id_is_not_reused_while_a_frontend_still_names_it() {
    let a = state(&svc("a", "198.19.0.1", None, &[10]));
    let b = state(&svc("b", "198.19.0.2", None, &[20]));
    let mut p = Programmer::new(Faulty::new(MemoryMaps::default()));
    p.apply(&a);
    let a_id = p.service_id(&key("a")).unwrap();
    // a's frontend cannot be removed; b arrives in the same change.
    p.maps_mut().fail = Box::new(|_, w| w.starts_with("remove_frontend"));
    let r = p.apply(&b);
    assert_eq!(r.failed.len(), 1, "{:?}", r.failed);
    let b_id = p.service_id(&key("b")).unwrap();
    assert_ne!(a_id, b_id, "a's id is still named by its frontend");
    assert!(p.state().orphans.contains(&a_id));
    // a's frontend still works as before, to a's endpoint only.
    assert_safe(&p.maps().inner, &[&a, &b], "a stuck");
    // A service created later does not get a's id either.
    let bc = state(&(svc("b", "198.19.0.2", None, &[20]) + &svc("c", "198.19.0.3", None, &[30])));
    p.apply(&bc);
    assert_ne!(p.service_id(&key("c")), Some(a_id));
    assert_safe(&p.maps().inner, &[&a, &bc], "a stuck, c new");
    // Every retry fails too: the id stays taken, backoff grows.
    let t0 = std::time::Instant::now();
    let first = p.next_retry().unwrap();
    p.retry_due(&bc, first);
    let second = p.next_retry().unwrap();
    assert!(second - first > first - t0, "backoff grows");
    // Then it works, and a's id is free again.
    p.maps_mut().fail = Box::new(|_, _| false);
    p.retry_due(&bc, second);
    assert!(p.state().orphans.is_empty());
    assert_eq!(p.state().service_ids.peek().next(), Some(a_id));
}

#[test]
fn a_failed_service_port_is_retried_whatever_the_next_event() {
    let a = state(&svc("a", "198.19.0.1", None, &[10]));
    let both = state(&(svc("a", "198.19.0.1", None, &[10]) + &svc("b", "198.19.0.2", None, &[20])));
    let mut p = Programmer::new(Faulty::new(MemoryMaps::default()));
    p.maps_mut().fail = Box::new(|_, w| w.starts_with("set_frontend"));
    let r = p.apply(&a);
    assert_eq!(r.failed.len(), 1);
    p.maps_mut().fail = Box::new(|_, _| false);
    // An event about b only, after a's retry is due: a is written too.
    std::thread::sleep(super::RETRY_FIRST);
    let r = p.apply_keys(&both, &[key("b")].into());
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(r.diff.changed, vec![key("a")]);
    assert_eq!(p.maps().inner.frontends.len(), 2);
    assert_eq!(p.next_retry(), None);
}

#[test]
fn a_full_table_refuses_one_service_port_and_keeps_the_rest() {
    let state_limits = crate::plan::State::with_limits(3, 100);
    let mut p = Programmer::with_state(MemoryMaps::default(), state_limits);
    let three = state(
        &(svc("a", "198.19.0.1", None, &[10])
            + &svc("b", "198.19.0.2", None, &[20])
            + &svc("c", "198.19.0.3", None, &[30])),
    );
    let r = p.apply(&three);
    assert_eq!(r.failed.len(), 1, "{:?}", r.failed);
    assert!(
        r.failed[0].1.contains("service table is full"),
        "{}",
        r.failed[0].1
    );
    assert_eq!(p.maps().frontends.len(), 2);
    // Room again (c's neighbour goes): c gets in on the retry.
    let two = state(&(svc("b", "198.19.0.2", None, &[20]) + &svc("c", "198.19.0.3", None, &[30])));
    p.apply(&two);
    let far = std::time::Instant::now() + std::time::Duration::from_secs(60);
    p.retry_due(&two, far);
    assert_eq!(p.maps().frontends.len(), 2);
    assert!(p.service_id(&key("c")).is_some());
}

fn key(name: &str) -> ServicePortKey {
    ServicePortKey {
        name: name.into(),
        ..http()
    }
}

#[test]
fn a_table_write_targets_a_half_no_frontend_reads_else_a_fresh_array() {
    use crate::plan::{HeldTable, TableTarget::*};
    let held = |live| HeldTable { digest: 1, live };
    // (live half, halves read: bit 0 A, bit 1 B) -> target
    for (live, read, want) in [
        (Some(0), 0b01, Half(1)),
        (Some(1), 0b10, Half(0)),
        (Some(0), 0b00, Half(1)),
        // A flip that did not reach every frontend: the live half is
        // unread, the other still read.
        (Some(0), 0b10, Half(0)),
        (None, 0b01, Half(1)),
        (None, 0b10, Half(0)),
        (None, 0b00, Half(1)),
        // Both halves read: nothing can be rewritten in place.
        (Some(0), 0b11, Fresh),
        (None, 0b11, Fresh),
    ] {
        assert_eq!(
            held(live).target(read),
            want,
            "live {live:?}, read {read:#b}"
        );
    }
}
