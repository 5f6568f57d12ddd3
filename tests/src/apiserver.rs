//! A test Kubernetes API server: list and watch of Services,
//! EndpointSlices and Nodes over real HTTP, the way the real one answers
//! (no Kubernetes API server can be installed here). The unmodified kube
//! client in the agent talks to it through a kubeconfig.
//!
//! What it implements, as the real server does:
//! - one resourceVersion counter for all objects; each write bumps it and
//!   stamps the object;
//! - list with `limit`/`continue` pages and `fieldSelector=metadata.name=`;
//!   the list's resourceVersion is where a watch resumes;
//! - watch from a resourceVersion: ADDED/MODIFIED/DELETED replayed from
//!   history, then live, with BOOKMARK events when asked; a
//!   resourceVersion older than the compacted history gets an ERROR event
//!   with status 410 Gone (`compact`), which forces a relist;
//! - `drop_connections` cuts every open connection mid-stream; `stop` and
//!   `start` take the server away and bring it back on the same address.
//!
//! Every request is recorded (`requests`), so a test can check the agent's
//! API calls against the RBAC rules in deploy/.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::{sync::broadcast, task::JoinSet};

use crate::netns::Netns;

/// The resources served, by URL path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    fn of_path(path: &str) -> Option<Resource> {
        match path {
            "/api/v1/services" => Some(Resource::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Resource::EndpointSlices),
            "/api/v1/nodes" => Some(Resource::Nodes),
            _ => None,
        }
    }

    /// (API group, resource) as RBAC names them.
    pub fn rbac(self) -> (&'static str, &'static str) {
        match self {
            Resource::Services => ("", "services"),
            Resource::EndpointSlices => ("discovery.k8s.io", "endpointslices"),
            Resource::Nodes => ("", "nodes"),
        }
    }

    fn of_kind(kind: &str) -> Option<Resource> {
        match kind {
            "Service" => Some(Resource::Services),
            "EndpointSlice" => Some(Resource::EndpointSlices),
            "Node" => Some(Resource::Nodes),
            _ => None,
        }
    }

    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Resource::Services => ("v1", "ServiceList"),
            Resource::EndpointSlices => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Resource::Nodes => ("v1", "NodeList"),
        }
    }
}

/// One request the server received, as RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub method: String,
    pub path: String,
    /// list, watch, or "?" for a path this server does not serve.
    pub verb: String,
    pub resource: Option<Resource>,
}

type Key = (String, String);

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<Resource, BTreeMap<Key, Value>>,
    history: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    calls: Vec<Call>,
}

struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
}

/// The server; stopped on drop.
pub struct ApiServer {
    shared: Arc<Shared>,
    rt: tokio::runtime::Runtime,
    ns: Option<String>,
    addr: SocketAddr,
    tasks: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// How often idle watches get a BOOKMARK.
    pub bookmark_every: Duration,
}

