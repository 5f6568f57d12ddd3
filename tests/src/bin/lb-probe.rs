//! A process the socket-hook tests start inside a cgroup and a network
//! namespace (the node's, or a pod's): it talks to the addresses it is
//! given, as an application would, and prints what the application sees.
//!
//! `LB_PROBE_TCP=ip:port` (or `[ipv6]:port`): connects, prints `PROBE peer <getpeername()>`,
//! sends `WHO` and prints `PROBE who <answer>` (the server's name and the
//! client address it saw). `LB_PROBE_UDP=ip:port`: an unconnected socket
//! sends one datagram and prints `PROBE from <recvfrom() source> <answer>`.
//! `LB_PROBE_CONNECT_LOOP=ip:port` with `LB_PROBE_FOR_MS=n` (the benchmark):
//! connection after connection (connect, `WHO`, read the answer until the
//! server closes) for n ms, and prints `PROBE connects <count> <microseconds>`.
//!
//! For `lb-bench compare` (pinned to CPU `LB_PROBE_CPU`, for
//! `LB_PROBE_FOR_MS`): `LB_PROBE_UDP_SEND=ip:port` sends 18-byte datagrams
//! on one connected socket, or with `LB_PROBE_NEW_SOCKETS=1` each from a
//! socket of its own (socket, connect, send, close), and prints `PROBE sent
//! <count> <nanoseconds>`; `LB_PROBE_CONNECT_RESET=ip:port` connects and
//! resets (SO_LINGER 0) one connection after another and prints `PROBE
//! connects <count> <nanoseconds>`.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

fn main() -> anyhow::Result<()> {
    if let Ok(cpu) = std::env::var("LB_PROBE_CPU") {
        lb_tests::compare_bench::traffic::pin_to(Some(cpu.parse()?))?;
    }
    if let Ok(to) = std::env::var("LB_PROBE_UDP_SEND") {
        let to: SocketAddrV4 = to.parse()?;
        let ms: u64 = std::env::var("LB_PROBE_FOR_MS")?.parse()?;
        let new = std::env::var("LB_PROBE_NEW_SOCKETS").is_ok_and(|v| v == "1");
        let (count, took) = udp_send_loop(to, new, Duration::from_millis(ms))?;
        println!("PROBE sent {count} {}", took.as_nanos());
    }
    if let Ok(to) = std::env::var("LB_PROBE_CONNECT_RESET") {
        let to: SocketAddrV4 = to.parse()?;
        let ms: u64 = std::env::var("LB_PROBE_FOR_MS")?.parse()?;
        let (count, took) =
            lb_tests::compare_bench::traffic::connect_reset_loop(to, Duration::from_millis(ms))?;
        println!("PROBE connects {count} {}", took.as_nanos());
    }
    if let Ok(to) = std::env::var("LB_PROBE_CONNECT_LOOP") {
        let to: SocketAddrV4 = to.parse()?;
        let ms: u64 = std::env::var("LB_PROBE_FOR_MS")?.parse()?;
        let (count, took) = connect_loop(to, Duration::from_millis(ms))?;
        println!("PROBE connects {count} {}", took.as_micros());
    }
    if let Ok(to) = std::env::var("LB_PROBE_TCP") {
        let to: std::net::SocketAddr = to.parse()?;
        let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        println!("PROBE peer {}", s.peer_addr()?);
        s.write_all(b"WHO\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        println!("PROBE who {}", answer.trim());
    }
    if let Ok(to) = std::env::var("LB_PROBE_UDP") {
        let to: std::net::SocketAddr = to.parse()?;
        let u = UdpSocket::bind(if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
        u.set_read_timeout(Some(Duration::from_secs(3)))?;
        u.send_to(b"WHO", to)?;
        let mut buf = [0u8; 256];
        let (n, from) = u.recv_from(&mut buf)?;
        println!("PROBE from {from} {}", String::from_utf8_lossy(&buf[..n]));
    }
    Ok(())
}

fn connect_loop(to: SocketAddrV4, for_: Duration) -> anyhow::Result<(u64, Duration)> {
    let start = std::time::Instant::now();
    let mut count = 0;
    let mut answer = Vec::new();
    while start.elapsed() < for_ {
        let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3))
            .map_err(|e| anyhow::anyhow!("connection {} to {to}: {e}", count + 1))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"WHO\n")?;
        answer.clear();
        s.read_to_end(&mut answer)?;
        anyhow::ensure!(!answer.is_empty(), "connection {}: no answer", count + 1);
        count += 1;
    }
    Ok((count, start.elapsed()))
}

/// Datagrams to `to` for `for_`: on one connected socket (the socket hooks
/// translate its connect once), or each from a new socket (a connect, so a
/// translation, per datagram).
fn udp_send_loop(to: SocketAddrV4, new: bool, for_: Duration) -> anyhow::Result<(u64, Duration)> {
    const PAYLOAD: &[u8] = b"lb-compare-bench!!";
    let start = std::time::Instant::now();
    let mut count = 0u64;
    let mut kept: Option<UdpSocket> = None;
    while start.elapsed() < for_ {
        for _ in 0..64 {
            let s = match &kept {
                Some(s) => s,
                None => {
                    let s = UdpSocket::bind("0.0.0.0:0")?;
                    s.connect(to)?;
                    kept.insert(s)
                }
            };
            if s.send(PAYLOAD).is_ok() {
                count += 1;
            }
            if new {
                kept = None;
            }
        }
    }
    Ok((count, start.elapsed()))
}
