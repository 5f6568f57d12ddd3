//! The kernel side, through aya: loads the embedded eBPF object over the
//! maps pinned under the pin directory (adopting a previous agent's maps
//! when their layout matches), and attaches programs through pinned links
//! that outlive the agent (see `pins`), or, for TC on kernels without TCX
//! (before 6.6), through clsact filters that outlive it too (see `clsact`).

use std::{
    collections::BTreeSet,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::Context;
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp,
        XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{map_names, program_names};

pub use crate::kernel::kernel_maps::KernelMaps;
use crate::{
    kernel::clsact::{self, Direction},
    kernel::conntrack::CtSizes,
    kernel::interfaces::{Ingress, XdpAttach},
    kernel::pins::{self, Incompatible},
};

/// The datapath object, built by `cargo xtask build-ebpf` and embedded by
/// build.rs (empty when it was missing at build time).
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this lb binary was built without the eBPF datapath; run `cargo xtask build-ebpf` \
         and then `cargo build --release --bin lb`"
    )]
    NoObject,
    #[error("the kernel refused program {program}: {io_error}\nlast lines of the verifier log:\n{log_tail}")]
    Verifier {
        program: &'static str,
        io_error: std::io::Error,
        log_tail: String,
    },
    #[error("attaching {program} to {iface}: {source}")]
    Attach {
        program: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("pin directory: {0:#}")]
    Pins(anyhow::Error),
    #[error("attaching {program} to {iface} as a clsact filter: {source}")]
    Filter {
        program: &'static str,
        iface: String,
        #[source]
        source: std::io::Error,
    },
}

/// One program attachment on an interface, pinned as
/// `<pin-dir>/links/<prefix><interface>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress (TCX): right for any interface, veth included.
    TcIngress,
    /// TC egress: replies the node's own stack sends (see lb-ebpf).
    TcEgress,
    /// XDP in the mode `--xdp-iface` gives: for NICs that hand over
    /// complete checksums.
    Xdp(XdpAttach),
}

impl Hook {
    const ALL: [Hook; 5] = [
        Hook::TcEgress,
        Hook::TcIngress,
        Hook::Xdp(XdpAttach::Auto),
        Hook::Xdp(XdpAttach::Native),
        Hook::Xdp(XdpAttach::Generic),
    ];

    /// The hooks an interface gets.
    pub fn for_ingress(ingress: Ingress) -> [Hook; 2] {
        match ingress {
            Ingress::Tc => [Hook::TcIngress, Hook::TcEgress],
            Ingress::Xdp(mode) => [Hook::Xdp(mode), Hook::TcEgress],
        }
    }

    /// Pin name prefixes. (`tc_` is what agents before TC egress pinned
    /// their ingress links as, so those are adopted in place.)
    fn prefix(self) -> &'static str {
        match self {
            Hook::TcIngress => "tc_",
            Hook::TcEgress => "tcegress_",
            Hook::Xdp(XdpAttach::Auto) => "xdp_",
            Hook::Xdp(XdpAttach::Native) => "xdpdrv_",
            Hook::Xdp(XdpAttach::Generic) => "xdpgeneric_",
        }
    }

    pub fn pin_name(self, iface: &str) -> String {
        format!("{}{iface}", self.prefix())
    }

    /// The hook and interface a link pin name stands for (None for the
    /// cgroup hooks' pins).
    pub fn parse_pin(name: &str) -> Option<(Hook, &str)> {
        Hook::ALL
            .into_iter()
            .find_map(|h| Some((h, name.strip_prefix(h.prefix())?)))
    }

    /// How `/metrics` and `lb status` name it.
    pub fn label(self) -> &'static str {
        match self {
            Hook::TcIngress => "tc_ingress",
            Hook::TcEgress => "tc_egress",
            Hook::Xdp(XdpAttach::Auto) => "xdp",
            Hook::Xdp(XdpAttach::Native) => "xdp_native",
            Hook::Xdp(XdpAttach::Generic) => "xdp_generic",
        }
    }

    /// Where a TC hook attaches (XDP has no direction: ingress).
    fn tc_direction(self) -> TcAttachType {
        if self == Hook::TcEgress {
            TcAttachType::Egress
        } else {
            TcAttachType::Ingress
        }
    }

    /// The clsact hook of a TC hook (None for XDP).
    fn clsact_direction(self) -> Option<Direction> {
        match self {
            Hook::TcIngress => Some(Direction::Ingress),
            Hook::TcEgress => Some(Direction::Egress),
            Hook::Xdp(_) => None,
        }
    }

    /// The TC hook on a clsact hook.
    pub fn of_direction(dir: Direction) -> Hook {
        match dir {
            Direction::Ingress => Hook::TcIngress,
            Direction::Egress => Hook::TcEgress,
        }
    }

    fn program(self) -> &'static str {
        match self {
            Hook::TcIngress => program_names::TC,
            Hook::TcEgress => program_names::TC_EGRESS,
            Hook::Xdp(_) => program_names::XDP,
        }
    }
}

