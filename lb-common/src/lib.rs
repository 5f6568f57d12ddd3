//! Types shared by the kernel datapath (`lb-ebpf`) and the agent (`lb`).
//!
//! Every map key and value lives here, once, as a `#[repr(C)]` struct with
//! explicit padding, so `bpftool map dump` shows the same field names the
//! code uses. Conventions, chosen so dumps read naturally:
//! - Addresses are `Addr`, 16 bytes in wire order for both families
//!   (bpftool prints the octets; IPv4 as `::ffff:a.b.c.d`).
//! - Ports are `u16` in host byte order (bpftool prints the number).
#![no_std]

pub mod addr;
pub mod hash;

pub use addr::{Addr, ADDR_UNSPECIFIED};

/// Map names. The pinned files under the pin directory carry these names.
/// Kernel map names are limited to 15 characters.
pub mod map_names {
    pub const FRONTENDS: &str = "lb_frontends";
    pub const BACKENDS: &str = "lb_backends";
    pub const MAGLEV: &str = "lb_maglev";
    /// Established TCP flows (the backend answered).
    pub const CT_TCP: &str = "lb_ct_tcp";
    /// TCP flows the backend has not answered yet (handshakes, pickups).
    pub const CT_SYN: &str = "lb_ct_syn";
    pub const CT_UDP: &str = "lb_ct_udp";
    /// Reply sides of flows whose source is translated (SNAT, port remap).
    pub const SNAT: &str = "lb_snat";
    pub const FRAGS: &str = "lb_frags";
    pub const REJECT_LIMIT: &str = "lb_reject_rl";
    pub const CT_STATS: &str = "lb_ct_stats";
    pub const AFFINITY: &str = "lb_affinity";
    pub const VERDICTS: &str = "lb_verdicts";
    pub const SERVICE_STATS: &str = "lb_svc_stats";
    pub const CONFIG: &str = "lb_config";
    pub const SOURCE_RANGES: &str = "lb_src_ranges";
    pub const SOCK_REVERSE: &str = "lb_sock_rev";
    /// Sources inside the cluster (pod CIDRs): see `FRONTEND_VIEW_IN_CLUSTER`.
    pub const CLUSTER_CIDRS: &str = "lb_cluster_cidrs";
    /// Service-port names, for `lb services` and friends.
    pub const SERVICE_NAMES: &str = "lb_svc_names";
    pub const ALL: [&str; 18] = [
        FRONTENDS,
        BACKENDS,
        MAGLEV,
        CT_TCP,
        CT_SYN,
        CT_UDP,
        SNAT,
        FRAGS,
        REJECT_LIMIT,
        CT_STATS,
        AFFINITY,
        VERDICTS,
        SERVICE_STATS,
        CONFIG,
        SOURCE_RANGES,
        SOCK_REVERSE,
        CLUSTER_CIDRS,
        SERVICE_NAMES,
    ];
}

/// Program names in the object file.
pub mod program_names {
    pub const TC: &str = "lb_tc_ingress";
    /// TC egress: replies sent by the node's own stack (see lb-ebpf).
    pub const TC_EGRESS: &str = "lb_tc_egress";
    pub const XDP: &str = "lb_xdp";
    /// cgroup/connect4: the node's own sockets to a frontend.
    pub const SOCK_CONNECT4: &str = "lb_sock_connect4";
    pub const SOCK_SENDMSG4: &str = "lb_sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "lb_sock_recvmsg4";
    pub const SOCK_PEER4: &str = "lb_sock_peer4";
    /// The same for IPv6 sockets.
    pub const SOCK_CONNECT6: &str = "lb_sock_connect6";
    pub const SOCK_SENDMSG6: &str = "lb_sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "lb_sock_recvmsg6";
    pub const SOCK_PEER6: &str = "lb_sock_peer6";
    pub const SOCK_ALL: [&str; 8] = [
        SOCK_CONNECT4,
        SOCK_SENDMSG4,
        SOCK_RECVMSG4,
        SOCK_PEER4,
        SOCK_CONNECT6,
        SOCK_SENDMSG6,
        SOCK_RECVMSG6,
        SOCK_PEER6,
    ];
}

