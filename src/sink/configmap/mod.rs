//! The ConfigMap sink: one server-side apply (field manager `slipstream`)
//! writes a binding's whole content together with the cursor it reflects, so
//! data and cursor can never disagree (invariant 1).
//!
//! Writes carry `metadata.resourceVersion` from the last read or write as a
//! precondition: a concurrent writer makes the apply fail with 409 instead
//! of silently interleaving, and the caller re-reads and compares cursors
//! before trying again (invariant 2).
//!
//! The parts: [`annotations`] (what a write records besides the content),
//! [`object`] (the objects a write sends), [`observed`] (what a read tells).

pub mod annotations;
pub mod object;
pub mod observed;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};

use crate::{crd::CreationPolicy, kv::WatchCursor, projection::Projected, reason::Reason};
pub use annotations::*;
use object::ApplyBody;
pub use object::{TargetRef, desired};
pub use observed::{ConfigMapHead, ContentHashes, Observed, foreign_keys};

pub type Result<T, E = SinkError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Someone wrote the ConfigMap since we read it; re-read and retry.
    #[error("the ConfigMap changed since it was read (409 Conflict)")]
    Conflict,
    #[error("{0}")]
    TargetConflict(String),
    /// The ConfigMap already reflects a newer cursor than this writer has.
    #[error("refusing to write cursor {ours}: the ConfigMap already holds cursor {theirs}")]
    StaleWriter { ours: String, theirs: String },
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
}

impl SinkError {
    pub fn reason(&self) -> Reason {
        match self {
            SinkError::Conflict => Reason::WriteConflict,
            SinkError::TargetConflict(_) => Reason::TargetConflict,
            SinkError::StaleWriter { .. } => Reason::StaleWriter,
            SinkError::Kube(kube::Error::Api(s)) if s.code == 404 => Reason::NotFound,
            SinkError::Kube(kube::Error::Api(s)) if s.code == 403 => Reason::Forbidden,
            SinkError::Kube(kube::Error::Api(s)) if s.code == 422 => Reason::Invalid,
            SinkError::Kube(_) => Reason::KubernetesError,
        }
    }

    /// Namespace gone or being deleted: writing cannot succeed.
    pub fn is_not_found(&self) -> bool {
        matches!(self, SinkError::Kube(kube::Error::Api(s)) if s.code == 404)
    }
}

impl From<kube::Error> for SinkError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 409 => SinkError::Conflict,
            e => SinkError::Kube(e),
        }
    }
}

/// Writes ConfigMaps of one Kubernetes client.
#[derive(Clone)]
pub struct ConfigMapSink {
    client: Client,
}

impl ConfigMapSink {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn api(&self, namespace: &str) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The same objects, read back as [`ConfigMapHead`].
    fn head_api(&self, namespace: &str) -> Api<ConfigMapHead> {
        Api::namespaced(self.client.clone(), namespace)
    }

    pub async fn read(&self, namespace: &str, name: &str) -> Result<Option<ConfigMap>> {
        Ok(self.api(namespace).get_opt(name).await?)
    }

    /// Creates the ConfigMap empty, carrying only our claim and label
    /// (create-only, so two bindings cannot both take it); returns its
    /// resourceVersion, the precondition of the apply that follows.
    pub async fn create_empty(&self, target: &TargetRef) -> Result<Option<String>> {
        let mut skeleton = desired(target, &Projected::default(), WatchCursor::none(), None);
        if let Some(a) = skeleton.metadata.annotations.as_mut() {
            a.retain(|k, _| k == BINDING_ANNOTATION);
        }
        skeleton.metadata.labels = Some(BTreeMap::from([(
            MANAGED_BY_LABEL.to_owned(),
            MANAGED_BY_VALUE.to_owned(),
        )]));
        let pp = PostParams {
            field_manager: Some(CREATE_FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let created = self.api(&target.namespace).create(&pp, &skeleton).await?;
        Ok(created.metadata.resource_version)
    }

    /// The JSON body [`Self::apply`] sends (for profiling the write path
    /// without a server: `examples/profile_flush.rs`).
    pub fn apply_body_json(
        target: &TargetRef,
        content: &Projected<'_>,
        cursor: WatchCursor,
        resource_version: Option<&str>,
    ) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(&ApplyBody::new(target, content, cursor, resource_version))
    }

    /// One server-side apply of the whole content and its cursor.
    /// `resource_version` is the precondition (none: create, or first write).
    pub async fn apply(
        &self,
        target: &TargetRef,
        content: &Projected<'_>,
        cursor: WatchCursor,
        resource_version: Option<&str>,
    ) -> Result<Observed> {
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let written = self
            .head_api(&target.namespace)
            .patch(
                &target.name,
                &pp,
                &Patch::Apply(&ApplyBody::new(target, content, cursor, resource_version)),
            )
            .await?;
        Ok(Observed::from_head(written))
    }

    /// Writes the content and cursor AND removes `foreign` keys (added by
    /// hand, owned by another field manager, which an apply cannot remove)
    /// in one merge patch guarded by `resource_version`.
    pub async fn replace_content(
        &self,
        target: &TargetRef,
        content: &Projected<'_>,
        cursor: WatchCursor,
        foreign: &[String],
        resource_version: &str,
    ) -> Result<Observed> {
        let desired = desired(target, content, cursor, Some(resource_version));
        let mut patch = serde_json::to_value(&desired)
            .map_err(|e| SinkError::Kube(kube::Error::SerdeError(e)))?;
        for field in ["data", "binaryData"] {
            let map = patch
                .as_object_mut()
                .map(|o| o.entry(field).or_insert_with(|| serde_json::json!({})));
            if let Some(serde_json::Value::Object(m)) = map {
                for k in foreign {
                    m.entry(k.clone()).or_insert(serde_json::Value::Null);
                }
            }
        }
        let written = self
            .head_api(&target.namespace)
            .patch(
                &target.name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(&patch),
            )
            .await?;
        Ok(Observed::from_head(written))
    }

    /// Carries out `deletionPolicy` when a binding goes.
    /// Delete: delete the ConfigMap (Owner) or withdraw our keys (Merge).
    /// Retain: keep the content, drop the owner reference and our claim.
    pub async fn release(&self, target: &TargetRef, delete: bool) -> Result<()> {
        let api = self.api(&target.namespace);
        let Some(cm) = api.get_opt(&target.name).await? else {
            return Ok(());
        };
        let observed = Observed::from_configmap(&cm);
        if observed.binding.as_deref() != Some(target.binding.as_str()) {
            return Ok(());
        }
        let result = match (delete, target.policy) {
            (true, CreationPolicy::Owner) => api
                .delete(&target.name, &DeleteParams::default())
                .await
                .map(|_| ()),
            (true, CreationPolicy::Merge) => {
                let empty = serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": target.name, "namespace": target.namespace},
                });
                api.patch(
                    &target.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&empty),
                )
                .await
                .map(|_| ())
            }
            (false, _) => {
                let patch = serde_json::json!({
                    "metadata": {
                        "ownerReferences": null,
                        "annotations": {BINDING_ANNOTATION: null},
                    }
                });
                api.patch(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
            }
        };
        match result {
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            other => Ok(other?),
        }
    }
}
