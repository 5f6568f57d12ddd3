//! The inspection commands on a real agent's pins: `lb services`,
//! `lb backends`, `lb maglev`, `lb conntrack`, as tables and as JSON, named
//! from the agent's `lb_svc_names`, and still answering after the agent
//! stopped (the datapath it left keeps serving).

use std::net::SocketAddrV4;

use lb_tests::{
    agent::{Agent, ConfigFile},
    example::{yaml, Endpoint, Svc},
    servers::tcp_who,
    topology::{Topology, CLIENT_IP, NODE_IP},
};
use nix::sys::signal::Signal;
use serde_json::Value;

const WEB: &str = "demo/web:http/TCP";

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

#[test]
fn services_backends_maglev_and_conntrack_show_what_the_maps_hold() {
    lb_tests::require_root();
    let topo = Topology::new(2).unwrap();
    let _servers = topo.start_servers(2).unwrap();
    let pods: Vec<String> = topo.pods.iter().map(|p| format!("{}:8080", p.ip)).collect();
    let svc = Svc::web(topo.pods.iter().map(|p| Endpoint::ready(p.ip)).collect());
    let config = ConfigFile::new(&yaml(&[svc])).unwrap();
    let mut agent = Agent::start(&topo, &config.path).unwrap();

    // lb services: every service port by name, its frontends and backends.
    let all = json(&agent.inspect(&["services", "-o", "json"]));
    let web = all
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == WEB)
        .unwrap_or_else(|| panic!("no {WEB} in {all:#}"));
    let frontends: Vec<&str> = web["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["address"].as_str().unwrap())
        .collect();
    assert_eq!(
        frontends,
        ["198.18.0.2:30080/TCP", "198.19.0.10:80/TCP"],
        "{web:#}"
    );
    assert_eq!(web["usable_backends"], 2);
    let size = web["table_size"].as_u64().unwrap();
    assert!(size > 2, "{web:#}");
    let table = agent.inspect(&["services"]);
    assert!(
        table.contains(WEB) && table.contains("demo/web:dns/UDP"),
        "{table}"
    );

    // lb backends: each backend usable, local state, and its share of the
    // table; the shares add up to the table.
    let b = json(&agent.inspect(&["backends", WEB, "-o", "json"]));
    let backends = b["backends"].as_array().unwrap();
    let mut addrs: Vec<&str> = backends
        .iter()
        .map(|b| b["address"].as_str().unwrap())
        .collect();
    addrs.sort();
    assert_eq!(addrs, pods);
    let slots: Vec<u64> = backends
        .iter()
        .map(|b| b["slots"].as_u64().unwrap())
        .collect();
    assert_eq!(slots.iter().sum::<u64>(), size);
    assert!(backends.iter().all(|b| b["usable"] == true));
    // lb maglev: the same shares, near M/N each (Maglev's promise).
    let m = json(&agent.inspect(&["maglev", WEB, "-o", "json"]));
    let shares: Vec<u64> = m["slots"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(shares.iter().sum::<u64>(), size);
    let fair = size / 2;
    assert!(shares.iter().all(|&n| n.abs_diff(fair) <= 1), "{m:#}");
    // By id too; a Service with two ports must be named precisely.
    let id = web["id"].as_u64().unwrap().to_string();
    assert!(agent.inspect(&["backends", &id]).contains(WEB));
    let err = agent.inspect_fails(&["backends", "demo/web"]);
    assert!(
        err.contains("several service ports") && err.contains(WEB),
        "{err}"
    );

    // lb conntrack: a connection through the NodePort shows as a flow of
    // the client to one of the backends, filtered by client and service.
    let answer = topo
        .client
        .run(|| tcp_who(SocketAddrV4::new(NODE_IP, 30080)))
        .unwrap()
        .unwrap();
    let flows = json(&agent.inspect(&[
        "conntrack",
        "--client",
        &CLIENT_IP.to_string(),
        "--service",
        "demo/web",
        "-o",
        "json",
    ]));
    let flows = flows.as_array().unwrap();
    assert_eq!(flows.len(), 1, "{flows:#?}");
    let f = &flows[0];
    assert_eq!(f["frontend"], "198.18.0.2:30080/TCP");
    assert_eq!(f["service"], WEB);
    assert!(
        pods.contains(&f["backend"].as_str().unwrap().to_string()),
        "{f:#}"
    );
    // Pod i (from 0) serves as "pod-{i+1}".
    let answered_by = topo
        .pods
        .iter()
        .enumerate()
        .find(|(i, _)| answer.pod == format!("pod-{}", i + 1))
        .map(|(_, p)| format!("{}:8080", p.ip));
    assert_eq!(f["backend"].as_str(), answered_by.as_deref(), "{f:#}");
    assert!(
        f["state"]
            .as_array()
            .unwrap()
            .contains(&Value::from("established")),
        "{f:#}"
    );
    let other = json(&agent.inspect(&["conntrack", "--client", "198.18.9.9", "-o", "json"]));
    assert!(other.as_array().unwrap().is_empty(), "{other:#}");
    assert!(agent.inspect(&["conntrack"]).contains(WEB));

    // The agent gone, the pins still answer.
    agent.stop_with(Signal::SIGTERM).unwrap();
    assert!(agent.inspect(&["services"]).contains(WEB));
}
