//! Shared setup: a scenario (NATS + a Kubernetes API + the CRD), operators
//! started from it, and polling helpers.
//!
//! The API is the emulator or a fresh namespace on the real control plane
//! (`SLIPSTREAM_TEST_APISERVER=emulator|real`, see [`TestApi`]). Every
//! operator a test starts watches the test's namespace only: on the real
//! server the tests of the binary share one control plane.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use apiserver::backend::{Kind, TestApi};
use bytes::Bytes;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api, Client, CustomResourceExt,
    api::{DeleteParams, PostParams},
};
use slipstream::{
    controller::{self, Config, Context, KvConnector, NatsConnector},
    crd::{ConfigBinding, ConfigBindingSpec},
    kv::{
        KvWriter,
        nats::{BucketConfig, ConnectOptions, NatsBucket, NatsKv},
    },
    metrics::Metrics,
    policy::AccessPolicy,
    sink::configmap::CURSOR_ANNOTATION,
};
use tokio::{sync::watch, task::JoinHandle};

use crate::common::NatsServer;

/// What a test starts with: a nats-server, the API server with the CRD
/// installed, and a NATS connection for the test's own writes.
pub struct Env {
    pub nats: NatsServer,
    pub api: TestApi,
    pub client: Client,
    pub kv: NatsKv,
}

/// Builds an [`Env`]: `Scenario::new().nats(server).token("t").start()`.
#[derive(Default)]
pub struct Scenario {
    nats: Option<NatsServer>,
    token: Option<String>,
    nats_down: bool,
    loose_crd: bool,
}

impl Scenario {
    pub fn new() -> Self {
        Self::default()
    }

    /// This nats-server instead of a default one.
    pub fn nats(mut self, nats: NatsServer) -> Self {
        self.nats = Some(nats);
        self
    }

    /// The test's own NATS connection authenticates with this token.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// NATS is stopped before any operator can connect (`env.nats.restart()`
    /// brings it back, [`Env::reconnect`] gives a fresh connection).
    pub fn nats_down(mut self) -> Self {
        self.nats_down = true;
        self
    }

    /// The CRD without a schema, as an older or hand-edited CRD could be:
    /// the API stores bindings this operator cannot read. Emulator only (a
    /// test there has the API to itself; the real control plane is shared).
    pub fn loose_crd(mut self) -> Self {
        assert_eq!(
            Kind::from_env(),
            Kind::Emulator,
            "a loose CRD would loosen the shared real control plane for every test"
        );
        self.loose_crd = true;
        self
    }

    pub async fn start(self) -> Env {
        init_tracing();
        let mut nats = self.nats.unwrap_or_else(NatsServer::start);
        let api = TestApi::start().await;
        let mut crd = ConfigBinding::crd();
        if self.loose_crd {
            for version in &mut crd.spec.versions {
                version.schema = Some(serde_json::from_value(serde_json::json!({
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                })).unwrap());
            }
        }
        api.install_crd(&crd).await;
        let client = api.client();
        let mut opts = ConnectOptions::new(nats.url());
        opts.token = self.token;
        let kv = NatsKv::connect(&opts).await.unwrap();
        if self.nats_down {
            nats.stop();
        }
        Env {
            nats,
            api,
            client,
            kv,
        }
    }
}

/// An in-process operator; stopped on drop.
pub struct Operator {
    pub ctx: Arc<Context>,
    pub metrics: Metrics,
    pub gate: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Operator {
    /// Stops the controller like a crash: nothing is flushed.
    pub fn kill(self) {
        self.task.abort();
        self.ctx.shutdown();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
        self.ctx.shutdown();
    }
}

/// Builds an [`Operator`]: `env.operator_builder().coalesce(..).start()`.
pub struct OperatorBuilder<'a> {
    env: &'a Env,
    nats_url: String,
    policy: AccessPolicy,
    may_write: bool,
    namespace: Option<String>,
    config: Config,
}

