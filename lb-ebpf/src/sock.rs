//! Socket-level translation ("socket LB"): cgroup/connect4 and
//! cgroup/sendmsg4 (connect6, sendmsg6) replace a frontend address by a
//! backend before any packet exists, and cgroup/recvmsg4 and
//! cgroup/getpeername4 (recvmsg6, getpeername6) show the frontend again to
//! the application. An IPv6 socket's IPv4-mapped destination is an IPv4
//! frontend, and is translated to an IPv4-mapped backend. They act on every socket of the hooked cgroup,
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

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    addr::{self, from_v4, from_words, Addr},
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

/// The destination (recvmsg, getpeername: the peer) a hook sees.
#[inline(always)]
fn user_addr(sa: *mut bpf_sock_addr, v6: bool) -> Addr {
    // SAFETY: sa is the program's context; these fields are readable in
    // the hooks of their family.
    unsafe {
        if v6 {
            // One 4-byte load per word: the verifier refuses any other
            // access to the context (a copy of the array is a memcpy).
            let ip6 = &raw const (*sa).user_ip6;
            from_words([
                read_volatile(&raw const (*ip6)[0]),
                read_volatile(&raw const (*ip6)[1]),
                read_volatile(&raw const (*ip6)[2]),
                read_volatile(&raw const (*ip6)[3]),
            ])
        } else {
            from_v4((*sa).user_ip4.to_ne_bytes())
        }
    }
}

/// Writes `a:port` as the hook's address. (The caller checked `a` can be
/// written in this family: an IPv4 hook takes only IPv4 addresses.)
#[inline(always)]
fn set_user_addr(sa: *mut bpf_sock_addr, v6: bool, a: &Addr, port: u16) {
    // SAFETY: these hooks may write the address.
    unsafe {
        if v6 {
            // One 4-byte store per word (see `user_addr`).
            let w = addr::words(a);
            let ip6 = &raw mut (*sa).user_ip6;
            write_volatile(&raw mut (*ip6)[0], w[0]);
            write_volatile(&raw mut (*ip6)[1], w[1]);
            write_volatile(&raw mut (*ip6)[2], w[2]);
            write_volatile(&raw mut (*ip6)[3], w[3]);
        } else {
            (*sa).user_ip4 = u32::from_ne_bytes(addr::v4(a));
        }
        (*sa).user_port = port.to_be() as u32;
    }
}

/// connect and sendmsg: translate a frontend destination to a backend.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let Some(cfg) = config() else {
        return ALLOW;
    };
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
    let (port, proto) = unsafe { ((*sa).user_port, (*sa).protocol) };
    let proto = proto as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let fkey = FrontendKey {
        addr: user_addr(sa, v6),
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
        let node = cfg.snat_addr_for(&fkey.addr);
        let hash = if svc.flags & SERVICE_F_AFFINITY != 0 {
            flow_hash(&node, 0, fkey.port, proto)
        } else {
            fmix64(cookie)
        };
        choose(&node, hash, &svc, now)
    };
    // (A frontend's backends are of its family: the agent writes no other.)
    let choice = choice.filter(|c| addr::is_v4(&c.backend.addr) == addr::is_v4(&fkey.addr));
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
        _pad: [0; 6],
    };
    let entry = SockReverseEntry {
        frontend_addr: fkey.addr,
        frontend_port: fkey.port,
        _pad: 0,
    };
    let _ = SOCK_REVERSE.insert(key, entry, BPF_ANY as u64);
    set_user_addr(sa, v6, &b.addr, b.port);
    count(Verdict::SockTranslated, 0);
    ALLOW
}

/// recvmsg and getpeername: show the frontend instead of the backend.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: helper on our own context; fields readable in these hooks.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let port = unsafe { (*sa).user_port };
    let key = SockReverseKey {
        cookie,
        backend_addr: user_addr(sa, v6),
        backend_port: u16::from_be(port as u16),
        _pad: [0; 6],
    };
    // SAFETY: copied out at once.
    if let Some(e) = unsafe { SOCK_REVERSE.get(key) }.copied() {
        set_user_addr(sa, v6, &e.frontend_addr, e.frontend_port);
    }
    ALLOW
}
