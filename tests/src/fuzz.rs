//! A packet fuzzer for the datapath: generated frames, many of them
//! mutated (bits flipped, cut short, header lengths and fragment fields
//! changed), run through BPF_PROG_TEST_RUN on the real programs, each
//! outcome checked against a reference model of the datapath's decision:
//!
//! - a TCP/UDP packet to a frontend goes to the backend Maglev gives its
//!   flow (computed here from the userspace table), its source kept, or
//!   translated to the node (external frontend, remote backend) or to
//!   another port of the client (a reply-tuple conflict); refused with
//!   ICMP when the service has no endpoint; dropped only where the datapath
//!   may drop (TCP FIN/RST/SYN-ACK without state, SNAT, refusal limit);
//! - a reply of a flow the model saw translated gets the frontend back;
//! - later fragments follow their first fragment;
//! - everything else, malformed packets included, passes untouched or is
//!   dropped, never changed;
//! - every frame that leaves changed has valid IP, TCP/UDP and ICMP
//!   checksums when the input's were valid.
//!
//! The model learns flows from what the datapath does with packets it
//! checked, so it needs no copy of the conntrack logic.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use fastrand::Rng;
use lb_common::{hash::flow_hash, SNAT_PORT_MAX, SNAT_PORT_MIN};
use lb_userspace::{
    kernel::conntrack::CtSizes,
    plan::maglev::{table_size_for, MaglevTable},
};

use crate::{
    example::{yaml, Endpoint, Svc},
    fixture::{
        Fixture, Hook, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_REDIRECT,
        XDP_TX,
    },
    packet::{checksum, icmp_error_frame, Spec, CLIENT_MAC, NODE_MAC, TCP, UDP},
    topology::NODE_IP,
};

const WEB: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const API: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const EMPTY: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
const ICMP: u8 = 1;

/// A service port as the model knows it.
#[derive(Clone)]
struct Frontend {
    backends: Vec<(Ipv4Addr, u16)>,
    /// External frontend with remote backends: sources are translated.
    snat: bool,
}

/// Tables big enough that the fuzzer's few hundred flows never evict one
/// another (evictions are the flood tests' subject, not the model's).
const SIZES: CtSizes = CtSizes {
    tcp: 1 << 16,
    syn: 1 << 15,
    udp: 1 << 15,
    snat: 1 << 14,
};

fn services() -> Vec<Svc> {
    let local = (11..=13)
        .map(|i| Endpoint::ready(Ipv4Addr::new(198, 18, 1, i)))
        .collect();
    let mut empty = Svc {
        name: "empty",
        cluster_ip: EMPTY,
        ..Svc::web(vec![])
    };
    empty.ports[0].node_port = None;
    let mut api = Svc::api(Ipv4Addr::new(198, 18, 2, 11));
    api.endpoints[0] = api.endpoints[0].clone().on("node-b");
    vec![Svc::web(local), api, empty]
}

fn frontends() -> HashMap<(Ipv4Addr, u16, u8), Frontend> {
    let local: Vec<(Ipv4Addr, u16)> = (11..=13)
        .map(|i| (Ipv4Addr::new(198, 18, 1, i), 8080))
        .collect();
    let dns: Vec<(Ipv4Addr, u16)> = local.iter().map(|&(a, _)| (a, 5353)).collect();
    let remote = vec![(Ipv4Addr::new(198, 18, 2, 11), 8080)];
    let f = |backends: &Vec<(Ipv4Addr, u16)>, snat| Frontend {
        backends: backends.clone(),
        snat,
    };
    HashMap::from([
        ((WEB, 80, TCP), f(&local, false)),
        ((NODE_IP, 30080, TCP), f(&local, false)),
        ((WEB, 53, UDP), f(&dns, false)),
        ((API, 8443, TCP), f(&remote, false)),
        ((NODE_IP, 30443, TCP), f(&remote, true)),
        ((EMPTY, 80, TCP), f(&vec![], false)),
        ((EMPTY, 53, UDP), f(&vec![], false)),
    ])
}

