//! Host facts and set-up the agent needs before touching the kernel:
//! privileges, a mounted bpffs, and one agent per pin directory.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};
use nix::{
    fcntl::{Flock, FlockArg},
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The effective capability set of this process, from /proc.
fn effective_caps() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff in /proc/self/status")?;
    Ok(u64::from_str_radix(line.trim(), 16)?)
}

/// Fails with a sentence saying what to do unless we may load programs and
/// attach them to interfaces.
pub fn check_privileges() -> anyhow::Result<()> {
    let caps = effective_caps()?;
    let has = |c: u32| caps & (1 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !missing.is_empty() {
        bail!(
            "lb run needs {} to load eBPF programs and attach them; run it as root \
             (or grant the capabilities, e.g. a privileged DaemonSet)",
            missing.join(" and ")
        );
    }
    Ok(())
}

/// Makes sure `pin_dir` sits on a bpf filesystem, mounting /sys/fs/bpf when
/// it is not mounted (as on a fresh machine), like a DaemonSet's host mount.
pub fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        // Agents starting together must not stack two mounts (the second
        // would hide the first one's pins): check and mount under a lock on
        // the mount point itself.
        let dir = File::open(root).context("opening /sys/fs/bpf")?;
        let _guard = Flock::lock(dir, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .context("locking /sys/fs/bpf")?;
        if !is_bpffs(root) {
            mount(
                Some("bpf"),
                root,
                Some("bpf"),
                MsFlags::empty(),
                Some("mode=0700"),
            )
            .context("mounting bpffs on /sys/fs/bpf (try: mount -t bpf bpf /sys/fs/bpf)")?;
            tracing::info!("mounted bpffs on /sys/fs/bpf");
        }
    }
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    if !is_bpffs(parent) {
        bail!(
            "{} is not on a bpf filesystem, so maps cannot be pinned there; \
             mount one with `mount -t bpf bpf {}` or choose a --pin-dir under /sys/fs/bpf",
            pin_dir.display(),
            parent.display()
        );
    }
    Ok(())
}

fn is_bpffs(p: &Path) -> bool {
    statfs(p)
        .map(|s| s.filesystem_type() == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// An exclusive lock on the pin directory, held for the agent's lifetime:
/// two agents writing the same maps would undo each other's work.
pub struct PinDirLock {
    _lock: Flock<File>,
    pub path: PathBuf,
}

impl PinDirLock {
    pub fn acquire(pin_dir: &Path) -> anyhow::Result<PinDirLock> {
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating {}", pin_dir.display()))?;
        let dir = File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
        match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(PinDirLock {
                _lock: lock,
                path: pin_dir.to_path_buf(),
            }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
                "another lb agent is already running with pin directory {}; stop it first \
                 or give this one its own --pin-dir",
                pin_dir.display()
            ),
            Err((_, e)) => Err(e).with_context(|| format!("locking {}", pin_dir.display())),
        }
    }
}

/// Whether an agent holds the lock on `pin_dir` (it is running).
pub fn agent_running(pin_dir: &Path) -> bool {
    let Ok(dir) = File::open(pin_dir) else {
        return false;
    };
    matches!(
        Flock::lock(dir, FlockArg::LockSharedNonblock),
        Err((_, nix::errno::Errno::EWOULDBLOCK))
    )
}

/// The cookie of this process's network namespace (SO_NETNS_COOKIE, Linux
/// 5.14): the socket hooks act only on sockets of this namespace.
pub fn netns_cookie() -> anyhow::Result<u64> {
    // nix has no wrapper for this option; it is one getsockopt.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .context("opening a socket to read the netns cookie")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd, and an out-pointer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading the netns cookie (SO_NETNS_COOKIE needs Linux 5.14)");
    }
    Ok(cookie)
}

/// 32 random bits from the kernel (a secret, not a simulation).
pub fn random_u32() -> u32 {
    use std::io::Read;
    let mut b = [0u8; 4];
    // /dev/urandom never blocks once the pool is initialised, and cannot
    // be missing where eBPF runs; fall back to the clock if it is.
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.subsec_nanos() ^ t.as_secs() as u32;
    }
    u32::from_ne_bytes(b)
}
