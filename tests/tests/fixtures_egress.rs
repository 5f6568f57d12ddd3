//! Packet fixtures for the TC egress program: what the node's own stack
//! sends that no ingress hook will see. A backend in the node's network
//! namespace (a hostNetwork pod, the API server) answers a pod that dialled
//! a ClusterIP: its reply leaves through the pod's veth and must carry the
//! ClusterIP as source. Expected frames are built from scratch.

use std::net::Ipv4Addr;

use lb_common::Verdict;
use lb_tests::{
    example::{yaml, Endpoint, Extra, Port, Svc},
    fixture::*,
    packet::{icmp_error_frame, Spec, TCP_ACK, TCP_SYN},
    topology::NODE_IP,
};

const API_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const POD: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);

/// `kubernetes`: TCP 443 -> 6443 and UDP 53 -> 6453 on the node itself.
fn fixture() -> Fixture {
    let port = |name, protocol, port, target| Port {
        name,
        protocol,
        port,
        target,
        node_port: None,
    };
    let svc = Svc {
        namespace: "default",
        name: "kubernetes",
        cluster_ip: API_IP,
        ports: vec![
            port("https", "TCP", 443, 6443),
            port("dns", "UDP", 53, 6453),
        ],
        affinity_timeout_s: None,
        endpoints: vec![Endpoint::ready(NODE_IP)],
        extra: Extra::default(),
    };
    Fixture::new(&yaml(&[svc])).expect("fixture")
}

#[test]
fn a_host_backends_reply_leaving_by_a_pod_veth_gets_the_cluster_ip_back() {
    let fx = fixture();
    let syn = Spec::tcp(POD, 40000, API_IP, 443);
    let out = fx.run_on(Hook::Tc, &syn.build(), fx.pod_ifindex).unwrap();
    // DNAT to the node's own address: the stack delivers it locally.
    let dnat = Spec {
        daddr: NODE_IP,
        dport: 6443,
        ..syn.clone()
    };
    assert_eq!((out.verdict, out.frame), (TC_ACT_OK, dnat.build()));

    // The node's answer, already routed to the pod's veth.
    let reply = Spec {
        src_mac: [0x02, 0, 0, 0, 0, 0x03],
        dst_mac: [0x02, 0, 0, 0, 1, 11],
        tcp_flags: TCP_SYN | TCP_ACK,
        ..Spec::tcp(NODE_IP, 6443, POD, 40000)
    };
    let out = fx.run(Hook::TcEgress, &reply.build()).unwrap();
    // Source restored; nothing else changes (not forwarded by us: no TTL
    // decrement, the stack's MACs stay).
    let want = Spec {
        saddr: API_IP,
        sport: 443,
        ..reply
    };
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.frame, want.build());
    assert_eq!(fx.counter(Verdict::ReplyNat), 1);
}

#[test]
fn the_nodes_icmp_error_about_a_translated_packet_is_translated_at_egress() {
    let fx = fixture();
    let dgram = Spec::udp(POD, 40001, API_IP, 53);
    fx.run_on(Hook::Tc, &dgram.build(), fx.pod_ifindex).unwrap();
    // Nothing listens on 6453: the node's stack refuses the DNATed datagram.
    let delivered = Spec {
        daddr: NODE_IP,
        dport: 6453,
        ..dgram.clone()
    };
    let quote = |s: &Spec| s.build()[14..14 + 28].to_vec();
    let macs = ([0x02, 0, 0, 0, 1, 11], [0x02, 0, 0, 0, 0, 0x03]);
    let refusal = icmp_error_frame(macs, NODE_IP, POD, 64, 3, 3, [0; 4], &quote(&delivered));
    let out = fx.run(Hook::TcEgress, &refusal).unwrap();
    // From the address the pod dialled, about the datagram it sent.
    let want = icmp_error_frame(macs, API_IP, POD, 64, 3, 3, [0; 4], &quote(&dgram));
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.frame, want);
    assert_eq!(fx.counter(Verdict::IcmpErrorNat), 1);
}

#[test]
fn egress_leaves_everything_else_alone_and_uncounted() {
    let fx = fixture();
    let before: Vec<u64> = Verdict::ALL.iter().map(|&v| fx.counter(v)).collect();
    for frame in [
        // Unrelated traffic of the node.
        Spec::tcp(NODE_IP, 6443, POD, 40000).build(),
        Spec::udp(NODE_IP, 5000, Ipv4Addr::new(198, 18, 0, 1), 53).build(),
        // Addressed to a frontend: egress never balances (ingress and the
        // socket hooks do).
        Spec::tcp(POD, 40000, API_IP, 443).build(),
        // Not IPv4, and a fragment.
        {
            let mut f = Spec::tcp(POD, 1, API_IP, 443).build();
            f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            f
        },
        {
            let mut f = Spec::udp(NODE_IP, 6453, POD, 40001).build();
            f[14 + 6] |= 0x20; // more fragments
            f
        },
    ] {
        let out = fx.run(Hook::TcEgress, &frame).unwrap();
        assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &frame));
    }
    let after: Vec<u64> = Verdict::ALL.iter().map(|&v| fx.counter(v)).collect();
    assert_eq!(before, after);
}
