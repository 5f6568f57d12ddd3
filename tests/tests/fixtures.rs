//! Packet fixtures through BPF_PROG_TEST_RUN, for the TC and the XDP entry
//! points alike: a crafted frame in, the exact frame and verdict out.
//! Expected frames are built from scratch (checksums computed over whole
//! headers by `packet::checksum`), never by the datapath's incremental
//! arithmetic, so equal bytes prove the checksum updates right.

use std::net::Ipv4Addr;

use lb_common::{
    hash::{affinity_rehash, flow_hash},
    Verdict,
};
use lb_tests::{
    example::{yaml, Endpoint, Svc},
    fixture::*,
    packet::{checksum, decode, Spec, CLIENT_MAC, NODE_MAC, TCP, TCP_ACK, TCP_SYN},
    topology::NODE_IP,
};

const HOOKS: [Hook; 2] = [Hook::Tc, Hook::Xdp];
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);

fn backends() -> Vec<Ipv4Addr> {
    (11..=13).map(|i| Ipv4Addr::new(198, 18, 1, i)).collect()
}

/// `backends()` and a fourth that joins.
fn four_backends() -> Vec<Ipv4Addr> {
    (11..=14).map(|i| Ipv4Addr::new(198, 18, 1, i)).collect()
}

fn empty_svc() -> Svc {
    let mut svc = Svc {
        name: "empty",
        cluster_ip: EMPTY_IP,
        ..Svc::web(vec![])
    };
    svc.ports[0].node_port = None; // 30080 belongs to web
    svc
}

fn config(eps: &[Ipv4Addr]) -> String {
    yaml(&[
        Svc::web(eps.iter().map(|&ip| Endpoint::ready(ip)).collect()),
        empty_svc(),
    ])
}

fn fixture() -> Fixture {
    Fixture::new(&config(&backends())).expect("fixture")
}

/// The backend Maglev picks for a flow, computed from the userspace table
/// and the shared flow hash: what the datapath must agree with.
fn expected_backend(eps: &[Ipv4Addr], target: u16, sport: u16, dport: u16, proto: u8) -> Ipv4Addr {
    Maglev4::new(eps, target).lookup(flow_hash(
        &lb_common::addr::from_v4(CLIENT.octets()),
        sport,
        dport,
        proto,
    ))
}

fn pass_verdict(hook: Hook) -> u32 {
    if hook == Hook::Tc {
        TC_ACT_OK
    } else {
        XDP_PASS
    }
}

/// The packet passes, byte for byte as it came.
fn assert_untouched(fx: &Fixture, hook: Hook, frame: &[u8]) {
    let out = fx.run(hook, frame).unwrap();
    assert_eq!(
        out.verdict,
        pass_verdict(hook),
        "{hook:?} {} bytes",
        frame.len()
    );
    assert_eq!(out.frame, frame, "{hook:?} {} bytes", frame.len());
}

/// What one frame must come out as.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// To the Maglev backend's `target` port, passed on, checksums valid.
    Dnat { target: u16 },
    /// Passed byte for byte.
    Untouched,
    /// Bounced back to the client as ICMP port unreachable (arriving from
    /// a pod's veth).
    Refused,
}

/// One frame in, one frame and verdict out, and the counter it bumps.
struct Case {
    name: &'static str,
    input: Spec,
    want: Want,
    counted: Verdict,
}

