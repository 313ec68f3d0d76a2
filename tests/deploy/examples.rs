//! `examples/*.yaml`: each parses into its typed Kubernetes object and
//! applies to the API emulator (with the checked-in CRD).

use std::path::PathBuf;

use k8s_openapi::{
    api::apps::v1::Deployment,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::Value;
use slipstream::crd::ConfigBinding;

use crate::{parse_documents, root};

/// (file name, documents) for every example.
pub fn examples() -> Vec<(String, Vec<Value>)> {
    let dir = root().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let docs = parse_documents(&text);
            assert!(!docs.is_empty(), "{name} is empty");
            (name, docs)
        })
        .collect()
}

#[test]
fn every_example_parses_into_its_kubernetes_type() {
    let mut bindings = 0;
    let mut deployments = 0;
    for (file, docs) in examples() {
        for doc in docs {
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            match kind.as_str() {
                "ConfigBinding" => {
                    assert_eq!(doc["apiVersion"], "slipstream.io/v1alpha1", "{file}");
                    let cb: ConfigBinding = serde_json::from_value(doc)
                        .unwrap_or_else(|e| panic!("{file}: not a ConfigBinding: {e}"));
                    assert!(!cb.spec.prefixes.is_empty(), "{file}");
                    bindings += 1;
                }
                "Deployment" => {
                    let d: Deployment = serde_json::from_value(doc)
                        .unwrap_or_else(|e| panic!("{file}: not a Deployment: {e}"));
                    let spec = d.spec.unwrap();
                    assert_eq!(
                        Some(spec.selector.match_labels.unwrap()),
                        spec.template.metadata.unwrap().labels,
                        "{file}: selector matches the pod labels"
                    );
                    deployments += 1;
                }
                other => panic!("{file}: unexpected kind {other:?}"),
            }
        }
    }
    assert!(bindings >= 1 && deployments >= 3);
}

/// The pods read the ConfigMap the example binding writes, and the sidecar
/// syncs the same bucket and prefix.
#[test]
fn example_pods_consume_what_the_example_binding_produces() {
    let all = examples();
    let find = |file: &str| -> Value {
        all.iter()
            .find(|(f, _)| f == file)
            .unwrap_or_else(|| panic!("examples/{file} exists"))
            .1[0]
            .clone()
    };
    let cb: ConfigBinding = serde_json::from_value(find("configbinding.yaml")).unwrap();
    let target = cb.spec.target.name.clone().unwrap();
    let pod = |file: &str| find(file)["spec"]["template"]["spec"].clone();

    let volume = pod("deployment-volume.yaml");
    assert_eq!(volume["volumes"][0]["configMap"]["name"], target.as_str());
    let env = pod("deployment-envfrom.yaml");
    assert_eq!(
        env["containers"][0]["envFrom"][0]["configMapRef"]["name"],
        target.as_str()
    );
    // environment is read at start: the binding rolls that Deployment
    let rollout = cb.spec.target.rollout.clone().expect("target.rollout");
    let envfrom = find("deployment-envfrom.yaml");
    assert_eq!(rollout.workloads[0].kind.as_str(), envfrom["kind"]);
    assert_eq!(rollout.workloads[0].name, envfrom["metadata"]["name"]);

    let sidecar = pod("sidecar-sync.yaml");
    let inits = sidecar["initContainers"].as_array().unwrap();
    assert_eq!(inits.len(), 2);
    for init in inits {
        let args: Vec<&str> = init["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args[0], "sync");
        let flag = |name: &str| args.iter().position(|a| *a == name).map(|i| args[i + 1]);
        assert_eq!(flag("--bucket"), Some(cb.spec.bucket.as_str()));
        assert_eq!(flag("--prefix"), Some(cb.spec.prefixes[0].as_str()));
        assert_eq!(args.contains(&"--strip-prefix"), cb.spec.strip_prefix);
    }
    assert_eq!(
        inits[1]["restartPolicy"], "Always",
        "the second one is a native sidecar"
    );
}

/// True when every field set in `part` is set to the same value in `whole`.
fn contains(whole: &Value, part: &Value) -> bool {
    match (whole, part) {
        (Value::Object(w), Value::Object(p)) => p
            .iter()
            .all(|(k, v)| w.get(k).is_some_and(|wv| contains(wv, v))),
        (Value::Array(w), Value::Array(p)) => {
            w.len() == p.len() && w.iter().zip(p).all(|(a, b)| contains(a, b))
        }
        _ => whole == part,
    }
}

/// Creates the checked-in CRD on the emulator.
async fn install_crd(client: &kube::Client) {
    let crd: CustomResourceDefinition = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("crds/slipstream.io_configbindings.yaml")).unwrap(),
    )
    .unwrap();
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &crd)
        .await
        .unwrap();
}

/// Server-side applies one example document; returns the stored object.
async fn apply(client: &kube::Client, doc: &Value) -> Result<Value, kube::Error> {
    let name = doc["metadata"]["name"].as_str().unwrap();
    let pp = PatchParams::apply("examples-test");
    match doc["kind"].as_str().unwrap() {
        "ConfigBinding" => {
            let api = Api::<ConfigBinding>::namespaced(client.clone(), "default");
            let obj: ConfigBinding = serde_json::from_value(doc.clone()).unwrap();
            let stored = api.patch(name, &pp, &Patch::Apply(&obj)).await?;
            Ok(serde_json::to_value(stored).unwrap())
        }
        "Deployment" => {
            let api = Api::<Deployment>::namespaced(client.clone(), "default");
            let obj: Deployment = serde_json::from_value(doc.clone()).unwrap();
            let stored = api.patch(name, &pp, &Patch::Apply(&obj)).await?;
            Ok(serde_json::to_value(stored).unwrap())
        }
        other => panic!("no apply path for kind {other}"),
    }
}

#[tokio::test]
async fn every_example_applies_to_the_api_emulator_with_the_crd_installed() {
    let server = apiserver::ApiServer::start().await.unwrap();
    let client = server.client();
    install_crd(&client).await;

    let mut applied = 0;
    for (file, docs) in examples() {
        for doc in docs {
            let stored = apply(&client, &doc)
                .await
                .unwrap_or_else(|e| panic!("{file}: apply failed: {e}"));
            assert_eq!(stored["metadata"]["namespace"], "default", "{file}");
            assert!(
                contains(&stored["spec"], &doc["spec"]),
                "{file}: a field was dropped or changed (pruned by the schema?): {}",
                stored["spec"]
            );
            applied += 1;
        }
    }
    assert!(applied >= 4);

    // The same path rejects what a real API server rejects: a binding
    // without prefixes fails the CRD schema.
    let (_, docs) = examples()
        .into_iter()
        .find(|(f, _)| f == "configbinding.yaml")
        .unwrap();
    let mut bad = docs[0].clone();
    bad["metadata"]["name"] = "no-prefixes".into();
    bad["spec"]["prefixes"] = serde_json::json!([]);
    let err = apply(&client, &bad).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422),
        "expected 422 Invalid, got {err}"
    );
}
