//! The real Kubernetes control plane for tests, like controller-runtime's
//! envtest: etcd, kube-apiserver and kube-controller-manager (built from
//! their Go modules by `make tools`, see `scripts/build-controlplane.sh`),
//! started on free loopback ports with a throwaway PKI, RBAC authorization,
//! service-account token signing and an admin client certificate.
//!
//! ```no_run
//! # async fn demo() {
//! let cp = apiserver::real::ControlPlane::shared().await;   // one per test binary
//! let ns = cp.create_namespace("demo").await;               // a fresh namespace per test
//! let admin = cp.client_in(&ns).await;                      // kube::Client straight to kube-apiserver
//! let faulty = cp.proxy_client(&ns);                        // through the fault-injecting proxy
//! cp.faults().add(apiserver::FaultRule::new(500, 1).verb("patch"));
//! # let _ = (admin, faulty); }
//! ```

mod pki;
mod process;
mod proxy;

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use base64::Engine;
use kube::config::{KubeConfigOptions, Kubeconfig};

pub use self::proxy::ProxyFaults;
use self::{pki::Pki, process::Process, proxy::Proxy};
use crate::Error;

/// Versions built by `scripts/build-controlplane.sh`.
pub const KUBERNETES_VERSION: &str = "v1.35.4";

/// What to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// Also run kube-controller-manager with the garbage collector, the
    /// namespace controller, the service-account controllers and the
    /// deployment controller (a changed pod template makes a new
    /// ReplicaSet; no ReplicaSet controller, so no pods).
    pub controller_manager: bool,
    /// etcd fsyncs every write (off for tests: `--unsafe-no-fsync`; on for
    /// benchmarks that measure what a user's etcd costs).
    pub etcd_fsync: bool,
    /// Extra kube-apiserver flags (`--max-requests-inflight=...`).
    pub apiserver_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            controller_manager: true,
            etcd_fsync: false,
            apiserver_args: Vec::new(),
        }
    }
}