/// Map capacities. The agent rejects desired states that would not fit.
pub const MAX_FRONTENDS: u32 = 1 << 18;
/// Service ids are `1..MAX_SERVICES`; 0 is never allocated.
pub const MAX_SERVICES: u32 = 1 << 17;
/// Backend ids are `1..MAX_BACKENDS`; 0 is never allocated.
pub const MAX_BACKENDS: u32 = 1 << 19;
/// Capacity of each conntrack table as compiled into the object. The agent
/// always sets the real sizes at load time (`MapSizes` in the agent:
/// derived from the node's memory, or `--conntrack-max`).
pub const CT_DEFAULT_ENTRIES: u32 = 1 << 16;
/// In-flight fragmented datagrams whose later fragments can be translated.
pub const MAX_FRAGS: u32 = 1 << 14;
pub const MAX_AFFINITY: u32 = 1 << 16;
/// loadBalancerSourceRanges entries, all services together.
pub const MAX_SOURCE_RANGES: u32 = 1 << 16;
/// Sockets whose destination the connect/sendmsg hooks rewrote (for
/// getpeername and the source of received UDP datagrams).
pub const MAX_SOCK_REVERSE: u32 = 1 << 16;

/// `BPF_F_INNER_MAP`: lets inner Maglev arrays of one outer map differ in size.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: the agent fills a new Maglev array through mmap, one
/// memcpy instead of one syscall per slot.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Flags of every inner Maglev array (the kernel requires them equal to the
/// template's).
pub const MAGLEV_INNER_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Conntrack idle timeouts, by protocol and state (see `ct_timeout_ns`).
/// TCP: a handshake (or a picked-up flow) the backend has not answered
/// 60 s and a closed flow (RST, or FIN both ways) 10 s, as Cilium; an
/// established flow 6 h (Cilium's default; kube-proxy sets netfilter's to
/// 24 h); half-closed (one FIN) 1 h, kube-proxy's close_wait. UDP:
/// netfilter's defaults, 30 s before a reply and 120 s after.
pub const CT_TIMEOUT_SYN_NS: u64 = 60 * SECOND_NS;
pub const CT_TIMEOUT_TCP_NS: u64 = 6 * 3600 * SECOND_NS;
pub const CT_TIMEOUT_HALF_CLOSED_NS: u64 = 3600 * SECOND_NS;
pub const CT_TIMEOUT_CLOSED_NS: u64 = 10 * SECOND_NS;
pub const CT_TIMEOUT_UDP_NEW_NS: u64 = 30 * SECOND_NS;
pub const CT_TIMEOUT_UDP_NS: u64 = 120 * SECOND_NS;
const SECOND_NS: u64 = 1_000_000_000;

/// `ConntrackEntry::state` bits. Both entries of a flow carry the same bits.
/// The backend answered (TCP: the flow is in `lb_ct_tcp`).
pub const CT_S_REPLIED: u8 = 1 << 0;
/// The client sent a FIN.
pub const CT_S_FIN_FWD: u8 = 1 << 1;
/// The backend sent a FIN.
pub const CT_S_FIN_REV: u8 = 1 << 2;
/// Either side sent a RST.
pub const CT_S_RST: u8 = 1 << 3;
/// A TCP flow first seen mid-stream (no SYN): translated to the Maglev
/// choice, like netfilter's loose pickup.
pub const CT_S_PICKUP: u8 = 1 << 4;

/// TCP flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A flow is over: a RST, or a FIN each way. Its SNAT port is free again.
pub const fn ct_closed(state: u8) -> bool {
    state & CT_S_RST != 0 || state & (CT_S_FIN_FWD | CT_S_FIN_REV) == (CT_S_FIN_FWD | CT_S_FIN_REV)
}

