//! healthCheckNodePort servers: for each LoadBalancer Service with
//! externalTrafficPolicy Local, an HTTP server on its healthCheckNodePort
//! tells the cloud load balancer whether this node has a ready endpoint of
//! it, so traffic is only sent to nodes that will not drop it. The answer is
//! kube-proxy's: 200 with the count of local ready endpoints, 503 with none
//! (terminating endpoints do not count), JSON body, and the
//! `X-Load-Balancing-Endpoint-Weight` header; and 503 with
//! `serviceProxyHealthy: false` whatever the endpoints while the agent
//! itself is unhealthy (its maps may be stale: see `status`).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{
    extract::State,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Router,
};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::status::Status;
use crate::model::HealthCheck;

struct Server {
    state: Arc<RwLock<HealthCheck>>,
    task: JoinHandle<()>,
}

/// The running servers, one per healthCheckNodePort.
pub struct HealthServers {
    servers: BTreeMap<u16, Server>,
    status: Arc<Status>,
}

impl HealthServers {
    pub fn new(status: Arc<Status>) -> HealthServers {
        HealthServers {
            servers: BTreeMap::new(),
            status,
        }
    }

    /// Starts, updates and stops servers to match `checks`. A port that
    /// cannot be bound is logged and tried again on the next update.
    pub async fn update(&mut self, checks: &BTreeMap<u16, HealthCheck>) {
        let gone: Vec<u16> = self
            .servers
            .keys()
            .filter(|p| !checks.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(s) = self.servers.remove(&port) {
                s.task.abort();
                let _ = s.task.await;
                info!(port, "health check server stopped");
            }
        }
        for (&port, check) in checks {
            if let Some(s) = self.servers.get(&port) {
                *s.state.write().expect("not poisoned") = check.clone();
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(port, service = %format!("{}/{}", check.namespace, check.name), "cannot serve healthCheckNodePort: {e}");
                    continue;
                }
            };
            let state = Arc::new(RwLock::new(check.clone()));
            let app = Router::new()
                .fallback(answer)
                .with_state((state.clone(), self.status.clone()));
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    warn!(port, "health check server failed: {e}");
                }
            });
            info!(port, service = %format!("{}/{}", check.namespace, check.name), "health check server started");
            self.servers.insert(port, Server { state, task });
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for s in self.servers.values() {
            s.task.abort();
        }
    }
}

async fn answer(State((state, agent)): State<(Arc<RwLock<HealthCheck>>, Arc<Status>)>) -> Response {
    let check = state.read().expect("not poisoned").clone();
    let (status, body) = render(&check, agent.healthy());
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "X-Load-Balancing-Endpoint-Weight",
        HeaderValue::from(check.local_endpoints),
    );
    r
}

/// Status and body for a health check (pure, for tests).
pub fn render(check: &HealthCheck, proxy_healthy: bool) -> (StatusCode, String) {
    let status = if check.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    (status, body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(n: usize) -> HealthCheck {
        HealthCheck {
            namespace: "shop".into(),
            name: "lb".into(),
            local_endpoints: n,
        }
    }

    #[test]
    fn answers_like_kube_proxy() {
        let (status, body) = render(&check(2), true);
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["service"]["namespace"], "shop");
        assert_eq!(v["service"]["name"], "lb");
        assert_eq!(v["localEndpoints"], 2);
        let (status, body) = render(&check(0), true);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"localEndpoints\":0"), "{body}");
        // An unhealthy agent's endpoints count for nothing.
        let (status, body) = render(&check(2), false);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"serviceProxyHealthy\":false"), "{body}");
    }
}
