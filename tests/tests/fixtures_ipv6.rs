//! The IPv6 datapath through BPF_PROG_TEST_RUN, TC and XDP, programmed by
//! the real planner from dual-stack Services: exact frames out for DNAT,
//! the reply, SNAT and its reverse, the refusal, ICMPv6 errors, extension
//! headers and fragments; and the Service semantics the IPv4 fixtures
//! prove, over IPv6: session affinity, source ranges, traffic policy
//! Local, the terminating fallback and the conntrack tables under a flood.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    addr::{self, Addr},
    hash::flow_hash,
    Verdict, SNAT_PORT_MAX, SNAT_PORT_MIN,
};
use lb_tests::{
    example::{yaml, Endpoint, Svc},
    fixture::*,
    packet::{
        decode6, fragments6, l4_checksum6, Spec6, CLIENT_MAC, NODE_MAC, TCP, TCP_ACK, TCP_SYN, UDP,
    },
    topology::NODE_IP6,
};

const HOOKS: [Hook; 2] = [Hook::Tc, Hook::Xdp];
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);

/// The web Service's local pods, IPv6: fd00:18:0:1::b to ::d.
fn backends() -> Vec<Ipv6Addr> {
    (11..=13)
        .map(|i| v6_of(Ipv4Addr::new(198, 18, 1, i)))
        .collect()
}

/// Pods on another node (routed via the client's address).
fn remote() -> Vec<Ipv6Addr> {
    (11..=12)
        .map(|i| v6_of(Ipv4Addr::new(198, 18, 2, i)))
        .collect()
}

fn a6(ip: Ipv6Addr) -> Addr {
    addr::from_ip(ip.into())
}

/// The example web Service made dual-stack (ClusterIPs 198.19.0.10 and
/// fd00:19::10), with IPv4 pods 198.18.1.11-13 and `eps6` as its IPv6
/// endpoints.
fn web(eps6: Vec<Endpoint>) -> Svc {
    let mut eps: Vec<Endpoint> = (11..=13)
        .map(|i| Endpoint::ready(Ipv4Addr::new(198, 18, 1, i)))
        .collect();
    eps.extend(eps6);
    let mut svc = Svc::web(eps);
    svc.extra.cluster_ip6 = Some(CLUSTER_IP6);
    svc
}

fn ready(ips: Vec<Ipv6Addr>) -> Vec<Endpoint> {
    ips.into_iter().map(Endpoint::ready).collect()
}

/// Ready endpoints on another node.
fn on_node_b(ips: Vec<Ipv6Addr>) -> Vec<Endpoint> {
    ips.into_iter()
        .map(|ip| Endpoint::ready(ip).on("node-b"))
        .collect()
}

/// The dual-stack web Service on `backends()`; `empty`: no IPv6 endpoint.
fn fixture(empty: bool) -> Fixture {
    let eps6 = if empty { vec![] } else { ready(backends()) };
    Fixture::new(&yaml(&[web(eps6)])).expect("fixture")
}

/// The backend Maglev gives `client`'s flow among `eps` (each on port
/// `target`): the userspace table and the shared hash.
fn maglev(
    eps: &[Ipv6Addr],
    target: u16,
    client: Ipv6Addr,
    sport: u16,
    dport: u16,
    proto: u8,
) -> Ipv6Addr {
    let eps: Vec<IpAddr> = eps.iter().map(|&ip| ip.into()).collect();
    match Maglev::new(&eps, target).lookup(flow_hash(&a6(client), sport, dport, proto)) {
        IpAddr::V6(ip) => ip,
        ip => panic!("{ip} in an IPv6 table"),
    }
}

/// The backend of `CLIENT6`'s flow to the web Service's port (80/TCP or
/// 53/UDP).
fn expected_backend(sport: u16, proto: u8) -> Ipv6Addr {
    let (dport, target) = if proto == TCP { (80, 8080) } else { (53, 5353) };
    maglev(&backends(), target, CLIENT6, sport, dport, proto)
}