/// How long an entry in `state` lives without traffic.
pub const fn ct_timeout_ns(proto: u8, state: u8) -> u64 {
    if proto != IPPROTO_TCP {
        return if state & CT_S_REPLIED != 0 {
            CT_TIMEOUT_UDP_NS
        } else {
            CT_TIMEOUT_UDP_NEW_NS
        };
    }
    if ct_closed(state) {
        CT_TIMEOUT_CLOSED_NS
    } else if state & CT_S_REPLIED == 0 {
        CT_TIMEOUT_SYN_NS
    } else if state & (CT_S_FIN_FWD | CT_S_FIN_REV) != 0 {
        CT_TIMEOUT_HALF_CLOSED_NS
    } else {
        CT_TIMEOUT_TCP_NS
    }
}

/// The state after a packet with TCP `flags` (0 for UDP) went through,
/// `from_backend` telling its direction. A first reply marks the flow
/// replied (TCP: established).
pub const fn ct_next_state(state: u8, flags: u8, from_backend: bool) -> u8 {
    let mut s = state;
    if from_backend {
        s |= CT_S_REPLIED;
    }
    if flags & TCP_RST != 0 {
        s |= CT_S_RST;
    }
    if flags & TCP_FIN != 0 {
        s |= if from_backend {
            CT_S_FIN_REV
        } else {
            CT_S_FIN_FWD
        };
    }
    s
}

/// How long a closed flow's SNAT port is remembered as recently used: the
/// TIME_WAIT (60 s in Linux) a backend that closed first keeps for the
/// tuple. A new SYN on that tuple is refused half of the time (its
/// sequence number is random), so such ports are taken only when fresher
/// ones are not found.
pub const CT_SNAT_TIME_WAIT_NS: u64 = 60 * SECOND_NS;

/// Whether a `lb_snat` entry is kept (the agent's sweep removes the rest):
/// alive, or closed within `CT_SNAT_TIME_WAIT_NS`.
pub const fn snat_entry_kept(last_seen_ns: u64, now: u64, proto: u8, state: u8) -> bool {
    ct_live(last_seen_ns, now, proto, state)
        || (ct_closed(state) && now.saturating_sub(last_seen_ns) < CT_SNAT_TIME_WAIT_NS)
}

/// Whether an entry last seen at `last_seen_ns` is still alive at `now`.
/// An entry stamped after `now` was read is alive: another CPU refreshed
/// it meanwhile, or the agent's sweep read its clock before walking the
/// table and a flow began during the walk. (Subtracting with wraparound
/// made such a brand-new flow look ages old, and the sweep deleted it: a
/// connection opened just as a sweep ran lost its state mid-handshake.)
pub const fn ct_live(last_seen_ns: u64, now: u64, proto: u8, state: u8) -> bool {
    now.saturating_sub(last_seen_ns) < ct_timeout_ns(proto, state)
}

/// A conntrack entry's `last_seen_ns` is refreshed at most this often, so
/// established flows do not write to a shared cache line on every packet.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Key of `lb_frontends` (HASH): an address, port and protocol a Service
/// answers on (ClusterIP, or NodePort on a node address), and for whom.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: Addr,
    pub port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    /// `FRONTEND_VIEW_*` (agents before it was added wrote 0 here).
    pub view: u8,
}

/// `FrontendKey::view`: the frontend as everyone reaches it.
pub const FRONTEND_VIEW_ALL: u8 = 0;
/// `FrontendKey::view`: an external frontend (NodePort, externalIP,
/// load-balancer IP) with externalTrafficPolicy Local as clients inside the
/// cluster reach it: pods (sources in `lb_cluster_cidrs`) and the node's
/// own sockets. Like kube-proxy's "short-circuit" rules, they get the
/// endpoints internalTrafficPolicy gives the ClusterIP, not only this
/// node's. Present only for such frontends.
pub const FRONTEND_VIEW_IN_CLUSTER: u8 = 1;

/// Most prefixes `lb_cluster_cidrs` holds (`--cluster-cidr` and the Node's
/// podCIDRs).
pub const MAX_CLUSTER_CIDRS: u32 = 64;

