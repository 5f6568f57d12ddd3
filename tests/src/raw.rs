//! Raw IPv4 sockets, for tests that inject a packet the way a misbehaving
//! peer would (upstream's "boom" server sends an out-of-window segment)
//! and watch what arrives in a namespace, and for the comparison
//! benchmark's sender (`compare_bench::traffic`). Written on libc because std has
//! no raw sockets and one send and one receive call do not justify a crate.
//! Both need CAP_NET_RAW (the tests run as root).

use anyhow::Context;
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

/// A raw IPv4 socket for `protocol` in the calling thread's namespace.
pub fn raw_socket(protocol: libc::c_int) -> anyhow::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    anyhow::ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// setsockopt(SOL_SOCKET, `name`) with `value` (its C type: the option
/// decides which), for the options std does not offer.
pub fn set_option<T>(fd: std::os::fd::RawFd, name: libc::c_int, value: &T) -> anyhow::Result<()> {
    // SAFETY: `value` is read for its size only, during the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(
        rc == 0,
        "setsockopt {name}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Sends `packet` (a whole IPv4 packet, header included, as built by
/// `packet::Spec::build` without its Ethernet header) from the calling
/// thread's namespace, routed by its destination.
pub fn send_ipv4(packet: &[u8]) -> anyhow::Result<()> {
    anyhow::ensure!(packet.len() >= 20, "not an IPv4 packet");
    let fd = raw_socket(libc::IPPROTO_RAW)?;
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    send_to(&fd, packet, dst).with_context(|| format!("sendto {dst}"))
}

/// One whole IPv4 packet out of raw socket `fd`, routed to `dst`.
pub fn send_to(fd: &OwnedFd, packet: &[u8], dst: Ipv4Addr) -> std::io::Result<()> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the buffer and the address outlive the call; lengths match.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n == packet.len() as isize {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A TCP segment seen arriving in a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub flags: u8,
    pub seq: u32,
}

/// A copy of every TCP segment delivered to the namespace it was opened
/// in (a raw IPPROTO_TCP socket gets each before TCP handles it).
pub struct TcpWatch {
    fd: OwnedFd,
}

impl TcpWatch {
    /// Opens the watch in the calling thread's namespace (`Netns::run`).
    pub fn open() -> anyhow::Result<TcpWatch> {
        let fd = raw_socket(libc::IPPROTO_TCP)?;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        set_option(fd.as_raw_fd(), libc::SO_RCVTIMEO, &tv)?;
        Ok(TcpWatch { fd })
    }

    /// The segments that arrive within `window` (and any queued before).
    pub fn collect(&self, window: Duration) -> Vec<Segment> {
        let deadline = Instant::now() + window;
        let mut buf = [0u8; 2048];
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            // SAFETY: recv(2) into a buffer we own, its length given.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                continue; // the 100 ms timeout, or EINTR
            }
            if let Some(s) = parse(&buf[..n as usize]) {
                seen.push(s);
            }
        }
        seen
    }
}

/// An IPv4 packet carrying TCP: its addresses, ports, flags and sequence.
fn parse(p: &[u8]) -> Option<Segment> {
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    let tcp = p.get(ihl..ihl + 20)?;
    let ip = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    let port = |o: usize| u16::from_be_bytes([tcp[o], tcp[o + 1]]);
    Some(Segment {
        src: SocketAddrV4::new(ip(12), port(0)),
        dst: SocketAddrV4::new(ip(16), port(2)),
        flags: tcp[13],
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
    })
}
