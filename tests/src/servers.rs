//! Small real servers for pods, and the client calls that talk to them.
//!
//! TCP: the client sends one line:
//! - `WHO` -> `<pod name> <peer ip>:<peer port>` (who answered, and which
//!   client address it saw)
//! - `BULK <n>` -> n bytes of a known pattern, then close
//! - `UPLOAD <n>` -> reads n bytes, checks the pattern, answers `OK <n>`
//! - `STREAM` -> `<pod name>`, then data forever, until the client goes away
//!
//! UDP: any datagram -> `<pod name> <peer ip>:<peer port>`.
//!
//! The same servers listen on IPv6 with `PodServer::start_v6` (IPv6 only,
//! so they sit beside the IPv4 ones on the same ports).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
        UdpSocket,
    },
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context;

use crate::netns::Netns;

/// Byte `i` of the bulk pattern: not periodic in any power of two, so a
/// checksum-neutral corruption (swapped 16-bit words) would show.
pub fn pattern(i: u64) -> u8 {
    ((i * 7 + i / 251) % 251) as u8
}

/// Fills `buf` with the pattern bytes starting at stream offset `offset`.
pub fn fill_pattern(buf: &mut [u8], offset: u64) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern(offset + k as u64);
    }
}

/// A TCP and a UDP server in one pod, stopped on drop.
pub struct PodServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PodServer {
    pub fn start(
        ns: &Netns,
        name: &str,
        tcp_port: u16,
        udp_port: u16,
    ) -> anyhow::Result<PodServer> {
        Self::start_on(ns, name, Ipv4Addr::UNSPECIFIED, tcp_port, udp_port)
    }

    /// Servers bound to `addr` (a hostNetwork server bound to the node's
    /// address answers UDP from that address whatever the route's source).
    pub fn start_on(
        ns: &Netns,
        name: &str,
        addr: Ipv4Addr,
        tcp_port: u16,
        udp_port: u16,
    ) -> anyhow::Result<PodServer> {
        Self::start_at(ns, name, addr.into(), tcp_port, udp_port)
    }

    /// The same servers on [::], IPv6 only: beside `start`'s on the same
    /// ports, they make a pod dual-stack.
    pub fn start_v6(
        ns: &Netns,
        name: &str,
        tcp_port: u16,
        udp_port: u16,
    ) -> anyhow::Result<PodServer> {
        Self::start_at(ns, name, Ipv6Addr::UNSPECIFIED.into(), tcp_port, udp_port)
    }

    fn start_at(
        ns: &Netns,
        name: &str,
        addr: IpAddr,
        tcp_port: u16,
        udp_port: u16,
    ) -> anyhow::Result<PodServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        {
            let (stop, name, ready) = (stop.clone(), name.to_string(), ready_tx.clone());
            let at = SocketAddr::new(addr, tcp_port);
            threads.push(ns.spawn(move || tcp_server(&name, at, &stop, ready))?);
        }
        {
            let (stop, name, ready) = (stop.clone(), name.to_string(), ready_tx);
            let at = SocketAddr::new(addr, udp_port);
            threads.push(ns.spawn(move || udp_server(&name, at, &stop, ready))?);
        }
        for _ in 0..2 {
            ready_rx
                .recv_timeout(Duration::from_secs(5))
                .context("server did not start")??;
        }
        Ok(PodServer { stop, threads })
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

type Ready = std::sync::mpsc::Sender<anyhow::Result<()>>;

/// A socket bound to `at`; an IPv6 one IPv6 only (std's would take IPv4
/// too and collide with the IPv4 server on the port).
fn bound(at: SocketAddr, ty: nix::sys::socket::SockType) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockaddrIn, SockaddrIn6,
    };
    let family = match at {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, ty, SockFlag::empty(), None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    match at {
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => {
            setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
            bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?
        }
    }
    Ok(fd)
}

fn tcp_listener(at: SocketAddr) -> std::io::Result<TcpListener> {
    let fd = bound(at, nix::sys::socket::SockType::Stream)?;
    nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(128).unwrap())?;
    Ok(TcpListener::from(fd))
}

fn tcp_server(name: &str, at: SocketAddr, stop: &Arc<AtomicBool>, ready: Ready) {
    let listener = match tcp_listener(at) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, peer)) => {
                let (name, stop) = (name.to_string(), stop.clone());
                std::thread::spawn(move || {
                    let _ = serve_tcp(conn, peer, &name, &stop);
                });
            }
            // Wait for the next connection (or a look at `stop`) without
            // adding latency to it.
            Err(_) => {
                let mut fds = [nix::poll::PollFd::new(
                    std::os::fd::AsFd::as_fd(&listener),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut fds, 50u16);
            }
        }
    }
}

