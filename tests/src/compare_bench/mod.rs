//! `cargo xtask bench --compare`: lb against kube-proxy's modes, side by
//! side, on one machine, per packet.
//!
//! Every mode gets its own virtual node (`Topology`: a client namespace,
//! the node's, three pods) so that nothing one mode installs (netfilter
//! hooks, conntrack, programs) touches another's packets:
//! - `direct`: plain routing to a pod's address, nothing attached: the
//!   baseline every other mode's slices sit between;
//! - `iptables-legacy`, `iptables-nft`: kube-proxy's iptables-mode rules
//!   (`rules::iptables`) through `iptables-restore` of each backend;
//! - `nftables`: kube-proxy's nftables-mode table (`rules::nftables`);
//! - `lb-tc`, `lb-xdp`: the real `lb run` with the same Services (XDP on
//!   the node's client-facing veth for the second, TC elsewhere);
//! - `lb-socket`: `lb run --cgroup`, the senders in that cgroup (the
//!   client namespace stands in for a pod: the hooks serve every
//!   namespace); measured with the socket senders only;
//! - `xdp-pass`, `xdp-drop`: two-instruction XDP programs on that veth,
//!   plain routing behind: what XDP on a veth costs by itself (the veth
//!   copies each packet into a page), and the ceiling (dropped at once).
//!
//! The client sends 60-byte UDP frames with a raw socket pinned to one
//! CPU, which also does all of each packet's forwarding (veths hand
//! packets on in the sender's softirq): one flow throughout (established),
//! or a never-seen source address and port per packet (new flows). Then,
//! as applications send (`lb-probe`, pinned the same way, in a cgroup of
//! the mode's own): datagrams on one connected UDP socket, one UDP socket
//! per datagram, and TCP connections (connect, reset).
//! Delivered packets are counted at the pods (the drop ceiling: at the
//! node's veth). A slice is `slice` long; every mode's slice sits between
//! two `direct` slices, and its cost is its ns per delivered packet minus
//! the mean of those two: this VM's speed swings by up to 1.8x for seconds
//! at a time, and neighbouring slices see the same swing. The order of the
//! modes rotates every round; results are medians over the rounds with
//! their range, and ratios are taken per round, then their median.

pub mod rules;
pub mod traffic;
pub mod xdp;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::{
    agent::{Agent, ConfigFile},
    netns::Netns,
    topology::{pod_ip, Topology},
};
use rules::BenchService;
use traffic::{Flows, Sender};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    Direct,
    IptablesLegacy,
    IptablesNft,
    Nftables,
    LbTc,
    LbXdp,
    LbSocket,
    XdpPass,
    XdpDrop,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct routing",
            Mode::IptablesLegacy => "kube-proxy iptables (legacy)",
            Mode::IptablesNft => "kube-proxy iptables (nft backend)",
            Mode::Nftables => "kube-proxy nftables mode",
            Mode::LbTc => "lb TC",
            Mode::LbXdp => "lb XDP",
            Mode::LbSocket => "lb socket LB (cgroup hooks)",
            Mode::XdpPass => "XDP_PASS alone",
            Mode::XdpDrop => "XDP_DROP ceiling",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::IptablesLegacy => "iptables-legacy",
            Mode::IptablesNft => "iptables-nft",
            Mode::Nftables => "nftables",
            Mode::LbTc => "lb-tc",
            Mode::LbXdp => "lb-xdp",
            Mode::LbSocket => "lb-socket",
            Mode::XdpPass => "xdp-pass",
            Mode::XdpDrop => "xdp-drop",
        }
    }

    /// The modes measured against `direct`, in table order.
    pub const MEASURED: [Mode; 8] = [
        Mode::IptablesLegacy,
        Mode::IptablesNft,
        Mode::Nftables,
        Mode::LbTc,
        Mode::LbXdp,
        Mode::LbSocket,
        Mode::XdpPass,
        Mode::XdpDrop,
    ];

    /// The mode `key` names.
    pub fn from_key(key: &str) -> Option<Mode> {
        Mode::MEASURED.into_iter().find(|m| m.key() == key)
    }

    fn uses_conntrack(self) -> bool {
        matches!(
            self,
            Mode::IptablesLegacy | Mode::IptablesNft | Mode::Nftables
        )
    }

    fn has_services(self) -> bool {
        self.uses_conntrack() || matches!(self, Mode::LbTc | Mode::LbXdp | Mode::LbSocket)
    }

    /// Whether this mode's figure for `flows` means anything: nothing gets
    /// through the drop ceiling to a socket, and the raw sender's packets
    /// never meet socket hooks (they would measure lb's TC programs).
    fn measures(self, flows: Flows) -> bool {
        match self {
            Mode::XdpDrop => !flows.from_sockets(),
            Mode::LbSocket => flows.from_sockets(),
            _ => true,
        }
    }
}

