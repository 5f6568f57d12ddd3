//! Header layouts and the parse of Ethernet / IPv4 / TCP-UDP ports.
//! `ptr_at` is the only place packet bounds are checked.

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

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
    pub l4_off: usize,
    /// Offset of the L4 checksum field.
    pub l4_csum_off: usize,
    /// IP total length (host byte order), for byte counters and the FIB.
    pub tot_len: u16,
    /// IHL was 5: no IP options.
    pub no_ip_options: bool,
}

pub enum Parsed {
    Flow(Ipv4Flow),
    NotIpv4,
    OtherProtocol,
    Fragment,
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
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::OtherProtocol;
    }
    let frag = u16::from_be(ip.frag_off);
    if frag & (IP_MF | IP_OFFSET_MASK) != 0 {
        return Parsed::Fragment;
    }
    let l4_off = ETH_HLEN + ihl;
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
    if proto == IPPROTO_TCP && ptr_at::<[u8; 20], C>(ctx, l4_off).is_none() {
        return Parsed::Malformed;
    }
    // SAFETY: ptr_at checked bounds.
    let ports = unsafe { *ports };
    Parsed::Flow(Ipv4Flow {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: u16::from_be(ports.src),
        dport: u16::from_be(ports.dst),
        proto,
        l4_off,
        l4_csum_off: l4_off + csum_off,
        tot_len,
        no_ip_options: ihl == IPV4_HLEN,
    })
}
