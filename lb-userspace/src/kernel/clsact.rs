//! TC without TCX (kernels before 6.6): a `clsact` qdisc on the interface
//! and a direct-action `bpf` filter on its ingress or egress hook, made and
//! found through rtnetlink.
//!
//! Such a filter is not a bpf_link: nothing can be pinned for it, and it
//! stays attached when the agent exits (which is what restarts want). So
//! the filter itself carries what the agent needs to know later, and no
//! other record is kept:
//!
//! - ours: priority [`PRIORITY`], a handle whose major is [`HANDLE_MAJOR`],
//!   and one of our programs' names (the kernel reports the name given at
//!   attach time). Filters another tool put there never match all three.
//! - whether the agent added the `clsact` qdisc: bit [`QDISC_OURS`] of the
//!   handle's minor. Cleanup removes the qdisc only when that bit is set on
//!   a filter it removed and no other filter is left on the qdisc.
//!
//! A restarted agent finds its filter at the same priority and handle and
//! replaces the program in it with one RTM_NEWTFILTER without NLM_F_CREATE
//! or NLM_F_EXCL: cls_bpf swaps the program in place (RCU), so there is no
//! moment without a program.
//!
//! The requests are synchronous, one at a time on a netlink socket opened
//! for the call: attaching runs inline in the agent's interface loop and in
//! `lb cleanup`, where rtnetlink's asynchronous connection would need a
//! task of its own for every call. The messages are netlink-packet-route's.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use rtnetlink::{
    packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
        NLM_F_EXCL, NLM_F_REQUEST,
    },
    packet_route::{
        tc::{TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
        RouteNetlinkMessage,
    },
    sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr},
};

/// Our filters' priority: first on the hook (lower runs earlier), as
/// Cilium's legacy TC filters are.
pub const PRIORITY: u16 = 1;
/// Our filters' handle major ("LB").
pub const HANDLE_MAJOR: u16 = 0x4c42;
/// Set in the handle's minor when the agent added the clsact qdisc.
pub const QDISC_OURS: u16 = 1;

const ETH_P_ALL: u16 = 0x0003;

/// A clsact hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    fn parent(self) -> TcHandle {
        TcHandle {
            major: u16::MAX,
            minor: match self {
                Direction::Ingress => TcHandle::MIN_INGRESS,
                Direction::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }
}

/// One filter on a clsact hook, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    pub kind: String,
    /// The bpf filter's program name and id (other kinds: empty, 0).
    pub program: String,
    pub program_id: u32,
}

impl Filter {
    /// One of ours: our priority, our handle major, and a program whose
    /// name is one of `names`.
    pub fn is_ours(&self, names: &[&str]) -> bool {
        self.priority == PRIORITY
            && (self.handle >> 16) as u16 == HANDLE_MAJOR
            && self.kind == "bpf"
            && names.contains(&self.program.as_str())
    }

    /// Whether the agent that made this filter added the qdisc too.
    pub fn qdisc_ours(&self) -> bool {
        self.handle as u16 & QDISC_OURS != 0
    }
}

/// The handle of a filter we make.
pub fn our_handle(qdisc_ours: bool) -> u32 {
    (u32::from(HANDLE_MAJOR) << 16) | u32::from(if qdisc_ours { QDISC_OURS } else { 0 })
}

/// Whether `ifindex` has a clsact qdisc.
pub fn has_clsact(ifindex: u32) -> io::Result<bool> {
    let mut msg = TcMessage::with_index(0);
    msg.header.parent = TcHandle::UNSPEC;
    let replies = request(RouteNetlinkMessage::GetQueueDiscipline(msg), NLM_F_DUMP)?;
    Ok(replies.iter().any(|m| {
        m.header.index == ifindex as i32
            && m.attributes
                .iter()
                .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
    }))
}