/// What the fuzzer saw and found.
#[derive(Debug, Default)]
pub struct Report {
    pub packets: u64,
    /// Frames the kernel's test run refused before any program saw them.
    pub refused_by_kernel: u64,
    pub translated: u64,
    pub refused: u64,
    pub dropped: u64,
    pub untouched: u64,
    pub failures: Vec<String>,
}

/// A flow the datapath translated, as the model remembers it.
#[derive(Clone, Copy)]
struct Seen {
    client: (Ipv4Addr, u16),
    frontend: (Ipv4Addr, u16),
}

struct Model {
    frontends: HashMap<(Ipv4Addr, u16, u8), Frontend>,
    /// Reply tuple (backend, translated source, proto) -> the flow.
    replies: HashMap<(Ipv4Addr, u16, Ipv4Addr, u16, u8), Seen>,
    /// First fragments seen: (src, dst, id, proto) -> ports.
    frags: HashMap<(Ipv4Addr, Ipv4Addr, u16, u8), (u16, u16)>,
    /// What the model learnt about each reply tuple, for failure reports.
    history: HashMap<(Ipv4Addr, u16, Ipv4Addr, u16, u8), Vec<String>>,
    /// Packets checked so far.
    seen: u64,
    /// The last packets seen per endpoint (address, port), for reports.
    events: HashMap<(Ipv4Addr, u16), Vec<String>>,
    /// Client tuples (src, sport, dst, dport, proto) that got another port.
    remapped: HashSet<(Ipv4Addr, u16, Ipv4Addr, u16, u8)>,
}

/// An IPv4 TCP/UDP packet, parsed by the rules the datapath documents.
#[derive(Clone, Copy, Debug)]
struct Parsed {
    saddr: Ipv4Addr,
    daddr: Ipv4Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    flags: u8,
    ihl: usize,
    /// Offset > 0: no L4 header.
    later: bool,
    first: bool,
    id: u16,
}

enum Class {
    Flow(Parsed),
    /// ICMP error quoting a TCP/UDP packet: (outer src, outer dst, quoted
    /// src, quoted dst, quoted sport, quoted dport, quoted proto).
    IcmpError,
    /// Anything else: the datapath must leave it alone.
    Other,
}

fn classify(f: &[u8]) -> Class {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return Class::Other;
    }
    let ip = &f[14..];
    if ip[0] >> 4 != 4 {
        return Class::Other;
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < 20 || tot < ihl {
        return Class::Other;
    }
    let proto = ip[9];
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let (mf, offset) = (frag & 0x2000 != 0, frag & 0x1fff);
    if proto == ICMP {
        // Quoting errors are checked loosely (see `check`).
        return if frag & 0x3fff == 0
            && ihl == 20
            && f.len() >= 14 + 20 + 8 + 28
            && matches!(ip[20], 3 | 11)
        {
            Class::IcmpError
        } else {
            Class::Other
        };
    }
    if proto != TCP && proto != UDP {
        return Class::Other;
    }
    let addr = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
    let (saddr, daddr) = (addr(12), addr(16));
    let id = u16::from_be_bytes([ip[4], ip[5]]);
    if offset != 0 {
        return Class::Flow(Parsed {
            saddr,
            daddr,
            sport: 0,
            dport: 0,
            proto,
            flags: 0,
            ihl,
            later: true,
            first: false,
            id,
        });
    }
    let min_l4 = if proto == TCP { 20 } else { 8 };
    if tot < ihl + min_l4 || f.len() < 14 + ihl + min_l4 {
        return Class::Other;
    }
    let l4 = &ip[ihl..];
    Class::Flow(Parsed {
        saddr,
        daddr,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        proto,
        flags: if proto == TCP { l4[13] } else { 0 },
        ihl,
        later: false,
        first: mf,
        id,
    })
}

