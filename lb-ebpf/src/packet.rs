//! Header layouts and the parse of Ethernet / IPv4 or IPv6 (extension
//! headers walked within a bound) / TCP-UDP ports.
//! `ptr_at` is the only place packet bounds are checked.

use lb_common::{addr::from_v4, Addr, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;

/// Data pointers common to XDP and TC contexts.
pub trait PacketBuf {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length of the whole packet (for TC, GSO payload included).
    fn wire_len(&self) -> u32;
}

impl PacketBuf for aya_ebpf::programs::XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        aya_ebpf::programs::XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        aya_ebpf::programs::XdpContext::data_end(self)
    }
    #[inline(always)]
    fn wire_len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }
}

impl PacketBuf for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        aya_ebpf::programs::TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        aya_ebpf::programs::TcContext::data_end(self)
    }
    #[inline(always)]
    fn wire_len(&self) -> u32 {
        self.len()
    }
}

/// A pointer to a `T` at `offset`, or `None` when the packet is too short.
#[inline(always)]
pub fn ptr_at<T, C: PacketBuf>(ctx: &C, offset: usize) -> Option<*mut T> {
    // Offsets are small; the mask tells the verifier so when the offset is
    // not a constant it knows (a header length, or a value from a map).
    let offset = offset & 0x3ff;
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Big-endian.
    pub ether_type: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version, traffic class, flow label.
    pub vtc_flow: [u8; 4],
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// IPv6 header offsets from the start of the IP header.
pub const IP6_HOP_LIMIT_OFF: usize = 7;
pub const IP6_SADDR_OFF: usize = 8;
pub const IP6_DADDR_OFF: usize = 24;

/// The first four bytes of TCP and UDP: the ports, big-endian.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct L4Ports {
    pub src: u16,
    pub dst: u16,
}

/// Offset of the checksum field from the start of the L4 header.
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;
/// IPv4 header checksum offset from the start of the IP header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_TTL_OFF: usize = 8;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;

/// A TCP or UDP packet, parsed.
#[derive(Clone, Copy)]
pub struct Flow {
    /// IPv6 (else IPv4): which header the rewrites patch.
    pub v6: bool,
    pub saddr: Addr,
    pub daddr: Addr,
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the L4 header (14 + IHL*4; IP options are allowed).
    pub l4_off: u16,
    /// Offset of the L4 checksum field.
    pub l4_csum_off: u16,
    /// IPv4: IHL was 5, no IP options. IPv6: no extension headers.
    pub no_ip_options: bool,
    /// TCP flags (`TCP_*`); 0 for UDP and for later fragments.
    pub tcp_flags: u8,
    pub frag: Frag,
    /// IP identification (host order), for fragments.
    pub ip_id: u32,
}

/// Where a packet sits in a fragmented datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented.
    Whole,
    /// Offset 0, more to come: carries the L4 header.
    First,
    /// Offset > 0: no L4 header; `sport`/`dport` are 0 until the first
    /// fragment's are looked up.
    Later,
}

/// An ICMP error (destination unreachable, time exceeded) quoting a TCP or
/// UDP packet. Both IP headers are option-free, so every offset is fixed:
/// outer IP at 14, ICMP at 34, quoted IP at 42, quoted ports at 62.
#[derive(Clone, Copy)]
pub struct IcmpError {
    /// ICMPv6 (else ICMP): which layout the rewrite patches.
    pub v6: bool,
    pub saddr: Addr,
    pub daddr: Addr,
    /// The quoted packet: the one that caused the error, as it was sent.
    pub inner_saddr: Addr,
    pub inner_daddr: Addr,
    /// Host byte order.
    pub inner_sport: u16,
    pub inner_dport: u16,
    pub inner_proto: u8,
    /// Offset of the quoted L4 checksum when the quote includes it (always
    /// for UDP, for TCP when at least 20 bytes are quoted).
    pub inner_csum_off: Option<usize>,
}

pub const ICMP_OFF: usize = ETH_HLEN + IPV4_HLEN;
pub const ICMP_CSUM_OFF: usize = ICMP_OFF + 2;
pub const INNER_IP_OFF: usize = ICMP_OFF + 8;
pub const INNER_L4_OFF: usize = INNER_IP_OFF + IPV4_HLEN;
/// Bytes an ICMP error must have for us to read it: up to the quoted ports
/// and the UDP checksum.
pub const ICMP_ERROR_MIN: usize = INNER_L4_OFF + 8;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// What `parse` found; the flow or ICMP error itself is written to its
/// out-parameter (a per-CPU slot: with IPv6 headers, returning them by
/// value no longer fits the stack).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Flow,
    IcmpError,
    /// Neither IPv4 nor IPv6.
    NotIp,
    OtherProtocol,
    /// Truncated or inconsistent headers.
    Malformed,
}

