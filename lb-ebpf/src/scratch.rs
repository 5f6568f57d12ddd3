//! Per-CPU scratch space, for values the verifier must not know.
//!
//! The verifier walks every path through the program with what it knows
//! about each register. A packet parsed along different paths (TCP or UDP,
//! fragment or not, IP options or not) reaches the flow logic with
//! different known constants, and each combination would be walked through
//! all of it again: millions of instructions, over the kernel's limit.
//! A value passed through a map is unknown to the verifier, so the paths
//! meet in one state and are walked once.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};

const SLOT_BYTES: usize = 64;

#[btf_map(name = "lb_scratch")]
static SCRATCH: PerCpuArray<[u64; SLOT_BYTES / 8], 1> = PerCpuArray::new();

/// `v`, as the verifier sees a value read from a map: unknown.
#[inline(always)]
pub fn opaque<T: Copy>(v: T) -> T {
    const { assert!(core::mem::size_of::<T>() <= SLOT_BYTES) };
    let Some(p) = SCRATCH.get_ptr_mut(0) else {
        return v;
    };
    let p = p as *mut T;
    // SAFETY: the slot is this CPU's, 8-byte aligned and large enough;
    // volatile so the compiler cannot hand back `v` without the round trip.
    unsafe {
        core::ptr::write_volatile(p, v);
        core::ptr::read_volatile(p)
    }
}
