//! `lb run`: set up the datapath, program the services in the config file,
//! follow the file's changes, and tear down on SIGINT/SIGTERM.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use lb_common::{DatapathConfig, SNAT_PORT_MAX, SNAT_PORT_MIN};
use notify::{RecursiveMode, Watcher};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
    time::{timeout, Instant},
};
use tracing::{error, info, warn};

use crate::{
    datapath::{AttachMode, Attached, Datapath, KernelMaps},
    healthcheck::HealthServers,
    manifest,
    model::{self, DesiredState, NodeConfig},
    pins,
    planner::{Programmer, Report},
    system::{self, PinDirLock},
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

/// Quiet time after the last file event before we reload: editors and
/// `kubectl get > file` write in several steps.
const DEBOUNCE_QUIET: Duration = Duration::from_millis(100);
/// Upper bound on the wait, so a file rewritten in a loop is still applied
/// well within a second.
const DEBOUNCE_MAX: Duration = Duration::from_millis(400);

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config: PathBuf,
    pub tc_ifaces: Vec<String>,
    pub xdp_ifaces: Vec<String>,
    pub node: NodeConfig,
    pub pin_dir: PathBuf,
    /// cgroup v2 directory for the socket hooks (host-originated traffic).
    pub cgroup: Option<PathBuf>,
    /// Detach and unpin everything on exit instead of leaving the datapath
    /// running for the next agent.
    pub cleanup_on_exit: bool,
}

/// Reads and builds the desired state from the config file, logging every
/// rejected or skipped object. Errors only when the file as a whole cannot
/// be used (unreadable, YAML syntax).
pub fn load_config(path: &Path, node: &NodeConfig) -> anyhow::Result<DesiredState> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let objects =
        manifest::parse(&text).with_context(|| format!("config file {}", path.display()))?;
    for r in &objects.rejections {
        warn!(object = %r.object, "rejected: {}", r.reason);
    }
    let build = model::build(&objects.services, &objects.slices, node);
    for r in &build.rejections {
        warn!(object = %r.object, "rejected: {}", r.reason);
    }
    for r in &build.skipped {
        info!(object = %r.object, "skipped: {}", r.reason);
    }
    Ok(build.state)
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    system::check_privileges()?;
    // Fail on an unusable file before touching the kernel.
    let initial = load_config(&opts.config, &opts.node)?;
    for iface in opts.tc_ifaces.iter().chain(&opts.xdp_ifaces) {
        if nix::net::if_::if_nametoindex(iface.as_str()).is_err() {
            anyhow::bail!(
                "interface {iface:?} does not exist in this network namespace (see `ip link show`)"
            );
        }
    }
    if opts.node.node_ips.is_empty() {
        warn!("no --node-ip given: NodePort services get no node frontends");
    }
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

    let (mut dp, mut maps, origin) = Datapath::load(&opts.pin_dir)?;
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
    maps.set_config(DatapathConfig {
        snat_addr: opts.node.node_ips.first().map_or([0; 4], |a| a.octets()),
        snat_port_min: SNAT_PORT_MIN,
        snat_port_max: SNAT_PORT_MAX,
        netns_cookie: system::netns_cookie()?,
        ..Default::default()
    })?;
    let programmer = if origin.adopted.is_empty() {
        Programmer::new(maps)
    } else {
        Programmer::adopt(maps).context("reading back the adopted maps")?
    };
    let result = serve(&opts, &mut dp, programmer, initial).await;
    let cleanup = opts.cleanup_on_exit;
    let shutdown = dp.shutdown(cleanup);
    result?;
    shutdown.with_context(|| format!("removing the pins in {}", opts.pin_dir.display()))?;
    if cleanup {
        info!("detached and removed every pin; bye");
    } else {
        info!(pin_dir = %opts.pin_dir.display(), "exiting with the datapath left running for the next agent (`lb cleanup` removes it); bye");
    }
    Ok(())
}

