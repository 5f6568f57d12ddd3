//! The conntrack tables from the agent's side: how big they are, and the
//! sweep that removes expired entries and tells evictions apart.
//!
//! The datapath judges liveness itself on every lookup (`ct_live`), so the
//! sweep is not needed for correctness. It keeps the tables' fill level
//! meaningful (the LRU tables would otherwise stay full of dead flows),
//! frees `lb_snat`, which is not LRU and would otherwise fill, and measures
//! evictions: entries the datapath created that neither it nor the sweep
//! removed and that are no longer there.

use std::{collections::BTreeMap, path::Path};

use aya::maps::{HashMap, MapData, PerCpuArray};
use lb_common::{
    ct_live, ct_stat, map_names, snat_entry_kept, ConntrackEntry, FlowKey, CT_DEFAULT_ENTRIES,
};

/// Entries of each conntrack table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtSizes {
    /// `lb_ct_tcp`: established TCP, two entries per connection.
    pub tcp: u32,
    /// `lb_ct_syn`: TCP handshakes in flight.
    pub syn: u32,
    /// `lb_ct_udp`.
    pub udp: u32,
    /// `lb_snat`: translated sources (one entry per SNATed flow).
    pub snat: u32,
}

/// Share of the node's memory the tables may take: Cilium's default
/// `--bpf-map-dynamic-size-ratio` (0.25%).
const MEMORY_SHARE: f64 = 0.0025;
/// Kernel memory per entry, roughly: key 40 + value 56 (16-byte addresses,
/// for IPv6) + the hash element and LRU node headers (~56), rounded up.
const BYTES_PER_ENTRY: u64 = 160;
/// An LRU table hands each CPU free entries in batches of 128
/// (`LOCAL_FREE_TARGET`); fewer than this many per CPU evicts early.
const MIN_PER_CPU: u32 = 512;
const MIN_TCP: u32 = 1 << 16;
const MAX_TCP: u32 = 1 << 23;

impl CtSizes {
    /// `--conntrack-max N`: the established TCP table holds N entries; the
    /// others are sized from it (UDP 1/2, handshakes and SNAT 1/4 each).
    pub fn from_max(max: u32, cpus: u32) -> CtSizes {
        let floor = MIN_PER_CPU.saturating_mul(cpus.max(1));
        let at_least = |n: u32| n.max(floor);
        CtSizes {
            tcp: at_least(max),
            syn: at_least(max / 4),
            udp: at_least(max / 2),
            snat: at_least(max / 4),
        }
    }

    /// Sized from the node: 0.25% of its memory, the established TCP table
    /// taking half of it, between 2^16 and 2^23 entries. 24 GiB gives
    /// 201,326 TCP entries (100,663 connections).
    pub fn for_node(memory_bytes: u64, cpus: u32) -> CtSizes {
        let budget = (memory_bytes as f64 * MEMORY_SHARE) as u64 / BYTES_PER_ENTRY;
        // tcp + syn + udp + snat = tcp * (1 + 1/4 + 1/2 + 1/4) = 2 tcp
        let tcp = (budget / 2).clamp(MIN_TCP as u64, MAX_TCP as u64) as u32;
        CtSizes::from_max(tcp, cpus)
    }

    /// From this node's memory and CPUs, unless `max` is given.
    pub fn for_this_node(max: Option<u32>) -> CtSizes {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        match max {
            Some(m) => CtSizes::from_max(m, cpus),
            None => CtSizes::for_node(memory_bytes().unwrap_or(4 << 30), cpus),
        }
    }

    /// The size of conntrack map `name` (None for other maps).
    pub fn of(&self, name: &str) -> Option<u32> {
        match name {
            map_names::CT_TCP => Some(self.tcp),
            map_names::CT_SYN => Some(self.syn),
            map_names::CT_UDP => Some(self.udp),
            map_names::SNAT => Some(self.snat),
            _ => None,
        }
    }
}

