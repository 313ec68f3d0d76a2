//! `helm install` of charts/slipstream into the real API server, and the
//! operator binary running with exactly what the chart gives it: its flags,
//! its ServiceAccount, its RBAC.

use std::collections::BTreeSet;

use apiserver::real::ControlPlane;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::{Api, ResourceExt, api::DeleteParams};
use slipstream::crd::ConfigBinding;
use slipstream::kv::KvWriter;

use crate::support::*;

/// The value sets of tests/deploy/chart.rs `EVERYTHING_ON`: every optional
/// part of the chart switched on.
const EVERYTHING_ON: &[&str] = &[
    "nats.auth.mode=creds",
    "nats.auth.existingSecret=nats-creds",
    "nats.tls.caSecret=nats-ca",
    "nats.tls.clientCertSecret=nats-client",
    "networkPolicy.enabled=true",
    "metrics.serviceMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "grafanaDashboard.enabled=true",
    "policy.namespaces.shop[0].bucket=app-config",
    "policy.namespaces.shop[0].prefixes[0]=web.",
];

/// A Prometheus Operator CRD (ServiceMonitor, PrometheusRule) reduced to
/// what lets the API server store the object: its group, kind and scope,
/// with the schema left open (the real ones are thousands of lines of
/// someone else's API; this does not check our fields against them).
fn prometheus_operator_crd(kind: &str, plural: &str) -> String {
    format!(
        r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {plural}.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {{kind: {kind}, listKind: {kind}List, plural: {plural}, singular: {singular}}}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}
"#,
        singular = kind.to_lowercase()
    )
}

fn kinds(release: &Release) -> BTreeSet<String> {
    release
        .manifest
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts that the server holds every object of the release.
fn assert_all_stored(cp: &ControlPlane, release: &Release) {
    let yaml: Vec<String> = release
        .manifest
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect();
    let names = KubeconfigFile::admin(cp, &release.namespace)
        .kubectl_stdin(&["get", "-f", "-", "-o", "name"], &yaml.join("---\n"))
        .unwrap_or_else(|e| panic!("the release's objects are stored: {e}"));
    assert_eq!(
        names.lines().count(),
        release.manifest.len(),
        "one stored object per manifest object:\n{names}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_chart_installs_on_the_real_server_with_its_crd() {
    let cp = ControlPlane::shared().await;
    let release = default_release().await;
    let expected: BTreeSet<String> = [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    .map(String::from)
    .into();
    assert_eq!(kinds(release), expected);
    assert_all_stored(cp, release);

    // the CRD came from the chart's crds/ and is served
    let admin = KubeconfigFile::admin(cp, &release.namespace);
    let served = admin
        .kubectl(&[
            "get",
            "crd",
            "configbindings.slipstream.io",
            "-o",
            "jsonpath={.status.acceptedNames.shortNames}",
        ])
        .unwrap();
    assert!(served.contains("cb"), "{served}");
    admin.kubectl(&["get", "cb"]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_with_every_option_on_installs_on_the_real_server() {
    let cp = ControlPlane::shared().await;
    default_release().await; // the CRD exists; this install skips it
    let admin = KubeconfigFile::admin(cp, "default");
    for (kind, plural) in [
        ("ServiceMonitor", "servicemonitors"),
        ("PrometheusRule", "prometheusrules"),
    ] {
        admin
            .kubectl_stdin(
                &["apply", "-f", "-"],
                &prometheus_operator_crd(kind, plural),
            )
            .unwrap();
        admin
            .kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=120s",
                &format!("crd/{plural}.monitoring.coreos.com"),
            ])
            .unwrap();
    }

    let ns = format!("everything-{}", unique());
    let release =
        tokio::task::spawn_blocking(move || Release::install(cp, "everything", &ns, EVERYTHING_ON))
            .await
            .unwrap();
    let kinds = kinds(&release);
    for k in [
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "ConfigMap",
        "Deployment",
    ] {
        assert!(kinds.contains(k), "{k} installed: {kinds:?}");
    }
    assert_all_stored(cp, &release);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_as_the_charts_service_account_syncs_a_binding_end_to_end_without_a_403() {
    let cp = ControlPlane::shared().await;
    let release = default_release().await;
    let ns = cp.create_namespace("chart-sync").await;
    let admin = cp.client_in(&ns).await;
    let (nats, bucket) = nats_with_bucket().await;
    put(&bucket, "web.greeting", "hello").await;

    let kubeconfig = release.service_account_kubeconfig(cp, &ns).await;
    let mut operator = Operator::start(release, &kubeconfig, &nats.url(), &ns);
    create_binding(
        &admin,
        &ns,
        "web",
        "bucket: app-config\nprefixes: [web.]\nstripPrefix: true\nkeyPolicy: Fail",
    )
    .await;
    wait_data(&admin, &ns, "web", &map(&[("greeting", "hello")])).await;
    wait_synced(&admin, &ns, "web").await;

    // live updates and deletes
    put(&bucket, "web.greeting", "bonjour").await;
    put(&bucket, "web.color", "blue").await;
    wait_data(
        &admin,
        &ns,
        "web",
        &map(&[("greeting", "bonjour"), ("color", "blue")]),
    )
    .await;

    // A failure and the recovery from it go out as Events (events.k8s.io;
    // a first sync makes none): a key keyPolicy Fail refuses, then its delete.
    let events: Api<Event> = Api::namespaced(admin.clone(), &ns);
    let event_for_web = |reason: &'static str| {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.unwrap();
            list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web")
            })
        }
    };
    put(&bucket, "web.a/b", "refused").await;
    eventually("an InvalidKey event for the binding", || {
        event_for_web("InvalidKey")
    })
    .await;
    bucket.delete("web.a/b").await.unwrap();
    eventually("a Synced (recovered) event for the binding", || {
        event_for_web("Synced")
    })
    .await;

    // deleting the binding: the garbage collector deletes its ConfigMap
    delete_binding_and_wait_gone(&admin, &ns, "web").await;

    operator.assert_never_refused();
}

