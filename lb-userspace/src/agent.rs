//! `lb run`: load (or adopt) the datapath, wait for a complete view of the
//! Services from the source (a YAML file, or the Kubernetes API), program
//! it, attach, then follow every change until SIGTERM/SIGINT, when the
//! datapath is left running for the next agent (or removed with
//! `--cleanup-on-exit`).
//!
//! The loop: an update arrives; everything else already queued is taken
//! too (a burst becomes one sync); the catalog rebuilds the Services the
//! updates touched; the programmer writes the service ports that changed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use anyhow::Context;
use k8s_openapi::api::core::v1::Node;
use lb_common::{
    addr, Addr, DatapathConfig, ADDR_UNSPECIFIED, CONFIG_F_EXTERNAL_CLUSTER_IP_DROP,
    CONFIG_F_EXTERNAL_CLUSTER_IP_MASQ, CONFIG_F_SOCK_ALL_NETNS,
};
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    sync::mpsc::UnboundedReceiver,
};
use tracing::{error, info, warn};

use crate::{
    kernel::conntrack::{self, CtSizes, Evictions},
    kernel::datapath::{self, Attached, Datapath, Hook, KernelMaps, TcMode},
    kernel::interfaces::{Interfaces, LinkKind, Selection, Skip, Step, XdpIface},
    kernel::link_watch::{self, LinkEvent},
    kernel::pins,
    kernel::probes::{self, TcAttach},
    model::catalog::Catalog,
    model::{NodeConfig, Prefix, ServicePortKey},
    plan::{Programmer, Report},
    ports::{self, PortRange},
    serve::{
        healthcheck::HealthServers,
        metrics::Metrics,
        status::{self, Status},
    },
    source::{self, Change, Update, Updates, What},
    system::{self, PinDirLock},
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

/// Where the Services come from.
#[derive(Clone, Debug)]
pub enum SourceOptions {
    /// A YAML file of Services and EndpointSlices, followed as it changes.
    File(PathBuf),
    /// The API server: in-cluster, or this kubeconfig, or KUBECONFIG.
    Kubernetes { kubeconfig: Option<PathBuf> },
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub source: SourceOptions,
    /// `--iface` glob patterns; empty: every interface but loopback.
    pub ifaces: Vec<String>,
    /// `--exclude-iface` glob patterns.
    pub exclude_ifaces: Vec<String>,
    /// `--xdp-iface` names and modes: XDP instead of TC ingress.
    pub xdp_ifaces: Vec<XdpIface>,
    /// `--tc-attach`: TCX links or clsact filters.
    pub tc_attach: TcAttach,
    /// `node_ips` empty: taken from the Node object (Kubernetes source).
    pub node: NodeConfig,
    pub pin_dir: PathBuf,
    /// cgroup v2 directory for the socket hooks.
    pub cgroup: Option<PathBuf>,
    /// The socket hooks translate only the node's own network namespace
    /// (else every namespace: pods too).
    pub socket_lb_host_only: bool,
    /// Detach and unpin everything on exit instead of leaving the datapath
    /// running for the next agent.
    pub cleanup_on_exit: bool,
    /// `/healthz`, `/readyz`, `/livez`.
    pub http_addr: Option<SocketAddr>,
    /// `/metrics`, `/proxyMode`.
    pub metrics_addr: Option<SocketAddr>,
    /// `/healthz` fails once a change waits longer than this.
    pub health_timeout: std::time::Duration,
    /// `--conntrack-max`: entries of the established TCP table (the others
    /// follow); None: sized from the node's memory.
    pub conntrack_max: Option<u32>,
    /// Source ports for translated flows.
    pub snat_ports: PortRange,
    /// The cluster's NodePort range, reserved for NodePorts on the node.
    pub nodeport_range: PortRange,
    /// `--nodeport-addresses`: NodePorts answer on the node's addresses in
    /// these ranges (followed as addresses come and go); None: on the
    /// node's primary addresses (`--node-ip`, else the Node's).
    pub nodeport_cidrs: Option<Vec<Prefix>>,
    /// `--external-cluster-ip`: what a ClusterIP does for a client outside
    /// the cluster (once its pod ranges are known).
    pub external_cluster_ip: ExternalClusterIp,
    /// `--cluster-cidr`: sources inside the cluster (pods), besides the
    /// Node's podCIDRs. They reach externalTrafficPolicy Local frontends
    /// with every endpoint, as kube-proxy's short-circuit does.
    pub cluster_cidrs: Vec<Prefix>,
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    system::check_privileges()?;
    probes::check(probes::Needs {
        xdp: !opts.xdp_ifaces.is_empty(),
        cgroup: opts.cgroup.is_some(),
    })?;
    let tc_mode = probes::tc_mode(opts.tc_attach)?;
    let ephemeral = ports::ephemeral_range().context("reading net.ipv4.ip_local_port_range")?;
    ports::check_snat_range(opts.snat_ports, ephemeral, opts.nodeport_range)
        .map_err(anyhow::Error::msg)?;
    let selection = Selection::new(&opts.ifaces, &opts.exclude_ifaces, &opts.xdp_ifaces)?;
    // Interfaces named exactly are expected now: a typo should not wait
    // silently for an interface that never comes.
    for iface in selection.named() {
        if nix::net::if_::if_nametoindex(iface).is_err() {
            anyhow::bail!(
                "interface {iface:?} does not exist in this network namespace (see `ip link show`; \
                 a glob pattern such as \"{iface}*\" also follows interfaces created later)"
            );
        }
    }
    // Fail on an unusable file or API configuration before touching the
    // kernel.
    let (updates, needs) = match &opts.source {
        SourceOptions::File(path) => (source::watch_file(path.clone())?, Needs::file()),
        SourceOptions::Kubernetes { kubeconfig } => {
            anyhow::ensure!(
                !opts.node.name.is_empty(),
                "give --node-name (or set NODE_NAME, as the DaemonSet does): the agent \
                 watches its own Node and tells local endpoints from remote ones by it"
            );
            let client = source::kube_client(kubeconfig.as_deref()).await?;
            (
                source::watch_kubernetes(client, &opts.node.name),
                Needs::kubernetes(),
            )
        }
    };
    if opts.node.node_ips.is_empty() && matches!(opts.source, SourceOptions::File(_)) {
        warn!("no --node-ip given: NodePort services get no node frontends");
    }
    // Subscribed before anything is attached: an interface created from
    // here on is seen.
    let links = link_watch::watch_links().await?;
    system::ensure_bpffs(&opts.pin_dir)?;
    let _lock = PinDirLock::acquire(&opts.pin_dir)?;
    if let Err(e) = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_MEMLOCK,
        nix::sys::resource::RLIM_INFINITY,
        nix::sys::resource::RLIM_INFINITY,
    ) {
        // Kernels since 5.11 charge BPF memory to the cgroup instead.
        info!("could not raise RLIMIT_MEMLOCK ({e}); fine on kernels that account BPF memory by cgroup");
    }
    // Each Maglev writer thread holds up to `FRESH_PER_BATCH` new arrays
    // (descriptors) at once: the soft descriptor limit is raised to the
    // hard one, as the Go runtime does for its programs.
    if let Ok((soft, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        if soft < hard {
            let _ = nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
                hard,
                hard,
            );
        }
    }
    let status = Status::new(Metrics::new(&opts.pin_dir), opts.health_timeout);
    if let Some(addr) = opts.http_addr {
        status::serve_health(addr, status.clone()).await?;
        info!(%addr, "serving /healthz, /readyz and /livez");
    }
    if let Some(addr) = opts.metrics_addr {
        status::serve_metrics(addr, status.clone()).await?;
        info!(%addr, "serving /metrics and /proxyMode");
    }

    match ports::reserve(opts.nodeport_range) {
        Ok(true) => {
            info!(range = %opts.nodeport_range, "reserved the NodePort range for NodePorts (net.ipv4.ip_local_reserved_ports): the node's own sockets no longer get local ports there")
        }
        Ok(false) => {}
        Err(e) => {
            warn!(range = %opts.nodeport_range, "could not reserve the NodePort range in net.ipv4.ip_local_reserved_ports ({e}): a reply to a local socket with a port there could be taken for a NodePort connection")
        }
    }
    let sizes = CtSizes::for_this_node(opts.conntrack_max);
    info!(
        tcp = sizes.tcp,
        syn = sizes.syn,
        udp = sizes.udp,
        snat = sizes.snat,
        "conntrack table sizes (entries; --conntrack-max sets them)"
    );
    let (mut dp, maps, origin) = Datapath::load(&opts.pin_dir, &sizes)?;
    dp.set_tc_mode(tc_mode);
    match tc_mode {
        TcMode::Tcx => info!(mode = "tcx", "TC programs attach through TCX links"),
        TcMode::Netlink if opts.tc_attach == TcAttach::Netlink => info!(
            mode = "netlink",
            "TC programs attach as clsact filters (--tc-attach netlink)"
        ),
        TcMode::Netlink => info!(
            mode = "netlink",
            kernel = %probes::kernel_release(),
            "TC programs attach as clsact filters: this kernel has no TCX (Linux 6.6 and later have it)"
        ),
    }
    tokio::spawn(sweep_conntrack(opts.pin_dir.clone(), status.clone()));
    for bad in &origin.recreated {
        warn!(
            map = bad.map,
            "the pinned map's layout differs from this agent's ({}): recreating every map; \
              established flows that were SNATed or whose backend set changed lose their state",
            bad.reason
        );
    }
    if !origin.adopted.is_empty() {
        info!(pin_dir = %opts.pin_dir.display(), maps = origin.adopted.len(), links = pins::pinned_links(&opts.pin_dir).len(),
              "adopting the datapath a previous agent left running");
    }
    let programmer = if origin.adopted.is_empty() {
        Programmer::new(maps)
    } else {
        Programmer::adopt(maps).context("reading back the adopted maps")?
    };
    let mut agent = Agent {
        catalog: Catalog::new(opts.node.clone()),
        programmer,
        health: HealthServers::new(status.clone()),
        status,
        watches_down: BTreeSet::new(),
        dp,
        interfaces: Interfaces::new(selection),
        skip_logged: BTreeMap::new(),
        needs,
        node_ips_given: !opts.node.node_ips.is_empty(),
        node_missing_logged: false,
        snat_addr: None,
        pod_cidrs: Vec::new(),
        cidrs_written: None,
        addresses_changed: false,
        named: HashMap::new(),
        names_written: false,
        snat_seed: system::random_u32(),
        pending_since: None,
        opts,
    };
    let result = agent.serve(updates, links).await;
    let Agent { dp, opts, .. } = agent;
    let shutdown = dp.shutdown(opts.cleanup_on_exit);
    result?;
    shutdown.with_context(|| format!("removing the pins in {}", opts.pin_dir.display()))?;
    if opts.cleanup_on_exit {
        info!("detached and removed every pin; bye");
    } else {
        info!(pin_dir = %opts.pin_dir.display(), "exiting with the datapath left running for the next agent (`lb cleanup` removes it); bye");
    }
    Ok(())
}