impl Default for CtSizes {
    /// What the object declares; for tools that only read the maps.
    fn default() -> Self {
        CtSizes {
            tcp: CT_DEFAULT_ENTRIES,
            syn: CT_DEFAULT_ENTRIES,
            udp: CT_DEFAULT_ENTRIES,
            snat: CT_DEFAULT_ENTRIES,
        }
    }
}

/// MemTotal from /proc/meminfo.
fn memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The conntrack tables, with the datapath counters that say how many
/// entries it created and deleted in each.
pub const TABLES: [(&str, u32, Option<u32>); 4] = [
    (
        map_names::CT_TCP,
        ct_stat::TCP_CREATED,
        Some(ct_stat::TCP_DELETED),
    ),
    (
        map_names::CT_SYN,
        ct_stat::SYN_CREATED,
        Some(ct_stat::SYN_DELETED),
    ),
    (
        map_names::CT_UDP,
        ct_stat::UDP_CREATED,
        Some(ct_stat::UDP_DELETED),
    ),
    (map_names::SNAT, ct_stat::SNAT_CREATED, None),
];

/// One sweep's findings for one table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableSweep {
    /// Expired entries removed now.
    pub expired: u64,
    /// Entries left.
    pub live: u64,
    /// Entries the datapath created, minus those it deleted (all time,
    /// summed over CPUs).
    pub net_created: u64,
}

/// Removes every expired entry (by the same rule the datapath uses) from
/// the conntrack tables pinned in `pin_dir`, as of `now` (CLOCK_MONOTONIC,
/// the datapath's clock).
pub fn sweep(pin_dir: &Path, now: u64) -> anyhow::Result<BTreeMap<&'static str, TableSweep>> {
    let stats = PerCpuArray::<MapData, u64>::try_from(aya::maps::Map::PerCpuArray(
        MapData::from_pin(pin_dir.join(map_names::CT_STATS))?,
    ))?;
    let total = |i: u32| -> u64 { stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
    let mut out = BTreeMap::new();
    for (name, created, deleted) in TABLES {
        let data = MapData::from_pin(pin_dir.join(name))?;
        let map = if name == map_names::SNAT {
            aya::maps::Map::HashMap(data)
        } else {
            aya::maps::Map::LruHashMap(data)
        };
        let mut table = HashMap::<MapData, FlowKey, ConntrackEntry>::try_from(map)?;
        // Collected first: deleting while walking would restart the walk.
        let mut live = 0u64;
        let mut dead = Vec::new();
        for item in table.iter() {
            let Ok((k, e)) = item else { continue };
            let kept = if name == map_names::SNAT {
                // Closed flows' ports are remembered through a TIME_WAIT.
                snat_entry_kept(e.last_seen_ns, now, k.proto, e.state)
            } else {
                ct_live(e.last_seen_ns, now, k.proto, e.state)
            };
            if kept {
                live += 1;
            } else {
                dead.push(k);
            }
        }
        let mut expired = 0;
        for k in dead {
            if table.remove(&k).is_ok() {
                expired += 1;
            }
        }
        let net_created = total(created).saturating_sub(deleted.map(total).unwrap_or(0));
        out.insert(
            name,
            TableSweep {
                expired,
                live,
                net_created,
            },
        );
    }
    Ok(out)
}

/// The datapath's clock.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Evictions per table, from successive sweeps: an entry the datapath
/// created is either still there, removed by the datapath or a sweep, or
/// was evicted. Counted from the first sweep on (a restarted agent does not
/// know what its predecessor's sweeps removed).
#[derive(Debug, Default)]
pub struct Evictions {
    tables: BTreeMap<&'static str, EvictionState>,
}

#[derive(Debug, Default)]
struct EvictionState {
    /// Entries gone without a known cause, at the first sweep.
    baseline: Option<u64>,
    /// Expired entries this agent's sweeps removed.
    expired: u64,
    /// Evictions reported so far (never decreases).
    evicted: u64,
}

