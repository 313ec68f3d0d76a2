//! Reading a workload's digest annotation and setting it: a GET, then one
//! server-side apply of the minimal object (apiVersion, kind, name, the
//! resourceVersion read, and the one pod-template annotation) under the
//! binding's own field manager.

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use serde_json::json;

use crate::crd::WorkloadRef;

/// A workload as the rollout needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The digest annotation on the pod template, if any.
    pub digest: Option<String>,
    /// The precondition of the write that follows.
    pub resource_version: Option<String>,
}

fn api(client: &Client, namespace: &str, w: &WorkloadRef) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("apps", "v1", w.kind.as_str());
    let resource = ApiResource::from_gvk_with_plural(&gvk, w.kind.plural());
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// Reads `w`'s `annotation` from its pod template; `None` when there is no
/// such workload.
pub async fn read(
    client: &Client,
    namespace: &str,
    w: &WorkloadRef,
    annotation: &str,
) -> Result<Option<Seen>, kube::Error> {
    let Some(obj) = api(client, namespace, w).get_opt(&w.name).await? else {
        return Ok(None);
    };
    let digest = obj.data["spec"]["template"]["metadata"]["annotations"][annotation]
        .as_str()
        .map(str::to_owned);
    Ok(Some(Seen {
        digest,
        resource_version: obj.metadata.resource_version,
    }))
}

/// The apply body: only what the field manager owns, plus the
/// resourceVersion precondition.
pub fn apply_body(
    w: &WorkloadRef,
    annotation: &str,
    digest: &str,
    resource_version: Option<&str>,
) -> serde_json::Value {
    let mut metadata = json!({ "name": w.name });
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = json!(rv);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": w.kind.as_str(),
        "metadata": metadata,
        "spec": {"template": {"metadata": {"annotations": {annotation: digest}}}},
    })
}

/// Sets `annotation` to `digest` on `w`'s pod template (409 when the
/// workload changed since `resource_version` was read).
pub async fn apply(
    client: &Client,
    namespace: &str,
    w: &WorkloadRef,
    annotation: &str,
    field_manager: &str,
    digest: &str,
    resource_version: Option<&str>,
) -> Result<(), kube::Error> {
    let body = apply_body(w, annotation, digest, resource_version);
    let pp = PatchParams::apply(field_manager).force();
    api(client, namespace, w)
        .patch(&w.name, &pp, &Patch::Apply(&body))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::WorkloadKind;

    #[test]
    fn the_apply_body_holds_the_annotation_and_nothing_else() {
        let w = WorkloadRef {
            kind: WorkloadKind::StatefulSet,
            name: "db".into(),
        };
        let body = apply_body(&w, "slipstream.io/config-digest-b", "00ff", Some("42"));
        assert_eq!(
            body,
            json!({
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": {"name": "db", "resourceVersion": "42"},
                "spec": {"template": {"metadata": {"annotations": {"slipstream.io/config-digest-b": "00ff"}}}},
            })
        );
    }
}
