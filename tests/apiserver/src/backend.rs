//! One handle for the two Kubernetes API servers the tests run against: the
//! emulator (fast, every fault) and the real control plane (the judge of
//! what Kubernetes does), chosen by `SLIPSTREAM_TEST_APISERVER`
//! (`emulator`, the default, or `real`).
//!
//! On the real server each test gets a fresh namespace and talks through
//! the fault-injecting proxy, so the same fault calls work on both.

use std::{path::Path, time::Duration};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, api::PostParams};

use crate::{
    ApiServer, Counters, Error, FaultRule, Faults, RequestRecord,
    real::{ControlPlane, ProxyFaults},
};

/// Which server a test binary runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Emulator,
    Real,
}

impl Kind {
    /// From `SLIPSTREAM_TEST_APISERVER`; anything but `real` is the emulator.
    pub fn from_env() -> Kind {
        match std::env::var("SLIPSTREAM_TEST_APISERVER").as_deref() {
            Ok("real") => Kind::Real,
            _ => Kind::Emulator,
        }
    }
}

/// A test's API server: its own emulator, or a fresh namespace on the test
/// binary's real control plane.
pub enum TestApi {
    Emulator(ApiServer),
    Real {
        cp: &'static ControlPlane,
        namespace: String,
    },
}

impl TestApi {
    /// The server `SLIPSTREAM_TEST_APISERVER` names.
    pub async fn start() -> TestApi {
        Self::start_kind(Kind::from_env()).await
    }

    pub async fn start_kind(kind: Kind) -> TestApi {
        match kind {
            Kind::Emulator => TestApi::Emulator(
                ApiServer::start()
                    .await
                    .unwrap_or_else(|e| panic!("emulator: {e}")),
            ),
            Kind::Real => {
                let cp = ControlPlane::shared().await;
                let namespace = cp.create_namespace("t").await;
                TestApi::Real { cp, namespace }
            }
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            TestApi::Emulator(_) => Kind::Emulator,
            TestApi::Real { .. } => Kind::Real,
        }
    }

    pub fn is_real(&self) -> bool {
        self.kind() == Kind::Real
    }

    /// The namespace this test owns (`default` on the emulator).
    pub fn namespace(&self) -> &str {
        match self {
            TestApi::Emulator(_) => "default",
            TestApi::Real { namespace, .. } => namespace,
        }
    }

    /// An admin client whose default namespace is [`TestApi::namespace`];
    /// on the real server it goes through the fault proxy.
    pub fn client(&self) -> kube::Client {
        match self {
            TestApi::Emulator(api) => api.client(),
            TestApi::Real { cp, namespace } => cp.proxy_client(namespace),
        }
    }

    /// Kubeconfig for a child process or `kubectl` (through the proxy on the
    /// real server), default namespace [`TestApi::namespace`].
    pub fn kubeconfig_yaml(&self) -> String {
        match self {
            TestApi::Emulator(api) => api.kubeconfig_yaml(),
            TestApi::Real { cp, namespace } => cp.proxy_kubeconfig_yaml(namespace),
        }
    }

    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        std::fs::write(path, self.kubeconfig_yaml())?;
        Ok(())
    }

    pub fn faults(&self) -> TestFaults {
        match self {
            TestApi::Emulator(api) => TestFaults::Emulator(api.faults()),
            TestApi::Real { cp, namespace } => TestFaults::Real(cp.faults(), namespace.clone()),
        }
    }

    /// Requests so far. On the real server the proxy log is shared by every
    /// test of the binary, so only this test's namespace is counted.
    pub fn requests(&self) -> Vec<RequestRecord> {
        match self {
            TestApi::Emulator(api) => api.requests(),
            TestApi::Real { cp, namespace } => cp
                .faults()
                .requests()
                .into_iter()
                .filter(|r| &r.namespace == namespace)
                .collect(),
        }
    }

    /// Counts of [`TestApi::requests`]. `storage_writes` is known on the
    /// emulator only.
    pub fn counters(&self) -> Counters {
        Counters::from_log(&self.requests())
    }

    /// Creates `crd` unless it exists (the real server's CRDs are shared by
    /// the binary's tests) and waits until it is Established and served.
    pub async fn install_crd(&self, crd: &CustomResourceDefinition) {
        install_crd(self.client(), crd).await
    }
}

/// Creates `crd` through `client` unless it exists, and waits until it is
/// Established (on the real server a CRD is served only from then on).
pub async fn install_crd(client: kube::Client, crd: &CustomResourceDefinition) {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let name = crd.metadata.name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create CRD {name}: {e}"),
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let established = api.get(&name).await.ok().is_some_and(|c| {
            c.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if established {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "CRD {name} not Established after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fault injection on either server. On the real server a rule without a
/// namespace applies to the test's own namespace only, and closing watches
/// closes that namespace's, so tests running side by side do not see each
/// other's faults.
#[derive(Clone)]
pub enum TestFaults {
    Emulator(Faults),
    Real(ProxyFaults, String),
}

impl TestFaults {
    pub fn fail_next(&self, count: usize, code: u16) {
        self.add(FaultRule::new(code, count));
    }

    pub fn add(&self, rule: FaultRule) {
        match self {
            TestFaults::Emulator(f) => f.add(rule),
            TestFaults::Real(f, ns) => {
                let rule = match rule.namespace {
                    Some(_) => rule,
                    None => rule.namespace(ns),
                };
                f.add(rule)
            }
        }
    }

    pub fn clear(&self) {
        match self {
            TestFaults::Emulator(f) => f.clear(),
            TestFaults::Real(f, ns) => f.clear_in(ns),
        }
    }

    pub fn set_write_latency(&self, latency: Duration) {
        match self {
            TestFaults::Emulator(f) => f.set_write_latency(latency),
            TestFaults::Real(f, ns) => f.set_write_latency_in(ns, latency),
        }
    }

    pub fn close_watches(&self) {
        match self {
            TestFaults::Emulator(f) => f.close_watches(),
            TestFaults::Real(f, ns) => f.close_watches_in(ns),
        }
    }
}
