//! The generic core: what to do with a packet, decided once for XDP and TC.
//! It reads the packet and the maps and updates conntrack, affinity and
//! counters; the entry points then apply the returned `Action`.

use aya_ebpf::{
    bindings::BPF_ANY, btf_maps::PerCpuArray, helpers::bpf_ktime_get_ns, macros::btf_map,
};
use lb_common::{
    ct_closed, hash::flow_hash, Addr, FlowKey, FragKey, FragPorts, FrontendKey, ServiceEntry, ADDR_UNSPECIFIED,
    FRONTEND_VIEW_ALL,
    Verdict, CT_FORWARD, CT_REPLY, CT_S_PICKUP, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, SERVICE_F_AFFINITY,
    SERVICE_F_EXTERNAL, SERVICE_F_LOCAL, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    CONFIG_F_EXTERNAL_CLUSTER_IP_DROP, CONFIG_F_EXTERNAL_CLUSTER_IP_MASQ,
};

use crate::{
    conntrack::{self, flow_key, snat_of, AddrPort, NewFlow, Source},
    maps::FRAGS,
    packet::{parse, Frag, IcmpError, Flow, PacketBuf, Parsed},
    policy::{config, frontend_for, in_cluster, needs_snat, reject_allowed, source_allowed},
    select::{backend_of, choose},
    stats::{count, count_index, count_service},
};

#[btf_map(name = "lb_pending")]
static PENDING: PerCpuArray<Pending, 1> = PerCpuArray::new();

pub enum Action {
    Pass,
    Drop,
    /// Rewrite the source and/or destination of a TCP/UDP packet. With
    /// `route`, the packet is sent to its next hop directly: the node's own
    /// routing would drop it as a martian (its source is now a node or
    /// frontend address).
    Nat {
        src: Option<AddrPort>,
        dst: Option<AddrPort>,
        route: bool,
    },
    /// Answer with ICMP (ICMPv6) port unreachable (a stage of its own,
    /// reading the flow from `lb_pending`).
    Reject,
    /// A packet to a frontend no tracked flow covers: `new_flow` decides
    /// (a new flow, or why not).
    NewFlow,
    /// A new flow whose source must be translated: `snat_flow` searches
    /// a free port and records it.
    Snat,
    /// Translate an ICMP error about a translated flow; with `route`, then
    /// send it to its next hop directly (as for `Nat`).
    IcmpNat {
        icmp: &'static IcmpError,
        to: IcmpRewrite,
        route: bool,
    },
}

/// What the FIB lookup needs about a packet the datapath routes itself.
pub struct Route {
    pub v6: bool,
    pub proto: u8,
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
}

impl Route {
    /// A TCP/UDP packet after `Action::Nat` rewrote `src` and/or `dst`.
    #[inline(always)]
    pub fn after_nat(f: &Flow, src: Option<AddrPort>, dst: Option<AddrPort>) -> Route {
        let s = src.unwrap_or(AddrPort::new(f.saddr, f.sport));
        let d = dst.unwrap_or(AddrPort::new(f.daddr, f.dport));
        Route {
            v6: f.v6,
            proto: f.proto,
            saddr: s.addr,
            daddr: d.addr,
            sport: s.port,
            dport: d.port,
        }
    }

    /// An ICMP error after `Action::IcmpNat`.
    #[inline(always)]
    pub fn after_icmp_nat(icmp: &IcmpError, to: &IcmpRewrite) -> Route {
        Route {
            v6: icmp.v6,
            proto: if icmp.v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP },
            saddr: to.saddr,
            daddr: to.daddr,
            sport: 0,
            dport: 0,
        }
    }
}

/// The addresses and ports an ICMP error gets (outer header, and the quoted
/// packet). Fields equal to the packet's are left alone.
#[derive(Clone, Copy)]
pub struct IcmpRewrite {
    pub saddr: Addr,
    pub daddr: Addr,
    pub inner_src: AddrPort,
    pub inner_dst: AddrPort,
}

/// Which way a packet crosses the interface the program sits on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Arriving (XDP, TC ingress): new flows to frontends, backends'
    /// replies, ICMP errors. Translated replies are routed by the datapath.
    Ingress,
    /// Leaving (TC egress): only what the node's own stack sends, or has
    /// already routed, that no ingress hook translated: replies of a
    /// backend in the node's own network namespace (hostNetwork pods, the
    /// API server) and ICMP errors the node generates about translated
    /// flows. Already routed, so never redirected; passes are not counted
    /// (every packet the node sends crosses this hook).
    Egress,
}

