//! kube-runtime against the server, unmodified: the watcher (list+watch and
//! streaming lists), a reflector store, recovery from closed watches (and,
//! on the emulator, from 410 after compaction), and a `Controller` over a
//! custom resource with a finalizer.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use kube::{
    ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        finalizer::{Event as FinalizerEvent, finalizer},
        reflector, watcher,
        watcher::Config as WatcherConfig,
    },
};

use super::*;

async fn wait_store(store: &reflector::Store<ConfigMap>, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    eventually(&format!("store holds {want:?}"), || async {
        let mut names: Vec<String> = store.state().iter().map(|c| c.name_any()).collect();
        names.sort();
        (names == want).then_some(())
    })
    .await;
}

/// A reflector over `cms` (list-watch, or streaming lists), running.
fn spawn_reflector(
    cms: &Api<ConfigMap>,
    streaming: bool,
) -> (reflector::Store<ConfigMap>, tokio::task::JoinHandle<()>) {
    let (store, writer) = reflector::store::<ConfigMap>();
    let mut cfg = WatcherConfig::default();
    if streaming {
        cfg = cfg.streaming_lists();
    }
    let stream = reflector(writer, watcher(cms.clone(), cfg)).applied_objects();
    (store, tokio::spawn(stream.for_each(|_| async {})))
}

async fn reflector_follows_writes(streaming: bool) {
    let (api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    cms.create(&PostParams::default(), &cm("pre", &[]))
        .await
        .unwrap();
    let (store, task) = spawn_reflector(&cms, streaming);
    wait_store(&store, &["pre"]).await;
    cms.create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    wait_store(&store, &["a", "pre"]).await;
    cms.delete("pre", &DeleteParams::default()).await.unwrap();
    wait_store(&store, &["a"]).await;

    // Closed watches are resumed from the last resourceVersion.
    let opened = || {
        api.requests()
            .iter()
            .filter(|r| r.verb == "watch" && r.resource == "configmaps" && r.status == 200)
            .count()
    };
    let before = opened();
    api.faults().close_watches();
    eventually("watch resumed", || async {
        (opened() > before).then_some(())
    })
    .await;
    cms.create(&PostParams::default(), &cm("b", &[]))
        .await
        .unwrap();
    wait_store(&store, &["a", "b"]).await;
    assert_eq!(
        api.requests().iter().filter(initial_list).count(),
        1,
        "resumed, not listed again"
    );
    task.abort();
}

/// The requests that fetch the whole state: a list, or a streaming list's
/// initial watch.
fn initial_list(r: &&apiserver::RequestRecord) -> bool {
    r.resource == "configmaps" && (r.verb == "list" || r.query.contains("sendInitialEvents=true"))
}

#[tokio::test]
async fn runtime_watcher_with_list_watch_drives_a_reflector_through_closed_watches() {
    reflector_follows_writes(false).await;
}

#[tokio::test]
async fn runtime_watcher_with_streaming_lists_drives_a_reflector_through_closed_watches() {
    reflector_follows_writes(true).await;
}

mod emulator_only {
    use apiserver::Config;

    use super::*;

    /// A re-watch whose resourceVersion was compacted away gets a 410
    /// `ERROR` event; the watcher lists again and converges. (The real
    /// server compacts every 5 minutes on its own, so only the emulator can
    /// show this on demand.)
    async fn relists_after_compaction(streaming: bool) {
        let api = ApiServer::start_with(Config {
            bookmark_interval: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .unwrap();
        let client = api.client();
        let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
        cms.create(&PostParams::default(), &cm("a", &[]))
            .await
            .unwrap();
        let (store, task) = spawn_reflector(&cms, streaming);
        wait_store(&store, &["a"]).await;
        let watches = |n: usize| {
            let api = &api;
            async move {
                let opened = api.requests().iter().filter(|r| r.verb == "watch").count();
                (opened >= n).then_some(())
            }
        };
        eventually("watch open", || watches(1)).await;
        // A write the watcher does not see moves the resourceVersion past its own.
        create_namespace(&client, "elsewhere").await;
        api.faults().compact();
        api.faults().close_watches();
        eventually("watch reopened", || watches(2)).await;
        cms.create(&PostParams::default(), &cm("b", &[]))
            .await
            .unwrap();
        cms.delete("a", &DeleteParams::default()).await.unwrap();
        wait_store(&store, &["b"]).await;
        assert_eq!(
            api.requests().iter().filter(initial_list).count(),
            2,
            "listed again after the 410"
        );
        task.abort();
    }

    #[tokio::test]
    async fn runtime_watcher_with_list_watch_relists_after_compaction() {
        relists_after_compaction(false).await;
    }

    #[tokio::test]
    async fn runtime_watcher_with_streaming_lists_relists_after_compaction() {
        relists_after_compaction(true).await;
    }
}

#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Finalizer(#[from] Box<kube::runtime::finalizer::Error<kube::Error>>),
}

struct Ctx {
    client: Client,
    cleaned: Mutex<Vec<String>>,
}

async fn reconcile(w: Arc<Widget>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let api: Api<Widget> = Api::namespaced(ctx.client.clone(), &w.namespace().unwrap());
    finalizer(&api, "test.slipstream.io/cleanup", w, |ev| async {
        match ev {
            FinalizerEvent::Apply(w) => {
                let status = json!({"apiVersion": "test.slipstream.io/v1", "kind": "Widget",
                    "status": {"phase": format!("Size{}", w.spec.size), "observedGeneration": w.metadata.generation}});
                api.patch_status(&w.name_any(), &PatchParams::apply("widget-controller").force(), &Patch::Apply(status)).await?;
                Ok(Action::await_change())
            }
            FinalizerEvent::Cleanup(w) => {
                ctx.cleaned.lock().unwrap().push(w.name_any());
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| ReconcileError::Finalizer(Box::new(e)))
}

fn error_policy(_w: Arc<Widget>, _e: &ReconcileError, _ctx: Arc<Ctx>) -> Action {
    Action::requeue(Duration::from_millis(100))
}

#[tokio::test]
async fn controller_reconciles_create_update_status_and_delete_with_a_finalizer() {
    let (_api, client) = start_with_crd().await;
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        cleaned: Mutex::new(Vec::new()),
    });
    let ctl = Controller::new(widgets.clone(), WatcherConfig::default())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let task = tokio::spawn(ctl);

    widgets
        .create(&PostParams::default(), &widget("w1", 3))
        .await
        .unwrap();
    let w = eventually("status written", || async {
        let w = widgets.get("w1").await.unwrap();
        (w.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Size3")).then_some(w)
    })
    .await;
    assert_eq!(w.finalizers(), ["test.slipstream.io/cleanup"]);
    assert_eq!(w.status.unwrap().observed_generation, Some(1));

    widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 5}})),
        )
        .await
        .unwrap();
    eventually("update reconciled", || async {
        let w = widgets.get("w1").await.unwrap();
        let s = w.status?;
        (s.phase.as_deref() == Some("Size5") && s.observed_generation == Some(2)).then_some(())
    })
    .await;

    widgets
        .delete("w1", &DeleteParams::default())
        .await
        .unwrap();
    eventually("finalizer cleanup ran and the object is gone", || async {
        widgets.get_opt("w1").await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(*ctx.cleaned.lock().unwrap(), ["w1"]);
    task.abort();
}
