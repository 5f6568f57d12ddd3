//! Backend choice for a new flow: sessionAffinity first, then Maglev.

use aya_ebpf::bindings::BPF_ANY;
use core::ptr::read_volatile;

use lb_common::{
    hash::affinity_rehash,
    Addr, AffinityEntry, AffinityKey, Backend, MaglevKey, ServiceEntry, BACKEND_F_PRESENT, BACKEND_F_USABLE,
    SERVICE_F_AFFINITY, SERVICE_F_TABLE_B,
};

use crate::maps::{AFFINITY, BACKENDS, MAGLEV};

/// The backend with this id, if it still belongs to this service.
#[inline(always)]
pub fn backend_of(service_id: u32, backend_id: u32) -> Option<Backend> {
    let b = *BACKENDS.get(backend_id)?;
    if b.flags & BACKEND_F_PRESENT != 0 && b.service_id == service_id {
        Some(b)
    } else {
        None
    }
}

pub struct Choice {
    pub backend_id: u32,
    pub backend: Backend,
    pub from_affinity: bool,
}

/// The backend for a new flow from `client` whose flow hash is `hash`.
#[inline(always)]
pub fn choose(client: &Addr, hash: u64, svc: &ServiceEntry, now: u64) -> Option<Choice> {
    let mut hash = hash;
    let affinity = svc.flags & SERVICE_F_AFFINITY != 0;
    let akey = AffinityKey {
        client_addr: *client,
        service_id: svc.id,
    };
    if affinity {
        if let Some(p) = AFFINITY.get_ptr_mut(akey) {
            // SAFETY: copied out at once; a torn read fails the checks below.
            let a = unsafe { *p };
            let timeout_ns = svc.affinity_timeout_s as u64 * 1_000_000_000;
            if now.saturating_sub(a.last_used_ns) <= timeout_ns {
                if let Some(b) = backend_of(svc.id, a.backend_id) {
                    // Like kube-proxy, affinity only leads to endpoints that
                    // take new connections.
                    if b.flags & BACKEND_F_USABLE != 0 {
                        // SAFETY: plain 8-byte store into the map value.
                        unsafe { (*p).last_used_ns = now };
                        return Some(Choice {
                            backend_id: a.backend_id,
                            backend: b,
                            from_affinity: true,
                        });
                    }
                }
            } else {
                // Expired: a fresh choice, not the one the client's own
                // hash made the first time.
                hash = affinity_rehash(hash, a.last_used_ns);
            }
        }
    }
    if svc.table_size == 0 {
        return None;
    }
    let slot = (hash % svc.table_size as u64) as u32;
    let backend_id = table_slot(svc, slot)?;
    let backend = backend_of(svc.id, backend_id)?;
    if affinity {
        let entry = AffinityEntry {
            last_used_ns: now,
            backend_id,
            _pad: 0,
        };
        let _ = AFFINITY.insert(akey, entry, BPF_ANY as u64);
    }
    Some(Choice {
        backend_id,
        backend,
        from_affinity: false,
    })
}

/// The backend id in slot `slot` of the Maglev table of `svc`, read from
/// the half its frontend names; if the agent is rewriting that half this
/// very moment (the frontend entry was read just before a flip), from the
/// other half, which is then the live one. A half counts only if its
/// generation is set and unchanged across the slot's read (a seqlock; see
/// `lb_common::MaglevSlots`), so no slot of a half-written table is used.
/// `None` if neither half reads cleanly (two rewrites during one packet).
///
/// The volatile reads keep the three loads in program order; x86-64 does
/// not reorder loads with loads, which is what the check relies on.
#[inline(always)]
fn table_slot(svc: &ServiceEntry, slot: u32) -> Option<u32> {
    let key = MaglevKey {
        service_id: svc.id,
        table_size: svc.table_size,
    };
    // SAFETY: the inner map is an ARRAY held by the outer entry for the
    // whole program run (RCU): its elements are never freed under us.
    let table = unsafe { MAGLEV.get(&key)? };
    let header = table.get_ptr(0)?;
    let cell = table.get_ptr(slot.checked_add(1)?)?;
    let first = usize::from(svc.flags & SERVICE_F_TABLE_B != 0);
    for half in [first, first ^ 1] {
        let half = half & 1;
        // SAFETY: both pointers come from successful lookups of this array.
        let (before, backend_id, after) = unsafe {
            let before = read_volatile(&(*header)[half]);
            let backend_id = read_volatile(&(*cell)[half]);
            (before, backend_id, read_volatile(&(*header)[half]))
        };
        if before != 0 && before == after {
            return Some(backend_id);
        }
    }
    None
}
