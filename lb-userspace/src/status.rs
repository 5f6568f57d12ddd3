//! The agent's own HTTP endpoint (`--http-addr`): `/healthz` for liveness
//! (the process runs and its programs are attached), `/readyz` for
//! readiness (the first complete sync is programmed), `/metrics` for
//! Prometheus. The DaemonSet's probes point here.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::Context;
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};

use crate::metrics::Metrics;

#[derive(Debug)]
pub struct Status {
    attached: AtomicBool,
    ready: AtomicBool,
    pub metrics: Metrics,
}

impl Status {
    pub fn new(metrics: Metrics) -> Arc<Status> {
        Arc::new(Status {
            attached: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            metrics,
        })
    }

    pub fn set_attached(&self) {
        self.attached.store(true, Ordering::Relaxed);
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }
}

/// Binds `addr` and serves in the background.
pub async fn serve(addr: SocketAddr, status: Arc<Status>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the status endpoint on {addr} (choose another with --http-addr)")
    })?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(status);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("status endpoint stopped: {e}");
        }
    });
    Ok(())
}

async fn healthz(State(s): State<Arc<Status>>) -> impl IntoResponse {
    if s.attached.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok: datapath attached\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: datapath not attached yet\n",
        )
    }
}

async fn readyz(State(s): State<Arc<Status>>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok: synced and programmed\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: initial sync not programmed yet\n",
        )
    }
}

async fn metrics(State(s): State<Arc<Status>>) -> impl IntoResponse {
    // Reading the maps makes syscalls: off the async threads.
    let body = tokio::task::spawn_blocking(move || s.metrics.render())
        .await
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}
