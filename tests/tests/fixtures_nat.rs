//! Packet fixtures for source NAT (external traffic to another node's
//! backend, hairpin), its reverse, SNAT port collisions, and ICMP errors
//! about translated flows: the real programs through BPF_PROG_TEST_RUN,
//! exact output bytes built independently (checksums from scratch).

use std::net::Ipv4Addr;

use lb_common::{hash::flow_hash, DatapathConfig, Verdict, SNAT_PORT_MAX, SNAT_PORT_MIN};
use lb_tests::{
    example::{yaml, Endpoint, Svc},
    fixture::*,
    packet::{icmp_error_frame, Spec, CLIENT_MAC, NODE_MAC, TCP, TCP_ACK, TCP_SYN, UDP},
    topology::NODE_IP,
};

const HOOKS: [Hook; 2] = [Hook::Tc, Hook::Xdp];
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// A router on the node's network that sends ICMP errors.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// Backends on another node (routed via 198.18.0.1 in the fixture).
fn remote() -> Vec<Ipv4Addr> {
    vec![Ipv4Addr::new(198, 18, 2, 11), Ipv4Addr::new(198, 18, 2, 12)]
}

fn remote_fixture() -> Fixture {
    let eps = remote()
        .into_iter()
        .map(|ip| Endpoint::ready(ip).on("node-b"))
        .collect();
    Fixture::new(&yaml(&[Svc::web(eps)])).expect("fixture")
}

fn backend_for(eps: &[Ipv4Addr], client: Ipv4Addr, sport: u16, dport: u16, proto: u8) -> Ipv4Addr {
    Maglev4::new(eps, 8080).lookup(flow_hash(
        &lb_common::addr::from_v4(client.octets()),
        sport,
        dport,
        proto,
    ))
}

/// The SNAT port a translated packet got (chosen at random by the
/// datapath), checked to be in the range.
fn snat_port_of(out: &Outcome) -> u16 {
    let port = lb_tests::packet::decode(&out.frame).sport;
    assert!(
        (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port),
        "SNAT port {port}"
    );
    port
}

fn redirect(hook: Hook) -> u32 {
    match hook {
        Hook::Tc | Hook::TcEgress => TC_ACT_REDIRECT,
        Hook::Xdp => XDP_REDIRECT,
    }
}

/// `p` as the node sends it on after translating its source to the node
/// (`sport`) and its destination to `daddr:dport`: routed by us, so out of
/// the NIC with the node's MAC and the TTL one lower.
fn routed_from_node(p: &Spec, sport: u16, daddr: Ipv4Addr, dport: u16) -> Spec {
    Spec {
        src_mac: NODE_MAC,
        dst_mac: CLIENT_MAC,
        saddr: NODE_IP,
        sport,
        daddr,
        dport,
        ttl: p.ttl - 1,
        ..p.clone()
    }
}

#[test]
fn node_port_to_a_remote_backend_is_snatted_and_the_reply_reversed() {
    for hook in HOOKS {
        let fx = remote_fixture();
        let syn = Spec::tcp(CLIENT, 40000, NODE_IP, 30080);
        let backend = backend_for(&remote(), CLIENT, 40000, 30080, TCP);
        let first = fx.run_on(hook, &syn.build(), fx.nic_ifindex).unwrap();
        let port = snat_port_of(&first);
        // Source becomes the node and a SNAT port, destination the backend;
        // routed by us (TTL - 1) to the next hop towards node B.
        let want = routed_from_node(&syn, port, backend, 8080);
        for (i, flags) in [TCP_SYN, TCP_ACK].into_iter().enumerate() {
            let input = Spec {
                tcp_flags: flags,
                ..syn.clone()
            };
            let out = if i == 0 {
                first.clone()
            } else {
                fx.run_on(hook, &input.build(), fx.nic_ifindex).unwrap()
            };
            assert_eq!(out.verdict, redirect(hook), "{hook:?} packet {i}");
            let w = Spec {
                tcp_flags: flags,
                ..want.clone()
            };
            assert_eq!(out.frame, w.build(), "{hook:?} packet {i}");
        }
        assert_eq!(fx.counter(Verdict::DnatNew), 1);
        assert_eq!(fx.counter(Verdict::DnatEstablished), 1);

        let reply = Spec {
            tcp_flags: TCP_SYN | TCP_ACK,
            ..Spec::tcp(backend, 8080, NODE_IP, port)
        };
        let out = fx.run_on(hook, &reply.build(), fx.nic_ifindex).unwrap();
        let want = routed_from_node(&reply, 30080, CLIENT, 40000);
        assert_eq!(out.verdict, redirect(hook), "{hook:?}");
        assert_eq!(out.frame, want.build(), "{hook:?} reply");
        assert_eq!(fx.counter(Verdict::ReplyNat), 1);
    }
}

