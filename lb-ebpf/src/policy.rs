//! Service policies applied to a new flow before and after the backend
//! choice: loadBalancerSourceRanges, and whether the source must be
//! translated (hairpin, external traffic to another node's backend).

use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::{
    Addr, Backend, DatapathConfig, FrontendKey, ServiceEntry, SourceRange, FRONTEND_VIEW_IN_CLUSTER, BACKEND_F_LOCAL, REJECT_BURST,
    REJECT_COST_NS, SERVICE_F_EXTERNAL, SERVICE_F_LOCAL, SERVICE_F_SOURCE_RANGES,
};

use crate::maps::{CLUSTER_CIDRS, CONFIG, FRONTENDS, REJECT_LIMIT, SOURCE_RANGES};

/// Whether `saddr` may use this frontend (always, without source ranges).
#[inline(always)]
pub fn source_allowed(svc: &ServiceEntry, saddr: &Addr) -> bool {
    if svc.flags & SERVICE_F_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        32 + 128,
        SourceRange {
            service_id: svc.id.to_be_bytes(),
            addr: *saddr,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// Whether `saddr` is a client inside the cluster (a pod: a source in
/// `lb_cluster_cidrs`), which reaches an external frontend with traffic
/// policy Local through its in-cluster view (`FRONTEND_VIEW_IN_CLUSTER`).
#[inline(always)]
pub fn in_cluster(saddr: &Addr) -> bool {
    CLUSTER_CIDRS.get(&Key::new(128, *saddr)).is_some()
}

/// The frontend `key` names, as the client reaches it: an external
/// frontend with traffic policy Local has an in-cluster view for pods and
/// the node. `source`: the packet's source address; None for a socket hook
/// (the node's or a pod's own socket: always in the cluster).
#[inline(always)]
pub fn frontend_for(key: FrontendKey, source: Option<&Addr>) -> Option<ServiceEntry> {
    // SAFETY: copied out at once.
    let svc = *unsafe { FRONTENDS.get(key) }?;
    let local_external = SERVICE_F_EXTERNAL | SERVICE_F_LOCAL;
    if svc.flags & local_external != local_external {
        return Some(svc);
    }
    if let Some(saddr) = source {
        if !in_cluster(saddr) {
            return Some(svc);
        }
    }
    let view = FrontendKey {
        view: FRONTEND_VIEW_IN_CLUSTER,
        ..key
    };
    // SAFETY: copied out at once.
    Some(unsafe { FRONTENDS.get(view) }.copied().unwrap_or(svc))
}

/// The node facts the agent wrote; all zero (no SNAT) before it did.
/// (Never `None`: an array of one always has element 0.)
#[inline(always)]
pub fn config() -> Option<&'static DatapathConfig> {
    CONFIG.get(0)
}

/// Whether a new flow from `saddr` to `backend` needs its source
/// translated to the node address:
/// - hairpin: the client is the backend (its reply would never leave it);
/// - an external frontend with traffic policy Cluster and a backend on
///   another node: the backend's reply must come back through this node
///   to be translated (kube-proxy masquerades here too).
#[inline(always)]
pub fn needs_snat(svc: &ServiceEntry, saddr: &Addr, backend: &Backend) -> bool {
    if *saddr == backend.addr {
        return true;
    }
    svc.flags & SERVICE_F_EXTERNAL != 0
        && svc.flags & SERVICE_F_LOCAL == 0
        && backend.flags & BACKEND_F_LOCAL == 0
}

/// Whether a refusal (ICMP port unreachable) may be sent now: a global
/// token bucket, `REJECT_PER_SEC` with bursts of `REJECT_BURST`, like the
/// kernel's own ICMP limit. Over it, the packet is dropped silently.
#[inline(always)]
pub fn reject_allowed(now: u64) -> bool {
    let Some(p) = REJECT_LIMIT.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: copied out, then plain stores; a race between CPUs lets a few
    // extra refusals through, which is harmless.
    let mut rl = unsafe { *p };
    let cap = REJECT_BURST * REJECT_COST_NS;
    let credit = rl.credit_ns.saturating_add(now.saturating_sub(rl.last_ns));
    rl.credit_ns = if credit > cap { cap } else { credit };
    rl.last_ns = now;
    let allowed = rl.credit_ns >= REJECT_COST_NS;
    if allowed {
        rl.credit_ns -= REJECT_COST_NS;
    }
    unsafe { *p = rl };
    allowed
}