impl ApiServer {
    /// Listens on `addr` inside network namespace `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr) -> anyhow::Result<ApiServer> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (events, _) = broadcast::channel(1 << 16);
        let server = ApiServer {
            shared: Arc::new(Shared {
                store: Mutex::new(Store {
                    rv: 1000,
                    ..Default::default()
                }),
                events,
            }),
            rt,
            ns: Some(ns.name.clone()),
            addr,
            tasks: Mutex::new(None),
            bookmark_every: Duration::from_secs(1),
        };
        server.listen()?;
        Ok(server)
    }

    /// `http://addr`, for a kubeconfig.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file pointing at this server.
    pub fn kubeconfig(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n\
             users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
             current-context: test\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    fn listen(&self) -> anyhow::Result<()> {
        let addr = self.addr;
        let ns = self.ns.clone().expect("netns");
        // A socket belongs to the namespace it was made in: bind on a
        // thread that moved there.
        let listener = std::thread::spawn(move || -> anyhow::Result<std::net::TcpListener> {
            let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the test API server on {addr} in {ns}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .expect("bind thread")?;
        let shared = self.shared.clone();
        let bookmark_every = self.bookmark_every;
        let _guard = self.rt.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let accept = self.rt.spawn(async move {
            // Dropped with this task: aborting it cuts every connection.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                while connections.try_join_next().is_some() {}
                let shared = shared.clone();
                let service = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(handle(&shared, req, bookmark_every)) }
                });
                connections.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        *self.tasks.lock().unwrap() = Some(accept);
        Ok(())
    }

    /// Cuts every open connection (watches end mid-stream) and keeps
    /// listening.
    pub fn drop_connections(&self) -> anyhow::Result<()> {
        self.stop();
        self.listen()
    }

    /// The API server goes away: the listener closes and every connection
    /// is cut.
    pub fn stop(&self) {
        if let Some(accept) = self.tasks.lock().unwrap().take() {
            accept.abort();
            let _ = self.rt.block_on(accept);
        }
    }

    /// Back on the same address after `stop`.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.listen()
    }

    /// Forgets all history: a watch resuming from before now gets 410 Gone.
    pub fn compact(&self) {
        let mut s = self.shared.store.lock().unwrap();
        s.compacted = s.rv;
        s.history.clear();
    }

    pub fn requests(&self) -> Vec<Call> {
        self.shared.store.lock().unwrap().calls.clone()
    }

    /// Creates or replaces an object (a k8s-openapi value).
    pub fn apply<T: serde::Serialize + k8s_openapi::Resource>(&self, obj: &T) {
        let mut v = serde_json::to_value(obj).expect("serializable");
        v["apiVersion"] = json!(T::API_VERSION);
        v["kind"] = json!(T::KIND);
        self.apply_value(v);
    }

    /// Creates or replaces an object given as JSON with kind and apiVersion.
    pub fn apply_value(&self, mut v: Value) {
        let resource = Resource::of_kind(v["kind"].as_str().unwrap_or_default())
            .unwrap_or_else(|| panic!("the test API server does not serve {}", v["kind"]));
        let key = key_of(&v);
        let mut s = self.shared.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        if v["metadata"]["uid"].is_null() {
            v["metadata"]["uid"] = json!(format!("uid-{}-{}", key.0, key.1));
        }
        let old = s
            .objects
            .entry(resource)
            .or_default()
            .insert(key, v.clone());
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.record(&mut s, rv, resource, kind, v);
    }

    /// Deletes an object by kind, namespace and name (a no-op if absent).
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let resource = Resource::of_kind(kind).expect("served kind");
        let mut s = self.shared.store.lock().unwrap();
        let key = (namespace.to_string(), name.to_string());
        let Some(mut v) = s.objects.entry(resource).or_default().remove(&key) else {
            return;
        };
        s.rv += 1;
        let rv = s.rv;
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(&mut s, rv, resource, "DELETED", v);
    }

    /// Every object of the YAML stream (Services, EndpointSlices, Nodes),
    /// in order.
    pub fn apply_yaml(&self, yaml: &str) {
        use serde::Deserialize;
        for doc in yaml_serde::Deserializer::from_str(yaml) {
            let v: Value = Value::deserialize(doc).expect("YAML");
            if v.is_null() {
                continue;
            }
            if v["kind"] == "List" {
                for item in v["items"].as_array().cloned().unwrap_or_default() {
                    self.apply_value(item);
                }
            } else {
                self.apply_value(v);
            }
        }
    }

    /// Objects of a kind, by (namespace, name).
    pub fn names(&self, kind: &str) -> Vec<(String, String)> {
        let resource = Resource::of_kind(kind).expect("served kind");
        let s = self.shared.store.lock().unwrap();
        s.objects
            .get(&resource)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn record(
        &self,
        s: &mut Store,
        rv: u64,
        resource: Resource,
        kind: &'static str,
        object: Value,
    ) {
        let e = Event {
            rv,
            resource,
            kind,
            object,
        };
        s.history.push(e.clone());
        let _ = self.shared.events.send(e);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn key_of(v: &Value) -> Key {
    let ns = v["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
    (ns, name)
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

fn status_error(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), percent_decode(v))
        })
        .collect()
}