/// Single-packet cases. Every flow has its own client port: each is a new
/// flow (and one client port towards two frontends of one backend is a
/// conflict, see fixtures_conntrack.rs).
fn single_packet_cases() -> Vec<Case> {
    let dnat = |name, input, target| Case {
        name,
        input,
        want: Want::Dnat { target },
        counted: Verdict::DnatNew,
    };
    let untouched = |name, input| Case {
        name,
        input,
        want: Want::Untouched,
        counted: Verdict::PassNotService,
    };
    let refused = |name, input| Case {
        name,
        input,
        want: Want::Refused,
        counted: Verdict::RejectNoBackend,
    };
    vec![
        dnat(
            "TCP to the ClusterIP",
            Spec::tcp(CLIENT, 40000, CLUSTER_IP, 80),
            8080,
        ),
        dnat(
            "TCP to the ClusterIP, 2nd client port",
            Spec::tcp(CLIENT, 40001, CLUSTER_IP, 80),
            8080,
        ),
        dnat(
            "TCP to the ClusterIP, 3rd client port",
            Spec::tcp(CLIENT, 51234, CLUSTER_IP, 80),
            8080,
        ),
        dnat(
            "TCP to the NodePort",
            Spec::tcp(CLIENT, 40100, NODE_IP, 30080),
            8080,
        ),
        dnat(
            "TCP to the NodePort, 2nd client port",
            Spec::tcp(CLIENT, 40101, NODE_IP, 30080),
            8080,
        ),
        dnat(
            "TCP to the NodePort, 3rd client port",
            Spec::tcp(CLIENT, 51334, NODE_IP, 30080),
            8080,
        ),
        dnat(
            "UDP to the ClusterIP",
            Spec::udp(CLIENT, 40200, CLUSTER_IP, 53),
            5353,
        ),
        dnat(
            "UDP without checksum (0 means none and stays 0)",
            Spec {
                udp_no_checksum: true,
                ..Spec::udp(CLIENT, 40201, CLUSTER_IP, 53)
            },
            5353,
        ),
        untouched(
            "another address",
            Spec::tcp(CLIENT, 40300, Ipv4Addr::new(198, 18, 1, 50), 80),
        ),
        untouched(
            "a service address on another port",
            Spec::tcp(CLIENT, 40301, CLUSTER_IP, 81),
        ),
        untouched(
            "UDP to a TCP NodePort",
            Spec::udp(CLIENT, 40302, NODE_IP, 30080),
        ),
        untouched(
            "a backend answering a flow we never translated",
            Spec::tcp(Ipv4Addr::new(198, 18, 1, 11), 8080, CLIENT, 40303),
        ),
        refused(
            "TCP to a service without endpoints",
            Spec::tcp(CLIENT, 40400, EMPTY_IP, 80),
        ),
        refused(
            "UDP to a service without endpoints",
            Spec::udp(CLIENT, 40401, EMPTY_IP, 53),
        ),
    ]
}

#[test]
fn single_packets_for_both_hooks() {
    for hook in HOOKS {
        let fx = fixture();
        for case in single_packet_cases() {
            let what = format!("{hook:?}: {}", case.name);
            let frame = case.input.build();
            let before = fx.counter(case.counted);
            let out = match case.want {
                Want::Refused => fx.run_on(hook, &frame, fx.pod_ifindex),
                _ => fx.run(hook, &frame),
            }
            .unwrap();
            match case.want {
                Want::Dnat { target } => {
                    let i = &case.input;
                    let backend = expected_backend(&backends(), target, i.sport, i.dport, i.proto);
                    let want = Spec {
                        daddr: backend,
                        dport: target,
                        ..case.input.clone()
                    }
                    .build();
                    assert_eq!(out.verdict, pass_verdict(hook), "{what}");
                    assert_eq!(out.frame, want, "{what}");
                    let d = decode(&out.frame);
                    assert!(d.ip_checksum_ok, "{what}: {d:?}");
                    if case.input.udp_no_checksum {
                        assert_eq!(d.l4_checksum, 0, "{what}");
                    } else {
                        assert!(d.l4_checksum_ok, "{what}: {d:?}");
                    }
                }
                Want::Untouched => {
                    assert_eq!(out.verdict, pass_verdict(hook), "{what}");
                    assert_eq!(out.frame, frame, "{what}");
                }
                Want::Refused => {
                    let bounce = if hook == Hook::Tc {
                        TC_ACT_REDIRECT
                    } else {
                        XDP_TX
                    };
                    assert_eq!(out.verdict, bounce, "{what}");
                    assert_eq!(out.frame, icmp_unreachable(&frame), "{what}");
                }
            }
            assert_eq!(
                fx.counter(case.counted),
                before + 1,
                "{what}: counted as {:?}",
                case.counted
            );
        }
    }
}

