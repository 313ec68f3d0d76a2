//! Discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}/{version}`
//! (API concepts: "Discovery API"), including CRD-served groups once created.

use kube::discovery::{Discovery, Scope, verbs};

use super::*;

#[tokio::test]
async fn discovery_serves_builtin_groups_and_crd_groups_once_created() {
    let (api, client) = start().await;
    let v = client.apiserver_version().await.unwrap();
    assert_eq!(v.major, "1");

    let d = Discovery::new(client.clone()).run().await.unwrap();
    let (cm, caps) = d
        .resolve_gvk(&kube::api::GroupVersionKind::gvk("", "v1", "ConfigMap"))
        .unwrap();
    assert_eq!(cm.plural, "configmaps");
    assert_eq!(caps.scope, Scope::Namespaced);
    assert!(caps.supports_operation(verbs::WATCH));
    for (g, v, k) in [
        ("", "v1", "Namespace"),
        ("", "v1", "Secret"),
        ("", "v1", "Event"),
        ("events.k8s.io", "v1", "Event"),
        ("coordination.k8s.io", "v1", "Lease"),
        ("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
    ] {
        assert!(
            d.resolve_gvk(&kube::api::GroupVersionKind::gvk(g, v, k))
                .is_some(),
            "{g}/{v} {k}"
        );
    }
    // A group of this test's own: the real server's CRDs are shared.
    let group = format!("{}.test.slipstream.io", unique("d"));
    assert!(d.get(&group).is_none());

    let (crd, _) = gadget_crd_in(&group);
    let crd: CustomResourceDefinition = serde_json::from_value(crd).unwrap();
    api.install_crd(&crd).await;
    let gvk = kube::api::GroupVersionKind::gvk(&group, "v1", "Gadget");
    // Established, then served: the real server's discovery follows shortly after.
    let (ar, caps) = eventually("the CRD's group in discovery", || async {
        Discovery::new(client.clone())
            .filter(&[&group])
            .run()
            .await
            .unwrap()
            .resolve_gvk(&gvk)
    })
    .await;
    assert_eq!(ar.plural, "gadgets");
    assert_eq!(caps.scope, Scope::Namespaced);
    assert!(
        caps.subresources
            .iter()
            .any(|(sub, _)| sub.plural == "gadgets/status" || sub.plural == "status"),
        "{:?}",
        caps.subresources
    );

    // The raw resource list carries short names, like `kubectl api-resources` shows them.
    let list = client
        .list_api_group_resources(&format!("{group}/v1"))
        .await
        .unwrap();
    let w = list.resources.iter().find(|r| r.name == "gadgets").unwrap();
    assert_eq!(w.short_names, crd.spec.names.short_names);
    assert_eq!(w.singular_name, "gadget");
}