/// Key of `lb_maglev`: a service port's table *and its size*. A frontend
/// names the table by both (`ServiceEntry::id`, `ServiceEntry::table_size`),
/// so a packet always finds a table of the size its slot was computed for:
/// a table of another size is a new entry, written before the frontends
/// point at it and removed after they no longer do.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    pub service_id: u32,
    pub table_size: u32,
}

/// One element of an inner Maglev array: the same slot of the table's two
/// halves, A (`[0]`) and B (`[1]`). The agent rewrites the half no
/// frontend reads and then flips the frontends (`SERVICE_F_TABLE_B`), so an
/// endpoint change needs no new inner map and no map-in-map update (the
/// kernel waits an RCU grace period, ~7 ms, after each of those).
///
/// Element 0 is the header: each half's generation, 0 while the agent
/// writes that half. Elements `1..=M` are the slots. A reader checks its
/// half's generation before and after reading its slot (a seqlock): a slot
/// read while its half was rewritten is never used. Interleaving the halves
/// costs no memory: the kernel stores array elements at an 8-byte stride,
/// so a lone `u32` slot took 8 bytes too.
pub type MaglevSlots = [u32; 2];

/// Elements of the inner array of a table of size `m`.
pub const fn maglev_elements(m: u32) -> u32 {
    m + 1
}

/// Entries of `lb_maglev`: two per service, for the moment a table changes
/// size.
pub const MAX_MAGLEV_TABLES: u32 = 2 * MAX_SERVICES;

/// Value of `lb_frontends`: the service port a frontend belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Service-port id: key of `lb_maglev` and index of `lb_svc_stats`.
    pub id: u32,
    /// Maglev table size M of the current table (0 with no usable backend).
    pub table_size: u32,
    /// Usable backends in the table. 0 means: refuse new flows at once.
    pub backend_count: u32,
    /// sessionAffinity ClientIP timeout; used only with `SERVICE_F_AFFINITY`.
    pub affinity_timeout_s: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// `ServiceEntry::flags`: sessionAffinity is ClientIP.
pub const SERVICE_F_AFFINITY: u8 = 1 << 0;
/// `ServiceEntry::flags`: an external frontend (NodePort, externalIP,
/// load-balancer ingress IP). With traffic policy Cluster, a flow to a
/// backend on another node is SNATed to the node address, so the reply
/// comes back through this node.
pub const SERVICE_F_EXTERNAL: u8 = 1 << 1;
/// `ServiceEntry::flags`: traffic policy Local (externalTrafficPolicy for
/// external frontends, internalTrafficPolicy for ClusterIPs). The table
/// holds only this node's endpoints; with none, traffic is dropped (not
/// refused) and the client's address is kept.
pub const SERVICE_F_LOCAL: u8 = 1 << 2;
/// `ServiceEntry::flags`: a load-balancer ingress IP with
/// loadBalancerSourceRanges; sources outside `lb_src_ranges` are dropped.
pub const SERVICE_F_SOURCE_RANGES: u8 = 1 << 3;
/// `ServiceEntry::flags`: new flows read half B of the Maglev table (see
/// `MaglevSlots`); without it, half A.
pub const SERVICE_F_TABLE_B: u8 = 1 << 4;

/// Value of `lb_backends` (ARRAY indexed by backend id): one endpoint of one
/// service port. Ids are per service port so a conntrack or affinity entry
/// can check its backend still belongs to the service that chose it.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: Addr,
    pub port: u16,
    /// `BACKEND_F_*` bits; 0 means the slot is free.
    pub flags: u8,
    pub _pad: u8,
    pub service_id: u32,
}

/// `Backend::flags`: the slot holds a backend.
pub const BACKEND_F_PRESENT: u8 = 1 << 0;
/// `Backend::flags`: the endpoint is terminating (it keeps its flows).
pub const BACKEND_F_TERMINATING: u8 = 1 << 1;
/// `Backend::flags`: the endpoint is in the service's current Maglev table,
/// so it takes new flows (sessionAffinity may lead only to these).
pub const BACKEND_F_USABLE: u8 = 1 << 2;
/// `Backend::flags`: the endpoint runs on this node (its `nodeName` is the
/// agent's `--node-name`); replies from it pass through this node anyway.
pub const BACKEND_F_LOCAL: u8 = 1 << 3;

