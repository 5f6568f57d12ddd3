//! The rules kube-proxy would program for the benchmark's services, in
//! its iptables mode (fed to `iptables-restore`, legacy or nft backend)
//! and its nftables mode (fed to `nft -f`). The shapes follow kube-proxy's
//! own proxier tests (pkg/proxy/iptables/proxier_test.go and
//! pkg/proxy/nftables/proxier_test.go: the chains, matches and jumps each
//! packet walks) for ClusterIP Services without a `--cluster-cidr` (so no
//! masquerade mark for off-cluster sources), with every hook chain kube-
//! proxy installs. Chain names carry an index instead of kube-proxy's
//! hash: the length is the same, the lookups are not by name.

use std::{fmt::Write, net::Ipv4Addr};

/// One Service port as the benchmark programs it everywhere (a Service
/// with two ports is two of these with the same `index`).
#[derive(Clone, Debug)]
pub struct BenchService {
    pub index: usize,
    pub cluster_ip: Ipv4Addr,
    pub tcp: bool,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<Ipv4Addr>,
}

impl BenchService {
    pub fn protocol(&self) -> &'static str {
        if self.tcp {
            "tcp"
        } else {
            "udp"
        }
    }

    pub fn port_name(&self) -> &'static str {
        if self.tcp {
            "http"
        } else {
            "dns"
        }
    }

    fn name(&self) -> String {
        format!("bench/svc-{}:{}", self.index, self.port_name())
    }

    /// A 16-character tag in place of kube-proxy's hash of the name.
    fn tag(&self, salt: usize) -> String {
        format!(
            "{:016X}",
            (self.index * 2 + usize::from(self.tcp)) * 64 + salt
        )
    }
}

/// The Service CIDR the benchmark's ClusterIPs come from.
pub const SERVICE_CIDR: &str = "198.19.0.0/16";

