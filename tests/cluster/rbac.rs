//! The chart's RBAC as the real authorizer reads it: the ServiceAccount may
//! do what the operator calls and nothing else.

use std::collections::{BTreeMap, BTreeSet};

use apiserver::real::ControlPlane;

use crate::support::*;

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
    // the ConfigMap's owner reference sets blockOwnerDeletion, which the
    // OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift
    // and other hardened clusters) allows only to who may update this
    ("configbindings.slipstream.io/finalizers", &["update"]),
    // the ConfigMap watch and reads; create (first write), server-side
    // apply and merge patches; delete for deletionPolicy Delete
    (
        "configmaps",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    // kube-runtime's event Recorder writes events.k8s.io/v1 Events
    ("events.events.k8s.io", &["create", "patch"]),
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
    let user = format!("--as={}", release.service_account_user());
    let can = |verb: &str, resource: &str, scope: &str| -> bool {
        // `kubectl auth can-i VERB a/b` reads b as an object name
        let (resource, subresource) = match resource.split_once('/') {
            Some((r, sub)) => (r, Some(format!("--subresource={sub}"))),
            None => (resource, None),
        };
        let mut args = vec!["auth", "can-i", verb, resource, &user];
        args.extend(subresource.as_deref());
        match scope {
            "cluster" => args.push("--all-namespaces"),
            ns => args.extend(["--namespace", ns]),
        }
        match admin.kubectl(&args) {
            Ok(out) => out.trim() == "yes",
            Err(e) if e.trim_end().ends_with("no") => false,
            Err(e) => panic!("{e}"),
        }
    };
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
        (
            "update",
            "configbindings.slipstream.io/finalizers",
            ns.as_str(),
        ),
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