const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

#[inline(always)]
pub fn parse<C: PacketBuf>(ctx: &C, flow: &mut Flow, icmp: &mut IcmpError) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr, C>(ctx, 0) else {
        return Parsed::Malformed;
    };
    // SAFETY: ptr_at checked that the header lies inside the packet.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type == ETH_P_IPV6 {
        return parse_v6(ctx, flow, icmp);
    }
    if ether_type != ETH_P_IP {
        return Parsed::NotIp;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr, C>(ctx, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    // SAFETY: as above.
    let ip = unsafe { *ip };
    if ip.version_ihl >> 4 != 4 {
        return Parsed::Malformed;
    }
    let ihl = (ip.version_ihl & 0x0f) as usize * 4;
    let tot_len = u16::from_be(ip.tot_len);
    if ihl < IPV4_HLEN || (tot_len as usize) < ihl {
        return Parsed::Malformed;
    }
    let proto = ip.protocol;
    let frag = u16::from_be(ip.frag_off);
    if proto == IPPROTO_ICMP && frag & (IP_MF | IP_OFFSET_MASK) == 0 && ihl == IPV4_HLEN {
        return parse_icmp_error(ctx, &ip, icmp);
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::OtherProtocol;
    }
    let l4_off = ETH_HLEN + ihl;
    let ip_id = u16::from_be(ip.id) as u32;
    if frag & IP_OFFSET_MASK != 0 {
        return {
        *flow = Flow {
            v6: false,
            saddr: from_v4(ip.saddr),
            daddr: from_v4(ip.daddr),
            sport: 0,
            dport: 0,
            proto,
            l4_off: l4_off as u16,
            l4_csum_off: 0,
            no_ip_options: ihl == IPV4_HLEN,
            tcp_flags: 0,
            frag: Frag::Later,
            ip_id,
        };
        Parsed::Flow
    };
    }
    let (min_l4, csum_off) = if proto == IPPROTO_TCP {
        (20, TCP_CSUM_OFF)
    } else {
        (8, UDP_CSUM_OFF)
    };
    if (tot_len as usize) < ihl + min_l4 {
        return Parsed::Malformed;
    }
    // The whole fixed L4 header must be present, checksum field included.
    let Some(ports) = ptr_at::<L4Ports, C>(ctx, l4_off) else {
        return Parsed::Malformed;
    };
    if ptr_at::<u16, C>(ctx, l4_off + csum_off).is_none() {
        return Parsed::Malformed;
    }
    let mut tcp_flags = 0;
    if proto == IPPROTO_TCP {
        let Some(tcp) = ptr_at::<[u8; 20], C>(ctx, l4_off) else {
            return Parsed::Malformed;
        };
        // SAFETY: ptr_at checked bounds.
        tcp_flags = unsafe { (*tcp)[13] };
    }
    // SAFETY: ptr_at checked bounds.
    let ports = unsafe { *ports };
    {
        *flow = Flow {
        v6: false,
        saddr: from_v4(ip.saddr),
        daddr: from_v4(ip.daddr),
        sport: u16::from_be(ports.src),
        dport: u16::from_be(ports.dst),
        proto,
        l4_off: l4_off as u16,
        l4_csum_off: (l4_off + csum_off) as u16,
        no_ip_options: ihl == IPV4_HLEN,
        tcp_flags,
        frag: if frag & IP_MF != 0 {
            Frag::First
        } else {
            Frag::Whole
        },
        ip_id,
    };
        Parsed::Flow
    }
}

/// An ICMP error quoting a TCP/UDP packet we may have translated; any other
/// ICMP is "other protocol" (passed untouched).
#[inline(always)]
fn parse_icmp_error<C: PacketBuf>(ctx: &C, outer: &Ipv4Hdr, icmp: &mut IcmpError) -> Parsed {
    let Some(head) = ptr_at::<[u8; 2], C>(ctx, ICMP_OFF) else {
        return Parsed::Malformed;
    };
    // SAFETY: ptr_at checked bounds.
    let icmp_type = unsafe { (*head)[0] };
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return Parsed::OtherProtocol;
    }
    let (Some(inner), Some(ports)) = (
        ptr_at::<Ipv4Hdr, C>(ctx, INNER_IP_OFF),
        ptr_at::<L4Ports, C>(ctx, INNER_L4_OFF),
    ) else {
        return Parsed::OtherProtocol;
    };
    if ptr_at::<[u8; 8], C>(ctx, INNER_L4_OFF).is_none() {
        return Parsed::OtherProtocol;
    }
    // SAFETY: ptr_at checked bounds.
    let (inner, ports) = unsafe { (*inner, *ports) };
    let proto = inner.protocol;
    // Only option-free quotes of first fragments carry ports where we look.
    if inner.version_ihl != 0x45
        || (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        || u16::from_be(inner.frag_off) & IP_OFFSET_MASK != 0
    {
        return Parsed::OtherProtocol;
    }
    let inner_csum_off = if proto == IPPROTO_UDP {
        Some(INNER_L4_OFF + UDP_CSUM_OFF)
    } else if ptr_at::<u16, C>(ctx, INNER_L4_OFF + TCP_CSUM_OFF).is_some() {
        Some(INNER_L4_OFF + TCP_CSUM_OFF)
    } else {
        None
    };
    {
        *icmp = IcmpError {
        saddr: from_v4(outer.saddr),
        daddr: from_v4(outer.daddr),
        inner_saddr: from_v4(inner.saddr),
        inner_daddr: from_v4(inner.daddr),
        v6: false,
        inner_sport: u16::from_be(ports.src),
        inner_dport: u16::from_be(ports.dst),
        inner_proto: proto,
        inner_csum_off,
    };
        Parsed::IcmpError
    }
}

/// Extension headers walked before giving up on a packet (passed as
/// "other protocol"): Cilium walks 4 as well (`IPV6_MAX_HEADERS`).
const IPV6_MAX_EXT: usize = 4;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

/// ICMPv6 errors that quote a packet: destination unreachable, packet too
/// big (path MTU: IPv6 routers never fragment), time exceeded.
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;

/// ICMPv6 offsets when the outer packet has no extension headers, and the
/// quote's when the quoted packet has none either.
pub const ICMP6_OFF: usize = ETH_HLEN + IPV6_HLEN;
pub const ICMP6_CSUM_OFF: usize = ICMP6_OFF + 2;
pub const INNER6_IP_OFF: usize = ICMP6_OFF + 8;
pub const INNER6_L4_OFF: usize = INNER6_IP_OFF + IPV6_HLEN;
pub const ICMP6_ERROR_MIN: usize = INNER6_L4_OFF + 8;

/// An IPv6 packet: extension headers walked (at most `IPV6_MAX_EXT`), a
/// fragment header read like IPv4's flags and offset.
#[inline(always)]
fn parse_v6<C: PacketBuf>(ctx: &C, flow: &mut Flow, icmp: &mut IcmpError) -> Parsed {
    let Some(ip) = ptr_at::<Ipv6Hdr, C>(ctx, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    // SAFETY: ptr_at checked that the header lies inside the packet; the
    // fields are read in place (a copy of the header costs 40 bytes of
    // stack).
    let (version, payload_len, nexthdr) =
        unsafe { ((*ip).vtc_flow[0] >> 4, (*ip).payload_len, (*ip).nexthdr) };
    if version != 6 {
        return Parsed::Malformed;
    }
    let end = ETH_HLEN + IPV6_HLEN + u16::from_be(payload_len) as usize;
    let mut next = nexthdr;
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut frag = Frag::Whole;
    let mut ip_id = 0u32;
    let mut i = 0;
    while i < IPV6_MAX_EXT {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let Some(h) = ptr_at::<[u8; 2], C>(ctx, off) else {
                    return Parsed::Malformed;
                };
                // SAFETY: ptr_at checked bounds.
                let h = unsafe { *h };
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let Some(h) = ptr_at::<[u8; 8], C>(ctx, off) else {
                    return Parsed::Malformed;
                };
                // SAFETY: ptr_at checked bounds.
                let h = unsafe { *h };
                next = h[0];
                let offset_flags = u16::from_be_bytes([h[2], h[3]]);
                ip_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                frag = if offset_flags & 0xfff8 != 0 {
                    Frag::Later
                } else if offset_flags & 1 != 0 {
                    Frag::First
                } else {
                    // An atomic fragment (offset 0, no more): whole.
                    Frag::Whole
                };
                off += 8;
            }
            _ => break,
        }
        i += 1;
    }
    // SAFETY: ptr_at checked the header.
    let (s0, d0) = unsafe { (&(*ip).saddr, &(*ip).daddr) };
    if mapped_v4(s0) || mapped_v4(d0) {
        // IPv4-mapped addresses never travel in IPv6 headers (RFC 4291
        // 2.5.5.2); in the maps they stand for IPv4, so such a packet must
        // never meet an IPv4 frontend or flow. Untouched: the stack drops it.
        return Parsed::Malformed;
    }
    let plain = off == ETH_HLEN + IPV6_HLEN;
    if next == IPPROTO_ICMPV6 && plain {
        return parse_icmp6_error(ctx, icmp);
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return Parsed::OtherProtocol;
    }
    if end < off {
        return Parsed::Malformed;
    }
    // SAFETY: as above.
    let (saddr, daddr) = unsafe {
        (
            Addr {
                octets: (*ip).saddr,
            },
            Addr {
                octets: (*ip).daddr,
            },
        )
    };
    if frag == Frag::Later {
        return {
        *flow = Flow {
            v6: true,
            saddr,
            daddr,
            sport: 0,
            dport: 0,
            proto: next,
            l4_off: off as u16,
            l4_csum_off: 0,
            no_ip_options: plain,
            tcp_flags: 0,
            frag,
            ip_id,
        };
        Parsed::Flow
    };
    }
    let (min_l4, csum_off) = if next == IPPROTO_TCP {
        (20, TCP_CSUM_OFF)
    } else {
        (8, UDP_CSUM_OFF)
    };
    if end < off + min_l4 {
        return Parsed::Malformed;
    }
    let Some(ports) = ptr_at::<L4Ports, C>(ctx, off) else {
        return Parsed::Malformed;
    };
    if ptr_at::<u16, C>(ctx, off + csum_off).is_none() {
        return Parsed::Malformed;
    }
    let mut tcp_flags = 0;
    if next == IPPROTO_TCP {
        let Some(tcp) = ptr_at::<[u8; 20], C>(ctx, off) else {
            return Parsed::Malformed;
        };
        // SAFETY: ptr_at checked bounds.
        tcp_flags = unsafe { (*tcp)[13] };
    }
    // SAFETY: ptr_at checked bounds.
    let ports = unsafe { *ports };
    {
        *flow = Flow {
        v6: true,
        saddr,
        daddr,
        sport: u16::from_be(ports.src),
        dport: u16::from_be(ports.dst),
        proto: next,
        l4_off: off as u16,
        l4_csum_off: (off + csum_off) as u16,
        no_ip_options: plain,
        tcp_flags,
        frag,
        ip_id,
    };
        Parsed::Flow
    }
}