/// Kinds a source must have listed completely before the first sync: the
/// first apply deletes whatever a previous agent left that is not in the
/// desired state, so it must never see a partial view.
struct Needs {
    missing: BTreeSet<&'static str>,
}

impl Needs {
    fn file() -> Needs {
        Needs {
            missing: ["file"].into(),
        }
    }

    fn kubernetes() -> Needs {
        Needs {
            missing: ["Services", "EndpointSlices", "Node"].into(),
        }
    }

    fn done(&self) -> bool {
        self.missing.is_empty()
    }
}

struct Agent {
    catalog: Catalog,
    programmer: Programmer<KernelMaps>,
    health: HealthServers,
    status: Arc<Status>,
    dp: Datapath,
    /// The namespace's interfaces and which carry the datapath.
    interfaces: Interfaces,
    /// Interfaces already logged as not followed (index -> name).
    skip_logged: BTreeMap<u32, String>,
    needs: Needs,
    opts: RunOptions,
    node_ips_given: bool,
    node_missing_logged: bool,
    /// The SNAT address and flags last written to lb_config.
    snat_addr: Option<((Addr, Addr), u32)>,
    /// This Node's spec.podCIDRs (both families).
    pod_cidrs: Vec<Prefix>,
    /// What lb_cluster_cidrs holds, once written.
    cidrs_written: Option<Vec<Prefix>>,
    /// An address came or went since they were last listed.
    addresses_changed: bool,
    /// The names written to lb_svc_names, by service port.
    named: HashMap<ServicePortKey, u32>,
    /// lb_svc_names was written in full once.
    names_written: bool,
    /// This run's secret for the first SNAT port a flow tries.
    snat_seed: u32,
    /// When the oldest update not yet programmed arrived.
    pending_since: Option<Instant>,
    /// API watches that failed and are not back: changes may be missing.
    watches_down: BTreeSet<&'static str>,
}

