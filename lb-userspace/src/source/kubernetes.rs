//! The Kubernetes source: watches of Services, EndpointSlices and this
//! node's Node, relisted after a lost watch.

use std::path::Path;

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
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tracing::{info, warn};

use super::{send, Change, Update, Updates, What, LIST_PART};

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

/// kube-runtime's default backoff waits at most 30 s between attempts: a
/// failing watch without a new error for longer than this is working.
const WATCH_BACK_AFTER: std::time::Duration = std::time::Duration::from_secs(40);

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
        // Objects of a list in progress (Init .. InitDone) not sent yet,
        // and how many were.
        let mut listing: Vec<K> = Vec::new();
        let mut listed = 0;
        // The error last logged: each cause is logged once, not per retry.
        let mut failing: Option<String> = None;
        let mut listed_once = false;
        loop {
            // A failing watch that has been quiet for longer than kube's
            // backoff cap reconnected (kube resumes a watch without
            // emitting anything).
            let event = if failing.is_some() {
                match tokio::time::timeout(WATCH_BACK_AFTER, stream.next()).await {
                    Ok(e) => e,
                    Err(_) => {
                        failing = None;
                        info!(resource = kind, "watch is back");
                        if !send(&tx, What::Back(kind)) {
                            return;
                        }
                        continue;
                    }
                }
            } else {
                stream.next().await
            };
            let Some(event) = event else { return };
            let change = match event {
                Err(e) => {
                    let cause = e.to_string();
                    if failing.is_none() && !send(&tx, What::Lost(kind)) {
                        return;
                    }
                    if failing.as_ref() != Some(&cause) {
                        warn!(resource = kind, "watch failed, retrying with backoff; the datapath keeps serving the last good state: {cause}");
                        failing = Some(cause);
                    }
                    continue;
                }
                Ok(event) => {
                    if failing.take().is_some() {
                        info!(resource = kind, "watch is back");
                        if !send(&tx, What::Back(kind)) {
                            return;
                        }
                    }
                    event
                }
            };
            let change = match change {
                watcher::Event::Init => {
                    listing.clear();
                    listed = 0;
                    Change::ListBegins
                }
                watcher::Event::InitApply(obj) => {
                    listing.push(obj);
                    if listing.len() < LIST_PART {
                        continue;
                    }
                    listed += listing.len();
                    Change::Listing(std::mem::take(&mut listing))
                }
                watcher::Event::InitDone => {
                    let count = listed + listing.len();
                    listed = 0;
                    if listed_once {
                        info!(resource = kind, count, "relisted");
                    } else {
                        info!(resource = kind, count, "listed");
                        listed_once = true;
                    }
                    Change::Listed(std::mem::take(&mut listing))
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
