//! The refusal for a new flow to a frontend with no usable backend: an ICMP
//! port unreachable from the frontend address, like kube-proxy's REJECT
//! (iptables' default `icmp-port-unreachable`). The kernel turns it into
//! ECONNREFUSED for TCP connect() and for a connected UDP socket alike.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use lb_common::{addr, IPPROTO_ICMP, IPPROTO_ICMPV6};

use crate::{
    csum::{fold, sum_bytes},
    packet::{
        ptr_at, EthHdr, Flow, Ipv4Hdr, Ipv6Hdr, PacketBuf, ETH_HLEN, ETH_P_IP, ETH_P_IPV6,
        IPV6_HLEN,
    },
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

/// Frames are built in a per-CPU slot, not on the stack: an IPv6 one is
/// 110 bytes and, with its quote, did not fit the stage's 512 bytes.
#[repr(C)]
pub struct Frames {
    v4: IcmpUnreachFrame,
    v6: Icmp6UnreachFrame,
}

#[btf_map(name = "lb_reject_buf")]
static FRAMES: PerCpuArray<Frames, 1> = PerCpuArray::new();

/// Builds the reply for the packet in `ctx`. `None` when the packet carries
/// IP options (the fixed-size quote would cut them; such packets are dropped).
#[inline(always)]
pub fn build<C: PacketBuf>(ctx: &C, f: &Flow) -> Option<&'static IcmpUnreachFrame> {
    if !f.no_ip_options {
        return None;
    }
    // SAFETY: this CPU's slot, used only during this program run.
    let frame = unsafe { &mut (*FRAMES.get_ptr_mut(0)?).v4 };
    // SAFETY: ptr_at checked bounds; parse() already saw these bytes.
    let eth = unsafe { *ptr_at::<EthHdr, C>(ctx, 0)? };
    frame.quote = unsafe { *ptr_at::<[u8; QUOTE_LEN], C>(ctx, ETH_HLEN)? };
    frame.eth = EthHdr {
        dst: eth.src,
        src: eth.dst,
        ether_type: ETH_P_IP.to_be(),
    };
    frame.ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: (IP_LEN as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: 64,
        protocol: IPPROTO_ICMP,
        check: 0,
        // From the address the client used, so it matches its socket.
        saddr: addr::v4(&f.daddr),
        daddr: addr::v4(&f.saddr),
    };
    frame.icmp_type = ICMP_DEST_UNREACH;
    frame.icmp_code = ICMP_PORT_UNREACH;
    frame.icmp_check = 0;
    frame.unused = [0; 4];
    // SAFETY: IcmpUnreachFrame is repr(C) without padding (asserted size);
    // the views below cover its IP header and its ICMP message.
    unsafe {
        let base = frame as *const IcmpUnreachFrame as *const u8;
        let ip = &*(base.add(ETH_HLEN) as *const [u8; 20]);
        frame.ip.check = !fold(sum_bytes(ip, 0));
        let icmp = &*(base.add(ETH_HLEN + 20) as *const [u8; ICMP_LEN]);
        frame.icmp_check = !fold(sum_bytes(icmp, 0));
    }
    Some(frame)
}

/// IPv6's refusal: ICMPv6 destination unreachable, port unreachable (what
/// ip6tables' REJECT sends by default), quoting the IPv6 header and the
/// first 8 L4 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Icmp6UnreachFrame {
    pub eth: EthHdr,
    pub ip: Ipv6Hdr,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub icmp_check: u16,
    pub unused: [u8; 4],
    pub quote: [u8; QUOTE6_LEN],
}

pub const QUOTE6_LEN: usize = IPV6_HLEN + 8;
pub const FRAME6_LEN: usize = core::mem::size_of::<Icmp6UnreachFrame>();
const ICMP6_LEN: usize = FRAME6_LEN - ETH_HLEN - IPV6_HLEN;
const _: () = assert!(FRAME6_LEN == 110);

const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;

/// `build` for IPv6. `None` when the packet has extension headers (the
/// fixed-size quote would not reach its ports).
#[inline(always)]
pub fn build6<C: PacketBuf>(ctx: &C, f: &Flow) -> Option<&'static Icmp6UnreachFrame> {
    if !f.no_ip_options {
        return None;
    }
    // SAFETY: this CPU's slot, used only during this program run.
    let frame = unsafe { &mut (*FRAMES.get_ptr_mut(0)?).v6 };
    // SAFETY: ptr_at checked bounds; parse() already saw these bytes.
    let eth = unsafe { *ptr_at::<EthHdr, C>(ctx, 0)? };
    frame.quote = unsafe { *ptr_at::<[u8; QUOTE6_LEN], C>(ctx, ETH_HLEN)? };
    frame.eth = EthHdr {
        dst: eth.src,
        src: eth.dst,
        ether_type: ETH_P_IPV6.to_be(),
    };
    frame.ip.vtc_flow = [0x60, 0, 0, 0];
    frame.ip.payload_len = (ICMP6_LEN as u16).to_be();
    frame.ip.nexthdr = IPPROTO_ICMPV6;
    frame.ip.hop_limit = 64;
    // From the address the client used, so it matches its socket.
    frame.ip.saddr = f.daddr.octets;
    frame.ip.daddr = f.saddr.octets;
    frame.icmp_type = ICMPV6_DEST_UNREACH;
    frame.icmp_code = ICMPV6_PORT_UNREACH;
    frame.icmp_check = 0;
    frame.unused = [0; 4];
    // The ICMPv6 checksum covers a pseudo-header: both addresses, the
    // message length and the next header.
    let mut sum = sum_bytes(&f.daddr.octets, 0);
    sum = sum_bytes(&f.saddr.octets, sum);
    // The length and next header are big-endian numbers; `sum_bytes` adds
    // words as they sit in memory, so they go in the same way.
    sum += (ICMP6_LEN as u16).to_be() as u32 + (IPPROTO_ICMPV6 as u16).to_be() as u32;
    // SAFETY: the frame is repr(C) without padding (asserted size); the
    // view covers its ICMPv6 message.
    unsafe {
        let base = frame as *const Icmp6UnreachFrame as *const u8;
        let icmp = &*(base.add(ETH_HLEN + IPV6_HLEN) as *const [u8; ICMP6_LEN]);
        frame.icmp_check = !fold(sum_bytes(icmp, sum));
    }
    Some(frame)
}