#[test]
fn established_flow_keeps_its_backend_when_the_table_changes() {
    for hook in HOOKS {
        let mut fx = fixture();
        // Find a flow whose Maglev choice changes when a fourth backend
        // joins; conntrack must keep it on its first backend.
        let more = four_backends();
        let sport = (40000..41000)
            .find(|&p| {
                expected_backend(&backends(), 8080, p, 80, TCP)
                    != expected_backend(&more, 8080, p, 80, TCP)
            })
            .expect("some flow moves");
        let first = expected_backend(&backends(), 8080, sport, 80, TCP);
        let syn = Spec::tcp(CLIENT, sport, CLUSTER_IP, 80);
        assert_eq!(
            decode(&fx.run(hook, &syn.build()).unwrap().frame).daddr,
            first
        );

        reprogram(&mut fx, &more);

        let ack = Spec {
            tcp_flags: TCP_ACK,
            ..syn.clone()
        };
        let out = fx.run(hook, &ack.build()).unwrap();
        assert_eq!(
            out.frame,
            Spec {
                daddr: first,
                dport: 8080,
                ..ack
            }
            .build(),
            "{hook:?}"
        );
        assert_eq!(fx.counter(Verdict::DnatEstablished), 1);
        // A new flow from another port does follow the new table.
        let other = Spec::tcp(CLIENT, sport + 1000, CLUSTER_IP, 80);
        let out = fx.run(hook, &other.build()).unwrap();
        assert_eq!(
            decode(&out.frame).daddr,
            expected_backend(&more, 8080, sport + 1000, 80, TCP)
        );
    }
}

/// Programs the web service with `eps` (and the empty one) on `fx`.
fn reprogram(fx: &mut Fixture, eps: &[Ipv4Addr]) {
    let objects = lb_userspace::source::manifest::parse(&config(eps)).unwrap();
    let node = lb_userspace::model::NodeConfig {
        name: "node-a".into(),
        node_ips: vec![NODE_IP.into()],
        service_proxy_name: None,
        ..Default::default()
    };
    let state = lb_userspace::model::build(&objects.services, &objects.slices, &node).state;
    assert!(fx.programmer.apply(&state).failed.is_empty());
}

/// An endpoint change rewrites the Maglev half no frontend reads, in place,
/// and flips the frontends to it (`lb_common::MaglevSlots`). A new flow
/// whose frontend entry names a half being rewritten (its generation
/// cleared) takes the other half; with neither readable it gets no backend
/// and is dropped: it never takes a slot of a half-written table.
#[test]
fn a_new_flow_never_uses_a_maglev_half_being_rewritten() {
    use aya::maps::{Array, Map};
    use lb_common::{FrontendKey, MaglevSlots, FRONTEND_VIEW_ALL, SERVICE_F_TABLE_B};
    for hook in HOOKS {
        let mut fx = fixture();
        let more = four_backends();
        let key = FrontendKey {
            addr: lb_common::addr::from_v4(CLUSTER_IP.octets()),
            port: 80,
            proto: TCP,
            view: FRONTEND_VIEW_ALL,
        };
        let entry = |fx: &Fixture| fx.maps().frontends.get(&key, 0).unwrap();
        let first = entry(&fx);
        assert_eq!(
            first.flags & SERVICE_F_TABLE_B,
            0,
            "a fresh table is read from half A"
        );

        reprogram(&mut fx, &more);
        let second = entry(&fx);
        assert_eq!(
            (
                second.id,
                second.table_size,
                second.flags & SERVICE_F_TABLE_B
            ),
            (first.id, first.table_size, SERVICE_F_TABLE_B),
            "same array, now read from half B"
        );
        // Flows whose backend differs between the old table (half A) and
        // the new one (half B), each used once: every packet is a new flow.
        let mut moved = (40000..50000u16).filter(|&p| {
            expected_backend(&backends(), 8080, p, 80, TCP)
                != expected_backend(&more, 8080, p, 80, TCP)
        });
        let send = |fx: &Fixture, sport: u16| {
            let out = fx
                .run(hook, &Spec::tcp(CLIENT, sport, CLUSTER_IP, 80).build())
                .unwrap();
            (out.verdict, decode(&out.frame).daddr)
        };
        for sport in moved.by_ref().take(4) {
            let want = expected_backend(&more, 8080, sport, 80, TCP);
            assert_eq!(send(&fx, sport).1, want, "{hook:?}: the new table");
        }

        let inner = fx
            .maps()
            .maglev
            .get(
                &lb_common::MaglevKey {
                    service_id: second.id,
                    table_size: second.table_size,
                },
                0,
            )
            .unwrap();
        let mut inner: Array<_, MaglevSlots> = Array::try_from(Map::Array(inner)).unwrap();
        let header = inner.get(&0, 0).unwrap();
        assert!(
            header[0] != 0 && header[1] != 0,
            "both halves complete: {header:?}"
        );

        // Half B being rewritten: new flows read half A, the old table.
        inner.set(0, [header[0], 0], 0).unwrap();
        for sport in moved.by_ref().take(4) {
            let want = expected_backend(&backends(), 8080, sport, 80, TCP);
            assert_eq!(send(&fx, sport).1, want, "{hook:?}: half B unreadable");
        }
        // Neither half readable: dropped, counted, not forwarded.
        inner.set(0, [0, 0], 0).unwrap();
        let dropped = fx.counter(Verdict::DropNoBackendEntry);
        let sport = moved.next().unwrap();
        let verdict = send(&fx, sport).0;
        assert_eq!(
            verdict,
            if hook == Hook::Tc {
                TC_ACT_SHOT
            } else {
                XDP_DROP
            }
        );
        assert_eq!(fx.counter(Verdict::DropNoBackendEntry), dropped + 1);
        // Half B complete again, with a new generation: read again.
        inner.set(0, [0, header[1] + 1], 0).unwrap();
        for sport in moved.by_ref().take(4) {
            let want = expected_backend(&more, 8080, sport, 80, TCP);
            assert_eq!(send(&fx, sport).1, want, "{hook:?}: half B back");
        }
    }
}

