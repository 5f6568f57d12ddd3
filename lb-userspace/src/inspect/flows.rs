//! `lb conntrack`: the translated flows in the conntrack tables, one line
//! per flow (its client-side entry), with its service port, backend,
//! translated source, TCP state and idle time.

use super::endpoint;
use lb_common::addr;
use std::net::IpAddr;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write,
    path::Path,
};

use aya::maps::{HashMap, MapData};
use lb_common::{
    map_names, ConntrackEntry, FlowKey, CT_FORWARD, CT_F_SNAT, CT_S_FIN_FWD, CT_S_FIN_REV,
    CT_S_PICKUP, CT_S_REPLIED, CT_S_RST, IPPROTO_TCP,
};
use serde::Serialize;

use super::{services::ServicePortView, Output};
use crate::kernel::{conntrack::monotonic_ns, pins::open_pinned};

#[derive(Clone, Debug, Serialize)]
pub struct FlowView {
    /// The table it is in: "tcp" (answered), "syn" (not answered yet), "udp".
    pub table: &'static str,
    /// `addr:port` of the client, as it sent.
    pub client: String,
    /// `addr:port/PROTO` it dialled.
    pub frontend: String,
    /// `addr:port` it was sent to.
    pub backend: String,
    /// The source the backend sees (the client, or its translation).
    pub seen_as: String,
    pub service_id: u32,
    pub service: String,
    pub state: Vec<&'static str>,
    /// Seconds since its last packet (refreshed at most once a second).
    pub idle_s: f64,
}

/// Which flows to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Service ids (from `--service`); empty: every service.
    pub services: BTreeSet<u32>,
    pub client: Option<IpAddr>,
}

impl Filter {
    /// `--service` matches service ports by id, full name, or the
    /// Service's `namespace/name` (all its ports).
    pub fn services(all: &[ServicePortView], which: &str) -> anyhow::Result<BTreeSet<u32>> {
        let ids: BTreeSet<u32> = all
            .iter()
            .filter(|s| super::services::names(which, s))
            .map(|s| s.id)
            .collect();
        anyhow::ensure!(
            !ids.is_empty(),
            "no service port named {which:?} (see `lb services`)"
        );
        Ok(ids)
    }
}

/// The flows under `pin_dir` that `filter` selects, oldest activity last.
pub fn read(
    pin_dir: &Path,
    names: &BTreeMap<u32, String>,
    filter: &Filter,
) -> anyhow::Result<Vec<FlowView>> {
    let now = monotonic_ns();
    let mut out = Vec::new();
    for (table, name) in [
        ("tcp", map_names::CT_TCP),
        ("syn", map_names::CT_SYN),
        ("udp", map_names::CT_UDP),
    ] {
        let map: HashMap<MapData, FlowKey, ConntrackEntry> = open_pinned(pin_dir, name)?;
        for item in map.iter() {
            // An entry evicted while we walk the table ends the walk early
            // for that table at worst; the rest is still worth showing.
            let Ok((k, e)) = item else { break };
            if e.direction != CT_FORWARD
                || (!filter.services.is_empty() && !filter.services.contains(&e.service_id))
                || filter.client.is_some_and(|c| c != addr::to_ip(&k.src_addr))
            {
                continue;
            }
            let client = endpoint(&k.src_addr, k.src_port);
            out.push(FlowView {
                table,
                frontend: format!(
                    "{}/{}",
                    endpoint(&k.dst_addr, k.dst_port),
                    if k.proto == IPPROTO_TCP { "TCP" } else { "UDP" }
                ),
                backend: endpoint(&e.nat_addr, e.nat_port),
                seen_as: if e.flags & CT_F_SNAT != 0 {
                    endpoint(&e.snat_addr, e.snat_port)
                } else {
                    client.clone()
                },
                client,
                service_id: e.service_id,
                service: names.get(&e.service_id).cloned().unwrap_or_default(),
                state: state(k.proto, e.state),
                idle_s: now.saturating_sub(e.last_seen_ns) as f64 / 1e9,
            });
        }
    }
    out.sort_by(|a, b| a.idle_s.total_cmp(&b.idle_s));
    Ok(out)
}

fn state(proto: u8, s: u8) -> Vec<&'static str> {
    let mut v = Vec::new();
    if proto == IPPROTO_TCP {
        v.push(if s & CT_S_REPLIED != 0 {
            "established"
        } else {
            "opening"
        });
    } else if s & CT_S_REPLIED != 0 {
        v.push("replied");
    }
    for (bit, name) in [
        (CT_S_PICKUP, "picked-up"),
        (CT_S_FIN_FWD, "fin-client"),
        (CT_S_FIN_REV, "fin-backend"),
        (CT_S_RST, "reset"),
    ] {
        if s & bit != 0 {
            v.push(name);
        }
    }
    v
}

pub fn render(flows: &[FlowView], out: Output) -> anyhow::Result<String> {
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(flows)? + "\n");
    }
    let mut s = String::new();
    writeln!(
        s,
        "{:<22} {:<24} {:<22} {:<22} {:<28} {:>7}  SERVICE PORT",
        "CLIENT", "FRONTEND", "BACKEND", "BACKEND SEES", "STATE", "IDLE S"
    )?;
    for f in flows {
        let service = if f.service.is_empty() {
            format!("(service id {})", f.service_id)
        } else {
            f.service.clone()
        };
        writeln!(
            s,
            "{:<22} {:<24} {:<22} {:<22} {:<28} {:>7.1}  {}",
            f.client,
            f.frontend,
            f.backend,
            f.seen_as,
            f.state.join(","),
            f.idle_s,
            service
        )?;
    }
    writeln!(s, "{} flow(s)", flows.len())?;
    Ok(s)
}
