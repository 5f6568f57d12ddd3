//! What the kernel must offer, checked at start-up before anything is
//! loaded, so that an old kernel gets one sentence naming the missing
//! feature and the kernel that brought it, not a verifier log.
//!
//! Each feature is probed for real where that has no side effect (aya's
//! helper, map and program probes load a tiny program or create a map and
//! throw it away; the socket option is read on a throw-away socket). XDP
//! links are judged by the kernel version: the only real probe would attach
//! XDP to a device.

use aya::{
    maps::MapType,
    programs::{ProgramType, SchedClassifier, TcAttachType},
    sys::{is_helper_supported, is_map_supported, BpfHelper},
    util::KernelVersion,
};
use lb_common::MAGLEV_INNER_FLAGS;

use crate::kernel::datapath::TcMode;

/// The oldest kernel the project tests on (`cargo xtask test-kernels`):
/// Debian 12's 6.1.
pub const MINIMUM_TESTED: &str = "6.1";

/// What the agent was asked to do, which decides what it needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Needs {
    /// `--xdp-iface` was given.
    pub xdp: bool,
    /// `--cgroup` was given: the socket hooks are loaded.
    pub cgroup: bool,
}

/// One kernel feature.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    pub name: &'static str,
    /// The first mainline kernel that has it.
    pub since: &'static str,
    /// Why lb needs it.
    pub for_what: &'static str,
    probe: fn() -> bool,
}

impl Feature {
    /// The sentence a user reads when it is missing.
    pub fn missing(&self) -> String {
        format!(
            "this kernel ({}) lacks {} (Linux {} and later have it), which lb needs for {}; \
             lb is tested on Linux {MINIMUM_TESTED} and later (README: Kernel requirements)",
            kernel_release(),
            self.name,
            self.since,
            self.for_what
        )
    }
}

fn helper(program: ProgramType, helper: BpfHelper) -> bool {
    is_helper_supported(program, helper).unwrap_or(false)
}

fn map(map_type: MapType) -> bool {
    is_map_supported(map_type).unwrap_or(false)
}

const DATAPATH: &str = "the TC and XDP datapath";

/// What every agent needs.
const ALWAYS: &[Feature] = &[
    Feature {
        name: "BPF LRU hash maps",
        since: "4.10",
        for_what: "conntrack and session affinity",
        probe: || map(MapType::LruHash),
    },
    Feature {
        name: "BPF LPM trie maps",
        since: "4.11",
        for_what: "loadBalancerSourceRanges",
        probe: || map(MapType::LpmTrie),
    },
    Feature {
        name: "BPF hash-of-maps",
        since: "4.12",
        for_what: "the Maglev tables",
        probe: || map(MapType::HashOfMaps),
    },
    Feature {
        name: "inner maps of any size, memory-mapped (BPF_F_INNER_MAP, BPF_F_MMAPABLE)",
        since: "5.10",
        for_what: "the Maglev tables (one per service port, sized to its backends)",
        probe: inner_mmapable_array,
    },
    Feature {
        name: "the bpf_redirect_neigh helper",
        since: "5.10",
        for_what: DATAPATH,
        probe: || {
            helper(
                ProgramType::SchedClassifier,
                BpfHelper::BPF_FUNC_redirect_neigh,
            )
        },
    },
    Feature {
        name: "the bpf_xdp_adjust_tail helper",
        since: "4.18",
        for_what: DATAPATH,
        probe: || helper(ProgramType::Xdp, BpfHelper::BPF_FUNC_xdp_adjust_tail),
    },
];

/// With `--xdp-iface`.
const XDP: &[Feature] = &[Feature {
    name: "XDP bpf_links",
    since: "5.9",
    for_what: "--xdp-iface (links that outlive the agent)",
    probe: || KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 9, 0)),
}];

