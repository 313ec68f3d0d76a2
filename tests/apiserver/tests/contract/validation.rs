//! Validation with the real error shape (`Status` 422 Invalid with causes):
//! DNS-1123 names, ConfigMap key rules and the 1 MiB limit, and custom
//! resources against the CRD's structural schema (pruning and defaulting
//! included, per "Specifying a structural schema").

use kube::api::{Patch, PatchParams};

use super::*;

fn causes(s: &kube::core::Status) -> Vec<(String, String)> {
    s.details
        .as_ref()
        .map(|d| {
            d.causes
                .iter()
                .map(|c| (c.field.clone(), c.reason.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn invalid_object_names_are_422_invalid_with_a_dns1123_cause() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let s = api_err(
        cms.create(&PostParams::default(), &cm("Bad_Name", &[]))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert!(s.message.starts_with("ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"), "{}", s.message);
    assert_eq!(
        causes(&s),
        [("metadata.name".to_string(), "FieldValueInvalid".to_string())]
    );
    assert_eq!(s.details.as_ref().unwrap().kind, "ConfigMap");
    let nss: Api<Namespace> = Api::all(client);
    let s = api_err(
        nss.create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("a.b".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(
        s.message,
        "Namespace \"a.b\" is invalid: metadata.name: Invalid value: \"a.b\": must not contain dots",
        "namespaces are labels"
    );
    let s = api_err(
        nss.create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("Bad_NS".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await,
    );
    assert!(
        s.message
            .contains("a lowercase RFC 1123 label must consist of"),
        "{}",
        s.message
    );
}

#[tokio::test]
async fn configmap_keys_must_match_the_config_key_regex_and_fit_253_characters() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let long = "k".repeat(254);
    let s = api_err(
        cms.create(
            &PostParams::default(),
            &cm("k", &[("a b", "1"), (&long, "2"), ("ok-._A1", "3")]),
        )
        .await,
    );
    assert_eq!(s.code, 422);
    let c = causes(&s);
    assert!(
        c.contains(&("data[a b]".to_string(), "FieldValueInvalid".to_string())),
        "{c:?}"
    );
    assert!(
        c.contains(&(format!("data[{long}]"), "FieldValueInvalid".to_string())),
        "{c:?}"
    );
    assert!(
        s.message
            .contains("regex used for validation is '[-._a-zA-Z0-9]+'"),
        "{}",
        s.message
    );
}

#[tokio::test]
async fn a_key_in_both_data_and_binary_data_is_invalid() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let mut c = cm("dup", &[("k", "v")]);
    c.binary_data = Some([("k".to_string(), k8s_openapi::ByteString(b"x".to_vec()))].into());
    let s = api_err(cms.create(&PostParams::default(), &c).await);
    assert_eq!(s.code, 422);
    assert!(
        s.message.contains("duplicate of key present in binaryData"),
        "{}",
        s.message
    );
}

#[tokio::test]
async fn configmaps_over_one_mebibyte_of_values_in_data_and_binary_data_are_invalid() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    // Exactly 1 MiB of values is accepted: keys do not count.
    let exact = "x".repeat(1024 * 1024);
    cms.create(&PostParams::default(), &cm("exact", &[("ab", &exact)]))
        .await
        .unwrap();
    // Over by one byte, split across data and binaryData, is not.
    let mut c = cm("big", &[("a", &"x".repeat(512 * 1024))]);
    c.binary_data = Some(
        [(
            "b".to_string(),
            k8s_openapi::ByteString(vec![0u8; 512 * 1024 + 1]),
        )]
        .into(),
    );
    let s = api_err(cms.create(&PostParams::default(), &c).await);
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        s.message,
        "ConfigMap \"big\" is invalid: []: Too long: may not be more than 1048576 bytes"
    );
    // The same rule holds for updates through server-side apply.
    let big = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "exact"}, "data": {"ab": exact, "more": "y"}});
    assert_eq!(
        api_err(
            cms.patch(
                "exact",
                &PatchParams::apply("t").force(),
                &Patch::Apply(big)
            )
            .await
        )
        .code,
        422
    );
}

#[tokio::test]
async fn custom_resources_are_validated_against_the_crd_schema() {
    let (_api, client) = start_with_crd().await;
    let raw: Api<kube::api::DynamicObject> =
        Api::default_namespaced_with(client, &kube::api::ApiResource::erase::<Widget>(&()));
    let mk = |spec: Value| -> kube::api::DynamicObject {
        serde_json::from_value(json!({"apiVersion": "test.slipstream.io/v1", "kind": "Widget", "metadata": {"name": "v"}, "spec": spec})).unwrap()
    };
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({}), "spec.size", "FieldValueRequired"),
        (json!({"size": "big"}), "spec.size", "FieldValueTypeInvalid"),
        (json!({"size": 0}), "spec.size", "FieldValueInvalid"),
        (json!({"size": 11}), "spec.size", "FieldValueInvalid"),
        (
            json!({"size": 1, "color": "green"}),
            "spec.color",
            "FieldValueNotSupported",
        ),
        (
            json!({"size": 1, "label": "ABC"}),
            "spec.label",
            "FieldValueInvalid",
        ),
        (
            json!({"size": 1, "label": "a"}),
            "spec.label",
            "FieldValueInvalid",
        ),
        (
            json!({"size": 1, "label": "abcdefghi"}),
            "spec.label",
            "FieldValueTooLong",
        ),
        (
            json!({"size": 1, "tags": []}),
            "spec.tags",
            "FieldValueInvalid",
        ),
        (
            json!({"size": 1, "tags": ["a", "b", "c", "d"]}),
            "spec.tags",
            "FieldValueTooMany",
        ),
    ];
    for (spec, field, reason) in cases {
        let s = api_err(raw.create(&PostParams::default(), &mk(spec.clone())).await);
        assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"), "{spec}");
        assert!(
            s.message
                .starts_with("Widget.test.slipstream.io \"v\" is invalid: "),
            "{}",
            s.message
        );
        assert!(
            causes(&s).contains(&(field.to_string(), reason.to_string())),
            "{spec}: {:?} / {}",
            causes(&s),
            s.message
        );
    }
}

