//! A process the socket-hook tests start inside a cgroup and a network
//! namespace (the node's, or a pod's): it talks to the addresses it is
//! given, as an application would, and prints what the application sees.
//!
//! `LB_PROBE_TCP=ip:port`: connects, prints `PROBE peer <getpeername()>`,
//! sends `WHO` and prints `PROBE who <answer>` (the server's name and the
//! client address it saw). `LB_PROBE_UDP=ip:port`: an unconnected socket
//! sends one datagram and prints `PROBE from <recvfrom() source> <answer>`.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

fn main() -> anyhow::Result<()> {
    if let Ok(to) = std::env::var("LB_PROBE_TCP") {
        let to: SocketAddrV4 = to.parse()?;
        let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        println!("PROBE peer {}", s.peer_addr()?);
        s.write_all(b"WHO\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        println!("PROBE who {}", answer.trim());
    }
    if let Ok(to) = std::env::var("LB_PROBE_UDP") {
        let u = UdpSocket::bind("0.0.0.0:0")?;
        u.set_read_timeout(Some(Duration::from_secs(3)))?;
        u.send_to(b"WHO", to.as_str())?;
        let mut buf = [0u8; 256];
        let (n, from) = u.recv_from(&mut buf)?;
        println!("PROBE from {from} {}", String::from_utf8_lossy(&buf[..n]));
    }
    Ok(())
}