enum Next {
    Update(Box<Update>),
    Link(LinkEvent),
    /// Failed service ports are due for a retry.
    Retry,
    Stop,
}

impl Agent {
    async fn serve(
        &mut self,
        mut updates: Updates,
        mut links: UnboundedReceiver<LinkEvent>,
    ) -> anyhow::Result<()> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        // Until the first complete view: only collect. A previous agent's
        // datapath, if any, keeps serving meanwhile.
        while !self.needs.done() {
            match next(&mut updates, &mut links, &mut sigterm, &mut sigint, None).await? {
                Next::Update(u) => self.take(*u),
                Next::Link(e) => self.take_link(e)?,
                Next::Retry => {}
                Next::Stop => return Ok(()),
            }
        }
        while let Ok(u) = updates.try_recv() {
            self.take(u);
        }
        while let Ok(e) = links.try_recv() {
            self.take_link(e)?;
        }
        self.addresses_changed = false;
        self.nodeport_addresses();
        self.first_sync().await?;
        loop {
            let retry_at = self.programmer.next_retry();
            match next(
                &mut updates,
                &mut links,
                &mut sigterm,
                &mut sigint,
                retry_at,
            )
            .await?
            {
                Next::Update(u) => {
                    self.take(*u);
                    // Coalesce: whatever else is already queued goes into
                    // the same sync (a burst costs one rebuild per Service).
                    while let Ok(u) = updates.try_recv() {
                        self.take(u);
                    }
                    self.sync().await?;
                }
                Next::Link(e) => {
                    self.take_link(e)?;
                    while let Ok(e) = links.try_recv() {
                        self.take_link(e)?;
                    }
                    self.follow_interfaces(false)?;
                    if std::mem::take(&mut self.addresses_changed) && self.nodeport_addresses() {
                        self.sync().await?;
                    }
                }
                Next::Retry => self.retry(),
                Next::Stop => return Ok(()),
            }
        }
    }

    /// Applies one link event to the interface set (no attach yet).
    fn take_link(&mut self, e: LinkEvent) -> anyhow::Result<()> {
        match e {
            LinkEvent::All(all) => {
                self.interfaces.set_present(all);
                self.addresses_changed = true;
            }
            LinkEvent::Changed(link) => self.interfaces.link_changed(link),
            LinkEvent::Removed(index) => self.interfaces.link_removed(index),
            LinkEvent::Addresses => self.addresses_changed = true,
            LinkEvent::Lost(why) => anyhow::bail!(
                "{why}: interfaces can no longer be followed; exiting so that the agent is \
                 restarted (the datapath stays in place)"
            ),
        }
        Ok(())
    }

    /// Attaches to the interfaces that appeared, moves the links of renamed
    /// ones and removes those of interfaces that went. On the first call
    /// (start-up), failing on an interface named exactly is an error.
    fn follow_interfaces(&mut self, first: bool) -> anyhow::Result<()> {
        self.log_skipped();
        for (index, step) in self.interfaces.plan() {
            let outcome = match &step {
                Step::Attach { name, ingress } => self.dp.attach_iface(name, *ingress).map(Some),
                Step::Rename { from, to, ingress } => {
                    self.dp.rename_iface(from, to, *ingress).map(Some)
                }
                Step::Detach { name, .. } => self
                    .dp
                    .detach_iface(name)
                    .map(|()| None)
                    .map_err(|e| crate::kernel::datapath::DatapathError::Pins(e.into())),
            };
            let ok = outcome.is_ok();
            self.report_step(index, &step, outcome, first)?;
            self.interfaces.applied(index, &step, ok);
        }
        self.status
            .metrics
            .set_interfaces(&self.interfaces.in_force());
        Ok(())
    }

    /// The log line for one applied step; an error only for an interface
    /// named exactly that fails at start-up.
    fn report_step(
        &self,
        index: u32,
        step: &Step,
        outcome: Result<Option<Attached>, crate::kernel::datapath::DatapathError>,
        first: bool,
    ) -> anyhow::Result<()> {
        let e = match (step, outcome) {
            (Step::Attach { name, ingress }, Ok(how)) => {
                let hooks = hook_labels(*ingress);
                match how {
                    Some(Attached::Replaced) => {
                        info!(iface = %name, %hooks, "replaced the programs in place")
                    }
                    _ => info!(iface = %name, %hooks, "attached"),
                }
                return Ok(());
            }
            (Step::Rename { from, to, .. }, Ok(_)) => {
                info!(iface = %to, from = %from, "interface renamed: its links follow it");
                return Ok(());
            }
            (Step::Detach { name, .. }, Ok(_)) => {
                let why = if self.interfaces.is_present(index) {
                    "no longer selected"
                } else {
                    "interface gone"
                };
                info!(iface = %name, "detached ({why})");
                return Ok(());
            }
            (_, Err(e)) => e,
        };
        let name = match step {
            Step::Attach { name, .. } | Step::Detach { name, .. } => name,
            Step::Rename { to, .. } => to,
        };
        if first && self.interfaces.selection().named().contains(&name.as_str()) {
            return Err(e.into());
        }
        // Attaching goes by name: a CNI renaming or deleting the interface
        // meanwhile is no failure, its next event (already on its way) says
        // what to do.
        if nix::net::if_::if_nametoindex(name.as_str()) == Ok(index) {
            self.status.metrics.interface_failures.inc();
            warn!(iface = %name, "{e:#}; not retried until the interface changes");
        } else {
            tracing::debug!(iface = %name, "renamed or deleted while attaching ({e:#}); following its next event");
        }
        Ok(())
    }

    /// One line per interface that is not followed for a reason a user may
    /// not expect (no Ethernet header); the rest at debug level.
    fn log_skipped(&mut self) {
        let mut seen = BTreeMap::new();
        for (link, judged) in self.interfaces.judged() {
            let Err(skip) = judged else { continue };
            if self.skip_logged.get(&link.index) != Some(&link.name) {
                if skip == Skip::NotEthernet {
                    info!(iface = %link.name, "not attached: {skip}");
                } else if link.kind != LinkKind::Loopback {
                    tracing::debug!(iface = %link.name, "not attached: {skip}");
                }
            }
            seen.insert(link.index, link.name.clone());
        }
        self.skip_logged = seen;
    }

    /// Applies one update to the catalog (no map writes yet).
    fn take(&mut self, u: Update) {
        self.pending_since.get_or_insert(u.received);
        self.status.queued(u.received);
        match u.what {
            What::Lost(kind) => {
                self.watches_down.insert(kind);
            }
            What::Back(kind) => {
                self.watches_down.remove(kind);
            }
            What::File {
                services,
                slices,
                rejections,
            } => {
                for r in &rejections {
                    warn!(object = %r.object, "rejected: {}", r.reason);
                }
                self.catalog.replace_services(&services);
                for r in self.catalog.replace_slices(&slices) {
                    warn!(object = %r.object, "rejected: {}", r.reason);
                }
                self.needs.missing.remove("file");
            }
            What::Services(change) => match change {
                Change::Applied(s) => self.catalog.apply_service(&s),
                Change::Deleted(s) => self.catalog.delete_service(&s),
                Change::ListBegins => self.catalog.begin_services_list(),
                Change::Listing(part) => self.catalog.list_services(&part, false),
                Change::Listed(part) => {
                    self.catalog.list_services(&part, true);
                    self.needs.missing.remove("Services");
                    self.watches_down.remove("Services");
                }
            },
            What::Slices(change) => {
                let rejections = match change {
                    Change::Applied(s) => self.catalog.apply_slice(&s).into_iter().collect(),
                    Change::Deleted(s) => {
                        self.catalog.delete_slice(&s);
                        Vec::new()
                    }
                    Change::ListBegins => {
                        self.catalog.begin_slices_list();
                        Vec::new()
                    }
                    Change::Listing(part) => self.catalog.list_slices(&part, false),
                    Change::Listed(part) => {
                        self.needs.missing.remove("EndpointSlices");
                        self.watches_down.remove("EndpointSlices");
                        self.catalog.list_slices(&part, true)
                    }
                };
                for r in rejections {
                    warn!(object = %r.object, "rejected: {}", r.reason);
                }
            }
            What::Node(change) => {
                let node = match change {
                    Change::Applied(n) => Some(n),
                    Change::Deleted(_) => None,
                    // One Node is watched: its list is one part.
                    Change::ListBegins | Change::Listing(_) => return,
                    Change::Listed(all) => {
                        self.needs.missing.remove("Node");
                        self.watches_down.remove("Node");
                        all.into_iter().next()
                    }
                };
                self.node_changed(node.as_ref());
            }
        }
    }

    /// Takes NodePort addresses from the Node unless --node-ip was given.
    fn node_changed(&mut self, node: Option<&Node>) {
        let Some(node) = node else {
            if !self.node_missing_logged {
                warn!(node = %self.opts.node.name, "this Node is not in the API: NodePorts get no node address unless --node-ip is given");
                self.node_missing_logged = true;
            }
            return;
        };
        self.node_missing_logged = false;
        let pod_cidrs = pod_cidrs(node);
        if pod_cidrs != self.pod_cidrs {
            info!(node = %self.opts.node.name, cidrs = ?pod_cidrs, "pods of this node (podCIDRs) reach externalTrafficPolicy Local frontends with every endpoint");
            self.pod_cidrs = pod_cidrs;
            self.write_cluster_cidrs();
        }
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
            .filter(|z| !z.is_empty())
            .cloned()
            .or_else(|| self.opts.node.zone.clone());
        if zone != self.catalog.node().zone {
            info!(node = %self.opts.node.name, ?zone, "this node's zone (topology hints)");
            let mut cfg = self.catalog.node().clone();
            cfg.zone = zone;
            self.catalog.set_node(cfg);
        }
        if self.node_ips_given {
            return;
        }
        let ips = node_addresses(node);
        if ips != self.catalog.node().node_ips {
            info!(node = %self.opts.node.name, addresses = ?ips, "NodePorts answer on the Node's addresses");
            let mut cfg = self.catalog.node().clone();
            cfg.node_ips = ips;
            self.catalog.set_node(cfg);
        }
    }

    /// The first sync: adopts what a previous agent left (keeping its ids),
    /// then attaches (swapping our programs into pinned links).
    async fn first_sync(&mut self) -> anyhow::Result<()> {
        let report = self.sync_maps();
        if report.adopted + report.stale_removed > 0 {
            info!(kept = report.adopted, deleted = report.stale_removed, "adopted service ids (established flows keep their backends); deleted the stale ones");
        }
        self.health
            .update(&self.catalog.state().health_checks)
            .await;
        self.follow_interfaces(true)?;
        if self.interfaces.in_force().is_empty() {
            warn!("no interface is attached yet: waiting for one that --iface selects to appear");
        }
        let opts = self.opts.clone();
        match &opts.cgroup {
            Some(cg) => {
                let how = match self.dp.attach_cgroup(cg)? {
                    Attached::Replaced => "replaced the socket hooks",
                    Attached::New => "attached socket hooks",
                };
                let scope = if opts.socket_lb_host_only {
                    "the node's own network namespace only"
                } else {
                    "every network namespace: the node and its pods"
                };
                info!(cgroup = %cg.display(), "{how}: sockets of {scope}");
            }
            None => info!("no --cgroup: the node's own connections to services are not balanced"),
        }
        for name in self.dp.remove_other_links()? {
            info!(link = %name, "detached a previous agent's program that is no longer asked for");
        }
        self.dp.started();
        self.status.set_attached();
        self.status.set_ready();
        info!(
            pin_dir = %self.opts.pin_dir.display(),
            services = self.catalog.state().services.len(),
            "datapath ready"
        );
        Ok(())
    }

    async fn sync(&mut self) -> anyhow::Result<()> {
        // Nothing to write (say, a file saved unchanged): say so anyway,
        // the line is how a user sees the change was taken.
        let report = if self.catalog.is_dirty() {
            self.sync_maps()
        } else {
            self.pending_since = None;
            self.mark_caught_up();
            Report::default()
        };
        self.health
            .update(&self.catalog.state().health_checks)
            .await;
        log_counts(&report, "applied config");
        Ok(())
    }

    /// Rebuilds what changed and writes it to the maps.
    fn sync_maps(&mut self) -> Report {
        self.write_config();
        self.write_cluster_cidrs();
        let rebuilt = self.catalog.rebuild();
        for r in &rebuilt.rejections {
            warn!(object = %r.object, "rejected: {}", r.reason);
        }
        for r in &rebuilt.skipped {
            info!(object = %r.object, "skipped: {}", r.reason);
        }
        for r in &rebuilt.partial {
            warn!(object = %r.object, "programmed in part: {}", r.reason);
        }
        let state = self.catalog.state();
        let report = match &rebuilt.keys {
            Some(keys) => self.programmer.apply_keys(state, keys),
            None => self.programmer.apply(state),
        };
        if let Some(since) = self.pending_since.take() {
            self.status
                .metrics
                .observe_sync(since.elapsed(), report.failed.len());
        }
        self.after_apply(&report);
        report
    }

    /// Logs, metrics and health after the maps were written.
    fn after_apply(&mut self, report: &Report) {
        log_report(&self.programmer, &self.catalog, report);
        self.write_service_names(report);
        self.mark_caught_up();
        let m = &self.status.metrics;
        m.services.set(self.programmer.service_count() as i64);
        m.backends.set(self.programmer.backend_count() as i64);
        // The per-service metrics' labels, updated for what changed only (a
        // sync costs what its change costs, not what the cluster holds).
        let mut names = m.names.lock().expect("names lock");
        let gone: BTreeSet<&ServicePortKey> = report
            .diff
            .removed
            .iter()
            .chain(report.failed.iter().map(|(k, _)| k))
            .collect();
        if !gone.is_empty() {
            names.retain(|_, k| !gone.contains(k));
        }
        for key in report.diff.added.iter().chain(&report.diff.changed) {
            if let Some(id) = self.programmer.service_id(key) {
                names.insert(id, key.clone());
            }
        }
    }

    /// `lb_svc_names`: every programmed service port's name, by id. The
    /// first time in full (a previous agent, perhaps one that wrote no
    /// names, left the map), then only the service ports the report
    /// touched, so a sync costs what its change costs. Names are for
    /// people: a failed write is logged, not retried.
    fn write_service_names(&mut self, report: &Report) {
        let keys: Vec<ServicePortKey> = if self.names_written {
            report
                .diff
                .removed
                .iter()
                .chain(report.failed.iter().map(|(k, _)| k))
                .chain(&report.diff.added)
                .chain(&report.diff.changed)
                .cloned()
                .collect()
        } else {
            self.programmer
                .programmed()
                .map(|(k, _)| k.clone())
                .collect()
        };
        let mut unname: Vec<u32> = Vec::new();
        let mut name: Vec<(ServicePortKey, u32)> = Vec::new();
        for key in keys {
            let now = self.programmer.service_id(&key);
            let before = self.named.get(&key).copied();
            if now == before {
                continue;
            }
            if let Some(old) = before {
                self.named.remove(&key);
                unname.push(old);
            }
            if let Some(id) = now {
                name.push((key, id));
            }
        }
        if !self.names_written {
            let programmed: BTreeSet<u32> =
                self.programmer.programmed().map(|(_, id)| id).collect();
            unname.extend(
                self.programmer
                    .maps()
                    .named_services()
                    .into_iter()
                    .filter(|id| !programmed.contains(id)),
            );
            self.names_written = true;
        }
        // Removals first: an id freed by one service port may be another's.
        let maps = self.programmer.maps_mut();
        let mut failed = None;
        for id in unname {
            if let Err(e) = maps.remove_service_name(id) {
                failed = Some(e);
            }
        }
        for (key, id) in name {
            match maps.set_service_name(id, &key.to_string()) {
                Ok(()) => {
                    self.named.insert(key, id);
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            warn!("service names for `lb services` may be stale: {e:#}");
        }
    }

    /// Health: the maps hold every change, unless something is left to
    /// retry or a watch is down.
    fn mark_caught_up(&self) {
        if self.programmer.pending() == 0 && self.watches_down.is_empty() {
            self.status.updated();
        }
    }

    /// Retries the service ports whose writes failed (the backoff is due).
    fn retry(&mut self) {
        let report = self
            .programmer
            .retry_due(self.catalog.state(), Instant::now());
        if report.diff.is_empty() && report.failed.is_empty() {
            return;
        }
        self.after_apply(&report);
        log_counts(&report, "retried failed writes");
    }

    /// Node facts the datapath reads: SNAT address (the first node
    /// address), SNAT ports, the node's netns cookie.
    fn write_config(&mut self) {
        // The first node address of each family masquerades that family.
        let first = |v4: bool| {
            let ips = &self.catalog.node().node_ips;
            ips.iter()
                .find(|a| a.is_ipv4() == v4)
                .map_or(ADDR_UNSPECIFIED, |a| addr::from_ip(*a))
        };
        let addr = (first(true), first(false));
        let mut flags = if self.opts.socket_lb_host_only {
            0
        } else {
            CONFIG_F_SOCK_ALL_NETNS
        };
        // Outside clients of a ClusterIP can be told apart only once the
        // cluster's pod ranges are known.
        if self.cidrs_written.as_ref().is_some_and(|c| !c.is_empty()) {
            flags |= match self.opts.external_cluster_ip {
                ExternalClusterIp::Masquerade => CONFIG_F_EXTERNAL_CLUSTER_IP_MASQ,
                ExternalClusterIp::Drop => CONFIG_F_EXTERNAL_CLUSTER_IP_DROP,
                ExternalClusterIp::Direct => 0,
            };
        }
        if self.snat_addr == Some((addr, flags)) {
            return;
        }
        // Only the socket hooks read the cookie (kernels before 5.14 cannot
        // tell it, and need no socket hooks without --cgroup).
        let cookie = match system::netns_cookie() {
            Err(_) if self.opts.cgroup.is_none() => Ok(0),
            c => c,
        };
        let cfg = cookie.and_then(|cookie| {
            self.programmer.maps_mut().set_config(DatapathConfig {
                snat_addr4: addr.0,
                snat_addr6: addr.1,
                snat_port_min: self.opts.snat_ports.min,
                snat_port_max: self.opts.snat_ports.max,
                netns_cookie: cookie,
                flags,
                snat_seed: self.snat_seed,
                ..Default::default()
            })
        });
        match cfg {
            Ok(()) => self.snat_addr = Some((addr, flags)),
            Err(e) => error!("writing lb_config, will retry on the next change: {e:#}"),
        }
    }
}

impl Agent {
    /// With `--nodeport-addresses`: lists the namespace's IPv4 addresses
    /// and makes NodePorts answer on those in the ranges. True if that
    /// changed where they answer.
    fn nodeport_addresses(&mut self) -> bool {
        let Some(cidrs) = &self.opts.nodeport_cidrs else {
            return false;
        };
        let ips = match local_addresses() {
            Ok(all) => {
                let mut ips: Vec<IpAddr> = all
                    .into_iter()
                    .filter(|a| cidrs.iter().any(|c| c.contains(*a)))
                    .collect();
                ips.sort();
                ips.dedup();
                ips
            }
            Err(e) => {
                error!("listing this node's addresses for --nodeport-addresses: {e}");
                return false;
            }
        };
        if self.catalog.node().nodeport_ips.as_ref() == Some(&ips) {
            return false;
        }
        info!(addresses = ?ips, "NodePorts answer on the node's addresses in --nodeport-addresses");
        let mut cfg = self.catalog.node().clone();
        cfg.nodeport_ips = Some(ips);
        self.catalog.set_node(cfg);
        true
    }

    /// `lb_cluster_cidrs`: `--cluster-cidr` and the Node's podCIDRs.
    fn write_cluster_cidrs(&mut self) {
        let mut want: Vec<Prefix> = self
            .opts
            .cluster_cidrs
            .iter()
            .chain(&self.pod_cidrs)
            .copied()
            .collect();
        want.sort();
        want.dedup();
        if self.cidrs_written.as_ref() == Some(&want) {
            return;
        }
        match self.programmer.maps_mut().set_cluster_cidrs(&want) {
            Ok(()) => {
                self.cidrs_written = Some(want);
                // The ClusterIP rule for outside clients may apply now.
                self.write_config();
            }
            Err(e) => error!("writing lb_cluster_cidrs, will retry on the next change: {e:#}"),
        }
    }
}

/// `--external-cluster-ip`: new flows to a ClusterIP from outside the
/// cluster (sources not in `--cluster-cidr` or the Node's podCIDRs, not
/// the node), once those ranges are known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ExternalClusterIp {
    /// Masqueraded to the node address, so that a backend on another node
    /// answers through this one (kube-proxy, with a cluster CIDR).
    #[default]
    Masquerade,
    /// Dropped (Cilium's default), counted `drop_source_range`.
    Drop,
    /// Translated like any client: the backend answers the client
    /// directly, which works only for backends on this node.
    Direct,
}

