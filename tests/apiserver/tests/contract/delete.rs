//! Deletion (API concepts and "Finalizers", "Garbage Collection" docs):
//! finalizers hold an object with `deletionTimestamp` set, the object goes
//! when they are empty; propagationPolicy Background/Foreground/Orphan; the
//! garbage collector deletes dependents whose owners are all gone.

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{
    Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy},
};

use super::*;

fn owned_cm(name: &str, owner: &ConfigMap) -> ConfigMap {
    let mut c = cm(name, &[]);
    c.metadata.owner_references = Some(vec![owner.controller_owner_ref(&()).unwrap()]);
    c
}

/// Runs `f(i)` for every `i`, 16 at a time.
async fn in_batches<F, Fut>(range: std::ops::Range<usize>, f: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    futures::stream::iter(range.map(f))
        .buffer_unordered(16)
        .collect::<()>()
        .await;
}

#[tokio::test]
async fn delete_with_finalizers_sets_deletion_timestamp_and_removes_once_they_are_empty() {
    let (_api, client) = start_with_crd().await;
    let widgets: Api<Widget> = Api::default_namespaced(client);
    let mut w = widget("f", 1);
    w.metadata.finalizers = Some(vec!["test.slipstream.io/cleanup".into(), "other/x".into()]);
    widgets.create(&PostParams::default(), &w).await.unwrap();
    let r = widgets.delete("f", &DeleteParams::default()).await.unwrap();
    let pending = r.left().expect("object returned while finalizers remain");
    assert!(pending.metadata.deletion_timestamp.is_some());
    // Deleting again is a no-op while finalizers remain.
    widgets.delete("f", &DeleteParams::default()).await.unwrap();
    let still = widgets.get("f").await.unwrap();
    assert!(still.metadata.deletion_timestamp.is_some());

    widgets
        .patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["other/x"]}})),
        )
        .await
        .unwrap();
    assert!(widgets.get_opt("f").await.unwrap().is_some());
    widgets
        .patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert!(
        widgets.get_opt("f").await.unwrap().is_none(),
        "gone once finalizers are empty"
    );
}

#[tokio::test]
async fn background_garbage_collection_deletes_dependents_after_the_owner_is_gone() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let owner = cms
        .create(&PostParams::default(), &cm("owner", &[]))
        .await
        .unwrap();
    let other = cms
        .create(&PostParams::default(), &cm("other-owner", &[]))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &owned_cm("dep", &owner))
        .await
        .unwrap();
    let mut two = owned_cm("two-owners", &owner);
    let mut r2 = other.controller_owner_ref(&()).unwrap();
    r2.controller = Some(false);
    two.metadata.owner_references.as_mut().unwrap().push(r2);
    cms.create(&PostParams::default(), &two).await.unwrap();

    cms.delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    eventually("dependent collected", || async {
        cms.get_opt("dep").await.unwrap().is_none().then_some(())
    })
    .await;
    // A dependent with a remaining owner stays, minus the dangling reference.
    let left = eventually("dangling ref removed", || async {
        let c = cms.get("two-owners").await.unwrap();
        (c.owner_references().len() == 1).then_some(c)
    })
    .await;
    assert_eq!(left.owner_references()[0].uid, other.uid().unwrap());
}

