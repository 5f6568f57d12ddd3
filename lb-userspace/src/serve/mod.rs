//! What the agent serves over HTTP: its own health and readiness
//! (`status`), Prometheus metrics (`metrics`), and the healthCheckNodePorts
//! of LoadBalancer Services with externalTrafficPolicy Local
//! (`healthcheck`).

pub mod healthcheck;
pub mod metrics;
pub mod status;