#[test]
fn ipv6_clusterip_flows_are_translated_to_the_maglev_backend_and_back() {
    for hook in HOOKS {
        for (proto, sport, port, target) in [(TCP, 40000u16, 80, 8080), (UDP, 40001, 53, 5353)] {
            let fx = fixture(false);
            let build = if proto == TCP { Spec6::tcp } else { Spec6::udp };
            let input = build(CLIENT6, sport, CLUSTER_IP6, port).build();
            let out = fx.run(hook, &input).unwrap();
            let backend = expected_backend(sport, proto);
            let want = build(CLIENT6, sport, backend, target).build();
            assert_eq!(out.verdict, hook.verdict_pass(), "{hook:?} {proto}");
            assert_eq!(out.frame, want, "{hook:?} {proto}: DNAT to {backend}");
            assert_eq!(fx.counter(Verdict::DnatNew), 1, "{hook:?} {proto}");

            // The backend's reply comes back from the frontend, routed
            // by the datapath (the hop limit one lower).
            let mut reply = build(backend, target, CLIENT6, sport);
            reply.src_mac = NODE_MAC;
            reply.dst_mac = CLIENT_MAC;
            reply.tcp_flags = 0x12; // SYN-ACK
            let out = fx.run_on(hook, &reply.build(), fx.pod_ifindex).unwrap();
            let mut want = build(CLUSTER_IP6, port, CLIENT6, sport);
            want.src_mac = NODE_MAC;
            want.dst_mac = CLIENT_MAC;
            want.tcp_flags = 0x12;
            want.hop_limit = 63;
            assert_eq!(
                out.verdict,
                hook.verdict_redirect(),
                "{hook:?} {proto}: reply"
            );
            assert_eq!(out.frame, want.build(), "{hook:?} {proto}: reply");
            assert_eq!(fx.counter(Verdict::ReplyNat), 1, "{hook:?} {proto}");
        }
    }
}

#[test]
fn ipv6_frontend_without_backends_answers_icmpv6_port_unreachable() {
    for hook in HOOKS {
        let fx = fixture(true);
        let input = Spec6::tcp(CLIENT6, 40002, CLUSTER_IP6, 80).build();
        let out = fx.run_on(hook, &input, fx.pod_ifindex).unwrap();
        assert_eq!(fx.counter(Verdict::RejectNoBackend), 1, "{hook:?}");
        let f = &out.frame;
        assert_eq!(f.len(), 110, "{hook:?}: {f:02x?}");
        // Back to the client, from the frontend it asked for.
        assert_eq!(f[0..6], CLIENT_MAC);
        assert_eq!(f[6..12], NODE_MAC);
        assert_eq!(f[12..14], [0x86, 0xdd]);
        assert_eq!(f[14..18], [0x60, 0, 0, 0]);
        assert_eq!(u16::from_be_bytes([f[18], f[19]]), 56);
        assert_eq!(f[20], 58, "next header ICMPv6");
        assert_eq!(f[22..38], CLUSTER_IP6.octets());
        assert_eq!(f[38..54], CLIENT6.octets());
        // Destination unreachable, port unreachable, quoting the packet.
        assert_eq!(f[54..56], [1, 4]);
        assert_eq!(f[58..62], [0; 4]);
        assert_eq!(f[62..110], input[14..62]);
        let c = l4_checksum6(&f[14..]);
        assert_eq!(
            u16::from_be_bytes([f[56], f[57]]),
            c,
            "{hook:?}: ICMPv6 checksum"
        );
    }
}

#[test]
fn ipv6_packets_with_ipv4_mapped_addresses_never_meet_ipv4_frontends() {
    for hook in HOOKS {
        let fx = fixture(false);
        let mapped = CLUSTER_IP.to_ipv6_mapped();
        let input = Spec6::tcp(CLIENT6, 40003, mapped, 80).build();
        let out = fx.run(hook, &input).unwrap();
        assert_eq!(out.verdict, hook.verdict_pass());
        assert_eq!(out.frame, input, "{hook:?}: untouched");
        assert_eq!(fx.counter(Verdict::PassMalformed), 1, "{hook:?}");
    }
}