/// Key of the conntrack tables (`lb_ct_tcp`, `lb_ct_syn`, `lb_ct_udp`,
/// `lb_snat`): a flow as seen on the wire in one direction. A translated
/// flow has two entries: the client's direction (client -> frontend) and
/// the backend's reply direction (backend -> client, or backend -> the
/// translated source when `CT_F_SNAT`; that one lives in `lb_snat`).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: Addr,
    pub dst_addr: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of the conntrack tables.
///
/// A SNATed flow (hairpin, or external traffic to another node's backend)
/// is keyed on the reply side by the node address and the allocated port,
/// so two clients' flows to one backend never share a reply key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackEntry {
    /// `bpf_ktime_get_ns()` when a packet of the flow was last seen
    /// (refreshed at most every `CT_REFRESH_NS`).
    pub last_seen_ns: u64,
    /// `CT_FORWARD`: the backend to send to. `CT_REPLY`: the frontend to
    /// restore as the source.
    pub nat_addr: Addr,
    pub nat_port: u16,
    /// `CT_FORWARD` or `CT_REPLY`.
    pub direction: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// With `CT_F_SNAT`. `CT_FORWARD`: the node address and port to write
    /// as the source. `CT_REPLY`: the client address and port to restore as
    /// the destination.
    pub snat_addr: Addr,
    pub snat_port: u16,
    /// `CT_S_*` bits: what the flow has seen (TCP handshake and close).
    pub state: u8,
    pub _pad: u8,
    pub backend_id: u32,
    pub service_id: u32,
}

pub const CT_FORWARD: u8 = 1;
pub const CT_REPLY: u8 = 2;
/// `ConntrackEntry::flags`: the source is translated too.
pub const CT_F_SNAT: u8 = 1 << 0;

/// Value of `lb_config` (ARRAY of one): node facts the datapath needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// The node's IPv4 address SNAT and hairpin masquerade use for IPv4
    /// flows (the first IPv4 `--node-ip`, or the Node's); all zero: none,
    /// IPv4 flows are not masqueraded.
    pub snat_addr4: Addr,
    /// The same for IPv6 flows.
    pub snat_addr6: Addr,
    /// SNAT source ports are taken from `snat_port_min..=snat_port_max`.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `LAYOUT_VERSION` of the agent that wrote this: a later agent finding
    /// another version recreates the maps instead of adopting them.
    pub layout_version: u32,
    /// Network namespace cookie of the node. 0 until the agent wrote the
    /// config: the socket hooks translate nothing before that.
    pub netns_cookie: u64,
    /// `CONFIG_F_*` bits. (Agents before these flags wrote 0 here, which
    /// means what they did: socket hooks for the node's namespace only.)
    pub flags: u32,
    /// Secret the first SNAT port a flow tries is hashed with (random per
    /// agent start): a client's retried SYN gets the same port back, and
    /// nobody outside can aim at the ports a client will get.
    pub snat_seed: u32,
}

impl DatapathConfig {
    /// The node address a flow from `client` is masqueraded to: the one of
    /// the client's family (all zero if the node has none).
    #[inline(always)]
    pub fn snat_addr_for(&self, client: &Addr) -> Addr {
        addr::select(addr::v4_mask(client), &self.snat_addr4, &self.snat_addr6)
    }
}

