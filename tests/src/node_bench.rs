//! Node benchmark (`cargo xtask bench`): the real agent following a node's
//! interfaces, with no `--iface`.
//!
//! - new pods: 100 pods are wired one after the other the way a CNI does
//!   (`topology::wire_pod`). Before each veth is created, a prober in the
//!   pod's namespace starts sending a UDP datagram every 200 µs both to a
//!   ClusterIP and straight to the backend pod's address. The first answer
//!   through the ClusterIP needs the agent's programs on the new veth; the
//!   first direct answer needs only the wiring (addresses, routes, link
//!   up). Both are timed from just before the veth is created; their
//!   difference is what following the interface adds. Also: from the
//!   moment the veth's host end is in the node's namespace to the agent's
//!   "attached" line (its log's timestamp).
//! - connect(): pods' TCP connections to a ClusterIP (connect, one `WHO`
//!   request, the answer, close), from a process in the hooked cgroup
//!   (socket LB: the connection goes straight to the backend) and from one
//!   in another cgroup (the TC path: every packet translated on the
//!   veths), in interleaved 0.5 s slices over 10 rounds; microseconds per
//!   connection.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;

use crate::{
    agent::{Agent, ConfigFile},
    cgroup::Cgroup,
    example::{yaml, Endpoint, Svc},
    netns::Netns,
    topology::{configure_pod, plug_veth, pod_ip, Topology, POD_GATEWAY},
};

pub struct Results {
    pub pods: usize,
    /// Link in the node's namespace -> the agent's "attached" log line.
    pub attach: Percentiles,
    /// Veth created -> first answer through the ClusterIP.
    pub translated: Percentiles,
    /// Veth created -> first direct answer (the wiring alone).
    pub direct: Percentiles,
    /// Per pod: translated minus direct.
    pub added: Percentiles,
    /// Microseconds per connect(): median, min, max over the rounds.
    pub connect_socket_us: (f64, f64, f64),
    pub connect_tc_us: (f64, f64, f64),
    pub rounds: usize,
}

pub struct Percentiles {
    pub p50: Duration,
    pub p99: Duration,
}

impl Percentiles {
    fn of(mut v: Vec<Duration>) -> Percentiles {
        v.sort();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}

const CLUSTER_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 53);
const SLICE_MS: u64 = 500;