#[tokio::test]
async fn custom_resources_get_schema_defaults_and_unknown_fields_pruned() {
    let (_api, client) = start_with_crd().await;
    let ar = ApiResource::erase::<Widget>(&());
    let raw: Api<DynamicObject> = Api::default_namespaced_with(client.clone(), &ar);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "test.slipstream.io/v1", "kind": "Widget", "metadata": {"name": "d"},
        "spec": {"size": 2, "unknown": "dropped", "extra": {"anything": {"goes": 1}}},
        "topLevelUnknown": true
    }))
    .unwrap();
    raw.create(&PostParams::default(), &obj).await.unwrap();
    let stored = get_json(&client, &ar, "d").await;
    assert_eq!(stored["spec"]["color"], "red", "default applied");
    assert!(
        stored["spec"].get("unknown").is_none(),
        "unknown field pruned"
    );
    assert!(stored.get("topLevelUnknown").is_none());
    assert_eq!(
        stored["spec"]["extra"]["anything"]["goes"], 1,
        "x-kubernetes-preserve-unknown-fields keeps it"
    );
}

#[tokio::test]
async fn strict_field_validation_rejects_unknown_fields_instead_of_pruning() {
    let (_api, client) = start_with_crd().await;
    let raw: Api<DynamicObject> =
        Api::default_namespaced_with(client.clone(), &ApiResource::erase::<Widget>(&()));
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "test.slipstream.io/v1", "kind": "Widget", "metadata": {"name": "s"},
        "spec": {"size": 2, "unknown": "x"}
    }))
    .unwrap();
    // kube's PostParams has no fieldValidation: a raw POST.
    let req = http::Request::post(format!("{}?fieldValidation=Strict", raw.resource_url()))
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&obj).unwrap())
        .unwrap();
    let s = api_err(client.request::<DynamicObject>(req).await);
    assert_eq!((s.code, s.reason.as_str()), (400, "BadRequest"));
    assert_eq!(
        s.message,
        "Widget in version \"v1\" cannot be handled as a Widget: strict decoding error: unknown field \"spec.unknown\""
    );
    raw.create(&PostParams::default(), &obj).await.unwrap();
}

#[tokio::test]
async fn apply_of_a_field_the_schema_does_not_declare_fails_whatever_the_field_validation() {
    // Server-side apply converts the configuration to the schema's type
    // first; it does not prune like a create or an update does.
    let (_api, client) = start_with_crd().await;
    let raw: Api<DynamicObject> =
        Api::default_namespaced_with(client, &ApiResource::erase::<Widget>(&()));
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "test.slipstream.io/v1", "kind": "Widget", "metadata": {"name": "s"},
        "spec": {"size": 2, "unknown": "x", "extra": {"kept": true}}
    }))
    .unwrap();
    for validation in [
        None,
        Some(kube::api::ValidationDirective::Ignore),
        Some(kube::api::ValidationDirective::Strict),
    ] {
        let mut pp = PatchParams::apply("t");
        pp.field_validation = validation.clone();
        let s = api_err(raw.patch("s", &pp, &Patch::Apply(&obj)).await);
        assert_eq!(
            (s.code, s.message.as_str()),
            (
                500,
                "failed to create typed patch object (/s; test.slipstream.io/v1, Kind=Widget): .spec.unknown: field not declared in schema"
            ),
            "{validation:?}"
        );
    }
    assert!(raw.get_opt("s").await.unwrap().is_none());
}
