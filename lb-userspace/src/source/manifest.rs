//! Reads what `kubectl get svc,endpointslices -A -o yaml` prints: a YAML
//! stream of Service and EndpointSlice objects, as several documents or as
//! one `kind: List`. A YAML syntax error fails the whole file (the agent
//! then keeps its last good state); an object of a known kind that does not
//! fit its Kubernetes type is rejected alone.

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;
use yaml_serde::Value;

use crate::model::Rejection;

#[derive(Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub rejections: Vec<Rejection>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("YAML syntax error in document {document}: {source}")]
    Syntax {
        document: usize,
        #[source]
        source: yaml_serde::Error,
    },
}

pub fn parse(text: &str) -> Result<Objects, ManifestError> {
    let mut objects = Objects::default();
    for (i, doc) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).map_err(|source| ManifestError::Syntax {
            document: i + 1,
            source,
        })?;
        add_value(value, &mut objects);
    }
    Ok(objects)
}

fn add_value(value: Value, out: &mut Objects) {
    let Value::Mapping(map) = &value else {
        // Empty documents (a trailing `---`) are null: nothing to do.
        return;
    };
    let kind = map
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    match kind.as_str() {
        "List" | "ServiceList" | "EndpointSliceList" => {
            if let Some(Value::Sequence(items)) = map.get("items") {
                for item in items.clone() {
                    add_value(item, out);
                }
            }
        }
        "Service" => match yaml_serde::from_value::<Service>(value.clone()) {
            Ok(s) => out.services.push(s),
            Err(e) => out.rejections.push(Rejection {
                object: describe("Service", &value),
                reason: e.to_string(),
            }),
        },
        "EndpointSlice" => match yaml_serde::from_value::<EndpointSlice>(value.clone()) {
            Ok(s) => out.slices.push(s),
            Err(e) => out.rejections.push(Rejection {
                object: describe("EndpointSlice", &value),
                reason: e.to_string(),
            }),
        },
        // Other kinds (Endpoints, Pods...) are not ours to read.
        _ => {}
    }
}

/// "Kind ns/name" of an object that failed to deserialize, from its raw fields.
fn describe(kind: &str, value: &Value) -> String {
    let meta = value.get("metadata");
    let field = |k: &str| {
        meta.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    format!(
        "{kind} {}/{}",
        field("namespace").unwrap_or_else(|| "default".into()),
        field("name").unwrap_or_else(|| "<unnamed>".into())
    )
}
