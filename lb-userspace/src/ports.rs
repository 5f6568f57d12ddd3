//! Port ranges the node shares between its own sockets, NodePorts and
//! translated flows, and the start-up checks that keep them apart:
//! - SNAT ports must be outside the node's ephemeral range
//!   (`net.ipv4.ip_local_port_range`), or a local socket could pick a
//!   4-tuple a translated flow uses, and outside the NodePort range, or a
//!   backend's reply to a translated flow would look like a new NodePort
//!   connection;
//! - the NodePort range is added to `net.ipv4.ip_local_reserved_ports`, so
//!   the node's own sockets never get a local port there and their replies
//!   are never taken for NodePort traffic (Cilium does the same with
//!   `--enable-auto-protect-node-port-range`).

use std::{fmt, str::FromStr};

const EPHEMERAL: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// An inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    /// Kubernetes' default `--service-node-port-range`.
    pub const NODE_PORTS: PortRange = PortRange {
        min: 30000,
        max: 32767,
    };

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.min <= other.max && other.min <= self.max
    }

    pub fn contains(&self, other: &PortRange) -> bool {
        self.min <= other.min && other.max <= self.max
    }

    pub fn len(&self) -> u32 {
        self.max as u32 - self.min as u32 + 1
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `MIN-MAX` (the sysctl's tab-separated form is accepted too).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a port range MIN-MAX (1-65535)");
        let (a, b) = s.trim().split_once(['-', '\t', ' ']).ok_or_else(bad)?;
        let min: u16 = a.trim().parse().map_err(|_| bad())?;
        let max: u16 = b.trim().parse().map_err(|_| bad())?;
        if min == 0 || min > max {
            return Err(bad());
        }
        Ok(PortRange { min, max })
    }
}

/// Refuses a SNAT range that a local socket or a NodePort could collide
/// with, saying what to change.
pub fn check_snat_range(
    snat: PortRange,
    ephemeral: PortRange,
    node_ports: PortRange,
) -> Result<(), String> {
    if snat.len() < 1024 {
        return Err(format!(
            "--snat-ports {snat} has {} ports; give at least 1024 (each port serves one flow \
             per backend at a time)",
            snat.len()
        ));
    }
    if snat.overlaps(&ephemeral) {
        return Err(format!(
            "--snat-ports {snat} overlaps this node's ephemeral ports {ephemeral} \
             (net.ipv4.ip_local_port_range): a local socket could take a port a translated \
             flow uses. Give --snat-ports outside it, or narrow the sysctl"
        ));
    }
    if snat.overlaps(&node_ports) {
        return Err(format!(
            "--snat-ports {snat} overlaps the NodePort range {node_ports} (--nodeport-range): \
             replies to translated flows would be taken for NodePort connections"
        ));
    }
    Ok(())
}

/// The node's ephemeral port range.
pub fn ephemeral_range() -> std::io::Result<PortRange> {
    let text = std::fs::read_to_string(EPHEMERAL)?;
    text.parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// `ip_local_reserved_ports` with `add` in it; None if already covered.
/// The sysctl is a comma-separated list of ports and ranges; what is there
/// stays.
pub fn with_reserved(current: &str, add: PortRange) -> Option<String> {
    let current = current.trim();
    let covered = current
        .split(',')
        .filter_map(|part| {
            let part = part.trim();
            match part.split_once('-') {
                Some(_) => part.parse::<PortRange>().ok(),
                None => part
                    .parse::<u16>()
                    .ok()
                    .map(|p| PortRange { min: p, max: p }),
            }
        })
        .any(|r| r.contains(&add));
    if covered {
        return None;
    }
    Some(if current.is_empty() {
        add.to_string()
    } else {
        format!("{current},{add}")
    })
}

/// Reserves `node_ports` for NodePorts in this network namespace. True if
/// the sysctl was changed.
pub fn reserve(node_ports: PortRange) -> std::io::Result<bool> {
    let current = std::fs::read_to_string(RESERVED)?;
    match with_reserved(&current, node_ports) {
        Some(new) => {
            std::fs::write(RESERVED, new)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> PortRange {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_parse_like_the_sysctl_and_the_flag() {
        assert_eq!(
            r("32768\t60999\n"),
            PortRange {
                min: 32768,
                max: 60999
            }
        );
        assert_eq!(
            r("61000-65535"),
            PortRange {
                min: 61000,
                max: 65535
            }
        );
        for bad in ["", "5", "0-10", "10-5", "1-70000", "a-b"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn snat_range_must_stay_clear_of_local_sockets_and_node_ports() {
        let eph = r("32768-60999");
        let np = PortRange::NODE_PORTS;
        assert!(check_snat_range(r("61000-65535"), eph, np).is_ok());
        let e = check_snat_range(r("61000-65535"), r("32768-65535"), np).unwrap_err();
        assert!(e.contains("ip_local_port_range"), "{e}");
        let e = check_snat_range(r("30000-40000"), r("40001-60999"), np).unwrap_err();
        assert!(e.contains("NodePort"), "{e}");
        assert!(check_snat_range(r("64000-64100"), eph, np).is_err());
    }

    #[test]
    fn reserved_ports_are_added_to_not_replaced() {
        let np = PortRange::NODE_PORTS;
        assert_eq!(with_reserved("\n", np).as_deref(), Some("30000-32767"));
        assert_eq!(
            with_reserved("8080,9000-9100\n", np).as_deref(),
            Some("8080,9000-9100,30000-32767")
        );
        assert_eq!(with_reserved("22,30000-32767", np), None);
        assert_eq!(with_reserved("29000-33000", np), None);
    }
}