/// `iptables-restore` input: kube-proxy's iptables-mode nat and filter
/// tables for `services` (UDP ports). Every new flow walks KUBE-SERVICES
/// linearly to its Service's rule; established packets skip the nat table
/// (conntrack) but walk the filter table's FORWARD rules.
pub fn iptables(services: &[BenchService]) -> String {
    let mut out = String::new();
    out.push_str("*filter\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
        "KUBE-PROXY-CANARY",
    ] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(concat!(
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n",
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A INPUT -j KUBE-FIREWALL\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A OUTPUT -j KUBE-FIREWALL\n",
        "-A KUBE-FIREWALL -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        "COMMIT\n",
        "*nat\n",
        ":KUBE-SERVICES - [0:0]\n",
        ":KUBE-NODEPORTS - [0:0]\n",
        ":KUBE-POSTROUTING - [0:0]\n",
        ":KUBE-MARK-MASQ - [0:0]\n",
    ));
    for s in services {
        let _ = writeln!(out, ":KUBE-SVC-{} - [0:0]", s.tag(0));
        for (k, _) in s.endpoints.iter().enumerate() {
            let _ = writeln!(out, ":KUBE-SEP-{} - [0:0]", s.tag(k + 1));
        }
    }
    out.push_str(concat!(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    ));
    for s in services {
        let p = s.protocol();
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j KUBE-SVC-{}",
            s.name(),
            s.cluster_ip,
            s.port,
            s.tag(0)
        );
    }
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    for s in services {
        let n = s.endpoints.len();
        for (k, ep) in s.endpoints.iter().enumerate() {
            // kube-proxy's split: endpoint k of n is taken with probability
            // 1/(n-k) among those left; the last one unconditionally.
            let statistic = if k + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / (n - k) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "-A KUBE-SVC-{} -m comment --comment \"{} -> {}:{}\"{statistic} -j KUBE-SEP-{}",
                s.tag(0),
                s.name(),
                ep,
                s.target_port,
                s.tag(k + 1)
            );
        }
        let p = s.protocol();
        for (k, ep) in s.endpoints.iter().enumerate() {
            let sep = s.tag(k + 1);
            let _ = writeln!(
                out,
                "-A KUBE-SEP-{sep} -m comment --comment {} -s {ep}/32 -j KUBE-MARK-MASQ",
                s.name()
            );
            let _ = writeln!(
                out,
                "-A KUBE-SEP-{sep} -m comment --comment {} -m {p} -p {p} -j DNAT --to-destination {ep}:{}",
                s.name(),
                s.target_port
            );
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// `nft -f` input: kube-proxy's nftables-mode table for `services`. New
/// flows find their Service in one map lookup (`service-ips`), then pick an
/// endpoint with `numgen random`.
pub fn nftables(services: &[BenchService]) -> String {
    let mut out = String::from(NFT_BASE);
    for s in services {
        let p = s.protocol();
        let svc = format!(
            "service-{}-bench/svc-{}/{p}/{}",
            &s.tag(0)[8..],
            s.index,
            s.port_name()
        );
        let _ = writeln!(out, "add chain ip kube-proxy {svc}");
        let endpoint_chain = |k: usize, ep: Ipv4Addr| {
            format!(
                "endpoint-{}-{svc}__{ep}/{}",
                &s.tag(k + 1)[8..],
                s.target_port
            )
        };
        let vmap: Vec<String> = s
            .endpoints
            .iter()
            .enumerate()
            .map(|(k, ep)| format!("{k} : goto {}", endpoint_chain(k, *ep)))
            .collect();
        for (k, ep) in s.endpoints.iter().enumerate() {
            let chain = endpoint_chain(k, *ep);
            let _ = writeln!(out, "add chain ip kube-proxy {chain}");
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {chain} ip saddr {ep} jump mark-for-masquerade"
            );
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {chain} meta l4proto {p} dnat to {ep}:{}",
                s.target_port
            );
        }
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {svc} numgen random mod {} vmap {{ {} }}",
            s.endpoints.len(),
            vmap.join(" , ")
        );
        if !s.tcp {
            // A set: each ClusterIP once (the benchmark's TCP port shares
            // its Service's ClusterIP with a UDP one).
            let _ = writeln!(
                out,
                "add element ip kube-proxy cluster-ips {{ {} }}",
                s.cluster_ip
            );
        }
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} . {p} . {} : goto {svc} }}",
            s.cluster_ip, s.port
        );
    }
    out
}

