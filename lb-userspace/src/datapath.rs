//! The kernel side, through aya: loads the embedded eBPF object, pins its
//! maps under the pin directory, attaches programs to interfaces, and
//! implements `DatapathMaps` on the real maps. The only `unsafe` of the
//! agent lives here (mmap of Maglev arrays).

use std::{
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use anyhow::Context;
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, HashOfMaps, LpmTrie, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    map_names, program_names, Backend, Counter, DatapathConfig, FrontendKey, ServiceEntry,
    SourceRange, Verdict, MAGLEV_INNER_FLAGS, SOURCE_RANGE_ALLOW,
};

use crate::{model::Prefix, planner::DatapathMaps};

/// The datapath object, built by `cargo xtask build-ebpf` and embedded by
/// build.rs (empty when it was missing at build time).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this lb binary was built without the eBPF datapath; run `cargo xtask build-ebpf` \
         and then `cargo build --release --bin lb`"
    )]
    NoObject,
    #[error("the kernel refused program {program}: {io_error}\nlast lines of the verifier log:\n{log_tail}")]
    Verifier {
        program: &'static str,
        io_error: std::io::Error,
        log_tail: String,
    },
    #[error("attaching {program} to {iface}: {source}")]
    Attach {
        program: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
}

/// How a program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// TC ingress (TCX): right for any interface, veth included.
    Tc,
    /// XDP (native where the driver has it): for NICs that hand over
    /// complete checksums.
    Xdp,
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Datapath {
    /// Loads the programs and creates (or, for pins left behind, reuses)
    /// the maps pinned under `pin_dir`.
    pub fn load(pin_dir: &Path) -> Result<(Datapath, KernelMaps), DatapathError> {
        Self::load_object(OBJECT, pin_dir)
    }

    /// `load` with another object (tests use a damaged one to see the
    /// verifier's refusal reported).
    pub fn load_object(
        object: &[u8],
        pin_dir: &Path,
    ) -> Result<(Datapath, KernelMaps), DatapathError> {
        if object.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|n| (*n, pin_dir.join(n)))
            .collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(DatapathError::Load)?;
        let names = [program_names::TC, program_names::XDP]
            .into_iter()
            .chain(program_names::SOCK_ALL);
        for name in names {
            let program = ebpf
                .program_mut(name)
                .expect("the object defines this program");
            let loaded = match program {
                aya::programs::Program::SchedClassifier(p) => p.load(),
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                _ => unreachable!("lb programs are TC, XDP and cgroup sock_addr"),
            };
            loaded.map_err(|e| match e {
                ProgramError::LoadError {
                    io_error,
                    verifier_log,
                } => DatapathError::Verifier {
                    program: name,
                    io_error,
                    log_tail: tail(&verifier_log.to_string(), 20),
                },
                other => DatapathError::Load(aya::EbpfError::ProgramError(other)),
            })?;
        }
        let maps = KernelMaps::take(&mut ebpf, pin_dir).map_err(DatapathError::Load)?;
        Ok((
            Datapath {
                ebpf,
                pin_dir: pin_dir.to_path_buf(),
            },
            maps,
        ))
    }

    /// Attaches to `iface` (which the caller has checked exists); the
    /// attachment lasts as long as this value.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<(), DatapathError> {
        let result = match mode {
            AttachMode::Tc => {
                let p: &mut SchedClassifier = self
                    .ebpf
                    .program_mut(program_names::TC)
                    .and_then(|p| p.try_into().ok())
                    .expect("TC program is loaded");
                p.attach(iface, TcAttachType::Ingress).map(drop)
            }
            AttachMode::Xdp => {
                let p: &mut Xdp = self
                    .ebpf
                    .program_mut(program_names::XDP)
                    .and_then(|p| p.try_into().ok())
                    .expect("XDP program is loaded");
                p.attach(iface, XdpMode::Default).map(drop)
            }
        };
        let program = if mode == AttachMode::Tc {
            program_names::TC
        } else {
            program_names::XDP
        };
        result.map_err(|source| DatapathError::Attach {
            program,
            iface: iface.to_string(),
            source,
        })
    }

    /// Attaches the socket hooks (connect4, sendmsg4, recvmsg4,
    /// getpeername4) to the cgroup v2 directory `cgroup`: the node's own
    /// sockets in it (and below it) reach frontends too.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> anyhow::Result<()> {
        let dir = std::fs::File::open(cgroup).with_context(|| {
            format!(
                "opening cgroup {}: give the cgroup v2 directory whose processes' \
                 connections to services should be balanced (usually /sys/fs/cgroup)",
                cgroup.display()
            )
        })?;
        for name in program_names::SOCK_ALL {
            let p: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .expect("socket hook is loaded");
            // A link (bpf_link_create) always coexists with other programs on the
            // cgroup; the kernel refuses the ALLOW_MULTI flag there, so "Single".
            p.attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
        }
        Ok(())
    }

    /// For BPF_PROG_TEST_RUN: the loaded programs.
    pub fn tc_program(&self) -> &SchedClassifier {
        self.ebpf
            .program(program_names::TC)
            .and_then(|p| p.try_into().ok())
            .expect("loaded")
    }

    pub fn xdp_program(&self) -> &Xdp {
        self.ebpf
            .program(program_names::XDP)
            .and_then(|p| p.try_into().ok())
            .expect("loaded")
    }

    /// Detaches everything (by dropping the programs' links) and removes
    /// the pinned maps and the pin directory.
    pub fn shutdown(self) -> std::io::Result<()> {
        let Datapath { ebpf, pin_dir } = self;
        drop(ebpf);
        remove_pins(&pin_dir)
    }
}

