//! The chart values a platform team expects (extra args, env, volumes,
//! labels, annotations, strategy, namespaced mode, aggregated roles,
//! ServiceMonitor options), the disruption budget's guard rails, and value
//! forms (`--set image.tag=1.2`, `1m30s`) reaching the operator as it
//! parses them.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::{Value, json};

use slipstream::util::duration::parse_duration;

use crate::chart::{deployment, env_value, named, one, operator_container, render, render_ok};

/// The operator's RBAC rules as "group/resource:verb".
fn granted(role: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    let (g, r, v) = (
                        g.as_str().unwrap(),
                        r.as_str().unwrap(),
                        v.as_str().unwrap(),
                    );
                    assert!(!format!("{g}{r}{v}").contains('*'), "wildcard in {role}");
                    out.insert(format!("{g}/{r}:{v}"));
                }
            }
        }
    }
    out
}

fn render_err(sets: &[&str]) -> String {
    render(sets)
        .err()
        .unwrap_or_else(|| panic!("{sets:?} was accepted"))
}

#[test]
fn disruption_budget_evicts_unhealthy_pods_and_refuses_budgets_that_block_drains() {
    let docs = render_ok(&[]);
    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    for sets in [
        &["podDisruptionBudget.minAvailable=2"][..],
        &["replicaCount=3", "podDisruptionBudget.minAvailable=5"],
        &[
            "replicaCount=1",
            "leaderElection.enabled=false",
            "podDisruptionBudget.minAvailable=1",
        ],
    ] {
        let err = render_err(sets);
        assert!(
            err.contains("podDisruptionBudget.minAvailable")
                && err.contains("must be below replicaCount"),
            "{sets:?}: {err}"
        );
    }
    for pct in ["100%", "51%"] {
        let set = format!("podDisruptionBudget.minAvailable={pct}");
        let err = render_err(&[&set]);
        assert!(err.contains("rounds up to every replica"), "{pct}: {err}");
    }
    let err = render_err(&["podDisruptionBudget.maxUnavailable=0"]);
    assert!(err.contains("maxUnavailable"), "{err}");

    for (sets, field, want) in [
        (
            &["podDisruptionBudget.minAvailable=1"][..],
            "minAvailable",
            json!(1),
        ),
        (
            &["podDisruptionBudget.minAvailable=50%"],
            "minAvailable",
            json!("50%"),
        ),
        (
            &["replicaCount=3", "podDisruptionBudget.minAvailable=2"],
            "minAvailable",
            json!(2),
        ),
        (
            &["podDisruptionBudget.maxUnavailable=50%"],
            "maxUnavailable",
            json!("50%"),
        ),
    ] {
        let docs = render_ok(sets);
        assert_eq!(
            one(&docs, "PodDisruptionBudget")["spec"][field],
            want,
            "{sets:?}"
        );
    }
    // A disabled budget is not checked.
    let docs = render_ok(&[
        "podDisruptionBudget.enabled=false",
        "podDisruptionBudget.minAvailable=2",
    ]);
    assert!(docs.iter().all(|d| d["kind"] != "PodDisruptionBudget"));
}

#[test]
fn namespaced_mode_grants_a_role_in_the_watched_namespace_only() {
    let cluster = render_ok(&["rbac.aggregateToDefaultRoles=false"]);
    let cluster_rules = granted(named(&cluster, "ClusterRole", "slipstream"));
    let c = operator_container(&deployment(&cluster));
    assert_eq!(env_value(&c, "SLIPSTREAM_NAMESPACE"), None);

    let docs = render_ok(&["watchNamespace=shop", "rbac.aggregateToDefaultRoles=false"]);
    assert!(
        docs.iter()
            .all(|d| d["kind"] != "ClusterRole" && d["kind"] != "ClusterRoleBinding"),
        "no cluster-wide grant in namespaced mode"
    );
    let role = one(&docs, "Role");
    assert_eq!(role["metadata"]["namespace"], "shop");
    assert_eq!(granted(role), cluster_rules, "the same rules, namespaced");
    let binding = one(&docs, "RoleBinding");
    assert_eq!(binding["metadata"]["namespace"], "shop");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "slipstream"})
    );
    assert_eq!(binding["subjects"][0]["namespace"], "slipstream-system");
    assert_eq!(
        binding["subjects"][0]["name"],
        one(&docs, "ServiceAccount")["metadata"]["name"]
    );
    let c = operator_container(&deployment(&docs));
    assert_eq!(
        env_value(&c, "SLIPSTREAM_NAMESPACE").as_deref(),
        Some("shop")
    );

    let err = render_err(&["watchNamespace=Not_A_Namespace"]);
    assert!(err.contains("watchNamespace"), "{err}");
}

