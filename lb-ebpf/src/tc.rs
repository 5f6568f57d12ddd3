//! Applying an `Action` to an skb (TC ingress and egress). Checksums go through the
//! kernel's csum helpers: they update a CHECKSUM_PARTIAL seed, a complete
//! checksum and `skb->csum` each the right way, which no direct write can
//! (pods' packets on veth usually carry CHECKSUM_PARTIAL).

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_F_MARK_MANGLED_0,
        BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{
        bpf_csum_diff, bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh,
        bpf_skb_change_tail,
    },
    programs::TcContext,
};
use lb_common::{addr, Addr, Verdict, IPPROTO_UDP};

use crate::{
    conntrack::AddrPort,
    icmp,
    packet::{
        Frag, IcmpError, Flow, ETH_HLEN, ICMP6_ERROR_MIN, ICMP_ERROR_MIN, IP6_DADDR_OFF,
        IP6_HOP_LIMIT_OFF, IP6_SADDR_OFF, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IP_TTL_OFF,
    },
    pipeline::{self, classify, Action, Direction, IcmpRewrite, Route, Stage},
    reject,
    stats::count,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// `BPF_F_RECOMPUTE_CSUM`: a store that keeps a CHECKSUM_COMPLETE skb's
/// `csum` right (the IPv6 hop limit has no header checksum to do it).
const BPF_F_RECOMPUTE_CSUM: u64 = 1;

/// Each stage in a function of its own (see `pipeline::Stage`): their
/// frames sit side by side under `run`, never on top of one another.
#[inline(always)]
pub fn run(ctx: &TcContext, dir: Direction) -> i32 {
    let rc = match classify(ctx, dir) {
        Stage::Pass => TC_ACT_OK,
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

/// Not a TC verdict: `to_frontend` asks `run` for `new_flow`.
const NEW_FLOW: i32 = -2;
/// Not a verdict either: `new_flow` asks `run` for `snat_flow`.
const SNAT: i32 = -3;
/// Nor this: `new_flow` asks `run` for `reject_flow`.
const REJECT: i32 = -4;
/// Nor this: `snat_flow` asks `run` for `snat_nat`.
const NAT: i32 = -5;

#[inline(never)]
fn to_frontend() -> i32 {
    match pipeline::forward() {
        Action::NewFlow => NEW_FLOW,
        a => settle(a),
    }
}

#[inline(never)]
fn new_flow() -> i32 {
    match pipeline::new_flow() {
        Action::Snat => SNAT,
        Action::Reject => REJECT,
        a => settle(a),
    }
}

/// The refusal, a stage of its own: its frame (an IPv6 one is 110 bytes)
/// does not fit on top of `new_flow`'s.
#[inline(never)]
fn reject_flow(ctx: &TcContext) -> i32 {
    match pipeline::pending_flow() {
        Some(f) => reject(ctx, f).unwrap_or(TC_ACT_SHOT),
        None => TC_ACT_SHOT,
    }
}

/// A stage of its own: see `pipeline::snat_flow`.
#[inline(never)]
fn snat_flow() -> i32 {
    settle(pipeline::snat_flow())
}

/// Applies the translation a stage stashed.
#[inline(never)]
fn apply_nat(ctx: &TcContext) -> i32 {
    match pipeline::stashed_nat() {
        // A helper failed half-way (out of memory, unwritable packet): it
        // may be half-translated, so it must not go anywhere.
        Some((flow, src, dst, route)) => nat(ctx, flow, src, dst, route).unwrap_or(TC_ACT_SHOT),
        None => TC_ACT_SHOT,
    }
}

#[inline(never)]
fn reply() -> i32 {
    settle(pipeline::reply())
}

#[inline(never)]
fn icmp_error(ctx: &TcContext) -> i32 {
    match pipeline::icmp() {
        Action::IcmpNat { icmp, to, route } => {
            icmp_nat(ctx, icmp, &to, route).unwrap_or(TC_ACT_SHOT)
        }
        _ => TC_ACT_OK,
    }
}

/// Pass, drop, or stash the translation for `apply_nat`. (Refusals and
/// ICMP errors are applied by their stages alone.)
#[inline(always)]
fn settle(a: Action) -> i32 {
    match a {
        Action::Pass => TC_ACT_OK,
        Action::Nat {
            src, dst, route, ..
        } => {
            pipeline::stash_nat(src, dst, route);
            NAT
        }
        _ => TC_ACT_SHOT,
    }
}

/// Translates a TCP/UDP packet, then lets the stack route it or routes it
/// ourselves.
#[inline(always)]
fn nat(
    ctx: &TcContext,
    f: &Flow,
    src: Option<AddrPort>,
    dst: Option<AddrPort>,
    redirect: bool,
) -> Result<i32, i64> {
    if let Some(s) = src {
        rewrite(ctx, f, Side::Source, s.addr, s.port)?;
    }
    if let Some(d) = dst {
        rewrite(ctx, f, Side::Destination, d.addr, d.port)?;
    }
    if !redirect {
        return Ok(TC_ACT_OK);
    }
    route(ctx, &Route::after_nat(f, src, dst))
}

#[inline(always)]
fn icmp_nat(
    ctx: &TcContext,
    icmp: &IcmpError,
    to: &IcmpRewrite,
    redirect: bool,
) -> Result<i32, i64> {
    // Writes go straight into the packet: make its head linear and private
    // (a clone's data is shared) first. The quote may end before a TCP
    // checksum, so ask for that much only if it is there.
    let min = if icmp.v6 {
        ICMP6_ERROR_MIN
    } else {
        ICMP_ERROR_MIN
    };
    let want = if ctx.len() as usize >= min + 12 {
        min + 12
    } else {
        min
    };
    ctx.pull_data(want as u32)?;
    if icmp::rewrite(ctx, icmp, to).is_none() {
        return Ok(TC_ACT_SHOT);
    }
    if !redirect {
        return Ok(TC_ACT_OK);
    }
    route(ctx, &Route::after_icmp_nat(icmp, to))
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Source,
    Destination,
}

#[inline(always)]
fn rewrite(ctx: &TcContext, f: &Flow, side: Side, to: Addr, port: u16) -> Result<(), i64> {
    let source = side == Side::Source;
    let (old_addr, old_port, port_off) = if source {
        (&f.saddr, f.sport, f.l4_off as usize)
    } else {
        (&f.daddr, f.dport, f.l4_off as usize + 2)
    };
    // The address, and its change to the L4 checksum through the
    // pseudo-header, as l4_csum_replace's (from, to, size) arguments.
    let (csum_from, csum_to, size) = if f.v6 {
        // No header checksum; the 16 bytes' change goes in as one
        // difference (size 0: `to` is a checksum difference).
        let off = ETH_HLEN + if source { IP6_SADDR_OFF } else { IP6_DADDR_OFF };
        ctx.store(off, &to.octets, 0)?;
        let mut from = addr::words(old_addr);
        let mut new = addr::words(&to);
        // SAFETY: both buffers are 16 bytes on our stack.
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, new.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(diff);
        }
        (0, diff as u64, 0)
    } else {
        let off = ETH_HLEN + if source { IP_SADDR_OFF } else { IP_DADDR_OFF };
        let new_addr = addr::v4(&to);
        let old_a = u32::from_ne_bytes(addr::v4(old_addr)) as u64;
        let new_a = u32::from_ne_bytes(new_addr) as u64;
        ctx.l3_csum_replace(ETH_HLEN + IP_CSUM_OFF, old_a, new_a, 4)?;
        ctx.store(off, &new_addr, 0)?;
        (old_a, new_a, 4)
    };
    // A later fragment has no L4 header: the address was all there is (the
    // L4 checksum, in the first fragment, was updated there).
    if f.frag == Frag::Later {
        return Ok(());
    }
    // UDP checksum 0 means "none": BPF_F_MARK_MANGLED_0 keeps it 0 and
    // writes a computed 0 as 0xffff.
    let mangled = if f.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    ctx.l4_csum_replace(
        f.l4_csum_off as usize,
        csum_from,
        csum_to,
        BPF_F_PSEUDO_HDR as u64 | mangled | size,
    )?;
    let old_p = old_port.to_be() as u64;
    let new_p = port.to_be();
    ctx.l4_csum_replace(f.l4_csum_off as usize, old_p, new_p as u64, mangled | 2)?;
    ctx.store(port_off, &new_p, 0)?;
    Ok(())
}

/// Sends a translated packet straight to its next hop. The node's own
/// routing would drop it: its source is now a node address (NodePort reply,
/// SNAT), a martian on input.
#[inline(always)]
fn route(ctx: &TcContext, r: &Route) -> Result<i32, i64> {
    // SAFETY: a zeroed bpf_fib_lookup is a valid argument.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = if r.v6 { AF_INET6 } else { AF_INET };
    p.l4_protocol = r.proto;
    p.sport = r.sport.to_be();
    p.dport = r.dport.to_be();
    // tot_len stays 0: with it set, the kernel compares the IP length with
    // the MTU, and a GSO super-packet (up to 64 KB) would fail; without it
    // the helper checks is_skb_forwardable(), which understands GSO.
    // SAFETY: reading a field of the context the program was given.
    p.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
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
            ctx.skb.skb.cast(),
            &raw mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        decrement_ttl(ctx, r.v6)?;
        ctx.store(0, &p.dmac, 0)?;
        ctx.store(6, &p.smac, 0)?;
        // SAFETY: a helper without memory arguments.
        let r = unsafe { bpf_redirect(p.ifindex, 0) };
        return Ok(r as i32);
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        decrement_ttl(ctx, r.v6)?;
        // SAFETY: a null params pointer asks the helper to resolve the
        // next hop from the packet itself.
        let r = unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) };
        return Ok(r as i32);
    }
    // Not forwardable from here (local destination, no route): the stack
    // decides, as it would have without us.
    Ok(TC_ACT_OK)
}

