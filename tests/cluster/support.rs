//! What the cluster tests share: helm and kubectl against the control plane,
//! the chart installed once per test binary, the operator binary run the way
//! the chart's Deployment runs it, and polling.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use apiserver::real::ControlPlane;
use bytes::Bytes;
use k8s_openapi::api::{
    apps::v1::Deployment,
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{ConfigMap, Container, ServiceAccount},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ObjectMeta, PostParams},
};
use serde::Deserialize;
use serde_json::Value;
use slipstream::{
    controller::FINALIZER,
    crd::{ConfigBinding, ConfigBindingSpec},
    kv::{
        KvWriter,
        nats::{BucketConfig, ConnectOptions, NatsBucket, NatsKv},
    },
};

use crate::common::{NatsServer, free_port, tool};

/// How long a poll waits: generous, the machine is shared.
pub const PATIENCE: Duration = Duration::from_secs(120);

pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/slipstream")
}

/// A kubeconfig in a file, for helm, kubectl and the operator binary.
pub struct KubeconfigFile {
    dir: tempfile::TempDir,
}

impl KubeconfigFile {
    pub fn new(yaml: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cluster-test-")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("kubeconfig"), yaml).unwrap();
        Self { dir }
    }

    /// The control plane's admin, default namespace `namespace`.
    pub fn admin(cp: &ControlPlane, namespace: &str) -> Self {
        Self::new(&cp.kubeconfig_yaml(namespace))
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// `kubectl <args>`: Ok(stdout) on success, Err(stderr + stdout) otherwise.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        run(&tool("kubectl"), &self.path(), args, None)
    }

