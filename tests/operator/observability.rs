//! What a platform team scrapes and ships from the real binary: `/metrics`
//! in both text formats, per-binding series that go with the binding, the
//! process and API client series; JSON log lines.

use std::time::Duration;

use crate::{
    binary::{Proc, operator_command},
    common::{
        free_port,
        http::{Answer, http_get, metric_f64},
    },
    *,
};

/// What Prometheus 2.x/3.x sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

async fn scrape(port: u16, accept: Option<&str>) -> Answer {
    eventually("a /metrics answer", || http_get(port, "/metrics", accept)).await
}

/// Every sample line of a classic exposition sits under the `# TYPE` of its
/// family (classic parsers type it `untyped` otherwise), and counters are
/// named `*_total`.
fn assert_classic_families(text: &str) {
    let mut family: Option<(String, String)> = None;
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter family {name}");
            }
            family = Some((name.to_owned(), kind.to_owned()));
        } else if !line.starts_with('#') {
            let (name, kind) = family
                .as_ref()
                .unwrap_or_else(|| panic!("{line} before any TYPE"));
            let sample = line.split(['{', ' ']).next().unwrap();
            let ok = match kind.as_str() {
                "histogram" => [
                    format!("{name}_bucket"),
                    format!("{name}_sum"),
                    format!("{name}_count"),
                ]
                .contains(&sample.to_owned()),
                _ => sample == name,
            };
            assert!(ok, "sample {sample} under family {name} ({kind})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_accept_and_forget_a_deleted_binding() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "web.a", "1").await;
    let (_dir, kubeconfig) = env.kubeconfig_file();
    let port = free_port();
    let mut cmd = operator_command(&env, &kubeconfig, port);
    cmd.arg("--leader-election=false")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _operator = Proc(cmd.spawn().unwrap());
    env.create_binding("web", "bucket: app\nprefixes: [web.]")
        .await;
    wait_data(&env, "web", &map(&[("web.a", "1")])).await;
    let ns = env.ns().to_owned();
    let ready = format!("slipstream_binding_ready{{namespace=\"{ns}\",binding=\"web\"}} 1");
    let om = eventually("binding_ready 1", || async {
        let a = http_get(port, "/metrics", Some(PROMETHEUS_ACCEPT)).await?;
        a.body.contains(&ready).then_some(a)
    })
    .await;

    // OpenMetrics, as asked
    assert_eq!(
        om.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.body.ends_with("# EOF\n"));
    assert!(
        om.body
            .contains("# TYPE slipstream_configmap_writes counter\n"),
        "{}",
        om.body
    );
    let cond = format!(
        "slipstream_binding_condition{{namespace=\"{ns}\",binding=\"web\",type=\"Stalled\"}} 0"
    );
    assert!(om.body.contains(&cond), "{}", om.body);
    let build = format!(
        "slipstream_build_info{{version=\"{}\",",
        env!("CARGO_PKG_VERSION")
    );
    assert!(om.body.contains(&build), "{}", om.body);
    assert!(om.body.contains("\"} 1\n"), "{}", om.body);
    // the API client counted its requests: the binding list, the ConfigMap apply
    let lists = metric_f64(
        &om.body,
        "slipstream_kube_api_requests_total{verb=\"list\",code=\"200\"}",
    );
    assert!(lists.is_some_and(|n| n >= 1.0), "{}", om.body);
    let patches = metric_f64(
        &om.body,
        "slipstream_kube_api_requests_total{verb=\"patch\",code=\"200\"}",
    );
    assert!(patches.is_some_and(|n| n >= 1.0), "{}", om.body);
    let timed = metric_f64(
        &om.body,
        "slipstream_kube_api_request_duration_seconds_count{verb=\"patch\"}",
    );
    assert_eq!(timed, patches, "every patch is timed");
    #[cfg(target_os = "linux")]
    {
        let rss = metric_f64(&om.body, "process_resident_memory_bytes ").unwrap();
        assert!((1e6..4e9).contains(&rss), "rss {rss}");
        let fds = metric_f64(&om.body, "process_open_fds ").unwrap();
        assert!((3.0..10_000.0).contains(&fds), "fds {fds}");
        let cpu = metric_f64(&om.body, "process_cpu_seconds_total ").unwrap();
        assert!((0.0..600.0).contains(&cpu), "cpu {cpu}");
        let max = metric_f64(&om.body, "process_max_fds ").unwrap();
        assert!(max >= fds, "max fds {max}");
    }

    // classic text, the default
    for accept in [None, Some("text/plain"), Some("*/*")] {
        let classic = scrape(port, accept).await;
        assert_eq!(
            classic.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8"),
            "Accept {accept:?}"
        );
        assert!(!classic.body.contains("# EOF"));
        assert!(!classic.body.contains("# UNIT"));
        assert!(
            classic
                .body
                .contains("# TYPE slipstream_configmap_writes_total counter\n"),
            "{}",
            classic.body
        );
        assert!(classic.body.contains(&ready));
        assert_classic_families(&classic.body);
    }

    // the binding goes: so do its series
    env.delete_binding("web").await;
    let label = "binding=\"web\"".to_owned();
    eventually("the deleted binding's series gone", || async {
        let a = http_get(port, "/metrics", None).await?;
        (!a.body.contains(&label)).then_some(())
    })
    .await;
    let after = scrape(port, None).await;
    assert!(
        after.body.contains("slipstream_build_info"),
        "{}",
        after.body
    );
}

/// Checks one JSON log line against the rules: an object, flat, one
/// `message`, no Rust `Option`s, `namespace` and `binding` together.
fn check_line(raw: &str) -> serde_json::Map<String, serde_json::Value> {
    let value: serde_json::Value =
        serde_json::from_str(raw).unwrap_or_else(|e| panic!("not JSON ({e}): {raw}"));
    let line = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {raw}"))
        .clone();
    for key in ["timestamp", "level", "target", "message"] {
        assert!(
            line.get(key).is_some_and(|v| v.is_string()),
            "no {key}: {raw}"
        );
    }
    assert_eq!(raw.matches("\"message\":").count(), 1, "one message: {raw}");
    for (key, value) in &line {
        assert!(
            !value.is_object() && !value.is_array(),
            "{key} nested: {raw}"
        );
        if let Some(s) = value.as_str() {
            assert!(!s.starts_with("Some("), "{key} is a Rust Option: {raw}");
        }
    }
    for key in ["fields", "span", "spans"] {
        assert!(!line.contains_key(key), "{key}: {raw}");
    }
    assert_eq!(
        line.contains_key("binding"),
        line.contains_key("namespace"),
        "binding and namespace go together: {raw}"
    );
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_flat_name_the_binding_and_sigterm_is_not_a_warning() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "web.a", "1").await;
    let (dir, kubeconfig) = env.kubeconfig_file();
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut cmd = operator_command(&env, &kubeconfig, free_port());
    // leader election on: its shutdown gives the lease up, at INFO
    cmd.args([
        "--leader-election=true",
        "--log-format",
        "json",
        "--log-level",
        "info,slipstream=debug",
    ])
    .env("RUST_LOG", "error")
    .stdout(std::fs::File::create(&out_path).unwrap())
    .stderr(std::fs::File::create(&err_path).unwrap());
    let mut operator = Proc(cmd.spawn().unwrap());
    env.create_binding("web", "bucket: app\nprefixes: [web.]")
        .await;
    wait_data(&env, "web", &map(&[("web.a", "1")])).await;
    put(&kv, "web.a", "2").await;
    wait_data(&env, "web", &map(&[("web.a", "2")])).await;
    // let the status write after the sync land in the log too
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = operator.0.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let exited = tokio::task::spawn_blocking(move || {
        let status = operator.0.wait().unwrap();
        std::mem::forget(operator);
        status
    })
    .await
    .unwrap();
    assert!(exited.success(), "SIGTERM is a clean exit: {exited}");

    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    let lines: Vec<_> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| !l.trim().is_empty())
        .map(|raw| (raw, check_line(raw)))
        .collect();
    let ns = env.ns();
    let about_web: Vec<_> = lines
        .iter()
        .filter(|(_, l)| l.get("binding").and_then(|b| b.as_str()) == Some("web"))
        .collect();
    assert!(
        !about_web.is_empty(),
        "no line names the binding:\n{stdout}"
    );
    for (raw, line) in &about_web {
        assert_eq!(line["namespace"], ns, "{raw}");
    }
    // the worker's own lines carry the binding through its span
    let worker: Vec<_> = lines
        .iter()
        .filter(|(_, l)| {
            l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("slipstream::controller::worker"))
        })
        .collect();
    assert!(!worker.is_empty(), "no worker line at debug:\n{stdout}");
    for (raw, line) in &worker {
        assert_eq!(
            line.get("binding").and_then(|b| b.as_str()),
            Some("web"),
            "{raw}"
        );
        assert_eq!(line["namespace"], ns, "{raw}");
    }
    // a plain SIGTERM: logged at INFO, nothing above INFO in the whole run
    let signal = lines
        .iter()
        .find(|(_, l)| l["message"] == "shutdown signal received")
        .unwrap_or_else(|| panic!("no shutdown line:\n{stdout}"));
    assert_eq!(signal.1["level"], "INFO");
    for (raw, line) in &lines {
        assert!(
            line["level"] == "INFO" || line["level"] == "DEBUG",
            "a clean run logs nothing above INFO: {raw}"
        );
    }
}
