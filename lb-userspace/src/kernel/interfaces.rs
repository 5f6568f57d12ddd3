//! Which of the node's interfaces the datapath sits on. A node's interfaces
//! come and go (a CNI creates a veth per pod, renames it, deletes it with
//! the pod); this module turns "what the network namespace has" (from
//! rtnetlink, `link_watch`) and "what the user asked for" (`--iface`,
//! `--exclude-iface`, `--xdp-iface`) into attach, rename and detach steps,
//! which the agent applies through `datapath`. Pure: no I/O here.

use std::collections::BTreeMap;

use glob::Pattern;

/// An interface of the agent's network namespace, as rtnetlink reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: LinkKind,
}

/// What the datapath can parse on a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// Frames start with an Ethernet header (ARPHRD_ETHER: NICs, veths,
    /// bridges, VXLAN): what the datapath parses.
    Ethernet,
    Loopback,
    /// No Ethernet header (IPIP `tunl0`, WireGuard, tun): the datapath would
    /// read the IP header as one, so it is never attached there.
    Other,
}

/// How an interface's arriving traffic is hooked. Leaving traffic always
/// gets the TC egress program (replies the node's own stack sends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ingress {
    Tc,
    Xdp(XdpAttach),
}

/// `--xdp-iface NAME[:MODE]`: how XDP is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum XdpAttach {
    /// The kernel chooses: native where the driver has XDP, else generic.
    #[default]
    Auto,
    /// In the driver (fails where the driver has no XDP).
    Native,
    /// In the kernel's receive path, after the driver (any device, slower:
    /// for NICs without native XDP).
    Generic,
}

impl XdpAttach {
    pub fn label(self) -> &'static str {
        match self {
            XdpAttach::Auto => "auto",
            XdpAttach::Native => "native",
            XdpAttach::Generic => "generic",
        }
    }
}

/// One `--xdp-iface` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpIface {
    pub name: String,
    pub mode: XdpAttach,
}

impl std::str::FromStr for XdpIface {
    type Err = String;

    /// `eth0`, `eth0:native`, `eth0:generic` (interface names cannot hold
    /// a colon).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, mode) = match s.split_once(':') {
            None => (s, XdpAttach::Auto),
            Some((name, "native")) => (name, XdpAttach::Native),
            Some((name, "generic")) => (name, XdpAttach::Generic),
            Some((_, other)) => {
                return Err(format!(
                    "XDP mode {other:?}: give NAME, NAME:native or NAME:generic"
                ))
            }
        };
        if name.is_empty() {
            return Err("an interface name is needed before the mode".into());
        }
        Ok(XdpIface {
            name: name.to_string(),
            mode,
        })
    }
}

/// Why an interface is not followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    Loopback,
    NotEthernet,
    /// `--iface` was given and no pattern matches.
    NotIncluded,
    /// An `--exclude-iface` pattern matches.
    Excluded,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::Loopback => "loopback",
            Skip::NotEthernet => {
                "no Ethernet header (an L3 device such as IPIP, WireGuard or tun); the datapath \
                 parses Ethernet frames"
            }
            Skip::NotIncluded => "no --iface pattern matches it",
            Skip::Excluded => "an --exclude-iface pattern matches it",
        })
    }
}

/// What the user asked for.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
    xdp: Vec<XdpIface>,
}

#[derive(Debug, thiserror::Error)]
#[error("{flag} {pattern:?} is not a valid glob pattern: {reason}")]
pub struct BadPattern {
    flag: &'static str,
    pattern: String,
    reason: &'static str,
}

