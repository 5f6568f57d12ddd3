//! The generic core: what to do with a packet, decided once for XDP and TC.
//! It reads the packet and the maps and updates conntrack, affinity and
//! counters; the entry points then apply the returned `Action`.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    hash::flow_hash, Backend, FlowKey, FrontendKey, ServiceEntry, Verdict, CT_FORWARD, CT_REPLY,
    IPPROTO_ICMP, SERVICE_F_AFFINITY, SERVICE_F_LOCAL,
};

use crate::{
    conntrack::{self, flow_key, snat_of, AddrPort},
    maps::FRONTENDS,
    packet::{parse, IcmpError, Ipv4Flow, PacketBuf, Parsed},
    policy::{config, needs_snat, source_allowed},
    select::{backend_of, choose},
    stats::{count, count_service},
};

pub enum Action {
    Pass,
    Drop,
    /// Rewrite the source and/or destination of a TCP/UDP packet. With
    /// `route`, the packet is sent to its next hop directly: the node's own
    /// routing would drop it as a martian (its source is now a node or
    /// frontend address).
    Nat {
        flow: Ipv4Flow,
        src: Option<AddrPort>,
        dst: Option<AddrPort>,
        route: bool,
    },
    /// Answer with ICMP port unreachable.
    Reject {
        flow: Ipv4Flow,
    },
    /// Translate an ICMP error about a translated flow; with `route`, then
    /// send it to its next hop directly (as for `Nat`).
    IcmpNat {
        icmp: IcmpError,
        to: IcmpRewrite,
        route: bool,
    },
}

/// What the FIB lookup needs about a packet the datapath routes itself.
pub struct Route {
    pub proto: u8,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
}

impl Route {
    /// A TCP/UDP packet after `Action::Nat` rewrote `src` and/or `dst`.
    #[inline(always)]
    pub fn after_nat(f: &Ipv4Flow, src: Option<AddrPort>, dst: Option<AddrPort>) -> Route {
        let s = src.unwrap_or(AddrPort {
            addr: f.saddr,
            port: f.sport,
        });
        let d = dst.unwrap_or(AddrPort {
            addr: f.daddr,
            port: f.dport,
        });
        Route {
            proto: f.proto,
            saddr: s.addr,
            daddr: d.addr,
            sport: s.port,
            dport: d.port,
        }
    }