/// What each pass measures, in order.
const FLOWS: [Flows; 5] = [
    Flows::Established,
    Flows::New,
    Flows::SocketSend,
    Flows::SocketNew,
    Flows::Connect,
];

pub struct Options {
    /// Service counts, each measured in its own pass.
    pub services: Vec<usize>,
    /// The modes measured against direct routing (`Mode::MEASURED`, or a
    /// few of them while working on one).
    pub modes: Vec<Mode>,
    pub rounds: usize,
    pub slice: Duration,
    /// The CPU the sender (and so every packet's processing) runs on.
    pub cpu: usize,
}

/// Pods (endpoints of every Service).
const PODS: usize = 3;
const TARGET_PORT: u16 = 5353;
const PORT: u16 = 53;
/// The measured Service's TCP port, for `Flows::Connect`.
const TCP_TARGET_PORT: u16 = 8080;
const TCP_PORT: u16 = 80;
/// Where the established flow comes from.
const CLIENT: SocketAddrV4 = SocketAddrV4::new(crate::topology::CLIENT_IP, 40_000);

/// ClusterIP of Service `i` (up to 64,000 of them in 198.19.0.0/16).
fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// `n` Services with a UDP port; the measured one has a TCP port too.
fn services(n: usize) -> Vec<BenchService> {
    let mut out = Vec::with_capacity(n + 1);
    for index in 0..n {
        let udp = BenchService {
            index,
            cluster_ip: cluster_ip(index),
            tcp: false,
            port: PORT,
            target_port: TARGET_PORT,
            endpoints: (1..=PODS).map(pod_ip).collect(),
        };
        if index == measured(n) {
            out.push(BenchService {
                tcp: true,
                port: TCP_PORT,
                target_port: TCP_TARGET_PORT,
                ..udp.clone()
            });
        }
        out.push(udp);
    }
    out
}

/// The Service the traffic goes to: the middle one, so that iptables'
/// linear KUBE-SERVICES walk costs what it costs on average.
fn measured(n: usize) -> usize {
    n / 2
}

/// The same Services as `lb run --config` reads them (ports of one
/// Service are consecutive, as `services` makes them).
fn lb_yaml(services: &[BenchService]) -> String {
    let mut out = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for ports in services.chunk_by(|a, b| a.index == b.index) {
        let s = &ports[0];
        let list = |f: &dyn Fn(&BenchService) -> String| {
            ports.iter().map(f).collect::<Vec<_>>().join(", ")
        };
        let _ = write!(
            out,
            "- apiVersion: v1\n  kind: Service\n  metadata: {{name: svc-{i}, namespace: bench}}\n  \
             spec: {{type: ClusterIP, clusterIP: {ip}, clusterIPs: [{ip}], ports: [{service_ports}]}}\n\
             - apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  \
             metadata: {{name: svc-{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n  \
             addressType: IPv4\n  ports: [{slice_ports}]\n  endpoints:\n",
            i = s.index,
            ip = s.cluster_ip,
            service_ports = list(&|p| format!(
                "{{name: {}, protocol: {}, port: {}, targetPort: {}}}",
                p.port_name(),
                p.protocol().to_uppercase(),
                p.port,
                p.target_port
            )),
            slice_ports = list(&|p| format!(
                "{{name: {}, protocol: {}, port: {}}}",
                p.port_name(),
                p.protocol().to_uppercase(),
                p.target_port
            )),
        );
        for ep in &s.endpoints {
            let _ = writeln!(
                out,
                "  - {{addresses: [\"{ep}\"], conditions: {{ready: true}}, nodeName: {}}}",
                crate::topology::NODE_NAME
            );
        }
    }
    out
}