/// An ICMPv6 error from `src` to `dst` quoting `quoted` (an IPv6 packet,
/// from its header on), built from scratch.
fn icmp6_error(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    kind: [u8; 2],
    word: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let len = 8 + quoted.len();
    let mut f = Vec::new();
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(len as u16).to_be_bytes());
    f.extend_from_slice(&[58, hop_limit]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&kind);
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&word.to_be_bytes());
    f.extend_from_slice(quoted);
    let c = l4_checksum6(&f[14..]);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn icmpv6_packet_too_big_about_a_translated_flow_reaches_the_client_translated_back() {
    const ROUTER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x99);
    for hook in HOOKS {
        let fx = fixture(false);
        let sport = 40010;
        let syn = Spec6::tcp(CLIENT6, sport, CLUSTER_IP6, 80);
        let out = fx.run(hook, &syn.build()).unwrap();
        let backend = expected_backend(sport, TCP);
        assert_eq!(out.frame, Spec6::tcp(CLIENT6, sport, backend, 8080).build());
        // A router towards the backend cannot forward the (translated)
        // packet: packet too big, MTU 1280, quoting it as it was sent.
        let mut sent = Spec6::tcp(CLIENT6, sport, backend, 8080);
        sent.payload = vec![0xab; 64];
        let mut asked = Spec6::tcp(CLIENT6, sport, CLUSTER_IP6, 80);
        asked.payload = vec![0xab; 64];
        let input = icmp6_error(ROUTER, CLIENT6, 64, [2, 0], 1280, &sent.build()[14..]);
        let out = fx.run_on(hook, &input, fx.nic_ifindex).unwrap();
        // The client learns the MTU for the flow it knows: to the frontend
        // (routed on to it by the datapath, the hop limit one lower).
        let want = icmp6_error(ROUTER, CLIENT6, 63, [2, 0], 1280, &asked.build()[14..]);
        assert_eq!(out.frame, want, "{hook:?}");
        assert_eq!(fx.counter(Verdict::IcmpErrorNat), 1, "{hook:?}");
    }
}

/// `frame` (an IPv6 TCP/UDP frame without extension headers) with
/// `headers` (next header, total length in 8-byte units minus one, ...)
/// inserted after the IPv6 header: each is `len` bytes of padding options.
fn with_ext_headers(frame: &[u8], kinds: &[u8]) -> Vec<u8> {
    let proto = frame[20];
    let mut ext = Vec::new();
    for (i, _) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(proto);
        // 8 bytes: next header, length 0, then a PadN option of 4 bytes.
        ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    let mut f = frame[..54].to_vec();
    f[20] = kinds[0];
    let len = u16::from_be_bytes([f[18], f[19]]) as usize + ext.len();
    f[18..20].copy_from_slice(&(len as u16).to_be_bytes());
    f.extend_from_slice(&ext);
    f.extend_from_slice(&frame[54..]);
    f
}

#[test]
fn ipv6_extension_headers_are_walked_within_a_bound() {
    const DEST_OPTS: u8 = 60;
    const HOP_BY_HOP: u8 = 0;
    for hook in HOOKS {
        let fx = fixture(false);
        let sport = 40020;
        let backend = expected_backend(sport, TCP);
        // Hop-by-hop then destination options: translated, the headers
        // kept as they were.
        let plain = Spec6::tcp(CLIENT6, sport, CLUSTER_IP6, 80).build();
        let input = with_ext_headers(&plain, &[HOP_BY_HOP, DEST_OPTS]);
        let out = fx.run(hook, &input).unwrap();
        let want = with_ext_headers(
            &Spec6::tcp(CLIENT6, sport, backend, 8080).build(),
            &[HOP_BY_HOP, DEST_OPTS],
        );
        assert_eq!(out.frame, want, "{hook:?}: two extension headers");
        // Five: more than the datapath walks, passed untouched.
        let five = with_ext_headers(&plain, &[DEST_OPTS; 5]);
        let out = fx.run(hook, &five).unwrap();
        assert_eq!(out.verdict, hook.verdict_pass());
        assert_eq!(out.frame, five, "{hook:?}: five extension headers");
        assert_eq!(fx.counter(Verdict::PassOtherProtocol), 1, "{hook:?}");
    }
}

/// `p` as the node sends it on after translating its source to the node
/// (`sport`) and its destination to `daddr:dport`: routed by the datapath,
/// out of the NIC with the node's MAC and the hop limit one lower.
fn routed_from_node(p: &Spec6, sport: u16, daddr: Ipv6Addr, dport: u16) -> Spec6 {
    Spec6 {
        src_mac: NODE_MAC,
        dst_mac: CLIENT_MAC,
        saddr: NODE_IP6,
        sport,
        daddr,
        dport,
        hop_limit: p.hop_limit - 1,
        ..p.clone()
    }
}