impl Selection {
    /// `include` empty means every interface but loopback.
    pub fn new(
        include: &[String],
        exclude: &[String],
        xdp: &[XdpIface],
    ) -> Result<Selection, BadPattern> {
        let compile = |flag: &'static str, patterns: &[String]| {
            patterns
                .iter()
                .map(|p| {
                    Pattern::new(p).map_err(|e| BadPattern {
                        flag,
                        pattern: p.clone(),
                        reason: e.msg,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Selection {
            include: compile("--iface", include)?,
            exclude: compile("--exclude-iface", exclude)?,
            xdp: xdp.to_vec(),
        })
    }

    /// How `link` is hooked, or why it is not.
    pub fn judge(&self, link: &Link) -> Result<Ingress, Skip> {
        // Named explicitly: the user knows the device.
        if let Some(x) = self.xdp.iter().find(|x| x.name == link.name) {
            return Ok(Ingress::Xdp(x.mode));
        }
        match link.kind {
            LinkKind::Loopback => return Err(Skip::Loopback),
            LinkKind::Other => return Err(Skip::NotEthernet),
            LinkKind::Ethernet => {}
        }
        if !self.include.is_empty() && !self.include.iter().any(|p| p.matches(&link.name)) {
            return Err(Skip::NotIncluded);
        }
        if self.exclude.iter().any(|p| p.matches(&link.name)) {
            return Err(Skip::Excluded);
        }
        Ok(Ingress::Tc)
    }

    /// Interfaces named exactly (an `--iface` without glob characters, and
    /// every `--xdp-iface`): they must exist when the agent starts, and
    /// failing to attach there is an error, not a warning.
    pub fn named(&self) -> Vec<&str> {
        self.include
            .iter()
            .map(Pattern::as_str)
            .filter(|p| !p.contains(['*', '?', '[']))
            .chain(self.xdp.iter().map(|x| x.name.as_str()))
            .collect()
    }
}

/// What was done to one interface (by index), as last applied.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Attachment {
    name: String,
    ingress: Ingress,
    /// The attach failed: not retried until the interface is renamed,
    /// replaced or the agent restarts (a failure is logged once).
    failed: bool,
}

/// One step towards the wanted attachments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Attach {
        name: String,
        ingress: Ingress,
    },
    /// The interface was renamed (a CNI creates a veth under a temporary
    /// name): the same links, pinned under the new name.
    Rename {
        from: String,
        to: String,
        ingress: Ingress,
    },
    /// The interface is gone, or no longer selected: remove its links.
    Detach {
        name: String,
        ingress: Ingress,
    },
}

/// The namespace's interfaces and what the datapath has on them.
#[derive(Debug)]
pub struct Interfaces {
    selection: Selection,
    present: BTreeMap<u32, Link>,
    attached: BTreeMap<u32, Attachment>,
}

impl Interfaces {
    pub fn new(selection: Selection) -> Interfaces {
        Interfaces {
            selection,
            present: BTreeMap::new(),
            attached: BTreeMap::new(),
        }
    }

    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// Every interface of the namespace (start-up, or after events were
    /// lost).
    pub fn set_present(&mut self, links: Vec<Link>) {
        self.present = links.into_iter().map(|l| (l.index, l)).collect();
    }

    /// A link appeared or changed (renamed, moved in, brought up).
    pub fn link_changed(&mut self, link: Link) {
        self.present.insert(link.index, link);
    }

    /// A link was deleted or moved to another namespace.
    pub fn link_removed(&mut self, index: u32) {
        self.present.remove(&index);
    }

    pub fn is_present(&self, index: u32) -> bool {
        self.present.contains_key(&index)
    }

    /// The present interfaces with how each is judged.
    pub fn judged(&self) -> impl Iterator<Item = (&Link, Result<Ingress, Skip>)> {
        self.present.values().map(|l| (l, self.selection.judge(l)))
    }

    /// The steps that make the attachments match the present interfaces,
    /// with the interface index each is about. Detaches come first, then
    /// renames, then attaches, so a name given up by one interface is free
    /// when another takes it.
    pub fn plan(&self) -> Vec<(u32, Step)> {
        let mut detach = Vec::new();
        let mut rename = Vec::new();
        let mut attach = Vec::new();
        for (&index, had) in &self.attached {
            let want = self
                .present
                .get(&index)
                .and_then(|l| Some((l, self.selection.judge(l).ok()?)));
            let gone = Step::Detach {
                name: had.name.clone(),
                ingress: had.ingress,
            };
            match want {
                None => detach.push((index, gone)),
                Some((link, ingress)) if ingress != had.ingress => {
                    detach.push((index, gone));
                    attach.push((
                        index,
                        Step::Attach {
                            name: link.name.clone(),
                            ingress,
                        },
                    ));
                }
                Some((link, _)) if link.name == had.name => {}
                Some((link, ingress)) if had.failed => attach.push((
                    index,
                    Step::Attach {
                        name: link.name.clone(),
                        ingress,
                    },
                )),
                Some((link, ingress)) => rename.push((
                    index,
                    Step::Rename {
                        from: had.name.clone(),
                        to: link.name.clone(),
                        ingress,
                    },
                )),
            }
        }
        for (&index, link) in &self.present {
            if self.attached.contains_key(&index) {
                continue;
            }
            if let Ok(ingress) = self.selection.judge(link) {
                attach.push((
                    index,
                    Step::Attach {
                        name: link.name.clone(),
                        ingress,
                    },
                ));
            }
        }
        detach.into_iter().chain(rename).chain(attach).collect()
    }

