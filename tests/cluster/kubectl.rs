//! What a user types: `kubectl explain` reads our field docs from the real
//! server's OpenAPI, `kubectl wait` sees the Ready condition, `kubectl get`
//! prints our columns.

use apiserver::real::ControlPlane;
use kube::CustomResourceExt;
use serde_json::Value;
use slipstream::crd::ConfigBinding;

use crate::support::*;

fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_explain_shows_the_target_field_docs_from_the_rust_types() {
    let cp = ControlPlane::shared().await;
    let release = default_release().await;
    let admin = KubeconfigFile::admin(cp, &release.namespace);

    // the doc comments of `Target` in src/crd/mod.rs, as the generated CRD carries them
    let crd = serde_json::to_value(ConfigBinding::crd()).unwrap();
    let target = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["target"];
    let mut docs = vec![target["description"].as_str().unwrap().to_owned()];
    let fields = target["properties"].as_object().unwrap();
    for field in [
        "name",
        "labels",
        "annotations",
        "creationPolicy",
        "deletionPolicy",
    ] {
        let doc = fields[field]["description"]
            .as_str()
            .unwrap_or_else(|| panic!("target.{field} has a doc comment"));
        docs.push(doc.to_owned());
    }
    assert!(docs.iter().any(|d| d.contains("DNS-1123")), "{docs:?}");

    // the server publishes a new CRD's OpenAPI a moment after it is established
    let explained = eventually("kubectl explain configbinding.spec.target", || async {
        admin
            .kubectl(&["explain", "configbinding.spec.target"])
            .ok()
    })
    .await;
    let flat = words(&explained);
    for doc in &docs {
        assert!(
            flat.contains(&words(doc)),
            "kubectl explain shows {doc:?}:\n{explained}"
        );
    }
    for field in fields.keys() {
        assert!(explained.contains(field.as_str()), "{field}:\n{explained}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_wait_for_ready_returns_once_the_operator_has_synced() {
    let cp = ControlPlane::shared().await;
    let release = default_release().await;
    let ns = cp.create_namespace("kubectl-wait").await;
    let admin = KubeconfigFile::admin(cp, &ns);
    let client = cp.client_in(&ns).await;
    let (nats, bucket) = nats_with_bucket().await;
    put(&bucket, "web.a", "1").await;
    put(&bucket, "web.b", "2").await;
    create_binding(&client, &ns, "web", "bucket: app-config\nprefixes: [web.]").await;

    // no operator yet: nothing can make it Ready
    let early = admin.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=3s",
        "configbinding/web",
    ]);
    assert!(
        early.as_ref().is_err_and(|e| e.contains("timed out")),
        "{early:?}"
    );

    let waiting = admin.kubectl_spawn(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=120s",
        "configbinding/web",
    ]);
    let kubeconfig = release.service_account_kubeconfig(cp, &ns).await;
    let _operator = Operator::start(release, &kubeconfig, &nats.url(), &ns);
    let out = tokio::task::spawn_blocking(move || waiting.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl wait: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("condition met"), "{stdout}");

    // the printer columns, and the category: `kubectl get slipstream` lists ours
    let table = admin.kubectl(&["get", "slipstream"]).unwrap();
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "REASON", "BUCKET", "CURSOR", "KEYS", "AGE"],
        "{table}"
    );
    let b: Value = serde_json::from_str(
        &admin
            .kubectl(&["get", "configbinding", "web", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        &row[..4],
        ["web", "True", "Synced", "app-config"],
        "{table}"
    );
    assert_eq!(row[4], b["status"]["cursor"].as_str().unwrap(), "{table}");
    assert_eq!(row[5], "2", "{table}");
    // the Ready message only with -o wide
    let wide = admin
        .kubectl(&["get", "configbindings", "web", "-o", "wide"])
        .unwrap();
    assert!(wide.lines().next().unwrap().ends_with("MESSAGE"), "{wide}");
    assert!(wide.contains("2 keys at cursor"), "{wide}");
    // kstatus: Ready, not Reconciling, not Stalled, for this generation
    let conditions = b["status"]["conditions"].as_array().unwrap();
    let state = |t: &str| {
        conditions.iter().find(|c| c["type"] == t).map(|c| {
            (
                c["status"].as_str().unwrap(),
                c["observedGeneration"].clone(),
            )
        })
    };
    let generation = b["metadata"]["generation"].clone();
    assert_eq!(state("Ready"), Some(("True", generation.clone())));
    assert_eq!(state("Reconciling"), Some(("False", generation.clone())));
    assert_eq!(state("Stalled"), Some(("False", generation)));
}