#[test]
fn snat_ports_never_collide_for_one_backend() {
    for hook in HOOKS {
        let mut fx = remote_fixture();
        // One port only: the second flow to the same backend must not get
        // it; a flow to the other backend may.
        fx.programmer
            .maps_mut()
            .set_config(DatapathConfig {
                snat_addr4: lb_common::addr::from_v4(NODE_IP.octets()),
                snat_port_min: 61_000,
                snat_port_max: 61_000,
                netns_cookie: 0,
                ..Default::default()
            })
            .unwrap();
        let b = |sport| backend_for(&remote(), CLIENT, sport, 30080, TCP);
        let first = 40000;
        let same = (40001..41000).find(|&s| b(s) == b(first)).unwrap();
        let other = (40001..41000).find(|&s| b(s) != b(first)).unwrap();
        let run = |sport| {
            let f = Spec::tcp(CLIENT, sport, NODE_IP, 30080).build();
            fx.run_on(hook, &f, fx.nic_ifindex).unwrap()
        };
        let out = run(first);
        assert_eq!(lb_tests::packet::decode(&out.frame).sport, 61_000);
        let out = run(same);
        assert_eq!(
            out.verdict,
            if hook == Hook::Tc {
                TC_ACT_SHOT
            } else {
                XDP_DROP
            }
        );
        assert_eq!(fx.counter(Verdict::DropSnatExhausted), 1);
        let out = run(other);
        assert_eq!(out.verdict, redirect(hook));
        assert_eq!(lb_tests::packet::decode(&out.frame).sport, 61_000);
        // The first flow still holds its port.
        let out = run(first);
        assert_eq!(lb_tests::packet::decode(&out.frame).sport, 61_000);
        assert_eq!(fx.counter(Verdict::DnatEstablished), 1, "{hook:?}");
    }
}

#[test]
fn a_pod_reaching_itself_is_masqueraded_and_the_reply_reversed() {
    let pod = Ipv4Addr::new(198, 18, 1, 11);
    for hook in HOOKS {
        let fx = Fixture::new(&yaml(&[Svc::web(vec![Endpoint::ready(pod)])])).unwrap();
        let syn = Spec {
            src_mac: pod_mac(11),
            dst_mac: POD_GW_MAC,
            ..Spec::tcp(pod, 40000, CLUSTER_IP, 80)
        };
        let out = fx.run_on(hook, &syn.build(), fx.pod_ifindex).unwrap();
        let port = snat_port_of(&out);
        let want = Spec {
            src_mac: POD_GW_MAC,
            dst_mac: pod_mac(11),
            saddr: NODE_IP,
            sport: port,
            daddr: pod,
            dport: 8080,
            ttl: 63,
            ..syn.clone()
        };
        assert_eq!(out.verdict, redirect(hook), "{hook:?}");
        assert_eq!(out.frame, want.build(), "{hook:?} hairpin");
        let reply = Spec {
            src_mac: pod_mac(11),
            dst_mac: POD_GW_MAC,
            tcp_flags: TCP_SYN | TCP_ACK,
            ..Spec::tcp(pod, 8080, NODE_IP, port)
        };
        let out = fx.run_on(hook, &reply.build(), fx.pod_ifindex).unwrap();
        let want = Spec {
            src_mac: POD_GW_MAC,
            dst_mac: pod_mac(11),
            saddr: CLUSTER_IP,
            sport: 80,
            daddr: pod,
            dport: 40000,
            ttl: 63,
            ..reply
        };
        assert_eq!(out.verdict, redirect(hook), "{hook:?}");
        assert_eq!(out.frame, want.build(), "{hook:?} hairpin reply");
    }
}