/// Adds a clsact qdisc to `ifindex`: true if added, false if one was there
/// already (someone else's, or added concurrently).
pub fn add_clsact(ifindex: u32) -> io::Result<bool> {
    match request(
        RouteNetlinkMessage::NewQueueDiscipline(clsact_message(ifindex)),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes the clsact qdisc of `ifindex` (and every filter on it).
pub fn del_clsact(ifindex: u32) -> io::Result<()> {
    request(
        RouteNetlinkMessage::DelQueueDiscipline(clsact_message(ifindex)),
        0,
    )
    .map(drop)
}

fn clsact_message(ifindex: u32) -> TcMessage {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.handle = TcHandle {
        major: u16::MAX,
        minor: 0,
    };
    msg.header.parent = TcHandle::CLSACT;
    msg.attributes.push(TcAttribute::Kind("clsact".into()));
    msg
}

/// The filters on one hook of `ifindex` (none without a clsact qdisc).
pub fn filters(ifindex: u32, dir: Direction) -> io::Result<Vec<Filter>> {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = dir.parent();
    let replies = match request(RouteNetlinkMessage::GetTrafficFilter(msg), NLM_F_DUMP) {
        Ok(r) => r,
        // No clsact qdisc (EINVAL), or the interface is gone (ENODEV).
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENODEV | libc::ENOENT)
            ) =>
        {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e),
    };
    Ok(replies
        .into_iter()
        // The first message of each priority describes the chain, handle 0.
        .filter(|m| u32::from(m.header.handle) != 0)
        .map(|m| {
            let mut f = Filter {
                priority: (m.header.info >> 16) as u16,
                handle: m.header.handle.into(),
                kind: String::new(),
                program: String::new(),
                program_id: 0,
            };
            for a in m.attributes {
                match a {
                    TcAttribute::Kind(k) => f.kind = k,
                    TcAttribute::Options(opts) => {
                        for o in opts {
                            match o {
                                TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => f.program = n,
                                TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => f.program_id = id,
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            f
        })
        .collect())
}

/// Puts the program `fd` (named `name`) in a direct-action filter with our
/// priority and `handle` on hook `dir` of `ifindex`. `replace`: the filter
/// exists and gets the program swapped in place; else it is created (and
/// creating fails if one exists).
pub fn set_filter(
    ifindex: u32,
    dir: Direction,
    handle: u32,
    fd: BorrowedFd<'_>,
    name: &str,
    replace: bool,
) -> io::Result<()> {
    let mut msg = filter_message(ifindex, dir, handle);
    msg.attributes.push(TcAttribute::Options(vec![
        TcOption::Bpf(TcFilterBpfOption::ProgFd(fd.as_raw_fd() as u32)),
        TcOption::Bpf(TcFilterBpfOption::ProgName(name.into())),
        TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
    ]));
    let flags = if replace {
        0
    } else {
        NLM_F_CREATE | NLM_F_EXCL
    };
    request(RouteNetlinkMessage::NewTrafficFilter(msg), flags).map(drop)
}

/// Removes our filter with `handle` from hook `dir` of `ifindex`.
pub fn del_filter(ifindex: u32, dir: Direction, handle: u32) -> io::Result<()> {
    request(
        RouteNetlinkMessage::DelTrafficFilter(filter_message(ifindex, dir, handle)),
        0,
    )
    .map(drop)
}

fn filter_message(ifindex: u32, dir: Direction, handle: u32) -> TcMessage {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = dir.parent();
    msg.header.handle = handle.into();
    // tcm_info: priority in the upper half, protocol (network order) in
    // the lower.
    msg.header.info = (u32::from(PRIORITY) << 16) | u32::from(ETH_P_ALL.to_be());
    msg.attributes.push(TcAttribute::Kind("bpf".into()));
    msg
}

/// Sends one request and collects the replies of a dump (or the ack). A
/// refusal becomes an io::Error with the kernel's extended-ack text when
/// it gave one ("Parent Qdisc doesn't exists").
fn request(msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<TcMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    // Errors carry the kernel's message, and echo only the request's header.
    let _ = socket.set_ext_ack(true);
    let _ = socket.set_cap_ack(true);
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < n {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => match e.code {
                    None => return Ok(out),
                    Some(code) => {
                        let os = io::Error::from_raw_os_error(-code.get());
                        return Err(match ext_ack_message(&e.header) {
                            Some(text) => io::Error::new(os.kind(), format!("{text} ({os})")),
                            None => os,
                        });
                    }
                },
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewTrafficFilter(m)
                    | RouteNetlinkMessage::NewQueueDiscipline(m),
                ) => out.push(m),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += (len + 3) & !3;
        }
    }
}

/// NLMSGERR_ATTR_MSG from the attributes after the echoed request header.
fn ext_ack_message(echo: &[u8]) -> Option<String> {
    const NLMSGHDR_LEN: usize = 16;
    const NLMSGERR_ATTR_MSG: u16 = 1;
    let mut attrs = echo.get(NLMSGHDR_LEN..)?;
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &attrs[4..len];
            let end = text.iter().position(|b| *b == 0).unwrap_or(text.len());
            return Some(String::from_utf8_lossy(&text[..end]).into_owned());
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(priority: u16, handle: u32, program: &str) -> Filter {
        Filter {
            priority,
            handle,
            kind: "bpf".into(),
            program: program.into(),
            program_id: 7,
        }
    }

    #[test]
    fn ours_needs_priority_handle_and_name() {
        let names = ["lb_tc_ingress"];
        assert!(filter(1, our_handle(false), "lb_tc_ingress").is_ours(&names));
        assert!(filter(1, our_handle(true), "lb_tc_ingress").is_ours(&names));
        assert!(!filter(2, our_handle(false), "lb_tc_ingress").is_ours(&names));
        assert!(!filter(1, 0x1_0001, "lb_tc_ingress").is_ours(&names));
        assert!(!filter(1, our_handle(false), "cil_from_container").is_ours(&names));
    }

    #[test]
    fn the_handle_says_who_added_the_qdisc() {
        assert!(filter(1, our_handle(true), "x").qdisc_ours());
        assert!(!filter(1, our_handle(false), "x").qdisc_ours());
        assert_ne!(
            our_handle(false),
            0,
            "handle 0 would ask the kernel for one"
        );
    }

    #[test]
    fn the_kernels_refusal_text_is_read_from_the_ack() {
        let mut echo = vec![0u8; 16];
        let text = b"Parent Qdisc doesn't exists\0";
        let len = (4 + text.len()) as u16;
        echo.extend_from_slice(&len.to_ne_bytes());
        echo.extend_from_slice(&1u16.to_ne_bytes());
        echo.extend_from_slice(text);
        assert_eq!(
            ext_ack_message(&echo).as_deref(),
            Some("Parent Qdisc doesn't exists")
        );
        assert_eq!(ext_ack_message(&[0u8; 16]), None);
    }
}
