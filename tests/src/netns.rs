//! Network namespaces the tests create and always delete (Drop guards run
//! on panics too). Nothing here touches the root namespace: links are
//! created inside the namespaces with `ip -n`, and code runs inside one by
//! switching a dedicated thread's network namespace with setns(2).

use std::{
    fs::File,
    os::fd::AsFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
};

use anyhow::{bail, Context};
use nix::sched::{setns, CloneFlags};

/// A short name unique to this process and call, for namespace names
/// (tests run in parallel, and several test binaries at once).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, failing with its stderr.
pub fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// `ip` with the given arguments.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    sh(Command::new("ip").args(args))
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> anyhow::Result<Netns> {
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A veth pair: `local` here, `peer_name` inside `peer`.
    pub fn add_veth(&self, local: &str, peer: &Netns, peer_name: &str) -> anyhow::Result<()> {
        self.ip(&[
            "link", "add", local, "type", "veth", "peer", "name", peer_name, "netns", &peer.name,
        ])
        .map(drop)
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        sh(Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args))
    }

    /// Sets a sysctl of this namespace. /proc/sys/net resolves against the
    /// opening thread's namespace, so no `sysctl` binary is needed.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        self.run(move || std::fs::write(&path, value).with_context(|| format!("writing {path}")))?
    }

    pub fn file(&self) -> anyhow::Result<File> {
        File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening netns {}", self.name))
    }

    /// Runs `f` on a new thread that lives in this namespace: sockets it
    /// creates belong here.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<JoinHandle<T>> {
        let file = self.file()?;
        Ok(std::thread::spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
            f()
        }))
    }

    /// Runs `f` in this namespace and waits for it.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        self.spawn(f)?
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys the links inside it.
        let _ = ip(&["netns", "del", &self.name]);
    }
}
