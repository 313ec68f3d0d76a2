//! Server-side apply (docs: "Server-Side Apply"): managed fields per manager,
//! apply creates, fields a manager stops applying are removed unless another
//! manager owns them, conflicts are 409 unless forced, a no-op apply does not
//! write, and the JSON/merge/strategic patch types around it.

use kube::api::{Patch, PatchParams};

use super::*;

fn apply_cm(name: &str, data: Value, labels: Value) -> Value {
    let mut v =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data});
    if labels.as_object().is_some_and(|l| !l.is_empty()) {
        v["metadata"]["labels"] = labels;
    }
    v
}

fn entry<'a>(
    c: &'a ConfigMap,
    manager: &str,
    op: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry> {
    c.metadata
        .managed_fields
        .as_ref()?
        .iter()
        .find(|e| e.manager.as_deref() == Some(manager) && e.operation.as_deref() == Some(op))
}

fn fields_v1(e: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry) -> Value {
    serde_json::to_value(e.fields_v1.as_ref().unwrap()).unwrap()
}

#[tokio::test]
async fn apply_creates_a_missing_object_with_an_apply_managed_fields_entry() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let pp = PatchParams::apply("slipstream");
    let c = cms
        .patch(
            "ssa",
            &pp,
            &Patch::Apply(apply_cm("ssa", json!({"a": "1"}), json!({"app": "x"}))),
        )
        .await
        .unwrap();
    assert_eq!(c.data.as_ref().unwrap()["a"], "1");
    let e = entry(&c, "slipstream", "Apply").expect("Apply entry");
    assert_eq!(e.fields_type.as_deref(), Some("FieldsV1"));
    assert_eq!(e.api_version.as_deref(), Some("v1"));
    assert_eq!(
        fields_v1(e),
        json!({"f:data": {"f:a": {}}, "f:metadata": {"f:labels": {"f:app": {}}}})
    );

    // Apply requires a field manager, like the real server.
    let bare = client_patch_without_manager(&cms).await;
    assert_eq!(bare.code, 422);

    // Creating by apply needs the name in the configuration, not only in the URL.
    let s = api_err(
        cms.patch(
            "nameless",
            &pp,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"a": "1"}})),
        )
        .await,
    );
    assert_eq!(
        (s.code, s.message.as_str()),
        (
            400,
            "the name of the object (nameless based on URL) was undeterminable: name must be provided"
        )
    );
    let s = api_err(
        cms.patch(
            "ssa",
            &pp,
            &Patch::Apply(apply_cm("other", json!({"a": "1"}), json!({}))),
        )
        .await,
    );
    assert_eq!(
        (s.code, s.message.as_str()),
        (
            400,
            "the name of the object (other) does not match the name on the URL (ssa)"
        )
    );
}

async fn client_patch_without_manager(cms: &Api<ConfigMap>) -> kube::core::Status {
    // kube refuses to send an apply without a manager, so go through a raw request.
    let req = http::Request::patch(format!("{}/ssa", cms.resource_url()))
        .header("Content-Type", "application/apply-patch+yaml")
        .body(serde_json::to_vec(&apply_cm("ssa", json!({}), json!({}))).unwrap())
        .unwrap();
    let _ = cms;
    let client = cms.clone().into_client();
    api_err(client.request::<ConfigMap>(req).await)
}

