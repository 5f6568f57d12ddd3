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
mod maps;
mod packet;
mod pipeline;
mod reject;
mod select;
mod stats;
mod tc;
mod xdp;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// TC ingress: pod veths and any interface whose packets may carry
/// CHECKSUM_PARTIAL.
#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    tc::run(&ctx)
}

/// XDP: NICs that deliver complete checksums.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    xdp::run(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
