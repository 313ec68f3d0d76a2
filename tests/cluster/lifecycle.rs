//! Bindings going away with the real kube-controller-manager: its namespace
//! controller deleting a namespace full of bindings (our finalizers must run
//! and let go), and its garbage collector deleting the ConfigMap of a binding
//! that is gone (an Owner + Delete binding has no finalizer: that is the
//! collector's work).

use apiserver::real::ControlPlane;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams},
};
use slipstream::crd::ConfigBinding;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_namespace_runs_the_binding_finalizers_and_the_namespace_goes_away() {
    let cp = ControlPlane::shared().await;
    let release = default_release().await;
    let ns = cp.create_namespace("ns-delete").await;
    let client = cp.client_in(&ns).await;
    let (nats, bucket) = nats_with_bucket().await;
    for prefix in ["a", "b", "c"] {
        put(&bucket, &format!("{prefix}.key"), prefix).await;
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let shared = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("shared".into()),
            ..Default::default()
        },
        data: Some(map(&[("theirs", "kept")])),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &shared).await.unwrap();

    let kubeconfig = release.service_account_kubeconfig(cp, &ns).await;
    let mut operator = Operator::start(release, &kubeconfig, &nats.url(), &ns);
    let bindings = [
        ("owned", "bucket: app-config\nprefixes: [a.]"),
        (
            "retained",
            "bucket: app-config\nprefixes: [b.]\ntarget: {deletionPolicy: Retain}",
        ),
        (
            "merged",
            "bucket: app-config\nprefixes: [c.]\ntarget: {name: shared, creationPolicy: Merge}",
        ),
    ];
    for (name, spec) in bindings {
        create_binding(&client, &ns, name, spec).await;
    }
    for (name, _) in bindings {
        wait_synced(&client, &ns, name).await;
    }
    // the cleanups ours to do: a binding first seen while the replica was
    // still standby gets its finalizer on the next reconcile, just after
    // Ready (the worker started while standby writes as soon as the lease
    // is taken)
    let finalized = ["retained", "merged"];
    for name in finalized {
        wait_finalizer(&client, &ns, name).await;
    }
    wait_data(
        &client,
        &ns,
        "shared",
        &map(&[("theirs", "kept"), ("c.key", "c")]),
    )
    .await;

    let namespaces: Api<Namespace> = Api::all(cp.client().await);
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    eventually(&format!("namespace {ns} deleted"), || async {
        namespaces
            .get_opt(&ns)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    // it was our finalizer's cleanup that let those bindings go
    operator.assert_running();
    let log = operator.log();
    for name in finalized {
        assert!(
            log.lines()
                .any(|l| l.contains("binding removed") && l.contains(&format!("\"{name}\""))),
            "the operator cleaned up {name}:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collector_deletes_the_owned_configmap_of_a_gone_binding_and_keeps_a_retained_one()
{
    let cp = ControlPlane::shared().await;
    let release = default_release().await;
    let ns = cp.create_namespace("gc").await;
    let client = cp.client_in(&ns).await;
    let (nats, bucket) = nats_with_bucket().await;
    put(&bucket, "a.key", "a").await;
    put(&bucket, "b.key", "b").await;
    let kubeconfig = release.service_account_kubeconfig(cp, &ns).await;
    let mut operator = Operator::start(release, &kubeconfig, &nats.url(), &ns);
    create_binding(&client, &ns, "owned", "bucket: app-config\nprefixes: [a.]").await;
    create_binding(
        &client,
        &ns,
        "kept",
        "bucket: app-config\nprefixes: [b.]\ntarget: {deletionPolicy: Retain}",
    )
    .await;
    wait_synced(&client, &ns, "owned").await;
    wait_synced(&client, &ns, "kept").await;
    wait_finalizer(&client, &ns, "kept").await;
    let bindings: Api<ConfigBinding> = Api::namespaced(client.clone(), &ns);
    let owned = bindings.get("owned").await.unwrap();
    assert!(owned.finalizers().is_empty(), "{owned:?}");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let owned_cm = wait_data(&client, &ns, "owned", &map(&[("a.key", "a")])).await;
    let owner = &owned_cm.owner_references()[0];
    assert_eq!(owner.uid, owned.uid().unwrap());
    assert_eq!(owner.controller, Some(true));

    // Retain: the operator's finalizer drops the owner reference before the binding goes
    bindings
        .delete("kept", &DeleteParams::default())
        .await
        .unwrap();
    eventually("binding kept deleted", || async {
        bindings
            .get_opt("kept")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let kept = cms.get("kept").await.unwrap();
    assert!(kept.owner_references().is_empty(), "{kept:?}");

    // the operator is gone: nothing waits on it, the binding goes at once
    // and the real garbage collector deletes the ConfigMap that names it
    operator.kill();
    bindings
        .delete("owned", &DeleteParams::default())
        .await
        .unwrap();
    assert!(bindings.get_opt("owned").await.unwrap().is_none());
    eventually("the garbage collector deletes ConfigMap owned", || async {
        cms.get_opt("owned").await.unwrap().is_none().then_some(())
    })
    .await;

    // the retained ConfigMap has no owner: the collector left it alone
    let kept = cms.get("kept").await.unwrap();
    assert_eq!(data(&kept), map(&[("b.key", "b")]));
}
