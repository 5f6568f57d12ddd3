//! What `/metrics` serves, in the Prometheus text format: the agent's own
//! numbers (what is programmed, how often and how fast it syncs) kept in a
//! prometheus-client registry, and the datapath's counters and map fill
//! levels, read from the pinned maps at each scrape.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, HashMap, HashOfMaps, LpmTrie, MapData, PerCpuArray},
    Pod,
};
use lb_common::{
    map_names, AffinityEntry, AffinityKey, ConntrackEntry, Counter as DpCounter, FlowKey,
    FrontendKey, MaglevKey, ServiceEntry, SockReverseEntry, SockReverseKey, SourceRange, Verdict,
    MAX_AFFINITY, MAX_BACKENDS, MAX_FRONTENDS, MAX_MAGLEV_TABLES, MAX_SERVICES, MAX_SOCK_REVERSE,
    MAX_SOURCE_RANGES,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::{kernel::datapath::Hook, kernel::interfaces::Ingress, model::ServicePortKey};

/// Service id -> service port, for the per-service counters' labels.
pub type ServiceNames = Arc<Mutex<BTreeMap<u32, ServicePortKey>>>;

/// Live entries per conntrack table as the last sweep counted them, and
/// when: a scrape uses these instead of walking the tables itself.
type SweptCounts = Arc<Mutex<Option<(Instant, BTreeMap<&'static str, u64>)>>>;

/// Sweep counts older than this are not used (the sweep stopped, or runs
/// rarely): the scrape counts the tables itself.
const SWEPT_FRESH: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub services: Gauge,
    pub backends: Gauge,
    pub syncs: Counter,
    pub sync_seconds: Histogram,
    pub failures: Counter,
    pub names: ServiceNames,
    /// 1 per (interface, hook) the datapath is attached to.
    interfaces: Family<Vec<(String, String)>, Gauge>,
    pub interface_failures: Counter,
    /// Per conntrack table: entries the sweep removed as expired, and
    /// entries evicted (pushed out of a full table while alive).
    ct_expired: Family<Vec<(String, String)>, Counter>,
    ct_evicted: Family<Vec<(String, String)>, Counter>,
    /// The last rendering and when: scrapes within `RENDER_EVERY` of it
    /// get it again, and one rendering runs at a time (walking the
    /// conntrack tables during a flood costs seconds; a scrape storm must
    /// not multiply that).
    cache: Mutex<Option<(Instant, String)>>,
    swept: SweptCounts,
}

/// How long one rendering of /metrics is served again.
pub const RENDER_EVERY: Duration = Duration::from_secs(2);

impl Metrics {
    pub fn new(pin_dir: &Path) -> Metrics {
        let mut registry = Registry::with_prefix("lb");
        let services = Gauge::default();
        let backends = Gauge::default();
        let syncs = Counter::default();
        let failures = Counter::default();
        // 100 µs to ~52 s: a one-endpoint change lands in the low buckets,
        // a cold start of a large cluster in the high ones.
        let sync_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 20),
        );
        registry.register(
            "services_programmed",
            "Service ports written to the datapath",
            services.clone(),
        );
        registry.register(
            "backends_programmed",
            "Backends (endpoint per service port) written to the datapath",
            backends.clone(),
        );
        registry.register(
            "syncs",
            "Times the datapath was brought up to date with a change",
            syncs.clone(),
        );
        registry.register(
            "sync_duration_seconds",
            "From receiving a change (watch event or file write) to the maps written",
            sync_seconds.clone(),
        );
        registry.register(
            "programming_failures",
            "Service ports whose map writes failed (retried with backoff)",
            failures.clone(),
        );
        let interfaces = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "interface_attached",
            "1 for each interface and hook the datapath is attached to",
            interfaces.clone(),
        );
        let interface_failures = Counter::default();
        registry.register(
            "interface_attach_failures",
            "Interfaces the datapath could not be attached to",
            interface_failures.clone(),
        );
        let ct_expired = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "conntrack_expired",
            "Expired conntrack entries the agent's sweep removed, by table",
            ct_expired.clone(),
        );
        let ct_evicted = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "conntrack_evictions",
            "Conntrack entries pushed out of a full table while alive, by table",
            ct_evicted.clone(),
        );
        let names: ServiceNames = Arc::default();
        let swept: SweptCounts = Arc::default();
        registry.register_collector(Box::new(DatapathCollector {
            pin_dir: pin_dir.to_path_buf(),
            names: names.clone(),
            backends: backends.clone(),
            swept: swept.clone(),
        }));
        Metrics {
            registry,
            services,
            backends,
            syncs,
            sync_seconds,
            failures,
            names,
            interfaces,
            interface_failures,
            ct_expired,
            ct_evicted,
            cache: Mutex::new(None),
            swept,
        }
    }

    /// Live entries per conntrack table, from the sweep that just ran.
    pub fn set_conntrack_live(&self, live: BTreeMap<&'static str, u64>) {
        *self.swept.lock().expect("swept lock") = Some((Instant::now(), live));
    }

    /// Conntrack totals since the agent started: (table, expired, evicted).
    pub fn set_conntrack(&self, totals: &[(&str, u64, u64)]) {
        for (table, expired, evicted) in totals {
            let labels = vec![("map".to_string(), table.to_string())];
            for (family, total) in [(&self.ct_expired, expired), (&self.ct_evicted, evicted)] {
                let c = family.get_or_create(&labels);
                c.inc_by(total.saturating_sub(c.get()));
            }
        }
    }

    /// The interfaces the datapath is on, replacing the previous set.
    pub fn set_interfaces(&self, in_force: &[(String, Ingress)]) {
        self.interfaces.clear();
        for (iface, ingress) in in_force {
            for hook in Hook::for_ingress(*ingress) {
                self.interfaces
                    .get_or_create(&vec![
                        ("interface".to_string(), iface.clone()),
                        ("hook".to_string(), hook.label().to_string()),
                    ])
                    .set(1);
            }
        }
    }

    pub fn observe_sync(&self, took: Duration, failed: usize) {
        self.syncs.inc();
        self.sync_seconds.observe(took.as_secs_f64());
        self.failures.inc_by(failed as u64);
    }

    /// `render`, at most once per `RENDER_EVERY`, one at a time.
    pub fn render_cached(&self) -> String {
        let mut cache = self.cache.lock().expect("metrics cache lock");
        if let Some((at, text)) = cache.as_ref() {
            if at.elapsed() < RENDER_EVERY {
                return text.clone();
            }
        }
        let text = self.render();
        *cache = Some((Instant::now(), text.clone()));
        text
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Reads the pinned maps at scrape time.
#[derive(Debug)]
struct DatapathCollector {
    pin_dir: PathBuf,
    names: ServiceNames,
    /// The agent's count: an array has every slot, and reading them all
    /// at each scrape to count the used ones would cost 2^19 syscalls.
    backends: Gauge,
    swept: SweptCounts,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A scrape while the maps cannot be opened (not yet created, or
        // removed at exit) shows the agent's own metrics only.
        if let Ok(verdicts) =
            open::<PerCpuArray<MapData, DpCounter>>(&self.pin_dir, map_names::VERDICTS)
        {
            let totals: Vec<(Verdict, DpCounter)> = Verdict::ALL
                .iter()
                .filter_map(|&v| {
                    let per_cpu = verdicts.get(&(v as u32), 0).ok()?;
                    Some((v, per_cpu.iter().fold(DpCounter::default(), add)))
                })
                .collect();
            let rows: Vec<(Vec<(&str, String)>, DpCounter)> = totals
                .iter()
                .map(|(v, c)| (vec![("verdict", v.name().to_string())], *c))
                .collect();
            encode_counters(
                &mut encoder,
                "datapath",
                "handled by the datapath, by verdict",
                &rows,
            )?;
        }
        if let Ok(stats) =
            open::<Array<MapData, DpCounter>>(&self.pin_dir, map_names::SERVICE_STATS)
        {
            let names = self.names.lock().expect("names lock").clone();
            let per_service: Vec<(ServicePortKey, DpCounter)> = names
                .into_iter()
                .filter_map(|(id, key)| Some((key, stats.get(&id, 0).ok()?)))
                .collect();
            let rows: Vec<(Vec<(&str, String)>, DpCounter)> = per_service
                .into_iter()
                .map(|(key, c)| {
                    let labels = vec![
                        ("namespace", key.namespace),
                        ("service", key.name),
                        ("port", key.port_name),
                        ("protocol", key.protocol.to_string()),
                        ("scope", format!("{:?}", key.scope)),
                        // A dual-stack Service has a service port per
                        // family: without it their series would collide.
                        ("family", key.family.name().to_string()),
                    ];
                    (labels, c)
                })
                .collect();
            encode_counters(
                &mut encoder,
                "service",
                "to a service port's frontends",
                &rows,
            )?;
        }
        let fill = self.fill_levels();
        let mut entries = encoder.encode_descriptor(
            "map_entries",
            "Entries in a datapath map (for arrays: slots in use)",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (map, used, _) in &fill {
            ConstGauge::new(*used as i64).encode(entries.encode_family(&[("map", *map)])?)?;
        }
        let mut capacity = encoder.encode_descriptor(
            "map_capacity",
            "Entries a datapath map can hold",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (map, _, cap) in &fill {
            ConstGauge::new(*cap as i64).encode(capacity.encode_family(&[("map", *map)])?)?;
        }
        Ok(())
    }
}

/// Tables the last sweep found at least this full are not walked at
/// scrape time (one syscall per key: ~0.1 s here at this size).
const WALK_LIMIT: u64 = 1 << 16;

/// A conntrack table's entries: `walk` (key by key, exact now) unless the
/// last sweep found the table too full to walk at every scrape, then the
/// sweep's count (at most one sweep interval old).
fn table_fill(
    swept: Option<&BTreeMap<&'static str, u64>>,
    name: &str,
    walk: impl FnOnce() -> Option<usize>,
) -> Option<usize> {
    match swept.and_then(|s| s.get(name)) {
        Some(&n) if n >= WALK_LIMIT => Some(n as usize),
        _ => walk(),
    }
}

impl DatapathCollector {
    /// (map, entries, capacity) for every map that can fill up. Hash maps
    /// are counted key by key (one syscall each): fine for a scrape every
    /// few seconds, even with a full conntrack table.
    fn fill_levels(&self) -> Vec<(&'static str, usize, u32)> {
        let dir = &self.pin_dir;
        let services = self.names.lock().map(|n| n.len()).unwrap_or(0);
        let mut out = Vec::new();
        let mut hash = |name: &'static str, count: Option<usize>, cap: u32| {
            if let Some(n) = count {
                out.push((name, n, cap));
            }
        };
        hash(
            map_names::FRONTENDS,
            count_keys::<FrontendKey, ServiceEntry>(dir, map_names::FRONTENDS),
            MAX_FRONTENDS,
        );
        // Conntrack tables are sized per node: their capacity is read back.
        // Their fill comes from the last sweep when it is fresh: walking a
        // full table during a flood costs seconds, and the sweep walks it
        // anyway.
        let swept = self
            .swept
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .filter(|(at, _)| at.elapsed() < SWEPT_FRESH)
            .map(|(_, counts)| counts);
        for (name, ..) in crate::kernel::conntrack::TABLES {
            if let Some(cap) = capacity(dir, name) {
                let count = table_fill(swept.as_ref(), name, || {
                    count_keys::<FlowKey, ConntrackEntry>(dir, name)
                });
                hash(name, count, cap);
            }
        }
        hash(
            map_names::AFFINITY,
            count_keys::<AffinityKey, AffinityEntry>(dir, map_names::AFFINITY),
            MAX_AFFINITY,
        );
        hash(
            map_names::SOCK_REVERSE,
            count_keys::<SockReverseKey, SockReverseEntry>(dir, map_names::SOCK_REVERSE),
            MAX_SOCK_REVERSE,
        );
        hash(
            map_names::SOURCE_RANGES,
            open::<LpmTrie<MapData, SourceRange, u32>>(dir, map_names::SOURCE_RANGES)
                .ok()
                .map(|m| m.keys().count()),
            MAX_SOURCE_RANGES,
        );
        hash(
            map_names::MAGLEV,
            open::<HashOfMaps<MapData, MaglevKey, MapData>>(dir, map_names::MAGLEV)
                .ok()
                .map(|m| m.keys().count()),
            MAX_MAGLEV_TABLES,
        );
        // Arrays: what the agent has written.
        out.push((map_names::SERVICE_STATS, services, MAX_SERVICES));
        out.push((
            map_names::BACKENDS,
            self.backends.get().max(0) as usize,
            MAX_BACKENDS,
        ));
        out
    }
}

fn capacity(dir: &Path, name: &str) -> Option<u32> {
    let data = MapData::from_pin(dir.join(name)).ok()?;
    Some(data.info().ok()?.max_entries())
}

fn count_keys<K: Pod, V: Pod>(dir: &Path, name: &str) -> Option<usize> {
    open::<HashMap<MapData, K, V>>(dir, name)
        .ok()
        .map(|m| m.keys().count())
}

fn open<T>(dir: &Path, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    crate::kernel::pins::open_pinned(dir, name)
}

/// `<prefix>_packets_total` and `<prefix>_bytes_total`, one sample per row.
fn encode_counters(
    encoder: &mut DescriptorEncoder,
    prefix: &str,
    what: &str,
    rows: &[(Vec<(&str, String)>, DpCounter)],
) -> Result<(), std::fmt::Error> {
    for (unit, pick) in [
        ("packets", packets as fn(&DpCounter) -> u64),
        ("bytes", bytes),
    ] {
        let name = format!("{prefix}_{unit}");
        let help = format!("{}{} {what}", unit[..1].to_uppercase(), &unit[1..]);
        let mut family =
            encoder.encode_descriptor(&name, &help, None, ConstCounter::new(0u64).metric_type())?;
        for (labels, c) in rows {
            ConstCounter::new(pick(c)).encode(family.encode_family(labels)?)?;
        }
    }
    Ok(())
}

fn add(acc: DpCounter, c: &DpCounter) -> DpCounter {
    DpCounter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    }
}

fn packets(c: &DpCounter) -> u64 {
    c.packets
}

fn bytes(c: &DpCounter) -> u64 {
    c.bytes
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn scrapes_within_the_render_interval_get_the_same_rendering() {
        let m = Metrics::new(Path::new("/nonexistent/lb-pins"));
        m.services.set(1);
        let first = m.render_cached();
        assert!(first.contains("lb_services_programmed 1"), "{first}");
        m.services.set(2);
        assert_eq!(m.render_cached(), first, "served again, not rendered");
        assert!(m.render().contains("lb_services_programmed 2"));
    }

    #[test]
    fn conntrack_fill_comes_from_the_sweep_without_walking_a_flooded_table() {
        let swept: BTreeMap<&'static str, u64> = [("lb_ct_udp", 1 << 20), ("lb_ct_tcp", 10)].into();
        let walked = std::cell::Cell::new(false);
        let walk = || {
            walked.set(true);
            Some(1)
        };
        assert_eq!(table_fill(Some(&swept), "lb_ct_udp", walk), Some(1 << 20));
        assert!(!walked.get(), "a scrape does not walk a flooded table");
        assert_eq!(
            table_fill(Some(&swept), "lb_ct_tcp", walk),
            Some(1),
            "a small one is counted now"
        );
        assert_eq!(
            table_fill(None, "lb_ct_udp", walk),
            Some(1),
            "before any sweep"
        );
    }
}
