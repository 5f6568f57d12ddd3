//! Conntrack: a translated flow keeps its backend even when the Maglev table
//! changes, and replies find the frontend to restore. Each flow has a
//! forward entry (client -> frontend) and a reply entry (backend -> client,
//! or backend -> node address and SNAT port when the source was translated).

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{
    hash::flow_hash, Backend, ConntrackEntry, DatapathConfig, FlowKey, CT_FORWARD, CT_F_SNAT,
    CT_REFRESH_NS, CT_REPLY, CT_TIMEOUT_TCP_NS, CT_TIMEOUT_UDP_NS, IPPROTO_TCP, SNAT_PORT_TRIES,
};

use crate::{maps::CONNTRACK, packet::Ipv4Flow};

/// An address and a port (host order).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AddrPort {
    pub addr: [u8; 4],
    pub port: u16,
}

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

/// The reply direction of a flow from `src` translated to `backend`.
#[inline(always)]
fn reply_key(backend: &Backend, src: AddrPort, proto: u8) -> FlowKey {
    FlowKey {
        src_addr: backend.addr,
        dst_addr: src.addr,
        src_port: backend.port,
        dst_port: src.port,
        proto,
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

/// The live entry for `key`, in whichever direction.
#[inline(always)]
pub fn lookup_live(key: &FlowKey, now: u64) -> Option<ConntrackEntry> {
    // SAFETY: the value is copied out at once; a concurrent update can at
    // worst give a torn read, which the callers' backend checks reject.
    let e = unsafe { *CONNTRACK.get(*key)? };
    live(&e, now, key.proto).then_some(e)
}

/// A live entry for `key` in `direction`, if any.
#[inline(always)]
pub fn lookup(key: &FlowKey, direction: u8, now: u64) -> Option<ConntrackEntry> {
    lookup_live(key, now).filter(|e| e.direction == direction)
}

/// The two entries of a flow from `client` (its forward key) to `backend`,
/// with the source translated to `snat` if given.
#[inline(always)]
fn entries(
    client: &FlowKey,
    now: u64,
    service_id: u32,
    backend_id: u32,
    backend: &Backend,
    snat: Option<AddrPort>,
) -> (ConntrackEntry, FlowKey, ConntrackEntry) {
    let client_end = AddrPort {
        addr: client.src_addr,
        port: client.src_port,
    };
    let (flags, seen_as) = match snat {
        Some(s) => (CT_F_SNAT, s),
        None => (0, client_end),
    };
    let fwd = ConntrackEntry {
        last_seen_ns: now,
        nat_addr: backend.addr,
        nat_port: backend.port,
        direction: CT_FORWARD,
        flags,
        snat_addr: seen_as.addr,
        snat_port: seen_as.port,
        _pad: 0,
        backend_id,
        service_id,
    };
    let rev = ConntrackEntry {
        nat_addr: client.dst_addr,
        nat_port: client.dst_port,
        direction: CT_REPLY,
        snat_addr: client_end.addr,
        snat_port: client_end.port,
        ..fwd
    };
    (fwd, reply_key(backend, seen_as, client.proto), rev)
}

/// Records both directions of a flow whose source stays as it is (or whose
/// SNAT port is already known: a refresh).
#[inline(always)]
pub fn record(
    client: &FlowKey,
    now: u64,
    service_id: u32,
    backend_id: u32,
    backend: &Backend,
    snat: Option<AddrPort>,
) {
    let (fwd, rkey, rev) = entries(client, now, service_id, backend_id, backend, snat);
    // Failure only costs the flow its stickiness; the packet is still
    // translated (LRU maps make room rather than fail).
    let _ = CONNTRACK.insert(*client, fwd, BPF_ANY as u64);
    let _ = CONNTRACK.insert(rkey, rev, BPF_ANY as u64);
}

/// Records a new flow whose source is translated to the node address,
/// choosing a source port no other live flow to this backend uses. The
/// reply entry is created with BPF_NOEXIST, which makes the claim atomic
/// between CPUs. `None`: every port tried is taken.
#[inline(always)]
pub fn record_snat(
    client: &FlowKey,
    now: u64,
    service_id: u32,
    backend_id: u32,
    backend: &Backend,
    cfg: &DatapathConfig,
) -> Option<AddrPort> {
    if cfg.snat_port_max < cfg.snat_port_min {
        return None;
    }
    let range = (cfg.snat_port_max - cfg.snat_port_min) as u32 + 1;
    // Never true; it lets the compiler drop its divide-by-zero panic path,
    // which the verifier would refuse.
    if range == 0 {
        return None;
    }
    // Start where the flow hashes to, so concurrent new flows spread out.
    let start = (flow_hash(
        client.src_addr,
        client.src_port,
        client.dst_port,
        client.proto,
    ) % range as u64) as u32;
    for i in 0..SNAT_PORT_TRIES {
        let port = cfg.snat_port_min as u32 + (start + i) % range;
        let snat = AddrPort {
            addr: cfg.snat_addr,
            port: port as u16,
        };
        let (fwd, rkey, rev) = entries(client, now, service_id, backend_id, backend, Some(snat));
        let mut claimed = CONNTRACK.insert(rkey, rev, BPF_NOEXIST as u64).is_ok();
        if !claimed {
            // SAFETY: copied out at once.
            if let Some(old) = unsafe { CONNTRACK.get(rkey) } {
                let old = *old;
                // An expired flow's port is free again; and the same client
                // flow (its forward entry was evicted) keeps its own port.
                let same_flow = old.direction == CT_REPLY
                    && old.snat_addr == client.src_addr
                    && old.snat_port == client.src_port
                    && old.nat_addr == client.dst_addr
                    && old.nat_port == client.dst_port;
                if same_flow || !live(&old, now, client.proto) {
                    claimed = CONNTRACK.insert(rkey, rev, BPF_ANY as u64).is_ok();
                }
            }
        }
        if claimed {
            let _ = CONNTRACK.insert(*client, fwd, BPF_ANY as u64);
            return Some(snat);
        }
    }
    None
}

/// Refreshes an established flow at most once per `CT_REFRESH_NS`. The reply
/// entry is rewritten too, so LRU eviction of one half heals itself.
#[inline(always)]
pub fn refresh(client: &FlowKey, now: u64, e: &ConntrackEntry, backend: &Backend) {
    if now.wrapping_sub(e.last_seen_ns) < CT_REFRESH_NS {
        return;
    }
    record(client, now, e.service_id, e.backend_id, backend, snat_of(e));
}

/// The translated source of a forward entry (or the client to restore, of
/// a reply entry), when the flow is SNATed.
#[inline(always)]
pub fn snat_of(e: &ConntrackEntry) -> Option<AddrPort> {
    (e.flags & CT_F_SNAT != 0).then_some(AddrPort {
        addr: e.snat_addr,
        port: e.snat_port,
    })
}

/// The frontend to restore on a backend's reply, if this packet is one.
#[inline(always)]
pub fn lookup_reply(key: &FlowKey, now: u64) -> Option<ConntrackEntry> {
    let p = CONNTRACK.get_ptr_mut(*key)?;
    // SAFETY: copied out at once; see `lookup`.
    let e = unsafe { *p };
    if e.direction != CT_REPLY || !live(&e, now, key.proto) {
        return None;
    }
    if now.wrapping_sub(e.last_seen_ns) >= CT_REFRESH_NS {
        // SAFETY: a plain 8-byte store into the map value; racing writers
        // store similar timestamps.
        unsafe { (*p).last_seen_ns = now };
    }
    Some(e)
}
