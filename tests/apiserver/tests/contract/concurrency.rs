//! Concurrent writes (kube-apiserver's `GuaranteedUpdate`: a write is
//! computed from the object it read and committed only if that object is
//! still current, else computed again): concurrent writes to one object from
//! different field managers all land with consistent managed fields, each
//! changing write is exactly one resourceVersion and one watch event in
//! order, concurrent creates of one name give one 201 and 409 AlreadyExists
//! for the rest, and a stale resourceVersion precondition is 409 Conflict.

use std::collections::BTreeMap;

use futures::{StreamExt, future::join_all};
use kube::api::{ListParams, Patch, PatchParams, WatchEvent, WatchParams};

use super::*;

const WRITERS: usize = 48;

fn managers_of(meta: &ObjectMeta) -> BTreeMap<(String, String), Value> {
    meta.managed_fields
        .iter()
        .flatten()
        .map(|e| {
            (
                (
                    e.manager.clone().unwrap_or_default(),
                    e.operation.clone().unwrap_or_default(),
                ),
                serde_json::to_value(e.fields_v1.as_ref().unwrap()).unwrap(),
            )
        })
        .collect()
}

/// MODIFIED events of `name` after `rv`, until `n` arrived: their resourceVersions.
async fn modified_rvs(cms: &Api<ConfigMap>, name: &str, rv: u64, n: usize) -> Vec<u64> {
    let wp = WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(30);
    let mut s = cms.watch(&wp, &rv.to_string()).await.unwrap().boxed();
    let mut out = Vec::new();
    while out.len() < n {
        match s.next().await {
            Some(Ok(WatchEvent::Modified(c))) => out.push(rv_of(&c.metadata)),
            Some(Ok(_)) => {}
            other => panic!("watch ended after {} events: {other:?}", out.len()),
        }
    }
    out
}

/// `rvs` (sorted) if each is its own write after `rv0`: distinct and newer.
/// The resourceVersion counter is global, so on a shared server other
/// writes may fall in between.
fn one_each(rv0: u64, rvs: &[u64]) -> Vec<u64> {
    let mut want: Vec<u64> = rvs.iter().copied().filter(|rv| *rv > rv0).collect();
    want.dedup();
    want
}

#[tokio::test]
async fn concurrent_applies_from_many_field_managers_to_one_object_all_land() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let base = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"seed": "0"}});
    let c0 = cms
        .patch("shared", &PatchParams::apply("base"), &Patch::Apply(base))
        .await
        .unwrap();
    let rv0 = rv_of(&c0.metadata);

    let results = join_all((0..WRITERS).map(|i| {
        let cms = cms.clone();
        async move {
            let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"},
                "data": {format!("k{i}"): format!("v{i}")}});
            cms.patch(
                "shared",
                &PatchParams::apply(&format!("m{i}")),
                &Patch::Apply(body),
            )
            .await
        }
    }))
    .await;
    let mut written: Vec<u64> = results
        .into_iter()
        .map(|r| rv_of(&r.unwrap().metadata))
        .collect();
    written.sort_unstable();

    let c = cms.get("shared").await.unwrap();
    let data = c.data.clone().unwrap();
    assert_eq!(data.len(), WRITERS + 1, "a write was lost: {data:?}");
    for i in 0..WRITERS {
        assert_eq!(data[&format!("k{i}")], format!("v{i}"));
    }
    // One Apply entry per manager, owning exactly its own key.
    let managers = managers_of(&c.metadata);
    assert_eq!(managers.len(), WRITERS + 1, "{managers:?}");
    assert_eq!(
        managers[&("base".to_string(), "Apply".to_string())],
        json!({"f:data": {"f:seed": {}}})
    );
    for i in 0..WRITERS {
        assert_eq!(
            managers[&(format!("m{i}"), "Apply".to_string())],
            json!({"f:data": {format!("f:k{i}"): {}}})
        );
    }
    // Every changing write is one resourceVersion and one watch event, in order.
    assert_eq!(written, one_each(rv0, &written), "{written:?}");
    assert_eq!(rv_of(&c.metadata), written[WRITERS - 1]);
    let rvs = modified_rvs(&cms, "shared", rv0, WRITERS).await;
    assert_eq!(rvs, written);
}

