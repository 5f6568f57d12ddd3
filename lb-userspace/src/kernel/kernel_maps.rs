//! `DatapathMaps` on the real maps: typed aya handles on the pinned maps,
//! reads for stats and metrics, and reading everything back for a
//! restarted agent. The only `unsafe` of the agent besides syscalls lives
//! here (mmap of Maglev arrays).

use lb_common::{addr, Addr};
use std::{
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::atomic::{fence, AtomicU32, Ordering},
};

use anyhow::Context;
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, HashOfMaps, LpmTrie, MapData, PerCpuArray},
    Ebpf,
};
use lb_common::{
    maglev_elements, map_names, Backend, Counter, DatapathConfig, FrontendKey, MaglevKey,
    MaglevSlots, ServiceEntry, ServiceName, SourceRange, Verdict, BACKEND_F_PRESENT,
    LAYOUT_VERSION, MAGLEV_INNER_FLAGS, SOURCE_RANGE_ALLOW,
};

use crate::{
    model::Prefix,
    plan::{DatapathMaps, Snapshot, TableTarget, TableWrite},
};

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
    pub maglev: HashOfMaps<MapData, MaglevKey, MapData>,
    maglev_pin: PathBuf,
    pub verdicts: PerCpuArray<MapData, Counter>,
    pub service_stats: Array<MapData, Counter>,
    pub config: Array<MapData, DatapathConfig>,
    pub source_ranges: LpmTrie<MapData, SourceRange, u32>,
    pub cluster_cidrs: LpmTrie<MapData, Addr, u32>,
    pub service_names: HashMap<MapData, u32, ServiceName>,
}

