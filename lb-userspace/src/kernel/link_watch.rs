//! The node's interfaces as rtnetlink reports them: every link once at
//! start-up, then one event per link created, renamed, moved in or out, or
//! deleted (RTM_NEWLINK / RTM_DELLINK on RTNLGRP_LINK), and every link again
//! whenever the kernel says events were lost (the socket's buffer overran).
//! The subscription is made before the first listing, so nothing falls
//! between the two. IPv4 addresses added or removed (RTNLGRP_IPV4_IFADDR)
//! are reported too, without detail: the agent lists them again itself.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        link::{LinkAttribute, LinkLayerType, LinkMessage},
        AddressFamily, RouteNetlinkMessage,
    },
    sys::AsyncSocket,
    Handle, MulticastGroup,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::{error, warn};

use crate::kernel::interfaces::{Link, LinkKind};

/// What changed among the namespace's links.
#[derive(Debug)]
pub enum LinkEvent {
    /// Every link (start-up, and after an overrun).
    All(Vec<Link>),
    /// Created, renamed, moved into the namespace, or its state changed.
    Changed(Link),
    /// Deleted or moved to another namespace (by index).
    Removed(u32),
    /// An IPv4 address was added or removed somewhere.
    Addresses,
    /// The event stream ended: interfaces are no longer followed.
    Lost(String),
}

/// Room for bursts (a node starting many pods at once) while the agent is
/// busy, e.g. programming a large cluster at start-up. Forced past
/// `net.core.rmem_max` where the agent may (CAP_NET_ADMIN).
const RECEIVE_BUFFER: usize = 8 << 20;

/// Subscribes to link events, lists every link, and returns the events,
/// the first one being `LinkEvent::All`.
pub async fn watch_links() -> anyhow::Result<UnboundedReceiver<LinkEvent>> {
    let (mut conn, handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Ipv4Ifaddr])
            .map_err(|e| anyhow::anyhow!("opening an rtnetlink socket for link events: {e}"))?;
    let socket = conn.socket_mut().socket_mut();
    // The tests shrink it to force overruns (a flood of link events).
    let size = std::env::var("LB_NETLINK_RCVBUF")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RECEIVE_BUFFER);
    if nix::sys::socket::setsockopt(&*socket, nix::sys::socket::sockopt::RcvBufForce, &size)
        .is_err()
    {
        let _ = socket.set_rx_buf_sz(size);
    }
    tokio::spawn(conn);
    let first = list(&handle)
        .await
        .map_err(|e| anyhow::anyhow!("listing the network interfaces through rtnetlink: {e}"))?;
    let (tx, rx) = unbounded_channel();
    let _ = tx.send(LinkEvent::All(first));
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            if !forward(message, &handle, &tx).await {
                return;
            }
        }
        let _ = tx.send(LinkEvent::Lost(
            "the rtnetlink link event stream ended".into(),
        ));
    });
    Ok(rx)
}

/// Passes one multicast message on; false once nobody listens.
async fn forward(
    message: NetlinkMessage<RouteNetlinkMessage>,
    handle: &Handle,
    tx: &UnboundedSender<LinkEvent>,
) -> bool {
    let event = match message.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
            link_of(&m).map(LinkEvent::Changed)
        }
        // AF_BRIDGE messages are about bridge ports (a port leaving its
        // bridge is a DELLINK of family AF_BRIDGE, the device remains).
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m))
            if m.header.interface_family == AddressFamily::Unspec =>
        {
            Some(LinkEvent::Removed(m.header.index))
        }
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_),
        ) => Some(LinkEvent::Addresses),
        NetlinkPayload::Overrun(_) => {
            warn!("link events were lost (the netlink socket's buffer overran): listing every interface again");
            let mut delay = Duration::from_millis(100);
            loop {
                match list(handle).await {
                    Ok(all) => break Some(LinkEvent::All(all)),
                    Err(e) => {
                        error!("listing the network interfaces failed, retrying: {e}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        _ => None,
    };
    match event {
        Some(e) => tx.send(e).is_ok(),
        None => !tx.is_closed(),
    }
}

async fn list(handle: &Handle) -> Result<Vec<Link>, rtnetlink::Error> {
    let messages: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    Ok(messages.iter().filter_map(link_of).collect())
}

/// A link of the namespace (family AF_UNSPEC, with a name).
fn link_of(m: &LinkMessage) -> Option<Link> {
    if m.header.interface_family != AddressFamily::Unspec {
        return None;
    }
    let name = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    let kind = match m.header.link_layer_type {
        LinkLayerType::Ether => LinkKind::Ethernet,
        LinkLayerType::Loopback => LinkKind::Loopback,
        _ => LinkKind::Other,
    };
    Some(Link {
        index: m.header.index,
        name,
        kind,
    })
}