#[tokio::test]
async fn apply_removes_keys_labels_and_owner_references_the_manager_stops_applying() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let pp = PatchParams::apply("slipstream");
    // Owners that exist, so the garbage collector leaves the ConfigMap alone.
    let mut owners = Vec::new();
    for name in ["o1", "o2"] {
        let o = cms
            .create(&PostParams::default(), &cm(name, &[]))
            .await
            .unwrap();
        owners.push(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "name": name, "uid": o.metadata.uid}),
        );
    }
    let (o1, o2) = (&owners[0], &owners[1]);
    let (u1, u2) = (o1["uid"].as_str().unwrap(), o2["uid"].as_str().unwrap());
    let mut first = apply_cm(
        "keys",
        json!({"a": "1", "b": "2"}),
        json!({"l1": "x", "l2": "y"}),
    );
    first["binaryData"] = json!({"bin": "AAE="});
    first["metadata"]["annotations"] = json!({"n1": "x"});
    first["metadata"]["ownerReferences"] = json!([o1, o2]);
    let c = cms.patch("keys", &pp, &Patch::Apply(first)).await.unwrap();
    let fv = fields_v1(entry(&c, "slipstream", "Apply").unwrap());
    // Owner references are atomic: each is owned whole, its fields are not listed.
    assert_eq!(
        fv["f:metadata"]["f:ownerReferences"][format!("k:{{\"uid\":\"{u1}\"}}")],
        json!({}),
        "{fv}"
    );

    let mut second = apply_cm("keys", json!({"a": "1"}), json!({"l1": "x"}));
    second["metadata"]["ownerReferences"] = json!([o2]);
    let c = cms.patch("keys", &pp, &Patch::Apply(second)).await.unwrap();
    assert_eq!(c.data.as_ref().unwrap().keys().collect::<Vec<_>>(), ["a"]);
    assert!(c.binary_data.as_ref().is_none_or(|b| b.is_empty()));
    assert_eq!(
        c.metadata
            .labels
            .as_ref()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["l1"]
    );
    assert!(c.metadata.annotations.as_ref().is_none_or(|a| a.is_empty()));
    let refs = c.metadata.owner_references.unwrap();
    assert_eq!(
        refs.iter().map(|r| r.uid.as_str()).collect::<Vec<_>>(),
        [u2]
    );
}

#[tokio::test]
async fn apply_leaves_fields_owned_by_other_managers_alone() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let pp = PatchParams::apply("slipstream");
    cms.patch(
        "merge",
        &pp,
        &Patch::Apply(apply_cm(
            "merge",
            json!({"ours": "1", "shared": "s"}),
            json!({}),
        )),
    )
    .await
    .unwrap();
    // A user edits the ConfigMap with a merge patch (manager "kubectl-edit").
    let edit = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    let c = cms
        .patch(
            "merge",
            &edit,
            &Patch::Merge(json!({"data": {"theirs": "t"}, "metadata": {"labels": {"team": "a"}}})),
        )
        .await
        .unwrap();
    let fv = fields_v1(entry(&c, "kubectl-edit", "Update").unwrap());
    // An update owns the maps it creates (`.`), here the labels.
    assert_eq!(
        fv,
        json!({"f:data": {"f:theirs": {}}, "f:metadata": {"f:labels": {".": {}, "f:team": {}}}})
    );
    // Another applier also applies "shared" with the same value: co-owned, no conflict.
    cms.patch(
        "merge",
        &PatchParams::apply("other"),
        &Patch::Apply(apply_cm("merge", json!({"shared": "s"}), json!({}))),
    )
    .await
    .unwrap();

    // Slipstream stops applying "shared" and keeps "ours": their keys stay, the co-owned one stays.
    let c = cms
        .patch(
            "merge",
            &pp,
            &Patch::Apply(apply_cm("merge", json!({"ours": "2"}), json!({}))),
        )
        .await
        .unwrap();
    let data = c.data.unwrap();
    assert_eq!(data.get("ours").map(String::as_str), Some("2"));
    assert_eq!(data.get("theirs").map(String::as_str), Some("t"));
    assert_eq!(data.get("shared").map(String::as_str), Some("s"));
    assert_eq!(
        c.metadata.labels.unwrap().get("team").map(String::as_str),
        Some("a")
    );

    // Once the other applier lets go too, nobody owns "shared" and it goes.
    let c = cms
        .patch(
            "merge",
            &PatchParams::apply("other"),
            &Patch::Apply(apply_cm("merge", json!({}), json!({}))),
        )
        .await
        .unwrap();
    assert!(!c.data.unwrap().contains_key("shared"));
}

