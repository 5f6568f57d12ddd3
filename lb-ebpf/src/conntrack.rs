//! Conntrack: a translated flow keeps its backend even when the Maglev table
//! changes, and replies find the frontend to restore. Each flow has a
//! forward entry (client -> frontend) and a reply entry (backend -> client,
//! or backend -> the translated source when the source is translated).
//!
//! Where entries live, so that a flood cannot push out established flows:
//! - `lb_ct_syn`: TCP flows the backend has not answered (a SYN, or a
//!   mid-stream packet picked up); moved to `lb_ct_tcp` by the first reply.
//! - `lb_ct_tcp`: TCP flows the backend answered. Spoofed SYNs never get
//!   here, and UDP has its own table.
//! - `lb_ct_udp`: UDP flows.
//! - `lb_snat`: the reply entry of a flow whose source is translated (to the
//!   node address, or to another port of the client: see `record`). Not
//!   LRU, so the translated source is owned by its flow until the flow
//!   closes or expires; forward entries stay in the tables above.
//!
//! Timeouts follow the TCP state (`lb_common::ct_timeout_ns`); both entries
//! of a flow carry the same state bits.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    btf_maps::PerCpuArray,
    helpers::bpf_get_prandom_u32,
    macros::btf_map,
};
use lb_common::{
    ct_closed, ct_live, ct_next_state, ct_stat, hash::flow_hash, Addr, ConntrackEntry, DatapathConfig,
    FlowKey, CT_FORWARD, CT_F_SNAT, CT_REFRESH_NS, CT_REPLY, CT_SNAT_TIME_WAIT_NS, CT_S_REPLIED,
    IPPROTO_TCP, SNAT_PORT_TRIES,
};

use crate::{
    maps::{CT_STATS, CT_SYN, CT_TCP, CT_UDP, SNAT},
    packet::Flow,
};

/// An address and a port (host order).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AddrPort {
    pub addr: Addr,
    pub port: u16,
}

impl AddrPort {
    #[inline(always)]
    pub const fn new(addr: Addr, port: u16) -> AddrPort {
        AddrPort { addr, port }
    }
}

/// The map an entry lives in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Tcp,
    Syn,
    Udp,
    Snat,
}

/// An entry found for a packet: a copy, and where it is for in-place updates.
pub struct Hit {
    pub e: ConntrackEntry,
    pub table: Table,
    ptr: *mut ConntrackEntry,
}

/// Both entries of a flow being written, and the flow's ends. Kept in a
/// per-CPU map rather than on the stack: BPF allows 512 bytes of stack
/// for a whole call chain, and these would take half of it.
#[repr(C)]
pub struct Work {
    fkey: FlowKey,
    fwd: ConntrackEntry,
    rkey: FlowKey,
    rev: ConntrackEntry,
    me: Ends,
}

#[btf_map(name = "lb_ct_work")]
static WORK: PerCpuArray<Work, 1> = PerCpuArray::new();

#[inline(always)]
fn work() -> Option<&'static mut Work> {
    // SAFETY: this CPU's slot; a program runs to completion on one CPU
    // without being preempted by another program using it.
    WORK.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn flow_key(f: &Flow) -> FlowKey {
    key(
        AddrPort::new(f.saddr, f.sport),
        AddrPort::new(f.daddr, f.dport),
        f.proto,
    )
}

