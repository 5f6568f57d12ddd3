//! The lb agent as a library: the binary (`lb`) is a thin CLI over it, and
//! the root tests drive the same code.
//!
//! sources (YAML file) -> `manifest` -> `model` (desired state, validated)
//! -> `plan` (a pure plan of phased writes, an executor, retries; Maglev via `maglev`) -> `datapath` (aya maps);
//! `healthcheck` serves healthCheckNodePorts from the same desired state.

pub mod agent;
pub mod clsact;
pub mod conntrack;
pub mod datapath;
pub mod inspect;
pub mod interfaces;
pub mod kernel_maps;
pub mod link_watch;
pub mod maglev;
pub mod manifest;
pub mod model;
pub mod pins;
pub mod plan;
pub mod ports;
pub mod probes;
pub mod serve;
pub mod source;
pub mod system;
