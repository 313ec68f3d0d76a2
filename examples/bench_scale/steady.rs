//! The steady-state phase: updates at a fixed rate, propagation measured
//! through the Kubernetes API next to the raw NATS floor and the operator's
//! own histogram.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::json;

use crate::{
    Params,
    nats::Publisher,
    observe::Tracker,
    procs::{Operator, ProcStats},
    report::{ms, percentile},
    server::{ApiPhase, Phase, Server},
    wait_until,
};

pub fn latency_summary(mut v: Vec<Duration>) -> (Duration, Duration, Duration, usize) {
    v.sort();
    let max = v.last().copied().unwrap_or_default();
    (percentile(&v, 0.5), percentile(&v, 0.99), max, v.len())
}
pub struct SteadyResult {
    pub updates: usize,
    pub lat: (Duration, Duration, Duration, usize),
    pub floor: (Duration, Duration, Duration, usize),
    pub api: ApiPhase,
    pub cpu: Duration,
    pub server_cpu: Duration,
    pub wall: Duration,
    pub stats: ProcStats,
    pub undelivered: usize,
    /// The operator's own propagation histogram over the phase (NATS store
    /// -> apply answered): upper bucket bounds of p50 and p99, seconds.
    pub op_side: (f64, f64),
}

/// `slipstream_propagation_seconds_bucket` as (upper bound, cumulative count).
fn propagation_buckets(metrics: &str) -> Vec<(f64, f64)> {
    let prefix = "slipstream_propagation_seconds_bucket{le=\"";
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The bucket bound holding quantile `q` of the observations between two
/// scrapes (NaN when none were made).
fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let old = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, n - old)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, n)| *n);
    if total <= 0.0 {
        return f64::NAN;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map_or(f64::NAN, |(le, _)| *le)
}

impl SteadyResult {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "updates": self.updates, "p50_ms": ms(self.lat.0), "p99_ms": ms(self.lat.1),
            "max_ms": ms(self.lat.2), "observed": self.lat.3, "undelivered": self.undelivered,
            "floor_p50_ms": ms(self.floor.0), "floor_p99_ms": ms(self.floor.1),
            "floor_max_ms": ms(self.floor.2), "floor_observed": self.floor.3,
            "operator_cpu_s": self.cpu.as_secs_f64(), "server_cpu_s": self.server_cpu.as_secs_f64(),
            "rss_mib": self.stats.rss_mib, "hwm_mib": self.stats.hwm_mib,
            "api": self.api.json(self.wall),
            "operator_side_p50_le_s": self.op_side.0, "operator_side_p99_le_s": self.op_side.1,
        })
    }
}

/// What a steady phase runs on.
pub struct SteadyRig<'a> {
    pub publisher: &'a Publisher,
    pub tracker: &'a Tracker,
    pub server: &'a Server,
    pub op: &'a Operator,
    pub p: &'a Params,
    /// Filled by the raw floor watches.
    pub floor_lat: Arc<Mutex<Vec<Duration>>>,
}

/// `rate` updates per second for `secs` (default: the steady duration).
pub async fn run_steady(rig: &SteadyRig<'_>, rate: f64, secs: Option<Duration>) -> SteadyResult {
    let SteadyRig {
        publisher,
        tracker,
        server,
        op,
        p,
        floor_lat,
    } = rig;
    tracker.take_latencies();
    floor_lat.lock().unwrap().clear();
    let hist0 = propagation_buckets(&op.scrape().await);
    let phase = Phase::start(server).await;
    let cpu0 = op.stats().cpu;
    let server_cpu0 = server.cpu();
    let t0 = Instant::now();
    let secs = secs.map(|s| s.as_secs_f64()).unwrap_or(p.steady_secs);
    let updates = publisher
        .steady(
            rate,
            secs,
            p.bindings,
            p.keys,
            t0.elapsed().as_nanos() as u64,
        )
        .await;
    let drained = wait_until("steady drain", Duration::from_secs(30), || {
        let pending = tracker.pending();
        (pending == 0, format!("{pending} updates not yet visible"))
    })
    .await;
    let undelivered = if drained.is_some() {
        0
    } else {
        tracker.pending()
    };
    let wall = t0.elapsed();
    let stats = op.stats();
    let floor = std::mem::take(&mut *floor_lat.lock().unwrap());
    let hist1 = propagation_buckets(&op.scrape().await);
    let op_side = (
        bucket_quantile(&hist0, &hist1, 0.5),
        bucket_quantile(&hist0, &hist1, 0.99),
    );
    SteadyResult {
        op_side,
        updates,
        lat: latency_summary(tracker.take_latencies()),
        floor: latency_summary(floor),
        api: phase.end(server).await,
        cpu: stats.cpu - cpu0,
        server_cpu: server.cpu() - server_cpu0,
        wall,
        stats,
        undelivered,
    }
}
