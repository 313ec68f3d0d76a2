//! Shared setup: NATS + emulator + controller, and polling helpers.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use apiserver::ApiServer;
use bytes::Bytes;
use k8s_openapi::{
    api::core::v1::ConfigMap,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
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

pub const NS: &str = "default";

pub struct Env {
    pub nats: NatsServer,
    pub api: ApiServer,
    pub client: Client,
    pub kv: NatsKv,
}

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

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Env {
    pub async fn start() -> Env {
        Self::start_with_nats(NatsServer::start()).await
    }

    pub async fn start_with_nats(nats: NatsServer) -> Env {
        init_tracing();
        let api = ApiServer::start().await.unwrap();
        let client = api.client();
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.create(&PostParams::default(), &ConfigBinding::crd())
            .await
            .unwrap();
        let kv = NatsKv::connect(&ConnectOptions::new(nats.url()))
            .await
            .unwrap();
        Env {
            nats,
            api,
            client,
            kv,
        }
    }

    /// Like `start_with_nats`, but NATS is stopped before anyone connects.
    pub async fn start_with_nats_stopped(nats: &mut NatsServer) -> Env2 {
        init_tracing();
        let url = nats.url();
        nats.stop();
        let api = ApiServer::start().await.unwrap();
        let client = api.client();
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.create(&PostParams::default(), &ConfigBinding::crd())
            .await
            .unwrap();
        Env2 { url, api, client }
    }

    pub async fn start_with_token(nats: NatsServer, token: &str) -> Env {
        init_tracing();
        let api = ApiServer::start().await.unwrap();
        let client = api.client();
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.create(&PostParams::default(), &ConfigBinding::crd())
            .await
            .unwrap();
        let mut opts = ConnectOptions::new(nats.url());
        opts.token = Some(token.to_owned());
        let kv = NatsKv::connect(&opts).await.unwrap();
        Env {
            nats,
            api,
            client,
            kv,
        }
    }

    pub fn connector(&self) -> Arc<dyn KvConnector> {
        Arc::new(NatsConnector::new(ConnectOptions::new(self.nats.url())))
    }

    pub fn operator(&self) -> Operator {
        self.operator_with(AccessPolicy::allow_all(), Duration::from_millis(20))
    }

    /// An operator whose "may write" gate starts at `may_write`.
    pub fn operator_gated(&self, may_write: bool) -> Operator {
        let op = self.operator();
        op.gate.send(may_write).unwrap();
        op
    }

    pub fn operator_with_url(&self, url: &str) -> Operator {
        start_operator(
            &self.client,
            Arc::new(NatsConnector::new(ConnectOptions::new(url))),
            AccessPolicy::allow_all(),
            Duration::from_millis(20),
        )
    }

    pub fn operator_with(&self, policy: AccessPolicy, coalesce: Duration) -> Operator {
        start_operator(&self.client, self.connector(), policy, coalesce)
    }

    pub async fn bucket(&self, name: &str) -> NatsBucket {
        self.kv
            .create_or_open(&BucketConfig::new(name))
            .await
            .unwrap()
    }

    pub fn bindings(&self) -> Api<ConfigBinding> {
        Api::namespaced(self.client.clone(), NS)
    }

    pub fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), NS)
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

    pub async fn cm(&self, name: &str) -> Option<ConfigMap> {
        self.configmaps().get_opt(name).await.unwrap()
    }
}

pub fn start_operator(
    client: &Client,
    kv: Arc<dyn KvConnector>,
    policy: AccessPolicy,
    coalesce: Duration,
) -> Operator {
    let metrics = Metrics::new();
    let (gate_tx, gate) = watch::channel(true);
    let config = Config {
        coalesce,
        ..Config::default()
    };
    let ctx = Context::new(client.clone(), kv, policy, metrics.clone(), gate, config);
    let task = tokio::spawn(controller::run(ctx.clone()));
    Operator {
        ctx,
        metrics,
        gate: gate_tx,
        task,
    }
}

/// An environment whose NATS was down at start.
pub struct Env2 {
    pub url: String,
    pub api: ApiServer,
    pub client: Client,
}

impl Env2 {
    pub fn operator(&self) -> Operator {
        start_operator(
            &self.client,
            Arc::new(NatsConnector::new(ConnectOptions::new(self.url.clone()))),
            AccessPolicy::allow_all(),
            Duration::from_millis(20),
        )
    }

    pub async fn create_binding(&self, name: &str, yaml: &str) -> ConfigBinding {
        let spec: ConfigBindingSpec = serde_yaml::from_str(yaml).unwrap();
        let api: Api<ConfigBinding> = Api::namespaced(self.client.clone(), NS);
        api.create(&PostParams::default(), &ConfigBinding::new(name, spec))
            .await
            .unwrap()
    }

    pub async fn binding(&self, name: &str) -> ConfigBinding {
        let api: Api<ConfigBinding> = Api::namespaced(self.client.clone(), NS);
        api.get(name).await.unwrap()
    }

    pub async fn cm(&self, name: &str) -> Option<ConfigMap> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), NS);
        api.get_opt(name).await.unwrap()
    }

    pub async fn reconnect(&self, _nats: &NatsServer) -> NatsKv {
        NatsKv::connect(&ConnectOptions::new(self.url.clone()))
            .await
            .unwrap()
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

/// Polls `f` until it returns `Some`, for up to 20 s.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
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
pub trait HasClient {
    fn kube(&self) -> &Client;
}

impl HasClient for Env {
    fn kube(&self) -> &Client {
        &self.client
    }
}

impl HasClient for Env2 {
    fn kube(&self) -> &Client {
        &self.client
    }
}

pub async fn wait_data(
    env: &impl HasClient,
    name: &str,
    want: &BTreeMap<String, String>,
) -> ConfigMap {
    let api: Api<ConfigMap> = Api::namespaced(env.kube().clone(), NS);
    eventually(&format!("ConfigMap {name} == {want:?}"), || async {
        api.get_opt(name)
            .await
            .unwrap()
            .filter(|cm| &data(cm) == want)
    })
    .await
}

/// Waits until the binding's Ready condition has `reason`.
pub async fn wait_reason(env: &impl HasClient, name: &str, reason: &str) -> ConfigBinding {
    let api: Api<ConfigBinding> = Api::namespaced(env.kube().clone(), NS);
    eventually(&format!("binding {name} reason {reason}"), || async {
        let b = api.get(name).await.unwrap();
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
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), NS);
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
