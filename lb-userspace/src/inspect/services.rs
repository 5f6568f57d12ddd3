//! `lb services`, `lb backends SERVICE` and `lb maglev SERVICE`: the
//! service ports programmed under a pin directory, read back from the maps
//! (`lb_frontends`, `lb_backends`, `lb_maglev`, `lb_svc_stats`) and named
//! from `lb_svc_names`.

use super::endpoint;
use std::{collections::BTreeMap, fmt::Write, path::Path};

use aya::maps::{Array, HashMap, HashOfMaps, MapData};
use lb_common::{
    map_names, Backend, Counter, FrontendKey, MaglevKey, MaglevSlots, ServiceEntry, ServiceName,
    BACKEND_F_LOCAL, BACKEND_F_PRESENT, BACKEND_F_TERMINATING, BACKEND_F_USABLE,
    FRONTEND_VIEW_IN_CLUSTER, IPPROTO_TCP, MAX_BACKENDS, SERVICE_F_AFFINITY, SERVICE_F_EXTERNAL,
    SERVICE_F_LOCAL, SERVICE_F_SOURCE_RANGES, SERVICE_F_TABLE_B,
};
use serde::Serialize;

use super::Output;
use crate::kernel::pins::open_pinned;

/// One service port as the maps hold it.
#[derive(Clone, Debug, Serialize)]
pub struct ServicePortView {
    pub id: u32,
    /// From `lb_svc_names`; empty if the agent wrote none.
    pub name: String,
    pub frontends: Vec<FrontendView>,
    /// Maglev table size M (0: no usable backend, new flows are refused or
    /// dropped).
    pub table_size: u32,
    /// The half of the table new flows read ("A" or "B"; see
    /// `lb_common::MaglevSlots`).
    pub table_half: &'static str,
    pub usable_backends: u32,
    pub affinity_timeout_s: Option<u32>,
    pub backends: Vec<BackendView>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FrontendView {
    /// `addr:port/PROTO`.
    pub address: String,
    /// "all", or "in-cluster" for the view pods and the node get of an
    /// externalTrafficPolicy Local frontend.
    pub clients: &'static str,
    /// Policy flags: affinity, external, local, source-ranges.
    pub flags: Vec<&'static str>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendView {
    pub id: u32,
    /// `addr:port`.
    pub address: String,
    /// Takes new flows (in the Maglev table).
    pub usable: bool,
    pub terminating: bool,
    /// On this node.
    pub local: bool,
    /// Maglev slots (filled by `with_slots`).
    pub slots: Option<u32>,
}

impl ServicePortView {
    /// The name, or a stand-in for an unnamed id.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            format!("(service id {})", self.id)
        } else {
            self.name.clone()
        }
    }
}

/// Every service port under `pin_dir`, by name then id.
pub fn read(pin_dir: &Path) -> anyhow::Result<Vec<ServicePortView>> {
    let frontends: HashMap<MapData, FrontendKey, ServiceEntry> =
        open_pinned(pin_dir, map_names::FRONTENDS)?;
    let backends: Array<MapData, Backend> = open_pinned(pin_dir, map_names::BACKENDS)?;
    let stats: Array<MapData, Counter> = open_pinned(pin_dir, map_names::SERVICE_STATS)?;
    // Agents before names were kept wrote none: ids only.
    let names: Option<HashMap<MapData, u32, ServiceName>> =
        open_pinned(pin_dir, map_names::SERVICE_NAMES).ok();

    let mut by_id: BTreeMap<u32, ServicePortView> = BTreeMap::new();
    for item in frontends.iter() {
        let (k, e) = item?;
        let v = view(&mut by_id, e.id);
        v.table_size = e.table_size;
        v.table_half = if e.flags & SERVICE_F_TABLE_B != 0 {
            "B"
        } else {
            "A"
        };
        v.usable_backends = e.backend_count;
        if e.flags & SERVICE_F_AFFINITY != 0 {
            v.affinity_timeout_s = Some(e.affinity_timeout_s);
        }
        v.frontends.push(FrontendView {
            address: format!("{}/{}", endpoint(&k.addr, k.port), protocol(k.proto)),
            clients: if k.view == FRONTEND_VIEW_IN_CLUSTER {
                "in-cluster"
            } else {
                "all"
            },
            flags: service_flags(e.flags),
        });
    }
    // Slot 0 is never a backend (ids start at 1).
    for id in 1..MAX_BACKENDS {
        let Ok(b) = backends.get(&id, 0) else {
            continue;
        };
        if b.flags & BACKEND_F_PRESENT == 0 {
            continue;
        }
        view(&mut by_id, b.service_id).backends.push(BackendView {
            id,
            address: endpoint(&b.addr, b.port),
            usable: b.flags & BACKEND_F_USABLE != 0,
            terminating: b.flags & BACKEND_F_TERMINATING != 0,
            local: b.flags & BACKEND_F_LOCAL != 0,
            slots: None,
        });
    }
    for v in by_id.values_mut() {
        v.frontends
            .sort_by(|a, b| (a.clients, &a.address).cmp(&(b.clients, &b.address)));
        if let Ok(c) = stats.get(&v.id, 0) {
            (v.packets, v.bytes) = (c.packets, c.bytes);
        }
        if let Some(names) = &names {
            if let Ok(n) = names.get(&v.id, 0) {
                v.name = n.as_str().to_string();
            }
        }
    }
    let mut all: Vec<ServicePortView> = by_id.into_values().collect();
    all.sort_by(|a, b| (a.name.is_empty(), &a.name, a.id).cmp(&(b.name.is_empty(), &b.name, b.id)));
    Ok(all)
}

