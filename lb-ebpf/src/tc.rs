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
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_tail,
    },
    programs::TcContext,
};
use lb_common::{Verdict, IPPROTO_UDP};

use crate::{
    conntrack::AddrPort,
    icmp,
    packet::{
        Frag, IcmpError, Ipv4Flow, ETH_HLEN, ICMP_ERROR_MIN, IP_CSUM_OFF, IP_DADDR_OFF,
        IP_SADDR_OFF, IP_TTL_OFF,
    },
    pipeline::{self, classify, Action, Direction, IcmpRewrite, Route, Stage},
    reject,
    stats::count,
};

const AF_INET: u8 = 2;

/// Each stage in a function of its own (see `pipeline::Stage`): their
/// frames sit side by side under `run`, never on top of one another.
#[inline(always)]
pub fn run(ctx: &TcContext, dir: Direction) -> i32 {
    match classify(ctx, dir) {
        Stage::Pass => TC_ACT_OK,
        Stage::Forward => match to_frontend(ctx) {
            NEW_FLOW => match new_flow(ctx) {
                SNAT => snat_flow(ctx),
                rc => rc,
            },
            rc => rc,
        },
        Stage::Reply => reply(ctx),
        Stage::Icmp => icmp_error(ctx),
    }
}

/// Not a TC verdict: `to_frontend` asks `run` for `new_flow`.
const NEW_FLOW: i32 = -2;
/// Not a verdict either: `new_flow` asks `run` for `snat_flow`.
const SNAT: i32 = -3;

#[inline(never)]
fn to_frontend(ctx: &TcContext) -> i32 {
    match pipeline::forward() {
        Action::NewFlow => NEW_FLOW,
        a => apply(ctx, a),
    }
}

#[inline(never)]
fn new_flow(ctx: &TcContext) -> i32 {
    match pipeline::new_flow() {
        Action::Snat => SNAT,
        Action::Reject { flow } => reject(ctx, &flow).unwrap_or(TC_ACT_SHOT),
        a => apply(ctx, a),
    }
}

/// A stage of its own: see `pipeline::snat_flow`.
#[inline(never)]
fn snat_flow(ctx: &TcContext) -> i32 {
    apply(ctx, pipeline::snat_flow())
}

#[inline(never)]
fn reply(ctx: &TcContext) -> i32 {
    apply(ctx, pipeline::reply())
}

#[inline(never)]
fn icmp_error(ctx: &TcContext) -> i32 {
    match pipeline::icmp() {
        Action::IcmpNat { icmp, to, route } => {
            icmp_nat(ctx, &icmp, &to, route).unwrap_or(TC_ACT_SHOT)
        }
        _ => TC_ACT_OK,
    }
}

/// Pass, drop or translate. (Refusals and ICMP errors are applied by
/// their stages alone.)
#[inline(always)]
fn apply(ctx: &TcContext, a: Action) -> i32 {
    let rc = match a {
        Action::Pass => Ok(TC_ACT_OK),
        Action::Nat {
            flow,
            src,
            dst,
            route: r,
        } => nat(ctx, &flow, src, dst, r),
        _ => Ok(TC_ACT_SHOT),
    };
    // A helper failed half-way (out of memory, unwritable skb): the packet
    // may be half-translated, so it must not go anywhere.
    rc.unwrap_or(TC_ACT_SHOT)
}

/// Translates a TCP/UDP packet, then lets the stack route it or routes it
/// ourselves.
#[inline(always)]
fn nat(
    ctx: &TcContext,
    f: &Ipv4Flow,
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
    let want = if ctx.len() as usize >= ICMP_ERROR_MIN + 12 {
        ICMP_ERROR_MIN + 12
    } else {
        ICMP_ERROR_MIN
    };
    ctx.pull_data(want as u32)?;
    if icmp::rewrite(ctx, icmp, to).is_none() {
        return Ok(TC_ACT_SHOT);
    }
    if !redirect {
        return Ok(TC_ACT_OK);
    }
    route(ctx, &Route::after_icmp_nat(to))
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Source,
    Destination,
}

#[inline(always)]
fn rewrite(ctx: &TcContext, f: &Ipv4Flow, side: Side, addr: [u8; 4], port: u16) -> Result<(), i64> {
    let (old_addr, addr_off, old_port, port_off) = match side {
        Side::Source => (f.saddr, ETH_HLEN + IP_SADDR_OFF, f.sport, f.l4_off as usize),
        Side::Destination => (
            f.daddr,
            ETH_HLEN + IP_DADDR_OFF,
            f.dport,
            f.l4_off as usize + 2,
        ),
    };
    // UDP checksum 0 means "none": BPF_F_MARK_MANGLED_0 keeps it 0 and
    // writes a computed 0 as 0xffff.
    let mangled = if f.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let old_a = u32::from_ne_bytes(old_addr) as u64;
    let new_a = u32::from_ne_bytes(addr) as u64;
    ctx.l3_csum_replace(ETH_HLEN + IP_CSUM_OFF, old_a, new_a, 4)?;
    ctx.store(addr_off, &addr, 0)?;
    // A later fragment has no L4 header: the address was all there is (the
    // L4 checksum, in the first fragment, was updated there).
    if f.frag == Frag::Later {
        return Ok(());
    }
    ctx.l4_csum_replace(
        f.l4_csum_off as usize,
        old_a,
        new_a,
        BPF_F_PSEUDO_HDR as u64 | mangled | 4,
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
    p.family = AF_INET;
    p.l4_protocol = r.proto;
    p.sport = r.sport.to_be();
    p.dport = r.dport.to_be();
    // tot_len stays 0: with it set, the kernel compares the IP length with
    // the MTU, and a GSO super-packet (up to 64 KB) would fail; without it
    // the helper checks is_skb_forwardable(), which understands GSO.
    // SAFETY: reading a field of the context the program was given.
    p.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(r.saddr);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(r.daddr);
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
        decrement_ttl(ctx)?;
        ctx.store(0, &p.dmac, 0)?;
        ctx.store(6, &p.smac, 0)?;
        // SAFETY: a helper without memory arguments.
        let r = unsafe { bpf_redirect(p.ifindex, 0) };
        return Ok(r as i32);
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        decrement_ttl(ctx)?;
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
fn decrement_ttl(ctx: &TcContext) -> Result<(), i64> {
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

/// Turns the packet into an ICMP port unreachable and sends it back out the
/// interface it came in on.
#[inline(always)]
fn reject(ctx: &TcContext, f: &Ipv4Flow) -> Result<i32, i64> {
    let Some(frame) = reject::build(ctx, f) else {
        count(Verdict::DropRejectFailed, 0);
        return Ok(TC_ACT_SHOT);
    };
    // SAFETY: resizing the skb; packet pointers are not used afterwards.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, reject::FRAME_LEN as u32, 0) };
    if rc != 0 {
        count(Verdict::DropRejectFailed, 0);
        return Ok(TC_ACT_SHOT);
    }
    ctx.store(0, &frame, 0)?;
    // SAFETY: reading a field of our context; redirect has no memory args.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let r = unsafe { bpf_redirect(ifindex, 0) };
    Ok(r as i32)
}