/// IP header checksum valid, and (for whole TCP/UDP packets whose IP
/// length matches the frame) the L4 checksum.
fn checksums_ok(f: &[u8]) -> (bool, Option<bool>) {
    let ip = &f[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if f.len() < 14 + ihl || ihl < 20 {
        return (false, None);
    }
    let ip_ok = checksum(&ip[..ihl]) == 0;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if tot != ip.len() || frag & 0x3fff != 0 {
        return (ip_ok, None);
    }
    let proto = ip[9];
    let seg = &ip[ihl..tot];
    if proto == ICMP {
        return (ip_ok, Some(checksum(seg) == 0));
    }
    if proto != TCP && proto != UDP {
        return (ip_ok, None);
    }
    if proto == UDP && seg.len() >= 8 && seg[6..8] == [0, 0] {
        return (ip_ok, None); // no checksum
    }
    let mut pseudo = Vec::with_capacity(12 + seg.len());
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.push(0);
    pseudo.push(proto);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(seg);
    (ip_ok, Some(checksum(&pseudo) == 0))
}

/// `input` with its addresses and ports set as the model expects, the TTL
/// lowered when the datapath forwards it itself, and the IP checksum made
/// right if it was. The L4 checksum field is left for `check` to judge.
fn expected(
    input: &[u8],
    p: &Parsed,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    routed: bool,
) -> Vec<u8> {
    let mut f = input.to_vec();
    let ip_ok = ip_header_ok(input, p.ihl);
    f[26..30].copy_from_slice(&src.0.octets());
    f[30..34].copy_from_slice(&dst.0.octets());
    if !p.later {
        let l4 = 14 + p.ihl;
        f[l4..l4 + 2].copy_from_slice(&src.1.to_be_bytes());
        f[l4 + 2..l4 + 4].copy_from_slice(&dst.1.to_be_bytes());
    }
    if routed {
        f[22] = f[22].wrapping_sub(1);
    }
    if ip_ok {
        let mut h = f[14..14 + p.ihl].to_vec();
        h[10] = 0;
        h[11] = 0;
        f[24..26].copy_from_slice(&checksum(&h).to_be_bytes());
    }
    f
}

/// The IP header is all there and its checksum right.
fn ip_header_ok(f: &[u8], ihl: usize) -> bool {
    f.len() >= 14 + ihl && checksum(&f[14..14 + ihl]) == 0
}

impl Model {
    /// Compares the datapath's outcome with the model's; learns the flow.
    fn check(
        &mut self,
        hook: Hook,
        input: &[u8],
        verdict: u32,
        out: &[u8],
        report: &mut Report,
    ) -> Result<(), String> {
        self.seen += 1;
        if let (Class::Flow(i), Class::Flow(o)) = (classify(input), classify(out)) {
            let line = format!(
                "#{} {}:{}->{}:{} f{:#x} => v{verdict} {}:{}->{}:{}",
                self.seen,
                i.saddr,
                i.sport,
                i.daddr,
                i.dport,
                i.flags,
                o.saddr,
                o.sport,
                o.daddr,
                o.dport
            );
            for end in [(i.saddr, i.sport), (i.daddr, i.dport)] {
                let h = self.events.entry(end).or_default();
                h.push(line.clone());
                if h.len() > 40 {
                    h.remove(0);
                }
            }
        }
        let (pass, drop, redirect, tx) = match hook {
            Hook::Xdp => (XDP_PASS, XDP_DROP, XDP_REDIRECT, XDP_TX),
            _ => (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT, TC_ACT_REDIRECT),
        };
        let untouched = (verdict == pass) && out == input;
        if untouched {
            report.untouched += 1;
        }
        if verdict == drop {
            report.dropped += 1;
        }
        let class = classify(input);
        let p = match class {
            Class::Other => {
                return if untouched || verdict == drop {
                    Ok(())
                } else {
                    Err("not a flow the datapath knows, yet changed or redirected".into())
                };
            }
            Class::IcmpError => {
                if untouched || verdict == drop {
                    return Ok(());
                }
                // Translated: it must leave with right checksums.
                let (ip_ok, icmp_ok) = checksums_ok(out);
                let (in_ip, in_icmp) = checksums_ok(input);
                if (in_ip && !ip_ok) || (in_icmp == Some(true) && icmp_ok != Some(true)) {
                    return Err("a translated ICMP error leaves with a wrong checksum".into());
                }
                report.translated += 1;
                return Ok(());
            }
            Class::Flow(p) => p,
        };
        let mut p = p;
        if p.later {
            match self.frags.get(&(p.saddr, p.daddr, p.id, p.proto)) {
                Some(&(s, d)) => {
                    p.sport = s;
                    p.dport = d;
                }
                None => {
                    return if untouched || verdict == drop {
                        Ok(())
                    } else {
                        Err("a later fragment of an unknown datagram was changed".into())
                    };
                }
            }
        } else if p.first {
            self.frags
                .insert((p.saddr, p.daddr, p.id, p.proto), (p.sport, p.dport));
        }
        // To a frontend?
        if let Some(fe) = self.frontends.get(&(p.daddr, p.dport, p.proto)).cloned() {
            if untouched && p.later {
                // Its first fragment made no flow (refused, dropped, or
                // not seen before it).
                return Ok(());
            }
            if fe.backends.is_empty() {
                if verdict == drop {
                    return Ok(());
                }
                if verdict == tx
                    && !p.later
                    && out.len() >= 14 + 20 + 8
                    && out[23] == ICMP
                    && out[34] == 3
                    && out[35] == 3
                {
                    let (ip_ok, icmp_ok) = checksums_ok(out);
                    if !ip_ok || icmp_ok != Some(true) {
                        return Err("a refusal with a wrong checksum".into());
                    }
                    report.refused += 1;
                    return Ok(());
                }
                return Err(
                    "a packet to a service without endpoints neither refused nor dropped".into(),
                );
            }
            // Where the datapath may drop: TCP FIN/RST/SYN-ACK without state,
            // late packets of a closed flow whose translated source went to
            // a newer flow, SNAT exhaustion, a TTL it cannot lower.
            // (A closed flow whose reply tuple a newer flow took over.)
            let taken_over = self.replies.iter().any(|(k, seen)| {
                k.2 == p.saddr
                    && k.3 == p.sport
                    && k.4 == p.proto
                    && seen.client == (p.saddr, p.sport)
                    && seen.frontend != (p.daddr, p.dport)
            });
            let may_drop = fe.snat
                || taken_over
                || fe.backends.iter().any(|b| b.0 == p.saddr)
                || (p.proto == TCP && (p.flags & 0x05 != 0 || p.flags & 0x12 == 0x12))
                || p.later
                || self
                    .remapped
                    .contains(&(p.saddr, p.sport, p.daddr, p.dport, p.proto));
            if verdict == drop && may_drop {
                return Ok(());
            }
            let set: Vec<(std::net::IpAddr, u16)> = fe
                .backends
                .iter()
                .map(|&(ip, port)| (ip.into(), port))
                .collect();
            let (ip, port) = MaglevTable::build(&set, table_size_for(set.len())).lookup(flow_hash(
                &lb_common::addr::from_v4(p.saddr.octets()),
                p.sport,
                p.dport,
                p.proto,
            ));
            let std::net::IpAddr::V4(ip) = ip else {
                return Err(format!("Maglev gave {ip}, not an IPv4 backend"));
            };
            let backend = (ip, port);
            // A pod reaching itself is masqueraded to the node too.
            let snat = fe.snat || backend.0 == p.saddr;
            let want_routed = verdict == redirect;
            if verdict != pass && verdict != redirect {
                return Err(format!("to a frontend: verdict {verdict}"));
            }
            let o = match classify(out) {
                Class::Flow(o) => o,
                _ => return Err("to a frontend: left unparseable".into()),
            };
            let (osport, odport) = if p.later {
                (p.sport, backend.1)
            } else {
                (o.sport, o.dport)
            };
            if (o.daddr, odport) != backend {
                return Err(format!(
                    "sent to {}:{odport}, Maglev says {}:{}",
                    o.daddr, backend.0, backend.1
                ));
            }
            // (A later fragment carries no ports: its addresses say all.)
            let in_range = p.later || (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&osport);
            let src_ok = if snat {
                o.saddr == NODE_IP && in_range
            } else {
                o.saddr == p.saddr && (osport == p.sport || in_range)
            };
            if !p.later && osport != p.sport {
                self.remapped
                    .insert((p.saddr, p.sport, p.daddr, p.dport, p.proto));
            }
            if !src_ok {
                return Err(format!("source {}:{osport} not allowed", o.saddr));
            }
            let translated_src = (o.saddr, osport);
            let mut want = expected(input, &p, translated_src, backend, want_routed);
            self.compare(input, out, &mut want, &p, want_routed)?;
            if !p.later {
                let rk = (
                    backend.0,
                    backend.1,
                    translated_src.0,
                    translated_src.1,
                    p.proto,
                );
                let h = self.history.entry(rk).or_default();
                h.push(format!(
                    "#{}: {}:{} -> {}:{} flags {:#x} verdict {verdict}",
                    self.seen, p.saddr, p.sport, p.daddr, p.dport, p.flags
                ));
                if h.len() > 8 {
                    h.remove(0);
                }
                self.replies.insert(
                    rk,
                    Seen {
                        client: (p.saddr, p.sport),
                        frontend: (p.daddr, p.dport),
                    },
                );
            }
            report.translated += 1;
            return Ok(());
        }
        // A reply of a flow the model saw?
        if let Some(seen) = self
            .replies
            .get(&(p.saddr, p.sport, p.daddr, p.dport, p.proto))
            .copied()
        {
            if untouched || verdict == drop {
                // The flow may have closed and expired, or lost its SNAT
                // port to a newer flow.
                return Ok(());
            }
            let dst = if (p.daddr, p.dport) != seen.client {
                seen.client
            } else {
                (p.daddr, p.dport)
            };
            let routed = verdict == redirect;
            let mut want = expected(input, &p, seen.frontend, dst, routed);
            let key = (p.saddr, p.sport, p.daddr, p.dport, p.proto);
            self.compare(input, out, &mut want, &p, routed)
                .map_err(|e| {
                    format!(
                        "{e}\n  history of this reply tuple: {:?}\n  events of the client:\n    {}",
                        self.history.get(&key),
                        self.events
                            .get(&(p.daddr, p.dport))
                            .map(|v| v.join("\n    "))
                            .unwrap_or_default()
                    )
                })?;
            report.translated += 1;
            return Ok(());
        }
        if untouched || verdict == drop {
            Ok(())
        } else {
            Err("not for a frontend nor a known reply, yet changed or redirected".into())
        }
    }

    /// `out` equals `want` but for what the datapath may choose: MACs of a
    /// routed frame (from the FIB) and an L4 checksum that was wrong on
    /// input; a checksum that was right must stay right.
    fn compare(
        &self,
        input: &[u8],
        out: &[u8],
        want: &mut [u8],
        p: &Parsed,
        routed: bool,
    ) -> Result<(), String> {
        if out.len() != want.len() {
            return Err(format!("length {} for {}", out.len(), want.len()));
        }
        if routed {
            want[..12].copy_from_slice(&out[..12]);
        }
        // A wrong IP checksum stays wrong (updated by the same deltas).
        if !ip_header_ok(input, p.ihl) {
            want[24..26].copy_from_slice(&out[24..26]);
        }
        let csum_off = if p.later {
            None
        } else {
            Some(14 + p.ihl + if p.proto == TCP { 16 } else { 6 })
        };
        let (_, in_l4) = checksums_ok(input);
        if let Some(off) = csum_off {
            if off + 2 <= want.len() {
                want[off..off + 2].copy_from_slice(&out[off..off + 2]);
            }
        }
        if out != want {
            let at = out
                .iter()
                .zip(want.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!("bytes differ from byte {at}; wanted {want:02x?}"));
        }
        if in_l4 == Some(true) && checksums_ok(out).1 != Some(true) {
            return Err("the L4 checksum was right and is now wrong".into());
        }
        Ok(())
    }
}

/// Generates one frame (sometimes several: a fragmented datagram).
fn generate(rng: &mut Rng, model: &Model) -> Vec<Vec<u8>> {
    let clients = [
        Ipv4Addr::new(198, 18, 0, 1),
        Ipv4Addr::new(198, 18, 0, 7),
        Ipv4Addr::new(198, 18, 1, 12),
    ];
    let fronts: Vec<(Ipv4Addr, u16, u8)> = {
        let mut v: Vec<_> = model.frontends.keys().copied().collect();
        v.sort();
        v
    };
    let flags = [0x02, 0x10, 0x12, 0x11, 0x04, 0x18, 0x14, 0x01, 0x00, 0x3f];
    let mut frames = match rng.u8(0..10) {
        // To a frontend (the most interesting traffic).
        0..=4 => {
            let (daddr, dport, proto) = fronts[rng.usize(..fronts.len())];
            let saddr = clients[rng.usize(..clients.len())];
            let sport = 40_000 + rng.u16(0..64);
            let mut s = if proto == TCP {
                Spec {
                    tcp_flags: flags[rng.usize(..flags.len())],
                    ..Spec::tcp(saddr, sport, daddr, dport)
                }
            } else {
                Spec::udp(saddr, sport, daddr, dport)
            };
            s.payload = vec![0xab; rng.usize(0..64)];
            if rng.u8(0..8) == 0 {
                s.payload = vec![0xcd; 1500 + rng.usize(0..1500)];
                s.ip_id = rng.u16(..);
                let mut f = crate::packet::fragments(&s, 8 * (64 + rng.usize(0..120)));
                if rng.bool() {
                    f.reverse(); // later fragments first: they pass untouched
                }
                return f;
            }
            vec![s.build()]
        }
        // A reply of a known flow, or of nothing.
        5..=6 => {
            let keys: Vec<_> = model.replies.keys().copied().collect();
            let (b, bp, d, dp, proto) = if keys.is_empty() || rng.u8(0..4) == 0 {
                (
                    Ipv4Addr::new(198, 18, 1, 11),
                    8080,
                    clients[0],
                    40_000 + rng.u16(0..64),
                    TCP,
                )
            } else {
                keys[rng.usize(..keys.len())]
            };
            let s = if proto == TCP {
                Spec {
                    tcp_flags: flags[rng.usize(..flags.len())],
                    ..Spec::tcp(b, bp, d, dp)
                }
            } else {
                Spec::udp(b, bp, d, dp)
            };
            vec![s.build()]
        }
        // An ICMP error quoting a flow one way or the other.
        7 => {
            let keys: Vec<_> = model.replies.keys().copied().collect();
            let quoted =
                if let Some(&(b, bp, d, dp, proto)) = keys.get(rng.usize(..keys.len().max(1))) {
                    if proto == TCP {
                        Spec::tcp(d, dp, b, bp)
                    } else {
                        Spec::udp(d, dp, b, bp)
                    }
                } else {
                    Spec::tcp(clients[0], 40_000, WEB, 80)
                };
            let q = quoted.build();
            let cut = if rng.bool() { q.len() - 14 } else { 28 };
            vec![icmp_error_frame(
                (NODE_MAC, CLIENT_MAC),
                Ipv4Addr::new(198, 18, 0, 254),
                quoted.saddr,
                64,
                3,
                rng.u8(0..5),
                [0, 0, 5, 0],
                &q[14..14 + cut],
            )]
        }
        // Anything else: other hosts, other protocols, other ethertypes.
        _ => {
            let mut s = Spec::udp(
                Ipv4Addr::new(198, 18, rng.u8(0..4), rng.u8(..)),
                rng.u16(..),
                Ipv4Addr::new(198, 18, rng.u8(0..4), rng.u8(..)),
                rng.u16(..),
            );
            s.proto = [TCP, UDP, 47, 1, 132][rng.usize(..5)];
            let mut f = s.build();
            if rng.u8(0..4) == 0 {
                f[12..14].copy_from_slice(&[0x86, 0xdd]);
            }
            vec![f]
        }
    };
    // Mutate a third of them.
    for f in frames.iter_mut() {
        if rng.u8(0..3) != 0 {
            continue;
        }
        for _ in 0..rng.usize(1..4) {
            match rng.u8(0..6) {
                0 | 1 if f.len() > 12 => {
                    let i = rng.usize(12..f.len().min(70));
                    f[i] ^= 1 << rng.u8(0..8);
                }
                2 => f.truncate(rng.usize(0..f.len() + 1)),
                3 if f.len() > 14 => f[14] = 0x40 | rng.u8(0..16),
                4 if f.len() > 21 => {
                    f[20] = rng.u8(..);
                    f[21] = rng.u8(..);
                }
                _ if f.len() > 17 => {
                    let tot = rng.u16(..);
                    f[16..18].copy_from_slice(&tot.to_be_bytes());
                }
                _ => {}
            }
        }
    }
    frames
}

/// Runs `packets` frames through `hook` from `seed`.
pub fn run(hook: Hook, packets: u64, seed: u64) -> anyhow::Result<Report> {
    let fx = Fixture::with_sizes(&yaml(&services()), &SIZES)?;
    let mut model = Model {
        frontends: frontends(),
        replies: HashMap::new(),
        frags: HashMap::new(),
        history: HashMap::new(),
        seen: 0,
        events: HashMap::new(),
        remapped: HashSet::new(),
    };
    let mut rng = Rng::with_seed(seed);
    let mut report = Report::default();
    while report.packets < packets {
        for frame in generate(&mut rng, &model) {
            // The kernel runs nothing shorter than an Ethernet header.
            if frame.len() < 14 {
                continue;
            }
            // Where the frame arrives: the NIC for the client's side, the
            // pod link for pods' (replies routed back need a real device).
            let from_pod = frame.len() >= 30 && frame[26..28] == [198, 18] && frame[28] == 1;
            let ifindex = if from_pod {
                fx.pod_ifindex
            } else {
                fx.nic_ifindex
            };
            let out = match fx.run_on(hook, &frame, ifindex) {
                Ok(out) => out,
                // The kernel's test run validates some headers itself
                // (an IPv6 ethertype with too short a header): such a frame
                // never reaches a program, here or on a real interface.
                Err(e) if is_einval(&e) => {
                    report.refused_by_kernel += 1;
                    continue;
                }
                Err(e) => {
                    return Err(
                        e.context(format!("running a {}-byte frame {frame:02x?}", frame.len()))
                    )
                }
            };
            report.packets += 1;
            if let Err(why) = model.check(hook, &frame, out.verdict, &out.frame, &mut report) {
                let why = format!("{why}\n  datapath state: {}", state_of(&fx, &frame));
                if report.failures.len() < 20 {
                    report.failures.push(format!(
                        "{hook:?} seed {seed} packet {}: {why}\n  in:  {frame:02x?}\n  out: {:02x?} verdict {}",
                        report.packets, out.frame, out.verdict
                    ));
                }
            }
        }
    }
    Ok(report)
}

fn is_einval(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(|io| io.raw_os_error())
            == Some(libc::EINVAL)
            || c.to_string().contains("os error 22")
    })
}