/// `DatapathConfig::flags`: the socket hooks translate sockets of every
/// network namespace (pods too, like Cilium's socket LB), not only the
/// node's own (`--socket-lb-host-only` clears it).
pub const CONFIG_F_SOCK_ALL_NETNS: u32 = 1 << 0;
/// `DatapathConfig::flags`: a new flow to a ClusterIP from a source
/// outside the cluster (not in `lb_cluster_cidrs`, not the node) is
/// masqueraded to the node address, as kube-proxy does when it knows the
/// cluster's pod ranges (`--external-cluster-ip masquerade`).
pub const CONFIG_F_EXTERNAL_CLUSTER_IP_MASQ: u32 = 1 << 1;
/// `DatapathConfig::flags`: such a flow is dropped (counted
/// `drop_source_range`), as Cilium does by default
/// (`--external-cluster-ip drop`).
pub const CONFIG_F_EXTERNAL_CLUSTER_IP_DROP: u32 = 1 << 2;

/// Bumped whenever a pinned map's key or value changes meaning without
/// changing size (size changes are caught from the maps themselves).
/// 3: Maglev inner arrays hold two halves and a header (`MaglevSlots`).
/// 4: addresses are 16 bytes (`Addr`), IPv4 mapped.
pub const LAYOUT_VERSION: u32 = 4;

/// Default SNAT port range: above Linux's default ephemeral range
/// (32768-60999), so translated flows never take a 4-tuple a local socket
/// could use, and clear of the NodePort range (30000-32767).
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;
/// Random ports tried before a new SNAT flow is dropped (counted as
/// `drop_snat_exhausted`): with 90% of the range taken, 3% of new flows.
pub const SNAT_PORT_TRIES: u32 = 32;

/// Key of `lb_frags` (LRU_HASH): one fragmented datagram, as the IP
/// header names it.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src_addr: Addr,
    pub dst_addr: Addr,
    /// IP identification (IPv4: 16 bits; IPv6: the fragment header's 32),
    /// host order.
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of `lb_frags`: the ports of the datagram's first fragment, so the
/// later ones (which carry no L4 header) follow its translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragPorts {
    pub src_port: u16,
    pub dst_port: u16,
}

/// Value of `lb_reject_rl` (ARRAY of one): the refusal token bucket, like
/// the kernel's global ICMP limit (`icmp_msgs_per_sec` 1000,
/// `icmp_msgs_burst` 50). Updated without locks: a race lets a few more
/// through, never fewer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RejectLimit {
    /// Credit in nanoseconds of refill time, capped at the burst.
    pub credit_ns: u64,
    pub last_ns: u64,
}

pub const REJECT_PER_SEC: u64 = 1000;
pub const REJECT_BURST: u64 = 50;
pub const REJECT_COST_NS: u64 = SECOND_NS / REJECT_PER_SEC;

/// Indexes of `lb_ct_stats` (PERCPU_ARRAY of u64): entries the datapath
/// created or deleted, per table; the agent derives evictions from them.
pub mod ct_stat {
    pub const TCP_CREATED: u32 = 0;
    pub const SYN_CREATED: u32 = 1;
    pub const UDP_CREATED: u32 = 2;
    pub const SNAT_CREATED: u32 = 3;
    /// Entries the datapath deleted: handshakes moved to `lb_ct_tcp`, and
    /// closed flows whose tuple a client reused.
    pub const SYN_DELETED: u32 = 4;
    pub const TCP_DELETED: u32 = 5;
    pub const UDP_DELETED: u32 = 6;
    pub const COUNT: u32 = 8;
}

/// Data of the `lb_src_ranges` key (LPM_TRIE, key = prefix length then
/// this): service id then source prefix. The prefix length counts the 32
/// bits of `service_id` (always matched whole) plus the address prefix.
/// Value: `SOURCE_RANGE_ALLOW`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    /// Big-endian, so the trie compares it byte by byte as a whole.
    pub service_id: [u8; 4],
    pub addr: Addr,
}

pub const SOURCE_RANGE_ALLOW: u32 = 1;

/// Key of `lb_sock_rev` (LRU_HASH): a socket the connect/sendmsg hooks
/// translated, and the backend it now talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockReverseKey {
    pub cookie: u64,
    pub backend_addr: Addr,
    pub backend_port: u16,
    pub _pad: [u8; 6],
}

