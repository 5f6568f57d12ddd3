//! Verdict and per-service counters.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use lb_common::{Counter, Verdict};

use crate::maps::{SERVICE_STATS, VERDICTS};

#[inline(always)]
pub fn count(verdict: Verdict, bytes: u32) {
    count_index(verdict as u32, bytes)
}

/// `count` for a verdict kept as its number in a map (`pipeline::snat_flow`); the
/// map refuses an index past the last verdict.
#[inline(always)]
pub fn count_index(verdict: u32, bytes: u32) {
    if let Some(c) = VERDICTS.get_ptr_mut(verdict) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

#[inline(always)]
pub fn count_service(service_id: u32, bytes: u32) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service_id) {
        // The slot is shared between CPUs, so the adds are atomic (BPF's
        // atomic add; the BPF target has no compare-and-swap, so
        // core::sync::atomic offers no fetch_add and we use the intrinsic).
        // SAFETY: c points at an 8-byte aligned map value.
        unsafe {
            let c: *mut Counter = c;
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*c).packets, 1);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*c).bytes, bytes as u64);
        }
    }
}