fn serve_tcp(
    conn: TcpStream,
    peer: SocketAddr,
    name: &str,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut conn = conn;
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["WHO"] => writeln!(conn, "{name} {peer}"),
        // The client closes first (the server waits for its EOF), so the
        // TIME_WAIT stays on the client's side.
        ["WHOWAIT"] => {
            writeln!(conn, "{name} {peer}")?;
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest)?;
            Ok(())
        }
        ["BULK", n] => {
            let n: u64 = n.parse().unwrap_or(0);
            let mut buf = vec![0u8; 64 * 1024];
            let mut sent = 0u64;
            while sent < n {
                let len = buf.len().min((n - sent) as usize);
                fill_pattern(&mut buf[..len], sent);
                conn.write_all(&buf[..len])?;
                sent += len as u64;
            }
            Ok(())
        }
        ["UPLOAD", n] => {
            let n: u64 = n.parse().unwrap_or(0);
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0u64;
            while got < n {
                let len = reader.read(&mut buf)?;
                if len == 0 {
                    break;
                }
                if buf[..len]
                    .iter()
                    .enumerate()
                    .any(|(k, &b)| b != pattern(got + k as u64))
                {
                    return writeln!(conn, "CORRUPT at {got}");
                }
                got += len as u64;
            }
            writeln!(conn, "OK {got}")
        }
        // An idle connection that answers now and then: the pod's name,
        // then each line back with the name in front, until EOF.
        ["ECHO"] => {
            conn.set_read_timeout(None)?;
            writeln!(conn, "{name}")?;
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                write!(conn, "{name} {line}")?;
            }
        }
        ["STREAM"] => {
            writeln!(conn, "{name}")?;
            let buf = vec![b'x'; 16 * 1024];
            while !stop.load(Ordering::Relaxed) {
                conn.write_all(&buf)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn udp_server(name: &str, at: SocketAddr, stop: &Arc<AtomicBool>, ready: Ready) {
    let sock = match bound(at, nix::sys::socket::SockType::Datagram).map(UdpSocket::from) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let _ = ready.send(Ok(()));
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let mut answer = format!("{name} {peer}").into_bytes();
            // "BIG": an answer as long as the question (fragments both ways
            // when it exceeds the MTU).
            if buf[..n].starts_with(b"BIG") && n > answer.len() {
                answer.resize(n, b' ');
            }
            let _ = sock.send_to(&answer, peer);
        }
    }
}

/// Who answered a `WHO`, and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub pod: String,
    pub peer: SocketAddrV4,
}

/// `<pod> <peer>`: who answered, and the peer it saw (of either family).
fn parse_who<P>(text: &str) -> anyhow::Result<(String, P)>
where
    P: std::str::FromStr,
    P::Err: std::error::Error + Send + Sync + 'static,
{
    let mut it = text.split_whitespace();
    let pod = it.next().context("empty answer")?.to_string();
    let peer = it.next().context("answer without peer")?.parse()?;
    Ok((pod, peer))
}

fn parse_answer(text: &str) -> anyhow::Result<Answer> {
    parse_who(text).map(|(pod, peer)| Answer { pod, peer })
}

/// One TCP connection to `to`: `WHO`, the answer's text.
fn tcp_who_text(to: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"WHO\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// One UDP exchange with `to` from `local` (a fresh socket, so a new
/// flow), a few tries: the first datagram of a flow can race ARP or
/// neighbour discovery. The answer's text.
fn udp_who_text(local: SocketAddr, to: SocketAddr) -> anyhow::Result<String> {
    let s = UdpSocket::bind(local)?;
    s.connect(to)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 256];
    for _ in 0..5 {
        s.send(b"WHO")?;
        if let Ok(n) = s.recv(&mut buf) {
            return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    anyhow::bail!("no UDP answer from {to}")
}

/// One TCP connection to `to`: `WHO`, read the answer.
pub fn tcp_who(to: SocketAddrV4) -> anyhow::Result<Answer> {
    parse_answer(&tcp_who_text(to.into())?)
}

/// `tcp_who`, but the client closes the connection first, as HTTP
/// clients with keep-alive off do.
pub fn tcp_who_client_closes(to: SocketAddrV4) -> anyhow::Result<Answer> {
    let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"WHOWAIT\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    parse_answer(&line)
}

/// One UDP exchange from a fresh socket (a new flow each time).
pub fn udp_who(to: SocketAddrV4) -> anyhow::Result<Answer> {
    udp_who_from(0, to)
}

/// `udp_who` from source port `local` (0: the kernel picks one, and may
/// pick one an earlier flow used, whose conntrack entry still names its
/// backend).
pub fn udp_who_from(local: u16, to: SocketAddrV4) -> anyhow::Result<Answer> {
    let local = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), local);
    parse_answer(&udp_who_text(local, to.into())?)
}

/// A `BIG` UDP datagram of `n` bytes to `to`; the answer is as long. Who
/// answered, and the answer's length.
pub fn udp_big(to: SocketAddrV4, n: usize) -> anyhow::Result<(Answer, usize)> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect(to)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut question = vec![b'.'; n];
    question[..3].copy_from_slice(b"BIG");
    let mut buf = vec![0u8; 65536];
    for _ in 0..4 {
        s.send(&question)?;
        if let Ok(got) = s.recv(&mut buf) {
            let answer = parse_answer(&String::from_utf8_lossy(&buf[..got]))?;
            return Ok((answer, got));
        }
    }
    anyhow::bail!("no answer to a {n}-byte datagram from {to}")
}

