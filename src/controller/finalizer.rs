//! The binding's finalizer, for the deletion policies the garbage collector
//! cannot carry out: a Merge target's keys withdrawn, a Retain target's
//! owner reference and claim dropped. It is on the binding before anything
//! is written for it, so deleting the binding always runs that cleanup,
//! whichever replica wrote first.
//!
//! An Owner target with `deletionPolicy: Delete` needs none: the ConfigMap
//! names the binding as its controller owner, so Kubernetes' garbage
//! collector deletes it when the binding goes (even one written just after,
//! or while the operator is down). That saves a write per binding, and such
//! a binding never waits on an operator that is not running.

use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
};

use crate::crd::{ConfigBinding, CreationPolicy, DeletionPolicy};

pub const FINALIZER: &str = "slipstream.io/cleanup";

/// Whether deleting `b` needs our cleanup (anything but Owner + Delete).
pub fn needed(b: &ConfigBinding) -> bool {
    let target = &b.spec.target;
    !(target.creation_policy == CreationPolicy::Owner
        && target.deletion_policy == DeletionPolicy::Delete)
}

pub fn has(b: &ConfigBinding) -> bool {
    b.finalizers().iter().any(|f| f == FINALIZER)
}

fn api(client: &Client, b: &ConfigBinding) -> Api<ConfigBinding> {
    Api::namespaced(client.clone(), &b.namespace().unwrap_or_default())
}

/// Replaces the finalizer list, guarded by the resourceVersion `b` was read
/// at (a 409 means it changed: read again). A binding already gone is fine.
pub async fn set(client: &Client, b: &ConfigBinding, list: Vec<String>) -> kube::Result<()> {
    let patch = serde_json::json!({
        "metadata": {"finalizers": list, "resourceVersion": b.resource_version()}
    });
    match api(client, b)
        .patch(
            &b.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes sure the live binding carries the finalizer before a first write.
/// `Ok(false)`: the binding is being deleted or is gone, so write nothing.
pub async fn ensure(client: &Client, b: &ConfigBinding) -> kube::Result<bool> {
    let api = api(client, b);
    for _ in 0..3 {
        let Some(live) = api.get_opt(&b.name_any()).await? else {
            return Ok(false);
        };
        if live.metadata.deletion_timestamp.is_some() {
            return Ok(false);
        }
        if has(&live) {
            return Ok(true);
        }
        let mut list = live.finalizers().to_vec();
        list.push(FINALIZER.to_owned());
        match set(client, &live, list).await {
            Ok(()) => {}
            // changed since the read (another replica, a user): read again
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    let live = api.get_opt(&b.name_any()).await?;
    Ok(live.is_some_and(|l| l.metadata.deletion_timestamp.is_none() && has(&l)))
}
