//! The real `slipstream` binary against the API server and NATS: SIGKILL
//! mid-burst, restart, and check the three promises of a crash.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use slipstream::kv::{
    KvReader,
    nats::{BucketConfig, NatsBucket},
};

use crate::{
    common::{
        free_port,
        http::{http_get, metric_f64},
    },
    *,
};

/// The operator process; SIGKILLed and reaped on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn sigkill(&mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.sigkill();
    }
}

fn spawn_operator(env: &Env, kubeconfig: &std::path::Path, metrics_port: u16) -> Proc {
    let mut cmd = operator_command(env, kubeconfig, metrics_port);
    cmd.arg("--leader-election=false")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Proc(cmd.spawn().unwrap())
}

/// `slipstream run` against the scenario: coalesce 20 ms, watching
/// [`Env::ns`], serving metrics on `metrics_port` (add
/// `--leader-election=false` for a single instance).
pub fn operator_command(env: &Env, kubeconfig: &std::path::Path, metrics_port: u16) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_slipstream"));
    cmd.args([
        "run",
        "--nats",
        &env.nats.url(),
        "--coalesce",
        "20ms",
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
        "--namespace",
        env.ns(),
    ])
    .env("KUBECONFIG", kubeconfig)
    .env_remove("SLIPSTREAM_LOG_LEVEL")
    .env_remove("SLIPSTREAM_LOG_FORMAT");
    cmd
}

async fn scrape(port: u16) -> Option<String> {
    http_get(port, "/metrics", None).await.map(|a| a.body)
}

/// A counter or gauge of the exposition, as a whole number.
fn metric(text: &str, line_prefix: &str) -> Option<u64> {
    metric_f64(text, line_prefix).map(|v| v as u64)
}

async fn kv_truth(kv: &NatsBucket) -> BTreeMap<String, String> {
    kv.scan("burst.")
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.key, String::from_utf8(e.value.to_vec()).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_binary_restarts_from_its_cursor_and_never_goes_backward() {
    let env = Env::start().await;
    let mut config = BucketConfig::new("app");
    config.history = 64;
    let kv = env.kv.create_or_open(&config).await.unwrap();
    for i in 0..50 {
        put(&kv, &format!("burst.k{i:02}"), "0").await;
    }
    let (_dir, kubeconfig) = env.kubeconfig_file();
    let port = free_port();
    let mut child = spawn_operator(&env, &kubeconfig, port);
    env.create_binding("burst", "bucket: app\nprefixes: [burst.]")
        .await;
    eventually("initial sync", || async {
        env.cm("burst").await.filter(|cm| data(cm).len() == 50)
    })
    .await;

    // record every cursor the ConfigMap ever shows
    let cursors = Arc::new(Mutex::new(Vec::new()));
    {
        let api = env.configmaps();
        let out = cursors.clone();
        let wc = watcher::Config::default().fields("metadata.name=burst");
        tokio::spawn(async move {
            // backoff: once the emulator is gone, errors must not spin the runtime
            let mut s = watcher(api, wc).default_backoff().boxed();
            while let Some(ev) = s.next().await {
                if let Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) = ev
                    && let Some(c) = cursor(&cm)
                {
                    out.lock().unwrap().push(c);
                }
            }
        });
    }

    // burst; SIGKILL the operator in the middle of it
    for i in 0..1500u32 {
        put(&kv, &format!("burst.k{:02}", i % 50), &i.to_string()).await;
        if i == 600 {
            child.sigkill();
        }
    }
    let killed_at = cursor(&env.cm("burst").await.unwrap()).unwrap();
    let head = kv
        .info()
        .await
        .unwrap()
        .last_revision
        .unwrap()
        .as_u64()
        .unwrap();
    assert!(killed_at < head, "the kill left work to do");

    let mut child = spawn_operator(&env, &kubeconfig, port);
    let truth = kv_truth(&kv).await;
    let cm = wait_data(&env, "burst", &truth).await;
    assert_eq!(cursor(&cm), Some(head));
    let delivered = eventually("metrics of the restarted binary", || async {
        let text = scrape(port).await?;
        metric(
            &text,
            "slipstream_kv_updates_delivered_total{bucket=\"app\",source=\"catchup\"}",
        )
    })
    .await;
    child.sigkill();
    assert_eq!(
        delivered,
        head - killed_at,
        "the restart delivered exactly the updates after the recorded cursor"
    );
    assert!(delivered < 1500 + 50);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = cursors.lock().unwrap().clone();
    assert!(seen.len() >= 2);
    for w in seen.windows(2) {
        assert!(w[0] <= w[1], "cursor went backward: {} -> {}", w[0], w[1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_started_with_default_flags_elect_one_writer() {
    let env = Env::start().await;
    let (_dir, kubeconfig) = env.kubeconfig_file();
    let ports = [free_port(), free_port()];
    let _operators: Vec<Proc> = ports
        .iter()
        .map(|&port| {
            let mut cmd = operator_command(&env, &kubeconfig, port);
            cmd.env("RUST_LOG", "warn")
                .env_remove("SLIPSTREAM_LEADER_ELECTION")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            Proc(cmd.spawn().unwrap())
        })
        .collect();
    let roles = eventually("one leader and one standby", || async {
        let mut roles = Vec::new();
        for port in ports {
            roles.push(metric(&scrape(port).await?, "slipstream_is_leader ")?);
        }
        roles.sort_unstable();
        (roles == [0, 1]).then_some(roles)
    })
    .await;
    assert_eq!(roles, [0, 1]);
}