/// Value of `lb_sock_rev`: the frontend the socket asked for.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockReverseEntry {
    pub frontend_addr: Addr,
    pub frontend_port: u16,
    pub _pad: u16,
}

/// Key of `lb_affinity` (LRU_HASH): sessionAffinity ClientIP state.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client_addr: Addr,
    pub service_id: u32,
}

/// Value of `lb_affinity`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityEntry {
    /// `bpf_ktime_get_ns()` of the last new connection that used it.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// Value of `lb_verdicts` (PERCPU_ARRAY indexed by `Verdict`) and of
/// `lb_svc_stats` (PERCPU_ARRAY indexed by service id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// What the datapath did with a packet; the index into `lb_verdicts`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// TCP/UDP, not for a frontend, not a reply: untouched.
    PassNotService = 0,
    /// Neither IPv4 nor IPv6: untouched.
    PassNotIp = 1,
    /// IP but neither TCP/UDP nor an ICMP error: untouched.
    PassOtherProtocol = 2,
    /// A later fragment of a datagram whose first fragment was not seen
    /// (or not translated): untouched.
    PassFragment = 3,
    /// First packet of a flow to a frontend: backend chosen, translated.
    DnatNew = 4,
    /// A packet of a tracked flow: translated to its recorded backend.
    DnatEstablished = 5,
    /// A backend's reply: source restored to the frontend.
    ReplyNat = 6,
    /// New flow to a frontend with no usable backend: ICMP port unreachable sent.
    RejectNoBackend = 7,
    /// Truncated or inconsistent headers: passed untouched (the kernel's own
    /// checks drop them), never translated.
    PassMalformed = 8,
    /// A reject could not be built (for example, IP options on the packet).
    DropRejectFailed = 9,
    /// A new flow whose backend came from sessionAffinity state.
    DnatAffinity = 10,
    /// A frontend whose table or backend entry is missing or stale (a
    /// transient while the agent rewrites a service): dropped, the client
    /// retransmits.
    DropNoBackendEntry = 11,
    /// A load-balancer address whose loadBalancerSourceRanges exclude the
    /// client: dropped.
    DropSourceRange = 12,
    /// Traffic policy Local and no endpoint on this node: dropped.
    DropNoLocalBackend = 13,
    /// No free SNAT port for a new flow that needs one: dropped.
    DropSnatExhausted = 14,
    /// An ICMP error about a translated flow, translated back.
    IcmpErrorNat = 15,
    /// A socket of the node connected (or sent) to a frontend: translated
    /// at the socket by the cgroup hooks.
    SockTranslated = 16,
    /// A TCP FIN, RST or SYN-ACK to a frontend with no conntrack entry:
    /// dropped, as kube-proxy drops conntrack INVALID packets.
    DropCtInvalid = 17,
    /// A mid-stream TCP packet to a frontend with no conntrack entry (lost
    /// state): sent to the Maglev choice and tracked (netfilter's pickup).
    DnatPickup = 18,
    /// A refusal over the rate limit: dropped without an ICMP error.
    DropRejectLimited = 19,
    /// A later fragment translated as its datagram's first fragment was.
    FragmentNat = 20,
}

pub const VERDICT_COUNT: u32 = 21;