impl Evictions {
    /// Takes one sweep in; returns (table, expired, evicted) totals.
    pub fn account(
        &mut self,
        sweep: &BTreeMap<&'static str, TableSweep>,
    ) -> Vec<(&'static str, u64, u64)> {
        let mut out = Vec::new();
        for (name, s) in sweep {
            let st = self.tables.entry(name).or_default();
            st.expired += s.expired;
            let gone = s.net_created.saturating_sub(s.live + st.expired);
            let base = *st.baseline.get_or_insert(gone);
            // Entries created and deleted between the counter read and the
            // walk can make this dip: never report fewer than before.
            st.evicted = st.evicted.max(gone.saturating_sub(base));
            out.push((*name, st.expired, st.evicted));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_memory_within_bounds() {
        let s = CtSizes::for_node(24 << 30, 2);
        assert_eq!(s.tcp, 201_326);
        assert_eq!(s.udp, s.tcp / 2);
        assert_eq!(s.syn, s.tcp / 4);
        assert_eq!(CtSizes::for_node(1 << 30, 2).tcp, MIN_TCP);
        assert_eq!(CtSizes::for_node(1 << 42, 2).tcp, MAX_TCP);
    }

    #[test]
    fn small_tables_still_give_every_cpu_room() {
        let s = CtSizes::from_max(1000, 8);
        assert_eq!(s.tcp, 4096);
        assert_eq!(s.syn, 4096);
    }

    #[test]
    fn meminfo_is_read() {
        let text = "MemTotal:       24683520 kB\nMemFree:        23918432 kB\n";
        assert_eq!(parse_meminfo(text), Some(24_683_520 * 1024));
        assert_eq!(parse_meminfo("nothing"), None);
    }

    /// The datapath's state machine and timeouts (shared code in
    /// lb-common): a handshake lives 60 s, an answered flow 6 h, one FIN
    /// 1 h, a RST or a FIN each way 10 s; UDP 30 s, then 120 s once
    /// answered.
    #[test]
    fn tcp_state_moves_the_timeout() {
        use lb_common::{
            ct_closed, ct_next_state, ct_timeout_ns, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN,
            TCP_RST, TCP_SYN,
        };
        let s = |secs: u64| secs * 1_000_000_000;
        let tcp = |st| ct_timeout_ns(IPPROTO_TCP, st);
        let syn = ct_next_state(0, TCP_SYN, false);
        assert_eq!(tcp(syn), s(60));
        let est = ct_next_state(syn, TCP_SYN | TCP_ACK, true);
        assert_eq!(tcp(est), s(6 * 3600));
        let half = ct_next_state(est, TCP_FIN | TCP_ACK, false);
        assert_eq!(tcp(half), s(3600));
        assert!(!ct_closed(half));
        let closed = ct_next_state(half, TCP_FIN | TCP_ACK, true);
        assert!(ct_closed(closed));
        assert_eq!(tcp(closed), s(10));
        let reset = ct_next_state(est, TCP_RST, true);
        assert!(ct_closed(reset));
        // Refused during the handshake: closed, never established.
        assert_eq!(tcp(ct_next_state(syn, TCP_RST | TCP_ACK, true)), s(10));
        let udp = |st| ct_timeout_ns(IPPROTO_UDP, st);
        assert_eq!(udp(ct_next_state(0, 0, false)), s(30));
        assert_eq!(udp(ct_next_state(0, 0, true)), s(120));
    }

    fn sweep_of(net_created: u64, live: u64, expired: u64) -> BTreeMap<&'static str, TableSweep> {
        [(
            map_names::CT_TCP,
            TableSweep {
                expired,
                live,
                net_created,
            },
        )]
        .into()
    }

    #[test]
    fn evictions_are_what_nobody_removed() {
        let mut ev = Evictions::default();
        // A predecessor's history: 10 entries unaccounted for already.
        assert_eq!(
            ev.account(&sweep_of(110, 100, 0)),
            [(map_names::CT_TCP, 0, 0)]
        );
        // 50 more created, 5 expired (swept), 140 live: 5 evicted.
        assert_eq!(
            ev.account(&sweep_of(160, 140, 5)),
            [(map_names::CT_TCP, 5, 5)]
        );
        // A dip from a racy read never lowers the count.
        assert_eq!(
            ev.account(&sweep_of(160, 150, 0)),
            [(map_names::CT_TCP, 5, 5)]
        );
    }
}
