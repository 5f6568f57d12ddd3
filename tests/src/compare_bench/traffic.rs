//! The comparison's traffic: 60-byte UDP frames (46-byte IPv4 packets)
//! sent as fast as one CPU can from the client namespace with a raw socket
//! (so every packet can carry a new source address and port), and the
//! packets that arrive counted where they arrive.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// Which flows a slice sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Flows {
    /// One 5-tuple throughout: after its first packet, every packet is an
    /// established flow's.
    Established,
    /// A 5-tuple never sent before for every packet: every packet is a new
    /// flow's first (conntrack entries, backend choice, NAT set-up).
    New,
    /// Datagrams on one connected UDP socket (`lb-probe`): what an
    /// application's established flow costs, socket hooks included.
    SocketSend,
    /// A new UDP socket per datagram (socket, connect, send, close): a new
    /// flow per datagram as an application makes it.
    SocketNew,
    /// TCP connections: connect (SYN, SYN-ACK, ACK), then reset (SO_LINGER
    /// 0: no TIME_WAIT to run out of ports with); one at a time.
    Connect,
}

impl Flows {
    /// Sent by an application's sockets (`lb-probe`), not the raw sender.
    pub fn from_sockets(self) -> bool {
        matches!(self, Flows::SocketSend | Flows::SocketNew | Flows::Connect)
    }

    pub fn label(self) -> &'static str {
        match self {
            Flows::Established => "established",
            Flows::New => "new flow",
            Flows::SocketSend => "UDP socket, connected",
            Flows::SocketNew => "UDP socket per datagram",
            Flows::Connect => "TCP connection",
        }
    }
}

/// A raw socket made in a client namespace (a socket stays in the namespace
/// it was made in, whichever thread sends on it).
pub struct Sender {
    fd: OwnedFd,
}

/// Source addresses for new flows: 198.18.64.0/18 (16,384 addresses, each
/// with `PORTS_PER_SOURCE` ports), routed nowhere but to the node.
const NEW_SOURCE_BASE: u32 = u32::from_be_bytes([198, 18, 64, 0]);
const NEW_SOURCES: u32 = 1 << 14;
const PORTS_PER_SOURCE: u32 = 50_000;
const PAYLOAD: usize = 18;

impl Sender {
    /// Opens the socket inside `client`.
    pub fn open(client: &Netns) -> anyhow::Result<Sender> {
        let fd = client.run(|| crate::raw::raw_socket(libc::IPPROTO_RAW))??;
        Ok(Sender { fd })
    }

    /// Sends to `to` from `from` (established) or from ever new sources
    /// (new flows, numbered from `*next_flow` on) until `slice` has passed.
    /// Returns the time it took and the packets sent.
    pub fn send_for(
        &self,
        from: SocketAddrV4,
        to: SocketAddrV4,
        flows: Flows,
        next_flow: &mut u64,
        slice: Duration,
    ) -> (Duration, u64) {
        let mut packet = udp_packet(from, to);
        let start = Instant::now();
        let mut sent = 0u64;
        loop {
            for _ in 0..64 {
                if flows == Flows::New {
                    let k = *next_flow;
                    *next_flow += 1;
                    let src =
                        NEW_SOURCE_BASE + (k / u64::from(PORTS_PER_SOURCE)) as u32 % NEW_SOURCES;
                    let port = 1024 + (k % u64::from(PORTS_PER_SOURCE)) as u16;
                    packet = udp_packet(SocketAddrV4::new(Ipv4Addr::from(src), port), to);
                }
                if crate::raw::send_to(&self.fd, &packet, *to.ip()).is_ok() {
                    sent += 1;
                }
            }
            let took = start.elapsed();
            if took >= slice {
                return (took, sent);
            }
        }
    }
}