/// One mode's node, programmed and ready for traffic. (Fields drop in
/// order: the agent, the XDP link and the sinks go before the namespaces.)
struct Bed {
    _agent: Option<(Agent, ConfigFile)>,
    _xdp: Option<xdp::Attached>,
    _sinks: (Vec<std::net::UdpSocket>, Vec<traffic::TcpSink>),
    /// Where `lb-probe` runs (for `lb-socket`, the cgroup of its hooks).
    cgroup: crate::cgroup::Cgroup,
    mode: Mode,
    sender: Sender,
    target: SocketAddrV4,
    tcp_target: SocketAddrV4,
    /// How long programming the Services took.
    programmed: Option<Duration>,
    topo: Topology,
}

impl Bed {
    fn new(mode: Mode, services: &[BenchService], target: usize) -> anyhow::Result<Bed> {
        // The client's veth computes checksums itself, as a NIC hands them
        // over: XDP (lb's, on that veth) needs them complete; every mode
        // gets the same.
        let topo = Topology::with_nic(PODS, crate::topology::NicMode::LikePhysical)?;
        let sinks = topo
            .pods
            .iter()
            .map(|p| traffic::sink(&p.ns, TARGET_PORT))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let tcp_sinks = topo
            .pods
            .iter()
            .map(|p| traffic::TcpSink::start(&p.ns, TCP_TARGET_PORT))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let sender = Sender::open(&topo.client)?;
        // The node's address resolved for good: the drop ceiling drops
        // ARP too, and a neighbour entry that expires mid-slice would cost
        // one mode and not the others.
        let mac = mac_of(&topo.node, &topo.nic)?;
        topo.client.ip(&[
            "neigh",
            "replace",
            &crate::topology::NODE_IP.to_string(),
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        let cgroup = crate::cgroup::Cgroup::new()?;
        let started = Instant::now();
        let (mut agent, mut attached) = (None, None);
        match mode {
            Mode::Direct => {}
            Mode::IptablesLegacy => restore(
                &topo.node,
                "iptables-legacy-restore",
                &rules::iptables(services),
            )?,
            Mode::IptablesNft => restore(
                &topo.node,
                "iptables-nft-restore",
                &rules::iptables(services),
            )?,
            Mode::Nftables => restore(&topo.node, "nft", &rules::nftables(services))?,
            Mode::LbTc | Mode::LbXdp | Mode::LbSocket => {
                let config = ConfigFile::new(&lb_yaml(services))?;
                let extra: Vec<String> = match mode {
                    Mode::LbXdp => vec!["--xdp-iface".into(), topo.nic.clone()],
                    Mode::LbSocket => vec!["--cgroup".into(), cgroup.path.display().to_string()],
                    _ => Vec::new(),
                };

                let a = Agent::start_within(
                    &topo,
                    &config.path,
                    &extra,
                    &[],
                    Duration::from_secs(300),
                )?;
                agent = Some((a, config));
            }
            Mode::XdpPass | Mode::XdpDrop => {
                let verdict = if mode == Mode::XdpPass {
                    xdp::Verdict::Pass
                } else {
                    xdp::Verdict::Drop
                };
                let nic = topo.nic.clone();
                attached = Some(
                    topo.node
                        .run(move || xdp::attach(verdict, xdp::ifindex(&nic)?))??,
                );
            }
        }
        let programmed = mode.has_services().then(|| started.elapsed());
        let (target, tcp_target) = if mode.has_services() {
            (
                SocketAddrV4::new(cluster_ip(target), PORT),
                SocketAddrV4::new(cluster_ip(target), TCP_PORT),
            )
        } else {
            (
                SocketAddrV4::new(pod_ip(1), TARGET_PORT),
                SocketAddrV4::new(pod_ip(1), TCP_TARGET_PORT),
            )
        };
        Ok(Bed {
            mode,
            topo,
            sender,
            target,
            tcp_target,
            _sinks: (sinks, tcp_sinks),
            cgroup,
            _agent: agent,
            _xdp: attached,
            programmed,
        })
    }

    /// Packets delivered so far: at the pods, or where the ceiling drops
    /// them.
    fn delivered(&self) -> anyhow::Result<u64> {
        if self.mode == Mode::XdpDrop {
            return traffic::rx_packets(&self.topo.node, &self.topo.nic);
        }
        let mut n = 0;
        for p in &self.topo.pods {
            n += traffic::rx_packets(&p.ns, "eth0")?;
        }
        Ok(n)
    }

    /// One slice: ns per delivered packet (per connection for `Connect`).
    fn slice(&self, flows: Flows, next_flow: &mut u64, opts: &Options) -> anyhow::Result<f64> {
        let before = self.delivered()?;
        let (took, sent) = if flows.from_sockets() {
            let (took, count) = self
                .probe(flows, opts)
                .with_context(|| format!("{}: {} slice", self.mode.label(), flows.label()))?;
            if flows == Flows::Connect {
                return Ok(took.as_nanos() as f64 / count as f64);
            }
            (took, count)
        } else {
            self.sender
                .send_for(CLIENT, self.target, flows, next_flow, opts.slice)
        };
        // Let the last packets through the veths' queues.
        std::thread::sleep(Duration::from_millis(20));
        let delivered = self.delivered()? - before;
        anyhow::ensure!(
            delivered > sent / 2,
            "{}: {delivered} of {sent} packets delivered",
            self.mode.label()
        );
        if flows == Flows::New && self.mode.uses_conntrack() {
            // Netfilter's table would fill (the ceiling is global): start
            // every slice from an empty one. Not timed.
            self.topo.node.exec("conntrack", &["-F"])?;
        }
        Ok(took.as_nanos() as f64 / delivered as f64)
    }
}

impl Bed {
    /// One slice of `lb-probe` in the client's namespace and this bed's
    /// cgroup: the time it took and what it sent (datagrams or
    /// connections).
    fn probe(&self, flows: Flows, opts: &Options) -> anyhow::Result<(Duration, u64)> {
        let (cpu, ms) = (opts.cpu.to_string(), opts.slice.as_millis().to_string());
        let (udp, tcp) = (self.target.to_string(), self.tcp_target.to_string());
        let mut env = vec![
            ("LB_PROBE_CPU", cpu.as_str()),
            ("LB_PROBE_FOR_MS", ms.as_str()),
        ];
        match flows {
            Flows::SocketSend => env.push(("LB_PROBE_UDP_SEND", &udp)),
            Flows::SocketNew => env.extend([
                ("LB_PROBE_UDP_SEND", udp.as_str()),
                ("LB_PROBE_NEW_SOCKETS", "1"),
            ]),
            _ => env.push(("LB_PROBE_CONNECT_RESET", &tcp)),
        }
        let probe = crate::agent::lb_bin().with_file_name("lb-probe");
        let out = self.cgroup.run(&self.topo.client, &probe, &[], &env)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "lb-probe: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with("PROBE sent ") || l.starts_with("PROBE connects "))
            .with_context(|| format!("lb-probe printed {stdout:?}"))?;
        let mut words = line.split_whitespace().skip(2);
        let count: u64 = words.next().context("count")?.parse()?;
        let nanos: u64 = words.next().context("time")?.parse()?;
        anyhow::ensure!(count > 0, "lb-probe sent nothing");
        Ok((Duration::from_nanos(nanos), count))
    }
}

/// The MAC address of `iface` in `ns`.
fn mac_of(ns: &Netns, iface: &str) -> anyhow::Result<String> {
    let out = ns.ip(&["-o", "link", "show", iface])?;
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("no MAC address in {out:?}"))
}

/// Feeds `input` to `program` (`iptables-*-restore`, or `nft -f -`) inside
/// `node`.
fn restore(node: &Netns, program: &str, input: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let args: &[&str] = if program == "nft" { &["-f", "-"] } else { &[] };
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &node.name, program])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Per mode, per service count, per kind of flow: the extra ns per packet
/// over direct routing in each round, and the baseline's ns.
#[derive(Default)]
pub struct Report {
    pub extra: BTreeMap<(usize, Flows, Mode), Vec<f64>>,
    pub baseline: BTreeMap<(usize, Flows), Vec<f64>>,
    pub programmed: BTreeMap<(usize, Mode), Duration>,
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    crate::require_root();
    crate::agent::ECHO_LOGS.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut report = Report::default();
    let mut next_flow = 0u64;
    let direct = Bed::new(Mode::Direct, &[], 0)?;
    for &n in &opts.services {
        let svcs = services(n);
        let mut beds = Vec::new();
        for &mode in &opts.modes {
            let bed = Bed::new(mode, &svcs, measured(n))
                .with_context(|| format!("{} with {n} services", mode.label()))?;
            if let Some(t) = bed.programmed {
                println!(
                    "{:>6} services: {} programmed in {:.2} s",
                    n,
                    mode.label(),
                    t.as_secs_f64()
                );
                report.programmed.insert((n, mode), t);
            }
            beds.push(bed);
        }
        // Only while measuring: agents and rule loaders started from this
        // thread would inherit the pin.
        traffic::pin_to(Some(opts.cpu))?;
        for flows in FLOWS {
            for round in 0..opts.rounds {
                let mut before = direct.slice(flows, &mut next_flow, opts)?;
                for k in 0..beds.len() {
                    let bed = &beds[(k + round) % beds.len()];
                    if !bed.mode.measures(flows) {
                        continue;
                    }
                    let ns = bed.slice(flows, &mut next_flow, opts)?;
                    let after = direct.slice(flows, &mut next_flow, opts)?;
                    let base = (before + after) / 2.0;
                    report
                        .extra
                        .entry((n, flows, bed.mode))
                        .or_default()
                        .push(ns - base);
                    report.baseline.entry((n, flows)).or_default().push(base);
                    before = after;
                }
            }
            println!("{n:>6} services: {} measured", flows.label());
        }
        traffic::pin_to(None)?;
    }
    Ok(report)
}

