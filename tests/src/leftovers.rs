//! What a run that died left behind. Drop guards clean up namespaces, pin
//! directories and cgroups on every return and panic, but a SIGKILL, or a
//! timeout's SIGTERM, skips them: a killed benchmark left 400 namespaces
//! (its 100-pod node) and 208 links pinned. Every name the harness makes
//! comes from `netns::unique`, `lb<word><pid>x<n>`; whatever carries the
//! pid of a process that no longer exists is removed, once per process,
//! from `require_root`. Nothing of a live process and nothing named
//! otherwise is touched.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The pid in a name `unique` made, if it has one.
pub fn owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("lb")?;
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_lowercase() || c == '-');
    let (pid, n) = rest.split_once('x')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !n.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Named by `unique` for a process that is gone.
fn dead(name: &str) -> bool {
    owner(name).is_some_and(|pid| {
        pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
    })
}

fn names_in(dir: &Path) -> Vec<(String, PathBuf)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect()
}

/// Removes what dead runs left: their namespaces (and the processes still
/// in them), pin directories and cgroups. Best effort: what cannot be
/// removed stays for the next sweep.
pub fn sweep() {
    for (name, _) in names_in(Path::new("/run/netns"))
        .into_iter()
        .filter(|(n, _)| dead(n))
    {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
    }
    for (_, path) in names_in(Path::new("/sys/fs/bpf"))
        .into_iter()
        .filter(|(n, _)| dead(n))
    {
        // Unpinning a link whose only holder was the pin detaches it.
        let _ = std::fs::remove_dir_all(&path);
    }
    if let Ok(root) = crate::cgroup::cgroup2_root() {
        for (_, path) in names_in(&root).into_iter().filter(|(n, _)| dead(n)) {
            let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            // A killed process leaves its cgroup a moment later.
            for _ in 0..50 {
                if std::fs::remove_dir(&path).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_made_by_unique_carry_their_owner() {
        assert_eq!(owner("lb24486x12-p66"), Some(24486));
        assert_eq!(owner("lbtest8441x16"), Some(8441));
        assert_eq!(owner("lb-bench-77x3"), Some(77));
        assert_eq!(
            owner(&crate::netns::unique("lbfx")),
            Some(std::process::id())
        );
        for other in [
            "lb",
            "lbx1",
            "lbtestx1",
            "lb12",
            "lb12x",
            "lb12xa",
            "eth0",
            "lb12y3",
            "cilium_host",
        ] {
            assert_eq!(owner(other), None, "{other}");
        }
        assert!(
            !dead(&crate::netns::unique("lbtest")),
            "this process is alive"
        );
    }

    #[test]
    fn a_dead_runs_namespace_pins_and_cgroup_are_removed_and_a_live_ones_kept() {
        crate::require_root();
        // A pid that certainly existed and is gone: a child that exited.
        let mut child = Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let name = format!("lbtest{gone}x0");
        let live = crate::netns::unique("lbtest");
        for n in [&name, &live] {
            assert!(Command::new("ip")
                .args(["netns", "add", n])
                .status()
                .unwrap()
                .success());
            std::fs::create_dir_all(Path::new("/sys/fs/bpf").join(n).join("inner")).unwrap();
            std::fs::create_dir(crate::cgroup::cgroup2_root().unwrap().join(n)).unwrap();
        }
        sweep();
        let netns = String::from_utf8(
            Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let cgroups = crate::cgroup::cgroup2_root().unwrap();
        assert!(!netns.contains(&name), "{netns}");
        assert!(!Path::new("/sys/fs/bpf").join(&name).exists());
        assert!(!cgroups.join(&name).exists());
        assert!(netns.contains(&live), "{netns}");
        assert!(Path::new("/sys/fs/bpf").join(&live).exists());
        assert!(cgroups.join(&live).exists());
        // This test's own: removed by hand.
        let _ = Command::new("ip").args(["netns", "del", &live]).status();
        let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf").join(&live));
        let _ = std::fs::remove_dir(cgroups.join(&live));
    }
}