/// A running control plane. Dropping it stops every process; the shared one
/// (a `static`) is stopped by the process guards when the test binary exits.
pub struct ControlPlane {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    url: String,
    etcd_url: String,
    pki: Pki,
    processes: Mutex<Vec<Process>>,
    proxy: Proxy,
    /// From the first process spawned to kube-apiserver's `/readyz` answering 200.
    pub started_in: Duration,
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

impl ControlPlane {
    /// The test binary's control plane, started on first use. Panics with
    /// the reason (for example "run `make tools`") when it cannot start.
    pub async fn shared() -> &'static ControlPlane {
        let cp = tokio::task::spawn_blocking(|| {
            SHARED.get_or_init(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(ControlPlane::start_with(Options::default(), false))
                    .map_err(|e| e.to_string())
            })
        })
        .await;
        match cp {
            Ok(Ok(cp)) => cp,
            Ok(Err(e)) => panic!("the real control plane did not start: {e}"),
            Err(e) => panic!("starting the real control plane: {e}"),
        }
    }

    /// A control plane of its own, removed (processes and files) when dropped.
    pub async fn start(options: Options) -> Result<ControlPlane, Error> {
        Self::start_with(options, true).await
    }

    async fn start_with(options: Options, owned: bool) -> Result<ControlPlane, Error> {
        let etcd_bin = process::find_binary("etcd", "ETCD_BIN")?;
        let apiserver_bin = process::find_binary("kube-apiserver", "KUBE_APISERVER_BIN")?;
        let kcm_bin = if options.controller_manager {
            Some(process::find_binary(
                "kube-controller-manager",
                "KUBE_CONTROLLER_MANAGER_BIN",
            )?)
        } else {
            None
        };
        let tmp = tempfile::Builder::new()
            .prefix("slipstream-controlplane-")
            .tempdir()?;
        let dir = tmp.path().to_path_buf();
        // An owned control plane's directory goes with the TempDir; the
        // shared one's is removed by etcd's guard after the test binary exits.
        let (tmp, cleanup) = if owned {
            (Some(tmp), None)
        } else {
            (None, Some(tmp.keep()))
        };
        let pki = Pki::write(&dir)?;
        let started = Instant::now();
        let free = crate::real::free_port;
        let (etcd_port, peer_port, api_port) = (free()?, free()?, free()?);

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd_args = vec![
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--log-level=warn".into(),
        ];
        if !options.etcd_fsync {
            etcd_args.push("--unsafe-no-fsync=true".into());
        }
        let mut processes = vec![Process::spawn(
            "etcd",
            &etcd_bin,
            &etcd_args,
            &dir,
            cleanup.as_deref(),
        )?];

        let p = |f: &Path| f.display().to_string();
        let mut api_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", dir.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", p(&pki.serving_cert_file)),
            format!("--tls-private-key-file={}", p(&pki.serving_key_file)),
            format!("--client-ca-file={}", p(&pki.ca_file)),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p(&pki.sa_pub_file)),
            format!("--service-account-signing-key-file={}", p(&pki.sa_key_file)),
            "--service-cluster-ip-range=10.96.0.0/24".into(),
            "--endpoint-reconciler-type=none".into(),
            "--profiling=false".into(),
        ];
        api_args.extend(options.apiserver_args.iter().cloned());
        processes.push(Process::spawn(
            "kube-apiserver",
            &apiserver_bin,
            &api_args,
            &dir,
            None,
        )?);

        let url = format!("https://127.0.0.1:{api_port}");
        let admin_yaml = kubeconfig(
            &url,
            &pki.ca_pem,
            &User::Cert(&pki.admin_cert_pem, &pki.admin_key_pem),
            "default",
        );
        let admin = client_config(&admin_yaml).await?;
        let client = kube::Client::try_from(admin.clone())?;
        wait_ready(&client, &mut processes).await?;
        let started_in = started.elapsed();

        if let Some(kcm_bin) = kcm_bin {
            let kubeconfig_file = dir.join("admin.kubeconfig");
            std::fs::write(&kubeconfig_file, &admin_yaml)?;
            let kc = p(&kubeconfig_file);
            let kcm_args = vec![
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free()?),
                format!("--cert-dir={}", dir.join("kcm-certs").display()),
                "--controllers=garbage-collector-controller,namespace-controller,serviceaccount-token-controller,serviceaccount-controller,clusterrole-aggregation-controller,deployment-controller".into(),
                format!("--service-account-private-key-file={}", p(&pki.sa_key_file)),
                format!("--root-ca-file={}", p(&pki.ca_file)),
                "--use-service-account-credentials=false".into(),
                "--leader-elect=false".into(),
                "--profiling=false".into(),
            ];
            processes.push(Process::spawn(
                "kube-controller-manager",
                &kcm_bin,
                &kcm_args,
                &dir,
                None,
            )?);
        }

        let proxy = Proxy::start(admin)?;
        Ok(ControlPlane {
            dir,
            _tmp: tmp,
            url,
            etcd_url,
            pki,
            processes: Mutex::new(processes),
            proxy,
            started_in,
        })
    }

    /// `https://127.0.0.1:PORT` of kube-apiserver.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `http://127.0.0.1:PORT` of etcd (its client port also serves `/metrics`).
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// `http://127.0.0.1:PORT` of the fault-injecting proxy.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy.addr)
    }

    /// The throwaway CA (PEM) that signed the serving and client certificates.
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// The directory holding the PKI, etcd's data and each process's log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kubeconfig for the admin user (group `system:masters`), straight to kube-apiserver.
    pub fn kubeconfig_yaml(&self, namespace: &str) -> String {
        kubeconfig(
            &self.url,
            &self.pki.ca_pem,
            &User::Cert(&self.pki.admin_cert_pem, &self.pki.admin_key_pem),
            namespace,
        )
    }

    /// Kubeconfig that authenticates with a bearer token (a ServiceAccount's).
    pub fn token_kubeconfig_yaml(&self, token: &str, namespace: &str) -> String {
        kubeconfig(&self.url, &self.pki.ca_pem, &User::Token(token), namespace)
    }

    /// Kubeconfig through the fault-injecting proxy (plain HTTP, admin rights).
    pub fn proxy_kubeconfig_yaml(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster:\n    server: {}\ncontexts:\n- name: proxy\n  context:\n    cluster: proxy\n    user: proxy\n    namespace: {namespace}\ncurrent-context: proxy\nusers:\n- name: proxy\n  user: {{}}\n",
            self.proxy_url()
        )
    }

    /// An admin client straight to kube-apiserver, default namespace `default`.
    /// Make one per test: a client belongs to the runtime that made it.
    pub async fn client(&self) -> kube::Client {
        self.client_in("default").await
    }

    /// An admin client whose default namespace is `namespace`.
    pub async fn client_in(&self, namespace: &str) -> kube::Client {
        self.client_from(&self.kubeconfig_yaml(namespace)).await
    }

    /// A client for any kubeconfig this control plane wrote.
    pub async fn client_from(&self, kubeconfig_yaml: &str) -> kube::Client {
        let config = client_config(kubeconfig_yaml)
            .await
            .unwrap_or_else(|e| panic!("kubeconfig for the control plane: {e}"));
        kube::Client::try_from(config).unwrap_or_else(|e| panic!("client: {e}"))
    }

    /// A client through the fault-injecting proxy, default namespace `namespace`.
    pub fn proxy_client(&self, namespace: &str) -> kube::Client {
        let url = self
            .proxy_url()
            .parse()
            .unwrap_or_else(|e| panic!("proxy url: {e}"));
        let mut kc = kube::Config::new(url);
        kc.default_namespace = namespace.to_string();
        kc.read_timeout = Some(Duration::from_secs(300));
        kube::Client::try_from(kc).unwrap_or_else(|e| panic!("proxy client: {e}"))
    }

    /// Faults and the request log of the proxy.
    pub fn faults(&self) -> ProxyFaults {
        self.proxy.faults.clone()
    }

    /// Creates a namespace `<prefix>-<random>` and returns its name.
    pub async fn create_namespace(&self, prefix: &str) -> String {
        use k8s_openapi::api::core::v1::Namespace;
        let name = format!(
            "{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let api: kube::Api<Namespace> = kube::Api::all(self.client().await);
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&Default::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        name
    }

    /// Resident memory of each control-plane process, in bytes.
    pub fn memory(&self) -> Vec<(&'static str, u64)> {
        let procs = match self.processes.lock() {
            Ok(p) => p,
            Err(_) => return Vec::new(),
        };
        procs.iter().map(|p| (p.name, p.rss_bytes())).collect()
    }

    /// Process ids of the control-plane binaries (not their guards), by name,
    /// for CPU and memory figures from /proc.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        let procs = match self.processes.lock() {
            Ok(p) => p,
            Err(_) => return Vec::new(),
        };
        procs
            .iter()
            .flat_map(|p| p.pids().into_iter().map(move |pid| (p.name, pid)))
            .collect()
    }

    /// Stops one process by name (`kube-controller-manager`, ...) for good.
    pub fn stop(&self, name: &str) {
        if let Ok(mut procs) = self.processes.lock() {
            procs.retain(|p| p.name != name);
        }
    }
}

