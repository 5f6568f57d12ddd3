//! Control-plane benchmark (`cargo xtask bench`): the real agent fed by the
//! test API server in a node namespace.
//!
//! - cold start: 10,000 Services x 10 endpoints in the API; time from
//!   starting `lb run` to the datapath ready (listed, built, every map
//!   written, attached), and the agent's peak resident memory (VmHWM);
//! - one-endpoint change: with all of that programmed, one endpoint of one
//!   Service flips ready/unready through a watch event; the time from the
//!   API server sending the event to the Service's frontend entry in the
//!   kernel map showing the new backend count (the last write of a change),
//!   read by polling the pinned map from this process.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use aya::maps::{HashMap, MapData};
use lb_common::{map_names, FrontendKey, ServiceEntry};
use serde_json::{json, Value};

use crate::{
    agent::Agent,
    apiserver::ApiServer,
    netns::unique,
    topology::{Topology, NODE_IP, NODE_NAME},
};

pub struct Results {
    pub services: usize,
    pub ports_each: usize,
    pub endpoints_each: usize,
    pub cold: Duration,
    pub peak_rss_kib: u64,
    pub change_p50: Duration,
    pub change_p99: Duration,
    pub changes: usize,
}

fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + 1 + i as u32)
}

fn endpoint_ip(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + ((i * 10 + j) % 32_000) as u32)
}

/// Port `k` of a Service: 80 named http, then 81, 82, ...
fn port_name(k: usize) -> String {
    if k == 0 {
        "http".into()
    } else {
        format!("p{k}")
    }
}

fn service(i: usize, ports: usize) -> Value {
    let ports: Vec<Value> = (0..ports)
        .map(|k| json!({"name": port_name(k), "port": 80 + k, "targetPort": 8080 + k, "protocol": "TCP"}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip(i).to_string(),
                 "clusterIPs": [cluster_ip(i).to_string()],
                 "ports": ports}})
}

fn slice(i: usize, ports: usize, endpoints: usize, unready: Option<usize>) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|j| {
            json!({"addresses": [endpoint_ip(i, j).to_string()],
                   "conditions": {"ready": Some(j) != unready, "serving": true, "terminating": false},
                   "nodeName": NODE_NAME})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-1"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": (0..ports)
            .map(|k| json!({"name": port_name(k), "port": 8080 + k, "protocol": "TCP"}))
            .collect::<Vec<Value>>(),
        "endpoints": eps})
}

fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?;
    Ok(line.trim().trim_end_matches("kB").trim().parse()?)
}

/// `services` Services of `ports` ports each (service ports = services x
/// ports), `endpoints` endpoints each; `changes` endpoint flips.
pub fn run(
    services: usize,
    ports: usize,
    endpoints: usize,
    changes: usize,
) -> anyhow::Result<Results> {
    let topo = Topology::new(0)?;
    let api = ApiServer::start(&topo.node, "127.0.0.1:6443".parse::<SocketAddr>()?)?;
    api.apply_value(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE_NAME},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP.to_string()}]}}),
    );
    for i in 0..services {
        api.apply_value(service(i, ports));
        api.apply_value(slice(i, ports, endpoints, None));
    }
    let dir = std::env::temp_dir().join(unique("lb-bench-"));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    api.kubeconfig(&kubeconfig)?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("lbbench")));
    let args: Vec<String> = vec![
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--node-name".into(),
        NODE_NAME.into(),
        "--iface".into(),
        topo.nic.clone(),
    ];
    let start = Instant::now();
    let mut agent = Agent::spawn(&topo.node, &pin_dir, &args)?;
    agent.wait_for_log("datapath ready", Duration::from_secs(600))?;
    let cold = start.elapsed();
    let peak_rss = peak_rss_kib(agent.pid().context("agent running")?)?;

    let frontends: HashMap<MapData, FrontendKey, ServiceEntry> = HashMap::try_from(
        aya::maps::Map::HashMap(MapData::from_pin(pin_dir.join(map_names::FRONTENDS))?),
    )?;
    let mut samples = Vec::with_capacity(changes);
    for n in 0..changes {
        // Spread over the services; alternate unready / ready again.
        let i = (n * 7919) % services;
        let key = FrontendKey {
            addr: lb_common::addr::from_v4(cluster_ip(i).octets()),
            port: 80,
            proto: 6,
            view: lb_common::FRONTEND_VIEW_ALL,
        };
        let want = if n % 2 == 0 { endpoints - 1 } else { endpoints } as u32;
        let unready = (n % 2 == 0).then_some(n % endpoints);
        // Odd rounds restore the service an even round changed.
        let i = if n % 2 == 0 {
            i
        } else {
            ((n - 1) * 7919) % services
        };
        let key = if n % 2 == 0 {
            key
        } else {
            FrontendKey {
                addr: lb_common::addr::from_v4(cluster_ip(i).octets()),
                ..key
            }
        };
        let t = Instant::now();
        api.apply_value(slice(i, ports, endpoints, unready));
        loop {
            if frontends.get(&key, 0).ok().map(|e| e.backend_count) == Some(want) {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "change {n} (svc-{i}) not programmed after 30 s"
            );
            std::thread::yield_now();
        }
        samples.push(t.elapsed());
    }
    samples.sort();
    let pct =
        |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1];
    let out = Results {
        services,
        ports_each: ports,
        endpoints_each: endpoints,
        cold,
        peak_rss_kib: peak_rss,
        change_p50: pct(0.50),
        change_p99: pct(0.99),
        changes,
    };
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}
