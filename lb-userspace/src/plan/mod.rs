//! From desired state to map writes, in two halves: `compute::plan` is a
//! pure function from what is programmed (`State`), the desired state and
//! the service ports a change touched to a plan of phased writes;
//! `execute::execute` runs a plan against the maps (the kernel's, or
//! `MemoryMaps` in tests) and returns what failed. `Programmer` ties them
//! together for the agent: it retries failed service ports with backoff on
//! later syncs, whatever the next event is, until their writes succeed.

mod compute;
mod execute;
mod ids;
pub mod maglev;
mod maps;
mod sorted;
mod state;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

pub use compute::{diff, frontend_flags, frontend_key, plan, Diff, Owner, Phase, Plan, Step};
pub use execute::execute;
pub use ids::IdPool;
pub use maps::{DatapathMaps, MemoryMaps, Snapshot, TableWrite};
pub use state::{Held, HeldTable, Record, State, TableTarget, Write};

use crate::model::{DesiredState, ServicePortKey};

/// First retry of a failed service port after this long, doubling up to
/// `RETRY_MAX`.
pub const RETRY_FIRST: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// Service ports a first apply plans at a time (see `Programmer::apply`).
const FIRST_APPLY_CHUNK: usize = 1_000;

/// Outcome of one apply, for the logs.
#[derive(Debug, Default)]
pub struct Report {
    pub diff: Diff,
    /// Service ports whose writes failed (or that did not fit), with the
    /// error; they are retried with backoff.
    pub failed: Vec<(ServicePortKey, String)>,
    /// Service ids left by a previous agent (or a failed removal) and taken
    /// over by a desired service port, keeping their ids.
    pub adopted: usize,
    /// Orphaned service ids deleted (or being retried).
    pub stale_removed: usize,
}

#[derive(Clone, Copy, Debug)]
struct Backoff {
    attempts: u32,
    due: Instant,
}

impl Backoff {
    fn after(previous: Option<Backoff>, now: Instant) -> Backoff {
        let attempts = previous.map_or(0, |b| b.attempts) + 1;
        let delay = RETRY_FIRST
            .saturating_mul(1 << (attempts - 1).min(16))
            .min(RETRY_MAX);
        Backoff {
            attempts,
            due: now + delay,
        }
    }
}

pub struct Programmer<M> {
    maps: M,
    state: State,
    retry: BTreeMap<ServicePortKey, Backoff>,
    /// Orphaned ids whose deletion failed: retried like a service port.
    orphans_retry: Option<Backoff>,
    /// Adopted from a previous agent and not yet matched against a full
    /// desired state: the next apply looks at everything.
    adopting: bool,
}

impl<M: DatapathMaps> Programmer<M> {
    pub fn new(maps: M) -> Self {
        Programmer {
            maps,
            state: State::default(),
            retry: BTreeMap::new(),
            orphans_retry: None,
            adopting: false,
        }
    }

    /// A programmer for maps a previous agent filled: it reads them back,
    /// and its first apply keeps the service and backend ids of every
    /// service port it finds there (matched by frontend, and backends by
    /// address) and deletes only what the desired state no longer has.
    /// Established flows therefore keep their backends across a restart:
    /// conntrack entries name backends by id.
    pub fn adopt(maps: M) -> anyhow::Result<Self> {
        let snap = maps.snapshot()?;
        let mut p = Programmer::new(maps);
        p.state = State::from_snapshot(snap);
        p.adopting = true;
        Ok(p)
    }