#[inline(always)]
fn key(src: AddrPort, dst: AddrPort, proto: u8) -> FlowKey {
    FlowKey {
        src_addr: src.addr,
        dst_addr: dst.addr,
        src_port: src.port,
        dst_port: dst.port,
        proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn get_ptr(t: Table, k: &FlowKey) -> Option<*mut ConntrackEntry> {
    match t {
        Table::Tcp => CT_TCP.get_ptr_mut(k),
        Table::Syn => CT_SYN.get_ptr_mut(k),
        Table::Udp => CT_UDP.get_ptr_mut(k),
        Table::Snat => SNAT.get_ptr_mut(k),
    }
}

/// Writes an entry; with `fresh`, only if the key is free. Counts entries
/// the datapath adds, for the agent's eviction figures.
#[inline(always)]
fn put(t: Table, k: &FlowKey, v: &ConntrackEntry, fresh: bool) -> bool {
    let flags = if fresh { BPF_NOEXIST } else { BPF_ANY } as u64;
    let (rc, stat) = match t {
        Table::Tcp => (CT_TCP.insert(k, v, flags), ct_stat::TCP_CREATED),
        Table::Syn => (CT_SYN.insert(k, v, flags), ct_stat::SYN_CREATED),
        Table::Udp => (CT_UDP.insert(k, v, flags), ct_stat::UDP_CREATED),
        Table::Snat => (SNAT.insert(k, v, flags), ct_stat::SNAT_CREATED),
    };
    if rc.is_ok() && fresh {
        count_stat(stat);
    }
    rc.is_ok()
}

/// Deletes an entry, counting it.
#[inline(always)]
fn remove(t: Table, k: &FlowKey) {
    let (rc, stat) = match t {
        Table::Tcp => (CT_TCP.remove(k), ct_stat::TCP_DELETED),
        Table::Syn => (CT_SYN.remove(k), ct_stat::SYN_DELETED),
        Table::Udp => (CT_UDP.remove(k), ct_stat::UDP_DELETED),
        Table::Snat => return,
    };
    if rc.is_ok() {
        count_stat(stat);
    }
}

/// Writes an entry whether or not its key is taken, counting it when new.
#[inline(always)]
fn put_any(t: Table, k: &FlowKey, v: &ConntrackEntry) {
    if !put(t, k, v, true) {
        put(t, k, v, false);
    }
}

#[inline(always)]
fn count_stat(i: u32) {
    if let Some(c) = CT_STATS.get_ptr_mut(i) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

/// A live entry for `k` in `t` going in `direction`.
#[inline(always)]
fn find(t: Table, k: &FlowKey, direction: u8, now: u64) -> Option<Hit> {
    let ptr = get_ptr(t, k)?;
    // SAFETY: copied out at once; a concurrent update can at worst give a
    // torn read, which the callers' backend and identity checks reject.
    let e = unsafe { *ptr };
    (e.direction == direction && ct_live(e.last_seen_ns, now, k.proto, e.state)).then_some(Hit {
        e,
        table: t,
        ptr,
    })
}

/// The client's entry of a flow.
#[inline(always)]
pub fn lookup_forward(k: &FlowKey, now: u64) -> Option<Hit> {
    if k.proto == IPPROTO_TCP {
        find(Table::Tcp, k, CT_FORWARD, now).or_else(|| find(Table::Syn, k, CT_FORWARD, now))
    } else {
        find(Table::Udp, k, CT_FORWARD, now)
    }
}

/// Whether `port` may be a translated source (the SNAT range): only then
/// can a reply's entry be in `lb_snat`.
#[inline(always)]
fn snat_port(port: u16, cfg: &DatapathConfig) -> bool {
    port >= cfg.snat_port_min && port <= cfg.snat_port_max
}

/// The reply entry for a packet from a backend (or one from any host:
/// most packets crossing the node are nobody's reply).
#[inline(always)]
pub fn lookup_reply(k: &FlowKey, now: u64, cfg: &DatapathConfig) -> Option<Hit> {
    if snat_port(k.dst_port, cfg) {
        if let Some(h) = find(Table::Snat, k, CT_REPLY, now) {
            return Some(h);
        }
    }
    lookup_plain_reply(k, now)
}

#[inline(always)]
fn lookup_plain_reply(k: &FlowKey, now: u64) -> Option<Hit> {
    if k.proto == IPPROTO_TCP {
        find(Table::Tcp, k, CT_REPLY, now).or_else(|| find(Table::Syn, k, CT_REPLY, now))
    } else {
        find(Table::Udp, k, CT_REPLY, now)
    }
}

/// The live entry for `k` in either direction (ICMP errors quote both).
#[inline(always)]
pub fn lookup_any(k: &FlowKey, now: u64, cfg: &DatapathConfig) -> Option<ConntrackEntry> {
    if let Some(h) = lookup_reply(k, now, cfg) {
        return Some(h.e);
    }
    lookup_forward(k, now).map(|h| h.e)
}

/// The four ends of a flow, as one of its entries and that entry's key
/// describe them. Two entries belong to one flow when these are equal.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Ends {
    client: AddrPort,
    frontend: AddrPort,
    backend: AddrPort,
    /// The source the backend sees: the client, or its translation.
    seen_as: AddrPort,
}

#[inline(always)]
fn ends(k: &FlowKey, e: &ConntrackEntry) -> Ends {
    let src = AddrPort::new(k.src_addr, k.src_port);
    let dst = AddrPort::new(k.dst_addr, k.dst_port);
    let nat = AddrPort::new(e.nat_addr, e.nat_port);
    let other = AddrPort::new(e.snat_addr, e.snat_port);
    if e.direction == CT_FORWARD {
        Ends {
            client: src,
            frontend: dst,
            backend: nat,
            seen_as: other,
        }
    } else {
        Ends {
            client: other,
            frontend: nat,
            backend: src,
            seen_as: dst,
        }
    }
}

/// Whether the entry `e` keyed `k` belongs to flow `me`: `ends(k, e) ==
/// *me`, compared field by field without building the ends on the stack
/// (with 16-byte addresses, four `AddrPort`s are 80 bytes, and the SNAT
/// port search's frame must fit the 512-byte stack).
#[inline(always)]
fn same_flow(k: &FlowKey, e: &ConntrackEntry, me: &Ends) -> bool {
    let (src, dst, nat, other) = if e.direction == CT_FORWARD {
        (&me.client, &me.frontend, &me.backend, &me.seen_as)
    } else {
        (&me.backend, &me.seen_as, &me.frontend, &me.client)
    };
    k.src_port == src.port
        && k.dst_port == dst.port
        && e.nat_port == nat.port
        && e.snat_port == other.port
        && k.src_addr == src.addr
        && k.dst_addr == dst.addr
        && e.nat_addr == nat.addr
        && e.snat_addr == other.addr
}

/// Fills `w` with both entries of the flow `w.me`.
#[inline(always)]
fn entries(w: &mut Work, proto: u8, now: u64, state: u8, service_id: u32, backend_id: u32) {
    let me = w.me;
    let flags = if me.seen_as != me.client {
        CT_F_SNAT
    } else {
        0
    };
    w.fkey = key(me.client, me.frontend, proto);
    w.fwd = ConntrackEntry {
        last_seen_ns: now,
        nat_addr: me.backend.addr,
        nat_port: me.backend.port,
        direction: CT_FORWARD,
        flags,
        snat_addr: me.seen_as.addr,
        snat_port: me.seen_as.port,
        state,
        _pad: 0,
        backend_id,
        service_id,
    };
    w.rkey = key(me.backend, me.seen_as, proto);
    w.rev = ConntrackEntry {
        last_seen_ns: now,
        nat_addr: me.frontend.addr,
        nat_port: me.frontend.port,
        direction: CT_REPLY,
        flags,
        snat_addr: me.client.addr,
        snat_port: me.client.port,
        state,
        _pad: 0,
        backend_id,
        service_id,
    };
}

/// What a new flow needs recorded.
pub struct NewFlow {
    /// Its forward key (client -> frontend).
    pub client: FlowKey,
    pub now: u64,
    pub service_id: u32,
    pub backend_id: u32,
    pub backend: AddrPort,
    /// `CT_S_PICKUP` for a TCP flow first seen mid-stream, else 0.
    pub state: u8,
}

impl NewFlow {
    #[inline(always)]
    fn ends(&self, seen_as: AddrPort) -> Ends {
        Ends {
            client: AddrPort::new(self.client.src_addr, self.client.src_port),
            frontend: AddrPort::new(self.client.dst_addr, self.client.dst_port),
            backend: self.backend,
            seen_as,
        }
    }

    #[inline(always)]
    fn table(&self) -> Table {
        if self.client.proto == IPPROTO_TCP {
            Table::Syn
        } else {
            Table::Udp
        }
    }

    #[inline(always)]
    fn fill(&self, w: &mut Work, seen_as: AddrPort) {
        w.me = self.ends(seen_as);
        entries(
            w,
            self.client.proto,
            self.now,
            self.state,
            self.service_id,
            self.backend_id,
        );
    }
}

/// What recording a new flow did to its source.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Kept,
    /// Another live flow has the reply tuple this one would have (the
    /// same client port towards this backend through another frontend):
    /// nothing recorded; `record_snat` with the client's own address
    /// gives it another port, as netfilter's NAT does.
    Conflict,
    /// Translated to the address and port written to the out-parameter.
    Translated,
    /// No translated source was free: the flow is not recorded.
    Exhausted,
}

/// Records a new flow whose source stays as it is.
///
/// (Called from `pipeline::new_flow`, a function of its own for new flows.)
#[inline(always)]
pub fn record(f: &NewFlow, cfg: &DatapathConfig) -> Source {
    let Some(w) = work() else {
        return Source::Exhausted;
    };
    f.fill(w, AddrPort::new(f.client.src_addr, f.client.src_port));
    if let Some(h) = lookup_reply(&w.rkey, f.now, cfg) {
        if !ct_closed(h.e.state) && !same_flow(&w.rkey, &h.e, &w.me) {
            return Source::Conflict;
        }
        // A closed flow's tuple is free again: its reply entry goes, or it
        // would shadow ours from the table looked up first.
        if h.table != Table::Snat && h.table != f.table() {
            remove(h.table, &w.rkey);
        }
    }
    let t = f.table();
    put_any(t, &w.fkey, &w.fwd);
    put_any(t, &w.rkey, &w.rev);
    Source::Kept
}

/// Records a new flow whose source is translated to `addr` (the node's
/// SNAT address, or the client's own for a port remap) and a random free
/// port of the SNAT range. The port is claimed by creating its `lb_snat`
/// entry with BPF_NOEXIST, atomic between CPUs; an entry whose flow closed
/// or expired is taken over. `Exhausted`: every port tried is taken.
#[inline(always)]
pub fn record_snat(f: &NewFlow, addr: Addr, cfg: &DatapathConfig, out: &mut AddrPort) -> Source {
    let Some(w) = work() else {
        return Source::Exhausted;
    };
    if cfg.snat_port_max < cfg.snat_port_min {
        return Source::Exhausted;
    }
    let range = (cfg.snat_port_max - cfg.snat_port_min) as u32 + 1;
    // Never true; it lets the compiler drop its divide-by-zero panic path,
    // which the verifier would refuse.
    if range == 0 {
        return Source::Exhausted;
    }
    let remap = addr == f.client.src_addr;
    // First the port the flow's tuple hashes to with the agent's secret (a
    // retried SYN gets its port back: if a backend's TIME_WAIT refused the
    // first one, the client's RST has cleared it), then random ports: a
    // client whose first choice is taken is not stuck behind it.
    let keyed = (flow_hash(
        &f.client.src_addr,
        f.client.src_port,
        f.client.dst_port,
        f.client.proto,
    ) ^ cfg.snat_seed as u64) as u32;
    // Both entries once, with a placeholder port (never the client's, so
    // the entries are marked translated); each try sets its port below.
    f.fill(
        w,
        AddrPort {
            addr,
            port: f.client.src_port ^ 1,
        },
    );
    for i in 0..SNAT_PORT_TRIES {
        let r = if i == 0 {
            keyed
        } else {
            // SAFETY: a helper without arguments.
            unsafe { bpf_get_prandom_u32() }
        };
        let port = (cfg.snat_port_min as u32 + r % range) as u16;
        if remap && port == f.client.src_port {
            // The client's own tuple: not a translation.
            continue;
        }
        // Only the translated port differs between tries: three stores,
        // where refilling both entries and keys took dozens (the verifier
        // walks each try on every path into it).
        w.me.seen_as.port = port;
        w.fwd.snat_port = port;
        w.rkey.dst_port = port;
        // A remapped client port must not be one the client really uses
        // towards this backend in another, untranslated flow.
        if remap {
            if let Some(h) = lookup_plain_reply(&w.rkey, f.now) {
                if !ct_closed(h.e.state) {
                    continue;
                }
            }
        }
        // Ports a backend may still hold in TIME_WAIT only in the second
        // half of the tries.
        if claim(w, f.now, i >= SNAT_PORT_TRIES / 2) {
            put_any(f.table(), &w.fkey, &w.fwd);
            *out = AddrPort { addr, port };
            return Source::Translated;
        }
    }
    Source::Exhausted
}

/// Takes the translated source in `w` for its flow: a free one, the flow's
/// own, or one whose flow is over (closed or expired); one closed within a
/// TIME_WAIT only if `recent_ok`.
#[inline(always)]
fn claim(w: &Work, now: u64, recent_ok: bool) -> bool {
    if put(Table::Snat, &w.rkey, &w.rev, true) {
        return true;
    }
    let Some(p) = SNAT.get_ptr_mut(&w.rkey) else {
        return false;
    };
    // SAFETY: read in place (a copy would cost the port search's frame 56
    // bytes); a concurrent writer can at worst make this try fail.
    let old = unsafe { &*p };
    let mine = same_flow(&w.rkey, old, &w.me);
    let (last_seen, state) = (old.last_seen_ns, old.state);
    let live = ct_live(last_seen, now, w.rkey.proto, state);
    let closed = ct_closed(state);
    let recent = closed && now.saturating_sub(last_seen) < CT_SNAT_TIME_WAIT_NS;
    let free = mine || ((!live || closed) && (recent_ok || !recent));
    free && put(Table::Snat, &w.rkey, &w.rev, false)
}

/// Whether a closed flow still owns its reply tuple: a new flow may have
/// taken it over (its SNAT port, or the same client port towards the same
/// backend through another frontend). The closed flow's late packets must
/// then not reach the backend under the new flow's tuple.
#[inline(always)]
pub fn owns_reply(k: &FlowKey, h: &Hit, now: u64) -> bool {
    // The flow's ends and reply key in the per-CPU scratch: on the stack
    // they are 120 bytes of a stage that must fit 512 with what it calls.
    let Some(w) = work() else {
        return false;
    };
    w.me = ends(k, &h.e);
    w.rkey = key(w.me.backend, w.me.seen_as, k.proto);
    if h.e.flags & CT_F_SNAT != 0 {
        return match SNAT.get_ptr_mut(&w.rkey) {
            // SAFETY: read in place, at once.
            Some(p) => same_flow(&w.rkey, unsafe { &*p }, &w.me),
            None => false,
        };
    }
    match lookup_plain_reply(&w.rkey, now) {
        Some(r) => same_flow(&w.rkey, &r.e, &w.me),
        None => true,
    }
}

/// Removes a closed flow's entries from the plain tables before its tuple
/// starts a new flow (a client reusing its port). A `lb_snat` entry is left
/// to be taken over.
#[inline(always)]
pub fn forget(k: &FlowKey, h: &Hit) {
    // In the scratch, as in `owns_reply`.
    let Some(w) = work() else {
        return;
    };
    w.me = ends(k, &h.e);
    w.rkey = key(w.me.backend, w.me.seen_as, k.proto);
    remove(h.table, k);
    // The reply tuple may belong to a newer flow by now: only ours goes.
    remove_if_mine(h.table, &w.rkey, &w.me);
}

/// Deletes the entry for `k` in `t` if it is one of flow `me`'s.
#[inline(always)]
fn remove_if_mine(t: Table, k: &FlowKey, me: &Ends) {
    if let Some(p) = get_ptr(t, k) {
        // SAFETY: read through a map value pointer, at once.
        if same_flow(k, unsafe { &*p }, me) {
            remove(t, k);
        }
    }
}

/// Accounts a packet of a tracked flow: the state it moves the flow to
/// (both entries), the first reply promoting a TCP handshake to
/// `lb_ct_tcp`, and the idle timestamp (at most every `CT_REFRESH_NS`).
/// A partner entry is rewritten only if it belongs to this flow: an entry
/// another flow owns is never overwritten; a missing plain partner (LRU
/// eviction) is recreated.
#[inline(always)]
pub fn observe(k: &FlowKey, h: &Hit, tcp_flags: u8, now: u64) {
    let e = &h.e;
    let state = ct_next_state(e.state, tcp_flags, e.direction == CT_REPLY);
    if state == e.state && now.saturating_sub(e.last_seen_ns) < CT_REFRESH_NS {
        return;
    }
    update(k, h, state, now);
}

#[inline(always)]
fn update(k: &FlowKey, h: &Hit, state: u8, now: u64) {
    let Some(w) = work() else {
        return;
    };
    w.me = ends(k, &h.e);
    entries(w, k.proto, now, state, h.e.service_id, h.e.backend_id);
    let snat = h.e.flags & CT_F_SNAT != 0;
    let forward = h.e.direction == CT_FORWARD;
    // Where the forward entry lives (a reply entry in `lb_snat` does not
    // say: the TCP tables are asked).
    let fwd_table = match h.table {
        Table::Snat if k.proto != IPPROTO_TCP => Table::Udp,
        Table::Snat if get_ptr(Table::Tcp, &w.fkey).is_some() => Table::Tcp,
        Table::Snat => Table::Syn,
        t => t,
    };
    if fwd_table == Table::Syn && state & CT_S_REPLIED != 0 && !ct_closed(state) {
        promote(w, snat);
        return;
    }
    // SAFETY: plain stores into the map value; racing writers store
    // similar timestamps and a superset of state bits at worst.
    unsafe {
        (*h.ptr).state = state;
        (*h.ptr).last_seen_ns = now;
    }
    let (pkey, pval, ptable) = if forward {
        (&w.rkey, &w.rev, if snat { Table::Snat } else { h.table })
    } else {
        (&w.fkey, &w.fwd, fwd_table)
    };
    match get_ptr(ptable, pkey) {
        Some(p) => {
            // SAFETY: as above; identity checked on a copy first.
            if same_flow(pkey, unsafe { &*p }, &w.me) {
                unsafe {
                    (*p).state = state;
                    (*p).last_seen_ns = now;
                }
            }
        }
        // A lost `lb_snat` entry is never recreated here: its port may
        // belong to another flow by now. Nor is a closed flow's entry, or
        // a reply entry whose tuple another live flow has taken since.
        None if ptable != Table::Snat && !ct_closed(state) => {
            if !forward || lookup_plain_reply(pkey, now).is_none() {
                put(ptable, pkey, pval, true);
            }
        }
        None => {}
    }
}

/// Moves the flow in `w`, which the backend just answered, from
/// `lb_ct_syn` to `lb_ct_tcp`.
#[inline(always)]
fn promote(w: &Work, snat: bool) {
    put_any(Table::Tcp, &w.fkey, &w.fwd);
    if CT_SYN.remove(&w.fkey).is_ok() {
        count_stat(ct_stat::SYN_DELETED);
    }
    if snat {
        if let Some(p) = SNAT.get_ptr_mut(&w.rkey) {
            // SAFETY: plain stores; identity checked on a copy first.
            if same_flow(&w.rkey, unsafe { &*p }, &w.me) {
                unsafe {
                    (*p).state = w.rev.state;
                    (*p).last_seen_ns = w.rev.last_seen_ns;
                }
            }
        }
    } else {
        put_any(Table::Tcp, &w.rkey, &w.rev);
        remove_if_mine(Table::Syn, &w.rkey, &w.me);
    }
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
