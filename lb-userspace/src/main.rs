//! `lb`: the agent and its inspection commands.

use std::{path::PathBuf, process::ExitCode};

use aya::maps::{MapData, PerCpuArray};
use clap::{Parser, Subcommand};
use lb_common::{map_names, Counter, Verdict};
use lb_userspace::{
    agent::{self, parse_node_ip, ExternalClusterIp, RunOptions, SourceOptions, DEFAULT_PIN_DIR},
    inspect::{flows, services, Output},
    kernel::interfaces::XdpIface,
    kernel::probes::TcAttach,
    model::{ExternalIpPolicy, NodeConfig, Prefix},
    ports::PortRange,
};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "eBPF/XDP load balancer for Kubernetes Services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: program the datapath from the Kubernetes API (or a
    /// YAML file with --config) and follow every change.
    Run {
        /// Run stand-alone from this YAML stream of v1 Service and
        /// discovery.k8s.io/v1 EndpointSlice objects (what `kubectl get
        /// svc,endpointslices -A -o yaml` prints), followed as it changes.
        /// Without it the agent watches the API server.
        #[arg(long, value_name = "FILE", conflicts_with = "kubeconfig")]
        config: Option<PathBuf>,
        /// Kubeconfig for the API server (default: the in-cluster service
        /// account, else KUBECONFIG or ~/.kube/config).
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
        /// Attach only to interfaces whose name matches this glob pattern
        /// (eth0, eth*, veth*, cali*, lxc*; repeatable). Default: every
        /// interface of the namespace but loopback, followed as interfaces
        /// appear and go.
        #[arg(long = "iface", value_name = "PATTERN")]
        ifaces: Vec<String>,
        /// Never attach to interfaces whose name matches this glob pattern
        /// (repeatable).
        #[arg(long = "exclude-iface", value_name = "PATTERN")]
        exclude_ifaces: Vec<String>,
        /// Use XDP instead of TC ingress on this interface (NICs with
        /// complete receive checksums; see the README). Exact name, then
        /// optionally the mode: NAME (the kernel chooses: native where the
        /// driver has XDP), NAME:native, or NAME:generic (NICs without
        /// native XDP).
        #[arg(long = "xdp-iface", value_name = "NAME[:MODE]")]
        xdp_ifaces: Vec<XdpIface>,
        /// How TC programs attach: auto (TCX on kernels 6.6 and later,
        /// else netlink), tcx (bpf_links), or netlink (a clsact qdisc and
        /// direct-action filters).
        #[arg(long, value_enum, value_name = "MODE", default_value = "auto")]
        tc_attach: TcAttach,
        /// This node's address, IPv4 or IPv6 (repeat for several, and for
        /// each family of a dual-stack node); NodePorts answer on each one
        /// given, and the first of each family is that family's SNAT
        /// address. From the API: the Node's InternalIP and ExternalIP
        /// addresses of both families.
        #[arg(long = "node-ip", value_name = "ADDR", value_parser = parse_node_ip)]
        node_ips: Vec<std::net::IpAddr>,
        /// This node's name, as in EndpointSlice nodeName.
        #[arg(long, value_name = "NAME", env = "NODE_NAME", default_value = "")]
        node_name: String,
        /// This node's zone, for EndpointSlice zone hints (`trafficDistribution:
        /// PreferClose`). From the API: the Node's topology.kubernetes.io/zone
        /// label, which wins over this when set.
        #[arg(long, value_name = "ZONE")]
        zone: Option<String>,
        /// Where maps and links are pinned (on a bpf filesystem).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Balance connections at the socket (connect/sendmsg/recvmsg/
        /// getpeername hooks) for processes in this cgroup v2 directory
        /// (usually /sys/fs/cgroup, the root): the node's own (kubelet,
        /// hostNetwork pods) and, unless --socket-lb-host-only, pods' too.
        /// Without it only traffic crossing the interfaces is balanced.
        #[arg(long, value_name = "DIR")]
        cgroup: Option<PathBuf>,
        /// Socket hooks for the node's own network namespace only; pods go
        /// through TC on their veths and connect to the ClusterIP (for
        /// service meshes that must see it).
        #[arg(long, requires = "cgroup")]
        socket_lb_host_only: bool,
        /// Serve Services labelled service.kubernetes.io/service-proxy-name
        /// with this value (others with that label are left alone).
        #[arg(long, value_name = "NAME")]
        service_proxy_name: Option<String>,
        /// The cluster's Service IP ranges (the API server's
        /// --service-cluster-ip-range), comma-separated or repeated:
        /// externalIPs inside them are refused under `--external-ips
        /// restricted`.
        #[arg(long = "service-cidr", value_name = "CIDR", value_delimiter = ',')]
        service_cidrs: Vec<Prefix>,
        /// Pod address ranges (kube-proxy's --cluster-cidr), comma-separated
        /// or repeated: these sources are inside the cluster, so they reach
        /// NodePorts, externalIPs and load-balancer IPs of Services with
        /// externalTrafficPolicy Local with every endpoint, as kube-proxy
        /// does. The Node's podCIDRs are always included (from the API).
        #[arg(long = "cluster-cidr", value_name = "CIDR", value_delimiter = ',')]
        cluster_cidrs: Vec<Prefix>,
        /// New flows to a ClusterIP from outside the cluster (sources not in
        /// --cluster-cidr or the Node's podCIDRs), once those are known:
        /// masquerade (to the node address, as kube-proxy), drop (as
        /// Cilium), or direct (translated only; the backend answers the
        /// client itself).
        #[arg(long, value_enum, value_name = "MODE", default_value = "masquerade")]
        external_cluster_ip: ExternalClusterIp,
        /// Where NodePorts answer (kube-proxy's --nodeport-addresses):
        /// `primary` (default: the node's addresses, --node-ip or the
        /// Node's), or CIDRs, comma-separated or repeated: every address of
        /// the node's interfaces in them, followed as addresses come and go.
        #[arg(
            long = "nodeport-addresses",
            value_name = "primary|CIDR",
            value_delimiter = ','
        )]
        nodeport_addresses: Vec<String>,
        /// With --cgroup, NodePorts also answer on 127.0.0.1 for the node's
        /// own sockets (kube-proxy's iptables mode does; its
        /// --iptables-localhost-nodeports=false is `false` here).
        #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
        localhost_nodeports: bool,
        /// Which spec.externalIPs to program (CVE-2020-8554): allow (all,
        /// as kube-proxy), restricted (not the node's addresses, the
        /// service CIDRs, loopback, link-local or multicast), deny (none).
        #[arg(long, value_enum, value_name = "POLICY", default_value = "restricted")]
        external_ips: ExternalIpPolicy,
        /// On exit, detach the programs and remove the pinned maps. Without
        /// it the datapath keeps running for the next agent (restarts and
        /// upgrades cut no connection).
        #[arg(long)]
        cleanup_on_exit: bool,
        /// Address for /healthz, /livez and /readyz ("off" for none):
        /// kube-proxy's healthz port.
        #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10256", value_parser = parse_http_addr)]
        http_addr: HttpAddr,
        /// Address for /metrics and /proxyMode ("off" for none):
        /// kube-proxy's metrics port, on loopback by default (the metrics
        /// name every Service).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249", value_parser = parse_http_addr)]
        metrics_addr: HttpAddr,
        /// /healthz answers 503 once a change has waited longer than this
        /// to reach the maps (failing writes, a lost API watch), like
        /// kube-proxy's healthz.
        #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        health_timeout: u64,
        /// Entries of the established-TCP conntrack table (two per
        /// connection); the UDP table gets half, the handshake and SNAT
        /// tables a quarter each. Default: from the node's memory (0.25%).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1024..=(1 << 26)))]
        conntrack_max: Option<u32>,
        /// Source ports for translated flows (SNAT, hairpin): outside the
        /// node's ephemeral range (net.ipv4.ip_local_port_range) and the
        /// NodePort range; checked at start-up.
        #[arg(long, value_name = "MIN-MAX", default_value = "61000-65535")]
        snat_ports: PortRange,
        /// The cluster's NodePort range (the API server's
        /// --service-node-port-range). Reserved for NodePorts on the node
        /// (added to net.ipv4.ip_local_reserved_ports).
        #[arg(long, value_name = "MIN-MAX", default_value = "30000-32767")]
        nodeport_range: PortRange,
    },
    /// Detach the programs and remove the pinned links and maps an agent
    /// left running (after `lb run` exited without --cleanup-on-exit).
    Cleanup {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Show what the datapath is attached to (interfaces and hooks, socket
    /// hooks' cgroups), whether an agent runs, and the node facts it uses.
    Status {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Check this node's kernel before switching: every feature lb probes
    /// for (and which flag needs it), the TC attachment it would use, and
    /// every program loaded for real (nothing attached) with what the
    /// verifier spent on it. Exits non-zero if `lb run` cannot work here.
    Check {
        /// A bpffs directory; a throw-away directory is made in it and
        /// removed.
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// List the service ports the maps hold: name, id, usable/all
    /// backends, Maglev table size, packets, frontends (read from the pins:
    /// works with or without a running agent).
    Services {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// One service port's backends: state (usable, terminating, local) and
    /// share of its Maglev table. SERVICE: an id, a full name
    /// (demo/web:http/TCP), or namespace/name for a single-port Service.
    Backends {
        service: String,
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// How one service port's Maglev table divides among its backends.
    Maglev {
        service: String,
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The translated flows in the conntrack tables: client, frontend,
    /// backend, the source the backend sees, TCP state, idle time.
    Conntrack {
        /// Only this service: an id, a service port's name, or
        /// namespace/name (all its ports).
        #[arg(long)]
        service: Option<String>,
        /// Only flows from this client address.
        #[arg(long)]
        client: Option<std::net::IpAddr>,
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print the datapath's packet counters per verdict, from the pinned maps
    /// of a running agent.
    Stats {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            config,
            kubeconfig,
            ifaces,
            exclude_ifaces,
            xdp_ifaces,
            tc_attach,
            node_ips,
            node_name,
            zone,
            pin_dir,
            cgroup,
            socket_lb_host_only,
            service_proxy_name,
            service_cidrs,
            cluster_cidrs,
            external_cluster_ip,
            nodeport_addresses,
            localhost_nodeports,
            external_ips,
            cleanup_on_exit,
            http_addr,
            metrics_addr,
            health_timeout,
            conntrack_max,
            snat_ports,
            nodeport_range,
        } => {
            let nodeport_cidrs = match parse_nodeport_addresses(&nodeport_addresses) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("lb: error: --nodeport-addresses: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let source = match config {
                Some(path) => SourceOptions::File(path),
                None => SourceOptions::Kubernetes { kubeconfig },
            };
            let opts = RunOptions {
                source,
                ifaces,
                exclude_ifaces,
                xdp_ifaces,
                tc_attach,
                node: NodeConfig {
                    name: node_name,
                    node_ips,
                    service_proxy_name,
                    service_cidrs,
                    external_ips,
                    zone: zone.filter(|z| !z.is_empty()),
                    localhost_nodeports: cgroup.is_some() && localhost_nodeports,
                    nodeport_ips: None,
                },
                pin_dir,
                cgroup,
                socket_lb_host_only,
                cleanup_on_exit,
                http_addr: http_addr.0,
                metrics_addr: metrics_addr.0,
                health_timeout: std::time::Duration::from_secs(health_timeout),
                conntrack_max,
                snat_ports,
                nodeport_range,
                cluster_cidrs,
                nodeport_cidrs,
                external_cluster_ip,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(agent::run(opts)))
        }
        Command::Stats { pin_dir } => print_stats(&pin_dir),
        Command::Services { pin_dir, output } => services::read(&pin_dir)
            .and_then(|all| services::render_services(&all, output))
            .map(|s| print!("{s}")),
        Command::Backends {
            service,
            pin_dir,
            output,
        } => services::one(&pin_dir, &service)
            .and_then(|sp| services::render_backends(&sp, output))
            .map(|s| print!("{s}")),
        Command::Maglev {
            service,
            pin_dir,
            output,
        } => services::one(&pin_dir, &service)
            .and_then(|sp| services::render_maglev(&sp, output))
            .map(|s| print!("{s}")),
        Command::Conntrack {
            service,
            client,
            pin_dir,
            output,
        } => print_conntrack(&pin_dir, service.as_deref(), client, output),
        Command::Status { pin_dir } => {
            lb_userspace::inspect::status(&pin_dir).map(|report| print!("{report}"))
        }
        Command::Cleanup { pin_dir } => agent::cleanup(&pin_dir),
        Command::Check { bpffs } => lb_userspace::check::run(&bpffs).and_then(|report| {
            print!("{report}");
            anyhow::ensure!(report.usable(), "lb cannot run on this kernel (see above)");
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--nodeport-addresses`: nothing or `primary` (None), else CIDRs.
fn parse_nodeport_addresses(values: &[String]) -> Result<Option<Vec<Prefix>>, String> {
    if values.is_empty() || values == ["primary"] {
        return Ok(None);
    }
    values
        .iter()
        .map(|v| {
            if v == "primary" {
                Err("`primary` cannot be mixed with CIDRs".to_string())
            } else {
                v.parse::<Prefix>()
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `--http-addr`: an address, or "off".
#[derive(Clone, Debug)]
struct HttpAddr(Option<std::net::SocketAddr>);

fn parse_http_addr(s: &str) -> Result<HttpAddr, String> {
    if s == "off" {
        return Ok(HttpAddr(None));
    }
    s.parse()
        .map(|a| HttpAddr(Some(a)))
        .map_err(|_| format!("{s:?} is not an address:port (or \"off\")"))
}

fn print_conntrack(
    pin_dir: &std::path::Path,
    service: Option<&str>,
    client: Option<std::net::IpAddr>,
    output: Output,
) -> anyhow::Result<()> {
    let all = services::read(pin_dir)?;
    let filter = flows::Filter {
        services: match service {
            Some(s) => flows::Filter::services(&all, s)?,
            None => Default::default(),
        },
        client,
    };
    let names = all.into_iter().map(|s| (s.id, s.name)).collect();
    let found = flows::read(pin_dir, &names, &filter)?;
    print!("{}", flows::render(&found, output)?);
    Ok(())
}

fn print_stats(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let path = pin_dir.join(map_names::VERDICTS);
    let data = MapData::from_pin(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot open {} ({e}); is an lb agent running with this --pin-dir?",
            path.display()
        )
    })?;
    let verdicts: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
    println!("{:<24} {:>12} {:>14}", "verdict", "packets", "bytes");
    for v in Verdict::ALL {
        let per_cpu = verdicts.get(&(v as u32), 0)?;
        let (p, b) = per_cpu
            .iter()
            .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
        println!("{:<24} {:>12} {:>14}", v.name(), p, b);
    }
    Ok(())
}
