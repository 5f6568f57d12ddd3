//! Rewriting an ICMP error about a translated flow (see
//! `pipeline::icmp_error` for which addresses it gets). Shared by XDP and
//! TC: the writes go straight into the packet with RFC 1624 updates of
//! every checksum involved. That is right for TC too: each header's own
//! checksum compensates its changes, so the one's-complement sum of the
//! whole packet, which a CHECKSUM_COMPLETE skb carries, does not change.

use lb_common::{addr::v4, IPPROTO_UDP};

use crate::{
    csum::{update16, update32, update_addr},
    packet::{
        ptr_at, IcmpError, Ipv4Hdr, Ipv6Hdr, L4Ports, PacketBuf, ETH_HLEN, ICMP6_CSUM_OFF,
        ICMP_CSUM_OFF, INNER6_IP_OFF, INNER6_L4_OFF, INNER_IP_OFF, INNER_L4_OFF,
    },
    pipeline::IcmpRewrite,
};

#[inline(always)]
pub fn rewrite<C: PacketBuf>(ctx: &C, icmp: &IcmpError, to: &IcmpRewrite) -> Option<()> {
    if icmp.v6 {
        return rewrite6(ctx, icmp, to);
    }
    let outer = ptr_at::<Ipv4Hdr, C>(ctx, ETH_HLEN)?;
    let inner = ptr_at::<Ipv4Hdr, C>(ctx, INNER_IP_OFF)?;
    let ports = ptr_at::<L4Ports, C>(ctx, INNER_L4_OFF)?;
    let icmp_csum = ptr_at::<u16, C>(ctx, ICMP_CSUM_OFF)?;
    let new_sport = to.inner_src.port.to_be();
    let new_dport = to.inner_dst.port.to_be();
    // SAFETY: ptr_at checked every pointer against the packet's end.
    unsafe {
        // Outer header: only its own checksum covers it.
        let mut check = (*outer).check;
        let (saddr, daddr) = (v4(&to.saddr), v4(&to.daddr));
        check = update32(check, (*outer).saddr, saddr);
        check = update32(check, (*outer).daddr, daddr);
        (*outer).check = check;
        (*outer).saddr = saddr;
        (*outer).daddr = daddr;
        let (new_src, new_dst) = (v4(&to.inner_src.addr), v4(&to.inner_dst.addr));

        // The quote: each change moves the quoted checksums and, with them,
        // the ICMP checksum that covers all of it.
        let mut ic = *icmp_csum;
        let old_src = (*inner).saddr;
        let old_dst = (*inner).daddr;
        let old_ports = *ports;

        let old_ip_check = (*inner).check;
        let mut ip_check = update32(old_ip_check, old_src, new_src);
        ip_check = update32(ip_check, old_dst, new_dst);
        // Bounds checked here, right before use: a packet pointer kept
        // across the code above is spilled and reloaded by the compiler in
        // ways the verifier does not always follow.
        let inner_csum = match icmp.inner_csum_off {
            Some(off) => ptr_at::<u16, C>(ctx, off),
            None => None,
        };
        if let Some(p) = inner_csum {
            let old_l4 = *p;
            // A UDP checksum of 0 means "none" and stays so.
            if !(icmp.inner_proto == IPPROTO_UDP && old_l4 == 0) {
                let mut l4 = update32(old_l4, old_src, new_src);
                l4 = update32(l4, old_dst, new_dst);
                l4 = update16(l4, old_ports.src, new_sport);
                l4 = update16(l4, old_ports.dst, new_dport);
                if icmp.inner_proto == IPPROTO_UDP && l4 == 0 {
                    l4 = 0xffff;
                }
                ic = update16(ic, old_l4, l4);
                *p = l4;
            }
        }
        ic = update32(ic, old_src, new_src);
        ic = update32(ic, old_dst, new_dst);
        ic = update16(ic, old_ip_check, ip_check);
        ic = update16(ic, old_ports.src, new_sport);
        ic = update16(ic, old_ports.dst, new_dport);
        (*inner).saddr = new_src;
        (*inner).daddr = new_dst;
        (*inner).check = ip_check;
        (*ports).src = new_sport;
        (*ports).dst = new_dport;
        *icmp_csum = ic;
    }
    Some(())
}

/// `rewrite` for ICMPv6. No IP header checksums; the ICMPv6 checksum
/// covers a pseudo-header, so the outer addresses move it too.
#[inline(always)]
fn rewrite6<C: PacketBuf>(ctx: &C, icmp: &IcmpError, to: &IcmpRewrite) -> Option<()> {
    let outer = ptr_at::<Ipv6Hdr, C>(ctx, ETH_HLEN)?;
    let inner = ptr_at::<Ipv6Hdr, C>(ctx, INNER6_IP_OFF)?;
    let ports = ptr_at::<L4Ports, C>(ctx, INNER6_L4_OFF)?;
    let icmp_csum = ptr_at::<u16, C>(ctx, ICMP6_CSUM_OFF)?;
    let new_sport = to.inner_src.port.to_be();
    let new_dport = to.inner_dst.port.to_be();
    let (old_src, old_dst) = (&icmp.inner_saddr, &icmp.inner_daddr);
    let (new_src, new_dst) = (&to.inner_src.addr, &to.inner_dst.addr);
    // SAFETY: ptr_at checked every pointer against the packet's end.
    unsafe {
        let mut ic = *icmp_csum;
        ic = update_addr(ic, &icmp.saddr, &to.saddr);
        ic = update_addr(ic, &icmp.daddr, &to.daddr);
        (*outer).saddr = to.saddr.octets;
        (*outer).daddr = to.daddr.octets;

        let old_ports = *ports;
        let inner_csum = match icmp.inner_csum_off {
            Some(off) => ptr_at::<u16, C>(ctx, off),
            None => None,
        };
        if let Some(p) = inner_csum {
            let old_l4 = *p;
            let mut l4 = update_addr(old_l4, old_src, new_src);
            l4 = update_addr(l4, old_dst, new_dst);
            l4 = update16(l4, old_ports.src, new_sport);
            l4 = update16(l4, old_ports.dst, new_dport);
            if icmp.inner_proto == IPPROTO_UDP && l4 == 0 {
                l4 = 0xffff;
            }
            ic = update16(ic, old_l4, l4);
            *p = l4;
        }
        ic = update_addr(ic, old_src, new_src);
        ic = update_addr(ic, old_dst, new_dst);
        ic = update16(ic, old_ports.src, new_sport);
        ic = update16(ic, old_ports.dst, new_dport);
        (*inner).saddr = new_src.octets;
        (*inner).daddr = new_dst.octets;
        (*ports).src = new_sport;
        (*ports).dst = new_dport;
        *icmp_csum = ic;
    }
    Some(())
}
