//! The controller: reconciles ConfigBindings, runs one KV watch per bucket
//! ([`hub`]), and one worker per binding ([`worker`]) that coalesces bursts
//! and writes the ConfigMap.
//!
//! The parts: [`context`] (what they share), [`reconcile`] (finalizer,
//! validation, worker lifecycle), [`finalizer`] (on before any write where
//! the garbage collector cannot clean up), [`worker`] (one per binding: catch-up,
//! coalescing, the write path), [`decide`] (the write path's pure step),
//! [`status`] (conditions, status writes, Events), [`hub`] (bucket watches),
//! [`startup`] (the ConfigMaps read back in bulk at start), [`rollout`]
//! (rolling the workloads that consume a binding's ConfigMap).

pub mod context;
pub mod decide;
pub mod finalizer;
pub mod hub;
pub mod listed;
pub mod reconcile;
pub mod rollout;
pub mod startup;
pub mod status;
pub mod worker;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    Api, ResourceExt,
    runtime::{Controller, WatchStreamExt, reflector, watcher},
};
use tracing::{debug, info};

pub use context::{Config, Context};
// Kept for compatibility: tests and examples name these through `controller`.
pub use crate::kv::{KvConnector, nats::NatsConnector};
use crate::{
    crd::ConfigBinding,
    sink::configmap::{
        BINDING_ANNOTATION, ConfigMapHead, MANAGED_BY_LABEL, MANAGED_BY_VALUE, Observed,
    },
};
use context::WorkerMsg;
pub use finalizer::FINALIZER;
pub use reconcile::{Error, Result};

/// Routes ConfigMap changes (hand edits, deletes) to the writing binding's
/// worker, read as [`ConfigMapHead`]: metadata and content hashes, no copy of
/// the content (most events are the echo of our own write).
async fn watch_configmaps(ctx: Arc<Context>) {
    let api: Api<ConfigMapHead> = match &ctx.config.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let wc = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
    let mut stream = watcher(api, wc).boxed();
    while let Some(ev) = stream.next().await {
        let (cm, deleted) = match ev {
            Ok(watcher::Event::Apply(cm)) | Ok(watcher::Event::InitApply(cm)) => (cm, false),
            Ok(watcher::Event::Delete(cm)) => (cm, true),
            Ok(_) => continue,
            Err(e) => {
                debug!(error = %e, "ConfigMap watch error; the watcher retries");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let Some(binding) = cm.annotations().get(BINDING_ANNOTATION).cloned() else {
            continue;
        };
        let key = (cm.namespace().unwrap_or_default(), binding);
        let msg = WorkerMsg::Target((!deleted).then(|| Box::new(Observed::from_head(cm))));
        ctx.send_to_worker(&key, msg);
    }
}

/// Runs the controller until the process is told to stop.
pub async fn run(ctx: Arc<Context>) {
    if ctx.policy.is_allow_all() {
        info!("no access policy given: every namespace may read every bucket and prefix");
    }
    let bindings: Api<listed::ListedBinding> = match &ctx.config.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let cm_task = tokio::spawn(watch_configmaps(ctx.clone()));
    let api_concurrency = u16::try_from(ctx.config.api_concurrency.max(1)).unwrap_or(u16::MAX);
    // the cached copies drop managedFields (about 9 KB per binding, never
    // read); for_stream keeps the reflector otherwise what Controller::new builds
    let (reader, writer) = reflector::store();
    // bindings are read leniently: one that does not deserialize is
    // reported and left out instead of failing every list (`listed`)
    let splitter = Arc::new(listed::Splitter::new());
    let split_ctx = ctx.clone();
    let typed =
        watcher(bindings, watcher::Config::default().any_semantic()).filter_map(move |ev| {
            let (splitter, ctx) = (splitter.clone(), split_ctx.clone());
            async move {
                match ev {
                    Ok(ev) => splitter.split(&ctx, ev).await.map(Ok),
                    Err(e) => Some(Err(e)),
                }
            }
        });
    let trigger = reflector(
        writer,
        typed.modify(|b: &mut ConfigBinding| b.managed_fields_mut().clear()),
    )
    .applied_objects();
    Controller::for_stream(trigger, reader)
        .with_config(kube::runtime::controller::Config::default().concurrency(api_concurrency))
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "reconcile error");
            }
        })
        .await;
    cm_task.abort();
    ctx.shutdown();
}
