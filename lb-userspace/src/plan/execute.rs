//! Runs a plan against the maps: phase by phase, recording every write
//! that succeeded in `State`, and skipping the later phases of an owner
//! one of whose writes failed (its frontends are not pointed at a table
//! that is not there, its old backends are not cleared while a table may
//! still name them). Returns what failed; the records of failed service
//! ports are marked unknown so the next plan rewrites them.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    compute::{Owner, Plan, Step},
    maps::{DatapathMaps, TableWrite},
    state::{State, Write},
};

pub fn execute<M: DatapathMaps>(
    maps: &mut M,
    state: &mut State,
    plan: Plan,
) -> BTreeMap<Owner, String> {
    let Plan {
        records,
        owners,
        phases,
        ..
    } = plan;
    for (key, record) in records {
        state.set_record(&key, record);
    }
    // By owner index.
    let mut failed: BTreeMap<u32, String> = BTreeMap::new();
    for steps in phases {
        let (tables, others): (Vec<Step>, Vec<Step>) = steps
            .into_iter()
            .filter(|s| !failed.contains_key(&s.owner))
            .partition(|s| matches!(s.write, Write::SetTable(..) | Write::RemoveTable(..)));
        run_tables(maps, state, tables, &mut failed);
        for s in others {
            // An earlier write of the same owner in this phase failed.
            if failed.contains_key(&s.owner) {
                continue;
            }
            match write_one(maps, &s.write) {
                Ok(()) => state.applied(&s.write),
                Err(e) => {
                    failed.insert(s.owner, format!("{e:#}"));
                }
            }
        }
    }
    failed
        .into_iter()
        .map(|(i, e)| {
            let owner = owners[i as usize].clone();
            if let Owner::Port(key) = &owner {
                state.mark_unknown(key);
            }
            (owner, e)
        })
        .collect()
}

/// The phase's table writes as one batch (their RCU waits overlap).
fn run_tables<M: DatapathMaps>(
    maps: &mut M,
    state: &mut State,
    steps: Vec<Step>,
    failed: &mut BTreeMap<u32, String>,
) {
    if steps.is_empty() {
        return;
    }
    let batch: Vec<TableWrite> = steps
        .iter()
        .map(|s| match &s.write {
            Write::SetTable(key, spec, _, target) => (*key, Some((&**spec, *target))),
            Write::RemoveTable(key) => (*key, None),
            _ => unreachable!("partitioned"),
        })
        .collect();
    let results = maps.write_maglev(&batch);
    let mut done: BTreeSet<usize> = BTreeSet::new();
    for (i, (s, r)) in steps.iter().zip(results).enumerate() {
        match r {
            Ok(()) => {
                done.insert(i);
            }
            Err(e) => {
                failed.entry(s.owner).or_insert(format!("{e:#}"));
            }
        }
    }
    for i in done {
        state.applied(&steps[i].write);
    }
}

fn write_one<M: DatapathMaps>(maps: &mut M, w: &Write) -> anyhow::Result<()> {
    match w {
        Write::SetBackend(bid, b) => maps.set_backend(*bid, *b),
        Write::ClearBackend(bid) => maps.clear_backend(*bid),
        Write::SetFrontend(key, e) => maps.set_frontend(*key, *e),
        Write::RemoveFrontend(key) => maps.remove_frontend(*key),
        Write::SetRange(id, r) => maps.set_source_range(*id, *r),
        Write::RemoveRange(id, r) => maps.remove_source_range(*id, *r),
        Write::SetTable(..) | Write::RemoveTable(..) => {
            unreachable!("tables are written in batches")
        }
    }
}