#[tokio::test]
async fn orphan_propagation_keeps_dependents_and_strips_their_owner_references() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let owner = cms
        .create(&PostParams::default(), &cm("owner", &[]))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &owned_cm("dep", &owner))
        .await
        .unwrap();
    cms.delete(
        "owner",
        &DeleteParams {
            propagation_policy: Some(PropagationPolicy::Orphan),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    eventually("owner gone", || async {
        cms.get_opt("owner").await.unwrap().is_none().then_some(())
    })
    .await;
    let dep = cms.get("dep").await.unwrap();
    assert!(dep.owner_references().is_empty());
}

#[tokio::test]
async fn foreground_deletion_waits_for_the_dependents_that_block_it() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let owner = cms
        .create(&PostParams::default(), &cm("owner", &[]))
        .await
        .unwrap();
    // A dependent whose reference blocks the owner's deletion, and one whose does not.
    let mut dep = owned_cm("dep", &owner);
    dep.metadata.owner_references.as_mut().unwrap()[0].block_owner_deletion = Some(true);
    dep.metadata.finalizers = Some(vec!["hold/on".into()]);
    cms.create(&PostParams::default(), &dep).await.unwrap();
    let mut loose = owned_cm("loose", &owner);
    loose.metadata.finalizers = Some(vec!["hold/on".into()]);
    cms.create(&PostParams::default(), &loose).await.unwrap();
    let r = cms
        .delete("owner", &DeleteParams::foreground())
        .await
        .unwrap()
        .left()
        .unwrap();
    assert!(r.finalizers().contains(&"foregroundDeletion".to_string()));
    for name in ["dep", "loose"] {
        eventually("dependents marked for deletion", || async {
            cms.get(name)
                .await
                .unwrap()
                .metadata
                .deletion_timestamp
                .map(|_| ())
        })
        .await;
    }
    assert!(
        cms.get_opt("owner").await.unwrap().is_some(),
        "owner waits for its dependents"
    );
    cms.patch(
        "dep",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    eventually("owner gone", || async {
        cms.get_opt("owner").await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(
        cms.get_opt("loose").await.unwrap().is_some(),
        "the owner did not wait for a dependent that does not block it"
    );
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_contents_then_the_namespace() {
    let (_api, client) = start().await;
    let doomed = unique("doomed");
    create_namespace(&client, &doomed).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &doomed);
    let mut held = cm("a", &[]);
    held.metadata.finalizers = Some(vec!["hold/on".into()]);
    cms.create(&PostParams::default(), &held).await.unwrap();
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.delete(&doomed, &DeleteParams::default()).await.unwrap();
    let ns = nss.get(&doomed).await.unwrap();
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Terminating"));
    let s = api_err(cms.create(&PostParams::default(), &cm("b", &[])).await);
    assert_eq!(
        (s.code, s.reason.as_str()),
        (403, "Forbidden"),
        "no new content in a terminating namespace"
    );
    eventually("content marked for deletion", || async {
        cms.get("a")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .map(|_| ())
    })
    .await;
    assert!(
        nss.get_opt(&doomed).await.unwrap().is_some(),
        "namespace waits for its content"
    );
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    eventually("namespace gone", || async {
        nss.get_opt(&doomed).await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(
        Api::<ConfigMap>::all(client)
            .list(&ListParams::default().fields(&format!("metadata.namespace={doomed}")))
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn deletecollection_deletes_what_the_label_selector_matches() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    for (n, l) in [("a", "x"), ("b", "x"), ("c", "y")] {
        let mut c = cm(n, &[]);
        c.metadata.labels = Some([("g".to_string(), l.to_string())].into());
        cms.create(&PostParams::default(), &c).await.unwrap();
    }
    cms.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("g=x"),
    )
    .await
    .unwrap();
    let left: Vec<String> = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| c.name_any())
        .collect();
    assert_eq!(left, ["c"]);
}

#[tokio::test]
async fn delete_preconditions_on_uid_and_resource_version_are_409() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.create(&PostParams::default(), &cm("p", &[]))
        .await
        .unwrap();
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("wrong".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    assert_eq!(api_err(cms.delete("p", &dp).await).code, 409);
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: None,
            resource_version: Some("1".into()),
        }),
        ..Default::default()
    };
    assert_eq!(api_err(cms.delete("p", &dp).await).code, 409);
    let _ = OwnerReference::default();
    cms.delete("p", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        api_err(cms.delete("p", &DeleteParams::default()).await).code,
        404
    );
}

#[tokio::test]
async fn deleting_a_crd_deletes_its_custom_resources_and_stops_serving_them() {
    // A CRD of this test's own: the shared Widget CRD stays for the others.
    let (api, client) = start().await;
    let (crd, ar) = gadget_crd_in(&format!("{}.test.slipstream.io", unique("gone")));
    let crd: CustomResourceDefinition = serde_json::from_value(crd).unwrap();
    api.install_crd(&crd).await;
    let widgets: Api<DynamicObject> = Api::default_namespaced_with(client.clone(), &ar);
    let w = DynamicObject::new("w", &ar).data(json!({"spec": {"size": 1}}));
    eventually("the new resource served", || async {
        widgets.create(&PostParams::default(), &w).await.ok()
    })
    .await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.name_any();
    crds.delete(&name, &DeleteParams::default()).await.unwrap();
    eventually("crd gone", || async {
        crds.get_opt(&name).await.unwrap().is_none().then_some(())
    })
    .await;
    let s = api_err(widgets.list(&ListParams::default()).await);
    assert_eq!(s.code, 404);
}

#[tokio::test]
async fn a_dependent_whose_owner_never_existed_is_collected() {
    // The garbage collector looks an absent owner up, finds nothing and
    // deletes the dependent ("dangling" owner reference).
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let mut orphan = cm("never-owned", &[]);
    orphan.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "ghost".into(),
        uid: "00000000-0000-0000-0000-000000000000".into(),
        ..Default::default()
    }]);
    cms.create(&PostParams::default(), &orphan).await.unwrap();
    eventually("dependent of a missing owner collected", || async {
        cms.get_opt("never-owned")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn deleting_many_owners_collects_every_dependent_and_spares_the_others() {
    // More owners than the collector handles in one slice: all their
    // dependents go, dependents of surviving owners stay.
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let n = 300;
    let deleted = n - 10;
    in_batches(0..n, |i| {
        let cms = cms.clone();
        async move {
            let mut owner = cm(&format!("owner-{i}"), &[]);
            owner.metadata.finalizers = Some(vec!["hold/on".into()]);
            let owner = cms.create(&PostParams::default(), &owner).await.unwrap();
            let mut dep = owned_cm(&format!("dep-{i}"), &owner);
            dep.metadata.labels = Some([("role".to_string(), "dep".to_string())].into());
            cms.create(&PostParams::default(), &dep).await.unwrap();
        }
    })
    .await;
    in_batches(0..deleted, |i| {
        let cms = cms.clone();
        async move {
            cms.delete(&format!("owner-{i}"), &DeleteParams::default())
                .await
                .unwrap();
        }
    })
    .await;
    // Owners held by a finalizer keep their dependents.
    let deps = ListParams::default().labels("role=dep");
    assert_eq!(cms.list(&deps).await.unwrap().items.len(), n);
    in_batches(0..deleted, |i| {
        let cms = cms.clone();
        async move {
            cms.patch(
                &format!("owner-{i}"),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
            .unwrap();
        }
    })
    .await;
    let left = eventually("dependents of deleted owners collected", || async {
        let items = cms.list(&deps).await.unwrap().items;
        (items.len() == n - deleted).then_some(items)
    })
    .await;
    let mut names: Vec<String> = left.iter().map(|c| c.name_any()).collect();
    names.sort();
    let mut want: Vec<String> = (deleted..n).map(|i| format!("dep-{i}")).collect();
    want.sort();
    assert_eq!(names, want);
}

#[tokio::test]
async fn deleting_a_namespace_with_many_objects_deletes_all_of_them() {
    let (_api, client) = start().await;
    let big = unique("big");
    create_namespace(&client, &big).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &big);
    in_batches(0..250, |i| {
        let cms = cms.clone();
        async move {
            cms.create(&PostParams::default(), &cm(&format!("c-{i}"), &[]))
                .await
                .unwrap();
        }
    })
    .await;
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.delete(&big, &DeleteParams::default()).await.unwrap();
    eventually("namespace and its 250 ConfigMaps gone", || async {
        nss.get_opt(&big).await.unwrap().is_none().then_some(())
    })
    .await;
    let left = Api::<ConfigMap>::all(client)
        .list(&ListParams::default().fields(&format!("metadata.namespace={big}")))
        .await
        .unwrap();
    assert!(left.items.is_empty());
}

#[tokio::test]
async fn owner_references_changed_by_a_patch_are_what_the_collector_follows() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let first = cms
        .create(&PostParams::default(), &cm("first", &[]))
        .await
        .unwrap();
    let second = cms
        .create(&PostParams::default(), &cm("second", &[]))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &owned_cm("dep", &first))
        .await
        .unwrap();
    // Stays owned by `first`: once it is collected, `first`'s removal has been handled.
    cms.create(&PostParams::default(), &owned_cm("witness", &first))
        .await
        .unwrap();
    // Ownership moves from `first` to `second`.
    let moved =
        json!({"metadata": {"ownerReferences": [second.controller_owner_ref(&()).unwrap()]}});
    cms.patch("dep", &PatchParams::default(), &Patch::Merge(moved))
        .await
        .unwrap();
    cms.delete("first", &DeleteParams::background())
        .await
        .unwrap();
    eventually(
        "the former owner's remaining dependent collected",
        || async {
            cms.get_opt("witness")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    // ... and the moved dependent is left alone.
    let dep = cms.get("dep").await.unwrap();
    assert_eq!(dep.owner_references()[0].uid, second.uid().unwrap());
    cms.delete("second", &DeleteParams::background())
        .await
        .unwrap();
    eventually("dependent of the new owner collected", || async {
        cms.get_opt("dep").await.unwrap().is_none().then_some(())
    })
    .await;
}
