//! Harness for the root-only tests, the demo and the benchmark: network
//! namespaces, a virtual node, real servers, the real agent, and packet
//! builders with an independent checksum.

pub mod agent;
pub mod apiserver;
pub mod cgroup;
pub mod cluster;
pub mod compare_bench;
pub mod control_bench;
pub mod deploy;
pub mod example;
pub mod fixture;
pub mod fuzz;
pub mod leftovers;
pub mod netns;
pub mod node_bench;
pub mod packet;
pub mod raw;
pub mod servers;
pub mod topology;

/// Fails unless we can do what the root tests need.
/// `within` stretched for a slow machine: times `LB_TEST_SLOWDOWN` (the
/// kernel matrix sets it in its emulated guests, where loading the
/// datapath takes 20 times longer). Waits only: nothing asserts on time.
pub fn patience(within: std::time::Duration) -> std::time::Duration {
    let factor = std::env::var("LB_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    within * factor
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces and load eBPF programs: run them as root via `cargo xtask test`"
    );
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(leftovers::sweep);
}
