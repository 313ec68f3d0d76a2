//! Status subresource (CRD docs: "Status subresource"): status sent on create
//! is dropped, main-resource writes keep status, `/status` writes keep spec,
//! and `metadata.generation` moves only on spec changes.

use kube::api::{Patch, PatchParams};

use super::*;

#[tokio::test]
async fn status_sent_on_create_is_dropped_and_main_resource_writes_keep_status() {
    let (_api, client) = start_with_crd().await;
    let widgets: Api<Widget> = Api::default_namespaced(client);
    let mut w = widget("s", 1);
    w.status = Some(WidgetStatus {
        phase: Some("Bogus".into()),
        observed_generation: None,
    });
    let created = widgets.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(created.status, None);

    widgets
        .patch_status(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Ready"}})),
        )
        .await
        .unwrap();
    // A full update of the main resource that carries another status keeps the stored one.
    let mut cur = widgets.get("s").await.unwrap();
    cur.spec.size = 2;
    cur.status = Some(WidgetStatus {
        phase: Some("Overwritten".into()),
        observed_generation: Some(99),
    });
    let updated = widgets
        .replace("s", &PostParams::default(), &cur)
        .await
        .unwrap();
    assert_eq!(updated.spec.size, 2);
    assert_eq!(updated.status.unwrap().phase.as_deref(), Some("Ready"));
    let merged = widgets
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Nope"}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.status.unwrap().phase.as_deref(), Some("Ready"));
}

#[tokio::test]
async fn status_writes_leave_spec_alone_and_generation_moves_only_on_spec_changes() {
    let (_api, client) = start_with_crd().await;
    let widgets: Api<Widget> = Api::default_namespaced(client);
    let w = widgets
        .create(&PostParams::default(), &widget("g", 1))
        .await
        .unwrap();
    assert_eq!(w.metadata.generation, Some(1));

    // /status with a changed spec: spec is ignored, generation unchanged.
    let s = widgets
        .patch_status(
            "g",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"size": 9}, "status": {"phase": "Ready", "observedGeneration": 1}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!((s.spec.size, s.metadata.generation), (1, Some(1)));
    assert_eq!(s.status.as_ref().unwrap().phase.as_deref(), Some("Ready"));

    // Status via server-side apply on /status (forced: the merge patch above made
    // the default manager own .status.phase, so a plain apply would conflict).
    let applied = widgets
        .patch_status("g", &PatchParams::apply("ctl").force(), &Patch::Apply(json!({"apiVersion": "test.slipstream.io/v1", "kind": "Widget", "status": {"phase": "Applied"}})))
        .await
        .unwrap();
    assert_eq!(applied.status.unwrap().phase.as_deref(), Some("Applied"));

    // Metadata-only change: no generation bump.
    let l = widgets
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(l.metadata.generation, Some(1));
    // Spec change: generation + 1.
    let sp = widgets
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 3}})),
        )
        .await
        .unwrap();
    assert_eq!(sp.metadata.generation, Some(2));
    // Same spec again: no write, no bump.
    let same = widgets
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 3}})),
        )
        .await
        .unwrap();
    assert_eq!(same.metadata.generation, Some(2));
    assert_eq!(same.metadata.resource_version, sp.metadata.resource_version);
}

#[tokio::test]
async fn configmaps_carry_no_generation_and_have_no_status_subresource() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.create(&PostParams::default(), &cm("c", &[("a", "1")]))
        .await
        .unwrap();
    let c = cms
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": "2"}})),
        )
        .await
        .unwrap();
    assert_eq!(c.metadata.generation, None);
    let s = api_err(
        cms.patch_status("c", &PatchParams::default(), &Patch::Merge(json!({})))
            .await,
    );
    assert_eq!(s.code, 404);
}
