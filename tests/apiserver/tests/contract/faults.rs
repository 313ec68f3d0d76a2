//! Test controls: injected failures come back as the `Status` kube-rs maps to
//! `kube::Error::Api`; pause, write latency; the request log and counters.

use std::time::{Duration, Instant};

use apiserver::{Config, FaultRule};
use kube::api::{ListParams, Patch, PatchParams};

use super::*;

#[tokio::test]
async fn injected_faults_fail_the_next_n_matching_requests_with_the_given_status() {
    let (api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();

    api.faults().fail_next(2, 500);
    for _ in 0..2 {
        let s = api_err(cms.get("a").await);
        assert_eq!((s.code, s.reason.as_str()), (500, "InternalError"));
    }
    cms.get("a").await.unwrap();

    // kube's client retries 429 (Retry-After: 1) on its own: the write lands after one refusal.
    api.faults()
        .add(FaultRule::new(429, 1).verb("patch").resource("configmaps"));
    cms.get("a").await.unwrap();
    cms.patch(
        "a",
        &PatchParams::apply("m"),
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"k": "v"}})),
    )
    .await
    .unwrap();
    let patches: Vec<u16> = api
        .requests()
        .iter()
        .filter(|r| r.verb == "patch")
        .map(|r| r.status)
        .collect();
    assert_eq!(patches, [429, 200]);

    api.faults()
        .add(FaultRule::new(409, 1).verb("update").name("a"));
    let cur = cms.get("a").await.unwrap();
    let s = api_err(cms.replace("a", &PostParams::default(), &cur).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    cms.replace("a", &PostParams::default(), &cur)
        .await
        .unwrap();
    let failed: Vec<u16> = api
        .requests()
        .iter()
        .filter(|r| r.status >= 400)
        .map(|r| r.status)
        .collect();
    assert_eq!(failed, [500, 500, 429, 409]);
}

#[tokio::test]
async fn request_log_and_counters_record_verb_resource_namespace_name_and_field_manager() {
    let (api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": "v"}});
    for _ in 0..2 {
        cms.patch(
            "x",
            &PatchParams::apply("slipstream"),
            &Patch::Apply(body.clone()),
        )
        .await
        .unwrap();
    }
    cms.get("x").await.unwrap();
    cms.list(&ListParams::default().labels("a=b"))
        .await
        .unwrap();
    let log = api.requests();
    let apply = log.iter().find(|r| r.verb == "patch").unwrap();
    assert_eq!(
        (
            apply.method.as_str(),
            apply.resource.as_str(),
            apply.namespace.as_str(),
            apply.name.as_str(),
            apply.field_manager.as_str(),
            apply.patch_type.as_str(),
            apply.status
        ),
        (
            "PATCH",
            "configmaps",
            api.namespace(),
            "x",
            "slipstream",
            "apply",
            201
        )
    );
    let c = api.counters();
    assert_eq!(c.verb("patch"), 2);
    assert_eq!(c.verb("get"), 1);
    assert_eq!(c.verb("list"), 1);
    assert_eq!(c.manager("slipstream"), 2);
    assert_eq!(c.by_resource["configmaps"], 4);
    assert_eq!(c.writes, 2, "counts requests, not storage writes");
    assert_eq!(
        cms.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test]
async fn kubeconfig_points_a_fresh_client_at_the_server_and_the_test_namespace() {
    let (api, _client) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    assert_eq!(cfg.default_namespace, api.namespace());
    let client = Client::try_from(cfg).unwrap();
    let nss: Api<Namespace> = Api::all(client);
    assert!(nss.get(api.namespace()).await.is_ok());
}

mod emulator_only {
    use super::*;

    #[tokio::test]
    async fn paused_server_holds_requests_until_resumed() {
        let (api, client) = start_emulator().await;
        let cms: Api<ConfigMap> = Api::default_namespaced(client);
        api.faults().pause();
        let pending = tokio::spawn(async move {
            cms.list(&ListParams::default())
                .await
                .map(|l| l.items.len())
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!pending.is_finished(), "request held while paused");
        api.faults().resume();
        assert_eq!(pending.await.unwrap().unwrap(), 0);
    }

    #[tokio::test]
    async fn write_latency_delays_writes_but_not_reads() {
        let api = ApiServer::start_with(Config {
            write_latency: Duration::from_millis(150),
            ..Default::default()
        })
        .await
        .unwrap();
        let cms: Api<ConfigMap> = Api::default_namespaced(api.client());
        let t = Instant::now();
        cms.create(&PostParams::default(), &cm("a", &[]))
            .await
            .unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(150),
            "a write waits at least the configured latency"
        );
        api.faults().set_write_latency(Duration::ZERO);
        cms.create(&PostParams::default(), &cm("b", &[]))
            .await
            .unwrap();
        let writes: Vec<Duration> = api
            .requests()
            .iter()
            .filter(|r| r.verb == "create")
            .map(|r| r.duration)
            .collect();
        assert!(writes[0] >= Duration::from_millis(150) && writes.len() == 2);
    }

    #[tokio::test]
    async fn direct_store_access_uses_the_same_rules_as_the_api() {
        let (api, client) = start_emulator().await;
        let created = api.create_object(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "d", "namespace": "default"}, "data": {"a": "1"}})).unwrap();
        assert!(created["metadata"]["uid"].is_string());
        let err = api.create_object(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "d", "namespace": "default"}})).unwrap_err();
        assert!(
            matches!(err, apiserver::Error::Api(ref e) if e.code == 409),
            "{err}"
        );
        let seen = Api::<ConfigMap>::default_namespaced(client)
            .get("d")
            .await
            .unwrap();
        assert_eq!(seen.data.unwrap()["a"], "1");
        assert_eq!(
            api.get_object("v1", "ConfigMap", Some("default"), "d")
                .unwrap()["data"]["a"],
            "1"
        );
        api.delete_object("v1", "ConfigMap", Some("default"), "d")
            .unwrap();
        assert!(
            api.get_object("v1", "ConfigMap", Some("default"), "d")
                .is_none()
        );
    }
}
