//! The datapath fuzzer (`lb_tests::fuzz`): generated and mutated frames
//! through the real TC and XDP programs, checked against the reference
//! model. Here a short run per hook (`LB_FUZZ_PACKETS`, default 20,000);
//! `cargo xtask fuzz` runs a million per hook.

use lb_tests::{fixture::Hook, fuzz};

fn packets() -> u64 {
    std::env::var("LB_FUZZ_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn seed() -> u64 {
    std::env::var("LB_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x10ad_ba1a)
}

fn fuzz_hook(hook: Hook) {
    lb_tests::require_root();
    let (n, seed) = (packets(), seed());
    let r = fuzz::run(hook, n, seed).expect("fuzz run");
    eprintln!(
        "{hook:?}: {} packets (seed {seed}): {} translated, {} refused, {} dropped, {} untouched",
        r.packets, r.translated, r.refused, r.dropped, r.untouched
    );
    assert!(r.failures.is_empty(), "{}", r.failures.join("\n"));
    // The run exercised every kind of outcome.
    assert!(
        r.translated > n / 10 && r.refused > 0 && r.dropped > 0 && r.untouched > n / 10,
        "{r:?}"
    );
}

#[test]
fn fuzz_tc() {
    fuzz_hook(Hook::Tc);
}

#[test]
fn fuzz_xdp() {
    fuzz_hook(Hook::Xdp);
}
