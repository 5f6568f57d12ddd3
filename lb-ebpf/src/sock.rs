//! Socket-level translation ("socket LB"): cgroup/connect4 and
//! cgroup/sendmsg4 replace a frontend address by a backend before any packet
//! exists, and cgroup/recvmsg4 and cgroup/getpeername4 show the frontend
//! again to the application. They act on every socket of the hooked cgroup,
//! in any network namespace (pods too), or with `--socket-lb-host-only` only
//! on the node's own sockets (kubelet, hostNetwork pods).
//!
//! Why a socket hook and not TC egress: a packet the node sends to a
//! ClusterIP has already been routed (to a default route, or nowhere: then
//! connect() fails with ENETUNREACH before TC sees anything), and its reply
//! would be delivered locally with no hook to reverse-translate cheaply.
//! At the socket, the choice is made once per connection, costs nothing per
//! packet, and replies need no translation at all. For a pod the same holds:
//! its connection goes straight to the backend, which sees the pod's
//! address. What the socket cannot judge is left to TC on the pod's veth:
//! a frontend with loadBalancerSourceRanges (the source address is not
//! chosen yet at connect()), and every socket outside the hooked cgroup.

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    hash::{flow_hash, fmix64},
    FrontendKey, SockReverseEntry, SockReverseKey, Verdict, CONFIG_F_SOCK_ALL_NETNS,
    FRONTEND_VIEW_ALL, IPPROTO_TCP,
    IPPROTO_UDP, SERVICE_F_AFFINITY, SERVICE_F_SOURCE_RANGES,
};

use crate::{
    maps::SOCK_REVERSE,
    policy::{config, frontend_for},
    select::choose,
    stats::{count, count_service},
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// connect4 and sendmsg4: translate a frontend destination to a backend.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let cfg = config();
    // Nothing before the agent wrote the config.
    if cfg.netns_cookie == 0 {
        return ALLOW;
    }
    // SAFETY: helpers on our own context.
    let in_node_netns = unsafe { bpf_get_netns_cookie(sa.cast()) } == cfg.netns_cookie;
    if !in_node_netns && cfg.flags & CONFIG_F_SOCK_ALL_NETNS == 0 {
        return ALLOW;
    }
    // SAFETY: sa is the program's context; these fields are readable.
    let (ip, port, proto) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let proto = proto as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let fkey = FrontendKey {
        addr: ip.to_ne_bytes(),
        port: u16::from_be(port as u16),
        proto,
        view: FRONTEND_VIEW_ALL,
    };
    let Some(svc) = frontend_for(fkey, None) else {
        return ALLOW;
    };
    // A pod's packets to such a frontend cross its veth, where TC checks
    // the source against the ranges; here the source is not known yet.
    // (The node's own sockets never cross a TC ingress: translated as
    // before, ranges not applied; see README Limits.)
    if !in_node_netns && svc.flags & SERVICE_F_SOURCE_RANGES != 0 {
        return ALLOW;
    }
    count_service(svc.id, 0);
    // SAFETY: helpers on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let now = unsafe { bpf_ktime_get_ns() };
    // The socket cookie stands in for the source port, which is not chosen
    // yet; the node's address is the client for sessionAffinity.
    let choice = if svc.backend_count == 0 {
        None
    } else {
        // sessionAffinity: the same choice as the TC path makes for this
        // client address (see pipeline::forward).
        let hash = if svc.flags & SERVICE_F_AFFINITY != 0 {
            flow_hash(cfg.snat_addr, 0, fkey.port, proto)
        } else {
            fmix64(cookie)
        };
        choose(cfg.snat_addr, hash, &svc, now)
    };
    let Some(choice) = choice else {
        // No usable backend (or, with traffic policy Local, none on this
        // node): refuse at once, as kube-proxy's REJECT would.
        count(Verdict::RejectNoBackend, 0);
        // SAFETY: sets the error the syscall returns.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return DENY;
    };
    let b = choice.backend;
    let key = SockReverseKey {
        cookie,
        backend_addr: b.addr,
        backend_port: b.port,
        _pad: 0,
    };
    let entry = SockReverseEntry {
        frontend_addr: fkey.addr,
        frontend_port: fkey.port,
        _pad: 0,
    };
    let _ = SOCK_REVERSE.insert(key, entry, BPF_ANY as u64);
    // SAFETY: connect4/sendmsg4 may write the destination.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(b.addr);
        (*sa).user_port = b.port.to_be() as u32;
    }
    count(Verdict::SockTranslated, 0);
    ALLOW
}

/// recvmsg4 and getpeername4: show the frontend instead of the backend.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: helper on our own context; fields readable in these hooks.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let key = SockReverseKey {
        cookie,
        backend_addr: ip.to_ne_bytes(),
        backend_port: u16::from_be(port as u16),
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(e) = unsafe { SOCK_REVERSE.get(key) }.copied() {
        // SAFETY: recvmsg4/getpeername4 may write the address.
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes(e.frontend_addr);
            (*sa).user_port = e.frontend_port.to_be() as u32;
        }
    }
    ALLOW
}
