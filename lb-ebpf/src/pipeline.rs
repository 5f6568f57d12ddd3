//! The generic core: what to do with a packet, decided once for XDP and TC.
//! It reads the packet and the maps and updates conntrack, affinity and
//! counters; the entry points then apply the returned `Action`.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{FrontendKey, ServiceEntry, Verdict};

use crate::{
    conntrack,
    maps::FRONTENDS,
    packet::{parse, Ipv4Flow, PacketBuf, Parsed},
    select::{backend_of, choose},
    stats::{count, count_service},
};

pub enum Action {
    Pass,
    Drop,
    /// Rewrite the destination to the backend.
    Dnat {
        flow: Ipv4Flow,
        addr: [u8; 4],
        port: u16,
    },
    /// Rewrite the source back to the frontend and route the reply.
    ReplyNat {
        flow: Ipv4Flow,
        addr: [u8; 4],
        port: u16,
    },
    /// Answer with ICMP port unreachable.
    Reject {
        flow: Ipv4Flow,
    },
}

#[inline(always)]
pub fn decide<C: PacketBuf>(ctx: &C) -> Action {
    let len = ctx.wire_len();
    let flow = match parse(ctx) {
        Parsed::Flow(f) => f,
        Parsed::NotIpv4 => return pass(Verdict::PassNotIpv4, len),
        Parsed::OtherProtocol => return pass(Verdict::PassOtherProtocol, len),
        Parsed::Fragment => return pass(Verdict::PassFragment, len),
        Parsed::Malformed => return pass(Verdict::PassMalformed, len),
    };
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
    let now = unsafe { bpf_ktime_get_ns() };
    match conntrack::lookup_reply(&flow, now) {
        Some(e) => {
            count(Verdict::ReplyNat, len);
            count_service(e.service_id, len);
            Action::ReplyNat {
                flow,
                addr: e.nat_addr,
                port: e.nat_port,
            }
        }
        None => pass(Verdict::PassNotService, len),
    }
}

#[inline(always)]
fn pass(v: Verdict, len: u32) -> Action {
    count(v, len);
    Action::Pass
}

#[inline(always)]
fn forward(flow: Ipv4Flow, svc: &ServiceEntry, len: u32) -> Action {
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(e) = conntrack::lookup_forward(&flow, now) {
        // The recorded backend wins while it still exists with the same
        // address, even if the Maglev table no longer lists it.
        if e.service_id == svc.id {
            if let Some(b) = backend_of(svc.id, e.backend_id) {
                if b.addr == e.nat_addr && b.port == e.nat_port {
                    conntrack::refresh(&flow, now, &e, &b);
                    count(Verdict::DnatEstablished, len);
                    count_service(svc.id, len);
                    return Action::Dnat {
                        flow,
                        addr: b.addr,
                        port: b.port,
                    };
                }
            }
        }
    }
    if svc.backend_count == 0 {
        count(Verdict::RejectNoBackend, len);
        count_service(svc.id, len);
        return Action::Reject { flow };
    }
    let Some(choice) = choose(&flow, svc, now) else {
        count(Verdict::DropNoBackendEntry, len);
        return Action::Drop;
    };
    conntrack::record(&flow, now, svc.id, choice.backend_id, &choice.backend);
    count(
        if choice.from_affinity {
            Verdict::DnatAffinity
        } else {
            Verdict::DnatNew
        },
        len,
    );
    count_service(svc.id, len);
    Action::Dnat {
        flow,
        addr: choice.backend.addr,
        port: choice.backend.port,
    }
}