    /// An ICMP error after `Action::IcmpNat`.
    #[inline(always)]
    pub fn after_icmp_nat(to: &IcmpRewrite) -> Route {
        Route {
            proto: IPPROTO_ICMP,
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
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
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

#[inline(always)]
pub fn decide<C: PacketBuf>(ctx: &C, dir: Direction) -> Action {
    let len = ctx.wire_len();
    let ingress = dir == Direction::Ingress;
    let flow = match parse(ctx) {
        Parsed::Flow(f) => f,
        Parsed::IcmpError(icmp) => {
            return match icmp_error(icmp, len, ingress) {
                Some(a) => a,
                None if ingress => pass(Verdict::PassNotService, len),
                None => Action::Pass,
            }
        }
        _ if !ingress => return Action::Pass,
        Parsed::NotIpv4 => return pass(Verdict::PassNotIpv4, len),
        Parsed::OtherProtocol => return pass(Verdict::PassOtherProtocol, len),
        Parsed::Fragment => return pass(Verdict::PassFragment, len),
        Parsed::Malformed => return pass(Verdict::PassMalformed, len),
    };
    if ingress {
        let fkey = FrontendKey {
            addr: flow.daddr,
            port: flow.dport,
            proto: flow.proto,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        if let Some(svc) = unsafe { FRONTENDS.get(fkey) } {
            let svc = *svc;
            return forward(flow, &svc, len);
        }
    }
    let now = unsafe { bpf_ktime_get_ns() };
    match conntrack::lookup_reply(&flow_key(&flow), now) {
        Some(e) => {
            count(Verdict::ReplyNat, len);
            count_service(e.service_id, len);
            Action::Nat {
                flow,
                src: Some(AddrPort {
                    addr: e.nat_addr,
                    port: e.nat_port,
                }),
                dst: snat_of(&e),
                route: ingress,
            }
        }
        None if ingress => pass(Verdict::PassNotService, len),
        None => Action::Pass,
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

/// A packet of a flow to a frontend.
#[inline(always)]
fn forward(flow: Ipv4Flow, svc: &ServiceEntry, len: u32) -> Action {
    if !source_allowed(svc, flow.saddr) {
        return drop(Verdict::DropSourceRange, len);
    }
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = flow_key(&flow);
    if let Some(e) = conntrack::lookup(&key, CT_FORWARD, now) {
        // The recorded backend wins while it still exists with the same
        // address, even if the Maglev table no longer lists it.
        if e.service_id == svc.id {
            if let Some(b) = backend_of(svc.id, e.backend_id) {
                if b.addr == e.nat_addr && b.port == e.nat_port {
                    conntrack::refresh(&key, now, &e, &b);
                    count(Verdict::DnatEstablished, len);
                    count_service(svc.id, len);
                    return to_backend(flow, &b, snat_of(&e));
                }
            }
        }
    }
    if svc.backend_count == 0 {
        count_service(svc.id, len);
        // Traffic policy Local with no endpoint here: kube-proxy drops it
        // (a load balancer's health check steers clients elsewhere).
        if svc.flags & SERVICE_F_LOCAL != 0 {
            return drop(Verdict::DropNoLocalBackend, len);
        }
        count(Verdict::RejectNoBackend, len);
        return Action::Reject { flow };
    }
    // With sessionAffinity ClientIP the source port is left out of the
    // hash, so every node picks the same backend for a client without
    // sharing state; the affinity map keeps it there when the table changes.
    let sport = if svc.flags & SERVICE_F_AFFINITY != 0 {
        0
    } else {
        flow.sport
    };
    let hash = flow_hash(flow.saddr, sport, flow.dport, flow.proto);
    let Some(choice) = choose(flow.saddr, hash, svc, now) else {
        return drop(Verdict::DropNoBackendEntry, len);
    };
    let b = choice.backend;
    let mut snat = None;
    if needs_snat(svc, flow.saddr, &b) {
        let cfg = config();
        // Without a node address (no --node-ip) there is nothing to
        // masquerade to; the agent warns at start-up.
        if cfg.snat_addr != [0; 4] {
            match conntrack::record_snat(&key, now, svc.id, choice.backend_id, &b, &cfg) {
                Some(s) => snat = Some(s),
                None => return drop(Verdict::DropSnatExhausted, len),
            }
        }
    }
    if snat.is_none() {
        conntrack::record(&key, now, svc.id, choice.backend_id, &b, None);
    }
    count(
        if choice.from_affinity {
            Verdict::DnatAffinity
        } else {
            Verdict::DnatNew
        },
        len,
    );
    count_service(svc.id, len);
    to_backend(flow, &b, snat)
}

/// A packet of `flow` sent to backend `b`, its source translated to `snat`
/// if given (then the datapath routes it: the stack would not).
#[inline(always)]
fn to_backend(flow: Ipv4Flow, b: &Backend, snat: Option<AddrPort>) -> Action {
    Action::Nat {
        flow,
        src: snat,
        dst: Some(AddrPort {
            addr: b.addr,
            port: b.port,
        }),
        route: snat.is_some(),
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
fn icmp_error(icmp: IcmpError, len: u32, route: bool) -> Option<Action> {
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
    // One lookup: the entry's direction says which way the quote went.
    let e = conntrack::lookup_live(&key, now)?;
    let quoted_src = AddrPort {
        addr: icmp.inner_saddr,
        port: icmp.inner_sport,
    };
    let quoted_dst = AddrPort {
        addr: icmp.inner_daddr,
        port: icmp.inner_dport,
    };
    // (what the quote's source becomes, what its destination becomes)
    let (inner_src, inner_dst) = match e.direction {
        // Quote: client-or-node -> backend. Entry: the client (when SNATed)
        // and the frontend to restore.
        CT_REPLY => (
            snat_of(&e).unwrap_or(quoted_src),
            AddrPort {
                addr: e.nat_addr,
                port: e.nat_port,
            },
        ),
        // Quote: frontend -> client. Entry: the backend, and the node
        // address and port the backend sees when SNATed.
        CT_FORWARD => (
            AddrPort {
                addr: e.nat_addr,
                port: e.nat_port,
            },
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
