//! Frames for BPF_PROG_TEST_RUN fixtures and benchmarks, and an independent
//! checker: checksums here are computed from scratch over the whole
//! header/segment (RFC 1071), never incrementally like the datapath does.

use std::net::Ipv4Addr;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Debug)]
pub struct Spec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ttl: u8,
    pub tcp_flags: u8,
    /// IP options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// The IPv4 flags+fragment-offset field.
    pub frag: u16,
    /// The IPv4 identification.
    pub ip_id: u16,
    pub payload: Vec<u8>,
    /// Leave the UDP checksum 0 ("none").
    pub udp_no_checksum: bool,
}

impl Spec {
    pub fn tcp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16) -> Spec {
        Spec {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            saddr,
            daddr,
            sport,
            dport,
            proto: TCP,
            ttl: 64,
            tcp_flags: TCP_SYN,
            ip_options: Vec::new(),
            frag: 0x4000, // DF
            ip_id: 0x1234,
            payload: Vec::new(),
            udp_no_checksum: false,
        }
    }

    pub fn udp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16) -> Spec {
        Spec {
            proto: UDP,
            tcp_flags: 0,
            payload: b"hello".to_vec(),
            ..Spec::tcp(saddr, sport, daddr, dport)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let ihl = 20 + self.ip_options.len();
        let l4_len = if self.proto == TCP { 20 } else { 8 } + self.payload.len();
        let mut p = Vec::with_capacity(14 + ihl + l4_len);
        p.extend_from_slice(&self.dst_mac);
        p.extend_from_slice(&self.src_mac);
        p.extend_from_slice(&0x0800u16.to_be_bytes());
        let ip_start = p.len();
        p.push(0x40 | (ihl / 4) as u8);
        p.push(0);
        p.extend_from_slice(&((ihl + l4_len) as u16).to_be_bytes());
        p.extend_from_slice(&self.ip_id.to_be_bytes());
        p.extend_from_slice(&self.frag.to_be_bytes());
        p.push(self.ttl);
        p.push(self.proto);
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&self.saddr.octets());
        p.extend_from_slice(&self.daddr.octets());
        p.extend_from_slice(&self.ip_options);
        let c = checksum(&p[ip_start..ip_start + ihl]);
        p[ip_start + 10..ip_start + 12].copy_from_slice(&c.to_be_bytes());
        let l4 = p.len();
        push_l4(
            &mut p,
            self.sport,
            self.dport,
            self.proto,
            self.tcp_flags,
            &self.payload,
        );
        if !(self.proto == UDP && self.udp_no_checksum) {
            let c = l4_checksum(&p[ip_start..]);
            let off = l4 + if self.proto == TCP { 16 } else { 6 };
            let c = if self.proto == UDP && c == 0 {
                0xffff
            } else {
                c
            };
            p[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
        p
    }
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// The frame `spec` builds, cut into IP fragments carrying at most `chunk`
/// bytes of the IP payload each (a multiple of 8), as a router would:
/// the same identification, MF on all but the last, offsets in 8-byte
/// units, the header checksum computed from scratch.
pub fn fragments(spec: &Spec, chunk: usize) -> Vec<Vec<u8>> {
    assert!(chunk % 8 == 0 && spec.ip_options.is_empty());
    let whole = Spec {
        frag: 0,
        ..spec.clone()
    }
    .build();
    let (eth, ip) = whole.split_at(14);
    let payload = &ip[20..];
    let mut out = Vec::new();
    for (i, piece) in payload.chunks(chunk).enumerate() {
        let last = (i + 1) * chunk >= payload.len();
        let mut f = eth.to_vec();
        let mut hdr = ip[..20].to_vec();
        hdr[2..4].copy_from_slice(&((20 + piece.len()) as u16).to_be_bytes());
        let off = ((i * chunk / 8) as u16) | if last { 0 } else { 0x2000 };
        hdr[6..8].copy_from_slice(&off.to_be_bytes());
        hdr[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&hdr);
        f.extend_from_slice(piece);
        out.push(f);
    }
    out
}

/// An ICMP error frame: `saddr` -> `daddr`, type/code, the 4 bytes after
/// the checksum (e.g. the next-hop MTU), quoting `quote` (an IP packet,
/// possibly cut). Checksums computed from scratch.
#[allow(clippy::too_many_arguments)]
pub fn icmp_error_frame(
    macs: ([u8; 6], [u8; 6]),
    saddr: Ipv4Addr,
    daddr: Ipv4Addr,
    ttl: u8,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    quote: &[u8],
) -> Vec<u8> {
    let (dst_mac, src_mac) = macs;
    let mut p = Vec::new();
    p.extend_from_slice(&dst_mac);
    p.extend_from_slice(&src_mac);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip = p.len();
    let tot = (20 + 8 + quote.len()) as u16;
    p.extend_from_slice(&[0x45, 0xc0]);
    p.extend_from_slice(&tot.to_be_bytes());
    p.extend_from_slice(&[0, 7, 0, 0, ttl, 1, 0, 0]);
    p.extend_from_slice(&saddr.octets());
    p.extend_from_slice(&daddr.octets());
    let c = checksum(&p[ip..ip + 20]);
    p[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    let icmp = p.len();
    p.extend_from_slice(&[icmp_type, code, 0, 0]);
    p.extend_from_slice(&rest);
    p.extend_from_slice(quote);
    let c = checksum(&p[icmp..]);
    p[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    p
}

/// RFC 1071 checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data, 0))
}

fn sum(data: &[u8], mut acc: u64) -> u64 {
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            (chunk[0] as u16) << 8
        };
        acc += word as u64;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The L4 checksum of the IPv4 packet `ip` (starting at the IP header),
/// computed with the checksum field zeroed.
fn l4_checksum(ip: &[u8]) -> u16 {
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let proto = ip[9];
    let seg = &ip[ihl..tot];
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.push(0);
    pseudo.push(proto);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    let mut seg = seg.to_vec();
    let off = match proto {
        TCP => 16,
        UDP => 6,
        _ => 2, // ICMP: checksum over the message only
    };
    seg[off] = 0;
    seg[off + 1] = 0;
    if proto == 1 {
        return !fold(sum(&seg, 0));
    }
    !fold(sum(&seg, sum(&pseudo, 0)))
}

/// A frame, decoded, with its checksums checked from scratch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub proto: u8,
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    pub ip_checksum_ok: bool,
    pub l4_checksum_ok: bool,
    pub l4_checksum: u16,
}

pub fn decode(frame: &[u8]) -> Decoded {
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let proto = ip[9];
    let l4 = &ip[ihl..];
    let csum_off = match proto {
        TCP => 16,
        UDP => 6,
        _ => 2,
    };
    let stored = u16::from_be_bytes([l4[csum_off], l4[csum_off + 1]]);
    let l4_ok = if proto == UDP && stored == 0 {
        true
    } else {
        let c = l4_checksum(ip);
        stored == c || (proto == UDP && c == 0 && stored == 0xffff)
    };
    Decoded {
        dst_mac: frame[0..6].try_into().unwrap(),
        src_mac: frame[6..12].try_into().unwrap(),
        saddr: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        daddr: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        proto,
        ttl: ip[8],
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        ip_checksum_ok: checksum(&ip[..ihl]) == 0,
        l4_checksum_ok: l4_ok,
        l4_checksum: stored,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_have_valid_checksums() {
        for spec in [
            Spec::tcp(
                Ipv4Addr::new(198, 18, 0, 1),
                40000,
                Ipv4Addr::new(198, 19, 0, 10),
                80,
            ),
            Spec::udp(
                Ipv4Addr::new(198, 18, 0, 1),
                40000,
                Ipv4Addr::new(198, 19, 0, 10),
                53,
            ),
        ] {
            let d = decode(&spec.build());
            assert!(d.ip_checksum_ok && d.l4_checksum_ok, "{d:?}");
        }
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let mut f = Spec::tcp(
            Ipv4Addr::new(198, 18, 0, 1),
            40000,
            Ipv4Addr::new(198, 19, 0, 10),
            80,
        )
        .build();
        f[14 + 16] ^= 1; // daddr
        let d = decode(&f);
        assert!(!d.ip_checksum_ok && !d.l4_checksum_ok);
    }
}

/// An IPv6 TCP or UDP frame, built from scratch like `Spec::build` (the
/// L4 checksum over the IPv6 pseudo-header, computed whole).
#[derive(Clone, Debug)]
pub struct Spec6 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub saddr: std::net::Ipv6Addr,
    pub daddr: std::net::Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub hop_limit: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
}

impl Spec6 {
    pub fn tcp(
        saddr: std::net::Ipv6Addr,
        sport: u16,
        daddr: std::net::Ipv6Addr,
        dport: u16,
    ) -> Spec6 {
        Spec6 {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            saddr,
            daddr,
            sport,
            dport,
            proto: TCP,
            hop_limit: 64,
            tcp_flags: TCP_SYN,
            payload: Vec::new(),
        }
    }

    pub fn udp(
        saddr: std::net::Ipv6Addr,
        sport: u16,
        daddr: std::net::Ipv6Addr,
        dport: u16,
    ) -> Spec6 {
        Spec6 {
            proto: UDP,
            tcp_flags: 0,
            payload: b"hello".to_vec(),
            ..Spec6::tcp(saddr, sport, daddr, dport)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let l4_len = if self.proto == TCP { 20 } else { 8 } + self.payload.len();
        let mut p = Vec::with_capacity(14 + 40 + l4_len);
        p.extend_from_slice(&self.dst_mac);
        p.extend_from_slice(&self.src_mac);
        p.extend_from_slice(&0x86ddu16.to_be_bytes());
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&(l4_len as u16).to_be_bytes());
        p.push(self.proto);
        p.push(self.hop_limit);
        p.extend_from_slice(&self.saddr.octets());
        p.extend_from_slice(&self.daddr.octets());
        let l4 = p.len();
        push_l4(
            &mut p,
            self.sport,
            self.dport,
            self.proto,
            self.tcp_flags,
            &self.payload,
        );
        let c = l4_checksum6(&p[14..]);
        let c = if self.proto == UDP && c == 0 {
            0xffff
        } else {
            c
        };
        let off = l4 + if self.proto == TCP { 16 } else { 6 };
        p[off..off + 2].copy_from_slice(&c.to_be_bytes());
        p
    }
}

/// The frame `spec` builds, cut into IPv6 fragments carrying at most
/// `chunk` bytes (a multiple of 8) of the fragmentable part each, as the
/// sending host does (RFC 8200 4.5): a fragment header (next header 44)
/// with `id`, the offset in 8-byte units and M on all but the last; the
/// L4 checksum is the whole datagram's.
pub fn fragments6(spec: &Spec6, chunk: usize, id: u32) -> Vec<Vec<u8>> {
    assert!(chunk % 8 == 0);
    let whole = spec.build();
    let (head, payload) = whole.split_at(14 + 40);
    let mut out = Vec::new();
    for (i, piece) in payload.chunks(chunk).enumerate() {
        let last = (i + 1) * chunk >= payload.len();
        let mut f = head.to_vec();
        f[18..20].copy_from_slice(&((8 + piece.len()) as u16).to_be_bytes());
        f[20] = 44;
        let off = ((i * chunk) as u16) | u16::from(!last);
        f.extend_from_slice(&[spec.proto, 0]);
        f.extend_from_slice(&off.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(piece);
        out.push(f);
    }
    out
}

/// What a test reads back from an IPv6 TCP/UDP frame without extension
/// headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded6 {
    pub saddr: std::net::Ipv6Addr,
    pub daddr: std::net::Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    pub hop_limit: u8,
    /// The L4 checksum, recomputed from scratch, matches.
    pub l4_checksum_ok: bool,
}

pub fn decode6(frame: &[u8]) -> Decoded6 {
    let ip = &frame[14..];
    let addr = |at: usize| {
        let o: [u8; 16] = ip[at..at + 16].try_into().unwrap();
        std::net::Ipv6Addr::from(o)
    };
    let port = |at: usize| u16::from_be_bytes([ip[at], ip[at + 1]]);
    let off = if ip[6] == TCP { 40 + 16 } else { 40 + 6 };
    Decoded6 {
        saddr: addr(8),
        daddr: addr(24),
        sport: port(40),
        dport: port(42),
        hop_limit: ip[7],
        l4_checksum_ok: port(off) == l4_checksum6(ip),
    }
}

/// The L4 (or ICMPv6) checksum of the IPv6 packet `ip` without extension
/// headers, computed with the checksum field taken as zero.
pub fn l4_checksum6(ip: &[u8]) -> u16 {
    let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let proto = ip[6];
    let mut seg = ip[40..40 + len].to_vec();
    let off = match proto {
        TCP => 16,
        UDP => 6,
        _ => 2, // ICMPv6
    };
    seg[off..off + 2].copy_from_slice(&[0, 0]);
    let mut acc = sum(&ip[8..40], 0);
    acc += len as u64 + proto as u64;
    !fold(sum(&seg, acc))
}

/// A TCP (no options, fixed sequence numbers) or UDP header and the
/// payload, the checksum left 0 for the caller.
fn push_l4(p: &mut Vec<u8>, sport: u16, dport: u16, proto: u8, tcp_flags: u8, payload: &[u8]) {
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    if proto == TCP {
        p.extend_from_slice(&1000u32.to_be_bytes()); // seq
        p.extend_from_slice(&0u32.to_be_bytes()); // ack
        p.push(5 << 4);
        p.push(tcp_flags);
        p.extend_from_slice(&64240u16.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    } else {
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
    }
    p.extend_from_slice(payload);
}