#[tokio::test]
async fn apply_conflicting_with_another_manager_is_409_unless_forced() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.create(
        &PostParams {
            field_manager: Some("kubectl-create".into()),
            ..Default::default()
        },
        &cm("c", &[("k", "user")]),
    )
    .await
    .unwrap();
    let pp = PatchParams::apply("slipstream");
    let s = api_err(
        cms.patch(
            "c",
            &pp,
            &Patch::Apply(apply_cm("c", json!({"k": "ours"}), json!({}))),
        )
        .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        s.message,
        "Apply failed with 1 conflict: conflict with \"kubectl-create\" using v1: .data.k"
    );
    let cause = &s.details.unwrap().causes[0];
    assert_eq!(
        (cause.reason.as_str(), cause.field.as_str()),
        ("FieldManagerConflict", ".data.k")
    );

    // Same value: shared ownership, not a conflict.
    cms.patch(
        "c",
        &pp,
        &Patch::Apply(apply_cm("c", json!({"k": "user"}), json!({}))),
    )
    .await
    .unwrap();

    let c = cms
        .patch(
            "c",
            &pp.clone().force(),
            &Patch::Apply(apply_cm("c", json!({"k": "ours"}), json!({}))),
        )
        .await
        .unwrap();
    assert_eq!(c.data.as_ref().unwrap()["k"], "ours");
    // The forced field moved to the applier; the old owner no longer lists it.
    assert!(
        entry(&c, "kubectl-create", "Update")
            .is_none_or(|e| fields_v1(e)["f:data"].get("f:k").is_none())
    );
}

#[tokio::test]
async fn a_no_op_apply_does_not_write_or_bump_the_resource_version() {
    let (api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let pp = PatchParams::apply("slipstream");
    let body = apply_cm("noop", json!({"a": "1"}), json!({"x": "y"}));
    let first = cms
        .patch("noop", &pp, &Patch::Apply(body.clone()))
        .await
        .unwrap();
    let again = cms.patch("noop", &pp, &Patch::Apply(body)).await.unwrap();
    assert_eq!(
        again.metadata.resource_version,
        first.metadata.resource_version
    );
    // Two apply requests, one write: every write moves the resourceVersion.
    assert_eq!(api.counters().verb_resource("patch", "configmaps"), 2);
    assert_eq!(
        cms.get("noop").await.unwrap().metadata.resource_version,
        first.metadata.resource_version,
        "no storage write"
    );
}

#[tokio::test]
async fn apply_with_a_stale_resource_version_is_409_conflict() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let pp = PatchParams::apply("slipstream");
    let c = cms
        .patch(
            "pre",
            &pp,
            &Patch::Apply(apply_cm("pre", json!({"a": "1"}), json!({}))),
        )
        .await
        .unwrap();
    let rv = c.metadata.resource_version.clone().unwrap();
    cms.patch(
        "pre",
        &pp,
        &Patch::Apply(apply_cm("pre", json!({"a": "2"}), json!({}))),
    )
    .await
    .unwrap();
    let mut stale = apply_cm("pre", json!({"a": "3"}), json!({}));
    stale["metadata"]["resourceVersion"] = json!(rv);
    let s = api_err(cms.patch("pre", &pp, &Patch::Apply(stale)).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
}

#[tokio::test]
async fn json_patch_with_a_failing_test_op_is_422_and_changes_nothing() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.create(&PostParams::default(), &cm("jp", &[("a", "1")]))
        .await
        .unwrap();
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/data/a", "value": "2"},
        {"op": "replace", "path": "/data/a", "value": "3"}
    ]))
    .unwrap();
    let s = api_err(
        cms.patch("jp", &PatchParams::default(), &Patch::<()>::Json(ops))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(cms.get("jp").await.unwrap().data.unwrap()["a"], "1");
    let ok: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/data/a", "value": "1"},
        {"op": "add", "path": "/data/b", "value": "2"}
    ]))
    .unwrap();
    let c = cms
        .patch("jp", &PatchParams::default(), &Patch::<()>::Json(ok))
        .await
        .unwrap();
    assert_eq!(c.data.unwrap()["b"], "2");
}