/// What the headers and the frontend lookup say a packet is. The packet
/// itself (flow, service, ICMP error) is in `lb_pending` for the stage that
/// handles it: each stage runs in a function of its own (see `tc::run`),
/// because BPF gives a whole call chain 512 bytes of stack and the verifier
/// walks each stage once, from a state read out of a map, instead of once
/// for every way the parse can end.
pub enum Stage {
    /// Untouched (counted).
    Pass,
    /// To a frontend: `forward`, then `new_flow` if no tracked flow covers it.
    Forward,
    /// Maybe a tracked flow's reply: `reply`.
    Reply,
    /// An ICMP error that may quote a tracked flow: `icmp`.
    Icmp,
}

/// Everything a stage needs from `classify`, per CPU. Stages work on
/// references into it, never on copies: with 16-byte addresses a flow and
/// its conntrack entries no longer fit the 512-byte stack twice over.
pub struct Pending {
    flow: Flow,
    svc: ServiceEntry,
    icmp: IcmpError,
    len: u32,
    ingress: bool,
    /// The new flow `new_flow` decided on, for `conntrack::record` and,
    /// when its source is translated, for `snat_flow`.
    new: NewFlow,
    /// For `snat_flow`: the address to translate to, and what to count.
    snat_to: Addr,
    snat_verdict: u32,
    /// The translation a stage decided, for `stashed_nat`.
    nat_src: Option<AddrPort>,
    nat_dst: Option<AddrPort>,
    nat_route: bool,
}

#[inline(always)]
fn pending() -> Option<&'static mut Pending> {
    // SAFETY: this CPU's slot; a program runs to completion on its CPU, and
    // every stage reads what `classify` wrote during the same run.
    PENDING.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Keeps a translation for a stage of its own that applies it
/// (`stashed_nat`). Deciding and applying in one function made frames of
/// up to 464 bytes (the FIB lookup's parameters on top of conntrack's
/// copies), which Linux 6.1 refused with the call under them ("combined
/// stack size ... 544"); and the SNAT port search leaves its loop from
/// each of its 32 tries in another state, after every one of which the
/// verifier walked the translation and the FIB lookup again.
#[inline(always)]
pub fn stash_nat(src: Option<AddrPort>, dst: Option<AddrPort>, route: bool) {
    if let Some(p) = pending() {
        p.nat_src = src;
        p.nat_dst = dst;
        p.nat_route = route;
    }
}

/// What `stash_nat` kept: the flow, its new source and destination.
#[inline(always)]
pub fn stashed_nat() -> Option<(&'static Flow, Option<AddrPort>, Option<AddrPort>, bool)> {
    let p = pending()?;
    let Pending {
        flow,
        nat_src,
        nat_dst,
        nat_route,
        ..
    } = p;
    Some((flow, *nat_src, *nat_dst, *nat_route))
}

/// The packet `classify` parsed, for a stage that needs only it (the
/// refusal).
#[inline(always)]
pub fn pending_flow() -> Option<&'static Flow> {
    pending().map(|p| &p.flow)
}

#[inline(never)]
pub fn classify<C: PacketBuf>(ctx: &C, dir: Direction) -> Stage {
    let len = ctx.wire_len();
    let ingress = dir == Direction::Ingress;
    let Some(p) = pending() else {
        return Stage::Pass;
    };
    p.len = len;
    p.ingress = ingress;
    match parse(ctx, &mut p.flow, &mut p.icmp) {
        Parsed::Flow => {}
        Parsed::IcmpError => return Stage::Icmp,
        _ if !ingress => return Stage::Pass,
        Parsed::NotIp => return pass_stage(Verdict::PassNotIp, len),
        Parsed::OtherProtocol => return pass_stage(Verdict::PassOtherProtocol, len),
        Parsed::Malformed => return pass_stage(Verdict::PassMalformed, len),
    }
    if !fragment_ports(&mut p.flow) {
        return if ingress {
            pass_stage(Verdict::PassFragment, len)
        } else {
            Stage::Pass
        };
    }
    if ingress {
        let fkey = FrontendKey {
            addr: p.flow.daddr,
            port: p.flow.dport,
            proto: p.flow.proto,
            view: FRONTEND_VIEW_ALL,
        };
        if let Some(svc) = frontend_for(fkey, Some(&p.flow.saddr)) {
            p.svc = svc;
            return Stage::Forward;
        }
    }
    Stage::Reply
}

#[inline(always)]
fn pass_stage(v: Verdict, len: u32) -> Stage {
    count(v, len);
    Stage::Pass
}

