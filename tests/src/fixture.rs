//! A loaded datapath for BPF_PROG_TEST_RUN: the real programs and maps,
//! programmed by the real planner, run on crafted frames.
//!
//! The calling thread moves into a fresh namespace first: test runs use the
//! caller's namespace for FIB lookups, so replies route the same way on
//! every machine. That namespace has a veth pair standing for the node's
//! NIC (`fx0`, 198.18.0.2/24, MAC NODE_MAC) and a pod veth (`fx1`), and a
//! permanent neighbour entry for the client (198.18.0.1, CLIENT_MAC). The
//! namespace is dual-stack: every IPv4 address and route there has its
//! IPv6 twin (`v6_of`), so IPv6 fixtures route the same way.

use std::{net::Ipv4Addr, path::PathBuf};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{DatapathConfig, SNAT_PORT_MAX, SNAT_PORT_MIN};
use lb_userspace::{
    kernel::conntrack::CtSizes,
    kernel::{
        datapath::{Datapath, KernelMaps},
        pins::remove_all as remove_pins,
    },
    model::{build, DesiredState, NodeConfig},
    plan::Programmer,
    source::manifest,
};
use nix::sched::{setns, CloneFlags};
use std::os::fd::AsFd;

use crate::{
    netns::{unique, Netns},
    packet::{CLIENT_MAC, NODE_MAC},
    topology::{NODE_IP, NODE_IP6, NODE_NAME},
};

/// Conntrack tables small enough that a fixture can fill them.
pub const FIXTURE_CT_SIZES: CtSizes = CtSizes {
    tcp: 4096,
    syn: 1024,
    udp: 1024,
    snat: 1024,
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// MAC of the node's end of the pod link (`fx1`).
pub const POD_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];

/// MAC of local pod 198.18.1.`i`.
pub fn pod_mac(i: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 1, i]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress.
    Tc,
    Xdp,
    /// TC egress: packets the node sends.
    TcEgress,
}

impl Hook {
    /// The hook's "let it through to the stack" return code.
    pub fn verdict_pass(self) -> u32 {
        if self == Hook::Xdp {
            XDP_PASS
        } else {
            TC_ACT_OK
        }
    }

    pub fn verdict_drop(self) -> u32 {
        if self == Hook::Xdp {
            XDP_DROP
        } else {
            TC_ACT_SHOT
        }
    }

    /// Sent out of an interface by the datapath itself.
    pub fn verdict_redirect(self) -> u32 {
        if self == Hook::Xdp {
            XDP_REDIRECT
        } else {
            TC_ACT_REDIRECT
        }
    }
}

pub struct Fixture {
    pub dp: Option<Datapath>,
    pub programmer: Programmer<KernelMaps>,
    pin_dir: PathBuf,
    /// ifindex of the pod-side interface replies "arrive" on.
    pub pod_ifindex: u32,
    /// ifindex of the node's NIC (`fx0`), for traffic from outside.
    pub nic_ifindex: u32,
    /// Kept so the namespace outlives the fixture.
    _ns: Netns,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub verdict: u32,
    pub frame: Vec<u8>,
}

impl Fixture {
    /// Loads the datapath in a fresh namespace and programs `yaml`.
    pub fn new(yaml: &str) -> anyhow::Result<Fixture> {
        Self::with_sizes(yaml, &FIXTURE_CT_SIZES)
    }

    /// `new` with conntrack tables of `sizes`.
    pub fn with_sizes(yaml: &str, sizes: &CtSizes) -> anyhow::Result<Fixture> {
        let objects = manifest::parse(yaml)?;
        let node = NodeConfig {
            name: NODE_NAME.into(),
            node_ips: vec![NODE_IP.into(), NODE_IP6.into()],
            service_proxy_name: None,
            ..Default::default()
        };
        Self::with_state_sized(
            &build(&objects.services, &objects.slices, &node).state,
            sizes,
        )
    }

    /// Loads the datapath in a fresh namespace and programs `state`.
    pub fn with_state(state: &DesiredState) -> anyhow::Result<Fixture> {
        Self::with_state_sized(state, &FIXTURE_CT_SIZES)
    }