/// Where the maps came from.
#[derive(Debug, Default)]
pub struct MapOrigin {
    /// Maps a previous agent left pinned, now in use again (their contents
    /// are to be adopted).
    pub adopted: Vec<&'static str>,
    /// Pinned maps whose layout did not fit: every map was recreated.
    pub recreated: Vec<Incompatible>,
}

/// How an attachment came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A previous agent's pinned link now runs our program (swapped in one
    /// step: the interface never went without a program).
    Replaced,
    /// A new link, now pinned.
    New,
}

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    /// TCX bpf_links (kernel 6.6 and later), pinned like XDP's.
    Tcx,
    /// A clsact qdisc and direct-action filters (any kernel; see `clsact`).
    Netlink,
}

impl TcMode {
    pub fn label(self) -> &'static str {
        match self {
            TcMode::Tcx => "tcx",
            TcMode::Netlink => "netlink",
        }
    }
}

/// Something this agent attached that did not exist before it: what a
/// failed start takes away again.
#[derive(Debug)]
enum Made {
    /// A pinned link (TCX, XDP, cgroup), by pin name.
    Link(String),
    /// A clsact filter, and whether its qdisc was added with it.
    Filter {
        ifindex: u32,
        dir: Direction,
        handle: u32,
    },
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    tc_mode: TcMode,
    /// Links this agent attached or took over, by pin name.
    links: BTreeSet<String>,
    /// Interfaces (by index) whose clsact filters this agent made or took
    /// over.
    filtered: BTreeSet<u32>,
    /// Until the start is complete (`started`): what this agent made.
    made: Option<Vec<Made>>,
    /// The socket hooks are loaded (`attach_cgroup`).
    sock_loaded: bool,
    /// What each program loaded so far cost the verifier.
    costs: Vec<LoadCost>,
}

/// What loading one program cost: the kernel's count of instructions the
/// verifier walked (every path, so far more than the program has; the
/// kernel refuses a program past 1,000,000) and the wall time of the load.
/// Older kernels prune fewer paths: the same object costs more on 6.1.
#[derive(Clone, Debug)]
pub struct LoadCost {
    pub program: &'static str,
    /// From bpf_prog_info (Linux 5.16 and later).
    pub verified_insns: Option<u32>,
    pub took: std::time::Duration,
}