pub(crate) fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

enum User<'a> {
    Cert(&'a str, &'a str),
    Token(&'a str),
}

fn kubeconfig(server: &str, ca_pem: &str, user: &User<'_>, namespace: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let user = match user {
        User::Cert(cert, key) => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(cert),
            b64(key)
        ),
        User::Token(token) => format!("    token: {token}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: {namespace}\ncurrent-context: test\nusers:\n- name: test\n  user:\n{user}",
        b64(ca_pem)
    )
}

async fn client_config(yaml: &str) -> Result<kube::Config, Error> {
    let kc = Kubeconfig::from_yaml(yaml).map_err(|e| Error::Other(e.to_string()))?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Other(e.to_string()))?;
    config.read_timeout = Some(Duration::from_secs(300));
    Ok(config)
}

/// Polls `/readyz` until kube-apiserver answers 200 (etcd up, RBAC
/// bootstrap roles and priority-and-fairness defaults in place).
async fn wait_ready(client: &kube::Client, processes: &mut [Process]) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let req = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| Error::Other(e.to_string()))?;
        if let Ok(body) = client.request_text(req).await
            && body.trim() == "ok"
        {
            return Ok(());
        }
        for p in processes.iter_mut() {
            if p.exited() {
                return Err(Error::Other(format!(
                    "{} exited during start-up; its log ends:\n{}",
                    p.name,
                    p.log_tail(30)
                )));
            }
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = processes
                .iter()
                .map(|p| format!("--- {} ---\n{}", p.name, p.log_tail(20)))
                .collect();
            return Err(Error::Other(format!(
                "kube-apiserver was not ready after 180 s:\n{}",
                logs.join("\n")
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