impl Verdict {
    pub const ALL: [Verdict; VERDICT_COUNT as usize] = [
        Verdict::PassNotService,
        Verdict::PassNotIp,
        Verdict::PassOtherProtocol,
        Verdict::PassFragment,
        Verdict::DnatNew,
        Verdict::DnatEstablished,
        Verdict::ReplyNat,
        Verdict::RejectNoBackend,
        Verdict::PassMalformed,
        Verdict::DropRejectFailed,
        Verdict::DnatAffinity,
        Verdict::DropNoBackendEntry,
        Verdict::DropSourceRange,
        Verdict::DropNoLocalBackend,
        Verdict::DropSnatExhausted,
        Verdict::IcmpErrorNat,
        Verdict::SockTranslated,
        Verdict::DropCtInvalid,
        Verdict::DnatPickup,
        Verdict::DropRejectLimited,
        Verdict::FragmentNat,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::PassNotService => "pass_not_service",
            Verdict::PassNotIp => "pass_not_ip",
            Verdict::PassOtherProtocol => "pass_other_protocol",
            Verdict::PassFragment => "pass_fragment",
            Verdict::DnatNew => "dnat_new",
            Verdict::DnatEstablished => "dnat_established",
            Verdict::ReplyNat => "reply_nat",
            Verdict::RejectNoBackend => "reject_no_backend",
            Verdict::PassMalformed => "pass_malformed",
            Verdict::DropRejectFailed => "drop_reject_failed",
            Verdict::DnatAffinity => "dnat_affinity",
            Verdict::DropNoBackendEntry => "drop_no_backend_entry",
            Verdict::DropSourceRange => "drop_source_range",
            Verdict::DropNoLocalBackend => "drop_no_local_backend",
            Verdict::DropSnatExhausted => "drop_snat_exhausted",
            Verdict::IcmpErrorNat => "icmp_error_nat",
            Verdict::SockTranslated => "sock_translated",
            Verdict::DropCtInvalid => "drop_ct_invalid",
            Verdict::DnatPickup => "dnat_pickup",
            Verdict::DropRejectLimited => "drop_reject_limited",
            Verdict::FragmentNat => "fragment_nat",
        }
    }
}

// Layouts are part of the pinned-map contract: catch accidental changes.
const _: () = {
    assert!(core::mem::size_of::<FrontendKey>() == 20);
    assert!(core::mem::size_of::<ServiceEntry>() == 20);
    assert!(core::mem::size_of::<Backend>() == 24);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<ConntrackEntry>() == 56);
    assert!(core::mem::size_of::<DatapathConfig>() == 56);
    assert!(core::mem::size_of::<SourceRange>() == 20);
    assert!(core::mem::size_of::<SockReverseKey>() == 32);
    assert!(core::mem::size_of::<SockReverseEntry>() == 20);
    assert!(core::mem::align_of::<ConntrackEntry>() == 8);
    assert!(core::mem::size_of::<AffinityKey>() == 20);
    assert!(core::mem::size_of::<AffinityEntry>() == 16);
    assert!(core::mem::size_of::<Counter>() == 16);
    assert!(core::mem::size_of::<FragKey>() == 40);
    assert!(core::mem::size_of::<FragPorts>() == 4);
    assert!(core::mem::size_of::<RejectLimit>() == 16);
};

/// Value of `lb_svc_names` (HASH keyed by service id, allocated per
/// entry): a service port's name (`namespace/name:port/PROTO[/local]`),
/// UTF-8, NUL-padded. The agent writes it so that `lb services` and the
/// other inspection commands show names from the pins alone, with or
/// without a running agent; no program reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub bytes: [u8; SERVICE_NAME_LEN],
}

/// Bytes of a `ServiceName`: a namespace (63) and a name (63) alone could
/// take more, so a longer name is cut (at a character boundary).
pub const SERVICE_NAME_LEN: usize = 128;

impl ServiceName {
    pub fn new(name: &str) -> ServiceName {
        let mut end = name.len().min(SERVICE_NAME_LEN);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; SERVICE_NAME_LEN];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        ServiceName { bytes }
    }

    /// The name, up to the first NUL (empty if it is not UTF-8).
    pub fn as_str(&self) -> &str {
        let end = self
            .bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(SERVICE_NAME_LEN);
        core::str::from_utf8(&self.bytes[..end]).unwrap_or("")
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), Copy, has explicit padding fields and no
    // implicit padding (sizes asserted above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::Addr {}
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::ServiceEntry {}
    unsafe impl aya::Pod for super::MaglevKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::ConntrackEntry {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityEntry {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::SourceRange {}
    unsafe impl aya::Pod for super::SockReverseKey {}
    unsafe impl aya::Pod for super::SockReverseEntry {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragPorts {}
    unsafe impl aya::Pod for super::RejectLimit {}
    unsafe impl aya::Pod for super::ServiceName {}
}
