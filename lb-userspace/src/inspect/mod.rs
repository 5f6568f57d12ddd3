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

/// `a:port`, or `[a]:port` for IPv6, as the inspection commands print an
/// address of a map entry.
pub fn endpoint(a: &lb_common::Addr, port: u16) -> String {
    std::net::SocketAddr::new(lb_common::addr::to_ip(a), port).to_string()
}