#[test]
fn reply_is_translated_back_to_the_frontend_and_routed() {
    for hook in HOOKS {
        for (daddr, dport) in [(CLUSTER_IP, 80u16), (NODE_IP, 30080)] {
            let fx = fixture();
            let syn = Spec::tcp(CLIENT, 40000, daddr, dport);
            fx.run(hook, &syn.build()).unwrap();
            let backend = expected_backend(&backends(), 8080, 40000, dport, TCP);
            let reply = Spec {
                src_mac: [0x02, 0, 0, 0, 0, 0x33],
                dst_mac: [0x02, 0, 0, 0, 0, 0x44],
                tcp_flags: TCP_SYN | TCP_ACK,
                ..Spec::tcp(backend, 8080, CLIENT, 40000)
            };
            let out = fx.run_on(hook, &reply.build(), fx.pod_ifindex).unwrap();
            // Source restored, TTL decremented (we forward it ourselves),
            // MACs from the FIB and the client's neighbour entry.
            let want = Spec {
                src_mac: NODE_MAC,
                dst_mac: CLIENT_MAC,
                saddr: daddr,
                sport: dport,
                ttl: 63,
                ..reply
            }
            .build();
            assert_eq!(out.frame, want, "{hook:?} via {daddr}:{dport}");
            let redirect = if hook == Hook::Tc {
                TC_ACT_REDIRECT
            } else {
                XDP_REDIRECT
            };
            assert_eq!(out.verdict, redirect, "{hook:?}");
            assert_eq!(fx.counter(Verdict::ReplyNat), 1);
        }
    }
}

/// ICMP port unreachable for `input`, built independently: from the
/// frontend to the client, quoting the IP header and 8 bytes.
fn icmp_unreachable(input: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&input[6..12]);
    f.extend_from_slice(&input[0..6]);
    f.extend_from_slice(&[0x08, 0x00]);
    let ip_start = f.len();
    f.extend_from_slice(&[0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0]);
    f.extend_from_slice(&input[14 + 16..14 + 20]); // from the address the client dialled
    f.extend_from_slice(&input[14 + 12..14 + 16]);
    let c = checksum(&f[ip_start..ip_start + 20]);
    f[ip_start + 10..ip_start + 12].copy_from_slice(&c.to_be_bytes());
    let icmp = f.len();
    f.extend_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&input[14..14 + 28]);
    let c = checksum(&f[icmp..]);
    f[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn non_ipv4_and_other_protocols_pass_untouched() {
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0; 20]);
    let mut ipv6 = Spec::tcp(CLIENT, 40000, CLUSTER_IP, 80).build();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    let mut icmp = Spec::tcp(CLIENT, 40000, CLUSTER_IP, 80).build();
    icmp[14 + 9] = 1;
    for hook in HOOKS {
        let fx = fixture();
        for frame in [&arp, &ipv6, &icmp] {
            assert_untouched(&fx, hook, frame);
        }
        assert_eq!(fx.counter(Verdict::PassNotIp), 1);
        // An IPv4 packet labelled IPv6: its version nibble is wrong.
        assert_eq!(fx.counter(Verdict::PassMalformed), 1);
        assert_eq!(fx.counter(Verdict::PassOtherProtocol), 1);
    }
}