/// The table, its base chains (kube-proxy's hooks and priorities), sets,
/// maps and shared chains, before any Service.
const NFT_BASE: &str = concat!(
    "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n",
    "add chain ip kube-proxy mark-for-masquerade\n",
    "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n",
    "add chain ip kube-proxy masquerading\n",
    "add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n",
    "add rule ip kube-proxy masquerading mark set mark xor 0x4000\n",
    "add rule ip kube-proxy masquerading masquerade fully-random\n",
    "add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }\n",
    "add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n",
    "add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; }\n",
    "add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; }\n",
    "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n",
    "add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; }\n",
    "add chain ip kube-proxy firewall-check\n",
    "add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n",
    "add chain ip kube-proxy service-endpoints-check\n",
    "add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n",
    "add chain ip kube-proxy nodeport-endpoints-check\n",
    "add rule ip kube-proxy nodeport-endpoints-check ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports\n",
    "add chain ip kube-proxy cluster-ips-check\n",
    "add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n",
    "add rule ip kube-proxy cluster-ips-check ip daddr { 198.19.0.0/16 } drop comment \"Drop traffic to unallocated ClusterIPs\"\n",
    "add chain ip kube-proxy services\n",
    "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    "add rule ip kube-proxy services ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport vmap @service-nodeports\n",
    "add chain ip kube-proxy filter-prerouting { type filter hook prerouting priority -110 ; }\n",
    "add rule ip kube-proxy filter-prerouting ct state new jump firewall-check\n",
    "add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }\n",
    "add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check\n",
    "add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check\n",
    "add chain ip kube-proxy filter-input { type filter hook input priority -110 ; }\n",
    "add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check\n",
    "add rule ip kube-proxy filter-input ct state new jump service-endpoints-check\n",
    "add chain ip kube-proxy filter-output { type filter hook output priority -110 ; }\n",
    "add rule ip kube-proxy filter-output ct state new jump service-endpoints-check\n",
    "add rule ip kube-proxy filter-output ct state new jump firewall-check\n",
    "add chain ip kube-proxy filter-output-post-dnat { type filter hook output priority -90 ; }\n",
    "add rule ip kube-proxy filter-output-post-dnat ct state new jump cluster-ips-check\n",
    "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n",
    "add rule ip kube-proxy nat-prerouting jump services\n",
    "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n",
    "add rule ip kube-proxy nat-output jump services\n",
    "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n",
    "add rule ip kube-proxy nat-postrouting jump masquerading\n",
);

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(index: usize) -> BenchService {
        BenchService {
            index,
            cluster_ip: Ipv4Addr::new(198, 19, 0, 10),
            tcp: false,
            port: 53,
            target_port: 5353,
            endpoints: (1..=3).map(|i| Ipv4Addr::new(198, 18, 1, 10 + i)).collect(),
        }
    }

    #[test]
    fn iptables_splits_endpoints_as_kube_proxy_does() {
        let rules = iptables(&[svc(7)]);
        let svc_rules: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SVC-"))
            .collect();
        assert_eq!(svc_rules.len(), 3);
        assert!(
            svc_rules[0].contains("--probability 0.33333333333"),
            "{}",
            svc_rules[0]
        );
        assert!(
            svc_rules[1].contains("--probability 0.50000000000"),
            "{}",
            svc_rules[1]
        );
        assert!(!svc_rules[2].contains("statistic"), "{}", svc_rules[2]);
        assert!(rules.contains("-j DNAT --to-destination 198.18.1.13:5353"));
        assert!(rules.contains("-d 198.19.0.10/32 --dport 53 -j KUBE-SVC-"));
        // Every chain jumped to is declared.
        for l in rules.lines().filter(|l| l.starts_with("-A ")) {
            if let Some(target) = l.split(" -j ").nth(1) {
                let target = target.split(' ').next().unwrap();
                if target.starts_with("KUBE-") {
                    assert!(
                        rules.contains(&format!(":{target} ")),
                        "{target} undeclared"
                    );
                }
            }
        }
    }

    #[test]
    fn iptables_services_chain_grows_linearly() {
        let services: Vec<_> = (0..100).map(svc).collect();
        let rules = iptables(&services);
        let n = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES "))
            .count();
        assert_eq!(n, 101, "one rule per Service, then the NodePort jump");
    }

    #[test]
    fn nftables_maps_each_service_once_and_picks_among_its_endpoints() {
        let rules = nftables(&[svc(3)]);
        assert!(rules.contains(
            "add element ip kube-proxy service-ips { 198.19.0.10 . udp . 53 : goto service-"
        ));
        assert!(rules.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        assert_eq!(rules.matches("dnat to 198.18.1.1").count(), 3);
    }

    #[test]
    fn a_tcp_port_gets_tcp_matches_and_chains_of_its_own() {
        let udp = svc(3);
        let tcp = BenchService {
            tcp: true,
            port: 80,
            target_port: 8080,
            ..udp.clone()
        };
        let ipt = iptables(&[udp.clone(), tcp.clone()]);
        assert!(ipt.contains("-m tcp -p tcp -d 198.19.0.10/32 --dport 80 -j KUBE-SVC-"));
        assert!(ipt.contains("-m tcp -p tcp -j DNAT --to-destination 198.18.1.11:8080"));
        assert_ne!(udp.tag(0), tcp.tag(0));
        let nft = nftables(&[udp, tcp]);
        assert!(nft.contains("198.19.0.10 . tcp . 80 : goto service-"));
        assert_eq!(
            nft.matches("add element ip kube-proxy cluster-ips").count(),
            1
        );
    }
}
