//! ConfigBindings as the controller lists and watches them. One that does
//! not deserialize (written under an older or hand-edited CRD, e.g.
//! `prefixes: "g."` or `keyPolicy: Bogus`) would fail the whole list, and
//! with it every binding; read through [`ListedBinding`] it is reported
//! (log line, Event, Ready False `InvalidSpec`) and left out, and the others
//! sync as if it were not there.

use std::collections::HashSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::watcher,
};
use serde::{Deserialize, Deserializer};
use tracing::warn;

use super::{
    context::Context,
    status::{self, Health, publish_event, set_conditions},
};
use crate::{
    crd::{ConfigBinding, ConfigBindingSpec, ConfigBindingStatus},
    metrics::BindingLabels,
    reason::Reason,
    util::lock,
};

/// A ConfigBinding read leniently: its metadata always, the typed object
/// when it deserializes, else why not.
#[derive(Clone, Debug, kube::Resource)]
#[resource(inherit = ConfigBinding)]
pub struct ListedBinding {
    pub metadata: ObjectMeta,
    pub parsed: Result<Box<ConfigBinding>, String>,
}

impl<'de> Deserialize<'de> for ListedBinding {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let metadata = match value.get("metadata") {
            Some(m) => ObjectMeta::deserialize(m).map_err(serde::de::Error::custom)?,
            None => ObjectMeta::default(),
        };
        let parsed = ConfigBinding::deserialize(value)
            .map(Box::new)
            .map_err(|e| e.to_string());
        Ok(Self { metadata, parsed })
    }
}

impl ListedBinding {
    /// A typed stand-in carrying only the metadata, for telling the
    /// reflector that a binding which no longer deserializes is gone.
    fn stand_in(&self) -> ConfigBinding {
        let spec = ConfigBindingSpec {
            bucket: String::new(),
            prefixes: Vec::new(),
            strip_prefix: false,
            key_policy: Default::default(),
            target: Default::default(),
            suspend: false,
        };
        let mut b = ConfigBinding::new(&self.name_any(), spec);
        b.metadata = self.metadata.clone();
        b
    }
}

/// Turns watch events of [`ListedBinding`]s into events of the typed
/// bindings; a binding that does not deserialize is reported once per
/// resourceVersion, its worker stopped, and it is removed from the cache.
pub(super) struct Splitter {
    reported: std::sync::Mutex<HashSet<(String, String)>>,
}

impl Splitter {
    pub(super) fn new() -> Self {
        Self {
            reported: Default::default(),
        }
    }

    pub(super) async fn split(
        &self,
        ctx: &Context,
        ev: watcher::Event<ListedBinding>,
    ) -> Option<watcher::Event<ConfigBinding>> {
        use watcher::Event as E;
        let (listed, delete) = match ev {
            E::Init => return Some(E::Init),
            E::InitDone => return Some(E::InitDone),
            E::Apply(l) => (l, false),
            E::InitApply(l) => match l.parsed {
                Ok(b) => return Some(E::InitApply(*b)),
                Err(_) => (l, false),
            },
            E::Delete(l) => (l, true),
        };
        match (&listed.parsed, delete) {
            (Ok(b), false) => Some(E::Apply((**b).clone())),
            (Ok(b), true) => {
                self.gone(ctx, &listed);
                Some(E::Delete((**b).clone()))
            }
            (Err(_), true) => {
                self.gone(ctx, &listed);
                Some(E::Delete(listed.stand_in()))
            }
            (Err(why), false) => {
                self.report(ctx, &listed, why).await;
                // no longer served: stop what an older, valid version started
                let key = (listed.namespace().unwrap_or_default(), listed.name_any());
                ctx.stop_worker(&key);
                Some(E::Delete(listed.stand_in()))
            }
        }
    }

    /// The binding is gone from the API: nothing of it may keep running or
    /// keep its metric series.
    fn gone(&self, ctx: &Context, listed: &ListedBinding) {
        let key = (listed.namespace().unwrap_or_default(), listed.name_any());
        ctx.stop_worker(&key);
        ctx.metrics.forget_binding(&key.0, &key.1);
    }

    async fn report(&self, ctx: &Context, listed: &ListedBinding, why: &str) {
        let name = listed.name_any();
        let namespace = listed.namespace().unwrap_or_default();
        let version = listed.resource_version().unwrap_or_default();
        if !lock(&self.reported).insert((listed.uid().unwrap_or_default(), version)) {
            return;
        }
        let reason = Reason::InvalidSpec;
        let message = format!("the ConfigBinding does not match this operator's schema: {why}");
        ctx.metrics.error(reason);
        warn!(binding = %name, %namespace, reason = reason.as_str(), detail = %message, "binding not served");
        let health = Health::err(reason, message, true);
        let mut status = ConfigBindingStatus::default();
        set_conditions(&mut status, &health, listed.metadata.generation);
        let labels = BindingLabels {
            namespace: namespace.clone(),
            binding: name.clone(),
        };
        ctx.metrics.set_conditions(&labels, &status.conditions);
        if !*ctx.gate.borrow() {
            return;
        }
        let api: Api<ListedBinding> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = serde_json::json!({"status": {"conditions": status.conditions}});
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            warn!(binding = %name, %namespace, error = %e, "status not written");
        }
        publish_event(&ctx.recorder, listed, &health, status::Action::Validate).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_that_does_not_deserialize_keeps_its_metadata_and_the_error() {
        let good = r#"{"apiVersion":"slipstream.io/v1alpha1","kind":"ConfigBinding",
            "metadata":{"name":"g","namespace":"ns","uid":"1"},
            "spec":{"bucket":"b","prefixes":["g."]}}"#;
        let listed: ListedBinding = serde_json::from_str(good).unwrap();
        assert_eq!(listed.parsed.unwrap().spec.prefixes, ["g."]);
        for bad in [
            r#""prefixes":"g.""#,
            r#""prefixes":["g."],"keyPolicy":"Bogus""#,
        ] {
            let text = format!(
                r#"{{"metadata":{{"name":"bad","namespace":"ns"}},"spec":{{"bucket":"b",{bad}}}}}"#
            );
            let listed: ListedBinding = serde_json::from_str(&text).unwrap();
            assert_eq!(listed.name_any(), "bad");
            assert!(listed.parsed.is_err(), "{bad}");
            assert_eq!(listed.stand_in().name_any(), "bad");
        }
    }
}