#[test]
fn aggregated_roles_let_namespace_users_read_and_write_configbindings() {
    let docs = render_ok(&[]);
    let view = named(&docs, "ClusterRole", "slipstream-view");
    assert_eq!(
        view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"],
        "true"
    );
    let read: BTreeSet<String> = ["get", "list", "watch"]
        .iter()
        .flat_map(|v| {
            ["configbindings", "configbindings/status"].map(|r| format!("slipstream.io/{r}:{v}"))
        })
        .collect();
    assert_eq!(granted(view), read);

    let edit = named(&docs, "ClusterRole", "slipstream-edit");
    let labels = &edit["metadata"]["labels"];
    assert_eq!(
        labels["rbac.authorization.k8s.io/aggregate-to-edit"],
        "true"
    );
    assert_eq!(
        labels["rbac.authorization.k8s.io/aggregate-to-admin"],
        "true"
    );
    let write: BTreeSet<String> = [
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
    ]
    .iter()
    .map(|v| format!("slipstream.io/configbindings:{v}"))
    .collect();
    assert_eq!(
        granted(edit),
        write,
        "users edit specs; status stays the operator's"
    );

    let off = render_ok(&["rbac.aggregateToDefaultRoles=false"]);
    let names: Vec<_> = off
        .iter()
        .filter(|d| d["kind"] == "ClusterRole")
        .map(|d| d["metadata"]["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("slipstream")]);
}

#[test]
fn extra_args_env_volumes_labels_annotations_and_strategy_reach_the_deployment() {
    let docs = render_ok(&[
        "extraArgs[0]=--coalesce",
        "extraArgs[1]=100ms",
        "extraEnv[0].name=HTTPS_PROXY",
        "extraEnv[0].value=http://proxy:3128",
        "extraVolumes[0].name=ca",
        "extraVolumes[0].configMap.name=corp-ca",
        "extraVolumeMounts[0].name=ca",
        "extraVolumeMounts[0].mountPath=/etc/corp-ca",
        "commonLabels.team=platform",
        "podAnnotations.scrape=yes",
        "deploymentAnnotations.owner=platform",
        "strategy.type=RollingUpdate",
        "strategy.rollingUpdate.maxSurge=1",
        "strategy.rollingUpdate.maxUnavailable=0",
        "revisionHistoryLimit=3",
        "logLevel=debug",
        "logFormat=text",
    ]);
    for d in &docs {
        assert_eq!(
            d["metadata"]["labels"]["team"], "platform",
            "commonLabels on {}",
            d["kind"]
        );
    }
    let d = deployment(&docs);
    let meta = d.metadata.clone();
    assert_eq!(meta.annotations.unwrap()["owner"], "platform");
    let spec = d.spec.clone().unwrap();
    assert_eq!(spec.revision_history_limit, Some(3));
    let strategy = serde_json::to_value(spec.strategy.unwrap()).unwrap();
    assert_eq!(
        strategy,
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    let pod_meta = spec.template.metadata.unwrap();
    assert_eq!(pod_meta.annotations.unwrap()["scrape"], "yes");
    let pod_labels = pod_meta.labels.unwrap();
    assert_eq!(pod_labels["team"], "platform");
    // commonLabels never widen the selector (it cannot change after install).
    assert!(!spec.selector.match_labels.unwrap().contains_key("team"));

    let c = operator_container(&d);
    assert_eq!(c.args.clone().unwrap(), ["run", "--coalesce", "100ms"]);
    assert_eq!(
        env_value(&c, "HTTPS_PROXY").as_deref(),
        Some("http://proxy:3128")
    );
    assert_eq!(
        env_value(&c, "SLIPSTREAM_LOG_LEVEL").as_deref(),
        Some("debug")
    );
    assert_eq!(
        env_value(&c, "SLIPSTREAM_LOG_FORMAT").as_deref(),
        Some("text")
    );
    let mount = c
        .volume_mounts
        .unwrap()
        .into_iter()
        .find(|m| m.name == "ca")
        .expect("extra mount");
    assert_eq!(mount.mount_path, "/etc/corp-ca");
    let vol = spec
        .template
        .spec
        .unwrap()
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "ca")
        .expect("extra volume");
    assert_eq!(vol.config_map.unwrap().name, "corp-ca");

    // Defaults: the operator's own log settings, the Kubernetes strategy.
    let d = deployment(&render_ok(&[]));
    let c = operator_container(&d);
    assert_eq!(c.args.clone().unwrap(), ["run"]);
    assert_eq!(
        env_value(&c, "SLIPSTREAM_LOG_LEVEL").as_deref(),
        Some("info")
    );
    assert!(d.spec.as_ref().unwrap().strategy.is_none());
    assert_eq!(d.spec.unwrap().revision_history_limit, Some(10));

    for (set, mentions) in [
        ("logLevel=loud", "logLevel"),
        ("strategy.type=Sometimes", "strategy"),
        ("commonLabels.team=null", "commonLabels"),
    ] {
        let err = render_err(&[set]);
        assert!(err.contains(mentions), "{set}: {err}");
    }
}

#[test]
fn image_tag_accepts_a_number_from_set() {
    let image = |sets: &[&str]| {
        operator_container(&deployment(&render_ok(sets)))
            .image
            .unwrap()
    };
    assert_eq!(
        image(&["image.tag=1.2"]),
        "ghcr.io/slipstream-io/slipstream:1.2"
    );
    assert_eq!(
        image(&["image.tag=7"]),
        "ghcr.io/slipstream-io/slipstream:7"
    );
    assert_eq!(
        image(&["image.tag=v0.2.0-rc.1"]),
        "ghcr.io/slipstream-io/slipstream:v0.2.0-rc.1"
    );
    assert_eq!(
        image(&[]),
        "ghcr.io/slipstream-io/slipstream:0.1.0",
        "appVersion"
    );
    let digest = format!("sha256:{}", "ab".repeat(32));
    assert_eq!(
        image(&[&format!("image.digest={digest}")]),
        format!("ghcr.io/slipstream-io/slipstream@{digest}")
    );
}

#[test]
fn duration_values_accept_exactly_what_the_operator_parses() {
    // `--set` turns "90" into a number of seconds, as the operator reads a
    // bare number; the schema's verdict must be the operator parser's, so
    // no value renders that `run` would refuse at start.
    let samples = [
        "50ms",
        "5s",
        "2m",
        "1h",
        "1m30s",
        "1h2m3s",
        "1m 30s",
        "90",
        "0",
        "250us",
        "1d",
        "1.5s",
        "1.5",
        "fast",
        "",
        "ms",
        "-1s",
        "5 parsecs",
        "1m30",
        "s5",
    ];
    let mut accepted = 0;
    for text in samples {
        let operator = parse_duration(text).is_ok();
        let chart = render(&[&format!("coalesce={text}")]).is_ok();
        assert_eq!(
            chart, operator,
            "{text:?}: chart accepts {chart}, operator parses {operator}"
        );
        accepted += usize::from(chart);
    }
    assert!(accepted >= 10, "the samples exercise both verdicts");
    let c = operator_container(&deployment(&render_ok(&["statusInterval=1m30s"])));
    assert_eq!(
        env_value(&c, "SLIPSTREAM_STATUS_INTERVAL").as_deref(),
        Some("1m30s")
    );
}

#[test]
fn service_monitor_takes_namespace_relabelings_and_honor_labels() {
    let docs = render_ok(&[
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.namespace=monitoring",
        "metrics.serviceMonitor.honorLabels=true",
        "metrics.serviceMonitor.relabelings[0].targetLabel=cluster",
        "metrics.serviceMonitor.relabelings[0].replacement=prod",
        "metrics.serviceMonitor.metricRelabelings[0].action=drop",
        "metrics.serviceMonitor.metricRelabelings[0].regex=go_.*",
        "metrics.serviceMonitor.metricRelabelings[0].sourceLabels[0]=__name__",
    ]);
    let sm = one(&docs, "ServiceMonitor");
    assert_eq!(sm["metadata"]["namespace"], "monitoring");
    // It still selects the Service in the release namespace.
    assert_eq!(
        sm["spec"]["namespaceSelector"]["matchNames"],
        json!(["slipstream-system"])
    );
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(ep["honorLabels"], true);
    assert_eq!(
        ep["relabelings"],
        json!([{"targetLabel": "cluster", "replacement": "prod"}])
    );
    assert_eq!(
        ep["metricRelabelings"],
        json!([{"action": "drop", "regex": "go_.*", "sourceLabels": ["__name__"]}])
    );
    let plain = render_ok(&["metrics.serviceMonitor.enabled=true"]);
    let sm = one(&plain, "ServiceMonitor");
    assert_eq!(sm["metadata"]["namespace"], "slipstream-system");
    assert!(sm["spec"]["endpoints"][0].get("relabelings").is_none());
}

#[test]
fn default_resources_fit_the_measured_memory() {
    // bench_scale peak RSS on the 2-core reference machine: 65 MiB at 1,000
    // bindings, 400 MiB at 10,000 bindings / 1M keys (values.yaml says so).
    let mib = |q: &Quantity| {
        let s = q.0.as_str();
        let n: f64 = s.trim_end_matches(char::is_alphabetic).parse().unwrap();
        match s.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.') {
            "Mi" => n,
            "Gi" => n * 1024.0,
            other => panic!("unexpected memory unit {other:?} in {s}"),
        }
    };
    let c = operator_container(&deployment(&render_ok(&[])));
    let res = c.resources.unwrap();
    let request = mib(&res.requests.unwrap()["memory"]);
    let limit = mib(&res.limits.unwrap()["memory"]);
    assert!(
        request >= 65.0 * 1.25,
        "request {request} Mi fits 1,000 bindings with headroom"
    );
    assert!(
        limit >= 400.0 * 1.25,
        "limit {limit} Mi fits 10,000 bindings / 1M keys with headroom"
    );
}