/// A packet that may be a tracked flow's reply (`Stage::Reply`).
#[inline(always)]
pub fn reply() -> Action {
    let Some(p) = pending() else {
        return Action::Pass;
    };
    let Pending {
        flow, len, ingress, ..
    } = p;
    let (len, ingress) = (*len, *ingress);
    let Some(cfg) = config() else {
        return Action::Pass;
    };
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = flow_key(flow);
    match conntrack::lookup_reply(&key, now, cfg) {
        Some(h) => {
            conntrack::observe(&key, &h, flow.tcp_flags, now);
            count(translated(flow, Verdict::ReplyNat), len);
            count_service(h.e.service_id, len);
            Action::Nat {
                src: Some(AddrPort::new(h.e.nat_addr, h.e.nat_port)),
                dst: snat_of(&h.e),
                route: ingress,
            }
        }
        None if ingress => pass(Verdict::PassNotService, len),
        None => Action::Pass,
    }
}

/// An ICMP error (`Stage::Icmp`).
#[inline(always)]
pub fn icmp() -> Action {
    let Some(p) = pending() else {
        return Action::Pass;
    };
    let Pending {
        icmp, len, ingress, ..
    } = p;
    match icmp_error(icmp, *len, *ingress) {
        Some(a) => a,
        None if *ingress => pass(Verdict::PassNotService, *len),
        None => Action::Pass,
    }
}

/// Fragments: the first one's ports are remembered for the later ones,
/// which carry no L4 header and take the ports from here. False for a
/// later fragment whose first fragment was not seen (it passes untouched).
#[inline(always)]
fn fragment_ports(flow: &mut Flow) -> bool {
    let fkey = FragKey {
        src_addr: flow.saddr,
        dst_addr: flow.daddr,
        id: flow.ip_id,
        proto: flow.proto,
        _pad: [0; 3],
    };
    match flow.frag {
        Frag::Whole => true,
        Frag::First => {
            let ports = FragPorts {
                src_port: flow.sport,
                dst_port: flow.dport,
            };
            let _ = FRAGS.insert(fkey, ports, BPF_ANY as u64);
            true
        }
        Frag::Later => match FRAGS.get_ptr(fkey) {
            Some(p) => {
                // SAFETY: copied out at once.
                let ports = unsafe { *p };
                flow.sport = ports.src_port;
                flow.dport = ports.dst_port;
                true
            }
            None => false,
        },
    }
}

/// The verdict a translated packet counts as: later fragments apart.
#[inline(always)]
fn translated(flow: &Flow, v: Verdict) -> Verdict {
    if flow.frag == Frag::Later {
        Verdict::FragmentNat
    } else {
        v
    }
}

#[inline(always)]
fn pass(v: Verdict, len: u32) -> Action {
    count(v, len);
    Action::Pass
}

#[inline(always)]
fn drop(v: Verdict, len: u32) -> Action {
    count(v, len);
    Action::Drop
}

/// What a TCP packet with no conntrack entry may start.
#[derive(PartialEq, Eq)]
enum Start {
    /// A SYN: a new connection.
    New,
    /// A mid-stream segment (ACK, data): the flow's state was lost (LRU
    /// eviction, maps recreated). Like netfilter's default loose pickup
    /// (and Katran, Cilium), it goes to the Maglev choice, which is the
    /// backend it had unless the backend set changed; tracked as
    /// unanswered until the backend answers.
    Pickup,
    /// FIN, RST or SYN-ACK: nothing to start (netfilter: INVALID, which
    /// kube-proxy drops).
    Invalid,
}

#[inline(always)]
fn start_of(flow: &Flow) -> Start {
    if flow.proto != IPPROTO_TCP {
        return Start::New;
    }
    let f = flow.tcp_flags;
    if f & (TCP_FIN | TCP_RST) != 0 {
        Start::Invalid
    } else if f & TCP_SYN != 0 {
        if f & TCP_ACK != 0 {
            Start::Invalid
        } else {
            Start::New
        }
    } else {
        Start::Pickup
    }
}