impl KernelMaps {
    pub(crate) fn take(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<KernelMaps, aya::EbpfError> {
        Ok(KernelMaps {
            frontends: take_map(ebpf, map_names::FRONTENDS)?,
            backends: take_map(ebpf, map_names::BACKENDS)?,
            maglev: take_map(ebpf, map_names::MAGLEV)?,
            maglev_pin: pin_dir.join(map_names::MAGLEV),
            verdicts: take_map(ebpf, map_names::VERDICTS)?,
            service_stats: take_map(ebpf, map_names::SERVICE_STATS)?,
            config: take_map(ebpf, map_names::CONFIG)?,
            source_ranges: take_map(ebpf, map_names::SOURCE_RANGES)?,
            cluster_cidrs: take_map(ebpf, map_names::CLUSTER_CIDRS)?,
            service_names: take_map(ebpf, map_names::SERVICE_NAMES)?,
        })
    }

    /// Writes the node facts the datapath reads (SNAT address and ports,
    /// the node's netns cookie).
    pub fn set_config(&mut self, cfg: DatapathConfig) -> anyhow::Result<()> {
        let cfg = DatapathConfig {
            layout_version: LAYOUT_VERSION,
            ..cfg
        };
        self.config.set(0, cfg, 0).context("writing lb_config")
    }

    /// Makes `lb_cluster_cidrs` hold exactly `cidrs` (sources inside the
    /// cluster): the new ones are added before the old ones go, so a pod
    /// covered by both never looks external in between.
    pub fn set_cluster_cidrs(&mut self, cidrs: &[Prefix]) -> anyhow::Result<()> {
        let key = |p: &Prefix| {
            let (bits, a) = trie_prefix(p);
            Key::new(bits, a)
        };
        for p in cidrs {
            self.cluster_cidrs
                .insert(&key(p), 1, 0)
                .with_context(|| format!("writing cluster CIDR {p} to lb_cluster_cidrs"))?;
        }
        let held: Vec<Key<Addr>> = self.cluster_cidrs.keys().filter_map(Result::ok).collect();
        for k in held {
            let p = prefix_of(k.prefix_len(), &k.data());
            if !cidrs.contains(&p) {
                ignore_missing(self.cluster_cidrs.remove(&k))
                    .with_context(|| format!("removing cluster CIDR {p} from lb_cluster_cidrs"))?;
            }
        }
        Ok(())
    }

    /// Names service id `id` for the inspection commands.
    pub fn set_service_name(&mut self, id: u32, name: &str) -> anyhow::Result<()> {
        self.service_names
            .insert(id, ServiceName::new(name), 0)
            .with_context(|| format!("writing the name of service {id} to lb_svc_names"))
    }

    pub fn remove_service_name(&mut self, id: u32) -> anyhow::Result<()> {
        ignore_missing(self.service_names.remove(&id))
            .with_context(|| format!("removing the name of service {id} from lb_svc_names"))
    }

    /// Service ids that have a name.
    pub fn named_services(&self) -> Vec<u32> {
        self.service_names.keys().filter_map(Result::ok).collect()
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

    fn write_maglev(&mut self, tables: &[TableWrite]) -> Vec<anyhow::Result<()>> {
        if tables.len() <= 2 {
            return write_part(&self.maglev_pin, tables);
        }
        // Tables are built here, in the workers (CPU), and fresh ones wait
        // for the kernel's RCU grace period (sleep): waits from different
        // threads overlap.
        let chunk = tables.len().div_ceil(MAGLEV_WRITERS);
        let mut results: Vec<anyhow::Result<()>> = Vec::with_capacity(tables.len());
        std::thread::scope(|scope| {
            let workers: Vec<_> = tables
                .chunks(chunk)
                .map(|part| {
                    let pin = &self.maglev_pin;
                    scope.spawn(move || write_part(pin, part))
                })
                .collect();
            for w in workers {
                results.extend(w.join().expect("Maglev writer panicked"));
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

    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let frontends = self
            .frontends
            .iter()
            .collect::<Result<_, _>>()
            .context("reading lb_frontends")?;
        // One lookup per slot (about 0.2 s for 2^19 slots): only at start-up.
        let backends = self
            .backends
            .iter()
            .enumerate()
            .filter_map(|(id, r)| match r {
                Ok(b) if b.flags & BACKEND_F_PRESENT != 0 => Some(Ok((id as u32, b))),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()
            .context("reading lb_backends")?;
        let tables = self
            .maglev
            .keys()
            .collect::<Result<_, _>>()
            .context("reading lb_maglev")?;
        let source_ranges = self
            .source_ranges
            .keys()
            .map(|r| {
                r.map(|k| {
                    let data = k.data();
                    let range = prefix_of(k.prefix_len().saturating_sub(32), &data.addr);
                    (u32::from_be_bytes(data.service_id), range)
                })
            })
            .collect::<Result<_, _>>()
            .context("reading lb_src_ranges")?;
        Ok(Snapshot {
            frontends,
            backends,
            tables,
            source_ranges,
        })
    }
}

fn source_range_key(service_id: u32, range: Prefix) -> Key<SourceRange> {
    let (bits, a) = trie_prefix(&range);
    Key::new(
        32 + bits,
        SourceRange {
            service_id: service_id.to_be_bytes(),
            addr: a,
        },
    )
}

/// A prefix as the tries hold it: its length in the 128-bit form and its
/// address (IPv4 mapped; see `lb_common::addr`).
fn trie_prefix(p: &Prefix) -> (u32, Addr) {
    (
        addr::prefix_len(p.addr.is_ipv4(), u32::from(p.len)),
        addr::from_ip(p.addr),
    )
}

/// The prefix a trie key of `bits` bits over `a` stands for.
fn prefix_of(bits: u32, a: &Addr) -> Prefix {
    let v4 = addr::is_v4(a);
    Prefix {
        addr: addr::to_ip(a),
        len: if v4 { bits.saturating_sub(96) } else { bits } as u8,
    }
}

/// Fresh arrays a writer thread swaps in per batch: bounds the descriptors
/// it holds open (64 writers x 128) while a batch still waits one grace
/// period for many tables.
const FRESH_PER_BATCH: usize = 128;

/// Threads that write Maglev tables in parallel: they build the tables
/// (CPU) and wait in the kernel's RCU grace periods for the fresh ones
/// (sleep), so this is not bounded by the CPU count.
const MAGLEV_WRITERS: usize = 64;

/// The pinned outer map, and its descriptor (owned by the map) for the
/// batch call aya does not offer.
fn open_maglev(
    pin: &Path,
) -> anyhow::Result<(HashOfMaps<MapData, MaglevKey, MapData>, std::os::fd::RawFd)> {
    let data = MapData::from_pin(pin)?;
    let fd = data.fd().as_fd().as_raw_fd();
    Ok((HashOfMaps::try_from(aya::maps::Map::HashOfMaps(data))?, fd))
}

/// One worker's share of `write_maglev`, on its own handle on the pinned
/// map. Halves are rewritten in place (no map-in-map update, no wait). The
/// fresh arrays are built next and swapped in with one
/// BPF_MAP_UPDATE_BATCH: since Linux 6.8 the kernel waits one grace period
/// per batch instead of one per element (commit "bpf: Call
/// maybe_wait_bpf_programs() only once for generic_map_update_batch()").
/// What a batch did not do (refused before Linux 5.14, which added batches
/// to hash-of-maps, or stopped part-way) goes one by one, as do removals.
fn write_part(pin: &Path, part: &[TableWrite]) -> Vec<anyhow::Result<()>> {
    let (mut map, fd) = match open_maglev(pin) {
        Ok(m) => m,
        Err(e) => {
            return part
                .iter()
                .map(|_| Err(anyhow::anyhow!("opening {}: {e}", pin.display())))
                .collect()
        }
    };
    let name = |key: MaglevKey| format!("Maglev table {}/{}", key.service_id, key.table_size);
    let mut results: Vec<Option<anyhow::Result<()>>> = part.iter().map(|_| None).collect();
    let mut fresh: Vec<(usize, MaglevKey, MapData)> = Vec::new();
    for (i, &(key, write)) in part.iter().enumerate() {
        let Some((spec, target)) = write else {
            results[i] = Some(remove_table(&mut map, key));
            continue;
        };
        let slots = spec.slots();
        if let TableTarget::Half(half) = target {
            match map.get(&key, 0) {
                Ok(inner) => {
                    results[i] = Some(write_half(&inner, &slots, half).with_context(|| {
                        format!("rewriting half {} of {}", HALF_NAMES[half & 1], name(key))
                    }));
                    continue;
                }
                // Not there (someone removed it): written fresh.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => {
                    results[i] = Some(Err(e).with_context(|| format!("finding {}", name(key))));
                    continue;
                }
            }
        }
        match new_maglev_array(&slots) {
            Ok(array) => fresh.push((i, key, array)),
            Err(e) => results[i] = Some(Err(e.context("building a Maglev table"))),
        }
        if fresh.len() == FRESH_PER_BATCH {
            swap_fresh(&mut map, fd, &mut fresh, &mut results);
        }
    }
    swap_fresh(&mut map, fd, &mut fresh, &mut results);
    results
        .into_iter()
        .map(|r| r.expect("every table has a result"))
        .collect()
}

/// Swaps in the fresh arrays built so far (`(index in the part, key,
/// array)`), recording each one's result, and closes their descriptors.
fn swap_fresh(
    map: &mut HashOfMaps<MapData, MaglevKey, MapData>,
    fd: std::os::fd::RawFd,
    fresh: &mut Vec<(usize, MaglevKey, MapData)>,
    results: &mut [Option<anyhow::Result<()>>],
) {
    let keys: Vec<MaglevKey> = fresh.iter().map(|f| f.1).collect();
    let fds: Vec<u32> = fresh
        .iter()
        .map(|f| f.2.fd().as_fd().as_raw_fd() as u32)
        .collect();
    let done = update_batch(fd, &keys, &fds);
    for (n, (i, key, array)) in fresh.drain(..).enumerate() {
        results[i] = Some(if n < done {
            Ok(())
        } else {
            map.insert(key, &array, 0).with_context(|| {
                format!(
                    "swapping in Maglev table {}/{}",
                    key.service_id, key.table_size
                )
            })
        });
    }
}

/// BPF_MAP_UPDATE_BATCH of `values` under `keys` into map `fd`; returns
/// how many were written (all, or those before an error). Written by hand:
/// aya 0.14 has no batch operations.
fn update_batch(fd: std::os::fd::RawFd, keys: &[MaglevKey], values: &[u32]) -> usize {
    use aya_obj::generated::{bpf_attr, bpf_cmd};
    if keys.is_empty() {
        return 0;
    }
    // SAFETY: bpf_attr is plain data; all-zero is its "unset" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // The batch member of the union, the one this command reads; the key
    // and value arrays outlive the call and hold `count` elements.
    attr.batch.keys = keys.as_ptr() as u64;
    attr.batch.values = values.as_ptr() as u64;
    attr.batch.count = keys.len() as u32;
    attr.batch.map_fd = fd as u32;
    // SAFETY: a bpf(2) call with an attr of the size we pass.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_MAP_UPDATE_BATCH as libc::c_long,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if r == 0 {
        return keys.len();
    }
    // On an error part-way the kernel sets `count` to the elements it
    // wrote; a refused command leaves it as we set it, so a full count
    // after an error means none.
    // SAFETY: reading back the member we wrote.
    let count = unsafe { attr.batch.count } as usize;
    if count >= keys.len() {
        0
    } else {
        count
    }
}

/// Removes a table (a map-in-map update: the kernel waits a grace period).
fn remove_table(
    map: &mut HashOfMaps<MapData, MaglevKey, MapData>,
    key: MaglevKey,
) -> anyhow::Result<()> {
    ignore_missing(map.remove(&key)).with_context(|| {
        format!(
            "removing Maglev table {}/{}",
            key.service_id, key.table_size
        )
    })
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

/// "A", "B": half names for messages.
const HALF_NAMES: [&str; 2] = ["A", "B"];

/// A new inner Maglev array holding `slots` in both halves, so a frontend
/// reading either finds it.
fn new_maglev_array(slots: &[u32]) -> anyhow::Result<MapData> {
    let obj = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        4,
        std::mem::size_of::<MaglevSlots>() as u32,
        maglev_elements(slots.len() as u32),
        MAGLEV_INNER_FLAGS,
    );
    let map = MapData::create(obj, "lb_maglev_tbl", None)?;
    let mut cells = Cells::map(&map, slots.len())?;
    cells.write(0, slots);
    cells.write(1, slots);
    Ok(map)
}

/// Rewrites half `half` of the held array `inner` with `slots`. The
/// datapath reads a half only while its generation is set and unchanged
/// (`lb_common::MaglevSlots`): the generation is cleared, the slots
/// written, then a new generation set.
fn write_half(inner: &MapData, slots: &[u32], half: usize) -> anyhow::Result<()> {
    let mut cells = Cells::map(inner, slots.len())?;
    cells.write(half & 1, slots);
    Ok(())
}

/// A Maglev inner array mapped into memory (arrays are created
/// BPF_F_MMAPABLE): one copy per table instead of one syscall per slot
/// (65,537 slots would take ~65k syscalls). Unmapped on drop.
struct Cells {
    ptr: *mut MaglevSlots,
    /// Elements: the header and the slots.
    len: usize,
}

impl Cells {
    /// Maps `map`, which must be an array of `maglev_elements(slots)`
    /// `MaglevSlots` (checked: a wrong size would write out of bounds).
    fn map(map: &MapData, slots: usize) -> anyhow::Result<Cells> {
        let len = maglev_elements(slots as u32) as usize;
        let info = map.info().context("reading a Maglev array's info")?;
        anyhow::ensure!(
            info.max_entries() as usize == len
                && info.value_size() as usize == std::mem::size_of::<MaglevSlots>(),
            "the Maglev array holds {} elements of {} bytes, not {len} of {}",
            info.max_entries(),
            info.value_size(),
            std::mem::size_of::<MaglevSlots>()
        );
        let bytes = len * std::mem::size_of::<MaglevSlots>();
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a shared mapping of exactly the array's `bytes` (8-byte
        // elements, the kernel's stride for an 8-byte value).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of a Maglev array");
        }
        Ok(Cells {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The u32 of half `half` in element `i`, as an atomic: the datapath
    /// reads these words while we write them.
    fn word(&self, i: usize, half: usize) -> &AtomicU32 {
        assert!(i < self.len && half < 2);
        // SAFETY: in bounds (checked above); the mapping is 4-byte aligned
        // and lives as long as `self`; all our accesses are atomic.
        unsafe { AtomicU32::from_ptr(self.ptr.add(i).cast::<u32>().add(half)) }
    }

    /// Writes `slots` into half `half`, bracketed by its generation.
    fn write(&mut self, half: usize, slots: &[u32]) {
        let header = self.word(0, half);
        let old = header.load(Ordering::Relaxed);
        header.store(0, Ordering::Relaxed);
        // The cleared generation is visible before any slot changes.
        fence(Ordering::Release);
        for (i, &s) in slots.iter().enumerate() {
            self.word(i + 1, half).store(s, Ordering::Relaxed);
        }
        // Every slot is visible before the new generation, which differs
        // from the one a reader may have seen before the rewrite.
        let generation = match old.wrapping_add(1) {
            0 => 1,
            g => g,
        };
        self.word(0, half).store(generation, Ordering::Release);
    }
}

impl Drop for Cells {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe {
            libc::munmap(
                self.ptr.cast(),
                self.len * std::mem::size_of::<MaglevSlots>(),
            );
        }
    }
}
