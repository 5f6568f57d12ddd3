//! The writes the datapath maps accept (`DatapathMaps`), and `MemoryMaps`,
//! the same maps as plain collections: the second implementation the
//! planner's tests need, and a model of what the kernel maps should hold.

use std::collections::{BTreeSet, HashMap};

use lb_common::{Backend, FrontendKey, MaglevKey, ServiceEntry, SERVICE_F_TABLE_B};

use super::{maglev::TableSpec, state::TableTarget};

use crate::model::Prefix;

pub trait DatapathMaps {
    fn set_backend(&mut self, id: u32, backend: Backend) -> anyhow::Result<()>;
    fn clear_backend(&mut self, id: u32) -> anyhow::Result<()>;
    /// For each table: writes it (`Some`, slots are backend ids) where the
    /// target says, or removes it (`None`). One result per entry, in order.
    /// A batch, because the kernel waits an RCU grace period after every
    /// map-in-map update (a fresh table, a removal), and an implementation
    /// can overlap those waits. A half written in place whose array is not
    /// there is written fresh instead.
    fn write_maglev(&mut self, tables: &[TableWrite]) -> Vec<anyhow::Result<()>>;
    fn set_frontend(&mut self, key: FrontendKey, entry: ServiceEntry) -> anyhow::Result<()>;
    fn remove_frontend(&mut self, key: FrontendKey) -> anyhow::Result<()>;
    /// Admits `range` to the load-balancer frontends of `service_id`.
    fn set_source_range(&mut self, service_id: u32, range: Prefix) -> anyhow::Result<()>;
    fn remove_source_range(&mut self, service_id: u32, range: Prefix) -> anyhow::Result<()>;
    /// Reads back everything written (see `Programmer::adopt`).
    fn snapshot(&self) -> anyhow::Result<Snapshot>;
}

/// One entry of a `write_maglev` batch.
pub type TableWrite<'a> = (MaglevKey, Option<(&'a TableSpec, TableTarget)>);

/// What the maps hold, read back: how a restarted agent learns what the
/// previous one programmed (the maps are the only record that survives).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub frontends: Vec<(FrontendKey, ServiceEntry)>,
    /// Every present backend, by id.
    pub backends: Vec<(u32, Backend)>,
    pub tables: Vec<MaglevKey>,
    pub source_ranges: Vec<(u32, Prefix)>,
}

#[derive(Debug, Default, Clone)]
pub struct MemoryMaps {
    pub backends: HashMap<u32, Backend>,
    /// Halves A and B of each table.
    pub maglev: HashMap<MaglevKey, [Vec<u32>; 2]>,
    pub frontends: HashMap<FrontendKey, ServiceEntry>,
    pub source_ranges: BTreeSet<(u32, Prefix)>,
    /// Every write, in order, for tests that check ordering.
    pub log: Vec<String>,
}

impl MemoryMaps {
    /// The table a frontend entry leads to (what the datapath looks up):
    /// the half its flags name.
    pub fn table_for(&self, e: &ServiceEntry) -> Option<&Vec<u32>> {
        let halves = self.maglev.get(&MaglevKey {
            service_id: e.id,
            table_size: e.table_size,
        })?;
        Some(&halves[usize::from(e.flags & SERVICE_F_TABLE_B != 0)])
    }

    /// The tables of one service id (normally one), each as its frontends
    /// read it (half A if none does).
    pub fn tables_of(&self, id: u32) -> Vec<&Vec<u32>> {
        let mut keys: Vec<&MaglevKey> = self.maglev.keys().filter(|k| k.service_id == id).collect();
        keys.sort();
        keys.into_iter()
            .map(|k| {
                let half = self
                    .frontends
                    .values()
                    .find(|e| e.id == id && e.table_size == k.table_size)
                    .map_or(0, |e| usize::from(e.flags & SERVICE_F_TABLE_B != 0));
                &self.maglev[k][half]
            })
            .collect()
    }
}

impl DatapathMaps for MemoryMaps {
    fn set_backend(&mut self, id: u32, backend: Backend) -> anyhow::Result<()> {
        self.log.push(format!("set_backend {id}"));
        self.backends.insert(id, backend);
        Ok(())
    }
    fn clear_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.log.push(format!("clear_backend {id}"));
        self.backends.remove(&id);
        Ok(())
    }
    fn write_maglev(&mut self, tables: &[TableWrite]) -> Vec<anyhow::Result<()>> {
        tables
            .iter()
            .map(|&(key, write)| {
                let (id, size) = (key.service_id, key.table_size);
                match write {
                    Some((spec, target)) => {
                        self.log.push(format!("set_maglev {id}/{size} {target:?}"));
                        let slots = spec.slots();
                        match (target, self.maglev.get_mut(&key)) {
                            (TableTarget::Half(h), Some(halves)) => halves[h] = slots,
                            _ => {
                                self.maglev.insert(key, [slots.clone(), slots]);
                            }
                        }
                    }
                    None => {
                        self.log.push(format!("remove_maglev {id}/{size}"));
                        self.maglev.remove(&key);
                    }
                }
                Ok(())
            })
            .collect()
    }
    fn set_frontend(&mut self, key: FrontendKey, entry: ServiceEntry) -> anyhow::Result<()> {
        self.log.push(format!(
            "set_frontend {}",
            crate::inspect::endpoint(&key.addr, key.port)
        ));
        self.frontends.insert(key, entry);
        Ok(())
    }
    fn remove_frontend(&mut self, key: FrontendKey) -> anyhow::Result<()> {
        self.log
            .push(format!("remove_frontend {:?}:{}", key.addr, key.port));
        self.frontends.remove(&key);
        Ok(())
    }
    fn set_source_range(&mut self, service_id: u32, range: Prefix) -> anyhow::Result<()> {
        self.log
            .push(format!("set_source_range {service_id} {range}"));
        self.source_ranges.insert((service_id, range));
        Ok(())
    }
    fn remove_source_range(&mut self, service_id: u32, range: Prefix) -> anyhow::Result<()> {
        self.log
            .push(format!("remove_source_range {service_id} {range}"));
        self.source_ranges.remove(&(service_id, range));
        Ok(())
    }
    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut s = Snapshot {
            frontends: self.frontends.iter().map(|(k, e)| (*k, *e)).collect(),
            backends: self.backends.iter().map(|(id, b)| (*id, *b)).collect(),
            tables: self.maglev.keys().copied().collect(),
            source_ranges: self.source_ranges.iter().copied().collect(),
        };
        // Deterministic, like a map walk would be for the same contents.
        s.frontends.sort_by_key(|(k, _)| (k.addr, k.port, k.proto));
        s.backends.sort_by_key(|(id, _)| *id);
        s.tables.sort_unstable();
        Ok(s)
    }
}