impl Datapath {
    /// Loads the programs over the maps pinned under `pin_dir`: a previous
    /// agent's maps are reused when their layout matches, else all maps
    /// are recreated.
    /// The conntrack tables get `sizes` (pinned ones of another size are
    /// incompatible: every map is recreated).
    pub fn load(
        pin_dir: &Path,
        sizes: &CtSizes,
    ) -> Result<(Datapath, KernelMaps, MapOrigin), DatapathError> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let recreated =
            pins::incompatible_maps(OBJECT, pin_dir, sizes).map_err(DatapathError::Pins)?;
        if !recreated.is_empty() {
            // All of them: ids in one map point into the others, so a mix
            // of old and new maps could send a packet to the wrong backend.
            // The old programs keep serving from the old maps (they hold
            // them) until our programs replace them in the links.
            pins::remove_maps(pin_dir).map_err(|e| DatapathError::Pins(e.into()))?;
        }
        let adopted = pins::pinned_maps(pin_dir);
        let (dp, maps) = Self::load_object(OBJECT, pin_dir, sizes)?;
        Ok((dp, maps, MapOrigin { adopted, recreated }))
    }

    /// Loads `object` (tests use a damaged one to see the verifier's
    /// refusal reported) over whatever is pinned under `pin_dir`.
    pub fn load_object(
        object: &[u8],
        pin_dir: &Path,
        sizes: &CtSizes,
    ) -> Result<(Datapath, KernelMaps), DatapathError> {
        if object.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|n| (*n, pin_dir.join(n)))
            .collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
            if let Some(n) = sizes.of(name) {
                loader.map_max_entries(name, n);
            }
        }
        let mut ebpf = loader.load(object).map_err(DatapathError::Load)?;
        // The socket hooks are loaded by `attach_cgroup`, only with
        // --cgroup: their kernel requirements apply only then.
        let mut costs = Vec::new();
        for name in [
            program_names::TC,
            program_names::TC_EGRESS,
            program_names::XDP,
        ] {
            costs.push(load_program(&mut ebpf, name)?);
        }
        let maps = KernelMaps::take(&mut ebpf, pin_dir).map_err(DatapathError::Load)?;
        Ok((
            Datapath {
                ebpf,
                pin_dir: pin_dir.to_path_buf(),
                tc_mode: TcMode::Tcx,
                links: BTreeSet::new(),
                filtered: BTreeSet::new(),
                made: Some(Vec::new()),
                sock_loaded: false,
                costs,
            },
            maps,
        ))
    }

    /// Loads the socket hooks (once): only `--cgroup` needs them, so only
    /// then do their kernel requirements apply.
    pub fn load_socket_hooks(&mut self) -> Result<(), DatapathError> {
        if !self.sock_loaded {
            for prog in program_names::SOCK_ALL {
                let cost = load_program(&mut self.ebpf, prog)?;
                self.costs.push(cost);
            }
            self.sock_loaded = true;
        }
        Ok(())
    }

    /// What each program loaded so far cost the verifier, in load order.
    pub fn costs(&self) -> &[LoadCost] {
        &self.costs
    }

    /// TC programs go into TCX links (the default) or clsact filters.
    pub fn set_tc_mode(&mut self, mode: TcMode) {
        self.tc_mode = mode;
    }

    pub fn tc_mode(&self) -> TcMode {
        self.tc_mode
    }

    /// Attaches the hooks for `ingress` to `iface`: through a pinned link
    /// (a previous agent's gets our program swapped in, else a new link is
    /// made), or for TC without TCX through a clsact filter (a previous
    /// agent's is replaced in place, else one is added, with the qdisc if
    /// there is none). `Replaced` if anything was taken over.
    ///
    /// All or nothing for what is new: links are pinned only once every
    /// hook is attached. If one fails (say a CNI renamed or deleted the
    /// interface half-way), the new links are closed unpinned, which
    /// detaches them at once, and new filters are removed, so a later
    /// attempt under the new name finds the device free. (An unpinned link
    /// is freed from a kernel work queue, later.)
    pub fn attach_iface(
        &mut self,
        iface: &str,
        ingress: Ingress,
    ) -> Result<Attached, DatapathError> {
        let mut outcome = Attached::New;
        let mut links = Vec::new();
        let mut filters = Vec::new();
        let attached = self.attach_hooks(iface, ingress, &mut outcome, &mut links, &mut filters);
        if let Err(e) = attached {
            drop(links);
            remove_filters(&filters);
            return Err(e);
        }
        for (name, link) in links {
            self.pin_link(link, &name)?;
        }
        if let Some(made) = &mut self.made {
            made.extend(filters);
        }
        Ok(outcome)
    }

    fn attach_hooks(
        &mut self,
        iface: &str,
        ingress: Ingress,
        outcome: &mut Attached,
        links: &mut Vec<(String, FdLink)>,
        filters: &mut Vec<Made>,
    ) -> Result<(), DatapathError> {
        for hook in Hook::for_ingress(ingress) {
            if let (TcMode::Netlink, Some(dir)) = (self.tc_mode, hook.clsact_direction()) {
                if let Some(made) = self.set_filter(iface, hook, dir)? {
                    filters.push(made);
                } else {
                    *outcome = Attached::Replaced;
                }
            } else if self.reuse_pinned(iface, hook)? {
                *outcome = Attached::Replaced;
            } else {
                links.push((hook.pin_name(iface), self.new_link(iface, hook)?));
            }
        }
        Ok(())
    }

    /// Our program for `hook` in our clsact filter on `iface`: the filter
    /// a previous agent left is replaced in place (None), else a new one
    /// is made (and returned), adding the clsact qdisc if there is none.
    fn set_filter(
        &mut self,
        iface: &str,
        hook: Hook,
        dir: Direction,
    ) -> Result<Option<Made>, DatapathError> {
        let program = hook.program();
        let error = |source: std::io::Error| DatapathError::Filter {
            program,
            iface: iface.to_string(),
            source,
        };
        let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|e| error(e.into()))?;
        // Our filters on both hooks of the interface, by hook.
        let mut ours: Vec<(Direction, clsact::Filter)> = Vec::new();
        for d in Direction::BOTH {
            for f in clsact::filters(ifindex, d).map_err(error)? {
                if f.is_ours(&TC_PROGRAMS) {
                    ours.push((d, f));
                }
            }
        }
        let existing = ours.iter().find(|(d, _)| *d == dir).map(|(_, f)| f.handle);
        let fd = self
            .tc_mut(hook)
            .fd()
            .map_err(|e| error(std::io::Error::other(e)))?;
        let fd = fd
            .try_clone()
            .map_err(|e| error(std::io::Error::other(e)))?;
        if let Some(handle) = existing {
            clsact::set_filter(ifindex, dir, handle, fd.as_fd(), program, true).map_err(error)?;
            self.filtered.insert(ifindex);
            return Ok(None);
        }
        // The qdisc is ours if a filter of ours on the other hook says so,
        // or if we add it now.
        let qdisc_ours = ours.iter().any(|(_, f)| f.qdisc_ours())
            || (!clsact::has_clsact(ifindex).map_err(error)?
                && clsact::add_clsact(ifindex).map_err(error)?);
        let handle = clsact::our_handle(qdisc_ours);
        if let Err(e) = clsact::set_filter(ifindex, dir, handle, fd.as_fd(), program, false) {
            if qdisc_ours && ours.is_empty() {
                let _ = clsact::del_clsact(ifindex);
            }
            return Err(error(e));
        }
        self.filtered.insert(ifindex);
        Ok(Some(Made::Filter {
            ifindex,
            dir,
            handle,
        }))
    }

    /// Removes the links of `iface` (any hook): their programs detach, or,
    /// for an interface that is gone, the kernel's defunct links are freed.
    /// Its clsact filters too, if it is still there.
    pub fn detach_iface(&mut self, iface: &str) -> std::io::Result<()> {
        for hook in Hook::ALL {
            let name = hook.pin_name(iface);
            pins::remove_link(&self.pin_dir, &name)?;
            self.links.remove(&name);
        }
        if let Ok(ifindex) = nix::net::if_::if_nametoindex(iface) {
            self.filtered.remove(&ifindex);
            remove_our_filters(ifindex)?;
        }
        Ok(())
    }

    /// `from` was renamed `to`: the same links (still attached to it),
    /// pinned under the new name. If a pin cannot be moved, the interface
    /// is attached afresh under its new name.
    pub fn rename_iface(
        &mut self,
        from: &str,
        to: &str,
        ingress: Ingress,
    ) -> Result<Attached, DatapathError> {
        let dir = pins::links_dir(&self.pin_dir);
        let mut moved = true;
        for hook in Hook::for_ingress(ingress) {
            if self.tc_mode == TcMode::Netlink && hook.clsact_direction().is_some() {
                // A filter belongs to the interface, whatever its name.
                continue;
            }
            let (old, new) = (hook.pin_name(from), hook.pin_name(to));
            match std::fs::rename(dir.join(&old), dir.join(&new)) {
                Ok(()) => {
                    self.links.remove(&old);
                    self.links.insert(new);
                }
                Err(e) => {
                    tracing::info!(
                        from,
                        to,
                        "could not move the pin {old} ({e}); attaching anew"
                    );
                    moved = false;
                }
            }
        }
        if moved {
            return Ok(Attached::Replaced);
        }
        self.detach_iface(from)
            .map_err(|e| DatapathError::Pins(e.into()))?;
        self.attach_iface(to, ingress)
    }

    /// Swaps our program into a previous agent's pinned link for `hook` on
    /// `iface`, if there is one that still works: true when done.
    fn reuse_pinned(&mut self, iface: &str, hook: Hook) -> Result<bool, DatapathError> {
        let name = hook.pin_name(iface);
        let path = pins::links_dir(&self.pin_dir).join(&name);
        let Some(old) = self.pinned_link(&path)? else {
            return Ok(false);
        };
        // Swapped in place, then taken back as a plain fd and closed: the
        // pin alone holds the link, so removing the pin detaches it.
        let replaced: anyhow::Result<()> = match hook {
            Hook::TcIngress | Hook::TcEgress => {
                aya::programs::tc::SchedClassifierLink::try_from(old)
                    .map_err(anyhow::Error::from)
                    .and_then(|l| {
                        let p = self.tc_mut(hook);
                        let id = p.attach_to_link(l)?;
                        drop(FdLink::try_from(p.take_link(id)?)?);
                        // The pin is named after the interface it was made for;
                        // one renamed while no agent ran keeps its link under the
                        // old name, and another interface may carry that name now.
                        let ours = p.info()?.id();
                        let (_, on_iface) = SchedClassifier::query_tcx(iface, hook.tc_direction())?;
                        anyhow::ensure!(
                            on_iface.iter().any(|prog| prog.id() == ours),
                            "it belongs to another interface (renamed while no agent ran)"
                        );
                        Ok(())
                    })
            }
            Hook::Xdp(_) => aya::programs::xdp::XdpLink::try_from(old)
                .map_err(anyhow::Error::from)
                .and_then(|l| {
                    let p = self.xdp_mut();
                    let id = p.attach_to_link(l)?;
                    drop(FdLink::try_from(p.take_link(id)?)?);
                    Ok(())
                }),
        };
        match replaced {
            Ok(()) => {
                self.links.insert(name);
                Ok(true)
            }
            // A link whose interface went away (ENOLINK), or that is not
            // ours to update: start afresh.
            Err(e) => {
                tracing::info!(link = %name, "not reusing the pinned link ({e:#}); attaching anew");
                pins::remove_link(&self.pin_dir, &name)
                    .map_err(|e| DatapathError::Pins(e.into()))?;
                Ok(false)
            }
        }
    }

    /// A new link for `hook` on `iface`, not pinned yet.
    fn new_link(&mut self, iface: &str, hook: Hook) -> Result<FdLink, DatapathError> {
        let program = hook.program();
        let attach_error = |source| DatapathError::Attach {
            program,
            iface: iface.to_string(),
            source,
        };
        match hook {
            Hook::TcIngress | Hook::TcEgress => {
                let p = self.tc_mut(hook);
                let id = p.attach(iface, hook.tc_direction()).map_err(attach_error)?;
                let link = p.take_link(id).map_err(attach_error)?;
                FdLink::try_from(link).map_err(|e| DatapathError::Pins(e.into()))
            }
            Hook::Xdp(mode) => {
                // The link of another mode a previous agent left must go
                // first: a device runs XDP in one mode at a time.
                for other in Hook::ALL {
                    if matches!(other, Hook::Xdp(m) if m != mode) {
                        let name = other.pin_name(iface);
                        if pins::links_dir(&self.pin_dir).join(&name).exists() {
                            tracing::info!(iface, mode = mode.label(), "changing the XDP mode: detaching the previous agent's {} link first", other.label());
                            pins::remove_link(&self.pin_dir, &name)
                                .map_err(|e| DatapathError::Pins(e.into()))?;
                        }
                    }
                }
                let p = self.xdp_mut();
                let flags = match mode {
                    XdpAttach::Auto => XdpMode::Default,
                    XdpAttach::Native => XdpMode::Driver,
                    XdpAttach::Generic => XdpMode::Skb,
                };
                let id = p.attach(iface, flags).map_err(attach_error)?;
                let link = p.take_link(id).map_err(attach_error)?;
                FdLink::try_from(link).map_err(|e| DatapathError::Pins(e.into()))
            }
        }
    }

    /// Attaches the socket hooks (connect4, sendmsg4, recvmsg4,
    /// getpeername4) to the cgroup v2 directory `cgroup`: the node's own
    /// sockets in it (and below it) reach frontends too.
    ///
    /// A previous agent's hooks on the same cgroup are replaced by
    /// attaching ours first and then dropping theirs: for the moment both
    /// run, a socket already translated by one is left alone by the other
    /// (its destination is a backend, no longer a frontend). aya updates
    /// links in place only for XDP and TC.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> anyhow::Result<Attached> {
        let dir = std::fs::File::open(cgroup).with_context(|| {
            format!(
                "opening cgroup {}: give the cgroup v2 directory whose processes' \
                 connections to services should be balanced (usually /sys/fs/cgroup)",
                cgroup.display()
            )
        })?;
        let cgroup_id = std::os::unix::fs::MetadataExt::ino(&dir.metadata()?);
        self.load_socket_hooks()?;
        let mut outcome = Attached::New;
        for prog in program_names::SOCK_ALL {
            let name = format!("{prog}_cg{cgroup_id}");
            let p: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(prog)
                .and_then(|p| p.try_into().ok())
                .expect("socket hook is loaded");
            // A link (bpf_link_create) always coexists with other programs on the
            // cgroup; the kernel refuses the ALLOW_MULTI flag there, so "Single".
            let id = p
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {prog} to cgroup {}", cgroup.display()))?;
            let link = FdLink::try_from(p.take_link(id)?)?;
            if pins::links_dir(&self.pin_dir).join(&name).exists() {
                pins::remove_link(&self.pin_dir, &name)?;
                outcome = Attached::Replaced;
            }
            self.pin_link(link, &name)?;
        }
        Ok(outcome)
    }

    /// Removes pinned links and clsact filters of ours this agent did not
    /// attach or take over (an interface or cgroup no longer asked for, or
    /// the other TC mode's): their programs detach.
    pub fn remove_other_links(&self) -> std::io::Result<Vec<String>> {
        let mut stale: Vec<String> = pins::pinned_links(&self.pin_dir)
            .into_iter()
            .filter(|n| !self.links.contains(n))
            .collect();
        for name in &stale {
            pins::remove_link(&self.pin_dir, name)?;
        }
        for (ifindex, iface, _) in our_filters_everywhere()? {
            if !self.filtered.contains(&ifindex) && remove_our_filters(ifindex)? {
                stale.push(format!("clsact filters on {iface}"));
            }
        }
        stale.dedup();
        Ok(stale)
    }

    /// The start is complete: from now on what is attached stays attached
    /// when the agent exits, for the next one.
    pub fn started(&mut self) {
        self.made = None;
    }

    fn pinned_link(&self, path: &Path) -> Result<Option<FdLink>, DatapathError> {
        if !path.exists() {
            return Ok(None);
        }
        match PinnedLink::from_pin(path) {
            Ok(link) => Ok(Some(link.into())),
            Err(e) => {
                tracing::info!(link = %path.display(), "cannot open the pinned link ({e}); attaching anew");
                std::fs::remove_file(path).map_err(|e| DatapathError::Pins(e.into()))?;
                Ok(None)
            }
        }
    }

    fn pin_link(&mut self, link: FdLink, name: &str) -> Result<(), DatapathError> {
        let dir = pins::links_dir(&self.pin_dir);
        std::fs::create_dir_all(&dir).map_err(|e| DatapathError::Pins(e.into()))?;
        link.pin(dir.join(name))
            .map_err(|e| DatapathError::Pins(anyhow::anyhow!("pinning link {name}: {e}")))?;
        self.links.insert(name.to_string());
        if let Some(made) = &mut self.made {
            made.push(Made::Link(name.to_string()));
        }
        Ok(())
    }

    fn tc_mut(&mut self, hook: Hook) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(hook.program())
            .and_then(|p| p.try_into().ok())
            .expect("TC program is loaded")
    }

    fn xdp_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(program_names::XDP)
            .and_then(|p| p.try_into().ok())
            .expect("XDP program is loaded")
    }

    /// For BPF_PROG_TEST_RUN: the loaded programs.
    pub fn tc_program(&self) -> &SchedClassifier {
        self.ebpf
            .program(program_names::TC)
            .and_then(|p| p.try_into().ok())
            .expect("loaded")
    }

    pub fn tc_egress_program(&self) -> &SchedClassifier {
        self.ebpf
            .program(program_names::TC_EGRESS)
            .and_then(|p| p.try_into().ok())
            .expect("loaded")
    }

    pub fn xdp_program(&self) -> &Xdp {
        self.ebpf
            .program(program_names::XDP)
            .and_then(|p| p.try_into().ok())
            .expect("loaded")
    }

    /// Exits leaving the datapath running: links and maps stay pinned for
    /// the next agent (`cleanup: false`), or removes everything this agent
    /// pinned, which detaches the programs (`cleanup: true`).
    ///
    /// Before the start was complete (`started`), what this agent attached
    /// anew is removed either way: a failed start leaves no program of its
    /// own attached (what it took over from a previous agent stays, now
    /// running our programs on the same maps).
    pub fn shutdown(self, cleanup: bool) -> std::io::Result<()> {
        let Datapath {
            ebpf,
            pin_dir,
            made,
            ..
        } = self;
        for made in made.iter().flatten() {
            match made {
                Made::Link(name) => pins::remove_link(&pin_dir, name)?,
                Made::Filter { .. } => remove_filters(std::slice::from_ref(made)),
            }
        }
        drop(ebpf);
        if cleanup {
            remove_all(&pin_dir)?;
        }
        Ok(())
    }
}