/// An IPv4/UDP packet with a complete UDP checksum (what a NIC hands the
/// node; XDP needs it whole) and an 18-byte payload.
pub fn udp_packet(from: SocketAddrV4, to: SocketAddrV4) -> [u8; 20 + 8 + PAYLOAD] {
    let mut p = [0u8; 20 + 8 + PAYLOAD];
    let total = p.len() as u16;
    p[0] = 0x45;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = libc::IPPROTO_UDP as u8;
    p[12..16].copy_from_slice(&from.ip().octets());
    p[16..20].copy_from_slice(&to.ip().octets());
    let ip_sum = crate::packet::checksum(&p[..20]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    p[20..22].copy_from_slice(&from.port().to_be_bytes());
    p[22..24].copy_from_slice(&to.port().to_be_bytes());
    p[24..26].copy_from_slice(&(total - 20).to_be_bytes());
    p[28..].copy_from_slice(b"lb-compare-bench!!");
    // The checksum over the pseudo-header (addresses, protocol, length)
    // and the UDP header and payload.
    // (On the stack: the new-flow sender builds one packet per send.)
    let mut pseudo = [0u8; 12 + 8 + PAYLOAD];
    pseudo[..8].copy_from_slice(&p[12..20]);
    pseudo[9] = libc::IPPROTO_UDP as u8;
    pseudo[10..12].copy_from_slice(&(total - 20).to_be_bytes());
    pseudo[12..].copy_from_slice(&p[20..]);
    let sum = match crate::packet::checksum(&pseudo) {
        0 => 0xffff,
        s => s,
    };
    p[26..28].copy_from_slice(&sum.to_be_bytes());
    p
}

/// TCP connections to `to` made one after the other, each reset at once
/// (SO_LINGER 0), until `slice` has passed: the connections made and the
/// time it took. (Run by `lb-probe`, in the client's namespace and, for
/// socket LB, the hooked cgroup.)
pub fn connect_reset_loop(to: SocketAddrV4, slice: Duration) -> anyhow::Result<(u64, Duration)> {
    let start = Instant::now();
    let mut made = 0u64;
    while start.elapsed() < slice {
        let s = std::net::TcpStream::connect_timeout(&to.into(), Duration::from_secs(1))?;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // std's set_linger is unstable: the close resets the connection.
        crate::raw::set_option(s.as_raw_fd(), libc::SO_LINGER, &linger)?;
        made += 1;
    }
    Ok((made, start.elapsed()))
}

/// A TCP listener on `port` in a pod that accepts and drops every
/// connection (the handshake is the kernel's; accepting keeps the queue
/// from filling). Stopped when dropped.
pub struct TcpSink {
    fd: i32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The sink's listen backlog: connections arrive faster than one accept
/// loop takes them for a moment now and then, and an overflowing queue
/// drops SYNs (a one-second retransmit in the middle of a slice).
const SINK_BACKLOG: libc::c_int = 4096;

impl TcpSink {
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<TcpSink> {
        let listener =
            ns.run(move || std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))??;
        let fd = listener.as_raw_fd();
        // SAFETY: listen(2) again on a listening socket only resizes its
        // queue.
        anyhow::ensure!(
            unsafe { libc::listen(fd, SINK_BACKLOG) } == 0,
            "listen: {}",
            std::io::Error::last_os_error()
        );
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            // A connection reset before it is taken can fail its accept:
            // only `drop` (shutdown, then accept fails for good) ends this.
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = listener.accept();
            }
        });
        Ok(TcpSink {
            fd,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the listener's descriptor, open until the thread ends.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Packets received by `iface` of `ns` so far (its /proc/net/dev line,
/// read from a thread inside the namespace).
pub fn rx_packets(ns: &Netns, iface: &str) -> anyhow::Result<u64> {
    let iface = format!("{iface}:");
    ns.run(move || {
        let dev = std::fs::read_to_string("/proc/thread-self/net/dev")?;
        let line = dev
            .lines()
            .map(str::trim_start)
            .find(|l| l.starts_with(&iface))
            .ok_or_else(|| anyhow::anyhow!("no {iface} in /proc/net/dev"))?;
        let packets = line[iface.len()..]
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| anyhow::anyhow!("short line {line:?}"))?;
        Ok(packets.parse()?)
    })?
}

/// A UDP socket on `port` that is never read, with the smallest receive
/// buffer: datagrams reach a socket (no ICMP port-unreachable to send
/// back) and are dropped there at once, the same way in every mode.
pub fn sink(ns: &Netns, port: u16) -> anyhow::Result<std::net::UdpSocket> {
    ns.run(move || -> anyhow::Result<std::net::UdpSocket> {
        let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
        // The kernel raises it to its minimum.
        crate::raw::set_option(s.as_raw_fd(), libc::SO_RCVBUF, &(1 as libc::c_int))?;
        Ok(s)
    })?
}

/// Pins the calling thread to `cpu` (`None`: every CPU again): the sender
/// does all of a packet's work (the veths hand packets on within the
/// sending CPU's softirq).
pub fn pin_to(cpu: Option<usize>) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    match cpu {
        Some(c) => set.set(c)?,
        None => {
            for c in 0..std::thread::available_parallelism()?.get() {
                set.set(c)?;
            }
        }
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_udp_packet_checks_out() {
        let p = udp_packet(
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 64, 1), 1024),
            SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 53),
        );
        assert_eq!(p.len(), 46, "a 60-byte frame with its Ethernet header");
        assert_eq!(crate::packet::checksum(&p[..20]), 0, "IPv4 header");
        let mut pseudo = p[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 17, 0, 26]);
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(crate::packet::checksum(&pseudo), 0, "UDP");
    }
}
