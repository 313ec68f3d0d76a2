//! The operator as a child process (`slipstream run`), what /proc says
//! about a process and about the emulator threads of this process, and a
//! plain HTTP GET for /metrics endpoints.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// CPU time and memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    pub cpu: Duration,
    /// Peak resident set (VmHWM), MiB.
    pub hwm_mib: f64,
    pub rss_mib: f64,
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of a `/proc/.../stat` file.
fn stat_cpu(path: &Path) -> Option<Duration> {
    let text = std::fs::read_to_string(path).ok()?;
    // fields after "(comm) ": state is field 3, utime 14, stime 15
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(Duration::from_secs_f64(ticks / clock_ticks()))
}

fn status_kib(text: &str, field: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn proc_stats(pid: u32) -> Option<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcStats {
        cpu: stat_cpu(Path::new(&format!("/proc/{pid}/stat")))?,
        hwm_mib: status_kib(&status, "VmHWM:")? / 1024.0,
        rss_mib: status_kib(&status, "VmRSS:")? / 1024.0,
    })
}

/// CPU time of this process's threads named `apiserver*` (the emulator).
pub fn emulator_cpu() -> Duration {
    let mut total = Duration::ZERO;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return total;
    };
    for task in dir.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("apiserver")
            && let Some(cpu) = stat_cpu(&task.path().join("stat"))
        {
            total += cpu;
        }
    }
    total
}

pub use crate::common::free_port;

/// A running `slipstream run`.
pub struct Operator {
    child: Child,
    pub pid: u32,
    pub metrics: SocketAddr,
}

impl Operator {
    pub fn spawn(
        bin: &Path,
        nats_url: &str,
        kubeconfig: &Path,
        coalesce_ms: u64,
        log: &Path,
    ) -> Operator {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(bin)
            .arg("run")
            .arg("--leader-election=false")
            .arg("--nats")
            .arg(nats_url)
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .arg("--coalesce")
            .arg(format!("{coalesce_ms}ms"))
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_OPERATOR_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Operator {
            pid: child.id(),
            child,
            metrics,
        }
    }

    pub fn stats(&self) -> ProcStats {
        proc_stats(self.pid).unwrap_or_default()
    }

    /// SIGKILL, like `kill -9`: nothing is flushed.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The operator's /metrics text ("" while it is not up).
    pub async fn scrape(&self) -> String {
        http_get(&self.metrics.to_string(), "/metrics").await
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sum of a metric's samples whose label set contains `label` (e.g.
/// `source="catchup"`; "" = all).
pub fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| label.is_empty() || l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The body of `GET http://<addr><path>` ("" when it does not answer).
pub async fn http_get(addr: &str, path: &str) -> String {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await
    else {
        return String::new();
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut body)).await;
    let text = String::from_utf8_lossy(&body).to_string();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}