    /// Records the outcome of a step from `plan`.
    pub fn applied(&mut self, index: u32, step: &Step, ok: bool) {
        match step {
            Step::Attach { name, ingress }
            | Step::Rename {
                to: name, ingress, ..
            } => {
                self.attached.insert(
                    index,
                    Attachment {
                        name: name.clone(),
                        ingress: *ingress,
                        failed: !ok,
                    },
                );
            }
            Step::Detach { .. } => {
                self.attached.remove(&index);
            }
        }
    }

    /// The interfaces the datapath is on, by name.
    pub fn in_force(&self) -> Vec<(String, Ingress)> {
        let mut v: Vec<(String, Ingress)> = self
            .attached
            .values()
            .filter(|a| !a.failed)
            .map(|a| (a.name.clone(), a.ingress))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
            kind: LinkKind::Ethernet,
        }
    }

    fn sel(include: &[&str], exclude: &[&str], xdp: &[&str]) -> Selection {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let xdp: Vec<XdpIface> = xdp.iter().map(|x| x.parse().unwrap()).collect();
        Selection::new(&s(include), &s(exclude), &xdp).unwrap()
    }

    fn attach(name: &str, ingress: Ingress) -> Step {
        Step::Attach {
            name: name.into(),
            ingress,
        }
    }

    /// Applies every step of a plan as succeeded; returns the steps.
    fn settle(ifs: &mut Interfaces) -> Vec<Step> {
        let plan = ifs.plan();
        for (i, s) in &plan {
            ifs.applied(*i, s, true);
        }
        assert!(ifs.plan().is_empty(), "a second plan is empty");
        plan.into_iter().map(|(_, s)| s).collect()
    }

    #[test]
    fn without_patterns_every_ethernet_interface_but_loopback_is_followed() {
        let s = sel(&[], &[], &[]);
        let lo = Link {
            kind: LinkKind::Loopback,
            ..eth(1, "lo")
        };
        let tunl = Link {
            kind: LinkKind::Other,
            ..eth(5, "tunl0")
        };
        assert_eq!(s.judge(&lo), Err(Skip::Loopback));
        assert_eq!(s.judge(&tunl), Err(Skip::NotEthernet));
        assert_eq!(s.judge(&eth(2, "eth0")), Ok(Ingress::Tc));
        assert_eq!(s.judge(&eth(3, "cali1234")), Ok(Ingress::Tc));
    }

    #[test]
    fn patterns_narrow_exclusions_remove_and_xdp_names_win() {
        let s = sel(&["eth*", "veth*"], &["veth-skip*"], &["eth1"]);
        assert_eq!(s.judge(&eth(2, "eth0")), Ok(Ingress::Tc));
        assert_eq!(s.judge(&eth(3, "eth1")), Ok(Ingress::Xdp(XdpAttach::Auto)));
        assert_eq!(s.judge(&eth(4, "vethab12")), Ok(Ingress::Tc));
        assert_eq!(s.judge(&eth(5, "veth-skip1")), Err(Skip::Excluded));
        assert_eq!(s.judge(&eth(6, "lxc1")), Err(Skip::NotIncluded));
        assert_eq!(s.named(), vec!["eth1"]);
        assert_eq!(sel(&["eth0", "p*"], &[], &[]).named(), vec!["eth0"]);
        assert!(Selection::new(&["[eth".into()], &[], &[]).is_err());
    }

    #[test]
    fn interfaces_that_appear_are_attached_and_those_that_go_detached() {
        let mut ifs = Interfaces::new(sel(&[], &["dummy*"], &["eth1"]));
        ifs.set_present(vec![eth(2, "eth0"), eth(3, "eth1"), eth(4, "dummy0")]);
        assert_eq!(
            settle(&mut ifs),
            vec![
                attach("eth0", Ingress::Tc),
                attach("eth1", Ingress::Xdp(XdpAttach::Auto))
            ]
        );
        ifs.link_changed(eth(7, "veth7"));
        assert_eq!(settle(&mut ifs), vec![attach("veth7", Ingress::Tc)]);
        // A flag change (same name, same index) is nothing to do.
        ifs.link_changed(eth(7, "veth7"));
        assert!(ifs.plan().is_empty());
        ifs.link_removed(7);
        assert_eq!(
            settle(&mut ifs),
            vec![Step::Detach {
                name: "veth7".into(),
                ingress: Ingress::Tc
            }]
        );
        assert_eq!(
            ifs.in_force(),
            vec![
                ("eth0".into(), Ingress::Tc),
                ("eth1".into(), Ingress::Xdp(XdpAttach::Auto))
            ]
        );
    }

    #[test]
    fn a_rename_moves_the_pins_and_a_rename_out_of_the_selection_detaches() {
        let mut ifs = Interfaces::new(sel(&["veth*", "tmp*"], &[], &[]));
        ifs.set_present(vec![eth(9, "tmp9")]);
        settle(&mut ifs);
        ifs.link_changed(eth(9, "veth9"));
        assert_eq!(
            settle(&mut ifs),
            vec![Step::Rename {
                from: "tmp9".into(),
                to: "veth9".into(),
                ingress: Ingress::Tc
            }]
        );
        ifs.link_changed(eth(9, "other9"));
        assert_eq!(
            settle(&mut ifs),
            vec![Step::Detach {
                name: "veth9".into(),
                ingress: Ingress::Tc
            }]
        );
        assert!(ifs.in_force().is_empty());
    }

    #[test]
    fn a_name_reused_by_a_new_interface_is_detached_first_then_attached() {
        let mut ifs = Interfaces::new(sel(&[], &[], &[]));
        ifs.set_present(vec![eth(4, "p1")]);
        settle(&mut ifs);
        // Deleted and created again while events were lost: a relist.
        ifs.set_present(vec![eth(8, "p1")]);
        let plan = ifs.plan();
        assert_eq!(
            plan,
            vec![
                (
                    4,
                    Step::Detach {
                        name: "p1".into(),
                        ingress: Ingress::Tc
                    }
                ),
                (8, attach("p1", Ingress::Tc)),
            ]
        );
    }

    #[test]
    fn a_failed_attach_is_not_retried_until_the_interface_changes() {
        let mut ifs = Interfaces::new(sel(&[], &[], &[]));
        ifs.set_present(vec![eth(4, "p1")]);
        let plan = ifs.plan();
        ifs.applied(plan[0].0, &plan[0].1, false);
        assert!(ifs.plan().is_empty());
        assert!(ifs.in_force().is_empty());
        ifs.link_changed(eth(4, "p1-renamed"));
        assert_eq!(ifs.plan(), vec![(4, attach("p1-renamed", Ingress::Tc))]);
        // Gone: nothing of it is left attached, the detach is harmless.
        ifs.link_removed(4);
        assert!(matches!(ifs.plan()[..], [(4, Step::Detach { .. })]));
    }

    #[test]
    fn an_xdp_interface_takes_an_optional_mode() {
        let x = |s: &str| s.parse::<XdpIface>();
        assert_eq!(x("eth0").unwrap().mode, XdpAttach::Auto);
        assert_eq!(x("eth0:native").unwrap().mode, XdpAttach::Native);
        let g = x("enp1s0:generic").unwrap();
        assert_eq!((g.name.as_str(), g.mode), ("enp1s0", XdpAttach::Generic));
        assert!(x("eth0:offload").unwrap_err().contains("NAME:generic"));
        assert!(x(":native").is_err());
    }
}
