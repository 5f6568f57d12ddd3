//! Reading a datapath back from its pins, for people and scripts, with or
//! without a running agent: `lb status` (what it is attached to,
//! `status`), `lb services`, `lb backends`, `lb maglev` (service ports,
//! their frontends, backends and table shares, `services`), and
//! `lb conntrack` (the flows, `flows`). Names come from `lb_svc_names`,
//! which the agent writes.

pub mod flows;
pub mod services;
mod status;

pub use status::status;

/// `-o`: a table for people or JSON for scripts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}