async fn serve(
    opts: &RunOptions,
    dp: &mut Datapath,
    mut programmer: Programmer<KernelMaps>,
    initial: DesiredState,
) -> anyhow::Result<()> {
    let report = programmer.apply(&initial);
    log_report(&programmer, &initial, &report);
    if report.adopted + report.stale_removed > 0 {
        info!(
            kept = report.adopted,
            deleted = report.stale_removed,
            "adopted service ids (established flows keep their backends); deleted the stale ones"
        );
    }
    let mut health = HealthServers::default();
    health.update(&initial.health_checks).await;

    for (iface, mode) in opts
        .tc_ifaces
        .iter()
        .map(|i| (i, AttachMode::Tc))
        .chain(opts.xdp_ifaces.iter().map(|i| (i, AttachMode::Xdp)))
    {
        let how = match dp.attach(iface, mode)? {
            Attached::Replaced => "replaced the program in the pinned link",
            Attached::New => "attached",
        };
        info!(iface = %iface, mode = ?mode, "{how}");
    }
    match &opts.cgroup {
        Some(cg) => {
            let how = match dp.attach_cgroup(cg)? {
                Attached::Replaced => "replaced the socket hooks",
                Attached::New => "attached socket hooks",
            };
            info!(cgroup = %cg.display(), "{how} (node-originated traffic)");
        }
        None => info!("no --cgroup: the node's own connections to services are not balanced"),
    }
    for name in dp.remove_other_links()? {
        info!(link = %name, "detached a previous agent's program that is no longer asked for");
    }

    let (tx, mut rx) = mpsc::unbounded_channel();
    let file_name = opts.config.file_name().map(|n| n.to_os_string());
    // Watch the directory, not the file: a rename over the file replaces
    // the inode a file watch would be bound to.
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if ev
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == file_name)
            {
                let _ = tx.send(());
            }
        }
    })?;
    let dir = opts
        .config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    // Only now: a change made after this line is seen.
    info!(
        pin_dir = %opts.pin_dir.display(),
        services = initial.services.len(),
        "datapath ready"
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut current = initial;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            Some(()) = rx.recv() => {
                let deadline = Instant::now() + DEBOUNCE_MAX;
                while Instant::now() < deadline {
                    match timeout(DEBOUNCE_QUIET, rx.recv()).await {
                        Ok(Some(())) => continue,
                        _ => break,
                    }
                }
                match load_config(&opts.config, &opts.node) {
                    Ok(next) => {
                        let report = programmer.apply(&next);
                        log_report(&programmer, &next, &report);
                        health.update(&next.health_checks).await;
                        info!(
                            added = report.diff.added.len(),
                            changed = report.diff.changed.len(),
                            removed = report.diff.removed.len(),
                            failed = report.failed.len(),
                            "applied config"
                        );
                        current = next;
                    }
                    Err(e) => error!("keeping the last good state ({} service ports): {e:#}", current.services.len()),
                }
            }
        }
    }
    Ok(())
}

/// `lb cleanup`: removes what an agent left pinned in `pin_dir`, which
/// detaches its programs. Refuses while an agent runs there.
pub fn cleanup(pin_dir: &Path) -> anyhow::Result<()> {
    if !pin_dir.exists() {
        info!(pin_dir = %pin_dir.display(), "nothing to clean up");
        return Ok(());
    }
    let lock = PinDirLock::acquire(pin_dir)?;
    let links = pins::pinned_links(pin_dir);
    let maps = pins::pinned_maps(pin_dir);
    pins::remove_all(pin_dir)
        .with_context(|| format!("removing the pins in {}", pin_dir.display()))?;
    drop(lock);
    info!(pin_dir = %pin_dir.display(), links = links.len(), maps = maps.len(), "detached and removed");
    Ok(())
}

/// One line per service port that was written or removed.
fn log_report(programmer: &Programmer<KernelMaps>, state: &DesiredState, report: &Report) {
    for key in report.diff.added.iter().chain(&report.diff.changed) {
        let Some(sp) = state.services.get(key) else {
            continue;
        };
        if report.failed.iter().any(|(k, _)| k == key) {
            continue;
        }
        let frontends: Vec<String> = sp.frontends.iter().map(|f| f.to_string()).collect();
        let usable = sp.usable_endpoints();
        info!(
            service = %key,
            id = programmer.service_id(key).unwrap_or(0),
            frontends = %frontends.join(","),
            backends = sp.endpoints.len(),
            usable = usable.len(),
            affinity = sp.affinity_timeout_s.map(|t| format!("ClientIP/{t}s")).unwrap_or_else(|| "None".into()),
            "programmed"
        );
    }
    for key in &report.diff.removed {
        info!(service = %key, "removed");
    }
    for (key, e) in &report.failed {
        error!(service = %key, "programming failed, will retry on the next change: {e}");
    }
}

/// The value of `--node-ip`: IPv4 only for now.
pub fn parse_node_ip(s: &str) -> Result<Ipv4Addr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address (IPv6 is not supported yet)"))
}