/// The addresses of this network namespace's interfaces, both families.
fn local_addresses() -> nix::Result<Vec<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|i| {
            let a = i.address?;
            match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
                (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
                (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
                _ => None,
            }
        })
        .collect())
}

/// The Node label EndpointSlice zone hints name.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// spec.podCIDRs (else spec.podCIDR) of a Node, both families.
fn pod_cidrs(node: &Node) -> Vec<Prefix> {
    let Some(spec) = &node.spec else {
        return Vec::new();
    };
    let listed = spec.pod_cidrs.clone().unwrap_or_default();
    let all = if listed.is_empty() {
        spec.pod_cidr.iter().cloned().collect()
    } else {
        listed
    };
    let mut out: Vec<Prefix> = all.iter().filter_map(|c| c.parse().ok()).collect();
    out.sort();
    out.dedup();
    out
}

/// Every `LB_CT_SWEEP_MS` (default 10 s): removes expired conntrack entries
/// and updates the conntrack metrics. The walk runs off the agent's thread.
async fn sweep_conntrack(pin_dir: PathBuf, status: Arc<Status>) {
    let every = std::env::var("LB_CT_SWEEP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut evictions = Evictions::default();
    let mut failing = false;
    loop {
        tick.tick().await;
        let dir = pin_dir.clone();
        let swept =
            tokio::task::spawn_blocking(move || conntrack::sweep(&dir, conntrack::monotonic_ns()))
                .await;
        match swept {
            Ok(Ok(s)) => {
                failing = false;
                status.metrics.set_conntrack(&evictions.account(&s));
                status
                    .metrics
                    .set_conntrack_live(s.iter().map(|(name, t)| (*name, t.live)).collect());
            }
            // Once per run of failures: the maps are gone at exit with
            // --cleanup-on-exit, or another process removed them.
            Ok(Err(e)) if !failing => {
                failing = true;
                warn!("conntrack sweep failed: {e:#}");
            }
            _ => {}
        }
    }
}

async fn next(
    updates: &mut Updates,
    links: &mut UnboundedReceiver<LinkEvent>,
    sigterm: &mut Signal,
    sigint: &mut Signal,
    retry_at: Option<Instant>,
) -> anyhow::Result<Next> {
    let retry = async {
        match retry_at {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = retry => Ok(Next::Retry),
        e = links.recv() => match e {
            Some(e) => Ok(Next::Link(e)),
            None => anyhow::bail!("the interface watcher stopped"),
        },
        _ = sigterm.recv() => { info!("SIGTERM: shutting down"); Ok(Next::Stop) }
        _ = sigint.recv() => { info!("SIGINT: shutting down"); Ok(Next::Stop) }
        u = updates.recv() => match u {
            Some(u) => Ok(Next::Update(Box::new(u))),
            None => anyhow::bail!("the source of Services stopped"),
        }
    }
}

/// "tc_ingress+tc_egress": what an interface gets, for log lines.
fn hook_labels(ingress: crate::kernel::interfaces::Ingress) -> String {
    Hook::for_ingress(ingress).map(Hook::label).join("+")
}

/// InternalIP and ExternalIP addresses of a Node, both families, in its
/// order.
fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for a in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        if a.type_ == "InternalIP" || a.type_ == "ExternalIP" {
            if let Ok(ip) = a.address.parse::<IpAddr>() {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
    }
    ips
}

/// `lb cleanup`: removes what an agent left pinned in `pin_dir`, which
/// detaches its programs. Refuses while an agent runs there.
pub fn cleanup(pin_dir: &Path) -> anyhow::Result<()> {
    let filters = datapath::our_filters_everywhere().context("listing clsact filters")?;
    if !pin_dir.exists() && filters.is_empty() {
        info!(pin_dir = %pin_dir.display(), "nothing to clean up");
        return Ok(());
    }
    let lock = pin_dir
        .exists()
        .then(|| PinDirLock::acquire(pin_dir))
        .transpose()?;
    let links = pins::pinned_links(pin_dir);
    let maps = pins::pinned_maps(pin_dir);
    datapath::remove_all(pin_dir)
        .with_context(|| format!("removing the pins in {}", pin_dir.display()))?;
    drop(lock);
    info!(pin_dir = %pin_dir.display(), links = links.len(), filters = filters.len(), maps = maps.len(), "detached and removed");
    Ok(())
}

/// One line per service port that was written or removed, each in a span
/// carrying the service port's key (`service{service=demo/web:http/TCP}:
/// programmed id=1 ...`), so the key is on every line about it.
fn log_report(programmer: &Programmer<KernelMaps>, catalog: &Catalog, report: &Report) {
    let state = catalog.state();
    for key in report.diff.added.iter().chain(&report.diff.changed) {
        let Some(sp) = state.services.get(key) else {
            continue;
        };
        if report.failed.iter().any(|(k, _)| k == key) {
            continue;
        }
        let _span = service_span(key).entered();
        let frontends: Vec<String> = sp.frontends.iter().map(|f| f.to_string()).collect();
        let usable = sp.usable_endpoints();
        info!(
            id = programmer.service_id(key).unwrap_or(0),
            frontends = %frontends.join(","),
            backends = sp.endpoints.len(),
            usable = usable.len(),
            affinity = sp.affinity_timeout_s.map(|t| format!("ClientIP/{t}s")).unwrap_or_else(|| "None".into()),
            "programmed"
        );
    }
    for key in &report.diff.removed {
        let _span = service_span(key).entered();
        info!("removed");
    }
    for (key, e) in &report.failed {
        let _span = service_span(key).entered();
        error!("programming failed, retrying with backoff: {e}");
    }
}

/// `applied config added=1 changed=0 removed=0 failed=0`: the line a user
/// watches for after a change.
fn log_counts(report: &Report, what: &str) {
    info!(
        added = report.diff.added.len(),
        changed = report.diff.changed.len(),
        removed = report.diff.removed.len(),
        failed = report.failed.len(),
        "{what}"
    );
}

fn service_span(key: &ServicePortKey) -> tracing::Span {
    tracing::info_span!("service", service = %key)
}

/// A value of `--node-ip`: an IPv4 or IPv6 address.
pub fn parse_node_ip(s: &str) -> Result<IpAddr, String> {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V6(a)) if a.to_ipv4_mapped().is_some() => Err(format!(
            "{s:?} is IPv4-mapped: give the IPv4 address itself"
        )),
        Ok(a) => Ok(a),
        Err(_) => Err(format!("{s:?} is not an IPv4 or IPv6 address")),
    }
}