#[test]
fn truncated_and_malformed_packets_are_never_translated() {
    let syn = Spec::tcp(CLIENT, 40000, CLUSTER_IP, 80).build();
    let udp = Spec::udp(CLIENT, 40000, CLUSTER_IP, 53).build();
    let mut cases: Vec<Vec<u8>> = Vec::new();
    // Cut inside the IP header, at the L4 header, inside the ports, and
    // just before the TCP checksum field.
    for len in [14, 20, 33, 34, 36, 38, 49, 51] {
        cases.push(syn[..len].to_vec());
    }
    cases.push(udp[..40].to_vec());
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44; // IHL 4 < 5
    cases.push(bad_ihl);
    let mut short_tot = syn.clone();
    short_tot[14 + 2..14 + 4].copy_from_slice(&30u16.to_be_bytes()); // shorter than IP+TCP headers
    cases.push(short_tot);
    let mut v6_in_v4 = syn.clone();
    v6_in_v4[14] = 0x65; // version 6 in an IPv4 frame
    cases.push(v6_in_v4);
    for hook in HOOKS {
        let fx = fixture();
        // The kernel's skb test run refuses IPv4 frames without a whole IP
        // header, so TC sees the shorter cases only in production; XDP
        // runs all of them through the same parser.
        let cases: Vec<&Vec<u8>> = cases
            .iter()
            .filter(|f| hook == Hook::Xdp || f.len() >= 34)
            .collect();
        for frame in &cases {
            let out = fx
                .run(hook, frame)
                .unwrap_or_else(|e| panic!("{hook:?} {} bytes: {e}", frame.len()));
            assert_eq!(
                out.verdict,
                pass_verdict(hook),
                "{hook:?} {} bytes",
                frame.len()
            );
            assert_eq!(&out.frame, *frame, "{hook:?} {} bytes", frame.len());
        }
        assert_eq!(
            fx.counter(Verdict::PassMalformed),
            cases.len() as u64,
            "{hook:?}"
        );
        assert_eq!(fx.counter(Verdict::DnatNew), 0);
    }
}

#[test]
fn later_fragments_without_their_first_pass_untouched() {
    for hook in HOOKS {
        let fx = fixture();
        for frag in [0x0010u16 /* offset 128 */, 0x2010, 0x0001] {
            let frame = Spec {
                frag,
                ..Spec::tcp(CLIENT, 40000, CLUSTER_IP, 80)
            }
            .build();
            assert_untouched(&fx, hook, &frame);
        }
        assert_eq!(fx.counter(Verdict::PassFragment), 3);
    }
}