#[test]
fn ipv6_node_port_to_a_remote_backend_is_snatted_and_the_reply_reversed() {
    let svc = web(on_node_b(remote()));
    for hook in HOOKS {
        let fx = Fixture::new(&yaml(&[svc.clone()])).unwrap();
        let syn = Spec6::tcp(CLIENT6, 40000, NODE_IP6, 30080);
        let backend = maglev(&remote(), 8080, CLIENT6, 40000, 30080, TCP);
        let out = fx.run_on(hook, &syn.build(), fx.nic_ifindex).unwrap();
        assert_eq!(out.verdict, hook.verdict_redirect(), "{hook:?}");
        let port = decode6(&out.frame).sport;
        assert!(
            (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port),
            "SNAT port {port}"
        );
        // Source: the node's IPv6 address and a SNAT port; destination:
        // the backend; routed by us towards node B.
        assert_eq!(
            out.frame,
            routed_from_node(&syn, port, backend, 8080).build(),
            "{hook:?}"
        );
        let ack = Spec6 {
            tcp_flags: TCP_ACK,
            ..syn.clone()
        };
        let out = fx.run_on(hook, &ack.build(), fx.nic_ifindex).unwrap();
        assert_eq!(
            out.frame,
            routed_from_node(&ack, port, backend, 8080).build(),
            "{hook:?} ACK"
        );
        assert_eq!(fx.counter(Verdict::DnatNew), 1);
        assert_eq!(fx.counter(Verdict::DnatEstablished), 1);

        let reply = Spec6 {
            tcp_flags: TCP_SYN | TCP_ACK,
            ..Spec6::tcp(backend, 8080, NODE_IP6, port)
        };
        let out = fx.run_on(hook, &reply.build(), fx.nic_ifindex).unwrap();
        assert_eq!(out.verdict, hook.verdict_redirect(), "{hook:?}");
        let want = routed_from_node(&reply, 30080, CLIENT6, 40000);
        assert_eq!(out.frame, want.build(), "{hook:?} reply");
        assert_eq!(fx.counter(Verdict::ReplyNat), 1);
    }
}

#[test]
fn ipv6_session_affinity_keeps_a_client_on_one_backend() {
    let mut svc = web(ready(backends()));
    svc.affinity_timeout_s = Some(300);
    for hook in HOOKS {
        let fx = Fixture::new(&yaml(&[svc.clone()])).unwrap();
        let to = |client, sport| {
            let out = fx.run(hook, &Spec6::tcp(client, sport, CLUSTER_IP6, 80).build());
            decode6(&out.unwrap().frame).daddr
        };
        let first = to(CLIENT6, 40000);
        // Sources ports that Maglev alone spreads over every backend.
        let spread: std::collections::BTreeSet<Ipv6Addr> = (40001..40040)
            .map(|sport| expected_backend(sport, TCP))
            .collect();
        assert_eq!(spread.len(), 3);
        for sport in 40001..40040 {
            assert_eq!(to(CLIENT6, sport), first, "{hook:?} sport {sport}");
        }
        assert_eq!(fx.counter(Verdict::DnatAffinity), 39);
        // Another client is balanced on its own.
        let other = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x77);
        let before = fx.counter(Verdict::DnatNew);
        assert!(backends().contains(&to(other, 40000)), "{hook:?}");
        assert_eq!(fx.counter(Verdict::DnatNew), before + 1, "{hook:?}");
    }
}