pub fn run(pods: usize, rounds: usize) -> anyhow::Result<Results> {
    crate::require_root();
    let mut topo = Topology::new(1)?;
    let _servers = topo.start_servers(1)?;
    let config = ConfigFile::new(&yaml(&[Svc::web(vec![Endpoint::ready(pod_ip(1))])]))?;
    let hooked = Cgroup::new()?;
    let plain = Cgroup::new()?;
    let agent = Agent::start_with(
        &topo,
        &config.path,
        &["--cgroup".into(), hooked.path.display().to_string()],
    )?;
    let direct_to = SocketAddrV4::new(pod_ip(1), 5353);

    let (mut translated, mut direct, mut added) = (Vec::new(), Vec::new(), Vec::new());
    // (temporary name, final name, when the link was in the node).
    let mut appeared = Vec::new();
    for n in 0..pods {
        let i = 10 + n;
        let ns = Netns::new(format!("{}-p{i}", topo.node.name.trim_end_matches("-node")))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let prober = ns.spawn(move || first_answers([CLUSTER_IP, direct_to], ready_tx))?;
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("prober did not start")?;
        let t0 = Instant::now();
        let tmp = plug_veth(&topo.node, &ns)?;
        appeared.push((tmp.clone(), format!("p{i}"), SystemTime::now()));
        let pod = configure_pod(
            &topo.node,
            ns,
            &tmp,
            format!("p{i}"),
            pod_ip(i),
            POD_GATEWAY,
        )?;
        topo.pods.push(pod);
        let [via_service, straight] = prober
            .join()
            .map_err(|_| anyhow::anyhow!("prober panicked"))??;
        let (a, b) = (via_service - t0, straight - t0);
        translated.push(a);
        direct.push(b);
        added.push(a.saturating_sub(b));
    }

    let logs = agent.logs();
    let attach = appeared
        .iter()
        .map(|(tmp, name, at)| {
            let line = logs
                .iter()
                .find(|l| {
                    l.contains(&format!("attached iface={tmp} "))
                        || l.contains(&format!("attached iface={name} "))
                })
                .with_context(|| format!("no attach line for {name}"))?;
            let logged = log_time(line).with_context(|| format!("no time in {line:?}"))?;
            Ok(Duration::from_secs_f64(
                (logged - day_seconds(*at)).max(0.0),
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    // Each path from its own pod: the two would otherwise reuse each
    // other's 4-tuples towards the backend (a direct connection from a
    // port whose TC-translated flow still has a conntrack entry).
    anyhow::ensure!(
        pods >= 2,
        "the connect() comparison needs two of the new pods"
    );
    let target = SocketAddrV4::new(*CLUSTER_IP.ip(), 80);
    let (socket_pod, tc_pod) = (&topo.pods[1].ns, &topo.pods[2].ns);
    let (mut socket_lb, mut tc) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so a drift in machine speed during a
        // round does not favour one.
        let order = if round % 2 == 0 {
            [(&hooked, socket_pod, true), (&plain, tc_pod, false)]
        } else {
            [(&plain, tc_pod, false), (&hooked, socket_pod, true)]
        };
        for (cg, ns, is_socket) in order {
            let path = if is_socket { "socket LB" } else { "TC" };
            let us = per_connect_us(cg, ns, target).with_context(|| format!("{path} path"))?;
            if is_socket {
                socket_lb.push(us);
            } else {
                tc.push(us);
            }
        }
    }
    Ok(Results {
        pods,
        attach: Percentiles::of(attach),
        translated: Percentiles::of(translated),
        direct: Percentiles::of(direct),
        added: Percentiles::of(added),
        connect_socket_us: spread(socket_lb),
        connect_tc_us: spread(tc),
        rounds,
    })
}

/// Sends to every target every 200 µs until each has answered once; when
/// each first answered. Runs in the pod's namespace from before its veth
/// exists (sends fail with "network unreachable" until it is wired). One
/// socket per target: to the backend, the two flows would otherwise be one.
fn first_answers(
    targets: [SocketAddrV4; 2],
    ready: std::sync::mpsc::Sender<()>,
) -> anyhow::Result<[Instant; 2]> {
    // Not connected: connect() needs a route, which comes with the wiring.
    let socks = targets.map(|_| {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(s)
    });
    let [a, b] = socks;
    let socks = [a?, b?];
    let _ = ready.send(());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got: [Option<Instant>; 2] = [None; 2];
    let mut buf = [0u8; 256];
    while got.iter().any(Option::is_none) {
        anyhow::ensure!(Instant::now() < deadline, "no answer within 10 s: {got:?}");
        for ((s, t), to) in socks.iter().zip(got.iter()).zip(targets) {
            if t.is_none() {
                let _ = s.send_to(b"WHO", to);
            }
        }
        std::thread::sleep(Duration::from_micros(200));
        for (s, t) in socks.iter().zip(got.iter_mut()) {
            if s.recv(&mut buf).is_ok() {
                t.get_or_insert(Instant::now());
            }
        }
    }
    Ok(got.map(|t| t.expect("all answered")))
}

/// One slice of connects from a process in `cg` and `ns`.
fn per_connect_us(cg: &Cgroup, ns: &Netns, to: SocketAddrV4) -> anyhow::Result<f64> {
    let probe = crate::agent::lb_bin().with_file_name("lb-probe");
    let to = to.to_string();
    let ms = SLICE_MS.to_string();
    let out = cg.run(
        ns,
        &probe,
        &[],
        &[("LB_PROBE_CONNECT_LOOP", &to), ("LB_PROBE_FOR_MS", &ms)],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("PROBE connects "))
        .with_context(|| {
            format!(
                "lb-probe printed no count: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let mut it = line.split_whitespace();
    let count: f64 = it.next().context("count")?.parse()?;
    let micros: f64 = it.next().context("time")?.parse()?;
    Ok(micros / count)
}

/// (median, min, max).
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Seconds since midnight UTC of `t` (the agent logs UTC times of day).
fn day_seconds(t: SystemTime) -> f64 {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    (since.as_secs() % 86_400) as f64 + since.subsec_nanos() as f64 * 1e-9
}

/// Seconds since midnight of a log line's `2026-11-22T04:05:33.738226Z`.
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let clock = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut it = clock.split(':');
    let h: f64 = it.next()?.parse().ok()?;
    let m: f64 = it.next()?.parse().ok()?;
    let s: f64 = it.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}
