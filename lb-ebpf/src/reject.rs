//! The refusal for a new flow to a frontend with no usable backend: an ICMP
//! port unreachable from the frontend address, like kube-proxy's REJECT
//! (iptables' default `icmp-port-unreachable`). The kernel turns it into
//! ECONNREFUSED for TCP connect() and for a connected UDP socket alike.

use lb_common::IPPROTO_ICMP;

use crate::{
    csum::{fold, sum_bytes},
    packet::{ptr_at, EthHdr, Ipv4Flow, Ipv4Hdr, PacketBuf, ETH_HLEN, ETH_P_IP},
};

/// Quoted part of the offending packet: its IP header and first 8 L4 bytes
/// (RFC 792's minimum; enough for the sender to match its socket).
pub const QUOTE_LEN: usize = 28;

/// The whole reply frame, built on the stack and copied into the packet.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpUnreachFrame {
    pub eth: EthHdr,
    pub ip: Ipv4Hdr,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub icmp_check: u16,
    pub unused: [u8; 4],
    pub quote: [u8; QUOTE_LEN],
}

pub const FRAME_LEN: usize = core::mem::size_of::<IcmpUnreachFrame>();
const IP_LEN: usize = FRAME_LEN - ETH_HLEN;
const ICMP_LEN: usize = IP_LEN - 20;
const _: () = assert!(FRAME_LEN == 70);

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

/// Builds the reply for the packet in `ctx`. `None` when the packet carries
/// IP options (the fixed-size quote would cut them; such packets are dropped).
#[inline(always)]
pub fn build<C: PacketBuf>(ctx: &C, f: &Ipv4Flow) -> Option<IcmpUnreachFrame> {
    if !f.no_ip_options {
        return None;
    }
    // SAFETY: ptr_at checked bounds; parse() already saw these bytes.
    let eth = unsafe { *ptr_at::<EthHdr, C>(ctx, 0)? };
    let quote = unsafe { *ptr_at::<[u8; QUOTE_LEN], C>(ctx, ETH_HLEN)? };
    let mut frame = IcmpUnreachFrame {
        eth: EthHdr {
            dst: eth.src,
            src: eth.dst,
            ether_type: ETH_P_IP.to_be(),
        },
        ip: Ipv4Hdr {
            version_ihl: 0x45,
            tos: 0,
            tot_len: (IP_LEN as u16).to_be(),
            id: 0,
            frag_off: 0,
            ttl: 64,
            protocol: IPPROTO_ICMP,
            check: 0,
            // From the address the client used, so it matches its socket.
            saddr: f.daddr,
            daddr: f.saddr,
        },
        icmp_type: ICMP_DEST_UNREACH,
        icmp_code: ICMP_PORT_UNREACH,
        icmp_check: 0,
        unused: [0; 4],
        quote,
    };
    // SAFETY: IcmpUnreachFrame is repr(C) without padding (asserted size);
    // the views below cover its IP header and its ICMP message.
    unsafe {
        let base = &raw const frame as *const u8;
        let ip = &*(base.add(ETH_HLEN) as *const [u8; 20]);
        frame.ip.check = !fold(sum_bytes(ip, 0));
        let icmp = &*(base.add(ETH_HLEN + 20) as *const [u8; ICMP_LEN]);
        frame.icmp_check = !fold(sum_bytes(icmp, 0));
    }
    Some(frame)
}