/// A packet to a frontend (`Stage::Forward`): a tracked flow's packet goes
/// to its backend; anything else is `Action::NewFlow`, for `new_flow`.
#[inline(always)]
pub fn forward() -> Action {
    let Some(p) = pending() else {
        return Action::Drop;
    };
    let Pending { flow, svc, len, .. } = p;
    let (flow, svc, len): (&'static Flow, _, _) = (flow, svc, *len);
    if !source_allowed(svc, &flow.saddr) {
        return drop(Verdict::DropSourceRange, len);
    }
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = flow_key(flow);
    let start = start_of(flow);
    if let Some(h) = conntrack::lookup_forward(&key, now) {
        if start == Start::New && ct_closed(h.e.state) {
            // The client reuses the tuple of a closed flow: a new flow.
            conntrack::forget(&key, &h);
        } else if h.e.service_id == svc.id {
            // The recorded backend wins while it still exists with the
            // same address, even if the Maglev table no longer lists it.
            if let Some(b) = backend_of(svc.id, h.e.backend_id) {
                if b.addr == h.e.nat_addr && b.port == h.e.nat_port {
                    let snat = snat_of(&h.e);
                    if ct_closed(h.e.state) && !conntrack::owns_reply(&key, &h, now) {
                        // Its reply tuple belongs to a new flow now.
                        return drop(Verdict::DropCtInvalid, len);
                    }
                    conntrack::observe(&key, &h, flow.tcp_flags, now);
                    count(translated(flow, Verdict::DnatEstablished), len);
                    count_service(svc.id, len);
                    return to_backend(flow, AddrPort::new(b.addr, b.port), snat);
                }
            }
        }
    }
    if flow.frag == Frag::Later {
        // Its first fragment made no flow (or the flow is gone).
        return pass(Verdict::PassFragment, len);
    }
    Action::NewFlow
}

/// A packet to a frontend no tracked flow covers (`Action::NewFlow`):
/// a new flow, unless the packet cannot start one.
#[inline(always)]
pub fn new_flow() -> Action {
    let Some(p) = pending() else {
        return Action::Drop;
    };
    let Some(cfg) = config() else {
        return Action::Drop;
    };
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Pending {
        flow,
        svc,
        len,
        new,
        snat_to,
        snat_verdict,
        ..
    } = p;
    let (flow, svc, len): (&'static Flow, &ServiceEntry, u32) = (flow, svc, *len);
    let start = start_of(flow);
    if start == Start::Invalid {
        return drop(Verdict::DropCtInvalid, len);
    }
    // A ClusterIP reached from outside the cluster (routed to this node).
    let node = cfg.snat_addr_for(&flow.saddr);
    let outside = svc.flags & SERVICE_F_EXTERNAL == 0
        && cfg.flags & (CONFIG_F_EXTERNAL_CLUSTER_IP_MASQ | CONFIG_F_EXTERNAL_CLUSTER_IP_DROP) != 0
        && flow.saddr != node
        && !in_cluster(&flow.saddr);
    if outside && cfg.flags & CONFIG_F_EXTERNAL_CLUSTER_IP_DROP != 0 {
        return drop(Verdict::DropSourceRange, len);
    }
    if svc.backend_count == 0 {
        count_service(svc.id, len);
        // Traffic policy Local with no endpoint here: kube-proxy drops it
        // (a load balancer's health check steers clients elsewhere).
        if svc.flags & SERVICE_F_LOCAL != 0 {
            return drop(Verdict::DropNoLocalBackend, len);
        }
        if !reject_allowed(now) {
            return drop(Verdict::DropRejectLimited, len);
        }
        count(Verdict::RejectNoBackend, len);
        return Action::Reject;
    }
    // With sessionAffinity ClientIP the source port is left out of the
    // hash, so every node picks the same backend for a client without
    // sharing state; the affinity map keeps it there when the table changes.
    let sport = if svc.flags & SERVICE_F_AFFINITY != 0 {
        0
    } else {
        flow.sport
    };
    let hash = flow_hash(&flow.saddr, sport, flow.dport, flow.proto);
    let Some(choice) = choose(&flow.saddr, hash, svc, now) else {
        return drop(Verdict::DropNoBackendEntry, len);
    };
    let b = choice.backend;
    let pickup = start == Start::Pickup;
    let verdict = if pickup {
        Verdict::DnatPickup
    } else if choice.from_affinity {
        Verdict::DnatAffinity
    } else {
        Verdict::DnatNew
    };
    *new = NewFlow {
        client: flow_key(flow),
        now,
        service_id: svc.id,
        backend_id: choice.backend_id,
        backend: AddrPort::new(b.addr, b.port),
        state: if pickup { CT_S_PICKUP } else { 0 },
    };
    // The source is translated to the node's address (without one, no
    // --node-ip, there is nothing to masquerade to; the agent warns at
    // start-up), or to another port of the client's own address when its
    // reply tuple is taken (`Source::Conflict`), or kept.
    let masquerade = outside || needs_snat(svc, &flow.saddr, &b);
    *snat_to = if masquerade && node != ADDR_UNSPECIFIED {
        node
    } else {
        match conntrack::record(new, cfg) {
            Source::Kept => {
                count(verdict, len);
                count_service(svc.id, len);
                return to_backend(flow, new.backend, None);
            }
            Source::Conflict => flow.saddr,
            _ => return drop(Verdict::DropSnatExhausted, len),
        }
    };
    *snat_verdict = verdict as u32;
    Action::Snat
}

/// A new flow whose source is translated (`Action::Snat`): a stage of its
/// own, entered from one state whatever way `new_flow` got here, because
/// the port search walks up to `SNAT_PORT_TRIES` ports and the verifier
/// walks every one of them per entering state: inside `new_flow` that was
/// 800,000 instructions on Linux 6.18 and more on 6.1, near the kernel's
/// 1,000,000 limit (`lb check` prints the counts).
#[inline(always)]
pub fn snat_flow() -> Action {
    let Some(p) = pending() else {
        return Action::Drop;
    };
    let Some(cfg) = config() else {
        return Action::Drop;
    };
    let Pending {
        flow,
        len,
        new,
        snat_to,
        snat_verdict,
        ..
    } = p;
    let flow: &'static Flow = flow;
    let mut out = AddrPort::new(ADDR_UNSPECIFIED, 0);
    if conntrack::record_snat(new, *snat_to, cfg, &mut out) != Source::Translated {
        return drop(Verdict::DropSnatExhausted, *len);
    }
    count_index(*snat_verdict, *len);
    count_service(new.service_id, *len);
    to_backend(flow, new.backend, Some(out))
}

/// A packet of `flow` sent to backend `b`, its source translated to `snat`
/// if given (then the datapath routes it: the stack would not).
#[inline(always)]
fn to_backend(flow: &'static Flow, backend: AddrPort, snat: Option<AddrPort>) -> Action {
    Action::Nat {
        src: snat,
        dst: Some(backend),
        // A remapped client port keeps the client's address: the stack
        // routes it as before.
        route: matches!(snat, Some(s) if s.addr != flow.saddr),
    }
}

/// An ICMP error quoting a packet of a translated flow gets the addresses
/// the other end knows, like Linux NAT does for "related" ICMP:
/// - quoting a packet we sent towards a backend (a router on the way, or
///   the backend itself, complains): the quote gets back the frontend as
///   destination and the client as source, the outer destination becomes
///   the client, and an outer source equal to the backend becomes the
///   frontend;
/// - quoting a reply we sent to the client (a router towards the client, or
///   the client, complains, e.g. fragmentation needed): the quote becomes
///   the backend's packet as it left the backend, and the error goes to the
///   backend.
///
/// Path MTU discovery through a smaller-MTU link depends on this.
#[inline(always)]
fn icmp_error(icmp: &'static IcmpError, len: u32, route: bool) -> Option<Action> {
    // The quoted packet reversed: the direction the flow's entry is keyed by.
    let key = FlowKey {
        src_addr: icmp.inner_daddr,
        dst_addr: icmp.inner_saddr,
        src_port: icmp.inner_dport,
        dst_port: icmp.inner_sport,
        proto: icmp.inner_proto,
        _pad: [0; 3],
    };
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // The entry's direction says which way the quote went.
    let e = conntrack::lookup_any(&key, now, config()?)?;
    let quoted_src = AddrPort::new(icmp.inner_saddr, icmp.inner_sport);
    let quoted_dst = AddrPort::new(icmp.inner_daddr, icmp.inner_dport);
    // (what the quote's source becomes, what its destination becomes)
    let (inner_src, inner_dst) = match e.direction {
        // Quote: client-or-node -> backend. Entry: the client (when SNATed)
        // and the frontend to restore.
        CT_REPLY => (
            snat_of(&e).unwrap_or(quoted_src),
            AddrPort::new(e.nat_addr, e.nat_port),
        ),
        // Quote: frontend -> client. Entry: the backend, and the node
        // address and port the backend sees when SNATed.
        CT_FORWARD => (
            AddrPort::new(e.nat_addr, e.nat_port),
            snat_of(&e).unwrap_or(quoted_dst),
        ),
        _ => return None,
    };
    // Outer addresses that are the quoted ones move with them: the sender
    // of an error about its own packet, and the error's recipient.
    let to = IcmpRewrite {
        saddr: if icmp.saddr == icmp.inner_daddr {
            inner_dst.addr
        } else {
            icmp.saddr
        },
        daddr: if icmp.daddr == icmp.inner_saddr {
            inner_src.addr
        } else {
            icmp.daddr
        },
        inner_src,
        inner_dst,
    };
    count(Verdict::IcmpErrorNat, len);
    Some(Action::IcmpNat { icmp, to, route })
}