#[test]
fn ip_options_are_kept_and_translated_correctly() {
    // Router alert (4 bytes) then NOP, NOP, NOP, EOL.
    let options = vec![0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00];
    for hook in HOOKS {
        let fx = fixture();
        let input = Spec {
            ip_options: options.clone(),
            ..Spec::tcp(CLIENT, 40000, CLUSTER_IP, 80)
        };
        let out = fx.run(hook, &input.build()).unwrap();
        let backend = expected_backend(&backends(), 8080, 40000, 80, TCP);
        assert_eq!(
            out.frame,
            Spec {
                daddr: backend,
                dport: 8080,
                ..input
            }
            .build(),
            "{hook:?}"
        );
        // A refusal cannot quote a header with options in its fixed-size
        // reply: dropped, never bounced malformed.
        let input = Spec {
            ip_options: options.clone(),
            ..Spec::tcp(CLIENT, 40000, EMPTY_IP, 80)
        };
        let out = fx.run(hook, &input.build()).unwrap();
        let drop = if hook == Hook::Tc {
            TC_ACT_SHOT
        } else {
            XDP_DROP
        };
        assert_eq!(out.verdict, drop, "{hook:?}");
        assert_eq!(fx.counter(Verdict::DropRejectFailed), 1);
    }
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend() {
    let mut svc = Svc::web(backends().into_iter().map(Endpoint::ready).collect());
    svc.affinity_timeout_s = Some(300);
    for hook in HOOKS {
        let fx = Fixture::new(&yaml(&[svc.clone()])).unwrap();
        let first = decode(
            &fx.run(hook, &Spec::tcp(CLIENT, 40000, CLUSTER_IP, 80).build())
                .unwrap()
                .frame,
        )
        .daddr;
        for sport in 40001..40040 {
            let out = fx
                .run(hook, &Spec::tcp(CLIENT, sport, CLUSTER_IP, 80).build())
                .unwrap();
            assert_eq!(decode(&out.frame).daddr, first, "{hook:?} sport {sport}");
        }
        assert_eq!(fx.counter(Verdict::DnatAffinity), 39);
        // Another client is balanced on its own.
        let other = Ipv4Addr::new(198, 18, 0, 77);
        let out = fx
            .run(hook, &Spec::tcp(other, 40000, CLUSTER_IP, 80).build())
            .unwrap();
        assert_eq!(decode(&out.frame).saddr, other);
    }
}

/// kube-proxy's rule for traffic policy Local with no endpoint on this
/// node: drop when the Service has endpoints elsewhere (a load balancer's
/// health check steers clients to them), refuse when it has none at all.
#[test]
fn traffic_policy_local_drops_without_a_local_endpoint_and_refuses_without_any() {
    let local = |eps: Vec<Endpoint>| {
        let mut svc = Svc::web(eps);
        svc.extra.external_traffic_policy = Some("Local");
        svc
    };
    let elsewhere = local(
        backends()
            .into_iter()
            .map(|ip| Endpoint::ready(ip).on("node-b"))
            .collect(),
    );
    for hook in HOOKS {
        let frame = Spec::tcp(CLIENT, 40000, NODE_IP, 30080).build();
        let fx = Fixture::new(&yaml(&[elsewhere.clone()])).unwrap();
        let out = fx.run_on(hook, &frame, fx.pod_ifindex).unwrap();
        let drop = if hook == Hook::Tc {
            TC_ACT_SHOT
        } else {
            XDP_DROP
        };
        assert_eq!(out.verdict, drop, "{hook:?}: endpoints elsewhere");
        assert_eq!(fx.counter(Verdict::DropNoLocalBackend), 1, "{hook:?}");

        let fx = Fixture::new(&yaml(&[local(vec![])])).unwrap();
        let out = fx.run_on(hook, &frame, fx.pod_ifindex).unwrap();
        let bounce = if hook == Hook::Tc {
            TC_ACT_REDIRECT
        } else {
            XDP_TX
        };
        assert_eq!(out.verdict, bounce, "{hook:?}: no endpoint anywhere");
        assert_eq!(out.frame, icmp_unreachable(&frame), "{hook:?}");
        assert_eq!(fx.counter(Verdict::RejectNoBackend), 1, "{hook:?}");
    }
}

/// externalTrafficPolicy Local is for clients outside the cluster. A pod
/// (a source in `lb_cluster_cidrs`: `--cluster-cidr`, the Node's podCIDRs)
/// reaching the NodePort of such a Service whose endpoints all run on
/// other nodes gets one of them, its own address kept, as through
/// kube-proxy's short-circuit rules; a client outside is dropped, and so
/// is the pod once its range is no longer listed.
#[test]
fn traffic_policy_local_is_for_outside_clients_pods_get_every_endpoint() {
    let mut svc = Svc::web(
        backends()
            .into_iter()
            .map(|ip| Endpoint::ready(ip).on("node-b"))
            .collect(),
    );
    svc.extra.external_traffic_policy = Some("Local");
    let outside = Ipv4Addr::new(198, 18, 9, 9);
    let pods: lb_userspace::model::Prefix = format!("{CLIENT}/32").parse().unwrap();
    for hook in HOOKS {
        let drop = if hook == Hook::Tc {
            TC_ACT_SHOT
        } else {
            XDP_DROP
        };
        let mut fx = Fixture::new(&yaml(&[svc.clone()])).unwrap();
        fx.maps_mut().set_cluster_cidrs(&[pods]).unwrap();
        let out = fx
            .run(hook, &Spec::tcp(outside, 40000, NODE_IP, 30080).build())
            .unwrap();
        assert_eq!(out.verdict, drop, "{hook:?}: a client outside");
        assert_eq!(fx.counter(Verdict::DropNoLocalBackend), 1, "{hook:?}");

        let input = Spec::tcp(CLIENT, 40001, NODE_IP, 30080);
        let out = fx.run(hook, &input.build()).unwrap();
        let backend = expected_backend(&backends(), 8080, 40001, 30080, TCP);
        let want = Spec {
            daddr: backend,
            dport: 8080,
            ..input.clone()
        }
        .build();
        assert_eq!(out.verdict, pass_verdict(hook), "{hook:?}: a pod");
        assert_eq!(
            out.frame, want,
            "{hook:?}: DNAT only, the pod's address kept"
        );
        assert_eq!(fx.counter(Verdict::DnatNew), 1, "{hook:?}");

        fx.maps_mut().set_cluster_cidrs(&[]).unwrap();
        let out = fx
            .run(hook, &Spec::tcp(CLIENT, 40002, NODE_IP, 30080).build())
            .unwrap();
        assert_eq!(out.verdict, drop, "{hook:?}: its range no longer listed");
        assert_eq!(fx.counter(Verdict::DropNoLocalBackend), 2, "{hook:?}");
    }
}

/// The client's affinity entries (one per service it reached), opened on
/// the fixture's pinned map.
fn affinity_map(
    fx: &Fixture,
) -> aya::maps::HashMap<aya::maps::MapData, lb_common::AffinityKey, lb_common::AffinityEntry> {
    let data =
        aya::maps::MapData::from_pin(fx.pin_dir().join(lb_common::map_names::AFFINITY)).unwrap();
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).unwrap()
}

