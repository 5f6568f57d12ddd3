//! The pin directory: what an agent leaves on the bpf filesystem so that
//! the datapath outlives it, and how the next agent judges what it finds.
//!
//! ```text
//! <pin_dir>/lb_*            the maps (lb_common::map_names::ALL)
//! <pin_dir>/links/tc_<if>   one bpf_link per attachment; the pin keeps the
//! <pin_dir>/links/xdp_<if>  program attached after the agent exits
//! <pin_dir>/links/<prog>_cg<cgroup id>
//! ```
//!
//! A restarted agent swaps its programs into the pinned links (one atomic
//! step per link, nothing detached in between) and adopts the pinned maps,
//! unless their layout differs from its own, in which case it recreates
//! them (see `incompatible_maps`).

use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::Context;
use aya::maps::{Array, MapData, MapInfo, MapType};
use aya_obj::generated::bpf_map_type;
use lb_common::{map_names, DatapathConfig, LAYOUT_VERSION};

use crate::kernel::conntrack::CtSizes;

pub const LINKS_DIR: &str = "links";

pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(LINKS_DIR)
}

/// Our maps that are pinned under `pin_dir`.
pub fn pinned_maps(pin_dir: &Path) -> Vec<&'static str> {
    map_names::ALL
        .iter()
        .copied()
        .filter(|n| pin_dir.join(n).exists())
        .collect()
}

/// Names of the pinned links under `pin_dir`, sorted.
pub fn pinned_links(pin_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(links_dir(pin_dir))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A pinned map this agent cannot adopt, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatible {
    pub map: &'static str,
    pub reason: String,
}

/// Pinned maps whose kernel definition (type, key and value size, entries,
/// flags) differs from the one in `object`, or, with equal definitions,
/// whose contents were written under another `LAYOUT_VERSION`.
pub fn incompatible_maps(
    object: &[u8],
    pin_dir: &Path,
    sizes: &CtSizes,
) -> anyhow::Result<Vec<Incompatible>> {
    let obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    let mut out = Vec::new();
    for name in map_names::ALL {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let want = obj
            .maps
            .get(name)
            .with_context(|| format!("the eBPF object defines no map {name}"))?;
        let have = MapInfo::from_pin(&path)
            .with_context(|| format!("reading the pinned map {}", path.display()))?;
        let entries = sizes.of(name).unwrap_or(want.max_entries());
        if let Some(reason) = definition_difference(want, entries, &have) {
            out.push(Incompatible { map: name, reason });
        }
    }
    if out.is_empty() && pin_dir.join(map_names::CONFIG).exists() {
        let version = pinned_layout_version(pin_dir)?;
        // 0: the config was never written (the agent died before), which
        // says nothing about the layout.
        if version != 0 && version != LAYOUT_VERSION {
            out.push(Incompatible {
                map: map_names::CONFIG,
                reason: format!(
                    "written by an agent with map layout version {version}; this one uses \
                     {LAYOUT_VERSION}"
                ),
            });
        }
    }
    Ok(out)
}

/// How the pinned map differs from `want` with `entries` entries.
fn definition_difference(want: &aya_obj::Map, entries: u32, have: &MapInfo) -> Option<String> {
    let want_type = bpf_map_type::try_from(want.map_type())
        .ok()
        .and_then(|t| MapType::try_from(t).ok());
    let have_type = have.map_type().ok();
    let fields = [
        ("key size", want.key_size(), have.key_size()),
        ("value size", want.value_size(), have.value_size()),
        ("max entries", entries, have.max_entries()),
        ("flags", want.map_flags(), have.map_flags()),
    ];
    let mut diffs: Vec<String> = fields
        .iter()
        .filter(|(_, w, h)| w != h)
        .map(|(what, w, h)| format!("{what} {h}, this agent needs {w}"))
        .collect();
    if want_type != have_type {
        diffs.insert(
            0,
            format!("type {have_type:?}, this agent needs {want_type:?}"),
        );
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

fn pinned_layout_version(pin_dir: &Path) -> anyhow::Result<u32> {
    let data = MapData::from_pin(pin_dir.join(map_names::CONFIG))?;
    let config: Array<MapData, DatapathConfig> = Array::try_from(aya::maps::Map::Array(data))?;
    Ok(config.get(&0, 0)?.layout_version)
}

/// The pinned map `name` under `dir`, typed; the error says which agent's
/// pins were looked for.
pub fn open_pinned<T>(dir: &Path, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot open {} ({e}); has an lb agent run with this --pin-dir?",
            path.display()
        )
    })?;
    Ok(T::try_from(aya::maps::Map::from_map_data(data)?)?)
}

/// Removes the pinned maps (the kernel frees each once no program uses it).
pub fn remove_maps(pin_dir: &Path) -> io::Result<()> {
    for name in map_names::ALL {
        remove_if_present(&pin_dir.join(name))?;
    }
    Ok(())
}

/// Removes one pinned link: the program detaches when our last handle on
/// the link closes.
pub fn remove_link(pin_dir: &Path, name: &str) -> io::Result<()> {
    remove_if_present(&links_dir(pin_dir).join(name))
}

/// Removes everything an agent pins (links first, so nothing runs on
/// half-removed maps) and the directories, if then empty.
pub fn remove_all(pin_dir: &Path) -> io::Result<()> {
    for name in pinned_links(pin_dir) {
        remove_link(pin_dir, &name)?;
    }
    remove_dir_if_present(&links_dir(pin_dir))?;
    remove_maps(pin_dir)?;
    remove_dir_if_present(pin_dir)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_dir_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