#[test]
fn ipv6_load_balancer_source_ranges_admit_only_their_clients() {
    let lb_ip = Ipv6Addr::new(0xfd00, 0x18, 0, 9, 0, 0, 0, 1);
    let mut svc = web(ready(backends()));
    svc.extra.type_ = Some("LoadBalancer");
    svc.extra.lb_ingress = vec![lb_ip.into()];
    svc.extra.source_ranges = vec!["198.18.0.0/24", "fd00:18::1/128"];
    let outsider = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 5);
    for hook in HOOKS {
        let fx = Fixture::new(&yaml(&[svc.clone()])).unwrap();
        let input = Spec6::tcp(CLIENT6, 40000, lb_ip, 80);
        let out = fx.run_on(hook, &input.build(), fx.nic_ifindex).unwrap();
        let backend = expected_backend(40000, TCP);
        assert_eq!(
            decode6(&out.frame).daddr,
            backend,
            "{hook:?}: an admitted client"
        );
        assert_eq!(decode6(&out.frame).saddr, CLIENT6, "{hook:?}");

        let input = Spec6::tcp(outsider, 40000, lb_ip, 80);
        let out = fx.run_on(hook, &input.build(), fx.nic_ifindex).unwrap();
        assert_eq!(
            out.verdict,
            hook.verdict_drop(),
            "{hook:?}: outside the ranges"
        );
        assert_eq!(fx.counter(Verdict::DropSourceRange), 1, "{hook:?}");
        // The ranges are the load-balancer address's alone: the ClusterIP
        // still serves that client.
        let input = Spec6::tcp(outsider, 40001, CLUSTER_IP6, 80);
        let out = fx.run(hook, &input.build()).unwrap();
        let backend = maglev(&backends(), 8080, outsider, 40001, 80, TCP);
        assert_eq!(
            decode6(&out.frame).daddr,
            backend,
            "{hook:?}: its ClusterIP"
        );
    }
}

/// kube-proxy's rule for traffic policy Local, over IPv6: endpoints only
/// elsewhere, dropped; a local endpoint, chosen with the client's address
/// kept.
#[test]
fn ipv6_traffic_policy_local_keeps_the_client_address_or_drops() {
    let local = |eps: Vec<Endpoint>| {
        let mut svc = web(eps);
        svc.extra.external_traffic_policy = Some("Local");
        svc
    };
    let elsewhere = local(on_node_b(remote()));
    let frame = Spec6::tcp(CLIENT6, 40000, NODE_IP6, 30080);
    for hook in HOOKS {
        let fx = Fixture::new(&yaml(&[elsewhere.clone()])).unwrap();
        let out = fx.run_on(hook, &frame.build(), fx.nic_ifindex).unwrap();
        assert_eq!(
            out.verdict,
            hook.verdict_drop(),
            "{hook:?}: endpoints elsewhere"
        );
        assert_eq!(fx.counter(Verdict::DropNoLocalBackend), 1, "{hook:?}");

        let fx = Fixture::new(&yaml(&[local(ready(backends()))])).unwrap();
        let out = fx.run_on(hook, &frame.build(), fx.nic_ifindex).unwrap();
        let backend = maglev(&backends(), 8080, CLIENT6, 40000, 30080, TCP);
        let got = decode6(&out.frame);
        assert_eq!(
            (got.saddr, got.sport),
            (CLIENT6, 40000),
            "{hook:?}: no SNAT"
        );
        assert_eq!((got.daddr, got.dport), (backend, 8080), "{hook:?}");
        assert!(got.l4_checksum_ok, "{hook:?}");
    }
}

/// With no ready endpoint left, new flows go to the serving terminating
/// ones (KEP-1669), over IPv6 as over IPv4.
#[test]
fn ipv6_terminating_endpoints_take_new_flows_when_none_is_ready() {
    let going = backends()[..2].to_vec();
    let eps6 = going.iter().map(|&ip| Endpoint::terminating(ip)).collect();
    let svc = web(eps6);
    for hook in HOOKS {
        let fx = Fixture::new(&yaml(&[svc.clone()])).unwrap();
        for sport in 40000..40016 {
            let input = Spec6::tcp(CLIENT6, sport, CLUSTER_IP6, 80);
            let out = fx.run(hook, &input.build()).unwrap();
            let backend = maglev(&going, 8080, CLIENT6, sport, 80, TCP);
            let want = Spec6::tcp(CLIENT6, sport, backend, 8080).build();
            assert_eq!(out.frame, want, "{hook:?} sport {sport}");
        }
        assert_eq!(fx.counter(Verdict::DnatNew), 16, "{hook:?}");
    }
}