/// Who answered a `WHO` over IPv6, and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer6 {
    pub pod: String,
    pub peer: SocketAddrV6,
}

fn answer6((pod, peer): (String, SocketAddrV6)) -> Answer6 {
    Answer6 { pod, peer }
}

/// `tcp_who` over IPv6.
pub fn tcp_who6(to: SocketAddrV6) -> anyhow::Result<Answer6> {
    parse_who(&tcp_who_text(to.into())?).map(answer6)
}

/// `udp_who` over IPv6.
pub fn udp_who6(to: SocketAddrV6) -> anyhow::Result<Answer6> {
    let local = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0);
    parse_who(&udp_who_text(local, to.into())?).map(answer6)
}

/// An idle TCP connection (`ECHO`): who answered, and the open stream.
pub fn tcp_echo_open(to: SocketAddrV4) -> anyhow::Result<(String, TcpStream)> {
    let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"ECHO\n")?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut name = String::new();
    reader.read_line(&mut name)?;
    Ok((name.trim().to_string(), s))
}

/// One line through an `ECHO` connection: the name of the pod that
/// answered it (an error if the connection was reset or moved).
pub fn tcp_echo(s: &mut TcpStream, line: &str) -> anyhow::Result<String> {
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut back = String::new();
    reader.read_line(&mut back)?;
    let (name, echoed) = back
        .trim_end()
        .split_once(' ')
        .with_context(|| format!("echo answer {back:?}"))?;
    anyhow::ensure!(echoed == line, "echoed {echoed:?} for {line:?}");
    Ok(name.to_string())
}

/// Uploads `n` bytes of the pattern with `UPLOAD`; the server checks them.
pub fn tcp_upload(to: impl Into<SocketAddr>, n: u64) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    writeln!(s, "UPLOAD {n}")?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < n {
        let len = buf.len().min((n - sent) as usize);
        fill_pattern(&mut buf[..len], sent);
        s.write_all(&buf[..len])?;
        sent += len as u64;
    }
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    anyhow::ensure!(
        answer.trim() == format!("OK {n}"),
        "server answered {answer:?}"
    );
    Ok(())
}

/// Downloads `n` bytes with `BULK` and checks every byte of the pattern.
pub fn tcp_bulk(to: impl Into<SocketAddr>, n: u64) -> anyhow::Result<u64> {
    let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(s, "BULK {n}")?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let len = s.read(&mut buf)?;
        if len == 0 {
            break;
        }
        for (k, &b) in buf[..len].iter().enumerate() {
            anyhow::ensure!(
                b == pattern(got + k as u64),
                "byte {} corrupted",
                got + k as u64
            );
        }
        got += len as u64;
    }
    anyhow::ensure!(got == n, "got {got} of {n} bytes");
    Ok(got)
}

/// A `STREAM` connection read continuously on its own thread: how the
/// tests see an established connection keep flowing through a change.
pub struct StreamReader {
    /// The pod that answered.
    pub backend: String,
    bytes: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl StreamReader {
    /// Connects from `ns` to `to` and starts reading.
    pub fn open(ns: &Netns, to: impl Into<std::net::SocketAddr>) -> anyhow::Result<StreamReader> {
        let to: std::net::SocketAddr = to.into();
        let (backend, mut sock) = ns.run(move || -> anyhow::Result<(String, TcpStream)> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            s.write_all(b"STREAM\n")?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut name = Vec::new();
            let mut byte = [0u8; 1];
            while byte[0] != b'\n' {
                s.read_exact(&mut byte)?;
                name.push(byte[0]);
            }
            Ok((String::from_utf8_lossy(&name).trim().to_string(), s))
        })??;
        let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (bytes, stop) = (bytes.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    let n = sock.read(&mut buf).context("reading the stream")?;
                    anyhow::ensure!(n > 0, "the stream was closed by the other end");
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(())
            })
        };
        Ok(StreamReader {
            backend,
            bytes,
            stop,
            handle: Some(handle),
        })
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Waits until at least `more` further bytes arrive (within `within`),
    /// failing if the connection broke or stalled.
    pub fn wait_for_more(&self, more: u64, within: Duration) -> anyhow::Result<()> {
        let start = self.bytes();
        let deadline = std::time::Instant::now() + crate::patience(within);
        while self.bytes() < start + more {
            if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
                anyhow::bail!(
                    "the stream to {} stopped after {} bytes",
                    self.backend,
                    self.bytes()
                );
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the stream to {} stalled at {} bytes",
                self.backend,
                self.bytes()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Stops reading; the error if the connection failed at any point.
    pub fn finish(mut self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("running")
            .join()
            .expect("reader panicked")?;
        Ok(self.bytes())
    }
}