impl Report {
    fn counts(&self) -> Vec<usize> {
        let mut n: Vec<usize> = self.baseline.keys().map(|(n, _)| *n).collect();
        n.dedup();
        n
    }

    /// The modes measured, in table order.
    fn modes(&self) -> Vec<Mode> {
        Mode::MEASURED
            .into_iter()
            .filter(|m| self.extra.keys().any(|(_, _, k)| k == m))
            .collect()
    }

    fn extra(&self, n: usize, flows: Flows, mode: Mode) -> &[f64] {
        self.extra.get(&(n, flows, mode)).map_or(&[], Vec::as_slice)
    }

    /// lb XDP's own cost, round by round: lb XDP minus XDP_PASS alone.
    fn lb_xdp_own(&self, n: usize, flows: Flows) -> Vec<f64> {
        let pass = self.extra(n, flows, Mode::XdpPass);
        self.extra(n, flows, Mode::LbXdp)
            .iter()
            .zip(pass)
            .map(|(l, p)| l - p)
            .collect()
    }

    /// The tables the README carries: extra ns per packet over direct
    /// routing per mode, then lb's ratios to each kube-proxy mode.
    pub fn markdown(&self) -> String {
        let counts = self.counts();
        let modes = self.modes();
        let mut out = String::new();
        let fmt = |v: &[f64]| {
            if v.is_empty() {
                return "-".to_string();
            }
            let (m, lo, hi) = spread(v);
            format!("{m:.0} ({lo:.0} to {hi:.0})")
        };
        let header = |out: &mut String, first: &str| {
            let _ = write!(out, "| {first} |");
            for n in &counts {
                let _ = write!(out, " {n} services |");
            }
            out.push_str("\n|---|");
            for _ in &counts {
                out.push_str("---:|");
            }
            out.push('\n');
        };
        for flows in FLOWS {
            let _ = writeln!(
                out,
                "\n{}: extra ns per packet (per connection) over direct routing, median (min to max) of the rounds\n",
                flows.label()
            );
            header(&mut out, "mode");
            for &mode in &modes {
                let _ = write!(out, "| {} |", mode.label());
                for &n in &counts {
                    let _ = write!(out, " {} |", fmt(self.extra(n, flows, mode)));
                }
                out.push('\n');
            }
            if [Mode::LbXdp, Mode::XdpPass]
                .iter()
                .all(|m| modes.contains(m))
            {
                let _ = write!(out, "| lb XDP's own (lb XDP minus XDP_PASS alone) |");
                for &n in &counts {
                    let _ = write!(out, " {} |", fmt(&self.lb_xdp_own(n, flows)));
                }
                out.push('\n');
            }
            let _ = write!(out, "| (direct routing itself, ns per packet) |");
            for &n in &counts {
                let base = self
                    .baseline
                    .get(&(n, flows))
                    .map_or(&[][..], Vec::as_slice);
                let _ = write!(out, " {} |", fmt(base));
            }
            out.push('\n');
        }
        for flows in FLOWS {
            for lb in [Mode::LbTc, Mode::LbSocket]
                .into_iter()
                .filter(|m| modes.contains(m) && m.measures(flows))
            {
                let _ = writeln!(
                    out,
                    "\n{}: {}'s extra cost over each mode's, per round, median (min to max)\n",
                    flows.label(),
                    lb.label()
                );
                header(&mut out, &format!("{} / ...", lb.label()));
                for mode in [Mode::IptablesLegacy, Mode::IptablesNft, Mode::Nftables]
                    .into_iter()
                    .filter(|m| modes.contains(m))
                {
                    let _ = write!(out, "| {} |", mode.label());
                    for &n in &counts {
                        let r = ratios(self.extra(n, flows, lb), self.extra(n, flows, mode));
                        let (m, lo, hi) = spread(&r);
                        let _ = write!(out, " {m:.2} ({lo:.2} to {hi:.2}) |");
                    }
                    out.push('\n');
                }
                let first = counts.first().copied().unwrap_or(0);
                let _ = write!(out, "| at N / at {first} services (medians) |");
                for &n in &counts {
                    let at = |n| spread(self.extra(n, flows, lb)).0;
                    let _ = write!(out, " {:.2} |", at(n) / at(first));
                }
                out.push('\n');
            }
        }
        if !self.programmed.is_empty() {
            out.push_str(
                "\nprogramming the services (rules loaded; lb: start to `datapath ready`)\n\n",
            );
            header(&mut out, "mode");
            for mode in [
                Mode::IptablesLegacy,
                Mode::IptablesNft,
                Mode::Nftables,
                Mode::LbTc,
            ] {
                let _ = write!(out, "| {} |", mode.label());
                for &n in &counts {
                    match self.programmed.get(&(n, mode)) {
                        Some(t) => {
                            let _ = write!(out, " {:.3} s |", t.as_secs_f64());
                        }
                        None => out.push_str(" - |"),
                    }
                }
                out.push('\n');
            }
        }
        out
    }