#[tokio::test]
async fn concurrent_merge_patches_land_once_each_and_repeating_them_writes_nothing() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let c0 = cms
        .create(&PostParams::default(), &cm("labels", &[("a", "1")]))
        .await
        .unwrap();
    let rv0 = rv_of(&c0.metadata);
    let patch_all = || {
        join_all((0..WRITERS).map(|i| {
            let cms = cms.clone();
            async move {
                let pp = PatchParams {
                    field_manager: Some(format!("m{i}")),
                    ..Default::default()
                };
                let body = json!({"metadata": {"labels": {format!("l{i}"): "x"}}});
                cms.patch("labels", &pp, &Patch::Merge(body)).await
            }
        }))
    };
    let mut written: Vec<u64> = patch_all()
        .await
        .into_iter()
        .map(|r| rv_of(&r.unwrap().metadata))
        .collect();
    written.sort_unstable();
    assert_eq!(written, one_each(rv0, &written), "{written:?}");
    let c = cms.get("labels").await.unwrap();
    assert_eq!(c.metadata.labels.as_ref().unwrap().len(), WRITERS);
    let last = rv_of(&c.metadata);
    assert_eq!(last, written[WRITERS - 1]);
    // At most ten update entries stay: the oldest are merged into
    // `ancient-changes`, and together they still own every label.
    let managers = managers_of(&c.metadata);
    let updates: Vec<(&(String, String), &Value)> = managers
        .iter()
        .filter(|((_, op), _)| op == "Update")
        .collect();
    assert!(updates.len() <= 10, "{managers:?}");
    assert!(
        managers.contains_key(&("ancient-changes".to_string(), "Update".to_string())),
        "{managers:?}"
    );
    let mut owned: Vec<String> = updates
        .iter()
        .flat_map(|(_, fv)| {
            fv["f:metadata"]["f:labels"]
                .as_object()
                .into_iter()
                .flat_map(|l| l.keys().filter(|k| *k != ".").cloned())
        })
        .collect();
    owned.sort();
    let mut want: Vec<String> = (0..WRITERS).map(|i| format!("f:l{i}")).collect();
    want.sort();
    assert_eq!(owned, want);

    // The same patches again change nothing: no write, no resourceVersion.
    for r in patch_all().await {
        assert_eq!(rv_of(&r.unwrap().metadata), last);
    }
    assert_eq!(rv_of(&cms.get("labels").await.unwrap().metadata), last);
}

#[tokio::test]
async fn concurrent_status_merge_patches_all_land_without_touching_spec_or_generation() {
    let (_api, client) = start_with_crd().await;
    let widgets: Api<Widget> = Api::default_namespaced(client);
    let w0 = widgets
        .create(&PostParams::default(), &widget("w", 3))
        .await
        .unwrap();
    let rv0 = rv_of(&w0.metadata);
    let results = join_all((0..WRITERS).map(|i| {
        let widgets = widgets.clone();
        async move {
            let pp = PatchParams {
                field_manager: Some(format!("ctl{i}")),
                ..Default::default()
            };
            let body = json!({"status": {"phase": format!("p{i}")}});
            widgets.patch_status("w", &pp, &Patch::Merge(body)).await
        }
    }))
    .await;
    let mut phases: Vec<u64> = Vec::new();
    for r in results {
        let w = r.unwrap();
        assert_eq!(w.spec.size, 3);
        assert_eq!(w.metadata.generation, Some(1));
        phases.push(rv_of(&w.metadata));
    }
    // Each answer is its own write.
    phases.sort_unstable();
    assert_eq!(phases, one_each(rv0, &phases), "{phases:?}");
    let w = widgets.get("w").await.unwrap();
    assert_eq!(rv_of(&w.metadata), phases[WRITERS - 1]);
    assert_eq!(w.metadata.generation, Some(1));
    assert_eq!(w.spec.size, 3);
}

#[tokio::test]
async fn concurrent_creates_of_one_name_give_one_201_and_409_already_exists_for_the_rest() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let results = join_all((0..WRITERS).map(|i| {
        let cms = cms.clone();
        async move {
            cms.create(
                &PostParams::default(),
                &cm("once", &[("who", &i.to_string())]),
            )
            .await
        }
    }))
    .await;
    let mut winners = Vec::new();
    for r in results {
        match r {
            Ok(c) => winners.push(c),
            Err(e) => {
                let s = api_err::<()>(Err(e));
                assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
            }
        }
    }
    assert_eq!(winners.len(), 1);
    let stored = cms.get("once").await.unwrap();
    assert_eq!(stored.data, winners[0].data);
    assert_eq!(stored.metadata.uid, winners[0].metadata.uid);
    assert_eq!(
        stored.metadata.resource_version,
        winners[0].metadata.resource_version
    );
}

