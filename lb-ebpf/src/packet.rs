//! Header layouts and the parse of Ethernet / IPv4 / TCP-UDP ports.
//! `ptr_at` is the only place packet bounds are checked.

use lb_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPV4_HLEN: usize = 20;

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

/// An IPv4 TCP or UDP packet, parsed.
#[derive(Clone, Copy)]
pub struct Ipv4Flow {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the L4 header (14 + IHL*4; IP options are allowed).
    pub l4_off: u16,
    /// Offset of the L4 checksum field.
    pub l4_csum_off: u16,
    /// IHL was 5: no IP options.
    pub no_ip_options: bool,
    /// TCP flags (`TCP_*`); 0 for UDP and for later fragments.
    pub tcp_flags: u8,
    pub frag: Frag,
    /// IP identification (host order), for fragments.
    pub ip_id: u16,
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
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// The quoted packet: the one that caused the error, as it was sent.
    pub inner_saddr: [u8; 4],
    pub inner_daddr: [u8; 4],
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

pub enum Parsed {
    Flow(Ipv4Flow),
    IcmpError(IcmpError),
    NotIpv4,
    OtherProtocol,
    /// Truncated or inconsistent headers.
    Malformed,
}

const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

#[inline(always)]
pub fn parse<C: PacketBuf>(ctx: &C) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr, C>(ctx, 0) else {
        return Parsed::Malformed;
    };
    // SAFETY: ptr_at checked that the header lies inside the packet.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Parsed::NotIpv4;
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
        return parse_icmp_error(ctx, &ip);
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::OtherProtocol;
    }
    let l4_off = ETH_HLEN + ihl;
    let ip_id = u16::from_be(ip.id);
    if frag & IP_OFFSET_MASK != 0 {
        return Parsed::Flow(Ipv4Flow {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: 0,
            dport: 0,
            proto,
            l4_off: l4_off as u16,
            l4_csum_off: 0,
            no_ip_options: ihl == IPV4_HLEN,
            tcp_flags: 0,
            frag: Frag::Later,
            ip_id,
        });
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
    Parsed::Flow(Ipv4Flow {
        saddr: ip.saddr,
        daddr: ip.daddr,
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
    })
}

/// An ICMP error quoting a TCP/UDP packet we may have translated; any other
/// ICMP is "other protocol" (passed untouched).
#[inline(always)]
fn parse_icmp_error<C: PacketBuf>(ctx: &C, outer: &Ipv4Hdr) -> Parsed {
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
    Parsed::IcmpError(IcmpError {
        saddr: outer.saddr,
        daddr: outer.daddr,
        inner_saddr: inner.saddr,
        inner_daddr: inner.daddr,
        inner_sport: u16::from_be(ports.src),
        inner_dport: u16::from_be(ports.dst),
        inner_proto: proto,
        inner_csum_off,
    })
}