/// Removes our pinned maps (and the directory, if then empty).
pub fn remove_pins(pin_dir: &Path) -> std::io::Result<()> {
    for name in map_names::ALL {
        match std::fs::remove_file(pin_dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Pins left behind by an agent that did not exit cleanly.
pub fn stale_pins(pin_dir: &Path) -> Vec<&'static str> {
    map_names::ALL
        .iter()
        .copied()
        .filter(|n| pin_dir.join(n).exists())
        .collect()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Takes map `name` out of the loaded object as a typed handle.
fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, aya::EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    ebpf.take_map(name)
        .expect("the object defines this map")
        .try_into()
        .map_err(aya::EbpfError::MapError)
}

/// Typed handles on the pinned maps.
pub struct KernelMaps {
    pub frontends: HashMap<MapData, FrontendKey, ServiceEntry>,
    pub backends: Array<MapData, Backend>,
    pub maglev: HashOfMaps<MapData, u32, MapData>,
    maglev_pin: PathBuf,
    pub verdicts: PerCpuArray<MapData, Counter>,
    pub service_stats: Array<MapData, Counter>,
    pub config: Array<MapData, DatapathConfig>,
    pub source_ranges: LpmTrie<MapData, SourceRange, u32>,
}

impl KernelMaps {
    fn take(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<KernelMaps, aya::EbpfError> {
        Ok(KernelMaps {
            frontends: take_map(ebpf, map_names::FRONTENDS)?,
            backends: take_map(ebpf, map_names::BACKENDS)?,
            maglev: take_map(ebpf, map_names::MAGLEV)?,
            maglev_pin: pin_dir.join(map_names::MAGLEV),
            verdicts: take_map(ebpf, map_names::VERDICTS)?,
            service_stats: take_map(ebpf, map_names::SERVICE_STATS)?,
            config: take_map(ebpf, map_names::CONFIG)?,
            source_ranges: take_map(ebpf, map_names::SOURCE_RANGES)?,
        })
    }

    /// Writes the node facts the datapath reads (SNAT address and ports,
    /// the node's netns cookie).
    pub fn set_config(&mut self, cfg: DatapathConfig) -> anyhow::Result<()> {
        self.config.set(0, cfg, 0).context("writing lb_config")
    }

    /// Packets and bytes per verdict, summed over CPUs.
    pub fn verdict_counters(&self) -> anyhow::Result<Vec<(Verdict, Counter)>> {
        Verdict::ALL
            .iter()
            .map(|&v| {
                let per_cpu = self.verdicts.get(&(v as u32), 0)?;
                let sum = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                });
                Ok((v, sum))
            })
            .collect()
    }

    pub fn service_counter(&self, service_id: u32) -> anyhow::Result<Counter> {
        Ok(self.service_stats.get(&service_id, 0)?)
    }
}

impl DatapathMaps for KernelMaps {
    fn set_backend(&mut self, id: u32, backend: Backend) -> anyhow::Result<()> {
        self.backends
            .set(id, backend, 0)
            .with_context(|| format!("writing backend {id}"))
    }

    fn clear_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.backends
            .set(id, Backend::default(), 0)
            .with_context(|| format!("clearing backend {id}"))
    }

    fn write_maglev(&mut self, tables: &[(u32, Option<&[u32]>)]) -> Vec<anyhow::Result<()>> {
        if tables.len() <= 2 {
            return tables
                .iter()
                .map(|&(id, slots)| write_maglev_one(&mut self.maglev, id, slots))
                .collect();
        }
        // Each map-in-map update waits for an RCU grace period (milliseconds)
        // in the kernel; waits from different threads overlap, so a batch is
        // spread over workers, each with its own handle on the pinned map.
        let chunk = tables.len().div_ceil(MAGLEV_WRITERS);
        let mut results: Vec<anyhow::Result<()>> = Vec::with_capacity(tables.len());
        std::thread::scope(|scope| {
            let workers: Vec<_> = tables
                .chunks(chunk)
                .map(|part| {
                    let pin = &self.maglev_pin;
                    scope.spawn(move || match open_maglev(pin) {
                        Ok(mut map) => part
                            .iter()
                            .map(|&(id, slots)| write_maglev_one(&mut map, id, slots))
                            .collect(),
                        Err(e) => part
                            .iter()
                            .map(|_| Err(anyhow::anyhow!("opening {}: {e}", pin.display())))
                            .collect(),
                    })
                })
                .collect();
            for w in workers {
                let part: Vec<anyhow::Result<()>> = w.join().expect("Maglev writer panicked");
                results.extend(part);
            }
        });
        results
    }

    fn set_frontend(&mut self, key: FrontendKey, entry: ServiceEntry) -> anyhow::Result<()> {
        self.frontends
            .insert(key, entry, 0)
            .context("writing a frontend")
    }

    fn remove_frontend(&mut self, key: FrontendKey) -> anyhow::Result<()> {
        ignore_missing(self.frontends.remove(&key)).context("removing a frontend")
    }

    fn set_source_range(&mut self, service_id: u32, range: Prefix) -> anyhow::Result<()> {
        self.source_ranges
            .insert(&source_range_key(service_id, range), SOURCE_RANGE_ALLOW, 0)
            .with_context(|| format!("writing source range {range} of service {service_id}"))
    }

    fn remove_source_range(&mut self, service_id: u32, range: Prefix) -> anyhow::Result<()> {
        ignore_missing(
            self.source_ranges
                .remove(&source_range_key(service_id, range)),
        )
        .with_context(|| format!("removing source range {range} of service {service_id}"))
    }
}