/// Whether 16 wire bytes are an IPv4-mapped address.
#[inline(always)]
fn mapped_v4(a: &[u8; 16]) -> bool {
    a[..10] == [0; 10] && a[10] == 0xff && a[11] == 0xff
}

/// An ICMPv6 error quoting a TCP or UDP packet (neither packet with
/// extension headers); any other ICMPv6 (neighbour discovery, echo) is
/// "other protocol", passed untouched.
#[inline(always)]
fn parse_icmp6_error<C: PacketBuf>(ctx: &C, icmp: &mut IcmpError) -> Parsed {
    let Some(head) = ptr_at::<[u8; 2], C>(ctx, ICMP6_OFF) else {
        return Parsed::Malformed;
    };
    // SAFETY: ptr_at checked bounds.
    let icmp_type = unsafe { (*head)[0] };
    if icmp_type != ICMPV6_DEST_UNREACH
        && icmp_type != ICMPV6_PKT_TOOBIG
        && icmp_type != ICMPV6_TIME_EXCEED
    {
        return Parsed::OtherProtocol;
    }
    let (Some(inner), Some(ports)) = (
        ptr_at::<Ipv6Hdr, C>(ctx, INNER6_IP_OFF),
        ptr_at::<L4Ports, C>(ctx, INNER6_L4_OFF),
    ) else {
        return Parsed::OtherProtocol;
    };
    if ptr_at::<[u8; 8], C>(ctx, INNER6_L4_OFF).is_none() {
        return Parsed::OtherProtocol;
    }
    // SAFETY: ptr_at checked bounds.
    let (proto, ports) = unsafe { ((*inner).nexthdr, *ports) };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::OtherProtocol;
    }
    let Some(outer) = ptr_at::<Ipv6Hdr, C>(ctx, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    let inner_csum_off = if proto == IPPROTO_UDP {
        Some(INNER6_L4_OFF + UDP_CSUM_OFF)
    } else if ptr_at::<u16, C>(ctx, INNER6_L4_OFF + TCP_CSUM_OFF).is_some() {
        Some(INNER6_L4_OFF + TCP_CSUM_OFF)
    } else {
        None
    };
    {
        *icmp = IcmpError {
        v6: true,
        // SAFETY: ptr_at checked both headers.
        saddr: Addr {
            octets: unsafe { (*outer).saddr },
        },
        daddr: Addr {
            octets: unsafe { (*outer).daddr },
        },
        inner_saddr: Addr {
            octets: unsafe { (*inner).saddr },
        },
        inner_daddr: Addr {
            octets: unsafe { (*inner).daddr },
        },
        inner_sport: u16::from_be(ports.src),
        inner_dport: u16::from_be(ports.dst),
        inner_proto: proto,
        inner_csum_off,
    };
        Parsed::IcmpError
    }
}
