//! The chart's RBAC as the real authorizer reads it: the ServiceAccount may
//! do what the operator calls and nothing else.

use std::collections::{BTreeMap, BTreeSet};

use apiserver::real::{ControlPlane, Options};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::ConfigMap, rbac::v1::ClusterRole};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams},
};
use slipstream::{
    controller::rollout::annotation_key, crd::ConfigBinding, sink::configmap::DIGEST_ANNOTATION,
};

use crate::{common::workload_json, support::*};

/// What the operator calls, per resource (as `kubectl auth can-i --list`
/// names it), and where:
const OPERATOR_USES: &[(&str, &[&str])] = &[
    // the controller's list+watch; a get when two bindings claim one target;
    // the finalizer is added and removed with a merge patch
    (
        "configbindings.slipstream.io",
        &["get", "list", "watch", "patch"],
    ),
    // status is a merge patch
    ("configbindings.slipstream.io/status", &["patch"]),
    // the ConfigMap watch and reads; create (first write), server-side
    // apply and merge patches; delete for deletionPolicy Delete
    (
        "configmaps",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    // kube-runtime's event Recorder writes events.k8s.io/v1 Events
    ("events.events.k8s.io", &["create", "patch"]),
];

/// What `rollout.enabled` adds: read a workload, then apply its one
/// pod-template annotation.
const ROLLOUT_USES: &[(&str, &[&str])] = &[
    ("deployments.apps", &["get", "patch"]),
    ("statefulsets.apps", &["get", "patch"]),
    ("daemonsets.apps", &["get", "patch"]),
];

/// What every authenticated user may do (the `system:basic-user` role).
const EVERY_USER: &[(&str, &[&str])] = &[
    ("selfsubjectreviews.authentication.k8s.io", &["create"]),
    ("selfsubjectaccessreviews.authorization.k8s.io", &["create"]),
    ("selfsubjectrulesreviews.authorization.k8s.io", &["create"]),
];

/// The resource rules of `kubectl auth can-i --list`: resource -> verbs.
/// Rules on non-resource URLs (an empty first column) are left out.
fn resource_rules(list: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut rules: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in list.lines().skip(1) {
        if line.starts_with(char::is_whitespace) || line.trim().is_empty() {
            continue;
        }
        let resource = line.split_whitespace().next().unwrap().to_owned();
        let (open, close) = (line.rfind('[').unwrap(), line.rfind(']').unwrap());
        let verbs = line[open + 1..close].split_whitespace().map(str::to_owned);
        rules.entry(resource).or_default().extend(verbs);
    }
    rules
}

fn rules_of(table: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
    table
        .iter()
        .map(|(r, verbs)| (r.to_string(), verbs.iter().map(|v| v.to_string()).collect()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_may_do_exactly_what_the_operator_uses() {
    let cp = ControlPlane::shared().await;
    let release = default_release().await;
    let ns = cp.create_namespace("rbac").await;
    let admin = KubeconfigFile::admin(cp, &ns);
    let user = format!("--as={}", release.service_account_user());
    let list = admin
        .kubectl(&["auth", "can-i", "--list", &user, "--namespace", &ns])
        .unwrap();
    println!("kubectl auth can-i --list {user} --namespace {ns}\n{list}");

    let mut expected = rules_of(OPERATOR_USES);
    expected.extend(rules_of(EVERY_USER));
    assert_eq!(resource_rules(&list), expected, "\n{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_cannot_read_secrets_or_write_outside_its_resources() {
    let cp = ControlPlane::shared().await;
    let release = default_release().await;
    let ns = cp.create_namespace("rbac-deny").await;
    let admin = KubeconfigFile::admin(cp, &ns);
    let user = release.service_account_user();
    let can =
        |verb: &str, resource: &str, scope: &str| user_can(&admin, &user, verb, resource, scope);
    let system = release.namespace.as_str();
    let denied = [
        ("get", "secrets", ns.as_str()),
        ("list", "secrets", "cluster"),
        ("watch", "secrets", system),
        ("create", "deployments.apps", ns.as_str()),
        ("patch", "deployments.apps", system),
        ("create", "pods", ns.as_str()),
        ("create", "serviceaccounts/token", system),
        ("create", "configbindings.slipstream.io", ns.as_str()),
        ("update", "configbindings.slipstream.io", ns.as_str()),
        ("delete", "configbindings.slipstream.io", ns.as_str()),
        ("update", "configbindings.slipstream.io/status", ns.as_str()),
        (
            "update",
            "configbindings.slipstream.io/finalizers",
            ns.as_str(),
        ),
        ("update", "configmaps", ns.as_str()),
        ("deletecollection", "configmaps", ns.as_str()),
        ("create", "events", ns.as_str()),
        (
            "create",
            "customresourcedefinitions.apiextensions.k8s.io",
            "cluster",
        ),
        (
            "delete",
            "customresourcedefinitions.apiextensions.k8s.io",
            "cluster",
        ),
        ("create", "leases.coordination.k8s.io", system),
        ("delete", "namespaces", "cluster"),
        ("bind", "clusterroles.rbac.authorization.k8s.io", "cluster"),
        (
            "create",
            "rolebindings.rbac.authorization.k8s.io",
            ns.as_str(),
        ),
        ("impersonate", "users", "cluster"),
    ];
    let allowed = [
        ("watch", "configbindings.slipstream.io", "cluster"),
        ("patch", "configbindings.slipstream.io", ns.as_str()),
        ("patch", "configbindings.slipstream.io/status", ns.as_str()),
        ("create", "configmaps", ns.as_str()),
        ("delete", "configmaps", ns.as_str()),
        ("create", "events.events.k8s.io", ns.as_str()),
    ];
    let wrong: Vec<String> = denied
        .iter()
        .filter(|(v, r, s)| can(v, r, s))
        .map(|(v, r, s)| format!("may {v} {r} in {s}, should not"))
        .chain(
            allowed
                .iter()
                .filter(|(v, r, s)| !can(v, r, s))
                .map(|(v, r, s)| format!("may not {v} {r} in {s}, needs to")),
        )
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Hardened clusters (OpenShift among them) turn on the
/// OwnerReferencesPermissionEnforcement admission plugin: changing an
/// object's owner references needs delete on it, and `blockOwnerDeletion`
/// needs update on the owner's `finalizers` subresource, which the chart does
/// not grant (the operator's owner references leave it unset). The chart's
/// RBAC syncs there and lets a Retain binding drop its owner reference; with
/// `configmaps` delete taken away the plugin refuses that (it is really on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_rbac_suffices_where_admission_enforces_owner_reference_permissions() {
    let options = Options {
        controller_manager: false,
        apiserver_args: vec![
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement".into(),
        ],
        ..Options::default()
    };
    let cp = ControlPlane::start(options).await.unwrap();
    let release = tokio::task::block_in_place(|| {
        let ns = format!("slipstream-system-{}", unique());
        let release = Release::install(&cp, "slipstream", &ns, &[]);
        wait_crd_established(&cp);
        release
    });
    let ns = cp.create_namespace("owner-refs").await;
    let client = cp.client_in(&ns).await;
    let (nats, bucket) = nats_with_bucket().await;
    put(&bucket, "web.a", "1").await;
    let kubeconfig = release.service_account_kubeconfig(&cp, &ns).await;
    let mut operator = Operator::start(&release, &kubeconfig, &nats.url(), &ns);
    let retain = "bucket: app-config\nprefixes: [web.]\ntarget: {deletionPolicy: Retain}";
    for name in ["first", "second"] {
        create_binding(&client, &ns, name, retain).await;
        let cm = wait_data(&client, &ns, name, &map(&[("web.a", "1")])).await;
        let owner = &cm.owner_references()[0];
        assert_eq!((owner.name.as_str(), owner.controller), (name, Some(true)));
        wait_synced(&client, &ns, name).await;
        wait_finalizer(&client, &ns, name).await;
    }

    // Retain: the finalizer drops the owner reference (an update of ownerReferences)
    let bindings: Api<ConfigBinding> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    bindings
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    eventually("binding first deleted", || async {
        bindings
            .get_opt("first")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        cms.get("first")
            .await
            .unwrap()
            .owner_references()
            .is_empty()
    );
    operator.assert_never_refused();

    // the control: without delete on ConfigMaps that update is refused
    let roles: Api<ClusterRole> = Api::all(cp.client().await);
    // the operator's own ClusterRole: the one its ClusterRoleBinding names
    // (the release also has the aggregated view and edit roles)
    let name = release.one("ClusterRoleBinding")["roleRef"]["name"]
        .as_str()
        .unwrap();
    let mut role = roles.get(name).await.unwrap();
    for rule in role.rules.as_mut().unwrap() {
        if rule.resources.iter().flatten().any(|r| r == "configmaps") {
            rule.verbs.retain(|v| v != "delete");
        }
    }
    roles
        .replace(name, &PostParams::default(), &role)
        .await
        .unwrap();
    let admin = KubeconfigFile::admin(&cp, &ns);
    let user = format!("--as={}", release.service_account_user());
    eventually("the authorizer has the narrower role", || async {
        let may = admin.kubectl(&["auth", "can-i", "delete", "configmaps", &user]);
        may.is_err().then_some(())
    })
    .await;
    bindings
        .delete("second", &DeleteParams::default())
        .await
        .unwrap();
    let refused = eventually("dropping the owner reference is refused", || async {
        operator
            .forbidden_lines()
            .into_iter()
            .find(|l| l.contains("cannot set an ownerRef"))
    })
    .await;
    assert!(refused.contains("second"), "{refused}");
    let second = bindings.get("second").await.unwrap();
    assert!(second.metadata.deletion_timestamp.is_some());
    assert!(
        !cms.get("second")
            .await
            .unwrap()
            .owner_references()
            .is_empty()
    );
}

/// The chart's `<release>-view` and `<release>-edit` ClusterRoles, as the
/// real ClusterRole aggregation controller folds them into the built-in
/// `view` and `edit` roles: a namespace viewer reads ConfigBindings, an
/// editor writes them, and neither touches their status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_viewers_and_editors_get_configbindings_through_the_aggregated_roles() {
    let cp = ControlPlane::shared().await;
    default_release().await;
    let ns = cp.create_namespace("rbac-aggregate").await;
    let admin = KubeconfigFile::admin(cp, &ns);
    let (viewer, editor) = (
        format!("viewer-{}", unique()),
        format!("editor-{}", unique()),
    );
    for (user, role) in [(&viewer, "view"), (&editor, "edit")] {
        admin
            .kubectl(&[
                "create",
                "rolebinding",
                &format!("{role}-{user}"),
                &format!("--clusterrole={role}"),
                &format!("--user={user}"),
                "--namespace",
                &ns,
            ])
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let cb = "configbindings.slipstream.io";
    // The aggregation controller fills `edit` and `view` asynchronously.
    eventually("the aggregated rules reach edit and view", || {
        let ready = user_can(&admin, &editor, "create", cb, &ns)
            && user_can(&admin, &viewer, "list", cb, &ns);
        async move { ready.then_some(()) }
    })
    .await;
    let status = format!("{cb}/status");
    let expect = [
        (&viewer, "get", cb, true),
        (&viewer, "watch", cb, true),
        (&viewer, "get", status.as_str(), true),
        (&viewer, "create", cb, false),
        (&viewer, "delete", cb, false),
        (&editor, "get", cb, true),
        (&editor, "update", cb, true),
        (&editor, "patch", cb, true),
        (&editor, "delete", cb, true),
        (&editor, "deletecollection", cb, true),
        (&editor, "patch", status.as_str(), false),
        (&editor, "update", status.as_str(), false),
    ];
    let wrong: Vec<String> = expect
        .iter()
        .filter(|(user, verb, resource, want)| user_can(&admin, user, verb, resource, &ns) != *want)
        .map(|(user, verb, resource, want)| format!("{user} {verb} {resource}: want {want}"))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `rollout.enabled` grants get and patch on the apps workloads and nothing
/// more, and that is enough: the binary, running as the release's
/// ServiceAccount, rolls a Deployment without one refused request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_values_grant_workload_get_and_patch_and_that_suffices() {
    let cp = ControlPlane::shared().await;
    let release = tokio::task::block_in_place(|| {
        let ns = format!("slipstream-rollout-{}", unique());
        let release = Release::install(cp, "slipstream-rollout", &ns, &["rollout.enabled=true"]);
        wait_crd_established(cp);
        release
    });
    let ns = cp.create_namespace("rbac-rollout").await;
    let admin = KubeconfigFile::admin(cp, &ns);
    let user = format!("--as={}", release.service_account_user());
    let list = admin
        .kubectl(&["auth", "can-i", "--list", &user, "--namespace", &ns])
        .unwrap();
    let mut expected = rules_of(OPERATOR_USES);
    expected.extend(rules_of(ROLLOUT_USES));
    expected.extend(rules_of(EVERY_USER));
    assert_eq!(resource_rules(&list), expected, "\n{list}");

    let client = cp.client_in(&ns).await;
    let deployment: Deployment =
        serde_json::from_value(workload_json("Deployment", "web")).unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let (nats, bucket) = nats_with_bucket().await;
    put(&bucket, "web.a", "1").await;
    let kubeconfig = release.service_account_kubeconfig(cp, &ns).await;
    let mut operator = Operator::start(&release, &kubeconfig, &nats.url(), &ns);
    let spec = "bucket: app-config\nprefixes: [web.]\ntarget:\n  rollout:\n    workloads: [{kind: Deployment, name: web}]\n    minInterval: 1s";
    create_binding(&client, &ns, "web", spec).await;
    let cm = wait_data(&client, &ns, "web", &map(&[("web.a", "1")])).await;
    let digest = cm.annotations()[DIGEST_ANNOTATION].clone();
    let key = annotation_key("web");
    eventually("the Deployment carries the digest", || async {
        let d = deployments.get("web").await.ok()?;
        let annotations = d.spec?.template.metadata?.annotations?;
        (annotations.get(&key) == Some(&digest)).then_some(())
    })
    .await;
    operator.assert_never_refused();
}
