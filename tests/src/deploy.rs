//! The manifests in deploy/, parsed into k8s-openapi types strictly: every
//! field must be one the type knows (a document is parsed, written back,
//! and must come out the same), so a misspelt field fails the test instead
//! of being ignored by the cluster.

use std::path::PathBuf;

use anyhow::{bail, Context};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;
use serde_json::Value;

pub fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[derive(Debug, Default)]
pub struct Manifests {
    pub service_accounts: Vec<ServiceAccount>,
    pub cluster_roles: Vec<ClusterRole>,
    pub bindings: Vec<ClusterRoleBinding>,
    pub daemon_sets: Vec<DaemonSet>,
}

/// Every document of every deploy/*.yaml.
pub fn load() -> anyhow::Result<Manifests> {
    let mut out = Manifests::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for (i, doc) in yaml_serde::Deserializer::from_str(&text).enumerate() {
            let what = format!("{} document {}", file.display(), i + 1);
            let v: Value = Value::deserialize(doc).with_context(|| what.clone())?;
            if v.is_null() {
                continue;
            }
            match v["kind"].as_str().unwrap_or_default() {
                "ServiceAccount" => out.service_accounts.push(strict(&v, &what)?),
                "ClusterRole" => out.cluster_roles.push(strict(&v, &what)?),
                "ClusterRoleBinding" => out.bindings.push(strict(&v, &what)?),
                "DaemonSet" => out.daemon_sets.push(strict(&v, &what)?),
                other => bail!("{what}: unexpected kind {other:?}"),
            }
        }
    }
    Ok(out)
}

fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(
    v: &Value,
    what: &str,
) -> anyhow::Result<T> {
    let typed: T = serde_json::from_value(v.clone()).with_context(|| what.to_string())?;
    let back = serde_json::to_value(&typed)?;
    if &back != v {
        bail!(
            "{what}: fields the Kubernetes type does not have (or of the wrong type):\nwritten: {}\nunderstood: {}",
            serde_json::to_string_pretty(v)?,
            serde_json::to_string_pretty(&back)?
        );
    }
    Ok(typed)
}

/// True if `role` allows `verb` on `resource` of API group `group`.
pub fn allows(role: &ClusterRole, group: &str, resource: &str, verb: &str) -> bool {
    role.rules.iter().flatten().any(|r| {
        let has =
            |list: &Option<Vec<String>>, x: &str| list.iter().flatten().any(|e| e == x || e == "*");
        has(&r.api_groups, group)
            && has(&r.resources, resource)
            && (r.verbs.iter().any(|v| v == verb || v == "*"))
    })
}

/// Every (group, resource, verb) the role grants.
pub fn grants(role: &ClusterRole) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for r in role.rules.iter().flatten() {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    out.push((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}
