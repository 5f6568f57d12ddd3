//! Applying an `Action` in XDP. XDP sees no skb, so checksums are updated
//! with RFC 1624 arithmetic, which is right for the complete checksums a
//! physical NIC receives. It is wrong for veth traffic carrying
//! CHECKSUM_PARTIAL seeds: attach with TC there (see README).

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::XdpContext,
};
use lb_common::{addr, Addr, Verdict, IPPROTO_UDP};

use crate::{
    conntrack::AddrPort,
    csum::{update16, update32, update_addr},
    icmp,
    packet::{ptr_at, EthHdr, Frag, Flow, Ipv4Hdr, Ipv6Hdr, L4Ports, ETH_HLEN},
    pipeline::{self, classify, Action, Direction, Route, Stage},
    reject,
    stats::count,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Each stage in a function of its own (see `pipeline::Stage`).
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let rc = match classify(ctx, Direction::Ingress) {
        Stage::Pass => xdp_action::XDP_PASS,
        Stage::Forward => match to_frontend() {
            NEW_FLOW => match new_flow() {
                SNAT => snat_flow(),
                REJECT => reject_flow(ctx),
                rc => rc,
            },
            rc => rc,
        },
        Stage::Reply => reply(),
        Stage::Icmp => icmp_error(ctx),
    };
    // The translation a stage decided is applied by a stage of its own
    // (see `pipeline::stash_nat`).
    if rc == NAT {
        apply_nat(ctx)
    } else {
        rc
    }
}

/// Not an XDP action: `to_frontend` asks `run` for `new_flow`.
const NEW_FLOW: u32 = u32::MAX;
/// Not a verdict either: `new_flow` asks `run` for `snat_flow`.
const SNAT: u32 = u32::MAX - 1;
/// Nor this: `new_flow` asks `run` for `reject_flow`.
const REJECT: u32 = u32::MAX - 2;
/// Nor this: `snat_flow` asks `run` for `snat_nat`.
const NAT: u32 = u32::MAX - 3;

#[inline(never)]
fn to_frontend() -> u32 {
    match pipeline::forward() {
        Action::NewFlow => NEW_FLOW,
        a => settle(a),
    }
}

#[inline(never)]
fn new_flow() -> u32 {
    match pipeline::new_flow() {
        Action::Snat => SNAT,
        Action::Reject => REJECT,
        a => settle(a),
    }
}

/// The refusal, a stage of its own: its frame (an IPv6 one is 110 bytes)
/// does not fit on top of `new_flow`'s.
#[inline(never)]
fn reject_flow(ctx: &XdpContext) -> u32 {
    match pipeline::pending_flow() {
        Some(f) => reject(ctx, f),
        None => xdp_action::XDP_DROP,
    }
}

/// A stage of its own: see `pipeline::snat_flow`.
#[inline(never)]
fn snat_flow() -> u32 {
    settle(pipeline::snat_flow())
}

/// Applies the translation a stage stashed.
#[inline(never)]
fn apply_nat(ctx: &XdpContext) -> u32 {
    match pipeline::stashed_nat() {
        // A helper failed half-way (out of memory, unwritable packet): it
        // may be half-translated, so it must not go anywhere.
        Some((flow, src, dst, route)) => nat(ctx, flow, src, dst, route).unwrap_or(xdp_action::XDP_DROP),
        None => xdp_action::XDP_DROP,
    }
}

#[inline(never)]
fn reply() -> u32 {
    settle(pipeline::reply())
}

#[inline(never)]
fn icmp_error(ctx: &XdpContext) -> u32 {
    match pipeline::icmp() {
        Action::IcmpNat { icmp, to, .. } => match icmp::rewrite(ctx, icmp, &to) {
            Some(()) => route(ctx, &Route::after_icmp_nat(icmp, &to)),
            None => xdp_action::XDP_DROP,
        },
        _ => xdp_action::XDP_PASS,
    }
}

/// Pass, drop, or stash the translation for `apply_nat`. (Refusals and
/// ICMP errors are applied by their stages alone.)
#[inline(always)]
fn settle(a: Action) -> u32 {
    match a {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Nat {
            src, dst, route, ..
        } => {
            pipeline::stash_nat(src, dst, route);
            NAT
        }
        _ => xdp_action::XDP_DROP,
    }
}

