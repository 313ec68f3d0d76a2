//! `charts/slipstream`: lint, render, and check what a production install
//! relies on.

use std::collections::BTreeSet;

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Container, rbac::v1::ClusterRole};
use serde_json::Value;

use slipstream::policy::AccessPolicy;

use crate::{chart_dir, parse_documents, root, run_helm};

/// Renders the chart with `--set`-style overrides.
pub(crate) fn render(sets: &[&str]) -> Result<Vec<Value>, String> {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        "slipstream",
        chart.to_str().unwrap(),
        "--namespace",
        "slipstream-system",
    ];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    run_helm(&args).map(|out| parse_documents(&out))
}

pub(crate) fn render_ok(sets: &[&str]) -> Vec<Value> {
    render(sets).unwrap_or_else(|e| panic!("helm template {sets:?} failed: {e}"))
}

pub(crate) fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect()
}

pub(crate) fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, got {}", found.len());
    found[0]
}

/// The object of `kind` called `name`.
pub(crate) fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

pub(crate) fn deployment(docs: &[Value]) -> Deployment {
    serde_json::from_value(one(docs, "Deployment").clone()).expect("a valid apps/v1 Deployment")
}

pub(crate) fn operator_container(d: &Deployment) -> Container {
    let spec = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(spec.containers.len(), 1);
    spec.containers[0].clone()
}

/// (name, literal value or "secret:NAME/KEY" or "field:PATH").
pub(crate) fn env_of(c: &Container) -> Vec<(String, String)> {
    c.env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            let v = match (e.value, e.value_from) {
                (Some(v), _) => v,
                (None, Some(from)) => match (from.secret_key_ref, from.field_ref) {
                    (Some(s), _) => format!("secret:{}/{}", s.name, s.key),
                    (None, Some(f)) => format!("field:{}", f.field_path),
                    _ => panic!("unexpected env source for {}", e.name),
                },
                (None, None) => String::new(),
            };
            (e.name, v)
        })
        .collect()
}

pub(crate) fn env_value(c: &Container, name: &str) -> Option<String> {
    env_of(c)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

/// mountPath -> secret name, for every Secret volume mounted into the container.
fn secret_mounts(d: &Deployment) -> Vec<(String, String)> {
    let spec = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let volumes = spec.volumes.clone().unwrap_or_default();
    operator_container(d)
        .volume_mounts
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| {
            let vol = volumes
                .iter()
                .find(|v| v.name == m.name)
                .expect("mounted volume exists");
            vol.secret.as_ref().map(|s| {
                assert_eq!(
                    m.read_only,
                    Some(true),
                    "secret {} is mounted read-only",
                    m.name
                );
                (m.mount_path.clone(), s.secret_name.clone().unwrap())
            })
        })
        .collect()
}

/// Value sets that switch on every optional part of the chart.
pub(crate) const EVERYTHING_ON: &[&str] = &[
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
    "rollout.enabled=true",
];