    /// `with_state` with conntrack tables of `sizes` (the benchmark uses
    /// the sizes the agent would choose on this machine).
    pub fn with_state_sized(state: &DesiredState, sizes: &CtSizes) -> anyhow::Result<Fixture> {
        crate::require_root();
        let ns = Netns::new(unique("lbfx"))?;
        ns.ip(&[
            "link",
            "add",
            "fx0",
            "address",
            &mac(NODE_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "fx1",
        ])?;
        ns.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "fx0"])?;
        ns.ip(&["link", "set", "fx1", "address", &mac(POD_GW_MAC)])?;
        ns.ip(&["link", "set", "fx0", "up"])?;
        ns.ip(&["link", "set", "fx1", "up"])?;
        // Local pods (198.18.1.0/24) behind fx1, each with a known MAC;
        // another node's pods (198.18.2.0/24) via the client's address,
        // standing in for the fabric's router.
        ns.ip(&["route", "add", "198.18.1.0/24", "dev", "fx1"])?;
        ns.ip(&[
            "route",
            "add",
            "198.18.2.0/24",
            "via",
            "198.18.0.1",
            "dev",
            "fx0",
        ])?;
        for i in 10..=13u8 {
            ns.ip(&[
                "neigh",
                "add",
                &format!("198.18.1.{i}"),
                "lladdr",
                &mac(pod_mac(i)),
                "dev",
                "fx1",
                "nud",
                "permanent",
            ])?;
        }
        ns.ip(&[
            "neigh",
            "add",
            "198.18.0.1",
            "lladdr",
            &mac(CLIENT_MAC),
            "dev",
            "fx0",
            "nud",
            "permanent",
        ])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        add_ipv6_twins(&ns)?;
        setns(ns.file()?.as_fd(), CloneFlags::CLONE_NEWNET)?;
        let pod_ifindex = nix::net::if_::if_nametoindex("fx1")?;
        let nic_ifindex = nix::net::if_::if_nametoindex("fx0")?;

        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("lbfx")));
        lb_userspace::system::ensure_bpffs(&pin_dir)?;
        std::fs::create_dir_all(&pin_dir)?;
        let (dp, maps, _) = match Datapath::load(&pin_dir, sizes) {
            Ok(loaded) => loaded,
            Err(e) => {
                let _ = remove_pins(&pin_dir);
                return Err(e.into());
            }
        };
        // From here on, Drop cleans up whatever happens.
        let mut fx = Fixture {
            dp: Some(dp),
            programmer: Programmer::new(maps),
            pin_dir,
            pod_ifindex,
            nic_ifindex,
            _ns: ns,
        };
        fx.programmer.maps_mut().set_config(DatapathConfig {
            snat_addr4: lb_common::addr::from_v4(NODE_IP.octets()),
            snat_addr6: lb_common::addr::from_ip(NODE_IP6.into()),
            snat_port_min: SNAT_PORT_MIN,
            snat_port_max: SNAT_PORT_MAX,
            netns_cookie: 0,
            ..Default::default()
        })?;
        let report = fx.programmer.apply(state);
        anyhow::ensure!(
            report.failed.is_empty(),
            "programming failed: {:?}",
            report.failed
        );
        Ok(fx)
    }

    /// Where the fixture's maps are pinned.
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pin_dir
    }

    pub fn maps(&self) -> &KernelMaps {
        self.programmer.maps()
    }

    /// For writes outside the plan (node facts such as `lb_cluster_cidrs`).
    pub fn maps_mut(&mut self) -> &mut KernelMaps {
        self.programmer.maps_mut()
    }

    /// Packets counted for verdict `v` so far.
    pub fn counter(&self, v: lb_common::Verdict) -> u64 {
        self.maps()
            .verdict_counters()
            .unwrap()
            .into_iter()
            .find(|(x, _)| *x == v)
            .unwrap()
            .1
            .packets
    }

    fn test_run(
        &self,
        hook: Hook,
        opts: TestRunOptions<'_>,
    ) -> anyhow::Result<aya::programs::TestRunResult> {
        let dp = self.dp.as_ref().expect("loaded");
        Ok(match hook {
            Hook::Tc => dp.tc_program().test_run(opts)?,
            Hook::TcEgress => dp.tc_egress_program().test_run(opts)?,
            Hook::Xdp => dp.xdp_program().test_run(opts)?,
        })
    }

    /// Runs `frame` `repeat` times in the kernel and returns the mean time
    /// per run the kernel measured (BPF_PROG_TEST_RUN's duration).
    pub fn time(
        &self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
    ) -> anyhow::Result<std::time::Duration> {
        self.time_on(hook, frame, repeat, 0)
    }

    /// `time` for a frame arriving on `ifindex` (0: the test run's
    /// loopback), which packets the datapath routes itself need.
    pub fn time_on(
        &self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
        ifindex: u32,
    ) -> anyhow::Result<std::time::Duration> {
        let ctx = match hook {
            Hook::Tc | Hook::TcEgress => skb_ctx(ifindex),
            Hook::Xdp => xdp_ctx(frame.len() as u32, ifindex),
        };
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: (ifindex != 0).then_some(ctx.as_slice()),
            repeat,
            ..Default::default()
        };
        Ok(self.test_run(hook, opts)?.duration)
    }

    /// Runs `frame` through the program of `hook` once, as if it arrived
    /// on interface `ifindex` (0: the test run's loopback).
    pub fn run_on(&self, hook: Hook, frame: &[u8], ifindex: u32) -> anyhow::Result<Outcome> {
        let mut out = vec![0u8; frame.len() + 256];
        let ctx = match hook {
            Hook::Tc | Hook::TcEgress => skb_ctx(ifindex),
            Hook::Xdp => xdp_ctx(frame.len() as u32, ifindex),
        };
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: (ifindex != 0).then_some(ctx.as_slice()),
            repeat: 1,
            ..Default::default()
        };
        let r = self.test_run(hook, opts)?;
        out.truncate(r.data_size_out as usize);
        Ok(Outcome {
            verdict: r.return_value,
            frame: out,
        })
    }

    pub fn run(&self, hook: Hook, frame: &[u8]) -> anyhow::Result<Outcome> {
        self.run_on(hook, frame, 0)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.dp.take());
        let _ = remove_pins(&self.pin_dir);
    }
}

