//! Conntrack: a translated flow keeps its backend even when the Maglev table
//! changes, and replies find the frontend to restore. Each flow has a
//! forward entry (client -> frontend) and a reply entry (backend -> client).

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    Backend, ConntrackEntry, FlowKey, CT_FORWARD, CT_REFRESH_NS, CT_REPLY, CT_TIMEOUT_TCP_NS,
    CT_TIMEOUT_UDP_NS, IPPROTO_TCP,
};

use crate::{maps::CONNTRACK, packet::Ipv4Flow};

#[inline(always)]
pub fn flow_key(f: &Ipv4Flow) -> FlowKey {
    FlowKey {
        src_addr: f.saddr,
        dst_addr: f.daddr,
        src_port: f.sport,
        dst_port: f.dport,
        proto: f.proto,
        _pad: [0; 3],
    }
}

/// The reply direction of a flow translated to `backend`.
#[inline(always)]
fn reply_key(f: &Ipv4Flow, backend: &Backend) -> FlowKey {
    FlowKey {
        src_addr: backend.addr,
        dst_addr: f.saddr,
        src_port: backend.port,
        dst_port: f.sport,
        proto: f.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn timeout_ns(proto: u8) -> u64 {
    if proto == IPPROTO_TCP {
        CT_TIMEOUT_TCP_NS
    } else {
        CT_TIMEOUT_UDP_NS
    }
}

#[inline(always)]
fn live(e: &ConntrackEntry, now: u64, proto: u8) -> bool {
    now.wrapping_sub(e.last_seen_ns) < timeout_ns(proto)
}

/// A live forward entry for this packet, if any.
#[inline(always)]
pub fn lookup_forward(f: &Ipv4Flow, now: u64) -> Option<ConntrackEntry> {
    let key = flow_key(f);
    // SAFETY: the value is copied out at once; a concurrent update can at
    // worst give a torn read, which the backend check below rejects.
    let e = unsafe { *CONNTRACK.get(key)? };
    if e.direction == CT_FORWARD && live(&e, now, f.proto) {
        Some(e)
    } else {
        None
    }
}

/// Records both directions of a new translated flow.
#[inline(always)]
pub fn record(f: &Ipv4Flow, now: u64, service_id: u32, backend_id: u32, backend: &Backend) {
    let fwd = ConntrackEntry {
        last_seen_ns: now,
        nat_addr: backend.addr,
        nat_port: backend.port,
        direction: CT_FORWARD,
        _pad: 0,
        backend_id,
        service_id,
    };
    let rev = ConntrackEntry {
        nat_addr: f.daddr,
        nat_port: f.dport,
        direction: CT_REPLY,
        ..fwd
    };
    // Failure (map full of non-LRU... cannot happen for LRU) only costs the
    // flow its stickiness; the packet is still translated.
    let _ = CONNTRACK.insert(flow_key(f), fwd, BPF_ANY as u64);
    let _ = CONNTRACK.insert(reply_key(f, backend), rev, BPF_ANY as u64);
}

/// Refreshes an established flow at most once per `CT_REFRESH_NS`. The reply
/// entry is rewritten too, so LRU eviction of one half heals itself.
#[inline(always)]
pub fn refresh(f: &Ipv4Flow, now: u64, e: &ConntrackEntry, backend: &Backend) {
    if now.wrapping_sub(e.last_seen_ns) < CT_REFRESH_NS {
        return;
    }
    record(f, now, e.service_id, e.backend_id, backend);
}

/// The frontend to restore on a backend's reply, if this packet is one.
#[inline(always)]
pub fn lookup_reply(f: &Ipv4Flow, now: u64) -> Option<ConntrackEntry> {
    let key = flow_key(f);
    let p = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: copied out at once; see lookup_forward.
    let e = unsafe { *p };
    if e.direction != CT_REPLY || !live(&e, now, f.proto) {
        return None;
    }
    if now.wrapping_sub(e.last_seen_ns) >= CT_REFRESH_NS {
        // SAFETY: a plain 8-byte store into the map value; racing writers
        // store similar timestamps.
        unsafe { (*p).last_seen_ns = now };
    }
    Some(e)
}