#[tokio::test]
async fn a_stale_resource_version_precondition_is_409_conflict_under_concurrency() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let c0 = cms
        .create(&PostParams::default(), &cm("guarded", &[("a", "0")]))
        .await
        .unwrap();
    let rv0 = c0.metadata.resource_version.clone().unwrap();
    // PUTs and merge patches all carrying the same resourceVersion: one wins.
    let results = join_all((0..WRITERS).map(|i| {
        let (cms, c0, rv0) = (cms.clone(), c0.clone(), rv0.clone());
        async move {
            if i % 2 == 0 {
                let mut c = c0;
                // Never "0": an unchanged object is a no-op that succeeds.
                c.data = Some([("a".to_string(), (i + 1).to_string())].into());
                cms.replace("guarded", &PostParams::default(), &c).await
            } else {
                let body = json!({"metadata": {"resourceVersion": rv0}, "data": {"a": (i + 1).to_string()}});
                cms.patch("guarded", &PatchParams::default(), &Patch::Merge(body))
                    .await
            }
        }
    }))
    .await;
    let mut winners = Vec::new();
    for r in results {
        match r {
            Ok(c) => winners.push(c),
            Err(e) => {
                let s = api_err::<()>(Err(e));
                assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
            }
        }
    }
    assert_eq!(winners.len(), 1);
    let stored = cms.get("guarded").await.unwrap();
    assert_eq!(stored.data, winners[0].data);
    assert_eq!(
        stored.metadata.resource_version,
        winners[0].metadata.resource_version
    );
}

#[tokio::test]
async fn creates_racing_a_namespace_deletion_leave_nothing_behind_in_it() {
    let (_api, client) = start().await;
    let racing = unique("racing");
    create_namespace(&client, &racing).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &racing);
    let nss: Api<Namespace> = Api::all(client.clone());
    let creates = join_all((0..WRITERS).map(|i| {
        let cms = cms.clone();
        async move {
            cms.create(&PostParams::default(), &cm(&format!("c{i}"), &[("a", "1")]))
                .await
        }
    }));
    let delete = async {
        tokio::time::sleep(Duration::from_millis(2)).await;
        nss.delete(&racing, &Default::default()).await.unwrap();
    };
    let (results, ()) = tokio::join!(creates, delete);
    for r in results {
        if let Err(e) = r {
            let s = api_err::<()>(Err(e));
            assert!(matches!(s.code, 403 | 404), "{s:?}");
        }
    }
    eventually("the namespace is gone", || async {
        nss.get_opt(&racing).await.unwrap().is_none().then_some(())
    })
    .await;
    let left = Api::<ConfigMap>::all(client)
        .list(&ListParams::default().fields(&format!("metadata.namespace={racing}")))
        .await
        .unwrap();
    assert!(left.items.is_empty(), "{:?}", left.items);
}

#[tokio::test]
async fn concurrent_deletes_remove_once_and_mark_a_finalized_object_once() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let mut held = cm("held", &[("a", "1")]);
    held.metadata.finalizers = Some(vec!["test.slipstream.io/hold".into()]);
    let rv0 = rv_of(
        &cms.create(&PostParams::default(), &held)
            .await
            .unwrap()
            .metadata,
    );
    cms.create(&PostParams::default(), &cm("plain", &[("a", "1")]))
        .await
        .unwrap();

    let deletes = |name: &'static str| {
        join_all((0..WRITERS).map(|_| {
            let cms = cms.clone();
            async move { cms.delete(name, &Default::default()).await }
        }))
    };
    let (plain, marked) = tokio::join!(deletes("plain"), deletes("held"));
    let mut removed = 0;
    for r in plain {
        match r {
            Ok(_) => removed += 1,
            Err(e) => assert_eq!(api_err::<()>(Err(e)).code, 404),
        }
    }
    assert_eq!(removed, 1);
    // Marking is idempotent: every DELETE answers with the marked object,
    // and all of them with the one write that marked it.
    let mut seen: Vec<u64> = marked
        .into_iter()
        .map(|r| {
            let h = r
                .unwrap()
                .left()
                .expect("the object, held by its finalizer");
            assert!(h.metadata.deletion_timestamp.is_some());
            rv_of(&h.metadata)
        })
        .collect();
    seen.sort_unstable();
    seen.dedup();
    assert!(cms.get_opt("plain").await.unwrap().is_none());
    let h = cms.get("held").await.unwrap();
    assert!(h.metadata.deletion_timestamp.is_some());
    assert_eq!(seen, [rv_of(&h.metadata)]);
    assert!(rv_of(&h.metadata) > rv0);
}