#[test]
fn session_affinity_expires_after_its_timeout_to_a_fresh_choice() {
    let mut svc = Svc::web(backends().into_iter().map(Endpoint::ready).collect());
    svc.affinity_timeout_s = Some(1);
    let own_hash = flow_hash(&lb_common::addr::from_v4(CLIENT.octets()), 0, 80, TCP);
    let table = Maglev4::new(&backends(), 8080);
    // Entries last used at these (long past) moments have expired; each
    // expiry gives its own fresh choice, and they are not all the first one.
    let expiries: [u64; 6] = [1, 2, 3, 5, 8, 13];
    let fresh: Vec<Ipv4Addr> = expiries
        .iter()
        .map(|&l| table.lookup(affinity_rehash(own_hash, l)))
        .collect();
    let first = table.lookup(own_hash);
    assert!(
        fresh.iter().any(|&b| b != first),
        "the chosen expiry times must show a fresh choice: {fresh:?}"
    );
    for hook in HOOKS {
        let fx = Fixture::new(&yaml(&[svc.clone()])).unwrap();
        let out = fx
            .run(hook, &Spec::tcp(CLIENT, 40000, CLUSTER_IP, 80).build())
            .unwrap();
        assert_eq!(
            decode(&out.frame).daddr,
            first,
            "{hook:?}: the client's own choice"
        );
        fx.run(hook, &Spec::tcp(CLIENT, 40001, CLUSTER_IP, 80).build())
            .unwrap();
        assert_eq!(
            fx.counter(Verdict::DnatAffinity),
            1,
            "{hook:?}: within the timeout"
        );
        let mut map = affinity_map(&fx);
        for (i, (&last_used, &want)) in expiries.iter().zip(&fresh).enumerate() {
            let (key, mut entry) = map.iter().next().unwrap().unwrap();
            entry.last_used_ns = last_used;
            map.insert(key, entry, 0).unwrap();
            let sport = 40100 + i as u16;
            let out = fx
                .run(hook, &Spec::tcp(CLIENT, sport, CLUSTER_IP, 80).build())
                .unwrap();
            assert_eq!(
                decode(&out.frame).daddr,
                want,
                "{hook:?}: expired at {last_used} ns"
            );
        }
        assert_eq!(
            fx.counter(Verdict::DnatAffinity),
            1,
            "{hook:?}: expired entries are not used"
        );
        // The fresh choice is the client's affinity from now on.
        let out = fx
            .run(hook, &Spec::tcp(CLIENT, 40200, CLUSTER_IP, 80).build())
            .unwrap();
        assert_eq!(decode(&out.frame).daddr, *fresh.last().unwrap(), "{hook:?}");
        assert_eq!(fx.counter(Verdict::DnatAffinity), 2, "{hook:?}");
    }
}

