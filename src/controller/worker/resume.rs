//! At start: the ConfigMap read once (from the bulk list of a start, see
//! [`crate::controller::startup`], else a GET) and, when it is ours and
//! written with the same rules, the binding's entries rebuilt from it, so
//! the catch-up needs only the delta after its cursor.

use std::collections::BTreeMap;

use bytes::Bytes;
use k8s_openapi::api::core::v1::ConfigMap;
use tracing::{debug, info};

use super::Worker;
use crate::{
    controller::{decide::TargetState, startup::Listed, status::Health},
    crd::CreationPolicy,
    kv::mirror::Mirror,
    sink::configmap::{Observed, content_digest},
};

impl Worker {
    /// Reads the ConfigMap once at start (listed, or a GET) and, when it is
    /// ours and was written with the same rules, rebuilds the entries from
    /// it so the catch-up only needs the delta after its cursor.
    pub(super) async fn load_target(&mut self) {
        let listed = self
            .ctx
            .startup
            .take(
                &self.ctx.client,
                &self.ctx.api_permits,
                &self.target.namespace,
                &self.target.name,
            )
            .await;
        let mut listed = match listed {
            Listed::Found(cm) => Some(Some(*cm)),
            // a Merge target is someone else's ConfigMap until we first
            // write it: not carrying our label yet, the list cannot see it
            Listed::Absent if self.target.policy == CreationPolicy::Merge => None,
            Listed::Absent => Some(None),
            Listed::Unknown => None,
        };
        loop {
            let read = match listed.take() {
                Some(cm) => Ok(cm),
                None => {
                    let permit = self.ctx.api_permits.clone().acquire_owned().await.ok();
                    let read = self
                        .ctx
                        .sink
                        .read(&self.target.namespace, &self.target.name)
                        .await;
                    drop(permit);
                    read
                }
            };
            match read {
                Ok(None) => {
                    self.target_state = TargetState::Absent;
                    return;
                }
                Ok(Some(cm)) => {
                    let obs = Observed::from_configmap(&cm);
                    if self.force_sync.is_some() {
                        info!(binding = %self.labels.binding, "force-sync asked: full state-sync");
                    } else if let Some(entries) = self.resumable_entries(&cm, &obs) {
                        self.mirror = Mirror::restored(entries, obs.cursor);
                        self.incarnation = obs.incarnation;
                        info!(binding = %self.labels.binding, cursor = %self.mirror.cursor(), keys = self.mirror.entries().len(),
                              "resuming from the ConfigMap's cursor");
                    }
                    self.target_state = TargetState::Present(Box::new(obs));
                    return;
                }
                Err(e) => {
                    self.set_health(Health::err(e.reason(), e.to_string(), false))
                        .await;
                    tokio::time::sleep(self.backoff.next_delay()).await;
                }
            }
        }
    }

    /// The KV entries a ConfigMap we wrote reflects at its cursor: it names
    /// this binding and generation, its keys map back to KV keys (by the
    /// sources annotation, or by the keys themselves when the rules are
    /// invertible and the target is ours alone), our keys still hold what
    /// we wrote (digest), and no key was skipped (those are not in it). `None` means a full state-sync instead.
    pub(super) fn resumable_entries(
        &self,
        cm: &ConfigMap,
        obs: &Observed,
    ) -> Option<BTreeMap<String, Bytes>> {
        if obs.binding.as_deref() != Some(self.target.binding.as_str())
            || obs.generation != Some(self.target.generation)
            || obs.cursor.is_none()
            || obs.skipped > 0
        {
            return None;
        }
        let written = obs.digest.as_deref()?;
        let data = cm.data.as_ref();
        let binary = cm.binary_data.as_ref();
        let pairs = match obs.sources.as_deref() {
            Some(text) => self.rules.parse_sources(text)?,
            None if self.target.policy == CreationPolicy::Owner && self.rules.is_invertible() => {
                let keys = data
                    .into_iter()
                    .flat_map(|d| d.keys())
                    .chain(binary.into_iter().flat_map(|b| b.keys()));
                keys.map(|k| Some((k.clone(), self.rules.kv_key_of(k)?)))
                    .collect::<Option<Vec<_>>>()?
            }
            None => return None,
        };
        let mut ours_text = BTreeMap::new();
        let mut ours_binary = BTreeMap::new();
        let mut entries = BTreeMap::new();
        for (cm_key, kv_key) in pairs {
            if let Some(v) = data.and_then(|d| d.get(&cm_key)) {
                entries.insert(kv_key, Bytes::copy_from_slice(v.as_bytes()));
                ours_text.insert(cm_key, v.as_bytes());
            } else if let Some(v) = binary.and_then(|b| b.get(&cm_key)) {
                entries.insert(kv_key, Bytes::copy_from_slice(&v.0));
                ours_binary.insert(cm_key, v.0.as_slice());
            } else {
                debug!(binding = %self.labels.binding, key = cm_key, "a key we wrote is gone; full resync");
                return None;
            }
        }
        let now = content_digest(
            ours_text.iter().map(|(k, v)| (k.as_str(), *v)),
            ours_binary.iter().map(|(k, v)| (k.as_str(), *v)),
        );
        if now != written {
            info!(binding = %self.labels.binding, "the ConfigMap was changed since our last write; full resync");
            return None;
        }
        Some(entries)
    }
}
