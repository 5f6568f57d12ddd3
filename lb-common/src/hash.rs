//! The flow hash that picks a Maglev slot for a new flow.
//!
//! It must be identical in the kernel and in userspace tests, and on every
//! node, so it lives here as a pure function. It leaves out the destination
//! address: the service is already implied by the frontend lookup, and a flow
//! that reaches another node's address (ECMP change) must hash the same.

use crate::addr::{self, Addr};

/// Fixed seed: the same on every node so every node picks the same backend.
pub const FLOW_HASH_SEED: u64 = 0x6c62_2d6d_6167_6c76; // "lb-maglv"

/// MurmurHash3's 64-bit finalizer: a full-avalanche mix of a 64-bit word,
/// cheap in BPF (two multiplies) and with no loops for the verifier.
#[inline(always)]
pub const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Hash of a new flow's client side: source address and port, destination
/// port and protocol. An IPv4 source hashes exactly as before addresses
/// became 16 bytes, so an upgrade keeps every IPv4 flow's Maglev choice
/// (a flow whose conntrack entry is lost is picked up by the same backend).
#[inline(always)]
pub fn flow_hash(src_addr: &Addr, src_port: u16, dst_port: u16, proto: u8) -> u64 {
    let ports = ((src_port as u64) << 16) | dst_port as u64;
    let w = addr::words(src_addr);
    let v4 = ((u32::from_be(w[3]) as u64) << 32) | ports;
    // IPv6: 128 bits into 64 before the final mix, a full mix of one half
    // folded into the other, so no two sources that differ in one half
    // only collide. Both are computed and one is kept without a branch
    // (see `addr::v4_mask`).
    let hi = ((w[0] as u64) << 32) | w[1] as u64;
    let lo = ((w[2] as u64) << 32) | w[3] as u64;
    let v6 = fmix64(hi ^ V6_FOLD_SEED) ^ lo ^ ports;
    let m = addr::v4_mask(src_addr);
    let word = (v4 & m) | (v6 & !m);
    fmix64(word ^ FLOW_HASH_SEED ^ ((proto as u64) << 56).rotate_left(7))
}

/// Seed of the IPv6 fold in `flow_hash`.
const V6_FOLD_SEED: u64 = 0x6c62_2d76_362d_666f; // "lb-v6-fo"

/// The hash a client's new flow is placed with once its sessionAffinity
/// entry has expired: `hash` (the client's own, the same on every node)
/// mixed with when the expired entry was last used. kube-proxy makes a
/// fresh choice after `timeoutSeconds` (the e2e test "should have session
/// affinity timeout work" fails if the same backend always comes back);
/// this is one, different for each expiry.
#[inline(always)]
pub const fn affinity_rehash(hash: u64, expired_last_used_ns: u64) -> u64 {
    fmix64(hash ^ expired_last_used_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: Addr = addr::from_v4([198, 18, 0, 1]);

    #[test]
    fn flow_hash_is_stable_across_builds() {
        // Pinned value: a change here changes backend choice on upgrade,
        // which moves every flow that has no conntrack entry. (The value
        // of the formula before addresses became 16 bytes.)
        assert_eq!(flow_hash(&CLIENT, 40000, 80, 6), 0xcae1_7b9f_84b0_3fdb);
        assert_ne!(
            flow_hash(&CLIENT, 40000, 80, 6),
            flow_hash(&CLIENT, 40001, 80, 6)
        );
        assert_ne!(
            flow_hash(&CLIENT, 40000, 80, 6),
            flow_hash(&CLIENT, 40000, 80, 17)
        );
        let v6 = Addr {
            octets: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0, 1],
        };
        let mut other = v6;
        other.octets[3] = 1;
        assert_ne!(
            flow_hash(&v6, 40000, 80, 6),
            flow_hash(&other, 40000, 80, 6)
        );
        assert_ne!(
            flow_hash(&v6, 40000, 80, 6),
            flow_hash(&CLIENT, 40000, 80, 6)
        );
    }

    #[test]
    fn flow_hash_spreads_source_ports() {
        // 65,536 consecutive ports into 7 buckets: each within 2% of fair.
        let mut buckets = [0u32; 7];
        for port in 0..=u16::MAX {
            buckets[(flow_hash(&CLIENT, port, 80, 6) % 7) as usize] += 1;
        }
        let fair = 65536.0 / 7.0;
        for b in buckets {
            assert!((b as f64 - fair).abs() / fair < 0.02, "{buckets:?}");
        }
    }
}