/// The IP packet of a frame (what an ICMP error quotes), cut to `len`.
fn quote(spec: &Spec, len: usize) -> Vec<u8> {
    let f = spec.build();
    f[14..14usize.saturating_add(len).min(f.len())].to_vec()
}

const MTU_1280: [u8; 4] = [0, 0, 5, 0];

#[test]
fn icmp_errors_about_translated_flows_are_translated_back() {
    for hook in HOOKS {
        for cut in [usize::MAX, 28] {
            let fx = remote_fixture();
            let syn = Spec::tcp(CLIENT, 40000, NODE_IP, 30080);
            let out = fx.run_on(hook, &syn.build(), fx.nic_ifindex).unwrap();
            let backend = backend_for(&remote(), CLIENT, 40000, 30080, TCP);
            let port = snat_port_of(&out);
            let icmp = |to: Ipv4Addr, quoted: &Spec| {
                icmp_error_frame(
                    (NODE_MAC, CLIENT_MAC),
                    ROUTER,
                    to,
                    64,
                    3,
                    4,
                    MTU_1280,
                    &quote(quoted, cut),
                )
            };
            let sent = Spec {
                saddr: NODE_IP,
                sport: port,
                daddr: backend,
                dport: 8080,
                ttl: 63,
                ..syn.clone()
            };
            // (a) A router towards node B: "fragmentation needed" for our
            // SNATed packet goes to the client, about its own packet.
            let out = fx
                .run_on(hook, &icmp(NODE_IP, &sent), fx.nic_ifindex)
                .unwrap();
            let want = icmp_error_frame(
                (CLIENT_MAC, NODE_MAC),
                ROUTER,
                CLIENT,
                63,
                3,
                4,
                MTU_1280,
                &quote(
                    &Spec {
                        ttl: 63,
                        ..syn.clone()
                    },
                    cut,
                ),
            );
            assert_eq!(out.verdict, redirect(hook), "{hook:?} cut {cut}");
            assert_eq!(out.frame, want, "{hook:?} (a) cut {cut}");

            // (b) A router towards the client: "fragmentation needed" for
            // a reply we translated goes to the backend, about the packet
            // it sent.
            let replied = Spec {
                saddr: NODE_IP,
                sport: 30080,
                daddr: CLIENT,
                dport: 40000,
                ttl: 63,
                tcp_flags: TCP_SYN | TCP_ACK,
                ..syn.clone()
            };
            let out = fx
                .run_on(hook, &icmp(NODE_IP, &replied), fx.nic_ifindex)
                .unwrap();
            let from_backend = Spec {
                saddr: backend,
                sport: 8080,
                daddr: NODE_IP,
                dport: port,
                ..replied.clone()
            };
            let want = icmp_error_frame(
                (CLIENT_MAC, NODE_MAC),
                ROUTER,
                backend,
                63,
                3,
                4,
                MTU_1280,
                &quote(&from_backend, cut),
            );
            assert_eq!(out.frame, want, "{hook:?} (b) cut {cut}");
            assert_eq!(fx.counter(Verdict::IcmpErrorNat), 2);
        }
    }
}

