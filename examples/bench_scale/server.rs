//! The Kubernetes API server under the benchmark: the emulator in this
//! process, or a real kube-apiserver with etcd (fsync on, like a user's) and
//! kube-controller-manager of its own. Either way the operator's requests are
//! recorded (the emulator's log, or the fault proxy the operator talks
//! through), and the server's own CPU and write counts are measured.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use apiserver::{
    ApiServer, RequestRecord,
    real::{ControlPlane, Options},
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{
    cpu_share, observe,
    procs::{emulator_cpu, http_get, metric_sum, proc_stats},
    report::{ms, percentile},
};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// kube-apiserver + etcd + kube-controller-manager (`make tools`)
    Real,
    /// the in-process emulator (tests/apiserver)
    Emulator,
}

impl Which {
    /// Real when the control plane is built, else the emulator.
    pub fn default_for_machine() -> Which {
        let built = std::env::var_os("KUBE_APISERVER_BIN").is_some()
            || Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(".tools/bin/kube-apiserver")
                .exists();
        if built { Which::Real } else { Which::Emulator }
    }
}

pub enum Server {
    Emulator(ApiServer),
    Real(Box<ControlPlane>),
}

/// The operator sets this user agent; the driver's own requests are not counted.
const OPERATOR_AGENT: &str = "slipstream";

