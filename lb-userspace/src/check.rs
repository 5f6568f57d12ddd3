//! `lb check`: what this node's kernel offers lb, asked before kube-proxy
//! is removed. Every feature probe (and which flag needs it), the TC
//! attachment `--tc-attach auto` would choose, and every program of the
//! datapath loaded for real (the kernel's verifier is the final judge of
//! what a kernel accepts) into a throw-away pin directory, with what each
//! load cost. Nothing is attached; the pins are removed on every path.
//! (bpffs refuses names with a dot: the directory is `lb-check-PID`.)

use std::{fmt, path::PathBuf, time::Duration};

use crate::kernel::{
    conntrack::CtSizes,
    datapath::{Datapath, LoadCost},
    pins, probes,
};

/// What `lb check` found.
pub struct Report {
    pub kernel: String,
    /// (what asks for it, feature name, present).
    pub features: Vec<(&'static str, &'static str, bool)>,
    /// "tcx" or "netlink".
    pub tc_mode: &'static str,
    /// Load costs of the programs that loaded.
    pub costs: Vec<LoadCost>,
    /// Why the datapath did not load (the verifier's words), if it did not.
    pub load_error: Option<String>,
}

impl Report {
    /// Whether `lb run` can work here without --xdp-iface and --cgroup.
    pub fn usable(&self) -> bool {
        self.load_error.is_none()
            && self
                .features
                .iter()
                .all(|(by, _, present)| *present || *by != "always")
    }
}

/// Small conntrack tables: the check loads the programs, it serves nothing.
const CHECK_SIZES: CtSizes = CtSizes {
    tcp: 4096,
    syn: 4096,
    udp: 4096,
    snat: 4096,
};

/// Runs every probe and loads the datapath under `pin_base` (a bpffs
/// directory), in a directory of its own that is removed afterwards.
pub fn run(pin_base: &std::path::Path) -> anyhow::Result<Report> {
    crate::system::check_privileges()?;
    let features: Vec<_> = probes::all()
        .into_iter()
        .map(|(by, f)| (by, f.name, f.present()))
        .collect();
    let tc_mode = probes::tc_mode(probes::TcAttach::Auto)?.label();
    let dir: PathBuf = pin_base.join(format!("lb-check-{}", std::process::id()));
    crate::system::ensure_bpffs(&dir)?;
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    let cgroup = features
        .iter()
        .filter(|(by, _, _)| *by == "--cgroup")
        .all(|(_, _, present)| *present);
    let loaded = load(&dir, cgroup);
    let removed = pins::remove_all(&dir);
    let (costs, load_error) = match loaded {
        Ok(costs) => (costs, None),
        Err((costs, e)) => (costs, Some(format!("{e:#}"))),
    };
    removed.map_err(|e| anyhow::anyhow!("removing {}: {e}", dir.display()))?;
    Ok(Report {
        kernel: probes::kernel_release(),
        features,
        tc_mode,
        costs,
        load_error,
    })
}

type Costs = Vec<LoadCost>;

fn load(dir: &std::path::Path, cgroup: bool) -> Result<Costs, (Costs, anyhow::Error)> {
    let (mut dp, _maps) = Datapath::load_object(crate::kernel::datapath::OBJECT, dir, &CHECK_SIZES)
        .map_err(|e| (Vec::new(), e.into()))?;
    if cgroup {
        if let Err(e) = dp.load_socket_hooks() {
            return Err((dp.costs().to_vec(), e.into()));
        }
    }
    Ok(dp.costs().to_vec())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel {}", self.kernel)?;
        writeln!(f, "\nfeatures:")?;
        for (by, name, present) in &self.features {
            let mark = if *present { "yes" } else { "NO " };
            writeln!(f, "  {mark}  {name} (needed {})", needed(by))?;
        }
        writeln!(f, "\nTC attachment (--tc-attach auto): {}", self.tc_mode)?;
        writeln!(f, "\nprograms loaded (nothing attached):")?;
        writeln!(
            f,
            "  {:<20} {:>16} {:>10}",
            "program", "verified insns", "load ms"
        )?;
        for c in &self.costs {
            let insns = c
                .verified_insns
                .map_or_else(|| "-".to_string(), |n| n.to_string());
            writeln!(f, "  {:<20} {insns:>16} {:>10}", c.program, ms(c.took))?;
        }
        match &self.load_error {
            Some(e) => writeln!(f, "\nthe datapath did not load: {e}")?,
            None if self.usable() => writeln!(f, "\nlb can run on this kernel")?,
            None => writeln!(
                f,
                "\nlb cannot run on this kernel: a feature it always needs is missing"
            )?,
        }
        Ok(())
    }
}

fn needed(by: &str) -> String {
    match by {
        "always" => "always".to_string(),
        flag => format!("with {flag}"),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}
