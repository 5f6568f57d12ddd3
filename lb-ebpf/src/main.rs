//! lb datapath entry points. Everything else lives in one module a concern:
//! `packet` (parse), `pipeline` (frontend lookup and the decision),
//! `conntrack`, `select` (affinity and Maglev), `tc` / `xdp` (applying the
//! decision), `reject` (ICMP), `csum`, `stats`, `maps`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conntrack;
mod csum;
mod icmp;
mod maps;
mod packet;
mod pipeline;
mod policy;
mod reject;
mod select;
mod sock;
mod stats;
mod tc;
mod xdp;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use pipeline::Direction;

/// TC ingress: pod veths and any interface whose packets may carry
/// CHECKSUM_PARTIAL.
#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    tc::run(&ctx, Direction::Ingress)
}

/// TC egress: replies the node's own stack sends (a backend in the node's
/// network namespace) leave through here untranslated otherwise.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    tc::run(&ctx, Direction::Egress)
}

/// XDP: NICs that deliver complete checksums.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    xdp::run(&ctx)
}

/// The node's own sockets: translated at connect() (see `sock`).
#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, false)
}

/// Unconnected UDP sends of the node's own sockets.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, false)
}

/// UDP datagrams from a backend appear to come from the frontend.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, false)
}

/// getpeername() of a translated socket shows the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_peer4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, false)
}

/// The same four for IPv6 sockets (IPv4-mapped destinations included).
#[cgroup_sock_addr(connect6)]
pub fn lb_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, true)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_sock_peer6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, true)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
