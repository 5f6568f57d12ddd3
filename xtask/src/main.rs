//! `cargo xtask ...`: the project's own build, demo, test and bench
//! commands. Each installs what it is missing first (idempotent and fast
//! when everything is present), so a fresh machine needs nothing else.

mod kernels;
mod prereqs;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF object (release, bpfel-unknown-none, BTF) to
    /// target/bpfel-unknown-none/release/lb-ebpf.
    BuildEbpf,
    /// Run the demo: a virtual node in network namespaces, real traffic
    /// balanced through the datapath, counters shown.
    Demo,
    /// Run every test: unit tests, packet fixtures, end-to-end tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the packet fixtures and the smoke test on the newest Debian 6.1
    /// and 6.12 kernels, each booted in qemu (TCG): one PASS/FAIL line per
    /// kernel and test.
    TestKernels {
        /// Only this series ("6.1" or "6.12").
        #[arg(long)]
        only: Option<String>,
        /// Only these test binaries (of fixtures, fixtures_conntrack,
        /// fixtures_egress, fixtures_ipv6, fixtures_nat, smoke; repeatable).
        #[arg(long = "test")]
        tests: Vec<String>,
        /// Hard time limit per guest, in minutes.
        #[arg(long, default_value_t = 25)]
        limit_minutes: u64,
    },
    /// Run the benchmarks (ns/packet via BPF_PROG_TEST_RUN, Maglev build,
    /// control plane, node). With --compare: lb against kube-proxy's
    /// iptables (legacy and nft) and nftables modes, side by side.
    Bench {
        /// Measure lb against kube-proxy's modes instead (installs
        /// iptables, nftables and conntrack).
        #[arg(long)]
        compare: bool,
        /// --compare: rounds per mode (each a slice between two baseline
        /// slices).
        #[arg(long, default_value_t = 12, requires = "compare")]
        rounds: usize,
        /// --compare: the service counts, comma-separated.
        #[arg(long, default_value = "1,1000,10000", requires = "compare")]
        services: String,
    },
    /// Run the datapath fuzzer long: generated and mutated packets through
    /// the TC and XDP programs against the reference model (a short run is
    /// part of `test`).
    Fuzz {
        /// Packets per hook.
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// Seed of the generator (the run is reproducible from it, but for
        /// the SNAT ports the datapath picks at random).
        #[arg(long, default_value_t = 0x10ad_ba1a)]
        seed: u64,
    },
}

/// Where `build-ebpf` puts the object; lb-userspace's build.rs embeds it.
pub const EBPF_OBJECT: &str = "target/bpfel-unknown-none/release/lb-ebpf";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Cmd::BuildEbpf => {
            prereqs::ensure_build_tools()?;
            build_ebpf(&root)
        }
        Cmd::Demo => {
            prereqs::ensure_all()?;
            build_all(&root)?;
            run(Command::new(root.join("target/release/lb-demo"))
                .env("LB_BIN", root.join("target/release/lb")))
        }
        Cmd::Test { args } => {
            prereqs::ensure_all()?;
            build_all(&root)?;
            let mut cmd = cargo();
            cmd.args(["test", "--release", "--workspace"])
                .args(&args)
                .env("LB_BIN", root.join("target/release/lb"));
            run(&mut cmd)
        }
        Cmd::TestKernels {
            only,
            tests,
            limit_minutes,
        } => {
            prereqs::ensure_all()?;
            prereqs::ensure_kernel_tools()?;
            build_all(&root)?;
            kernels::run(
                &root,
                &kernels::Options {
                    only,
                    tests,
                    limit: std::time::Duration::from_secs(limit_minutes * 60),
                },
            )
        }
        Cmd::Fuzz { packets, seed } => {
            prereqs::ensure_all()?;
            build_all(&root)?;
            let mut cmd = cargo();
            cmd.args([
                "test",
                "--release",
                "-p",
                "lb-tests",
                "--test",
                "fuzz",
                "--",
                "--nocapture",
            ])
            .env("LB_BIN", root.join("target/release/lb"))
            .env("LB_FUZZ_PACKETS", packets.to_string())
            .env("LB_FUZZ_SEED", seed.to_string());
            run(&mut cmd)
        }
        Cmd::Bench {
            compare,
            rounds,
            services,
        } => {
            prereqs::ensure_all()?;
            let mut cmd = Command::new(root.join("target/release/lb-bench"));
            if compare {
                prereqs::ensure_kube_proxy_tools()?;
                cmd.args(["compare", "--rounds", &rounds.to_string()])
                    .args(["--services", &services]);
            }
            build_all(&root)?;
            run(cmd.env("LB_BIN", root.join("target/release/lb")))
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn build_ebpf(root: &Path) -> anyhow::Result<()> {
    // lb-ebpf/.cargo/config.toml sets the target, BTF rustflags and
    // build-std; rust-toolchain.toml there selects nightly.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("lb-ebpf"))
        .args(["build", "--release", "--target-dir"])
        .arg(root.join("target"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run(&mut cmd)?;
    let object = root.join(EBPF_OBJECT);
    if !object.exists() {
        bail!(
            "the eBPF build finished but {} is missing",
            object.display()
        );
    }
    println!("xtask: eBPF object at {}", object.display());
    Ok(())
}

/// The datapath object, then every binary the demo, tests and bench use.
fn build_all(root: &Path) -> anyhow::Result<()> {
    build_ebpf(root)?;
    run(cargo().args(["build", "--release", "--bin", "lb", "-p", "lb-userspace"]))?;
    run(cargo().args(["build", "--release", "-p", "lb-tests", "--bins"]))
}