#[tokio::test]
async fn merge_patch_sets_keys_and_null_deletes_them() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.create(&PostParams::default(), &cm("mp", &[("a", "1"), ("b", "2")]))
        .await
        .unwrap();
    let c = cms
        .patch(
            "mp",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": null, "c": "3"}})),
        )
        .await
        .unwrap();
    let data = c.data.unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["b", "c"]);
    // A merge patch carrying a stale resourceVersion is a precondition failure.
    let s = api_err(
        cms.patch(
            "mp",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "data": {"d": "4"}})),
        )
        .await,
    );
    assert_eq!(s.code, 409);
}

#[tokio::test]
async fn strategic_merge_patch_works_on_configmaps_and_is_415_on_custom_resources() {
    let (_api, client) = start_with_crd().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    cms.create(&PostParams::default(), &cm("smp", &[("a", "1")]))
        .await
        .unwrap();
    let c = cms
        .patch(
            "smp",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"data": {"b": "2", "a": null}, "metadata": {"finalizers": ["x/y"]}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(c.data.unwrap().keys().collect::<Vec<_>>(), ["b"]);
    assert_eq!(c.metadata.finalizers.unwrap(), ["x/y"]);
    let widgets: Api<Widget> = Api::default_namespaced(client);
    widgets
        .create(&PostParams::default(), &widget("w", 1))
        .await
        .unwrap();
    let s = api_err(
        widgets
            .patch(
                "w",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"size": 2}})),
            )
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (415, "UnsupportedMediaType"));
}

#[tokio::test]
async fn update_takes_ownership_of_changed_fields_from_the_applier() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let pp = PatchParams::apply("slipstream");
    cms.patch(
        "own",
        &pp,
        &Patch::Apply(apply_cm("own", json!({"a": "1", "b": "1"}), json!({}))),
    )
    .await
    .unwrap();
    let edit = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    let c = cms
        .patch(
            "own",
            &edit,
            &Patch::Merge(json!({"data": {"a": "edited"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        fields_v1(entry(&c, "kubectl-edit", "Update").unwrap()),
        json!({"f:data": {"f:a": {}}})
    );
    assert_eq!(
        fields_v1(entry(&c, "slipstream", "Apply").unwrap()),
        json!({"f:data": {"f:b": {}}})
    );
    // Re-applying the old value now conflicts with the editor.
    let s = api_err(
        cms.patch(
            "own",
            &pp,
            &Patch::Apply(apply_cm("own", json!({"a": "1", "b": "1"}), json!({}))),
        )
        .await,
    );
    assert_eq!(s.code, 409);
}

#[tokio::test]
async fn apply_merges_keyed_status_conditions_by_type() {
    let (_api, client) = start_with_crd().await;
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    widgets
        .create(&PostParams::default(), &widget("cond", 1))
        .await
        .unwrap();
    let status = |conds: Value| json!({"apiVersion": "test.slipstream.io/v1", "kind": "Widget", "status": {"conditions": conds}});
    widgets
        .patch_status(
            "cond",
            &PatchParams::apply("a"),
            &Patch::Apply(status(json!([{"type": "Ready", "status": "True"}]))),
        )
        .await
        .unwrap();
    widgets
        .patch_status(
            "cond",
            &PatchParams::apply("b"),
            &Patch::Apply(status(json!([{"type": "Synced", "status": "False"}]))),
        )
        .await
        .unwrap();
    let raw = get_json(&client, &ApiResource::erase::<Widget>(&()), "cond").await;
    let types: Vec<&str> = raw["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["Ready", "Synced"],
        "each applier owns its own list item"
    );
    let entry = raw["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["manager"] == "b")
        .unwrap()
        .clone();
    assert_eq!(entry["subresource"], "status");
    assert!(
        entry["fieldsV1"]["f:status"]["f:conditions"]["k:{\"type\":\"Synced\"}"]["."].is_object(),
        "{entry}"
    );
}