#[test]
fn chart_passes_helm_lint_strict() {
    let chart = chart_dir();
    let out = run_helm(&["lint", "--strict", chart.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("helm lint failed: {e}"));
    assert!(out.contains("0 chart(s) failed"), "{out}");
    let mut args = vec!["lint", "--strict", chart.to_str().unwrap()];
    for s in EVERYTHING_ON {
        args.extend(["--set", s]);
    }
    run_helm(&args).unwrap_or_else(|e| panic!("helm lint with every option failed: {e}"));
}

#[test]
fn default_install_renders_the_operator_objects() {
    let docs = render_ok(&[]);
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
    assert_eq!(kinds(&docs), expected);

    let all = render_ok(EVERYTHING_ON);
    let kinds_all = kinds(&all);
    for k in ["ServiceMonitor", "NetworkPolicy", "ConfigMap"] {
        assert!(kinds_all.contains(k), "{k} rendered when enabled");
    }
}

#[test]
fn rbac_grants_exactly_the_operator_verbs_and_no_wildcard() {
    for sets in [&[][..], EVERYTHING_ON] {
        let docs = render_ok(sets);
        let role: ClusterRole =
            serde_json::from_value(named(&docs, "ClusterRole", "slipstream").clone()).unwrap();
        let mut granted = BTreeSet::new();
        for rule in role.rules.unwrap() {
            let groups = rule.api_groups.unwrap_or_default();
            let resources = rule.resources.unwrap_or_default();
            for field in [&groups, &resources, &rule.verbs] {
                assert!(
                    field.iter().all(|s| !s.contains('*')),
                    "wildcard in RBAC rule: {field:?}"
                );
            }
            assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
            for g in &groups {
                for r in &resources {
                    for v in &rule.verbs {
                        granted.insert(format!("{g}/{r}:{v}"));
                    }
                }
            }
        }
        let mut expected = BTreeSet::new();
        let mut allow = |group: &str, resource: &str, verbs: &[&str]| {
            for v in verbs {
                expected.insert(format!("{group}/{resource}:{v}"));
            }
        };
        allow(
            "slipstream.io",
            "configbindings",
            &["get", "list", "watch", "patch"],
        );
        allow("slipstream.io", "configbindings/status", &["patch"]);
        allow(
            "",
            "configmaps",
            &["get", "list", "watch", "create", "patch", "delete"],
        );
        allow("events.k8s.io", "events", &["create", "patch"]);
        if sets.contains(&"rollout.enabled=true") {
            for workload in ["deployments", "statefulsets", "daemonsets"] {
                allow("apps", workload, &["get", "patch"]);
            }
        }
        assert_eq!(granted, expected);

        let binding = one(&docs, "ClusterRoleBinding");
        assert_eq!(
            binding["roleRef"]["name"],
            role.metadata.name.clone().unwrap().as_str()
        );
        assert_eq!(
            binding["subjects"][0]["name"],
            one(&docs, "ServiceAccount")["metadata"]["name"]
        );
        assert_eq!(binding["subjects"][0]["namespace"], "slipstream-system");
    }
}

#[test]
fn every_container_runs_non_root_read_only_without_capabilities() {
    for sets in [&[][..], EVERYTHING_ON] {
        let d = deployment(&render_ok(sets));
        let pod = d.spec.as_ref().unwrap().template.spec.clone().unwrap();
        let psc = pod.security_context.clone().expect("pod securityContext");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let containers = pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten());
        for c in containers {
            let sc = c
                .security_context
                .clone()
                .unwrap_or_else(|| panic!("{}: securityContext", c.name));
            assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(
                sc.capabilities.unwrap().drop,
                Some(vec!["ALL".to_owned()]),
                "{}",
                c.name
            );
            assert_eq!(
                sc.seccomp_profile.unwrap().type_,
                "RuntimeDefault",
                "{}",
                c.name
            );
            assert_ne!(sc.privileged, Some(true), "{}", c.name);
            let res = c
                .resources
                .clone()
                .unwrap_or_else(|| panic!("{}: resources", c.name));
            assert!(
                res.requests.is_some() && res.limits.is_some(),
                "{}: requests and limits",
                c.name
            );
        }
    }
}

#[test]
fn probes_point_at_healthz_and_readyz_on_the_metrics_port() {
    let d = deployment(&render_ok(&[]));
    let c = operator_container(&d);
    let port = c
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .unwrap();
    assert_eq!(
        env_value(&c, "SLIPSTREAM_METRICS_ADDR").unwrap(),
        format!("0.0.0.0:{}", port.container_port)
    );
    for (probe, path) in [
        (c.liveness_probe.clone(), "/healthz"),
        (c.readiness_probe.clone(), "/readyz"),
    ] {
        let get = probe.unwrap().http_get.unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(serde_json::to_value(&get.port).unwrap(), "metrics");
    }
}

#[test]
fn default_install_runs_two_replicas_with_leader_election_and_pod_name_identity() {
    let docs = render_ok(&[]);
    let d = deployment(&docs);
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    let c = operator_container(&d);
    assert_eq!(c.args, Some(vec!["run".to_owned()]));
    assert_eq!(env_value(&c, "POD_NAME").unwrap(), "field:metadata.name");
    assert_eq!(env_value(&c, "SLIPSTREAM_LEADER_ELECTION").unwrap(), "true");
    assert_eq!(
        env_value(&c, "SLIPSTREAM_LEASE_BUCKET").unwrap(),
        "slipstream-leases"
    );
    assert_eq!(
        env_value(&c, "SLIPSTREAM_RELEASE_NAME").unwrap(),
        "slipstream",
        "the operator derives the lease key `slipstream.leader` from it"
    );
    assert_eq!(env_value(&c, "SLIPSTREAM_LEASE_KEY"), None);
    let keyed = deployment(&render_ok(&["leaderElection.key=team-a"]));
    assert_eq!(
        env_value(&operator_container(&keyed), "SLIPSTREAM_LEASE_KEY").unwrap(),
        "team-a"
    );
    assert_eq!(env_value(&c, "SLIPSTREAM_COALESCE").unwrap(), "50ms");
    assert_eq!(env_value(&c, "SLIPSTREAM_LOG_FORMAT").unwrap(), "json");
    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        serde_json::to_value(&d.spec.as_ref().unwrap().selector.match_labels).unwrap()
    );

    let single = deployment(&render_ok(&[
        "replicaCount=1",
        "leaderElection.enabled=false",
    ]));
    let c = operator_container(&single);
    assert_eq!(
        env_value(&c, "SLIPSTREAM_LEADER_ELECTION").unwrap(),
        "false"
    );
    assert_eq!(env_value(&c, "SLIPSTREAM_LEASE_BUCKET"), None);
}

