//! Installs what the build and the tests need, once. Every check is cheap,
//! so a machine that has everything goes straight to the work.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages and the command each provides.
const PACKAGES: [(&str, &str); 3] = [
    ("bpftool", "bpftool"),
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
];

/// Nightly with rust-src and bpf-linker: enough for `build-ebpf`.
pub fn ensure_build_tools() -> anyhow::Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()
}

/// Build tools plus the system tools the demo and tests use.
pub fn ensure_all() -> anyhow::Result<()> {
    ensure_build_tools()?;
    ensure_packages(&PACKAGES)
}

/// What `test-kernels` needs besides: qemu, a static busybox for the
/// guest, cpio for its initramfs.
pub fn ensure_kernel_tools() -> anyhow::Result<()> {
    ensure_packages(&[
        ("qemu-system-x86", "qemu-system-x86_64"),
        ("busybox-static", "busybox"),
        ("cpio", "cpio"),
        ("xz-utils", "xz"),
    ])
}

/// What `bench --compare` programs kube-proxy's rules with: both
/// iptables backends (Debian's iptables package carries both), nft, and
/// conntrack to empty netfilter's table between slices.
pub fn ensure_kube_proxy_tools() -> anyhow::Result<()> {
    ensure_packages(&[
        ("iptables", "iptables-legacy-restore"),
        ("nftables", "nft"),
        ("conntrack", "conntrack"),
    ])
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn nightly_sysroot() -> Option<PathBuf> {
    output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).map(PathBuf::from)
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let has_src = |root: &PathBuf| root.join("lib/rustlib/src/rust/library/core").exists();
    if nightly_sysroot().is_some_and(|r| has_src(&r)) {
        return Ok(());
    }
    println!("xtask: installing rust-src for the nightly toolchain");
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .status()
        .context("running rustup")?;
    if !status.success() {
        bail!("`rustup component add rust-src --toolchain nightly` failed");
    }
    Ok(())
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        return Ok(());
    }
    // A plain `cargo install bpf-linker` wants LLVM 23, which is not here.
    // Build it against nightly rustc's own LLVM 22 (TOOLCHAIN.md, way 2):
    // no system LLVM packages needed.
    let sysroot = nightly_sysroot()
        .context("the nightly toolchain is missing (rustup toolchain install nightly)")?;
    let libdir = sysroot.join("lib");
    let libs: Vec<String> = std::fs::read_dir(&libdir)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("libLLVM"))
        .collect();
    // The soname bpf-linker will be linked against (libLLVM.so.<ver>).
    let soname = libs
        .iter()
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?
        .clone();
    // The built binary keeps this directory as its RUNPATH, so it must
    // outlive the build: keep it next to the installed binaries.
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = cargo_home.join("lb-bpf-linker-llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    for name in libs
        .iter()
        .chain(std::iter::once(&"libLLVM.so".to_string()))
    {
        let target = if name == "libLLVM.so" { &soname } else { name };
        let link = prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(target), &link)?;
    }
    println!("xtask: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM (about 2 minutes, once)");
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("installing bpf-linker {BPF_LINKER_VERSION} failed");
    }
    Ok(())
}

fn ensure_packages(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, cmd)| {
            output(Command::new("sh").args(["-c", &format!("command -v {cmd}")])).is_none()
        })
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing {} from Debian", missing.join(", "));
    // The package lists on a fresh machine can be stale (404s): refresh.
    let update = Command::new("apt-get")
        .args(["update", "-q"])
        .status()
        .context("running apt-get")?;
    if !update.success() {
        bail!(
            "apt-get update failed; install {} by hand",
            missing.join(" ")
        );
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}
