//! `cargo xtask demo`: a virtual node in network namespaces (a client, a
//! node, three pods with small servers), the real agent on a built-in
//! example, real connections to a ClusterIP and a NodePort, then the share
//! each backend got and the datapath counters. Exit status 0 only if every
//! connection was answered and every backend took part.

use std::{collections::BTreeMap, net::SocketAddrV4, process::ExitCode};

use lb_tests::{
    agent::{lb_bin, Agent, ConfigFile},
    example::{yaml, Endpoint, Svc},
    netns::sh,
    servers::{tcp_who, udp_who, PodServer},
    topology::{Topology, CLIENT_IP, NODE_IP},
};

const CONNECTIONS: usize = 120;

fn main() -> ExitCode {
    lb_tests::require_root();
    match demo() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> anyhow::Result<bool> {
    println!(
        "== building a virtual node: client {CLIENT_IP} -> node {NODE_IP} -> pods 198.18.1.11-13"
    );
    let topo = Topology::new(3)?;
    let _servers: Vec<PodServer> = topo.start_servers(3)?;
    let svc = Svc::web(topo.pods.iter().map(|p| Endpoint::ready(p.ip)).collect());
    let config = ConfigFile::new(&yaml(&[svc]))?;
    println!(
        "== built-in example (services.yaml):\n{}",
        std::fs::read_to_string(&config.path)?
    );
    println!(
        "== starting: lb run --config services.yaml --node-ip {NODE_IP} (attaches to every interface of the node: {})",
        topo.tc_ifaces().join(", ")
    );
    let agent = Agent::start(&topo, &config.path)?;

    let cluster_ip: SocketAddrV4 = "198.19.0.10:80".parse()?;
    let node_port: SocketAddrV4 = format!("{NODE_IP}:30080").parse()?;
    let dns: SocketAddrV4 = "198.19.0.10:53".parse()?;
    let mut ok = true;
    for (label, target, udp) in [
        ("ClusterIP TCP", cluster_ip, false),
        ("NodePort TCP", node_port, false),
        ("ClusterIP UDP", dns, true),
    ] {
        let results = topo.client.run(move || {
            (0..CONNECTIONS)
                .map(|_| {
                    if udp {
                        udp_who(target)
                    } else {
                        tcp_who(target)
                    }
                })
                .collect::<Vec<_>>()
        })?;
        let mut per_pod: BTreeMap<String, usize> = BTreeMap::new();
        let mut failed = 0;
        let mut client_seen = true;
        for r in results {
            match r {
                Ok(a) => {
                    client_seen &= *a.peer.ip() == CLIENT_IP;
                    *per_pod.entry(a.pod).or_default() += 1;
                }
                Err(_) => failed += 1,
            }
        }
        println!("== {label} {target}: {CONNECTIONS} new connections from the client");
        for (pod, n) in &per_pod {
            println!("   {pod}: {n:3} {}", "#".repeat(*n / 2));
        }
        println!("   failed: {failed}; backends saw the client's own address: {client_seen}");
        ok &= failed == 0 && per_pod.len() == 3 && client_seen;
    }

    println!(
        "== what the datapath is on (lb status --pin-dir {})",
        agent.pin_dir.display()
    );
    print!("{}", agent.status());
    println!(
        "== datapath counters (lb stats --pin-dir {})",
        agent.pin_dir.display()
    );
    print!(
        "{}",
        sh(std::process::Command::new(lb_bin())
            .arg("stats")
            .arg("--pin-dir")
            .arg(&agent.pin_dir))?
    );
    for args in [
        vec!["services"],
        vec!["backends", "demo/web:http/TCP"],
        vec![
            "conntrack",
            "--client",
            "198.18.0.1",
            "--service",
            "demo/web:http/TCP",
        ],
    ] {
        println!(
            "== lb {} --pin-dir {}",
            args.join(" "),
            agent.pin_dir.display()
        );
        let out = agent.inspect(&args);
        // The flows, but not all 240 of them.
        let lines: Vec<&str> = out.lines().collect();
        for l in lines.iter().take(6) {
            println!("{l}");
        }
        if lines.len() > 6 {
            println!("... ({} lines in all)", lines.len());
        }
    }
    println!(
        "== bpftool map dump pinned {}/lb_frontends",
        agent.pin_dir.display()
    );
    let dump = sh(std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(agent.pin_dir.join("lb_frontends")));
    match dump {
        Ok(text) => print!(
            "{}",
            text.lines().take(40).collect::<Vec<_>>().join("\n") + "\n"
        ),
        Err(e) => println!("   (bpftool: {e})"),
    }
    drop(agent);
    println!(
        "== torn down; traffic {}",
        if ok {
            "flowed to every backend"
        } else {
            "DID NOT flow as expected"
        }
    );
    Ok(ok)
}
