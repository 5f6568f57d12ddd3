//! Rewriting an ICMP error about a translated flow (see
//! `pipeline::icmp_error` for which addresses it gets). Shared by XDP and
//! TC: the writes go straight into the packet with RFC 1624 updates of
//! every checksum involved. That is right for TC too: each header's own
//! checksum compensates its changes, so the one's-complement sum of the
//! whole packet, which a CHECKSUM_COMPLETE skb carries, does not change.

use lb_common::IPPROTO_UDP;

use crate::{
    csum::{update16, update32},
    packet::{
        ptr_at, IcmpError, Ipv4Hdr, L4Ports, PacketBuf, ETH_HLEN, ICMP_CSUM_OFF, INNER_IP_OFF,
        INNER_L4_OFF,
    },
    pipeline::IcmpRewrite,
};

#[inline(always)]
pub fn rewrite<C: PacketBuf>(ctx: &C, icmp: &IcmpError, to: &IcmpRewrite) -> Option<()> {
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
        check = update32(check, (*outer).saddr, to.saddr);
        check = update32(check, (*outer).daddr, to.daddr);
        (*outer).check = check;
        (*outer).saddr = to.saddr;
        (*outer).daddr = to.daddr;

        // The quote: each change moves the quoted checksums and, with them,
        // the ICMP checksum that covers all of it.
        let mut ic = *icmp_csum;
        let old_src = (*inner).saddr;
        let old_dst = (*inner).daddr;
        let old_ports = *ports;

        let old_ip_check = (*inner).check;
        let mut ip_check = update32(old_ip_check, old_src, to.inner_src.addr);
        ip_check = update32(ip_check, old_dst, to.inner_dst.addr);
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
                let mut l4 = update32(old_l4, old_src, to.inner_src.addr);
                l4 = update32(l4, old_dst, to.inner_dst.addr);
                l4 = update16(l4, old_ports.src, new_sport);
                l4 = update16(l4, old_ports.dst, new_dport);
                if icmp.inner_proto == IPPROTO_UDP && l4 == 0 {
                    l4 = 0xffff;
                }
                ic = update16(ic, old_l4, l4);
                *p = l4;
            }
        }
        ic = update32(ic, old_src, to.inner_src.addr);
        ic = update32(ic, old_dst, to.inner_dst.addr);
        ic = update16(ic, old_ip_check, ip_check);
        ic = update16(ic, old_ports.src, new_sport);
        ic = update16(ic, old_ports.dst, new_dport);
        (*inner).saddr = to.inner_src.addr;
        (*inner).daddr = to.inner_dst.addr;
        (*inner).check = ip_check;
        (*ports).src = new_sport;
        (*ports).dst = new_dport;
        *icmp_csum = ic;
    }
    Some(())
}