/// We forward the reply ourselves, so we do the router's TTL decrement.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, v6: bool) -> Result<(), i64> {
    if v6 {
        let hop_limit: u8 = ctx.load(ETH_HLEN + IP6_HOP_LIMIT_OFF)?;
        if hop_limit <= 1 {
            return Err(-1);
        }
        return ctx.store(
            ETH_HLEN + IP6_HOP_LIMIT_OFF,
            &(hop_limit - 1),
            BPF_F_RECOMPUTE_CSUM,
        );
    }
    let word: [u8; 2] = ctx.load(ETH_HLEN + IP_TTL_OFF)?;
    if word[0] <= 1 {
        return Err(-1);
    }
    let new = [word[0] - 1, word[1]];
    ctx.l3_csum_replace(
        ETH_HLEN + IP_CSUM_OFF,
        u16::from_ne_bytes(word) as u64,
        u16::from_ne_bytes(new) as u64,
        2,
    )?;
    ctx.store(ETH_HLEN + IP_TTL_OFF, &new[0], 0)
}

/// Turns the packet into an ICMP (ICMPv6) port unreachable and sends it
/// back out the interface it came in on.
#[inline(always)]
fn reject(ctx: &TcContext, f: &Flow) -> Result<i32, i64> {
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
fn reject_failed() -> Result<i32, i64> {
    count(Verdict::DropRejectFailed, 0);
    Ok(TC_ACT_SHOT)
}

/// Replaces the packet by `frame` and bounces it out its interface.
#[inline(always)]
fn send_back<T>(ctx: &TcContext, frame: &T) -> Result<i32, i64> {
    let len = core::mem::size_of::<T>() as u32;
    // SAFETY: resizing the skb; packet pointers are not used afterwards.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) };
    if rc != 0 {
        return reject_failed();
    }
    ctx.store(0, frame, 0)?;
    // SAFETY: reading a field of our context; redirect has no memory args.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let r = unsafe { bpf_redirect(ifindex, 0) };
    Ok(r as i32)
}