pub use crate::topology::v6_of;

/// The fixture namespace's IPv6 half: the node's address on `fx0`, local
/// pods behind `fx1`, another node's pods via the client, permanent
/// neighbours with the IPv4 ones' MACs. No duplicate address detection,
/// so the address is usable at once.
fn add_ipv6_twins(ns: &Netns) -> anyhow::Result<()> {
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")?;
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    let six = |ip: [u8; 4]| v6_of(Ipv4Addr::from(ip)).to_string();
    let node = format!("{}/64", six([198, 18, 0, 2]));
    ns.ip(&["-6", "addr", "add", &node, "dev", "fx0", "nodad"])?;
    ns.ip(&["-6", "route", "add", "fd00:18:0:1::/64", "dev", "fx1"])?;
    let client = six([198, 18, 0, 1]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "fd00:18:0:2::/64",
        "via",
        &client,
        "dev",
        "fx0",
    ])?;
    let mut neighbours = vec![(client, CLIENT_MAC, "fx0")];
    for i in 10..=13u8 {
        neighbours.push((six([198, 18, 1, i]), pod_mac(i), "fx1"));
    }
    for (ip, m, dev) in neighbours {
        ns.ip(&[
            "-6",
            "neigh",
            "add",
            &ip,
            "lladdr",
            &mac(m),
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `struct __sk_buff` up to `ifindex`: the fields BPF_PROG_TEST_RUN takes
/// for an skb (the rest must be zero and may be left out).
fn skb_ctx(ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 44];
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes()); // ingress_ifindex
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes()); // ifindex
    ctx
}

/// `struct xdp_md` for a frame of `len` bytes received on `ifindex`.
fn xdp_ctx(len: u32, ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 24];
    ctx[4..8].copy_from_slice(&len.to_ne_bytes()); // data_end
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes()); // ingress_ifindex
    ctx
}

/// The client address the fixtures use.
pub const CLIENT: Ipv4Addr = crate::topology::CLIENT_IP;

/// The userspace Maglev table over endpoints of either family (each on
/// port `target`), for the tests that predict the datapath's choice.
pub struct Maglev(lb_userspace::plan::maglev::MaglevTable);

impl Maglev {
    pub fn new(eps: &[std::net::IpAddr], target: u16) -> Maglev {
        use lb_userspace::plan::maglev::{table_size_for, MaglevTable};
        let set: Vec<(std::net::IpAddr, u16)> = eps.iter().map(|&ip| (ip, target)).collect();
        Maglev(MaglevTable::build(&set, table_size_for(set.len())))
    }

    /// The endpoint slot `hash` names.
    pub fn lookup(&self, hash: u64) -> std::net::IpAddr {
        self.0.lookup(hash).0
    }
}

/// `Maglev` over IPv4 endpoints.
pub struct Maglev4(Maglev);

impl Maglev4 {
    pub fn new(eps: &[Ipv4Addr], target: u16) -> Maglev4 {
        let eps: Vec<std::net::IpAddr> = eps.iter().map(|&ip| ip.into()).collect();
        Maglev4(Maglev::new(&eps, target))
    }

    /// The endpoint slot `hash` names.
    pub fn lookup(&self, hash: u64) -> Ipv4Addr {
        match self.0.lookup(hash) {
            std::net::IpAddr::V4(ip) => ip,
            ip => panic!("{ip} in an IPv4 table"),
        }
    }
}