fn source_range_key(service_id: u32, range: Prefix) -> Key<SourceRange> {
    Key::new(
        32 + u32::from(range.len),
        SourceRange {
            service_id: service_id.to_be_bytes(),
            addr: range.addr.octets(),
        },
    )
}

/// Threads that swap Maglev tables in parallel (they mostly sleep in the
/// kernel's RCU waits, so this is not bounded by the CPU count).
const MAGLEV_WRITERS: usize = 64;

fn open_maglev(pin: &Path) -> anyhow::Result<HashOfMaps<MapData, u32, MapData>> {
    let data = MapData::from_pin(pin)?;
    Ok(HashOfMaps::try_from(aya::maps::Map::HashOfMaps(data))?)
}

fn write_maglev_one(
    map: &mut HashOfMaps<MapData, u32, MapData>,
    service_id: u32,
    slots: Option<&[u32]>,
) -> anyhow::Result<()> {
    match slots {
        Some(slots) => {
            let table = new_maglev_array(slots).context("building a Maglev table")?;
            // One update swaps the whole table in; the kernel frees the old
            // array once no program holds it.
            map.insert(service_id, &table, 0)
                .with_context(|| format!("swapping in Maglev table {service_id}"))
        }
        None => ignore_missing(map.remove(&service_id))
            .with_context(|| format!("removing Maglev table {service_id}")),
    }
}

/// Deleting what is already gone is success (aya reports it either as
/// KeyNotFound or as the syscall's ENOENT, depending on the map type).
fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        other => other,
    }
}

/// A new inner Maglev array holding `slots`, filled through mmap: one copy
/// instead of one syscall per slot (65,537 slots would take ~65k syscalls).
fn new_maglev_array(slots: &[u32]) -> anyhow::Result<MapData> {
    let obj = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        4,
        4,
        slots.len() as u32,
        MAGLEV_INNER_FLAGS,
    );
    let map = MapData::create(obj, "lb_maglev_tbl", None)?;
    // The kernel stores array elements at an 8-byte stride
    // (elem_size = round_up(value_size, 8)), and the mmap exposes exactly
    // that layout: each u32 slot sits in its own u64, little-endian low half.
    let len = slots.len() * std::mem::size_of::<u64>();
    let fd = map.fd().as_fd().as_raw_fd();
    // SAFETY: mapping a BPF_F_MMAPABLE array of `slots.len()` elements of
    // 8 bytes; we write exactly `len` bytes, then unmap before the map is
    // used anywhere.
    unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of a Maglev array");
        }
        let elems = std::slice::from_raw_parts_mut(ptr.cast::<u64>(), slots.len());
        for (e, &s) in elems.iter_mut().zip(slots) {
            *e = u64::from(s).to_le();
        }
        libc::munmap(ptr, len);
    }
    Ok(map)
}
