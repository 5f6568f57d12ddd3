//! Addresses of both families in one 16-byte form, so one set of maps and
//! one datapath serve IPv4 and IPv6 (Katran's `flow_key` and
//! `vip_definition` make the same choice with a union of `__be32` and
//! `__be32[4]`). IPv6 addresses are themselves; an IPv4 address is its
//! IPv4-mapped IPv6 form `::ffff:a.b.c.d` (RFC 4291, 2.5.5.2), which no
//! IPv6 packet on the wire carries as a source or destination, so the
//! families never collide. It is also the form a dual-stack socket's
//! connect6() hook sees for an IPv4 destination.

/// 16 bytes in wire order (`octets`, which bpftool prints), 4-aligned so
/// that the datapath copies and compares it as four 32-bit words: as a
/// bare `[u8; 16]` (alignment 1) LLVM's BPF backend moved it byte by byte,
/// and the verifier walked 2.7 times the instructions it walked with
/// 4-byte addresses.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub octets: [u8; 16],
}

impl PartialEq for Addr {
    #[inline(always)]
    fn eq(&self, other: &Addr) -> bool {
        diff(self, other) == 0
    }
}

/// 0 exactly when `a == b`, without a branch: several comparisons OR'ed
/// together cost the verifier one jump instead of one each.
#[inline(always)]
pub fn diff(a: &Addr, b: &Addr) -> u32 {
    let (a, b) = (words(a), words(b));
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])
}

impl Eq for Addr {}

/// `::`, the "no address" value (an unset SNAT address, an empty slot).
pub const ADDR_UNSPECIFIED: Addr = Addr { octets: [0; 16] };

/// The IPv4-mapped form of an IPv4 address.
#[inline(always)]
pub const fn from_v4(a: [u8; 4]) -> Addr {
    Addr {
        octets: [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
        ],
    }
}

/// Whether `a` is an IPv4 address (IPv4-mapped).
#[inline(always)]
pub fn is_v4(a: &Addr) -> bool {
    let w = words(a);
    w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// All ones if `a` is IPv4 (mapped), else 0, computed without a branch:
/// BPF has no conditional move, so every `if` on an address's family is a
/// jump, and the verifier walks what follows once per side.
#[inline(always)]
pub fn v4_mask(a: &Addr) -> u64 {
    let w = words(a);
    let x = (w[0] | w[1] | (w[2] ^ u32::from_ne_bytes([0, 0, 0xff, 0xff]))) as u64;
    // x | -x has its top bit set exactly when x != 0.
    ((x | x.wrapping_neg()) >> 63).wrapping_sub(1)
}

/// `if_v4` where `mask` (from `v4_mask`) is all ones, else `if_v6`,
/// without a branch.
#[inline(always)]
pub fn select(mask: u64, if_v4: &Addr, if_v6: &Addr) -> Addr {
    let m = mask as u32;
    let (a, b) = (words(if_v4), words(if_v6));
    from_words([
        (a[0] & m) | (b[0] & !m),
        (a[1] & m) | (b[1] & !m),
        (a[2] & m) | (b[2] & !m),
        (a[3] & m) | (b[3] & !m),
    ])
}

/// The IPv4 address of an IPv4-mapped `a` (its last four bytes).
#[inline(always)]
pub fn v4(a: &Addr) -> [u8; 4] {
    words(a)[3].to_ne_bytes()
}

/// The four 32-bit words of `a`, in memory order: what the datapath
/// compares and hashes.
#[inline(always)]
pub fn words(a: &Addr) -> [u32; 4] {
    // SAFETY: `Addr` is 16 bytes aligned to 4, so it is a valid `[u32; 4]`.
    unsafe { *(a as *const Addr as *const [u32; 4]) }
}

/// `a` from its words (the inverse of `words`).
#[inline(always)]
pub fn from_words(w: [u32; 4]) -> Addr {
    // SAFETY: as in `words`: same size, and `Addr`'s alignment is 4.
    unsafe { core::mem::transmute::<[u32; 4], Addr>(w) }
}

/// The trie prefix length of a `len`-bit prefix of `a`'s family, in the
/// 128-bit form (an IPv4 /24 is a /120).
#[inline(always)]
pub const fn prefix_len(v4: bool, len: u32) -> u32 {
    if v4 {
        96 + len
    } else {
        len
    }
}

/// The 16-byte form of an address of either family.
pub fn from_ip(ip: core::net::IpAddr) -> Addr {
    match ip {
        core::net::IpAddr::V4(v4) => from_v4(v4.octets()),
        core::net::IpAddr::V6(v6) => Addr {
            octets: v6.octets(),
        },
    }
}

/// The address `a` holds: IPv4 for an IPv4-mapped one.
pub fn to_ip(a: &Addr) -> core::net::IpAddr {
    if is_v4(a) {
        core::net::IpAddr::V4(v4(a).into())
    } else {
        core::net::IpAddr::V6(a.octets.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_is_mapped_and_back() {
        let a = from_v4([198, 18, 0, 1]);
        assert!(is_v4(&a));
        assert_eq!(v4(&a), [198, 18, 0, 1]);
        assert_eq!(a.octets[10..], [0xff, 0xff, 198, 18, 0, 1]);
        let v6 = Addr {
            octets: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        };
        assert!(!is_v4(&v6));
        assert!(!is_v4(&ADDR_UNSPECIFIED));
        assert_eq!(v4_mask(&a), u64::MAX);
        assert_eq!(v4_mask(&v6), 0);
        assert_eq!(v4_mask(&ADDR_UNSPECIFIED), 0);
        assert_eq!(select(v4_mask(&a), &a, &v6), a);
        assert_eq!(select(v4_mask(&v6), &a, &v6), v6);
        assert_eq!(from_words(words(&v6)), v6);
        let ip: core::net::IpAddr = "198.18.0.1".parse().unwrap();
        assert_eq!(from_ip(ip), a);
        assert_eq!(to_ip(&a), ip);
        let ip6: core::net::IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(to_ip(&from_ip(ip6)), ip6);
    }
}