/// `watchNamespace`: the operator runs as a ServiceAccount that holds only a
/// Role in the watched namespace, and still syncs, finalizes and deletes
/// there without a single 403; it has no cluster-wide grant at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaced_release_syncs_its_namespace_with_a_role_only() {
    let cp = ControlPlane::shared().await;
    default_release().await; // the CRD exists; this install skips it
    let watched = cp.create_namespace("watched").await;
    let release_ns = format!("namespaced-{}", unique());
    let sets = [
        format!("watchNamespace={watched}"),
        "rbac.aggregateToDefaultRoles=false".to_owned(),
    ];
    let release = tokio::task::spawn_blocking(move || {
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        Release::install(cp, "namespaced", &release_ns, &sets)
    })
    .await
    .unwrap();
    let kinds = kinds(&release);
    assert!(
        kinds.contains("Role") && kinds.contains("RoleBinding"),
        "{kinds:?}"
    );
    assert!(
        !kinds.contains("ClusterRole") && !kinds.contains("ClusterRoleBinding"),
        "{kinds:?}"
    );

    let admin_kubectl = KubeconfigFile::admin(cp, &watched);
    let user = release.service_account_user();
    let cb = "configbindings.slipstream.io";
    assert!(user_can(&admin_kubectl, &user, "watch", cb, &watched));
    assert!(user_can(
        &admin_kubectl,
        &user,
        "create",
        "configmaps",
        &watched
    ));
    assert!(!user_can(&admin_kubectl, &user, "list", cb, "cluster"));
    assert!(!user_can(
        &admin_kubectl,
        &user,
        "create",
        "configmaps",
        &release.namespace
    ));

    let admin = cp.client_in(&watched).await;
    let (nats, bucket) = nats_with_bucket().await;
    put(&bucket, "web.greeting", "hello").await;
    let kubeconfig = release.service_account_kubeconfig(cp, &watched).await;
    let mut operator = Operator::start(&release, &kubeconfig, &nats.url(), &watched);
    create_binding(
        &admin,
        &watched,
        "web",
        "bucket: app-config\nprefixes: [web.]\nstripPrefix: true",
    )
    .await;
    // Retain: a binding whose deletion takes our finalizer and an update
    // of the ConfigMap's owner references
    create_binding(
        &admin,
        &watched,
        "kept",
        "bucket: app-config\nprefixes: [web.]\ntarget: {deletionPolicy: Retain}",
    )
    .await;
    wait_data(&admin, &watched, "web", &map(&[("greeting", "hello")])).await;
    wait_finalizer(&admin, &watched, "kept").await;
    put(&bucket, "web.greeting", "bonjour").await;
    wait_data(&admin, &watched, "web", &map(&[("greeting", "bonjour")])).await;

    delete_binding_and_wait_gone(&admin, &watched, "web").await;
    let bindings: Api<ConfigBinding> = Api::namespaced(admin.clone(), &watched);
    bindings
        .delete("kept", &DeleteParams::default())
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), &watched);
    eventually(
        "binding kept gone, its ConfigMap kept without an owner",
        || async {
            let gone = bindings.get_opt("kept").await.unwrap().is_none();
            let cm = cms.get_opt("kept").await.unwrap();
            (gone && cm.is_some_and(|cm| cm.owner_references().is_empty())).then_some(())
        },
    )
    .await;
    operator.assert_never_refused();
}
