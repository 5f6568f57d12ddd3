//! The agent's own endpoints, with kube-proxy's meaning:
//!
//! - `--http-addr` (default `0.0.0.0:10256`, kube-proxy's healthz port):
//!   `/healthz` is 200 while the datapath is attached and no change has
//!   waited longer than `--health-timeout` to reach the maps (a write that
//!   keeps failing, a lost API watch), 503 otherwise, with kube-proxy's
//!   JSON (`lastUpdated`, `currentTime`); `/readyz` is the same once the
//!   first complete sync is programmed; `/livez` only says the process runs
//!   with its programs attached (the DaemonSet's liveness probe: restarting
//!   the agent does not bring a lost API server back).
//! - `--metrics-addr` (default `127.0.0.1:10249`, kube-proxy's metrics
//!   port, on loopback because the metrics name every Service):
//!   `/metrics` and `/proxyMode`.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};

use super::metrics::Metrics;

#[derive(Debug)]
pub struct Status {
    attached: AtomicBool,
    ready: AtomicBool,
    health: Mutex<Health>,
    timeout: Duration,
    pub metrics: Metrics,
}

#[derive(Debug, Default, Clone, Copy)]
struct Health {
    /// When the oldest change not yet in the maps arrived.
    pending_since: Option<Instant>,
    /// When the maps last caught up with everything.
    last_updated: Option<SystemTime>,
}

/// The health answer at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub healthy: bool,
    pub body: String,
}

impl Status {
    pub fn new(metrics: Metrics, timeout: Duration) -> Arc<Status> {
        Arc::new(Status {
            attached: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            health: Mutex::new(Health::default()),
            timeout,
            metrics,
        })
    }

    pub fn set_attached(&self) {
        self.attached.store(true, Ordering::Relaxed);
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// A change arrived at `at` (or the source was lost then) and is not in
    /// the maps yet.
    pub fn queued(&self, at: Instant) {
        let mut h = self.health.lock().expect("health lock");
        h.pending_since.get_or_insert(at);
    }

    /// Every change so far is in the maps.
    pub fn updated(&self) {
        let mut h = self.health.lock().expect("health lock");
        h.pending_since = None;
        h.last_updated = Some(SystemTime::now());
    }

    /// Healthy, per kube-proxy's rule, at `now`.
    pub fn healthy(&self) -> bool {
        self.verdict(Instant::now(), SystemTime::now()).healthy
    }

    pub fn verdict(&self, now: Instant, wall: SystemTime) -> Verdict {
        let h = *self.health.lock().expect("health lock");
        judge(
            self.attached.load(Ordering::Relaxed),
            h.pending_since,
            h.last_updated,
            self.timeout,
            now,
            wall,
        )
    }
}

/// kube-proxy's health rule: healthy unless a change has been waiting
/// longer than `timeout` (and, for us, the datapath is attached). Pure.
pub fn judge(
    attached: bool,
    pending_since: Option<Instant>,
    last_updated: Option<SystemTime>,
    timeout: Duration,
    now: Instant,
    wall: SystemTime,
) -> Verdict {
    let waiting = pending_since.map(|p| now.saturating_duration_since(p));
    let healthy = attached && waiting.is_none_or(|w| w <= timeout);
    let stamp = |t: SystemTime| {
        k8s_openapi::jiff::Timestamp::try_from(t)
            .map(|t| t.to_string())
            .unwrap_or_default()
    };
    let body = serde_json::json!({
        "lastUpdated": last_updated.map(stamp).unwrap_or_default(),
        "currentTime": stamp(wall),
        "attached": attached,
        "pendingSeconds": waiting.map(|w| w.as_secs_f64()),
        "healthTimeoutSeconds": timeout.as_secs(),
    });
    Verdict {
        healthy,
        body: body.to_string(),
    }
}

/// Binds `addr` for /healthz, /readyz, /livez and serves in the background.
pub async fn serve_health(addr: SocketAddr, status: Arc<Status>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/livez", get(livez))
        .with_state(status);
    spawn_server(addr, app, "--http-addr").await
}

/// Binds `addr` for /metrics and /proxyMode and serves in the background.
pub async fn serve_metrics(addr: SocketAddr, status: Arc<Status>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/proxyMode", get(|| async { "ebpf" }))
        .with_state(status);
    spawn_server(addr, app, "--metrics-addr").await
}

async fn spawn_server(addr: SocketAddr, app: Router, flag: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} (choose another with {flag}, or \"off\")"))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("HTTP endpoint stopped: {e}");
        }
    });
    Ok(())
}

fn json(code: StatusCode, body: String) -> impl IntoResponse {
    (code, [(header::CONTENT_TYPE, "application/json")], body)
}

async fn healthz(State(s): State<Arc<Status>>) -> impl IntoResponse {
    let v = s.verdict(Instant::now(), SystemTime::now());
    let code = if v.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, v.body)
}

async fn readyz(State(s): State<Arc<Status>>) -> impl IntoResponse {
    let v = s.verdict(Instant::now(), SystemTime::now());
    let code = if v.healthy && s.ready.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, v.body)
}

async fn livez(State(s): State<Arc<Status>>) -> impl IntoResponse {
    if s.attached.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok: datapath attached\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: datapath not attached yet\n",
        )
    }
}

async fn metrics(State(s): State<Arc<Status>>) -> impl IntoResponse {
    // Reading the maps makes syscalls: off the async threads.
    let body = tokio::task::spawn_blocking(move || s.metrics.render_cached())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_once_a_change_waits_longer_than_the_timeout() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let timeout = Duration::from_secs(60);
        let at = |s| t0 + Duration::from_secs(s);
        assert!(
            !judge(false, None, None, timeout, t0, wall).healthy,
            "not attached"
        );
        assert!(judge(true, None, None, timeout, t0, wall).healthy);
        assert!(judge(true, Some(t0), None, timeout, at(60), wall).healthy);
        let v = judge(true, Some(t0), Some(wall), timeout, at(61), wall);
        assert!(!v.healthy);
        let body: serde_json::Value = serde_json::from_str(&v.body).unwrap();
        assert_eq!(body["lastUpdated"], "2027-01-15T08:00:00Z");
        assert_eq!(body["currentTime"], "2027-01-15T08:00:00Z");
        assert_eq!(body["pendingSeconds"], 61.0);
    }
}