/// Translates a TCP/UDP packet, then passes it to the stack or routes it.
#[inline(always)]
fn nat(
    ctx: &XdpContext,
    f: &Flow,
    src: Option<AddrPort>,
    dst: Option<AddrPort>,
    redirect: bool,
) -> Option<u32> {
    if let Some(s) = src {
        rewrite(ctx, f, true, s.addr, s.port)?;
    }
    if let Some(d) = dst {
        rewrite(ctx, f, false, d.addr, d.port)?;
    }
    if !redirect {
        return Some(xdp_action::XDP_PASS);
    }
    Some(route(ctx, &Route::after_nat(f, src, dst)))
}

#[inline(always)]
fn rewrite(ctx: &XdpContext, f: &Flow, source: bool, to: Addr, port: u16) -> Option<()> {
    if f.v6 {
        return rewrite6(ctx, f, source, &to, port);
    }
    let addr = addr::v4(&to);
    let ip = ptr_at::<Ipv4Hdr, _>(ctx, ETH_HLEN)?;
    // SAFETY: ptr_at checked the pointer against data_end.
    let old_addr = unsafe {
        let old = if source { (*ip).saddr } else { (*ip).daddr };
        (*ip).check = update32((*ip).check, old, addr);
        if source {
            (*ip).saddr = addr;
        } else {
            (*ip).daddr = addr;
        }
        old
    };
    rewrite_l4(ctx, f, source, port, |sum| update32(sum, old_addr, addr))
}

/// `rewrite` for IPv6: no header checksum; the address moves the L4
/// checksum through the pseudo-header.
#[inline(always)]
fn rewrite6(ctx: &XdpContext, f: &Flow, source: bool, to: &Addr, port: u16) -> Option<()> {
    let ip = ptr_at::<Ipv6Hdr, _>(ctx, ETH_HLEN)?;
    // SAFETY: ptr_at checked the pointer against data_end.
    let old = unsafe {
        let field = if source {
            &raw mut (*ip).saddr
        } else {
            &raw mut (*ip).daddr
        };
        let old = Addr { octets: *field };
        *field = to.octets;
        old
    };
    rewrite_l4(ctx, f, source, port, |sum| update_addr(sum, &old, to))
}

/// The port, and the L4 checksum for the address change (`addr_update`,
/// which the pseudo-header carries) and the port's. A later fragment has
/// no L4 header: the address was all there is (the first fragment's
/// checksum covered the change).
#[inline(always)]
fn rewrite_l4(
    ctx: &XdpContext,
    f: &Flow,
    source: bool,
    port: u16,
    addr_update: impl FnOnce(u16) -> u16,
) -> Option<()> {
    if f.frag == Frag::Later {
        return Some(());
    }
    let ports = ptr_at::<L4Ports, _>(ctx, f.l4_off as usize)?;
    let csum = ptr_at::<u16, _>(ctx, f.l4_csum_off as usize)?;
    let port = port.to_be();
    // SAFETY: ptr_at checked every pointer against data_end.
    unsafe {
        let old_port = if source { (*ports).src } else { (*ports).dst };
        let old_sum = *csum;
        // A UDP checksum of 0 means "none" (IPv4) and stays so; over IPv6
        // it is invalid, and the stack drops the packet as it would have.
        if !(f.proto == IPPROTO_UDP && old_sum == 0) {
            let mut sum = update16(addr_update(old_sum), old_port, port);
            if f.proto == IPPROTO_UDP && sum == 0 {
                sum = 0xffff;
            }
            *csum = sum;
        }
        if source {
            (*ports).src = port;
        } else {
            (*ports).dst = port;
        }
    }
    Some(())
}

