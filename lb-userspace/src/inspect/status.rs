//! `lb status`: what the datapath under a pin directory is doing, read from
//! the pins alone (it works with or without a running agent): which
//! interfaces and cgroups carry which program, and the node facts in
//! `lb_config`.

use lb_common::{addr, ADDR_UNSPECIFIED};
use std::{collections::BTreeMap, fmt::Write, path::Path};

use aya::maps::{Array, MapData};
use lb_common::{map_names, DatapathConfig, CONFIG_F_SOCK_ALL_NETNS};

use crate::{kernel::datapath::Hook, kernel::pins, system};

/// The report `lb status` prints.
pub fn status(pin_dir: &Path) -> anyhow::Result<String> {
    anyhow::ensure!(
        pin_dir.exists(),
        "{} does not exist: no agent has run with this --pin-dir",
        pin_dir.display()
    );
    let mut out = String::new();
    let running = if system::agent_running(pin_dir) {
        "running"
    } else {
        "not running (the datapath it left keeps working; `lb cleanup` removes it)"
    };
    writeln!(out, "agent: {running}")?;
    let mut ifaces: BTreeMap<String, Vec<&'static str>> = BTreeMap::new();
    let mut cgroups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in pins::pinned_links(pin_dir) {
        if let Some((hook, iface)) = Hook::parse_pin(&name) {
            ifaces
                .entry(iface.to_string())
                .or_default()
                .push(hook.label());
        } else if let Some((prog, cg)) = name.rsplit_once("_cg") {
            cgroups
                .entry(cg.to_string())
                .or_default()
                .push(prog.to_string());
        }
    }
    // TC without TCX: clsact filters, found on the interfaces themselves.
    let filters = crate::kernel::datapath::our_filters_everywhere().unwrap_or_default();
    for (_, iface, hook) in &filters {
        ifaces.entry(iface.clone()).or_default().push(hook.label());
    }
    let has_cgroup_hooks = !cgroups.is_empty();
    match read_config(pin_dir) {
        Some(cfg) if cfg.netns_cookie != 0 => {
            let snat: Vec<String> = [cfg.snat_addr4, cfg.snat_addr6]
                .iter()
                .filter(|a| **a != ADDR_UNSPECIFIED)
                .map(|a| addr::to_ip(a).to_string())
                .collect();
            writeln!(
                out,
                "SNAT address: {}",
                if snat.is_empty() {
                    "none".to_string()
                } else {
                    snat.join(", ")
                }
            )?;
            let scope = if !has_cgroup_hooks {
                "off (no --cgroup)"
            } else if cfg.flags & CONFIG_F_SOCK_ALL_NETNS != 0 {
                "every network namespace"
            } else {
                "the node's network namespace only"
            };
            writeln!(out, "socket LB scope: {scope}")?;
        }
        _ => writeln!(out, "config: not written yet")?,
    }
    let tcx = ifaces.values().flatten().any(|h| h.starts_with("tc_"))
        && pins::pinned_links(pin_dir).iter().any(|n| {
            matches!(
                Hook::parse_pin(n),
                Some((Hook::TcIngress | Hook::TcEgress, _))
            )
        });
    let tc = match (tcx, filters.is_empty()) {
        (true, true) => "TCX links",
        (false, false) => "clsact filters (netlink)",
        (true, false) => "TCX links and clsact filters (an agent is switching)",
        (false, true) => "none",
    };
    writeln!(out, "TC attachment: {tc}")?;
    writeln!(out, "interfaces: {}", ifaces.len())?;
    for (iface, mut hooks) in ifaces {
        hooks.sort();
        hooks.dedup();
        writeln!(out, "  {iface:<16} {}", hooks.join(" "))?;
    }
    writeln!(out, "socket hooks: {} cgroup(s)", cgroups.len())?;
    for (id, progs) in cgroups {
        writeln!(out, "  cgroup id {id:<8} {}", progs.join(" "))?;
    }
    Ok(out)
}

fn read_config(pin_dir: &Path) -> Option<DatapathConfig> {
    let data = MapData::from_pin(pin_dir.join(map_names::CONFIG)).ok()?;
    let config: Array<MapData, DatapathConfig> =
        Array::try_from(aya::maps::Map::Array(data)).ok()?;
    config.get(&0, 0).ok()
}