/// Our TC programs' names, as clsact filters carry them.
const TC_PROGRAMS: [&str; 2] = [program_names::TC, program_names::TC_EGRESS];

/// Everything an agent leaves under `pin_dir` and every clsact filter of
/// ours in this network namespace (with the qdiscs it added): after this
/// no program of ours is attached.
pub fn remove_all(pin_dir: &Path) -> std::io::Result<()> {
    pins::remove_all(pin_dir)?;
    for (ifindex, _, _) in our_filters_everywhere()? {
        remove_our_filters(ifindex)?;
    }
    Ok(())
}

/// Our clsact filters on every interface of this network namespace:
/// (index, name, filter).
pub fn our_filters_everywhere() -> std::io::Result<Vec<(u32, String, Hook)>> {
    let mut out = Vec::new();
    for iface in nix::net::if_::if_nameindex()?.iter() {
        let name = iface.name().to_string_lossy().into_owned();
        for dir in Direction::BOTH {
            for f in clsact::filters(iface.index(), dir)? {
                if f.is_ours(&TC_PROGRAMS) {
                    out.push((iface.index(), name.clone(), Hook::of_direction(dir)));
                }
            }
        }
    }
    Ok(out)
}

/// Removes our clsact filters from `ifindex`, and the qdisc if we added it
/// and nothing else is on it: true if there were any.
fn remove_our_filters(ifindex: u32) -> std::io::Result<bool> {
    let mut qdisc_ours = false;
    let mut found = false;
    for dir in Direction::BOTH {
        for f in clsact::filters(ifindex, dir)? {
            if f.is_ours(&TC_PROGRAMS) {
                found = true;
                qdisc_ours |= f.qdisc_ours();
                ignore_gone(clsact::del_filter(ifindex, dir, f.handle))?;
            }
        }
    }
    if qdisc_ours {
        remove_qdisc_if_empty(ifindex)?;
    }
    Ok(found)
}