impl OperatorBuilder<'_> {
    pub fn policy(mut self, policy: AccessPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn coalesce(mut self, coalesce: Duration) -> Self {
        self.config.coalesce = coalesce;
        self
    }

    pub fn status_interval(mut self, interval: Duration) -> Self {
        self.config.status_interval = interval;
        self
    }

    pub fn api_concurrency(mut self, permits: usize) -> Self {
        self.config.api_concurrency = permits;
        self
    }

    /// Connects to NATS at this URL instead of the scenario's server.
    pub fn nats_url(mut self, url: &str) -> Self {
        self.nats_url = url.to_owned();
        self
    }

    /// The "may write" gate starts at `may_write` (a standby when false).
    pub fn may_write(mut self, may_write: bool) -> Self {
        self.may_write = may_write;
        self
    }

    /// Watches `namespace` instead of the test's own.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_owned());
        self
    }

    /// Watches every namespace: only on the emulator, which no other test
    /// shares.
    pub fn all_namespaces(mut self) -> Self {
        assert!(
            !self.env.api.is_real(),
            "an operator on the shared real control plane must watch one namespace"
        );
        self.namespace = None;
        self
    }

    pub fn start(self) -> Operator {
        let metrics = Metrics::new();
        let (gate_tx, gate) = watch::channel(self.may_write);
        let config = Config {
            namespace: self.namespace,
            ..self.config
        };
        let kv: Arc<dyn KvConnector> =
            Arc::new(NatsConnector::new(ConnectOptions::new(self.nats_url)));
        let ctx = Context::new(
            self.env.client.clone(),
            kv,
            self.policy,
            metrics.clone(),
            gate,
            config,
        );
        let task = tokio::spawn(controller::run(ctx.clone()));
        Operator {
            ctx,
            metrics,
            gate: gate_tx,
            task,
        }
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Env {
    /// A default scenario.
    pub async fn start() -> Env {
        Scenario::new().start().await
    }

    /// The namespace this test owns (`default` on the emulator).
    pub fn ns(&self) -> &str {
        self.api.namespace()
    }

    /// An operator with the test defaults (allow all, coalesce 20 ms,
    /// writing, watching [`Env::ns`]).
    pub fn operator(&self) -> Operator {
        self.operator_builder().start()
    }

    pub fn operator_builder(&self) -> OperatorBuilder<'_> {
        OperatorBuilder {
            env: self,
            nats_url: self.nats.url(),
            policy: AccessPolicy::allow_all(),
            may_write: true,
            namespace: Some(self.ns().to_owned()),
            config: Config {
                coalesce: Duration::from_millis(20),
                ..Config::default()
            },
        }
    }

    /// A second namespace for this test: `name` on the emulator, a fresh
    /// `name-<random>` on the real server.
    pub async fn other_namespace(&self, name: &str) -> String {
        match &self.api {
            TestApi::Real { cp, .. } => cp.create_namespace(name).await,
            TestApi::Emulator(_) => {
                let mut ns = Namespace::default();
                ns.metadata.name = Some(name.to_owned());
                Api::<Namespace>::all(self.client.clone())
                    .create(&PostParams::default(), &ns)
                    .await
                    .unwrap();
                name.to_owned()
            }
        }
    }

    /// A fresh connection to the scenario's NATS (after a restart).
    pub async fn reconnect(&self) -> NatsKv {
        NatsKv::connect(&ConnectOptions::new(self.nats.url()))
            .await
            .unwrap()
    }

    pub async fn bucket(&self, name: &str) -> NatsBucket {
        self.kv.bucket(name).await
    }

    pub fn bindings(&self) -> Api<ConfigBinding> {
        Api::namespaced(self.client.clone(), self.ns())
    }

    pub fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), self.ns())
    }

    pub async fn create_binding(&self, name: &str, yaml: &str) -> ConfigBinding {
        let spec: ConfigBindingSpec = serde_yaml::from_str(yaml).unwrap();
        let b = ConfigBinding::new(name, spec);
        self.bindings()
            .create(&PostParams::default(), &b)
            .await
            .unwrap()
    }

    pub async fn delete_binding(&self, name: &str) {
        self.bindings()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }

    pub async fn binding(&self, name: &str) -> ConfigBinding {
        self.bindings().get(name).await.unwrap()
    }

    /// A kubeconfig for the scenario's API server (for the operator
    /// binary), in a temporary directory that lives as long as the guard.
    pub fn kubeconfig_file(&self) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        self.api.write_kubeconfig(&kubeconfig).unwrap();
        (dir, kubeconfig)
    }

    pub async fn cm(&self, name: &str) -> Option<ConfigMap> {
        self.configmaps().get_opt(name).await.unwrap()
    }
}

impl NatsKvExt for NatsKv {
    async fn bucket(&self, name: &str) -> NatsBucket {
        self.create_or_open(&BucketConfig::new(name)).await.unwrap()
    }
}

pub trait NatsKvExt {
    #[allow(async_fn_in_trait)]
    async fn bucket(&self, name: &str) -> NatsBucket;
}

pub fn data(cm: &ConfigMap) -> BTreeMap<String, String> {
    cm.data.clone().unwrap_or_default()
}

pub fn cursor(cm: &ConfigMap) -> Option<u64> {
    cm.metadata
        .annotations
        .as_ref()?
        .get(CURSOR_ANNOTATION)?
        .parse()
        .ok()
}

pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub async fn put(store: &NatsBucket, key: &str, value: &str) -> u64 {
    store
        .put(key, Bytes::from(value.to_owned()))
        .await
        .unwrap()
        .as_u64()
        .unwrap()
}

/// How long [`eventually`] polls: the real server is slower per write.
pub fn patience() -> Duration {
    match Kind::from_env() {
        Kind::Emulator => Duration::from_secs(20),
        Kind::Real => Duration::from_secs(60),
    }
}

/// Polls `f` until it returns `Some`, for up to [`patience`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the ConfigMap's data equals `want`.
pub async fn wait_data(env: &Env, name: &str, want: &BTreeMap<String, String>) -> ConfigMap {
    eventually(&format!("ConfigMap {name} == {want:?}"), || async {
        env.cm(name).await.filter(|cm| &data(cm) == want)
    })
    .await
}

/// Waits until the binding's Ready condition has `reason`.
pub async fn wait_reason(env: &Env, name: &str, reason: &str) -> ConfigBinding {
    eventually(&format!("binding {name} reason {reason}"), || async {
        let b = env.binding(name).await;
        let r = b.status.as_ref()?.condition("Ready")?.reason.clone();
        (r == reason).then_some(b)
    })
    .await
}

pub fn ready_reason(b: &ConfigBinding) -> String {
    b.status
        .as_ref()
        .and_then(|s| s.condition("Ready"))
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

/// Events recorded for a binding (reasons).
pub async fn event_reasons(env: &Env, binding: &str) -> Vec<String> {
    let api: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), env.ns());
    api.list(&Default::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(binding))
                .filter_map(|e| e.reason)
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until an Event with `reason` was recorded for the binding.
pub async fn wait_event(env: &Env, binding: &str, reason: &str) {
    eventually(&format!("Event {reason} for {binding}"), || async {
        event_reasons(env, binding)
            .await
            .iter()
            .any(|r| r == reason)
            .then_some(())
    })
    .await
}