impl Server {
    pub async fn start(which: Which, write_latency: Duration) -> Server {
        match which {
            Which::Emulator => Server::Emulator(
                ApiServer::start_with(apiserver::Config {
                    write_latency,
                    history_window: 500_000,
                    log_capacity: 5_000_000,
                    ..apiserver::Config::default()
                })
                .await
                .unwrap(),
            ),
            Which::Real => {
                let cp = ControlPlane::start(Options {
                    etcd_fsync: true,
                    ..Options::default()
                })
                .await
                .unwrap_or_else(|e| panic!("real control plane: {e} (run `make tools`)"));
                eprintln!(
                    "bench: kube-apiserver {} ready in {:.1} s",
                    apiserver::real::KUBERNETES_VERSION,
                    cp.started_in.as_secs_f64()
                );
                Server::Real(Box::new(cp))
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Server::Emulator(_) => "emulator",
            Server::Real(_) => "kube-apiserver",
        }
    }

    /// The driver's client: straight to the server, not recorded.
    pub async fn client(&self) -> kube::Client {
        match self {
            Server::Emulator(api) => api.client(),
            Server::Real(cp) => cp.client_in("default").await,
        }
    }

    /// The operator's kubeconfig (on the real server: through the recording proxy).
    pub fn write_operator_kubeconfig(&self, path: &Path) {
        match self {
            Server::Emulator(api) => api.write_kubeconfig(path).unwrap(),
            Server::Real(cp) => std::fs::write(path, cp.proxy_kubeconfig_yaml("default")).unwrap(),
        }
    }

    /// The operator's requests since the last call.
    fn take_requests(&self) -> Vec<RequestRecord> {
        let reqs = match self {
            Server::Emulator(api) => {
                let r = api.requests();
                api.clear_requests();
                r
            }
            Server::Real(cp) => {
                let f = cp.faults();
                let r = f.requests();
                f.clear_requests();
                r
            }
        };
        reqs.into_iter()
            .filter(|r| r.user_agent.starts_with(OPERATOR_AGENT))
            .collect()
    }

    /// CPU time of the server: the emulator's threads, or every control-plane process.
    pub fn cpu(&self) -> Duration {
        match self {
            Server::Emulator(_) => emulator_cpu(),
            Server::Real(cp) => cp
                .pids()
                .into_iter()
                .filter_map(|(_, pid)| proc_stats(pid))
                .map(|s| s.cpu)
                .sum(),
        }
    }

    /// Per-process CPU and RSS of the real control plane ("" on the emulator).
    pub fn describe_processes(&self) -> String {
        let Server::Real(cp) = self else {
            return String::new();
        };
        cp.pids()
            .into_iter()
            .filter_map(|(name, pid)| Some((name, proc_stats(pid)?)))
            .map(|(name, s)| {
                format!(
                    "{name} CPU {:.1} s RSS {:.0} MiB",
                    s.cpu.as_secs_f64(),
                    s.rss_mib
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Cumulative counters of the real server (zeros on the emulator).
    pub async fn counters(&self) -> Counters {
        let Server::Real(cp) = self else {
            return Counters::default();
        };
        let etcd = http_get(cp.etcd_url().trim_start_matches("http://"), "/metrics").await;
        let admin = cp.client().await;
        let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
        let api = admin.request_text(req).await.unwrap_or_default();
        Counters {
            etcd_puts: metric_sum(&etcd, "etcd_mvcc_put_total", ""),
            etcd_deletes: metric_sum(&etcd, "etcd_mvcc_delete_total", ""),
            etcd_fsyncs: metric_sum(&etcd, "etcd_disk_wal_fsync_duration_seconds_count", ""),
            apf_rejected: metric_sum(&api, "apiserver_flowcontrol_rejected_requests_total", ""),
        }
    }
}

/// Write and rejection counters of the real server.
#[derive(Default, Debug, Clone, Copy)]
pub struct Counters {
    pub etcd_puts: f64,
    pub etcd_deletes: f64,
    pub etcd_fsyncs: f64,
    /// Requests API priority and fairness rejected (answered 429).
    pub apf_rejected: f64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            etcd_puts: self.etcd_puts - o.etcd_puts,
            etcd_deletes: self.etcd_deletes - o.etcd_deletes,
            etcd_fsyncs: self.etcd_fsyncs - o.etcd_fsyncs,
            apf_rejected: self.apf_rejected - o.apf_rejected,
        }
    }
}

/// What the operator asked of the API server during a phase.
#[derive(Default, Debug)]
pub struct ApiPhase {
    pub requests: usize,
    pub writes: usize,
    pub cm_writes: usize,
    pub cm_creates: usize,
    pub status_writes: usize,
    pub events: usize,
    pub finalizer_patches: usize,
    pub reads: usize,
    pub lists: usize,
    /// Answers 429 (API priority and fairness, or the emulator's faults).
    pub throttled: usize,
    pub write_p50: Duration,
    pub write_p99: Duration,
    /// Sum of request durations.
    pub busy: Duration,
    pub cm_writes_by_name: HashMap<String, usize>,
    /// Server counters over the phase (real server only).
    pub server: Counters,
}

/// A phase of the benchmark: marks the server's counters at the start.
pub struct Phase {
    counters: Counters,
}

impl Phase {
    /// Starts a phase: forgets the requests so far, reads the counters.
    pub async fn start(server: &Server) -> Phase {
        server.take_requests();
        Phase {
            counters: server.counters().await,
        }
    }

    /// What the operator asked of the server since [`Phase::start`].
    pub async fn end(self, server: &Server) -> ApiPhase {
        let reqs = server.take_requests();
        let mut a = ApiPhase {
            requests: reqs.len(),
            server: server.counters().await - self.counters,
            ..ApiPhase::default()
        };
        let mut write_d = Vec::new();
        for r in &reqs {
            a.busy += r.duration;
            if r.status == 429 {
                a.throttled += 1;
            }
            if r.is_write() {
                a.writes += 1;
                write_d.push(r.duration);
            } else if r.verb == "get" {
                a.reads += 1;
            } else if r.verb == "list" {
                a.lists += 1;
            }
            match (r.verb.as_str(), r.resource.as_str(), r.subresource.as_str()) {
                ("patch", "configmaps", _) => {
                    a.cm_writes += 1;
                    *a.cm_writes_by_name.entry(r.name.clone()).or_default() += 1;
                }
                ("create", "configmaps", _) => a.cm_creates += 1,
                ("patch", "configbindings", "status") => a.status_writes += 1,
                ("patch", "configbindings", "") => a.finalizer_patches += 1,
                ("create", "events", _) => a.events += 1,
                _ => {}
            }
        }
        write_d.sort();
        a.write_p50 = percentile(&write_d, 0.5);
        a.write_p99 = percentile(&write_d, 0.99);
        a
    }
}

impl ApiPhase {
    /// Writes per binding, for phases where each binding was written once.
    pub fn per(&self, n: usize) -> f64 {
        self.writes as f64 / n.max(1) as f64
    }

    pub fn json(&self, wall: Duration) -> serde_json::Value {
        json!({
            "requests": self.requests, "writes": self.writes, "configmap_patches": self.cm_writes,
            "configmap_creates": self.cm_creates, "status_patches": self.status_writes,
            "events": self.events, "binding_patches": self.finalizer_patches, "gets": self.reads,
            "lists": self.lists, "throttled_429": self.throttled,
            "write_p50_ms": ms(self.write_p50), "write_p99_ms": ms(self.write_p99),
            "server_busy_s": self.busy.as_secs_f64(), "wall_s": wall.as_secs_f64(),
            "etcd_puts": self.server.etcd_puts, "etcd_deletes": self.server.etcd_deletes,
            "etcd_fsyncs": self.server.etcd_fsyncs, "apf_rejected": self.server.apf_rejected,
        })
    }

    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} requests: {} writes (cm create {}, cm patch {}, status {}, binding {}, events {}), {} gets, {} lists, {} answered 429; write p50 {:.1} ms p99 {:.1} ms",
            self.requests,
            self.writes,
            self.cm_creates,
            self.cm_writes,
            self.status_writes,
            self.finalizer_patches,
            self.events,
            self.reads,
            self.lists,
            self.throttled,
            ms(self.write_p50),
            ms(self.write_p99)
        );
        if self.server.etcd_puts > 0.0 {
            s += &format!(
                "; etcd {:.0} puts, {:.0} deletes, {:.0} fsyncs; APF rejected {:.0}",
                self.server.etcd_puts,
                self.server.etcd_deletes,
                self.server.etcd_fsyncs,
                self.server.apf_rejected
            );
        }
        s
    }
}

