//! Where Services, EndpointSlices and the Node come from: a YAML file
//! (stand-alone, `file`) or the Kubernetes API (in a cluster,
//! `kubernetes`). Each source sends `Update`s, in the order things
//! happened, to the agent loop, which feeds them to the `Catalog`; nothing
//! Service-specific happens here.

mod file;
mod kubernetes;
pub mod manifest;

use std::time::Instant;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::model::Rejection;

pub use file::{read_file, watch_file, EMPTY_GRACE};
pub use kubernetes::{kube_client, watch_kubernetes, API_CALLS};

/// One change, stamped with when the agent received it (sync latency is
/// measured from here to the maps written).
#[derive(Debug)]
pub struct Update {
    pub received: Instant,
    pub what: What,
}

#[derive(Debug)]
pub enum What {
    Services(Change<Service>),
    Slices(Change<EndpointSlice>),
    Node(Change<Node>),
    /// A watch of this kind failed: changes may be missed until it is back
    /// (the datapath keeps serving; health counts it as a pending change).
    Lost(&'static str),
    /// The watch of this kind works again.
    Back(&'static str),
    /// The whole file, read again.
    File {
        services: Vec<Service>,
        slices: Vec<EndpointSlice>,
        rejections: Vec<Rejection>,
    },
}

#[derive(Debug)]
pub enum Change<K> {
    Applied(K),
    Deleted(K),
    /// A list begins (at start, and after a lost watch); a list that began
    /// before and did not end is abandoned.
    ListBegins,
    /// Part of the list in progress (kube-runtime lists in pages), sent as
    /// it arrives: the catalog keeps slices validated, a few bytes an
    /// endpoint, so 10,000 of the API's EndpointSlice objects (56 MB) never
    /// sit in memory at once.
    Listing(Vec<K>),
    /// The last part of a list (at start, and after a lost watch): whatever
    /// was in no part of it is gone.
    Listed(Vec<K>),
}

/// Objects per `Change::Listing` part: kube-runtime's page size.
pub const LIST_PART: usize = 500;

pub type Updates = UnboundedReceiver<Update>;

pub(crate) fn send(tx: &UnboundedSender<Update>, what: What) -> bool {
    tx.send(Update {
        received: Instant::now(),
        what,
    })
    .is_ok()
}
