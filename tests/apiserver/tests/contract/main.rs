//! Contract tests: each pins one Kubernetes API rule the emulator reproduces,
//! exercised through kube-rs (`Api`, the runtime watcher, a reflector, a
//! `Controller`) and the real `kubectl`.
//!
//! The same binary runs against the emulator (the default) or the real
//! kube-apiserver (`SLIPSTREAM_TEST_APISERVER=real`, one control plane for
//! the binary, a fresh namespace per test), which is the judge: a test that
//! passes on one passes on the other. Tests in a module named `emulator_only`
//! look inside the emulator (storage writes, pause, compaction, its
//! configuration) or show a difference README lists under "How the real
//! server differs"; they always start an emulator of their own, and the real
//! run skips them with `-- --skip emulator_only`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod concurrency;
mod crud;
mod delete;
mod discovery;
mod faults;
mod kubectl;
mod runtime;
mod ssa;
mod status;
mod validation;
mod watch;

use std::time::Duration;

use apiserver::{ApiServer, backend::TestApi};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Namespace},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, CustomResource,
    api::{ApiResource, DynamicObject, ObjectMeta, PostParams},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The test custom resource: `widgets.test.slipstream.io`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "test.slipstream.io",
    version = "v1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus",
    schema = "disabled",
    shortname = "wd"
)]
pub struct WidgetSpec {
    pub size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WidgetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

pub fn widget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.slipstream.io"},
        "spec": {
            "group": "test.slipstream.io",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList", "shortNames": ["wd"]},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["size"],
                            "properties": {
                                "size": {"type": "integer", "minimum": 1, "maximum": 10},
                                "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                                "label": {"type": "string", "pattern": "^[a-z]+$", "minLength": 2, "maxLength": 8},
                                "tags": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "string"}},
                                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                            }
                        },
                        "status": {
                            "type": "object",
                            "properties": {
                                "phase": {"type": "string"},
                                "observedGeneration": {"type": "integer"},
                                "conditions": {
                                    "type": "array",
                                    "x-kubernetes-list-type": "map",
                                    "x-kubernetes-list-map-keys": ["type"],
                                    "items": {"type": "object", "required": ["type", "status"], "properties": {
                                        "type": {"type": "string"}, "status": {"type": "string"}, "reason": {"type": "string"}
                                    }}
                                }
                            }
                        }
                    }
                }}
            }]
        }
    })
}

/// A test's server, chosen by `SLIPSTREAM_TEST_APISERVER` (`emulator`, the
/// default, or `real`), and a client whose default namespace is the test's own
/// (`default` on the emulator, a fresh one on the real control plane).
pub async fn start() -> (TestApi, Client) {
    let api = TestApi::start().await;
    let client = api.client();
    (api, client)
}

/// [`start`] with the Widget CRD installed (through the API, like `kubectl
/// apply`; on the real server once per test binary, shared by its tests).
pub async fn start_with_crd() -> (TestApi, Client) {
    let (api, client) = start().await;
    api.install_crd(&serde_json::from_value(widget_crd()).unwrap())
        .await;
    (api, client)
}

/// An emulator of the test's own, whatever `SLIPSTREAM_TEST_APISERVER` says:
/// for the `emulator_only` tests, which look inside it.
pub async fn start_emulator() -> (ApiServer, Client) {
    let api = ApiServer::start().await.expect("emulator starts");
    let client = api.client();
    (api, client)
}

/// `base` plus a random suffix: a name for a cluster-scoped object (a
/// namespace, a CRD group) that no other test of the binary uses, since the
/// real server's tests share one cluster.
pub fn unique(base: &str) -> String {
    format!("{base}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// The Widget CRD's schema as kind `Gadget` in a group of its own
/// (`gadgets.<group>`, short name `gd<first label of the group>`), for
/// tests that watch a CRD appear or go without touching the shared one (or
/// making `kubectl get widget` or `wd` ambiguous).
pub fn gadget_crd_in(group: &str) -> (Value, ApiResource) {
    let mut crd = widget_crd();
    crd["metadata"]["name"] = json!(format!("gadgets.{group}"));
    crd["spec"]["group"] = json!(group);
    let short = format!("gd{}", group.split('.').next().unwrap().replace('-', ""));
    crd["spec"]["names"] = json!({"plural": "gadgets", "singular": "gadget", "kind": "Gadget",
        "listKind": "GadgetList", "shortNames": [short]});
    let ar = ApiResource {
        group: group.into(),
        version: "v1".into(),
        api_version: format!("{group}/v1"),
        kind: "Gadget".into(),
        plural: "gadgets".into(),
    };
    (crd, ar)
}

/// An object as the server stores it (unknown fields, managed fields and
/// all), as JSON.
pub async fn get_json(client: &Client, ar: &ApiResource, name: &str) -> Value {
    let api: Api<DynamicObject> = Api::default_namespaced_with(client.clone(), ar);
    serde_json::to_value(api.get(name).await.unwrap()).unwrap()
}

pub fn cm(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

pub fn widget(name: &str, size: i64) -> Widget {
    Widget::new(
        name,
        WidgetSpec {
            size,
            ..Default::default()
        },
    )
}

pub async fn create_namespace(client: &Client, name: &str) {
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.create(
        &PostParams::default(),
        &Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

/// The `kube::Error::Api` status of a failed call.
pub fn api_err<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> kube::core::Status {
    match r {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

pub fn rv_of(meta: &ObjectMeta) -> u64 {
    meta.resource_version.as_deref().unwrap().parse().unwrap()
}

/// Polls `f` until it returns `Some` (the garbage collector and controllers
/// are asynchronous; the real ones take seconds on a busy machine).
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after 120 s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
