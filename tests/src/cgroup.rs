//! A cgroup v2 directory for one test, and processes started inside it (and
//! inside a network namespace): how the tests stand in for the node's own
//! processes (kubelet, hostNetwork pods) without touching the machine's.

use std::{
    fs::File,
    io::Write,
    net::SocketAddrV4,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::Context;

use crate::netns::{unique, Netns};

pub struct Cgroup {
    pub path: PathBuf,
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones); mounted under /run if nowhere.
pub(crate) fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        let (left, right) = line.split_once(" - ").unwrap_or((line, ""));
        if right.split_whitespace().next() == Some("cgroup2") {
            if let Some(mp) = left.split_whitespace().nth(4) {
                return Ok(PathBuf::from(mp));
            }
        }
    }
    let mp = PathBuf::from("/run/lb-tests-cgroup2");
    std::fs::create_dir_all(&mp)?;
    nix::mount::mount(
        Some("cgroup2"),
        &mp,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting cgroup2")?;
    Ok(mp)
}

impl Cgroup {
    pub fn new() -> anyhow::Result<Cgroup> {
        let path = cgroup2_root()?.join(unique("lbtest"));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// Runs `program args` inside this cgroup and `ns`, waits, returns its
    /// output.
    pub fn run(
        &self,
        ns: &Netns,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Output> {
        let netns = ns.file()?;
        let mut procs = File::options()
            .write(true)
            .open(self.path.join("cgroup.procs"))?;
        let (nfd, pfd) = (netns.as_raw_fd(), procs.as_raw_fd());
        let mut cmd = Command::new(program);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: only async-signal-safe calls (setns, write) between fork
        // and exec; both fds outlive the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(nfd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process.
                if libc::write(pfd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        let _ = procs.flush();
        Ok(out)
    }
}

impl Cgroup {
    /// Runs `lb-probe` (see tests/src/bin/lb-probe.rs) in this cgroup and
    /// `ns`, talking to `tcp` and/or `udp`: its `PROBE ...` lines.
    pub fn probe(
        &self,
        ns: &Netns,
        tcp: Option<SocketAddrV4>,
        udp: Option<SocketAddrV4>,
    ) -> anyhow::Result<String> {
        self.probe_any(ns, tcp.map(Into::into), udp.map(Into::into))
    }

    /// `probe` with addresses of either family.
    pub fn probe_any(
        &self,
        ns: &Netns,
        tcp: Option<std::net::SocketAddr>,
        udp: Option<std::net::SocketAddr>,
    ) -> anyhow::Result<String> {
        let (tcp, udp) = (tcp.map(|a| a.to_string()), udp.map(|a| a.to_string()));
        let mut env = Vec::new();
        if let Some(t) = &tcp {
            env.push(("LB_PROBE_TCP", t.as_str()));
        }
        if let Some(u) = &udp {
            env.push(("LB_PROBE_UDP", u.as_str()));
        }
        let probe = crate::agent::lb_bin().with_file_name("lb-probe");
        let out = self.run(ns, &probe, &[], &env)?;
        anyhow::ensure!(
            out.status.success(),
            "lb-probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The directory can be removed once its processes have exited.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