/// With `--cgroup`.
const CGROUP: &[Feature] = &[
    Feature {
        name: "the bpf_set_retval helper in socket hooks",
        since: "5.18",
        for_what: "--cgroup (refusing connections to services without endpoints)",
        probe: || KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 18, 0)),
    },
    Feature {
        name: "the bpf_get_netns_cookie helper in socket hooks",
        since: "5.7",
        for_what: "--cgroup",
        probe: || {
            helper(
                ProgramType::CgroupSockAddr,
                BpfHelper::BPF_FUNC_get_netns_cookie,
            ) || KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 7, 0))
        },
    },
    Feature {
        name: "the SO_NETNS_COOKIE socket option",
        since: "5.14",
        for_what: "--cgroup (telling the node's sockets from pods')",
        probe: || crate::system::netns_cookie().is_ok(),
    },
];

/// The features `needs` call for, in the order they are checked.
pub fn required(needs: Needs) -> Vec<Feature> {
    let mut all = ALWAYS.to_vec();
    if needs.xdp {
        all.extend_from_slice(XDP);
    }
    if needs.cgroup {
        all.extend_from_slice(CGROUP);
    }
    all
}

impl Feature {
    /// Whether this kernel has it.
    pub fn present(&self) -> bool {
        (self.probe)()
    }
}

/// Every feature, with what asks for it ("always", "--xdp-iface",
/// "--cgroup"): what `lb check` reports.
pub fn all() -> Vec<(&'static str, Feature)> {
    let tag =
        |by: &'static str, fs: &[Feature]| fs.iter().map(move |f| (by, *f)).collect::<Vec<_>>();
    let mut all = tag("always", ALWAYS);
    all.extend(tag("--xdp-iface", XDP));
    all.extend(tag("--cgroup", CGROUP));
    all
}

/// The first required feature the kernel lacks, as an error a user can act
/// on.
pub fn check(needs: Needs) -> anyhow::Result<()> {
    for f in required(needs) {
        if !(f.probe)() {
            anyhow::bail!(f.missing());
        }
    }
    Ok(())
}

/// Whether the kernel has TCX (6.6): a query of loopback's TCX ingress
/// programs, which only a kernel with TCX answers (no side effect).
pub fn has_tcx() -> bool {
    SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok()
}

/// `--tc-attach`: how TC programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX where the kernel has it (6.6 and later), else netlink.
    Auto,
    /// TCX links; fails on kernels before 6.6.
    Tcx,
    /// A clsact qdisc and direct-action filters, on any kernel.
    Netlink,
}

/// The TC mode for `choice` on this kernel.
pub fn tc_mode(choice: TcAttach) -> anyhow::Result<TcMode> {
    match choice {
        TcAttach::Auto if has_tcx() => Ok(TcMode::Tcx),
        TcAttach::Auto | TcAttach::Netlink => Ok(TcMode::Netlink),
        TcAttach::Tcx if has_tcx() => Ok(TcMode::Tcx),
        TcAttach::Tcx => anyhow::bail!(
            "--tc-attach tcx: this kernel ({}) has no TCX (Linux 6.6 and later have it); \
             use --tc-attach auto or netlink",
            kernel_release()
        ),
    }
}

fn inner_mmapable_array() -> bool {
    let obj = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        4,
        4,
        1,
        MAGLEV_INNER_FLAGS,
    );
    aya::maps::MapData::create(obj, "lb_probe", None).is_ok()
}

/// `uname -r`.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_feature_names_itself_the_kernel_that_has_it_and_the_flag() {
        let f = CGROUP[0];
        let s = f.missing();
        assert!(s.contains("bpf_set_retval"), "{s}");
        assert!(s.contains("Linux 5.18 and later"), "{s}");
        assert!(s.contains("--cgroup"), "{s}");
        assert!(s.contains(MINIMUM_TESTED), "{s}");
    }

    #[test]
    fn socket_hook_and_xdp_requirements_apply_only_when_asked_for() {
        let names = |n: Needs| required(n).iter().map(|f| f.name).collect::<Vec<_>>();
        let plain = names(Needs::default());
        assert!(!plain
            .iter()
            .any(|n| n.contains("set_retval") || n.contains("XDP bpf_links")));
        assert!(names(Needs {
            cgroup: true,
            xdp: false
        })
        .iter()
        .any(|n| n.contains("set_retval")));
        assert!(names(Needs {
            cgroup: false,
            xdp: true
        })
        .iter()
        .any(|n| n.contains("XDP bpf_links")));
    }
}