/// Offset and size of the ELF64 section called `name`.
fn elf_section(elf: &[u8], name: &str) -> (usize, usize) {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(header(shstrndx) + 0x18);
    (0..shnum)
        .map(header)
        .find(|&h| {
            let n = strtab + u32_at(h);
            elf[n..].starts_with(name.as_bytes()) && elf[n + name.len()] == 0
        })
        .map(|h| (u64_at(h + 0x18), u64_at(h + 0x20)))
        .unwrap_or_else(|| panic!("no section {name}"))
}

#[test]
fn a_program_the_kernel_refuses_is_reported_with_the_verifier_log() {
    lb_tests::require_root();
    let path = std::env::var("LB_EBPF_OBJECT").unwrap_or_else(|_| {
        format!(
            "{}/../target/bpfel-unknown-none/release/lb-ebpf",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let mut object = std::fs::read(&path).expect("the eBPF object (cargo xtask build-ebpf)");
    // First instruction of the XDP program becomes `r0 = *(u64 *)(r10 + 8)`:
    // a read above the stack frame, which the verifier must refuse.
    let (off, size) = elf_section(&object, "xdp");
    assert!(size >= 8);
    object[off..off + 8].copy_from_slice(&[0x79, 0xa0, 0x08, 0x00, 0, 0, 0, 0]);
    let pin_dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        lb_tests::netns::unique("lbverif")
    ));
    lb_userspace::system::ensure_bpffs(&pin_dir).unwrap();
    std::fs::create_dir_all(&pin_dir).unwrap();
    let err = match lb_userspace::kernel::datapath::Datapath::load_object(
        &object,
        &pin_dir,
        &Default::default(),
    ) {
        Ok(_) => panic!("the damaged program loaded"),
        Err(e) => e.to_string(),
    };
    lb_userspace::kernel::pins::remove_all(&pin_dir).unwrap();
    eprintln!("{err}");
    assert!(err.contains("the kernel refused program lb_xdp"), "{err}");
    assert!(err.contains("last lines of the verifier log"), "{err}");
    assert!(
        err.to_lowercase().contains("stack"),
        "the verifier's reason is shown: {err}"
    );
}

/// `lb check` on this kernel: every feature present, every program loaded
/// (nothing attached, its throw-away pins gone after), and each one far
/// below the verifier's 1,000,000-instruction limit. Older kernels prune
/// fewer paths (on Debian's 6.1 this object costs up to 1.4 times what it
/// costs on 6.18; before the SNAT port search became a stage of its own,
/// lb_xdp cost 867,000 on 6.18), so a change that walks the verifier near the
/// limit here would be refused on some node: this fails first. The bound
/// is a quarter of the limit. (`cargo xtask test-kernels` runs it on 6.1.)
#[test]
fn lb_check_loads_every_program_far_below_the_verifiers_limit() {
    lb_tests::require_root();
    const BOUND: u64 = 250_000;
    let out = std::process::Command::new(lb_tests::agent::lb_bin())
        .arg("check")
        .output()
        .expect("running lb check");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "lb check failed on this kernel");
    assert!(text.contains("lb can run on this kernel"), "{text}");
    assert!(!text.contains("  NO  "), "a feature is missing: {text}");
    let programs: Vec<(&str, u64)> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next().filter(|n| n.starts_with("lb_"))?;
            Some((name, w.next()?.parse().ok()?))
        })
        .collect();
    let names: Vec<&str> = programs.iter().map(|(n, _)| *n).collect();
    for p in [
        lb_common::program_names::TC,
        lb_common::program_names::TC_EGRESS,
        lb_common::program_names::XDP,
    ]
    .iter()
    .chain(lb_common::program_names::SOCK_ALL.iter())
    {
        assert!(names.contains(p), "{p} not reported: {text}");
    }
    for (name, insns) in &programs {
        assert!(
            *insns > 0 && *insns < BOUND,
            "{name}: the verifier walked {insns} instructions (bound {BOUND})"
        );
    }
    let left: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("lb-check-"))
        .collect();
    assert!(left.is_empty(), "lb check left {left:?} behind");
}
