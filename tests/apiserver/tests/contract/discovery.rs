//! Discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}/{version}`
//! (API concepts: "Discovery API"), including CRD-served groups once created.

use kube::discovery::{Discovery, Scope, verbs};

use super::*;

#[tokio::test]
async fn discovery_serves_builtin_groups_and_crd_groups_once_created() {
    let (_api, client) = start().await;
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
    assert!(d.get("test.slipstream.io").is_none());

    install_crd(&client).await;
    let d = Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) = d
        .resolve_gvk(&kube::api::GroupVersionKind::gvk(
            "test.slipstream.io",
            "v1",
            "Widget",
        ))
        .unwrap();
    assert_eq!(ar.plural, "widgets");
    assert_eq!(caps.scope, Scope::Namespaced);
    assert!(
        caps.subresources
            .iter()
            .any(|(sub, _)| sub.plural == "widgets/status" || sub.plural == "status"),
        "{:?}",
        caps.subresources
    );

    // The raw resource list carries short names, like `kubectl api-resources` shows them.
    let list = client
        .list_api_group_resources("test.slipstream.io/v1")
        .await
        .unwrap();
    let w = list.resources.iter().find(|r| r.name == "widgets").unwrap();
    assert_eq!(w.short_names.as_deref(), Some(&["wd".to_string()][..]));
    assert_eq!(w.singular_name, "widget");
}
