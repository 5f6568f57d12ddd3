//! Every map of the datapath, in one place. Keys and values are documented
//! in `lb-common`; these are BTF maps so `bpftool map dump` names the fields.

use aya_ebpf::{
    btf_maps::{Array, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    ct_stat, Addr, AffinityEntry, AffinityKey, Backend, ConntrackEntry, Counter, DatapathConfig, FlowKey,
    FragKey, FragPorts, FrontendKey, MaglevKey, MaglevSlots, RejectLimit, ServiceEntry, SockReverseEntry, SockReverseKey,
    SourceRange, CT_DEFAULT_ENTRIES, MAGLEV_INNER_FLAGS, MAX_AFFINITY, MAX_BACKENDS, MAX_FRAGS,
    MAX_FRONTENDS, MAX_MAGLEV_TABLES, MAX_SERVICES, MAX_SOCK_REVERSE, MAX_SOURCE_RANGES, MAX_CLUSTER_CIDRS, ServiceName, VERDICT_COUNT,
};

/// (address, port, protocol) -> service port.
#[btf_map(name = "lb_frontends")]
pub static FRONTENDS: HashMap<FrontendKey, ServiceEntry, { MAX_FRONTENDS as usize }> =
    HashMap::new();

/// Backend id -> endpoint address and port.
#[btf_map(name = "lb_backends")]
pub static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// Maglev tables: (service id, M) -> inner ARRAY[M + 1] of `MaglevSlots`
/// (a header, then slot i of halves A and B). The agent rewrites the half
/// the frontends do not name, then flips them; `select::table_slot` never
/// uses a slot of a half being rewritten. `BPF_F_INNER_MAP` lets M differ
/// per service (the template's size of 1 is not used).
pub type MaglevTable = Array<MaglevSlots, 1, { MAGLEV_INNER_FLAGS as usize }>;
#[btf_map(name = "lb_maglev")]
pub static MAGLEV: HashOfMaps<MaglevKey, MaglevTable, { MAX_MAGLEV_TABLES as usize }> =
    HashOfMaps::new();

/// A conntrack table. All three have this type (the agent sets each one's
/// real size at load time), so one code path serves them all.
pub type CtTable = LruHashMap<FlowKey, ConntrackEntry, { CT_DEFAULT_ENTRIES as usize }>;

/// Established TCP flows, both directions. Only flows the backend answered
/// get here, so a SYN or UDP flood cannot evict them.
#[btf_map(name = "lb_ct_tcp")]
pub static CT_TCP: CtTable = LruHashMap::new();

/// TCP flows waiting for the backend's first answer (handshakes, pickups).
#[btf_map(name = "lb_ct_syn")]
pub static CT_SYN: CtTable = LruHashMap::new();

/// UDP flows, both directions.
#[btf_map(name = "lb_ct_udp")]
pub static CT_UDP: CtTable = LruHashMap::new();

/// Reply sides of flows whose source is translated (SNAT to the node, or a
/// remapped client port), keyed as the reply arrives. Not LRU: an entry is
/// never evicted while its flow lives, so a translated source is never
/// handed to a second flow; the agent deletes expired entries, and a new
/// flow takes over a closed or expired one.
#[btf_map(name = "lb_snat")]
pub static SNAT: HashMap<FlowKey, ConntrackEntry, { CT_DEFAULT_ENTRIES as usize }> = HashMap::new();

/// Fragmented datagrams: the first fragment's ports, for the later ones.
#[btf_map(name = "lb_frags")]
pub static FRAGS: LruHashMap<FragKey, FragPorts, { MAX_FRAGS as usize }> = LruHashMap::new();

/// The refusal (ICMP port unreachable) token bucket.
#[btf_map(name = "lb_reject_rl")]
pub static REJECT_LIMIT: Array<RejectLimit, 1> = Array::new();

/// Conntrack entries created and deleted by the datapath, per CPU.
#[btf_map(name = "lb_ct_stats")]
pub static CT_STATS: PerCpuArray<u64, { ct_stat::COUNT as usize }> = PerCpuArray::new();

/// sessionAffinity ClientIP: (client, service) -> backend.
#[btf_map(name = "lb_affinity")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry, { MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// Packets and bytes per verdict, per CPU.
#[btf_map(name = "lb_verdicts")]
pub static VERDICTS: PerCpuArray<Counter, { VERDICT_COUNT as usize }> = PerCpuArray::new();

/// Packets and bytes per service id. Shared (not per CPU) so memory does not
/// grow with the CPU count; updated with atomic adds.
#[btf_map(name = "lb_svc_stats")]
pub static SERVICE_STATS: Array<Counter, { MAX_SERVICES as usize }> = Array::new();

/// Node facts (SNAT address and ports, the node's netns cookie), slot 0.
#[btf_map(name = "lb_config")]
pub static CONFIG: Array<DatapathConfig, 1> = Array::new();

/// loadBalancerSourceRanges: (service id, source prefix) -> allowed.
#[btf_map(name = "lb_src_ranges")]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u32, { MAX_SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// Sources inside the cluster: prefix (address as the trie's data) -> 1.
#[btf_map(name = "lb_cluster_cidrs")]
pub static CLUSTER_CIDRS: LpmTrie<Addr, u32, { MAX_CLUSTER_CIDRS as usize }> = LpmTrie::new();

/// Service-port names (`lb_common::ServiceName`), written by the agent for
/// the inspection commands; no program reads it. BPF_F_NO_PREALLOC (1):
/// memory only for the names in use.
#[btf_map(name = "lb_svc_names")]
pub static SERVICE_NAMES: HashMap<u32, ServiceName, { MAX_SERVICES as usize }, 1> = HashMap::new();

/// Sockets the cgroup hooks translated: (cookie, backend) -> frontend.
#[btf_map(name = "lb_sock_rev")]
pub static SOCK_REVERSE: LruHashMap<
    SockReverseKey,
    SockReverseEntry,
    { MAX_SOCK_REVERSE as usize },
> = LruHashMap::new();