/// Takes back filters made by a start that failed (best effort: the
/// interface may be gone, which took them away already).
fn remove_filters(made: &[Made]) {
    for m in made {
        if let Made::Filter {
            ifindex,
            dir,
            handle,
        } = m
        {
            let _ = clsact::del_filter(*ifindex, *dir, *handle);
            if *handle as u16 & clsact::QDISC_OURS != 0 {
                let _ = remove_qdisc_if_empty(*ifindex);
            }
        }
    }
}

/// Removes the clsact qdisc of `ifindex` if no filter is left on it (one
/// another tool added after us keeps it).
fn remove_qdisc_if_empty(ifindex: u32) -> std::io::Result<()> {
    let left = Direction::BOTH
        .into_iter()
        .map(|d| clsact::filters(ifindex, d).map(|f| f.len()))
        .sum::<std::io::Result<usize>>()?;
    if left == 0 {
        ignore_gone(clsact::del_clsact(ifindex))?;
    }
    Ok(())
}

/// The interface or the object went away meanwhile: nothing left to do.
fn ignore_gone(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENODEV | libc::ENOENT | libc::EINVAL)
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// Loads one program of the object, with the verifier's last lines if the
/// kernel refuses it.
///
/// The verifier gives up with EAGAIN when a signal arrives while it works
/// (it checks `signal_pending` between instructions; ours take ~1 s here,
/// 20 s under emulation): tried again, as libbpf does, up to 5 times.
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<LoadCost, DatapathError> {
    const ATTEMPTS: usize = 5;
    let mut attempt = 1;
    let started = std::time::Instant::now();
    let loaded = loop {
        let program = ebpf
            .program_mut(name)
            .expect("the object defines this program");
        let loaded = match program {
            aya::programs::Program::SchedClassifier(p) => p.load(),
            aya::programs::Program::Xdp(p) => p.load(),
            aya::programs::Program::CgroupSockAddr(p) => p.load(),
            _ => unreachable!("lb programs are TC, XDP and cgroup sock_addr"),
        };
        match loaded {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                tracing::debug!(
                    program = name,
                    attempt,
                    "the verifier was interrupted; loading again"
                );
                attempt += 1;
            }
            other => break other,
        }
    };
    loaded.map_err(|e| match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => DatapathError::Verifier {
            program: name,
            io_error,
            log_tail: tail(&verifier_log.to_string(), 20),
        },
        other => DatapathError::Load(aya::EbpfError::ProgramError(other)),
    })?;
    let took = started.elapsed();
    let program = ebpf.program(name).expect("the object defines this program");
    let verified_insns = program
        .info()
        .ok()
        .and_then(|i| i.verified_instruction_count());
    tracing::debug!(program = name, ?verified_insns, ?took, "program loaded");
    Ok(LoadCost {
        program: name,
        verified_insns,
        took,
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