/// The conntrack entries the datapath holds for `frame`'s tuple (both
/// directions), for failure reports.
fn state_of(fx: &Fixture, frame: &[u8]) -> String {
    let Class::Flow(p) = classify(frame) else {
        return "-".into();
    };
    let key = |sa: Ipv4Addr, sp: u16, da: Ipv4Addr, dp: u16| lb_common::FlowKey {
        src_addr: lb_common::addr::from_v4(sa.octets()),
        dst_addr: lb_common::addr::from_v4(da.octets()),
        src_port: sp,
        dst_port: dp,
        proto: p.proto,
        _pad: [0; 3],
    };
    let mut out = Vec::new();
    for table in ["lb_ct_tcp", "lb_ct_syn", "lb_ct_udp", "lb_snat"] {
        let Ok(data) = aya::maps::MapData::from_pin(fx.pin_dir().join(table)) else {
            continue;
        };
        let Ok(map) = aya::maps::Map::from_map_data(data) else {
            continue;
        };
        let Ok(m): Result<aya::maps::HashMap<_, lb_common::FlowKey, lb_common::ConntrackEntry>, _> =
            map.try_into()
        else {
            continue;
        };
        for k in [
            key(p.saddr, p.sport, p.daddr, p.dport),
            key(p.daddr, p.dport, p.saddr, p.sport),
        ] {
            if let Ok(e) = m.get(&k, 0) {
                out.push(format!("{table} {k:?} -> {e:?}"));
            }
        }
    }
    out.join("; ")
}