#[test]
fn a_backends_port_unreachable_comes_from_the_frontend() {
    for hook in HOOKS {
        let fx = remote_fixture();
        // ClusterIP UDP: translated without SNAT.
        let dgram = Spec::udp(CLIENT, 40001, CLUSTER_IP, 53);
        fx.run_on(hook, &dgram.build(), fx.nic_ifindex).unwrap();
        let backend = backend_for(&remote(), CLIENT, 40001, 53, UDP);
        let sent = Spec {
            daddr: backend,
            dport: 5353,
            ..dgram.clone()
        };
        let input = icmp_error_frame(
            (NODE_MAC, CLIENT_MAC),
            backend,
            CLIENT,
            64,
            3,
            3,
            [0; 4],
            &quote(&sent, usize::MAX),
        );
        let out = fx.run_on(hook, &input, fx.nic_ifindex).unwrap();
        let want = icmp_error_frame(
            (CLIENT_MAC, NODE_MAC),
            CLUSTER_IP,
            CLIENT,
            63,
            3,
            3,
            [0; 4],
            &quote(&dgram, usize::MAX),
        );
        assert_eq!(out.verdict, redirect(hook), "{hook:?}");
        assert_eq!(out.frame, want, "{hook:?}");
        // An error about a flow we never saw passes untouched.
        let stranger = icmp_error_frame(
            (NODE_MAC, CLIENT_MAC),
            backend,
            CLIENT,
            64,
            3,
            3,
            [0; 4],
            &quote(&Spec::udp(CLIENT, 40002, backend, 5353), usize::MAX),
        );
        let out = fx.run_on(hook, &stranger, fx.nic_ifindex).unwrap();
        assert_eq!(out.frame, stranger);
    }
}

/// A ClusterIP reached from outside the cluster (a source neither in
/// `lb_cluster_cidrs` nor the node): with the masquerade flag (the agent's
/// default once the pod ranges are known) the flow to a backend on another
/// node gets the node's address and a SNAT port, so the reply comes back
/// through us; with the drop flag it is dropped; a pod (in the ranges) is
/// only DNATed either way, its address kept.
#[test]
fn an_outside_client_of_a_cluster_ip_is_masqueraded_or_dropped_a_pod_is_not() {
    use lb_common::{CONFIG_F_EXTERNAL_CLUSTER_IP_DROP, CONFIG_F_EXTERNAL_CLUSTER_IP_MASQ};
    let pods: lb_userspace::model::Prefix = "198.18.5.0/24".parse().unwrap();
    let pod = Ipv4Addr::new(198, 18, 5, 7);
    let config = |flags| DatapathConfig {
        snat_addr4: lb_common::addr::from_v4(NODE_IP.octets()),
        snat_port_min: SNAT_PORT_MIN,
        snat_port_max: SNAT_PORT_MAX,
        flags,
        ..Default::default()
    };
    for hook in HOOKS {
        let mut fx = remote_fixture();
        fx.maps_mut().set_cluster_cidrs(&[pods]).unwrap();
        fx.maps_mut()
            .set_config(config(CONFIG_F_EXTERNAL_CLUSTER_IP_MASQ))
            .unwrap();
        let syn = Spec::tcp(CLIENT, 41000, CLUSTER_IP, 80);
        let out = fx.run_on(hook, &syn.build(), fx.nic_ifindex).unwrap();
        let port = snat_port_of(&out);
        let want = routed_from_node(
            &syn,
            port,
            backend_for(&remote(), CLIENT, 41000, 80, TCP),
            8080,
        );
        assert_eq!(out.verdict, redirect(hook), "{hook:?}: masqueraded");
        assert_eq!(out.frame, want.build(), "{hook:?}: masqueraded");

        let from_pod = Spec::tcp(pod, 41001, CLUSTER_IP, 80);
        let out = fx.run_on(hook, &from_pod.build(), fx.pod_ifindex).unwrap();
        let want = Spec {
            daddr: backend_for(&remote(), pod, 41001, 80, TCP),
            dport: 8080,
            ..from_pod.clone()
        };
        assert_eq!(out.frame, want.build(), "{hook:?}: a pod is only DNATed");

        fx.maps_mut()
            .set_config(config(CONFIG_F_EXTERNAL_CLUSTER_IP_DROP))
            .unwrap();
        let before = fx.counter(Verdict::DropSourceRange);
        let out = fx
            .run_on(
                hook,
                &Spec::tcp(CLIENT, 41002, CLUSTER_IP, 80).build(),
                fx.nic_ifindex,
            )
            .unwrap();
        let drop = if hook == Hook::Tc {
            TC_ACT_SHOT
        } else {
            XDP_DROP
        };
        assert_eq!(out.verdict, drop, "{hook:?}: dropped");
        assert_eq!(fx.counter(Verdict::DropSourceRange), before + 1, "{hook:?}");
    }
}