#[test]
fn schema_and_template_checks_reject_bad_values() {
    let bad: &[(&[&str], &str)] = &[
        (&["replicaCount=two"], "replicaCount"),
        (&["replicaCount=0"], "replicaCount"),
        (&["logFormat=xml"], "logFormat"),
        (&["coalesce=fast"], "coalesce"),
        (&["nats.url=http://nats:4222"], "url"),
        (&["nats.auth.mode=kerberos"], "mode"),
        (&["nats.auth.mode=creds"], "existingSecret"),
        (
            &["securityContext.readOnlyRootFilesystem=false"],
            "readOnlyRootFilesystem",
        ),
        (&["podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
        (&["image.pullPolicy=Sometimes"], "pullPolicy"),
        (&["metrics.port=70000"], "port"),
        (&["replicsCount=2"], "replicsCount"),
        (&["leaderElection.enabled=false"], "leaderElection.enabled"),
    ];
    for (sets, mentions) in bad {
        let err = render(sets)
            .err()
            .unwrap_or_else(|| panic!("{sets:?} was accepted"));
        assert!(
            err.contains(mentions),
            "{sets:?}: error does not name {mentions:?}: {err}"
        );
    }
}

#[test]
fn credential_modes_mount_files_or_reference_secret_keys() {
    let base = "nats.auth.existingSecret=nats-auth";

    let d = deployment(&render_ok(&["nats.auth.mode=creds", base]));
    let c = operator_container(&d);
    assert_eq!(
        env_value(&c, "SLIPSTREAM_NATS_CREDS").unwrap(),
        "/etc/slipstream/nats-auth/nats.creds"
    );
    assert_eq!(
        secret_mounts(&d),
        vec![("/etc/slipstream/nats-auth".into(), "nats-auth".into())]
    );

    let d = deployment(&render_ok(&[
        "nats.auth.mode=nkey",
        base,
        "nats.auth.nkeySeedKey=seed",
    ]));
    let c = operator_container(&d);
    assert_eq!(
        env_value(&c, "SLIPSTREAM_NATS_NKEY_SEED_FILE").unwrap(),
        "/etc/slipstream/nats-auth/seed"
    );
    assert_eq!(
        secret_mounts(&d),
        vec![("/etc/slipstream/nats-auth".into(), "nats-auth".into())]
    );

    let d = deployment(&render_ok(&["nats.auth.mode=token", base]));
    let c = operator_container(&d);
    assert_eq!(
        env_value(&c, "SLIPSTREAM_NATS_TOKEN").unwrap(),
        "secret:nats-auth/token"
    );
    assert!(secret_mounts(&d).is_empty());

    let d = deployment(&render_ok(&["nats.auth.mode=userPassword", base]));
    let c = operator_container(&d);
    assert_eq!(
        env_value(&c, "SLIPSTREAM_NATS_USER").unwrap(),
        "secret:nats-auth/user"
    );
    assert_eq!(
        env_value(&c, "SLIPSTREAM_NATS_PASSWORD").unwrap(),
        "secret:nats-auth/password"
    );
    assert!(secret_mounts(&d).is_empty());

    let d = deployment(&render_ok(&[]));
    let c = operator_container(&d);
    for name in [
        "CREDS",
        "NKEY_SEED_FILE",
        "TOKEN",
        "USER",
        "PASSWORD",
        "TLS_CA",
        "TLS_CERT",
        "TLS_KEY",
    ] {
        assert_eq!(
            env_value(&c, &format!("SLIPSTREAM_NATS_{name}")),
            None,
            "{name} unset by default"
        );
    }
    assert!(secret_mounts(&d).is_empty());

    let d = deployment(&render_ok(&[
        "nats.tls.caSecret=ca",
        "nats.tls.clientCertSecret=client",
    ]));
    let c = operator_container(&d);
    assert_eq!(
        env_value(&c, "SLIPSTREAM_NATS_TLS_CA").unwrap(),
        "/etc/slipstream/nats-ca/ca.crt"
    );
    assert_eq!(
        env_value(&c, "SLIPSTREAM_NATS_TLS_CERT").unwrap(),
        "/etc/slipstream/nats-client-tls/tls.crt"
    );
    assert_eq!(
        env_value(&c, "SLIPSTREAM_NATS_TLS_KEY").unwrap(),
        "/etc/slipstream/nats-client-tls/tls.key"
    );
    assert_eq!(
        secret_mounts(&d),
        vec![
            ("/etc/slipstream/nats-ca".into(), "ca".into()),
            ("/etc/slipstream/nats-client-tls".into(), "client".into())
        ]
    );
}

#[test]
fn access_policy_is_rendered_into_a_mounted_configmap() {
    let docs = render_ok(&[
        "policy.namespaces.shop[0].bucket=app-config",
        "policy.namespaces.shop[0].prefixes[0]=web.",
    ]);
    let cm = one(&docs, "ConfigMap");
    let text = cm["data"]["policy.yaml"].as_str().unwrap();
    let policy: Value = serde_yaml::from_str(text).unwrap();
    assert_eq!(
        policy,
        serde_json::json!({"namespaces": {"shop": [{"bucket": "app-config", "prefixes": ["web."]}]}})
    );
    // The operator's own parser reads what the chart renders.
    let parsed = AccessPolicy::from_yaml(text, "policy.yaml").unwrap();
    assert!(!parsed.is_allow_all());
    assert!(
        parsed
            .check("shop", "app-config", &["web.x".into()])
            .is_ok()
    );
    assert!(parsed.check("shop", "app-config", &["db.".into()]).is_err());
    assert!(
        parsed
            .check("other", "app-config", &["web.".into()])
            .is_err()
    );

    let d = deployment(&docs);
    let c = operator_container(&d);
    assert_eq!(
        env_value(&c, "SLIPSTREAM_POLICY_FILE").unwrap(),
        "/etc/slipstream/policy/policy.yaml"
    );
    let pod = d.spec.unwrap().template;
    let vol = pod
        .spec
        .unwrap()
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "policy")
        .unwrap();
    assert_eq!(
        vol.config_map.unwrap().name,
        cm["metadata"]["name"].as_str().unwrap()
    );
    // A policy change rolls the pods.
    assert!(
        pod.metadata
            .unwrap()
            .annotations
            .unwrap()
            .contains_key("checksum/policy")
    );

    let c = operator_container(&deployment(&render_ok(&[])));
    assert_eq!(
        env_value(&c, "SLIPSTREAM_POLICY_FILE"),
        None,
        "no policy: allow all"
    );
}

#[test]
fn metrics_service_and_service_monitor_select_the_operator_pods() {
    let docs = render_ok(EVERYTHING_ON);
    let d = deployment(&docs);
    let labels = serde_json::to_value(d.spec.unwrap().selector.match_labels.unwrap()).unwrap();
    let svc = one(&docs, "Service");
    assert_eq!(svc["spec"]["selector"], labels);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    let sm = one(&docs, "ServiceMonitor");
    assert_eq!(sm["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    let np = one(&docs, "NetworkPolicy");
    assert_eq!(np["spec"]["podSelector"]["matchLabels"], labels);
    assert_eq!(
        np["spec"]["policyTypes"],
        serde_json::json!(["Ingress", "Egress"])
    );
}

#[test]
fn chart_crds_are_exact_copies_of_the_generated_crds() {
    let list = |dir: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".yaml"))
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    };
    let generated = root().join("crds");
    let shipped = chart_dir().join("crds");
    let names = list(&generated);
    assert_eq!(
        names,
        list(&shipped),
        "charts/slipstream/crds must hold the same files as crds/ (cp crds/*.yaml charts/slipstream/crds/)"
    );
    for name in names {
        let a = std::fs::read(generated.join(&name)).unwrap();
        let b = std::fs::read(shipped.join(&name)).unwrap();
        assert!(
            a == b,
            "charts/slipstream/crds/{name} differs from crds/{name}: cp crds/{name} charts/slipstream/crds/"
        );
    }
}
