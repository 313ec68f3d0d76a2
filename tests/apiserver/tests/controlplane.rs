//! The real control plane harness itself: it starts, serves as admin and
//! through the fault proxy, and leaves no process behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use apiserver::{
    FaultRule,
    real::{ControlPlane, KUBERNETES_VERSION, Options},
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};

fn pids_of(dir: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &dir.display().to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn real_control_plane_starts_serves_through_the_proxy_and_stops_without_orphans() {
    let cp = ControlPlane::start(Options::default()).await.unwrap();
    println!(
        "control plane ready in {:.1} s",
        cp.started_in.as_secs_f64()
    );

    let admin = cp.client().await;
    let version = admin.apiserver_version().await.unwrap();
    assert_eq!(version.git_version, KUBERNETES_VERSION);

    let ns = cp.create_namespace("harness").await;
    let cms: Api<ConfigMap> = Api::namespaced(cp.proxy_client(&ns), &ns);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("a".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    cms.create(&PostParams::default(), &cm).await.unwrap();
    // kube-rs retries 429, 503 and 504 by itself; a 500 reaches the caller.
    cp.faults().add(
        FaultRule::new(500, 1)
            .verb("get")
            .resource("configmaps")
            .namespace(&ns),
    );
    let err = cms.get("a").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 500),
        "the proxy answers the injected 500: {err}"
    );
    assert_eq!(
        cms.get("a").await.unwrap().metadata.name.as_deref(),
        Some("a")
    );
    let log = cp.faults().requests();
    assert!(
        log.iter()
            .any(|r| r.verb == "create" && r.resource == "configmaps" && r.status == 201),
        "the proxy logs forwarded requests"
    );

    let memory: Vec<String> = cp
        .memory()
        .iter()
        .map(|(name, bytes)| format!("{name} {} MiB", bytes >> 20))
        .collect();
    println!("control plane RSS: {}", memory.join(", "));

    let dir = cp.dir().to_path_buf();
    assert!(
        pids_of(&dir).len() >= 3,
        "etcd, kube-apiserver and kube-controller-manager run"
    );
    drop(cp);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pids_of(&dir),
        Vec::<String>::new(),
        "no process outlives the control plane"
    );
    assert!(!dir.exists(), "its directory is removed");
}