    /// `kubectl <args>` with `input` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String, String> {
        run(&tool("kubectl"), &self.path(), args, Some(input))
    }

    /// `kubectl <args>` as a child process (for `kubectl wait`).
    pub fn kubectl_spawn(&self, args: &[&str]) -> Child {
        Command::new(tool("kubectl"))
            .arg("--kubeconfig")
            .arg(self.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn helm(&self, args: &[&str]) -> Result<String, String> {
        run(&tool("helm"), &self.path(), args, None)
    }
}

fn run(
    bin: &Path,
    kubeconfig: &Path,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, String> {
    let mut child = Command::new(bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{} runs: {e}", bin.display()));
    if let Some(input) = input {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{} {args:?} failed ({}): {}{stdout}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A name suffix no other test uses.
pub fn unique() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Every non-empty document of a multi-document YAML stream, as JSON values.
pub fn parse_documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|doc| {
            let v = serde_yaml::Value::deserialize(doc).expect("valid YAML");
            (!v.is_null()).then(|| serde_json::to_value(v).expect("YAML maps have string keys"))
        })
        .collect()
}

/// One `helm install` of charts/slipstream, as the server holds it.
pub struct Release {
    pub name: String,
    pub namespace: String,
    /// `helm get manifest`: what helm sent, one JSON value per object.
    pub manifest: Vec<Value>,
}

/// Helm installs the chart's CRD with the first release; one install at a
/// time, so two releases never race to create it.
static HELM_INSTALL: Mutex<()> = Mutex::new(());

impl Release {
    /// Creates `namespace`, checks every rendered object against the real
    /// server's schemas with strict field validation (a server-side dry run:
    /// unknown or duplicate fields fail it, where a plain create would only
    /// warn and drop them), then `helm install`s the chart there.
    pub fn install(cp: &ControlPlane, name: &str, namespace: &str, sets: &[&str]) -> Release {
        let admin = KubeconfigFile::admin(cp, namespace);
        admin
            .kubectl(&["create", "namespace", namespace])
            .unwrap_or_else(|e| panic!("{e}"));
        let chart = chart_dir();
        let mut values = Vec::new();
        for s in sets {
            values.extend(["--set", s]);
        }
        let mut template = vec!["template", name, chart.to_str().unwrap()];
        template.extend(["--namespace", namespace]);
        template.extend(&values);
        let rendered = admin.helm(&template).unwrap_or_else(|e| panic!("{e}"));
        // No --namespace: kubectl would refuse the objects the chart puts in
        // another namespace (watchNamespace's Role, a ServiceMonitor's own
        // namespace); the rest land in the kubeconfig's default, `namespace`.
        admin
            .kubectl_stdin(
                &["create", "--dry-run=server", "--validate=strict", "-f", "-"],
                &rendered,
            )
            .unwrap_or_else(|e| panic!("the real server rejects the chart {sets:?}: {e}"));

        let mut install = vec!["install", name, chart.to_str().unwrap()];
        install.extend(["--namespace", namespace]);
        install.extend(&values);
        {
            let _one_at_a_time = HELM_INSTALL.lock().unwrap_or_else(|p| p.into_inner());
            admin
                .helm(&install)
                .unwrap_or_else(|e| panic!("helm install {sets:?}: {e}"));
        }
        let manifest = admin
            .helm(&["get", "manifest", name, "--namespace", namespace])
            .unwrap_or_else(|e| panic!("{e}"));
        Release {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            manifest: parse_documents(&manifest),
        }
    }

    /// The one object of `kind` in the manifest.
    pub fn one(&self, kind: &str) -> &Value {
        let found: Vec<_> = self.manifest.iter().filter(|d| d["kind"] == kind).collect();
        assert_eq!(found.len(), 1, "one {kind} in the release");
        found[0]
    }

    pub fn service_account(&self) -> String {
        self.one("ServiceAccount")["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// `system:serviceaccount:NS:NAME`, for `kubectl --as`.
    pub fn service_account_user(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace,
            self.service_account()
        )
    }

    /// The operator container of the chart's Deployment.
    pub fn operator_container(&self) -> Container {
        let d: Deployment = serde_json::from_value(self.one("Deployment").clone()).unwrap();
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.containers.len(), 1, "one container");
        pod.containers[0].clone()
    }

    /// A bearer token for the chart's ServiceAccount from the TokenRequest
    /// API, in a kubeconfig whose default namespace is `namespace`.
    pub async fn service_account_kubeconfig(&self, cp: &ControlPlane, namespace: &str) -> String {
        let api: Api<ServiceAccount> = Api::namespaced(cp.client().await, &self.namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(), // the API server's own
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let token = api
            .create_token_request(&self.service_account(), &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {}: {e}", self.service_account()))
            .status
            .expect("TokenRequest answers with a token")
            .token;
        cp.token_kubeconfig_yaml(&token, namespace)
    }
}

static DEFAULT_RELEASE: OnceLock<Release> = OnceLock::new();

/// The chart with its default values, installed once per test binary into
/// its own namespace (release `slipstream`; the first install on this
/// control plane, so helm installs the CRD from the chart's `crds/`).
pub async fn default_release() -> &'static Release {
    let cp = ControlPlane::shared().await;
    tokio::task::spawn_blocking(move || {
        DEFAULT_RELEASE.get_or_init(|| {
            let ns = format!("slipstream-system-{}", unique());
            let release = Release::install(cp, "slipstream", &ns, &[]);
            wait_crd_established(cp);
            release
        })
    })
    .await
    .unwrap()
}

/// Waits until the ConfigBinding CRD (installed by helm) is served.
pub fn wait_crd_established(cp: &ControlPlane) {
    KubeconfigFile::admin(cp, "default")
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=120s",
            "crd/configbindings.slipstream.io",
        ])
        .unwrap_or_else(|e| panic!("the chart's CRD is established: {e}"));
}

/// The `slipstream` binary, started the way the chart's Deployment starts it.
pub struct Operator {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Operator {
    /// Runs `slipstream` with the container's args and env from the
    /// release's rendered Deployment, outside the cluster: only what cannot
    /// hold on this machine changes (the NATS URL, a free loopback port for
    /// `/metrics`, the downward-API fields filled in as the kubelet would),
    /// plus `--namespace` so parallel tests do not meet. The log level adds
    /// the controller's debug lines, where a refused Event would show (set as
    /// `SLIPSTREAM_LOG_LEVEL`, which wins over `RUST_LOG` and over the
    /// chart's own level).
    pub fn start(
        release: &Release,
        kubeconfig_yaml: &str,
        nats_url: &str,
        namespace: &str,
    ) -> Self {
        let c = release.operator_container();
        assert!(c.command.is_none(), "the image's entrypoint is the binary");
        let pod_name = format!("{}-{}", release.name, unique());
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut env = BTreeMap::new();
        for e in c.env.clone().unwrap_or_default() {
            let value = match (e.value, e.value_from) {
                (Some(v), _) => v,
                (None, Some(from)) => match from.field_ref.map(|f| f.field_path) {
                    Some(path) if path == "metadata.name" => pod_name.clone(),
                    Some(path) if path == "metadata.namespace" => release.namespace.clone(),
                    other => panic!("env {} from {other:?}: not set by this test", e.name),
                },
                (None, None) => String::new(),
            };
            env.insert(e.name, value);
        }
        for (name, value) in [
            ("SLIPSTREAM_NATS_URL", nats_url),
            ("SLIPSTREAM_METRICS_ADDR", &metrics),
        ] {
            assert!(env.contains_key(name), "the chart sets {name}");
            env.insert(name.to_owned(), value.to_owned());
        }
        let dir = tempfile::Builder::new()
            .prefix("cluster-operator-")
            .tempdir()
            .unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml).unwrap();
        let log = std::fs::File::create(dir.path().join("operator.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_slipstream"))
            .args(c.args.clone().unwrap_or_default())
            .args(["--namespace", namespace])
            .env_clear()
            .envs(&env)
            .env("KUBECONFIG", &kubeconfig)
            .env("SLIPSTREAM_LOG_LEVEL", "info,slipstream=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Operator {
            child: Some(child),
            dir,
        }
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("operator.log")).unwrap_or_default()
    }

    /// The log lines where the API server refused the operator something.
    pub fn forbidden_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| {
                // a bare "403" also matches timestamps (".884038Z")
                let l = l.to_ascii_lowercase();
                l.contains("forbidden") || l.contains("code: 403") || l.contains("\"code\":403")
            })
            .map(str::to_owned)
            .collect()
    }

    /// Still running, and the API server refused it nothing.
    pub fn assert_never_refused(&mut self) {
        self.assert_running();
        let forbidden = self.forbidden_lines();
        assert!(
            forbidden.is_empty(),
            "the API server refused the operator:\n{}",
            forbidden.join("\n")
        );
    }

    /// SIGKILL: nothing is cleaned up, finalizers stay.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Panics with the log when the process has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("operator started");
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the operator exited ({status}):\n{}", self.log());
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("--- the operator's log ends:\n{}", tail.join("\n"));
        }
    }
}

