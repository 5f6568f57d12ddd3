//! Where Services, EndpointSlices and the Node come from: a YAML file
//! (stand-alone) or the Kubernetes API (in a cluster). Each source sends
//! `Update`s, in the order things happened, to the agent loop, which feeds
//! them to the `Catalog`; nothing Service-specific happens here.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};
use notify::{RecursiveMode, Watcher};
use serde::de::DeserializeOwned;
use tokio::{
    sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender},
    time::timeout,
};
use tracing::{error, info, warn};

use crate::{manifest, model::Rejection};

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
    /// A complete list (at start, and after a lost watch): whatever is not
    /// in it is gone.
    Listed(Vec<K>),
}

pub type Updates = UnboundedReceiver<Update>;

fn send(tx: &UnboundedSender<Update>, what: What) -> bool {
    tx.send(Update {
        received: Instant::now(),
        what,
    })
    .is_ok()
}

// ---------------------------------------------------------------- file

/// Quiet time after the last file event before we reload: editors and
/// `kubectl get > file` write in several steps.
const DEBOUNCE_QUIET: Duration = Duration::from_millis(100);
/// Upper bound on the wait, so a file rewritten in a loop is still applied
/// well within a second.
const DEBOUNCE_MAX: Duration = Duration::from_millis(400);

/// Reads and parses the config file. Errors only when the file as a whole
/// cannot be used (unreadable, YAML syntax).
pub fn read_file(path: &Path) -> anyhow::Result<What> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let objects =
        manifest::parse(&text).with_context(|| format!("config file {}", path.display()))?;
    Ok(What::File {
        services: objects.services,
        slices: objects.slices,
        rejections: objects.rejections,
    })
}

/// Watches `path` and sends its whole contents at start and after every
/// change. The first read must succeed (so a broken file stops the agent
/// before it touches the kernel); a later broken version is logged and
/// skipped, and the agent keeps the last good state.
pub fn watch_file(path: PathBuf) -> anyhow::Result<Updates> {
    // A missing or broken file is reported as such, before anything else.
    read_file(&path)?;
    let (tx, rx) = unbounded_channel();
    let (events_tx, mut events) = unbounded_channel();
    let file_name = path.file_name().map(|n| n.to_os_string());
    // Watch the directory, not the file: a rename over the file replaces
    // the inode a file watch would be bound to.
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            // Our own reads show up as access events: only writes count.
            let write = matches!(
                ev.kind,
                notify::EventKind::Create(_)
                    | notify::EventKind::Remove(_)
                    | notify::EventKind::Modify(
                        notify::event::ModifyKind::Data(_)
                            | notify::event::ModifyKind::Name(_)
                            | notify::event::ModifyKind::Any
                    )
            );
            if write
                && ev
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_os_string()) == file_name)
            {
                let _ = events_tx.send(());
            }
        }
    })?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    // Read after the watch is in place: no change can fall in between.
    send(&tx, read_file(&path)?);
    tokio::spawn(async move {
        let _watcher = watcher;
        while events.recv().await.is_some() {
            let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
            while tokio::time::Instant::now() < deadline {
                match timeout(DEBOUNCE_QUIET, events.recv()).await {
                    Ok(Some(())) => continue,
                    _ => break,
                }
            }
            match read_file(&path) {
                Ok(what) => {
                    if !send(&tx, what) {
                        return;
                    }
                }
                Err(e) => error!("keeping the last good state: {e:#}"),
            }
        }
    });
    Ok(rx)
}

// ---------------------------------------------------------- Kubernetes

/// A client for the API server: `kubeconfig` if given, else the in-cluster
/// service account, else KUBECONFIG or ~/.kube/config.
pub async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes API to talk to (not in a cluster, no KUBECONFIG or ~/.kube/config): \
             give --kubeconfig FILE, or --config FILE to run stand-alone from a YAML file",
        )?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// The API calls the agent makes, as (API group, resource, verbs): the
/// deploy/ ClusterRole grants exactly these (a test checks it against the
/// requests the agent really sends).
pub const API_CALLS: &[(&str, &str, &[&str])] = &[
    ("", "services", &["list", "watch"]),
    ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
    ("", "nodes", &["list", "watch"]),
];

/// Watches Services and EndpointSlices in all namespaces, and the Node
/// named `node_name`. Lost watches, 410 Gone and an unreachable API server
/// are retried with kube-runtime's backoff; a relist comes as
/// `Change::Listed`, so what disappeared meanwhile is removed.
pub fn watch_kubernetes(client: Client, node_name: &str) -> Updates {
    let (tx, rx) = unbounded_channel();
    let everything = watcher::Config::default();
    spawn_watch(
        Api::<Service>::all(client.clone()),
        everything.clone(),
        "Services",
        tx.clone(),
        What::Services,
    );
    spawn_watch(
        Api::<EndpointSlice>::all(client.clone()),
        everything,
        "EndpointSlices",
        tx.clone(),
        What::Slices,
    );
    spawn_watch(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        "Node",
        tx,
        What::Node,
    );
    rx
}

fn spawn_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
    tx: UnboundedSender<Update>,
    wrap: fn(Change<K>) -> What,
) where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut stream = watcher(api, config).default_backoff().boxed();
        // Objects of a list in progress (Init .. InitDone).
        let mut listing: Option<Vec<K>> = None;
        // The error last logged: each cause is logged once, not per retry.
        let mut failing: Option<String> = None;
        let mut listed_once = false;
        while let Some(event) = stream.next().await {
            let change = match event {
                Err(e) => {
                    let cause = e.to_string();
                    if failing.as_ref() != Some(&cause) {
                        warn!(resource = kind, "watch failed, retrying with backoff; the datapath keeps serving the last good state: {cause}");
                        failing = Some(cause);
                    }
                    continue;
                }
                Ok(event) => {
                    if failing.take().is_some() {
                        info!(resource = kind, "watch is back");
                    }
                    event
                }
            };
            let change = match change {
                watcher::Event::Init => {
                    listing = Some(Vec::new());
                    continue;
                }
                watcher::Event::InitApply(obj) => {
                    listing.get_or_insert_with(Vec::new).push(obj);
                    continue;
                }
                watcher::Event::InitDone => {
                    let all = listing.take().unwrap_or_default();
                    if listed_once {
                        info!(resource = kind, count = all.len(), "relisted");
                    } else {
                        info!(resource = kind, count = all.len(), "listed");
                        listed_once = true;
                    }
                    Change::Listed(all)
                }
                watcher::Event::Apply(obj) => Change::Applied(obj),
                watcher::Event::Delete(obj) => Change::Deleted(obj),
            };
            if !send(&tx, wrap(change)) {
                return;
            }
        }
    });
}
