//! The real `lb run`, started inside a node namespace, and stopped (and its
//! pins removed) on drop.

use std::{
    io::{BufRead, BufReader},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::{
    netns::{unique, Netns},
    topology::{Topology, NODE_IP, NODE_NAME},
};

/// The `lb` binary under test: `$LB_BIN` (set by `cargo xtask test`).
/// Whether agents' log lines are echoed to stderr as they come (they are
/// kept for `wait_for_log` either way). Benchmarks turn it off: 10,000
/// Services make 10,000 lines.
pub static ECHO_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

pub fn lb_bin() -> PathBuf {
    match std::env::var_os("LB_BIN") {
        Some(p) => PathBuf::from(p),
        None => panic!("LB_BIN is not set: run the root tests with `cargo xtask test`"),
    }
}

pub struct Agent {
    child: Option<Child>,
    pub pin_dir: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
    /// Network namespace name, arguments and environment, for restarts.
    netns: String,
    pub args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Agent {
    /// Starts `lb run` in `ns` with `args` after `run`, not waiting.
    pub fn spawn(ns: &Netns, pin_dir: &Path, args: &[String]) -> anyhow::Result<Agent> {
        Self::spawn_with_env(ns, pin_dir, args, &[])
    }

    /// `spawn` with extra environment variables for the agent.
    pub fn spawn_with_env(
        ns: &Netns,
        pin_dir: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Agent> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (child, logs) = Self::launch(&ns.name, pin_dir, args, &env)?;
        Ok(Agent {
            child: Some(child),
            pin_dir: pin_dir.to_path_buf(),
            logs,
            netns: ns.name.clone(),
            args: args.to_vec(),
            env,
        })
    }

    /// Stops the agent with SIGTERM (which leaves the datapath running) and
    /// starts a new one on the same pin directory with `args` (the same
    /// ones if `None`), waiting until it is ready. The logs start afresh.
    pub fn restart(&mut self, args: Option<Vec<String>>) -> anyhow::Result<()> {
        let status = self.stop_with(Signal::SIGTERM)?;
        anyhow::ensure!(status.success(), "agent exited with {status}");
        self.start_again(args)
    }

    /// The arguments `lb run` was started with.
    pub fn args(&self) -> Vec<String> {
        self.args.clone()
    }

    /// Starts a stopped agent again (see `restart`).
    pub fn start_again(&mut self, args: Option<Vec<String>>) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "the agent is still running");
        if let Some(a) = args {
            self.args = a;
        }
        let (child, logs) = Self::launch(&self.netns, &self.pin_dir, &self.args, &self.env)?;
        self.child = Some(child);
        self.logs = logs;
        self.wait_for_log("datapath ready", Duration::from_secs(20))?;
        Ok(())
    }

    fn launch(
        netns_name: &str,
        pin_dir: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<(Child, Arc<Mutex<Vec<String>>>)> {
        let netns = std::fs::File::open(format!("/run/netns/{netns_name}"))
            .with_context(|| format!("opening network namespace {netns_name}"))?;
        let mut cmd = Command::new(lb_bin());
        cmd.arg("run").args(args).arg("--pin-dir").arg(pin_dir);
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info")
            .envs(env.iter().cloned());
        let fd = netns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd stays open (netns lives
        // until after spawn returns). Only the network namespace changes:
        // the agent must see the root mount namespace's /sys/fs/bpf so its
        // pins are visible to bpftool.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", lb_bin().display()))?;
        drop(netns);
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped");
        let sink = logs.clone();
        let tag = netns_name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if ECHO_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
                    eprintln!("[lb {tag}] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Ok((child, logs))
    }

    /// Starts the agent for a topology (following every interface of the
    /// node: the NIC and every pod veth) and waits until it is ready.
    pub fn start(topo: &Topology, config: &Path) -> anyhow::Result<Agent> {
        Self::start_with(topo, config, &[])
    }

    pub fn start_with(topo: &Topology, config: &Path, extra: &[String]) -> anyhow::Result<Agent> {
        Self::start_with_env(topo, config, extra, &[])
    }

    /// `start_with`, the agent given extra environment variables.
    pub fn start_with_env(
        topo: &Topology,
        config: &Path,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Agent> {
        Self::start_within(topo, config, extra, env, Duration::from_secs(20))
    }

    /// `start_with_env`, waiting up to `within` for the datapath (a
    /// benchmark's tens of thousands of Services take longer).
    pub fn start_within(
        topo: &Topology,
        config: &Path,
        extra: &[String],
        env: &[(&str, &str)],
        within: Duration,
    ) -> anyhow::Result<Agent> {
        let mut args = vec![
            "--config".to_string(),
            config.display().to_string(),
            "--node-ip".into(),
            NODE_IP.to_string(),
            "--node-name".into(),
            NODE_NAME.into(),
        ];
        // No --iface: the agent follows every interface of the node, as
        // it does by default (and as the DaemonSet runs it).
        args.extend_from_slice(extra);
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("lbtest")));
        let mut agent = Agent::spawn_with_env(&topo.node, &pin_dir, &args, env)?;
        agent.wait_for_log("datapath ready", within)?;
        Ok(agent)
    }

    /// An agent with no services in the client namespace, attached with XDP
    /// to the client's veth: a pass-through XDP program there is what lets
    /// the node's XDP_TX frames (refusals) arrive, as a wire would for a NIC.
    pub fn start_peer_xdp(topo: &Topology) -> anyhow::Result<(Agent, ConfigFile)> {
        let config = ConfigFile::new("apiVersion: v1\nkind: List\nitems: []\n")?;
        let args: Vec<String> = [
            "--config",
            &config.path.display().to_string(),
            "--xdp-iface",
            "eth0",
            "--node-ip",
            &crate::topology::CLIENT_IP.to_string(),
            "--node-name",
            "client",
        ]
        .map(String::from)
        .to_vec();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("lbpeer")));
        let mut agent = Agent::spawn(&topo.client, &pin_dir, &args)?;
        agent.wait_for_log("datapath ready", Duration::from_secs(20))?;
        Ok((agent, config))
    }

    /// Packets counted for `verdict` (a name as `lb stats` prints it) by
    /// this agent's datapath, read with `lb stats`.
    pub fn stat(&self, verdict: &str) -> u64 {
        let out = crate::netns::sh(
            Command::new(lb_bin())
                .arg("stats")
                .arg("--pin-dir")
                .arg(&self.pin_dir),
        )
        .expect("lb stats");
        out.lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(verdict)).then(|| it.next()?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no {verdict} line in:\n{out}"))
    }

    /// What `lb status` prints for this agent's pin directory.
    pub fn status(&self) -> String {
        crate::netns::sh(
            lb_in_named(&self.netns)
                .arg("status")
                .arg("--pin-dir")
                .arg(&self.pin_dir),
        )
        .expect("lb status")
    }

    /// `lb ARGS --pin-dir <this agent's>` (the inspection commands), its
    /// standard output; panics if it fails.
    pub fn inspect(&self, args: &[&str]) -> String {
        crate::netns::sh(
            Command::new(lb_bin())
                .args(args)
                .arg("--pin-dir")
                .arg(&self.pin_dir),
        )
        .unwrap_or_else(|e| panic!("lb {args:?}: {e:#}"))
    }

    /// `inspect` expected to fail: its error output.
    pub fn inspect_fails(&self, args: &[&str]) -> String {
        let out = Command::new(lb_bin())
            .args(args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output()
            .expect("running lb");
        assert!(!out.status.success(), "lb {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The running agent's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for a log line containing `needle` (counting only lines that
    /// appear from now on if `fresh`).
    pub fn wait_for_log(&mut self, needle: &str, within: Duration) -> anyhow::Result<String> {
        self.wait_for_nth_log(needle, 1, within)
    }

    /// Waits until `n` log lines contain `needle`.
    pub fn wait_for_nth_log(
        &mut self,
        needle: &str,
        n: usize,
        within: Duration,
    ) -> anyhow::Result<String> {
        self.wait_for_line(|l| l.contains(needle), n, needle, within)
    }

    /// Waits until `n` log lines satisfy `matches` (described by `what`).
    pub fn wait_for_line(
        &mut self,
        matches: impl Fn(&str) -> bool,
        n: usize,
        what: &str,
        within: Duration,
    ) -> anyhow::Result<String> {
        let needle = what;
        let within = crate::patience(within);
        let deadline = Instant::now() + within;
        loop {
            let matches: Vec<String> = self.logs().into_iter().filter(|l| matches(l)).collect();
            if matches.len() >= n {
                return Ok(matches[n - 1].clone());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "lb exited ({status}) before logging {needle:?}:\n{}",
                    self.logs().join("\n")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "lb did not log {needle:?} within {within:?}:\n{}",
                    self.logs().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn count_logs(&self, needle: &str) -> usize {
        self.logs().iter().filter(|l| l.contains(needle)).count()
    }

    /// Sends `signal` and waits for the exit status.
    pub fn stop_with(&mut self, signal: Signal) -> anyhow::Result<std::process::ExitStatus> {
        let child = self.child.as_ref().context("agent already stopped")?;
        kill(Pid::from_raw(child.id() as i32), signal)?;
        self.wait_exit(Duration::from_secs(10))
    }

    /// Waits for the agent to exit (killing it after `within`).
    pub fn wait_exit(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        let deadline = Instant::now() + crate::patience(within);
        loop {
            if let Some(status) = child.try_wait()? {
                std::thread::sleep(Duration::from_millis(50)); // let the log thread drain
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("lb still running after {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_datapath_state();
        }
        if self.child.is_some() {
            let _ = self.stop_with(Signal::SIGTERM);
        }
        let _ = lb_userspace::kernel::pins::remove_all(&self.pin_dir);
    }
}

impl Agent {
    /// For a failed test: the datapath's counters and flows as the pins
    /// hold them, beside the agent's log, so a failure seen once can be
    /// read afterwards.
    fn print_datapath_state(&self) {
        for what in ["stats", "conntrack"] {
            let out = lb_in_named(&self.netns)
                .arg(what)
                .arg("--pin-dir")
                .arg(&self.pin_dir)
                .output();
            match out {
                Ok(o) => eprintln!(
                    "[lb {what} at the failure]\n{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("[lb {what} at the failure] could not run: {e}"),
            }
        }
    }
}

/// Names of the TCX programs on `iface` in `ns` for `direction`, in order
/// (none on kernels without TCX)
/// (bpftool 7.1 predates TCX, so we ask the kernel through aya).
pub fn tcx_programs(
    ns: &Netns,
    iface: &str,
    direction: aya::programs::TcAttachType,
) -> Vec<String> {
    let iface = iface.to_string();
    if !lb_userspace::kernel::probes::has_tcx() {
        // Before 6.6: no TCX, so none attached.
        return Vec::new();
    }
    ns.run(move || {
        let (_, progs) = aya::programs::SchedClassifier::query_tcx(&iface, direction)
            .unwrap_or_else(|e| panic!("querying TCX on {iface}: {e}"));
        progs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_string())
            .collect()
    })
    .unwrap()
}

/// `lb` to run in `ns`'s network namespace (the root mount namespace
/// stays: the pins are where the agents put them). `ip netns exec` would
/// remount /sys and hide them.
pub fn lb_in(ns: &Netns) -> Command {
    lb_in_named(&ns.name)
}

fn lb_in_named(netns: &str) -> Command {
    let path = format!("/run/netns/{netns}");
    let mut cmd = Command::new(lb_bin());
    // SAFETY: open and setns are async-signal-safe; the fd is closed by
    // exec (O_CLOEXEC).
    unsafe {
        cmd.pre_exec(move || {
            let fd = nix::fcntl::open(
                path.as_str(),
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )?;
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Names of our programs on TC hook `direction` of `iface` in `ns`, in
/// order: TCX links first (they run first), then our clsact filters (TC
/// without TCX, `--tc-attach netlink`).
pub fn tc_programs(ns: &Netns, iface: &str, direction: aya::programs::TcAttachType) -> Vec<String> {
    let mut names = tcx_programs(ns, iface, direction);
    names.extend(
        clsact_filters(ns, iface, direction)
            .into_iter()
            .filter(|f| f.is_ours(&["lb_tc_ingress", "lb_tc_egress"]))
            .map(|f| f.program),
    );
    names
}

/// Every filter on clsact hook `direction` of `iface` in `ns`.
pub fn clsact_filters(
    ns: &Netns,
    iface: &str,
    direction: aya::programs::TcAttachType,
) -> Vec<lb_userspace::kernel::clsact::Filter> {
    use lb_userspace::kernel::clsact::{filters, Direction};
    let dir = match direction {
        aya::programs::TcAttachType::Egress => Direction::Egress,
        _ => Direction::Ingress,
    };
    let iface = iface.to_string();
    ns.run(move || {
        let index = nix::net::if_::if_nametoindex(iface.as_str())
            .unwrap_or_else(|e| panic!("no interface {iface}: {e}"));
        filters(index, dir).unwrap_or_else(|e| panic!("listing filters on {iface}: {e}"))
    })
    .unwrap()
}

/// Whether `iface` in `ns` has a clsact qdisc.
pub fn has_clsact(ns: &Netns, iface: &str) -> bool {
    let iface = iface.to_string();
    ns.run(move || {
        let index = nix::net::if_::if_nametoindex(iface.as_str()).unwrap();
        lb_userspace::kernel::clsact::has_clsact(index).unwrap()
    })
    .unwrap()
}

/// GET `path` on the agent running in `ns`, at its default address for
/// that path (`--metrics-addr` for /metrics and /proxyMode, else
/// `--http-addr`): (status code, body).
pub fn status_get(ns: &Netns, path: &'static str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = match path {
        "/metrics" | "/proxyMode" => "127.0.0.1:10249",
        _ => "127.0.0.1:10256",
    };
    ns.run(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    })
    .unwrap()
}

/// A config file in a fresh temporary directory, removed on drop.
pub struct ConfigFile {
    dir: PathBuf,
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn new(yaml: &str) -> anyhow::Result<ConfigFile> {
        let dir = std::env::temp_dir().join(unique("lb-config-"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("services.yaml");
        std::fs::write(&path, yaml)?;
        Ok(ConfigFile { dir, path })
    }

    /// Replaces the file the way `kubectl get ... > tmp && mv tmp file` does.
    pub fn replace(&self, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.dir.join(".services.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }

    /// Rewrites the file in place.
    pub fn rewrite(&self, yaml: &str) -> anyhow::Result<()> {
        std::fs::write(&self.path, yaml)?;
        Ok(())
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