/// A nats-server and the bucket `app-config` in it.
pub async fn nats_with_bucket() -> (NatsServer, NatsBucket) {
    let server = NatsServer::start();
    let kv = NatsKv::connect(&ConnectOptions::new(server.url()))
        .await
        .unwrap();
    let bucket = kv
        .create_or_open(&BucketConfig::new("app-config"))
        .await
        .unwrap();
    (server, bucket)
}

pub async fn put(bucket: &NatsBucket, key: &str, value: &str) {
    bucket
        .put(key, Bytes::from(value.to_owned()))
        .await
        .unwrap();
}

/// Creates a ConfigBinding from its spec in YAML.
pub async fn create_binding(client: &Client, ns: &str, name: &str, spec: &str) -> ConfigBinding {
    let spec: ConfigBindingSpec = serde_yaml::from_str(spec).unwrap();
    let binding = ConfigBinding {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        spec,
        status: None,
    };
    Api::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap_or_else(|e| panic!("create binding {name}: {e}"))
}

pub fn data(cm: &ConfigMap) -> BTreeMap<String, String> {
    cm.data.clone().unwrap_or_default()
}

pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// (status, reason) of the binding's Ready condition.
pub fn ready(b: &ConfigBinding) -> Option<(String, String)> {
    let c = b.status.as_ref()?.condition("Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

/// Polls `f` until it returns `Some`, for up to [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {PATIENCE:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the ConfigMap `name` holds exactly `want`.
pub async fn wait_data(
    client: &Client,
    ns: &str,
    name: &str,
    want: &BTreeMap<String, String>,
) -> ConfigMap {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    eventually(&format!("ConfigMap {ns}/{name} == {want:?}"), || async {
        api.get_opt(name)
            .await
            .unwrap()
            .filter(|cm| &data(cm) == want)
    })
    .await
}

/// Deletes binding `name` and waits until it is gone and its ConfigMap (of
/// the same name) deleted: by the garbage collector for an Owner + Delete
/// binding, by our finalizer's cleanup otherwise.
pub async fn delete_binding_and_wait_gone(client: &Client, ns: &str, name: &str) {
    let bindings: Api<ConfigBinding> = Api::namespaced(client.clone(), ns);
    bindings
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("binding and ConfigMap {ns}/{name} gone"),
        || async {
            let gone = bindings.get_opt(name).await.unwrap().is_none()
                && cms.get_opt(name).await.unwrap().is_none();
            gone.then_some(())
        },
    )
    .await;
}

/// Waits until the binding carries the operator's finalizer.
pub async fn wait_finalizer(client: &Client, ns: &str, name: &str) -> ConfigBinding {
    let api: Api<ConfigBinding> = Api::namespaced(client.clone(), ns);
    eventually(&format!("binding {ns}/{name} has {FINALIZER}"), || async {
        let b = api.get(name).await.unwrap();
        b.finalizers().contains(&FINALIZER.to_owned()).then_some(b)
    })
    .await
}

/// Waits until the binding is Ready with reason Synced.
pub async fn wait_synced(client: &Client, ns: &str, name: &str) -> ConfigBinding {
    let api: Api<ConfigBinding> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("binding {ns}/{name} Ready=True Synced"),
        || async {
            let b = api.get(name).await.unwrap();
            (ready(&b) == Some(("True".into(), "Synced".into()))).then_some(b)
        },
    )
    .await
}

/// `kubectl auth can-i VERB RESOURCE --as USER` in namespace `scope`, or
/// cluster-wide for `scope` "cluster". `RESOURCE` may name a subresource
/// (`configbindings.slipstream.io/status`).
pub fn user_can(
    admin: &KubeconfigFile,
    user: &str,
    verb: &str,
    resource: &str,
    scope: &str,
) -> bool {
    // `kubectl auth can-i VERB a/b` reads b as an object name
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, sub)) => (r, Some(format!("--subresource={sub}"))),
        None => (resource, None),
    };
    let as_user = format!("--as={user}");
    let mut args = vec!["auth", "can-i", verb, resource, &as_user];
    args.extend(subresource.as_deref());
    match scope {
        "cluster" => args.push("--all-namespaces"),
        ns => args.extend(["--namespace", ns]),
    }
    match admin.kubectl(&args) {
        Ok(out) => out.trim() == "yes",
        Err(e) if e.trim_end().ends_with("no") => false,
        Err(e) => panic!("{e}"),
    }
}
