//! `cargo xtask test-kernels`: the packet fixtures and the smoke test on
//! the kernels clusters run, each booted in qemu.
//!
//! For each series (Debian 12's 6.1, and 6.12 from bookworm-backports) the
//! newest `linux-image-*-amd64` Debian's archive offers is downloaded
//! (`apt-get download`, unpacked with `dpkg-deb -x`, kept under
//! `target/kernels/`). An initramfs holds busybox, `ip`, `ethtool`, the
//! agent, the test binaries and the shared libraries they link, and the
//! modules the tests need that Debian builds as modules (veth, sch_ingress
//! for clsact, cls_bpf). Its `/init` mounts what a node has (proc, sys,
//! bpffs, cgroup2), runs every test binary, and powers off.
//!
//! qemu runs under TCG (software emulation): on these machines /dev/kvm
//! exists but a guest under KVM never prints a line. No network device is
//! given: the tests make their own namespaces inside the guest.
//!
//! The host reads the guest's serial console: one PASS/FAIL line per kernel
//! and test, the console's last lines when something failed, and a hard
//! time limit per guest.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// A kernel series: the package names are `<prefix><N><suffix>`, the
/// newest N is taken.
struct Series {
    label: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

const SERIES: [Series; 2] = [
    Series {
        label: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
    },
    Series {
        label: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64",
    },
];

/// The test binaries run in each guest (tests/tests/<name>.rs).
pub const GUEST_TESTS: [&str; 6] = [
    "fixtures",
    "fixtures_conntrack",
    "fixtures_egress",
    "fixtures_ipv6",
    "fixtures_nat",
    "smoke",
];

/// Modules the tests need that Debian's config builds as `=m`.
const MODULES: [&str; 3] = ["veth", "sch_ingress", "cls_bpf"];

/// One unpacked kernel.
struct Kernel {
    package: String,
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

/// The outcome of one test in one guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
}

pub struct Options {
    /// Only the series with this label ("6.1", "6.12").
    pub only: Option<String>,
    /// Only these test binaries (empty: all of `GUEST_TESTS`).
    pub tests: Vec<String>,
    /// Hard limit per guest.
    pub limit: Duration,
}

pub fn run(root: &Path, opts: &Options) -> anyhow::Result<()> {
    let work = root.join("target/kernels");
    std::fs::create_dir_all(&work)?;
    let tests = build_tests(root)?;
    let mut table: Vec<(String, usize, usize, Duration)> = Vec::new();
    let mut failed = false;
    for series in SERIES
        .iter()
        .filter(|s| opts.only.as_deref().is_none_or(|o| o == s.label))
    {
        let kernel = fetch(&work, series)?;
        let initrd = initramfs(root, &work, &kernel, &tests)?;
        println!(
            "xtask: booting {} in qemu (TCG, 2 vCPUs; at most {} s)",
            kernel.package,
            opts.limit.as_secs()
        );
        let console = work.join(format!("{}.console.log", kernel.release));
        let started = Instant::now();
        let results = boot(&kernel, &initrd, &console, opts)?;
        let took = started.elapsed();
        let passed = results.values().filter(|o| **o == Outcome::Pass).count();
        for (test, outcome) in &results {
            match outcome {
                Outcome::Pass => println!("PASS {} {test}", kernel.release),
                Outcome::Fail(why) => println!("FAIL {} {test}: {why}", kernel.release),
            }
        }
        if passed != results.len() || results.is_empty() {
            failed = true;
            print_tail(&console, 120);
        }
        table.push((kernel.release.clone(), passed, results.len(), took));
    }
    println!("\nkernel matrix:");
    println!("{:<28} {:>8} {:>8}", "kernel", "passed", "seconds");
    for (release, passed, total, took) in &table {
        println!(
            "{release:<28} {:>8} {:>8}",
            format!("{passed}/{total}"),
            took.as_secs()
        );
    }
    if failed {
        bail!(
            "the kernel matrix failed (guest consoles under {})",
            work.display()
        );
    }
    Ok(())
}

/// Builds the guest's test binaries: their paths by name.
fn build_tests(root: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut cmd = crate::cargo();
    cmd.args([
        "test",
        "--release",
        "-p",
        "lb-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for t in GUEST_TESTS {
        cmd.args(["--test", t]);
    }
    let out = cmd
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("building the test binaries")?;
    anyhow::ensure!(out.status.success(), "building the test binaries failed");
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (
            msg.pointer("/target/name").and_then(|v| v.as_str()),
            msg.get("executable").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        if GUEST_TESTS.contains(&name) {
            found.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    for t in GUEST_TESTS {
        anyhow::ensure!(found.contains_key(t), "cargo built no test binary {t}");
    }
    Ok(found)
}

/// The newest kernel of `series` in Debian's archive, downloaded and
/// unpacked under `work` (once).
fn fetch(work: &Path, series: &Series) -> anyhow::Result<Kernel> {
    let mut package = newest(series)?;
    if package.is_none() {
        // A fresh machine's package lists may not have been read yet.
        crate::run(Command::new("apt-get").args(["update", "-q"]))?;
        package = newest(series)?;
    }
    let package = package.with_context(|| {
        format!(
            "Debian's archive offers no {}N{} package",
            series.prefix, series.suffix
        )
    })?;
    let dir = work.join(&package);
    if !dir.join("boot").exists() {
        println!("xtask: downloading {package}");
        let dl = work.join("download");
        let _ = std::fs::remove_dir_all(&dl);
        std::fs::create_dir_all(&dl)?;
        crate::run(
            Command::new("apt-get")
                .arg("download")
                .arg(&package)
                .current_dir(&dl),
        )?;
        let deb = std::fs::read_dir(&dl)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        let tmp = work.join(format!("{package}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        crate::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        std::fs::rename(&tmp, &dir)?;
        std::fs::remove_dir_all(&dl)?;
    }
    let release = package.trim_start_matches("linux-image-").to_string();
    Ok(Kernel {
        vmlinuz: dir.join(format!("boot/vmlinuz-{release}")),
        modules: dir.join(format!("lib/modules/{release}")),
        package,
        release,
    })
}

/// The package of `series` with the highest number, from apt's lists.
fn newest(series: &Series) -> anyhow::Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["pkgnames", series.prefix])
        .output()
        .context("running apt-cache")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|p| {
            let n = p.strip_prefix(series.prefix)?.strip_suffix(series.suffix)?;
            Some((n.parse::<u32>().ok()?, p.to_string()))
        })
        .max()
        .map(|(_, p)| p))
}

/// Builds the guest's initramfs (gzip'd newc cpio) for `kernel`.
fn initramfs(
    root: &Path,
    work: &Path,
    kernel: &Kernel,
    tests: &BTreeMap<String, PathBuf>,
) -> anyhow::Result<PathBuf> {
    let stage = work.join(format!("{}.initramfs", kernel.release));
    let _ = std::fs::remove_dir_all(&stage);
    for d in ["opt/lb/bin", "opt/lb/tests", "opt/lb/modules", "bin"] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    let mut programs: Vec<PathBuf> = vec![PathBuf::from("/bin/busybox")];
    std::fs::copy("/bin/busybox", stage.join("bin/busybox"))?;
    for tool in ["ip", "ethtool"] {
        let path = which(tool)?;
        std::fs::copy(&path, stage.join("opt/lb/bin").join(tool))?;
        programs.push(path);
    }
    for bin in ["lb", "lb-probe"] {
        let path = root.join("target/release").join(bin);
        strip_into(&path, &stage.join("opt/lb/bin").join(bin))?;
        programs.push(path);
    }
    // The fixture that damages the object on purpose reads it from here.
    std::fs::copy(root.join(crate::EBPF_OBJECT), stage.join("opt/lb/lb-ebpf"))?;
    for (name, path) in tests {
        strip_into(path, &stage.join("opt/lb/tests").join(name))?;
        programs.push(path.clone());
    }
    let mut libs = BTreeSet::new();
    for p in &programs {
        libs.extend(shared_libraries(p)?);
    }
    for lib in libs {
        let to = stage.join(lib.strip_prefix("/").unwrap_or(&lib));
        std::fs::create_dir_all(to.parent().expect("a file"))?;
        std::fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
    }
    let order = modules(&kernel.modules, &stage.join("opt/lb/modules"))?;
    std::fs::write(stage.join("opt/lb/modules/order"), order.join("\n") + "\n")?;
    let init = stage.join("init");
    std::fs::write(&init, INIT)?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

    let out = work.join(format!("{}.initramfs.cpio.gz", kernel.release));
    let script = format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        stage.display(),
        out.display()
    );
    crate::run(Command::new("sh").args(["-c", &script]))?;
    std::fs::remove_dir_all(&stage)?;
    Ok(out)
}

/// `/init` of the guest: a node's mounts, the modules, then every test
/// binary between markers the host reads, then power off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/opt/lb/bin:/bin
mkdir -p /proc /sys /dev /tmp /run /var
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
ln -s /run /var/run
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
for m in $(cat /opt/lb/modules/order); do
  insmod /opt/lb/modules/$m.ko || echo "LB-MODULE-FAILED $m"
done
ip link set lo up
echo "LB-KERNEL $(uname -r) cpus=$(nproc)"
export LB_BIN=/opt/lb/bin/lb LB_EBPF_OBJECT=/opt/lb/lb-ebpf RUST_BACKTRACE=1 HOME=/tmp
# Emulated: the datapath takes ~20 s to load (the verifier); waits stretch.
export LB_TEST_SLOWDOWN=10
# What this kernel offers and what each program costs its verifier.
lb check 2>&1 | sed 's/^/LB-CHECK /'
# lb.tests=a,b on the kernel command line: only those binaries.
only=$(sed -n 's/.*lb\.tests=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
for t in /opt/lb/tests/*; do
  name=$(basename $t)
  if [ -n "$only" ] && ! echo " $only " | grep -q " $name "; then continue; fi
  echo "LB-BEGIN $name $(date +%s)"
  $t --test-threads=2 2>&1
  echo "LB-END $name rc=$? $(date +%s)"
done
echo "LB-ALLDONE"
poweroff -f
"#;

/// Copies `from` to `to` without debug info (the test binaries carry
/// hundreds of MB of it; the initramfs lives in the guest's memory).
fn strip_into(from: &Path, to: &Path) -> anyhow::Result<()> {
    crate::run(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(to)
            .arg(from),
    )
}

fn which(tool: &str) -> anyhow::Result<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    anyhow::ensure!(!path.is_empty(), "{tool} is not installed");
    Ok(std::fs::canonicalize(path)?)
}

/// The shared libraries `program` loads (with the dynamic loader), as ldd
/// lists them.
fn shared_libraries(program: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(program).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Copies `MODULES` and what they depend on (their `.modinfo` "depends="
/// field; the package ships no modules.dep, depmod makes it at install)
/// to `to`, decompressed: the names in load order.
fn modules(tree: &Path, to: &Path) -> anyhow::Result<Vec<String>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![tree.join("kernel")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)?.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = module_name(&p) {
                index.insert(name, p);
            }
        }
    }
    let mut order = Vec::new();
    for m in MODULES {
        add_module(m, &index, to, &mut order)?;
    }
    Ok(order)
}

fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))?;
    Some(stem.replace('-', "_"))
}

fn add_module(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    to: &Path,
    order: &mut Vec<String>,
) -> anyhow::Result<()> {
    if order.iter().any(|m| m == name) {
        return Ok(());
    }
    let path = index
        .get(name)
        .with_context(|| format!("module {name} is not in this kernel package"))?;
    let bytes = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => Command::new("xz").arg("-dc").arg(path).output()?.stdout,
        Some("zst") => Command::new("zstd").arg("-dc").arg(path).output()?.stdout,
        _ => std::fs::read(path)?,
    };
    anyhow::ensure!(
        !bytes.is_empty(),
        "could not read module {}",
        path.display()
    );
    for dep in depends(&bytes) {
        add_module(&dep, index, to, order)?;
    }
    std::fs::write(to.join(format!("{name}.ko")), &bytes)?;
    order.push(name.to_string());
    Ok(())
}

/// The "depends=a,b" string of a module's .modinfo section.
fn depends(module: &[u8]) -> Vec<String> {
    module
        .split(|b| *b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

/// Boots `kernel` with `initrd`, copying the console to `console`, and
/// reads the results off it. The guest is killed at `limit`.
fn boot(
    kernel: &Kernel,
    initrd: &Path,
    console: &Path,
    opts: &Options,
) -> anyhow::Result<BTreeMap<String, Outcome>> {
    let limit = opts.limit;
    let mut cmdline = "console=ttyS0 panic=-1 loglevel=3".to_string();
    if !opts.tests.is_empty() {
        cmdline += &format!(" lb.tests={}", opts.tests.join(","));
    }
    let mut child = Command::new("qemu-system-x86_64")
        // `-cpu max` runs the fixtures a fifth faster than qemu64 here.
        .args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-smp", "2", "-m", "2048"])
        .args(["-nographic", "-no-reboot", "-nic", "none", "-kernel"])
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(&cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            if tx.send(text).is_err() {
                break;
            }
        }
    });
    let mut log = std::fs::File::create(console)?;
    let mut reader = Console::default();
    let deadline = Instant::now() + limit;
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                if line.starts_with("LB-") || line.starts_with("test ") {
                    println!("  [{}] {line}", kernel.release);
                }
                reader.line(&line);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() >= deadline {
                    timed_out = true;
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(reader.finish(timed_out, limit))
}

/// Reads test results off the guest's console.
#[derive(Default)]
pub struct Console {
    current: Option<String>,
    results: BTreeMap<String, Outcome>,
    all_done: bool,
    kernel_seen: bool,
    problems: Vec<String>,
}

impl Console {
    pub fn line(&mut self, line: &str) {
        // The firmware's escape sequences may precede the first marker.
        let line = match line.find("LB-KERNEL ") {
            Some(at) => &line[at..],
            None => line,
        };
        if line.starts_with("LB-KERNEL ") {
            self.kernel_seen = true;
        } else if let Some(m) = line.strip_prefix("LB-MODULE-FAILED ") {
            self.problems.push(format!("module {m} did not load"));
        } else if let Some(rest) = line.strip_prefix("LB-BEGIN ") {
            let bin = rest.split_whitespace().next().unwrap_or(rest);
            self.current = Some(bin.to_string());
        } else if let Some(rest) = line.strip_prefix("LB-END ") {
            let (bin, rc) = rest.split_once(" rc=").unwrap_or((rest, "?"));
            let rc = rc.split_whitespace().next().unwrap_or("?");
            let any = self
                .results
                .keys()
                .any(|k| k.starts_with(&format!("{bin}::")));
            if rc != "0"
                && !self
                    .results
                    .iter()
                    .any(|(k, o)| k.starts_with(&format!("{bin}::")) && *o != Outcome::Pass)
            {
                // It failed without a failing test (a crash, or none ran).
                self.results
                    .insert(bin.to_string(), Outcome::Fail(format!("exited with {rc}")));
            } else if !any {
                self.results
                    .insert(bin.to_string(), Outcome::Fail("ran no test".into()));
            }
            self.current = None;
        } else if line == "LB-ALLDONE" {
            self.all_done = true;
        } else if let (Some(bin), Some(rest)) = (&self.current, line.strip_prefix("test ")) {
            if let Some((name, result)) = rest.rsplit_once(" ... ") {
                let outcome = match result.trim() {
                    "ok" => Outcome::Pass,
                    "ignored" => return,
                    other => Outcome::Fail(other.to_string()),
                };
                self.results.insert(format!("{bin}::{name}"), outcome);
            }
        }
    }

    pub fn finish(mut self, timed_out: bool, limit: Duration) -> BTreeMap<String, Outcome> {
        if !self.kernel_seen {
            self.problems.push("the guest never reached /init".into());
        }
        if !self.all_done {
            let why = if timed_out {
                format!("the guest did not finish within {} s", limit.as_secs())
            } else {
                "the guest stopped before finishing".to_string()
            };
            let at = self.current.clone().unwrap_or_else(|| "guest".into());
            self.results.insert(at, Outcome::Fail(why));
        }
        for p in self.problems {
            self.results.insert("guest".into(), Outcome::Fail(p));
        }
        self.results
    }
}

fn print_tail(console: &Path, lines: usize) {
    let Ok(text) = std::fs::read_to_string(console) else {
        return;
    };
    let all: Vec<&str> = text.lines().collect();
    println!(
        "--- last {lines} lines of the guest console ({}) ---",
        console.display()
    );
    for l in &all[all.len().saturating_sub(lines)..] {
        println!("{l}");
    }
    println!("--- end of console ---");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(lines: &[&str]) -> BTreeMap<String, Outcome> {
        let mut c = Console::default();
        for l in lines {
            c.line(l);
        }
        c.finish(false, Duration::from_secs(1))
    }

    #[test]
    fn results_are_read_per_binary_and_test() {
        let r = read(&[
            "Probing EDD (edd=off to disable)... oc\x1b[?7l\x1b[2JLB-KERNEL 6.1.0-56-amd64 cpus=2",
            "LB-BEGIN smoke",
            "test a_restart_keeps_a_stream_going ... ok",
            "[   12.3] some kernel line",
            "test xdp_balances ... FAILED",
            "test skipped ... ignored",
            "LB-END smoke rc=101 1700000000",
            "LB-BEGIN fixtures",
            "LB-END fixtures rc=0",
            "LB-ALLDONE",
        ]);
        assert_eq!(r["smoke::a_restart_keeps_a_stream_going"], Outcome::Pass);
        assert_eq!(r["smoke::xdp_balances"], Outcome::Fail("FAILED".into()));
        assert!(!r.contains_key("smoke::skipped"));
        assert!(!r.contains_key("smoke"), "its failure is the test's");
        assert_eq!(r["fixtures"], Outcome::Fail("ran no test".into()));
        assert!(!r.contains_key("guest"), "{r:?}");
    }

    #[test]
    fn a_crash_a_hang_and_a_missing_module_are_failures() {
        let r = read(&[
            "LB-KERNEL 6.1.0-56-amd64 cpus=2",
            "LB-MODULE-FAILED cls_bpf",
            "LB-BEGIN fixtures",
            "test one ... ok",
            "LB-END fixtures rc=139",
            "LB-BEGIN smoke",
        ]);
        assert_eq!(r["fixtures"], Outcome::Fail("exited with 139".into()));
        assert!(matches!(&r["smoke"], Outcome::Fail(w) if w.contains("stopped")));
        assert!(matches!(&r["guest"], Outcome::Fail(w) if w.contains("cls_bpf")));
        let never = read(&[]);
        assert!(matches!(&never["guest"], Outcome::Fail(w) if w.contains("/init")));
    }

    #[test]
    fn module_dependencies_are_read_from_modinfo() {
        let modinfo = b"\0license=GPL\0depends=nf_conntrack,nf-defrag-ipv4\0name=x\0";
        assert_eq!(depends(modinfo), ["nf_conntrack", "nf_defrag_ipv4"]);
        assert!(depends(b"\0depends=\0").is_empty());
    }
}
