//! Harness for the root-only tests, the demo and the benchmark: network
//! namespaces, a virtual node, real servers, the real agent, and packet
//! builders with an independent checksum.

pub mod agent;
pub mod apiserver;
pub mod cgroup;
pub mod cluster;
pub mod control_bench;
pub mod deploy;
pub mod example;
pub mod fixture;
pub mod fuzz;
pub mod netns;
pub mod node_bench;
pub mod packet;
pub mod servers;
pub mod topology;

/// Fails unless we can do what the root tests need.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces and load eBPF programs: run them as root via `cargo xtask test`"
    );
}