/// What the server takes without the operator: server-side applies of
/// `keys`-key ConfigMaps the operator does not own, 32 in flight for `secs`.
pub struct Capacity {
    pub writes_per_s: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub server_cpu_pct: f64,
    pub server: Counters,
}

pub async fn capacity(
    server: &Server,
    keys: usize,
    value_bytes: usize,
    secs: Duration,
) -> Capacity {
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let content = |round: usize| -> std::collections::BTreeMap<String, String> {
        (0..keys)
            .map(|k| {
                let v = observe::value(round as u64, value_bytes);
                (observe::cm_key(k), String::from_utf8_lossy(&v).into_owned())
            })
            .collect()
    };
    let workers = 32;
    let c0 = server.counters().await;
    let cpu0 = server.cpu();
    let t0 = Instant::now();
    let deadline = t0 + secs;
    let results: Vec<Vec<Duration>> = futures::stream::iter(0..workers)
        .map(|w| {
            let cms = cms.clone();
            let name = format!("probe-{w}");
            let content = &content;
            async move {
                let mut lat = Vec::new();
                let mut round = 0;
                while Instant::now() < deadline {
                    let cm = ConfigMap {
                        metadata: kube::api::ObjectMeta {
                            name: Some(name.clone()),
                            ..Default::default()
                        },
                        data: Some(content(round)),
                        ..Default::default()
                    };
                    let t = Instant::now();
                    let pp = PatchParams::apply("bench-probe").force();
                    if cms.patch(&name, &pp, &Patch::Apply(&cm)).await.is_ok() {
                        lat.push(t.elapsed());
                    }
                    round += 1;
                }
                let _ = cms.delete(&name, &DeleteParams::default()).await;
                lat
            }
        })
        .buffer_unordered(workers)
        .collect()
        .await;
    let wall = t0.elapsed();
    let server_cpu_pct = cpu_share(server.cpu() - cpu0, wall);
    let counters = server.counters().await - c0;
    let mut all: Vec<Duration> = results.into_iter().flatten().collect();
    all.sort();
    Capacity {
        writes_per_s: all.len() as f64 / wall.as_secs_f64(),
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        server_cpu_pct,
        server: counters,
    }
}