    /// Every round's figure, for scripts.
    pub fn json(&self, opts: &Options) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .extra
            .iter()
            .map(|((n, flows, mode), v)| {
                let (median, min, max) = spread(v);
                serde_json::json!({
                    "services": n, "flows": flows.label(), "mode": mode.key(),
                    "extra_ns_per_packet": v, "median": median, "min": min, "max": max,
                })
            })
            .collect();
        let baseline: Vec<serde_json::Value> = self
            .baseline
            .iter()
            .map(|((n, flows), v)| {
                serde_json::json!({"services": n, "flows": flows.label(), "direct_ns_per_packet": v})
            })
            .collect();
        let programmed: Vec<serde_json::Value> = self
            .programmed
            .iter()
            .map(|((n, mode), t)| {
                serde_json::json!({"services": n, "mode": mode.key(), "seconds": t.as_secs_f64()})
            })
            .collect();
        serde_json::json!({
            "rounds": opts.rounds,
            "slice_ms": opts.slice.as_millis() as u64,
            "cpu": opts.cpu,
            "results": rows,
            "direct": baseline,
            "programmed": programmed,
        })
    }
}

/// Median, min and max.
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mid = s.len() / 2;
    let median = if s.len().is_multiple_of(2) {
        (s[mid - 1] + s[mid]) / 2.0
    } else {
        s[mid]
    };
    (median, s[0], s[s.len() - 1])
}

/// Round by round `a / b`, for ratios whose spread is the rounds'.
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_median_min_max() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }

    #[test]
    fn cluster_ips_are_distinct_and_in_the_benchmark_range() {
        let ips: std::collections::BTreeSet<_> = (0..64_000).map(cluster_ip).collect();
        assert_eq!(ips.len(), 64_000);
        assert!(ips
            .iter()
            .all(|ip| ip.octets()[..2] == [198, 19] && ip.octets()[3] != 0));
    }

    #[test]
    fn lb_yaml_parses_as_kubernetes_objects() {
        let yaml = lb_yaml(&services(3));
        let list: serde_json::Value = yaml_serde::from_str(&yaml).unwrap();
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 6);
        assert_eq!(items[2]["spec"]["clusterIP"], "198.19.0.2");
        assert_eq!(items[3]["endpoints"][2]["addresses"][0], "198.18.1.13");
        // The measured Service (the middle one) has its TCP port too.
        let ports = items[2]["spec"]["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0]["protocol"], "TCP");
        assert_eq!(items[3]["ports"][1]["port"], 5353);
    }
}