fn view(by_id: &mut BTreeMap<u32, ServicePortView>, id: u32) -> &mut ServicePortView {
    by_id.entry(id).or_insert_with(|| ServicePortView {
        id,
        name: String::new(),
        frontends: Vec::new(),
        table_size: 0,
        table_half: "A",
        usable_backends: 0,
        affinity_timeout_s: None,
        backends: Vec::new(),
        packets: 0,
        bytes: 0,
    })
}

/// The service port `which` names (see `find`), with each backend's share
/// of its Maglev table.
pub fn one(pin_dir: &Path, which: &str) -> anyhow::Result<ServicePortView> {
    with_slots(pin_dir, find(read(pin_dir)?, which)?)
}

/// `sp` with each backend's share of its Maglev table.
pub fn with_slots(pin_dir: &Path, mut sp: ServicePortView) -> anyhow::Result<ServicePortView> {
    let slots = table(
        pin_dir,
        sp.id,
        sp.table_size,
        usize::from(sp.table_half == "B"),
    )?;
    let mut count: BTreeMap<u32, u32> = BTreeMap::new();
    for id in slots {
        *count.entry(id).or_default() += 1;
    }
    for b in &mut sp.backends {
        b.slots = Some(count.get(&b.id).copied().unwrap_or(0));
    }
    Ok(sp)
}

/// Half `half` of the Maglev table of service `id` with `size` slots (none
/// for size 0).
fn table(pin_dir: &Path, id: u32, size: u32, half: usize) -> anyhow::Result<Vec<u32>> {
    if size == 0 {
        return Ok(Vec::new());
    }
    let outer: HashOfMaps<MapData, MaglevKey, MapData> = open_pinned(pin_dir, map_names::MAGLEV)?;
    let key = MaglevKey {
        service_id: id,
        table_size: size,
    };
    let inner = outer
        .get(&key, 0)
        .map_err(|e| anyhow::anyhow!("no Maglev table of {size} slots for service {id}: {e}"))?;
    let inner: Array<MapData, MaglevSlots> = Array::try_from(aya::maps::Map::Array(inner))?;
    // Element 0 is the header; slot i is element i + 1.
    (1..=size)
        .map(|i| -> anyhow::Result<u32> { Ok(inner.get(&i, 0)?[half]) })
        .collect()
}

/// Whether `which` (an id, a service port's full name, or a Service's
/// `namespace/name`, all its ports) names `sp`.
pub fn names(which: &str, sp: &ServicePortView) -> bool {
    which.parse::<u32>().ok() == Some(sp.id)
        || sp.name == which
        || sp.name.starts_with(&format!("{which}:"))
        || sp.name.starts_with(&format!("{which}/"))
}