/// Forwards a translated packet to its next hop (the stack would drop a
/// packet whose source is a node address). Without a resolved neighbour,
/// the stack gets it and decides.
#[inline(always)]
fn route(ctx: &XdpContext, r: &Route) -> u32 {
    // SAFETY: a zeroed bpf_fib_lookup is a valid argument.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = if r.v6 { AF_INET6 } else { AF_INET };
    p.l4_protocol = r.proto;
    p.sport = r.sport.to_be();
    p.dport = r.dport.to_be();
    // The IP length, for the helper's MTU check.
    let Some(len) = ptr_at::<[u8; 6], _>(ctx, ETH_HLEN) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: ptr_at checked the pointer.
    let len = unsafe { *len };
    p.__bindgen_anon_1.tot_len = if r.v6 {
        u16::from_be_bytes([len[4], len[5]]).saturating_add(40)
    } else {
        u16::from_be_bytes([len[2], len[3]])
    };
    // SAFETY: reading a field of the context the program was given.
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    if r.v6 {
        p.__bindgen_anon_3.ipv6_src = addr::words(&r.saddr);
        p.__bindgen_anon_4.ipv6_dst = addr::words(&r.daddr);
    } else {
        p.__bindgen_anon_3.ipv4_src = addr::words(&r.saddr)[3];
        p.__bindgen_anon_4.ipv4_dst = addr::words(&r.daddr)[3];
    }
    // SAFETY: p lives on our stack for the duration of the call.
    let rc = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            &raw mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return xdp_action::XDP_PASS;
    }
    if r.v6 {
        let (Some(eth), Some(ip)) = (
            ptr_at::<EthHdr, _>(ctx, 0),
            ptr_at::<Ipv6Hdr, _>(ctx, ETH_HLEN),
        ) else {
            return xdp_action::XDP_DROP;
        };
        // SAFETY: ptr_at checked both pointers.
        unsafe {
            if (*ip).hop_limit <= 1 {
                return xdp_action::XDP_PASS;
            }
            (*ip).hop_limit -= 1;
            (*eth).dst = p.dmac;
            (*eth).src = p.smac;
            return bpf_redirect(p.ifindex, 0) as u32;
        }
    }
    let (Some(eth), Some(ip)) = (
        ptr_at::<EthHdr, _>(ctx, 0),
        ptr_at::<Ipv4Hdr, _>(ctx, ETH_HLEN),
    ) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: ptr_at checked both pointers.
    unsafe {
        if (*ip).ttl <= 1 {
            return xdp_action::XDP_PASS;
        }
        let old = u16::from_ne_bytes([(*ip).ttl, (*ip).protocol]);
        (*ip).ttl -= 1;
        let new = u16::from_ne_bytes([(*ip).ttl, (*ip).protocol]);
        (*ip).check = update16((*ip).check, old, new);
        (*eth).dst = p.dmac;
        (*eth).src = p.smac;
        bpf_redirect(p.ifindex, 0) as u32
    }
}

/// Rewrites the frame into an ICMP (ICMPv6) port unreachable and bounces
/// it out the interface it came in on.
#[inline(always)]
fn reject(ctx: &XdpContext, f: &Flow) -> u32 {
    if f.v6 {
        return match reject::build6(ctx, f) {
            Some(frame) => send_back(ctx, frame),
            None => reject_failed(),
        };
    }
    match reject::build(ctx, f) {
        Some(frame) => send_back(ctx, frame),
        None => reject_failed(),
    }
}

#[inline(always)]
fn reject_failed() -> u32 {
    count(Verdict::DropRejectFailed, 0);
    xdp_action::XDP_DROP
}

/// Replaces the frame by `frame` and bounces it back.
#[inline(always)]
fn send_back<T: Copy>(ctx: &XdpContext, frame: &T) -> u32 {
    let cur = (ctx.data_end() - ctx.data()) as i32;
    let want = core::mem::size_of::<T>() as i32;
    // Grow at the head (XDP guarantees headroom), shrink at the tail.
    // SAFETY: resizing helpers; pointers are re-derived afterwards.
    let rc = unsafe {
        if cur < want {
            bpf_xdp_adjust_head(ctx.ctx, cur - want)
        } else if cur > want {
            bpf_xdp_adjust_tail(ctx.ctx, want - cur)
        } else {
            0
        }
    };
    if rc != 0 {
        return reject_failed();
    }
    let Some(out) = ptr_at::<T, _>(ctx, 0) else {
        return reject_failed();
    };
    // SAFETY: ptr_at checked the frame fits.
    unsafe { *out = *frame };
    xdp_action::XDP_TX
}
