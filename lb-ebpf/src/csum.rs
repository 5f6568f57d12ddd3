//! Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624)
//! for the XDP path and for packets we build. The TC path uses the kernel's
//! csum helpers instead, because only they know whether an skb's L4
//! checksum is complete or a CHECKSUM_PARTIAL pseudo-header seed.

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for a 16-bit field change.
/// All values are as they sit in memory (network order), which is fine:
/// one's-complement sums are byte-order independent.
#[inline(always)]
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + new as u32;
    !fold(sum)
}

/// The same for a 32-bit field (an IPv4 address), as two 16-bit words.
#[inline(always)]
pub fn update32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let o = u32::from_ne_bytes(old);
    let n = u32::from_ne_bytes(new);
    let sum = (!check as u32)
        + (!(o as u16) as u32)
        + (!((o >> 16) as u16) as u32)
        + (n as u16) as u32
        + ((n >> 16) as u16) as u32;
    !fold(sum)
}

/// One's-complement sum of `N` bytes (N even), as 16-bit words in memory order.
#[inline(always)]
pub fn sum_bytes<const N: usize>(bytes: &[u8; N], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        acc += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    acc
}

/// The same for a 16-byte address (an IPv6 address in a pseudo-header or
/// a quoted header), as eight 16-bit words.
#[inline(always)]
pub fn update_addr(check: u16, old: &lb_common::Addr, new: &lb_common::Addr) -> u16 {
    let (o, n) = (lb_common::addr::words(old), lb_common::addr::words(new));
    let mut sum = !check as u32;
    let mut i = 0;
    while i < 4 {
        sum += (!(o[i] as u16) as u32) + (!((o[i] >> 16) as u16) as u32);
        sum += (n[i] as u16) as u32 + ((n[i] >> 16) as u16) as u32;
        i += 1;
    }
    !fold(sum)
}