/// Query values are percent-encoded (`metadata.name%3Dnode-a`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(n) => {
                out.push(n);
                i += 3;
            }
            None => {
                out.push(if b[i] == b'+' { b' ' } else { b[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// `metadata.name=X` selects one name; no selector selects all.
fn selected(v: &Value, field_selector: Option<&String>) -> bool {
    match field_selector.and_then(|s| s.strip_prefix("metadata.name=")) {
        Some(name) => v["metadata"]["name"].as_str() == Some(name),
        None => true,
    }
}

fn handle(
    shared: &Arc<Shared>,
    req: Request<hyper::body::Incoming>,
    bookmark_every: Duration,
) -> Response<Body> {
    let q = query(&req);
    let resource = Resource::of_path(req.uri().path());
    let watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    shared.store.lock().unwrap().calls.push(Call {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        verb: match (req.method().as_str(), resource, watch) {
            ("GET", Some(_), true) => "watch".into(),
            ("GET", Some(_), false) => "list".into(),
            _ => "?".into(),
        },
        resource,
    });
    let Some(resource) = resource.filter(|_| req.method() == hyper::Method::GET) else {
        return full(
            StatusCode::NOT_FOUND,
            status_error(
                404,
                "NotFound",
                "the test API server serves list and watch only",
            ),
        );
    };
    if watch {
        watch_response(shared, resource, &q, bookmark_every)
    } else {
        list_response(shared, resource, &q)
    }
}

fn list_response(
    shared: &Arc<Shared>,
    resource: Resource,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let s = shared.store.lock().unwrap();
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|&l| l > 0)
        .unwrap_or(usize::MAX);
    // continue = "<resourceVersion of the first page>/<last key served>"
    let (rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let (rv, key) = c.split_once('/').unwrap_or((c, ""));
            let rv: u64 = rv.parse().unwrap_or(0);
            if rv < s.compacted {
                return full(
                    StatusCode::GONE,
                    status_error(410, "Expired", "the provided continue parameter is too old"),
                );
            }
            (rv, Some(key.to_string()))
        }
        None => (s.rv, None),
    };
    let empty = BTreeMap::new();
    let all = s.objects.get(&resource).unwrap_or(&empty);
    let mut items = Vec::new();
    let mut last = None;
    let mut more = false;
    for (k, v) in all {
        let flat = format!("{}\u{1}{}", k.0, k.1);
        if after.as_ref().is_some_and(|a| flat.as_str() <= a.as_str()) {
            continue;
        }
        if !selected(v, q.get("fieldSelector")) {
            continue;
        }
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(v.clone());
        last = Some(flat);
    }
    let (api_version, kind) = resource.list_kind();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if more {
        metadata["continue"] = json!(format!("{rv}/{}", last.unwrap_or_default()));
    }
    full(
        StatusCode::OK,
        json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "items": items}),
    )
}

fn watch_line(kind: &str, object: &Value) -> Result<Frame<Bytes>, Infallible> {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Ok(Frame::data(Bytes::from(line)))
}

fn watch_response(
    shared: &Arc<Shared>,
    resource: Resource,
    q: &BTreeMap<String, String>,
    bookmark_every: Duration,
) -> Response<Body> {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let selector = q.get("fieldSelector").cloned();
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290),
    );
    let (replay, live, now) = {
        let s = shared.store.lock().unwrap();
        if from < s.compacted {
            let gone = status_error(
                410,
                "Expired",
                &format!("too old resource version: {from} ({})", s.compacted),
            );
            let body = StreamBody::new(futures::stream::iter([watch_line("ERROR", &gone)]));
            return Response::builder()
                .header("content-type", "application/json")
                .body(BodyExt::boxed(body))
                .expect("response");
        }
        let replay: Vec<Event> = s
            .history
            .iter()
            .filter(|e| e.rv > from && e.resource == resource)
            .cloned()
            .collect();
        (replay, shared.events.subscribe(), s.rv)
    };
    let sel = selector.clone();
    let replayed = futures::stream::iter(replay)
        .filter(move |e| futures::future::ready(selected(&e.object, sel.as_ref())))
        .map(|e| watch_line(e.kind, &e.object));
    let api_kind = match resource {
        Resource::Services => ("v1", "Service"),
        Resource::EndpointSlices => ("discovery.k8s.io/v1", "EndpointSlice"),
        Resource::Nodes => ("v1", "Node"),
    };
    let live = futures::stream::unfold(
        (live, now, tokio::time::Instant::now() + timeout),
        move |(mut rx, mut last_rv, deadline)| {
            let selector = selector.clone();
            async move {
                loop {
                    let tick = tokio::time::sleep(bookmark_every);
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => return None,
                        e = rx.recv() => match e {
                            Ok(e) if e.resource == resource && e.rv > last_rv => {
                                last_rv = e.rv;
                                if selected(&e.object, selector.as_ref()) {
                                    return Some((watch_line(e.kind, &e.object), (rx, last_rv, deadline)));
                                }
                            }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return None,
                        },
                        _ = tick, if bookmarks => {
                            let bm = json!({"apiVersion": api_kind.0, "kind": api_kind.1,
                                            "metadata": {"resourceVersion": last_rv.to_string()}});
                            return Some((watch_line("BOOKMARK", &bm), (rx, last_rv, deadline)));
                        }
                    }
                }
            }
        },
    );
    let body = StreamBody::new(replayed.chain(live));
    Response::builder()
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .expect("response")
}