/// A flood of IPv6 SYNs and UDP flows from spoofed sources, 4x the size
/// of the handshake and UDP tables each, evicts no established IPv6 flow.
#[test]
fn ipv6_floods_evict_no_established_flow() {
    for hook in HOOKS {
        let fx = fixture(false);
        let run = |s: Spec6| fx.run(hook, &s.build()).unwrap();
        let est: Vec<u16> = (50_000..50_023).collect();
        let reply = |sport: u16, flags: u8| Spec6 {
            src_mac: NODE_MAC,
            dst_mac: CLIENT_MAC,
            tcp_flags: flags,
            ..Spec6::tcp(expected_backend(sport, TCP), 8080, CLIENT6, sport)
        };
        for &sport in &est {
            run(Spec6::tcp(CLIENT6, sport, CLUSTER_IP6, 80));
            run(reply(sport, TCP_SYN | TCP_ACK));
        }
        let spoofed =
            |i: u32| Ipv6Addr::new(0xfd00, 0x18, 0, 0x100, 0, 0, (i >> 16) as u16, i as u16);
        for i in 0..4 * FIXTURE_CT_SIZES.syn {
            run(Spec6::tcp(
                spoofed(i),
                1024 + (i % 60000) as u16,
                CLUSTER_IP6,
                80,
            ));
        }
        for i in 0..4 * FIXTURE_CT_SIZES.udp {
            run(Spec6::udp(
                spoofed(i),
                1024 + (i % 60000) as u16,
                CLUSTER_IP6,
                53,
            ));
        }
        let before = fx.counter(Verdict::DnatEstablished);
        for &sport in &est {
            let ack = Spec6 {
                tcp_flags: TCP_ACK,
                ..Spec6::tcp(CLIENT6, sport, CLUSTER_IP6, 80)
            };
            let out = decode6(&run(ack).frame);
            assert_eq!(out.daddr, expected_backend(sport, TCP), "{hook:?} {sport}");
            let back = decode6(&run(reply(sport, TCP_ACK)).frame);
            assert_eq!(
                (back.saddr, back.sport),
                (CLUSTER_IP6, 80),
                "{hook:?} {sport}"
            );
        }
        assert_eq!(
            fx.counter(Verdict::DnatEstablished) - before,
            est.len() as u64
        );
        assert_eq!(
            fx.counter(Verdict::DnatPickup),
            0,
            "{hook:?}: no state was lost"
        );
    }
}

/// An IPv6 UDP datagram of 3,000 bytes in three fragments (the sender
/// fragments; routers never do): every fragment follows the first to its
/// backend, and the backend's fragmented answer comes back from the
/// frontend.
#[test]
fn ipv6_fragments_follow_the_first_both_ways() {
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    for hook in HOOKS {
        let fx = fixture(false);
        let backend = expected_backend(40000, UDP);
        let request = Spec6 {
            payload: payload.clone(),
            ..Spec6::udp(CLIENT6, 40000, CLUSTER_IP6, 53)
        };
        let translated = Spec6 {
            daddr: backend,
            dport: 5353,
            ..request.clone()
        };
        let want = fragments6(&translated, 1232, 0x4242);
        let got = fragments6(&request, 1232, 0x4242);
        assert_eq!(got.len(), 3);
        for (i, frag) in got.iter().enumerate() {
            let out = fx.run(hook, frag).unwrap();
            assert_eq!(out.verdict, hook.verdict_pass(), "{hook:?} fragment {i}");
            assert_eq!(out.frame, want[i], "{hook:?} fragment {i}");
        }
        let answer = Spec6 {
            src_mac: [0x02, 0, 0, 0, 0, 0x33],
            dst_mac: [0x02, 0, 0, 0, 0, 0x44],
            payload: payload.clone(),
            ..Spec6::udp(backend, 5353, CLIENT6, 40000)
        };
        let back = Spec6 {
            src_mac: NODE_MAC,
            dst_mac: CLIENT_MAC,
            saddr: CLUSTER_IP6,
            sport: 53,
            hop_limit: 63,
            ..answer.clone()
        };
        let want = fragments6(&back, 1232, 0x4343);
        for (i, frag) in fragments6(&answer, 1232, 0x4343).iter().enumerate() {
            let out = fx.run_on(hook, frag, fx.pod_ifindex).unwrap();
            assert_eq!(
                out.verdict,
                hook.verdict_redirect(),
                "{hook:?} answer fragment {i}"
            );
            assert_eq!(out.frame, want[i], "{hook:?} answer fragment {i}");
        }
        assert_eq!(fx.counter(Verdict::FragmentNat), 4, "{hook:?}");
    }
}
