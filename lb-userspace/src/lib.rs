//! The lb agent as a library: the binary (`lb`) is a thin CLI over it, and
//! the root tests drive the same code. The modules follow the pipeline:
//!
//! - `source`: where objects come from (a YAML file, settled before it is
//!   read; the Kubernetes API) -> `Update`s;
//! - `model`: Services and EndpointSlices validated and built into the
//!   desired state, incrementally (`model::catalog`), conflicts settled per
//!   frontend;
//! - `plan`: a pure plan of phased map writes from programmed and desired
//!   state, an executor, retries with backoff; Maglev tables;
//! - `kernel`: the datapath loaded, pinned and attached, its maps, the
//!   node's interfaces, feature probes;
//! - `serve`: health, metrics, healthCheckNodePorts;
//! - `agent` ties them together for `lb run`; `inspect` reads the pins for
//!   `lb status`; `check` asks the kernel what it offers (`lb check`).

pub mod agent;
pub mod check;
pub mod inspect;
pub mod kernel;
pub mod model;
pub mod plan;
pub mod ports;
pub mod serve;
pub mod source;
pub mod system;