    /// A programmer over a chosen state (tests: small id limits).
    pub fn with_state(maps: M, state: State) -> Self {
        Programmer {
            state,
            ..Programmer::new(maps)
        }
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    pub fn into_maps(self) -> M {
        self.maps
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The service id of a programmed service port.
    pub fn service_id(&self, key: &ServicePortKey) -> Option<u32> {
        self.state.records.get(key).map(|r| r.id)
    }

    pub fn programmed(&self) -> impl Iterator<Item = (&ServicePortKey, u32)> {
        self.state.records.iter().map(|(k, r)| (k, r.id))
    }

    /// Backend ids in use (written, or still to be cleared).
    pub fn backend_count(&self) -> usize {
        self.state.backend_ids.in_use()
    }

    /// Service ports with a service id.
    pub fn service_count(&self) -> usize {
        self.state.records.len()
    }

    /// Makes the maps equal to `desired`, touching only what differs.
    pub fn apply(&mut self, desired: &DesiredState) -> Report {
        let fresh = !self.adopting && self.state.records.is_empty() && self.state.held.is_empty();
        if !fresh || desired.services.len() <= FIRST_APPLY_CHUNK {
            return self.run(desired, None, Instant::now());
        }
        // Nothing programmed and nothing to adopt: the first apply goes a
        // chunk of service ports at a time, so a plan of 10,000 services
        // (a write per backend and frontend) never sits in memory whole.
        // Each chunk is a complete plan of its own ports; with nothing held
        // there is nothing another chunk's writes could depend on.
        let keys: Vec<&ServicePortKey> = desired.services.keys().collect();
        let mut report = Report::default();
        for chunk in keys.chunks(FIRST_APPLY_CHUNK) {
            let chunk: BTreeSet<ServicePortKey> = chunk.iter().map(|&k| k.clone()).collect();
            let r = self.run(desired, Some(chunk), Instant::now());
            report.diff.added.extend(r.diff.added);
            report.diff.changed.extend(r.diff.changed);
            report.diff.removed.extend(r.diff.removed);
            report.failed.extend(r.failed);
            report.adopted += r.adopted;
            report.stale_removed += r.stale_removed;
        }
        report
    }

    /// `apply`, looking only at the service ports in `keys` (the ones an
    /// event touched) and at those due for a retry: the cost follows the
    /// change, not the cluster size.
    pub fn apply_keys(
        &mut self,
        desired: &DesiredState,
        keys: &BTreeSet<ServicePortKey>,
    ) -> Report {
        self.run(desired, Some(keys.clone()), Instant::now())
    }

    /// When the next retry is due, if any failed.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retry
            .values()
            .chain(&self.orphans_retry)
            .map(|b| b.due)
            .min()
    }

    /// Service ports waiting for a retry.
    pub fn pending(&self) -> usize {
        self.retry.len() + usize::from(self.orphans_retry.is_some())
    }

    /// Retries what is due at `now`.
    pub fn retry_due(&mut self, desired: &DesiredState, now: Instant) -> Report {
        if self.next_retry().is_none_or(|due| due > now) {
            return Report::default();
        }
        self.run(desired, Some(BTreeSet::new()), now)
    }

    fn run(
        &mut self,
        desired: &DesiredState,
        keys: Option<BTreeSet<ServicePortKey>>,
        now: Instant,
    ) -> Report {
        let keys = match keys {
            Some(_) if self.adopting => None,
            Some(mut keys) => {
                keys.extend(
                    self.retry
                        .iter()
                        .filter(|(_, b)| b.due <= now)
                        .map(|(k, _)| k.clone()),
                );
                Some(keys)
            }
            None => None,
        };
        self.adopting = false;
        let mut plan = compute::plan(&self.state, desired, keys.as_ref());
        let diff = std::mem::take(&mut plan.diff);
        let (adopted, stale_removed) = (plan.adopted, plan.orphans);
        let mut failed = std::mem::take(&mut plan.refused);
        let planned: BTreeSet<ServicePortKey> = match &keys {
            Some(k) => k.clone(),
            None => self.retry.keys().cloned().collect(),
        };
        let failures = execute::execute(&mut self.maps, &mut self.state, plan);
        for (owner, e) in failures {
            match owner {
                Owner::Port(k) => failed.push((k, e)),
                Owner::Orphan(id) => {
                    tracing::warn!(
                        service_id = id,
                        "deleting a service id nothing owns failed, will retry: {e}"
                    )
                }
            }
        }
        // Planned and not failed: done, no more retries.
        for k in &planned {
            if !failed.iter().any(|(f, _)| f == k) {
                self.retry.remove(k);
            }
        }
        for (k, _) in &failed {
            let previous = self.retry.get(k).copied();
            self.retry.insert(k.clone(), Backoff::after(previous, now));
        }
        self.orphans_retry = if self.state.orphans.is_empty() {
            None
        } else {
            Some(Backoff::after(self.orphans_retry, now))
        };
        Report {
            diff,
            failed,
            adopted,
            stale_removed,
        }
    }
}