/// The one service port `which` names: its id, its full name, or a
/// Service (`namespace/name`) with a single port.
pub fn find(all: Vec<ServicePortView>, which: &str) -> anyhow::Result<ServicePortView> {
    let (exact, partial): (Vec<_>, Vec<_>) = all
        .into_iter()
        .filter(|s| names(which, s))
        .partition(|s| s.name == which || which.parse::<u32>().ok() == Some(s.id));
    if let Some(s) = exact.into_iter().next() {
        return Ok(s);
    }
    match partial.len() {
        0 => anyhow::bail!("no service port named {which:?} (see `lb services`)"),
        1 => Ok(partial.into_iter().next().expect("one")),
        _ => anyhow::bail!(
            "{which:?} has several service ports; name one: {}",
            partial
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn render_services(all: &[ServicePortView], out: Output) -> anyhow::Result<String> {
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(all)? + "\n");
    }
    let mut s = String::new();
    writeln!(
        s,
        "{:<40} {:>6} {:>8} {:>6} {:>12}  FRONTENDS",
        "SERVICE PORT", "ID", "BACKENDS", "TABLE", "PACKETS"
    )?;
    for sp in all {
        let frontends: Vec<String> = sp
            .frontends
            .iter()
            .map(|f| {
                if f.clients == "all" {
                    f.address.clone()
                } else {
                    format!("{} ({})", f.address, f.clients)
                }
            })
            .collect();
        writeln!(
            s,
            "{:<40} {:>6} {:>8} {:>6} {:>12}  {}",
            sp.label(),
            sp.id,
            format!("{}/{}", sp.usable_backends, sp.backends.len()),
            sp.table_size,
            sp.packets,
            frontends.join(", ")
        )?;
    }
    Ok(s)
}

pub fn render_backends(sp: &ServicePortView, out: Output) -> anyhow::Result<String> {
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(sp)? + "\n");
    }
    let mut s = String::new();
    writeln!(
        s,
        "{} (id {}), Maglev table of {} slots{}",
        sp.label(),
        sp.id,
        sp.table_size,
        sp.affinity_timeout_s
            .map(|t| format!(", sessionAffinity ClientIP {t} s"))
            .unwrap_or_default()
    )?;
    writeln!(
        s,
        "{:<24} {:>8}  {:<26} {:>7} {:>7}",
        "BACKEND", "ID", "STATE", "SLOTS", "SHARE"
    )?;
    for b in &sp.backends {
        let mut state = vec![if b.usable { "usable" } else { "not-usable" }];
        if b.terminating {
            state.push("terminating");
        }
        if b.local {
            state.push("local");
        }
        let slots = b.slots.unwrap_or(0);
        let share = if sp.table_size == 0 {
            0.0
        } else {
            100.0 * slots as f64 / sp.table_size as f64
        };
        writeln!(
            s,
            "{:<24} {:>8}  {:<26} {:>7} {:>6.1}%",
            b.address,
            b.id,
            state.join(","),
            slots,
            share
        )?;
    }
    Ok(s)
}

/// `lb maglev`: how the table divides among the backends (Maglev gives
/// each about M/N slots; more than one slot of difference means a skewed
/// table).
pub fn render_maglev(sp: &ServicePortView, out: Output) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct Share<'a> {
        service: &'a str,
        id: u32,
        table_size: u32,
        slots: BTreeMap<&'a str, u32>,
    }
    let slots: BTreeMap<&str, u32> = sp
        .backends
        .iter()
        .filter(|b| b.slots.unwrap_or(0) > 0)
        .map(|b| (b.address.as_str(), b.slots.unwrap_or(0)))
        .collect();
    if out == Output::Json {
        let share = Share {
            service: &sp.name,
            id: sp.id,
            table_size: sp.table_size,
            slots,
        };
        return Ok(serde_json::to_string_pretty(&share)? + "\n");
    }
    let mut s = String::new();
    writeln!(s, "{} (id {}): {} slots", sp.label(), sp.id, sp.table_size)?;
    let (min, max) = (slots.values().min(), slots.values().max());
    for (addr, n) in &slots {
        writeln!(s, "  {addr:<24} {n:>7}")?;
    }
    if let (Some(min), Some(max)) = (min, max) {
        writeln!(s, "  fewest {min}, most {max} slots per backend")?;
    }
    Ok(s)
}

fn protocol(p: u8) -> &'static str {
    if p == IPPROTO_TCP {
        "TCP"
    } else {
        "UDP"
    }
}

fn service_flags(f: u8) -> Vec<&'static str> {
    [
        (SERVICE_F_AFFINITY, "affinity"),
        (SERVICE_F_EXTERNAL, "external"),
        (SERVICE_F_LOCAL, "local"),
        (SERVICE_F_SOURCE_RANGES, "source-ranges"),
    ]
    .into_iter()
    .filter(|(bit, _)| f & bit != 0)
    .map(|(_, name)| name)
    .collect()
}
