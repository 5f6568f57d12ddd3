//! The IPv6 datapath through BPF_PROG_TEST_RUN, TC and XDP: exact frames
//! out for DNAT, the reply and the refusal. The agent does not program
//! IPv6 services yet, so these fixtures write the maps themselves: the
//! example service's frontend gets an IPv6 twin naming the same table, and
//! its backends are given IPv6 addresses (the datapath reads a table of
//! backend ids, whatever their family).

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{
    addr::{self, Addr},
    hash::flow_hash,
    Backend, FrontendKey, ServiceEntry, Verdict, FRONTEND_VIEW_ALL,
};
use lb_tests::{
    example::{yaml, Endpoint, Svc},
    fixture::*,
    packet::{l4_checksum6, Spec6, CLIENT_MAC, NODE_MAC, TCP, UDP},
};
use lb_userspace::plan::DatapathMaps;

const HOOKS: [Hook; 2] = [Hook::Tc, Hook::Xdp];
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);

fn backends() -> Vec<Ipv4Addr> {
    (11..=13).map(|i| Ipv4Addr::new(198, 18, 1, i)).collect()
}

/// The IPv6 address the fixture gives an IPv4 backend.
fn v6_of(ip: Ipv4Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, o[2] as u16, o[3] as u16)
}

fn a6(ip: Ipv6Addr) -> Addr {
    addr::from_ip(ip.into())
}

/// The example service, its ClusterIP twinned on IPv6 and its backends
/// readdressed; `empty`: the twin announces no usable backend.
fn fixture(empty: bool) -> Fixture {
    let eps = backends().into_iter().map(Endpoint::ready).collect();
    let mut fx = Fixture::new(&yaml(&[Svc::web(eps)])).expect("fixture");
    let snap = fx.maps().snapshot().unwrap();
    let v4 = addr::from_v4(CLUSTER_IP.octets());
    let (_, mut entry): (FrontendKey, ServiceEntry) = *snap
        .frontends
        .iter()
        .find(|(k, _)| k.addr == v4 && k.port == 80)
        .expect("the ClusterIP frontend");
    for (id, b) in &snap.backends {
        let ip = Ipv4Addr::from(addr::v4(&b.addr));
        let b6 = Backend {
            addr: a6(v6_of(ip)),
            ..*b
        };
        fx.maps_mut().set_backend(*id, b6).unwrap();
    }
    if empty {
        entry.backend_count = 0;
    }
    let key = FrontendKey {
        addr: a6(CLUSTER_IP6),
        port: 80,
        proto: TCP,
        view: FRONTEND_VIEW_ALL,
    };
    fx.maps_mut().set_frontend(key, entry).unwrap();
    fx.maps_mut()
        .set_frontend(FrontendKey { proto: UDP, ..key }, entry)
        .unwrap();
    fx
}

/// The backend Maglev gives the IPv6 client's flow: the userspace table
/// and the shared hash, with the IPv6 fold.
fn expected_backend(sport: u16, proto: u8) -> Ipv6Addr {
    v6_of(Maglev4::new(&backends(), 8080).lookup(flow_hash(&a6(CLIENT6), sport, 80, proto)))
}

fn pass(hook: Hook) -> u32 {
    if hook == Hook::Tc {
        TC_ACT_OK
    } else {
        XDP_PASS
    }
}

#[test]
fn ipv6_clusterip_flows_are_translated_to_the_maglev_backend_and_back() {
    for hook in HOOKS {
        for (proto, sport) in [(TCP, 40000u16), (UDP, 40001)] {
            let fx = fixture(false);
            let build = if proto == TCP { Spec6::tcp } else { Spec6::udp };
            let input = build(CLIENT6, sport, CLUSTER_IP6, 80).build();
            let out = fx.run(hook, &input).unwrap();
            let backend = expected_backend(sport, proto);
            let want = build(CLIENT6, sport, backend, 8080).build();
            assert_eq!(out.verdict, pass(hook), "{hook:?} {proto}");
            assert_eq!(out.frame, want, "{hook:?} {proto}: DNAT to {backend}");
            assert_eq!(fx.counter(Verdict::DnatNew), 1, "{hook:?} {proto}");

            // The backend's reply comes back from the frontend.
            let mut reply = build(backend, 8080, CLIENT6, sport);
            reply.src_mac = NODE_MAC;
            reply.dst_mac = CLIENT_MAC;
            reply.tcp_flags = 0x12; // SYN-ACK
            let out = fx.run(hook, &reply.build()).unwrap();
            let mut want = build(CLUSTER_IP6, 80, CLIENT6, sport);
            want.src_mac = NODE_MAC;
            want.dst_mac = CLIENT_MAC;
            want.tcp_flags = 0x12;
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
        assert_eq!(out.verdict, pass(hook));
        assert_eq!(out.frame, input, "{hook:?}: untouched");
        assert_eq!(fx.counter(Verdict::PassMalformed), 1, "{hook:?}");
    }
}

/// An ICMPv6 error from `src` to `dst` quoting `quoted` (an IPv6 packet,
/// from its header on), built from scratch.
fn icmp6_error(src: Ipv6Addr, dst: Ipv6Addr, kind: [u8; 2], word: u32, quoted: &[u8]) -> Vec<u8> {
    let len = 8 + quoted.len();
    let mut f = Vec::new();
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(len as u16).to_be_bytes());
    f.extend_from_slice(&[58, 64]);
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
        let input = icmp6_error(ROUTER, CLIENT6, [2, 0], 1280, &sent.build()[14..]);
        let out = fx.run(hook, &input).unwrap();
        // The client learns the MTU for the flow it knows: to the frontend.
        let want = icmp6_error(ROUTER, CLIENT6, [2, 0], 1280, &asked.build()[14..]);
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
        assert_eq!(out.verdict, pass(hook));
        assert_eq!(out.frame, five, "{hook:?}: five extension headers");
        assert_eq!(fx.counter(Verdict::PassOtherProtocol), 1, "{hook:?}");
    }
}
