//! The chart's optional PrometheusRule and Grafana dashboard: every rule
//! expression and dashboard query parses as PromQL and names only metrics
//! the operator exports. The exported names are found, not listed here: the
//! registrations in `src/` (`.register("name", ...)` under the registry's
//! `with_prefix`) and the `# TYPE` lines of the operator's own exposition, so
//! a metric added there counts at once and a renamed one breaks this test
//! instead of an alert.

use std::{collections::BTreeSet, path::Path};

use promql_parser::{
    parser::{Expr, parse},
    util::{ExprVisitor, walk_expr},
};
use serde_json::Value;

use slipstream::metrics::Metrics;

use crate::{
    chart::{named, one, render, render_ok},
    chart_dir, root,
};

/// The sample names a metric family `name` of unknown type may expose.
fn samples_of(name: &str) -> [String; 5] {
    ["", "_total", "_bucket", "_sum", "_count"].map(|s| format!("{name}{s}"))
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// The first string literal after `from` in `text`, if only whitespace and
/// `(` come before it.
fn first_literal(text: &str) -> Option<&str> {
    let rest = text.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
    let rest = rest.strip_prefix('"')?;
    rest.split_once('"').map(|(lit, _)| lit)
}

/// Every sample name the operator's `/metrics` can carry.
fn exported_metric_names() -> BTreeSet<String> {
    let mut sources = Vec::new();
    rust_files(&root().join("src"), &mut sources);
    let mut prefixes = BTreeSet::new();
    let mut registered = BTreeSet::new();
    for src in &sources {
        for (i, _) in src.match_indices("with_prefix(") {
            if let Some(p) = first_literal(&src[i + "with_prefix".len()..]) {
                prefixes.insert(p.to_owned());
            }
        }
        for call in [".register(", ".register_with_unit("] {
            for (i, _) in src.match_indices(call) {
                if let Some(name) = first_literal(&src[i + call.len()..]) {
                    registered.insert(name.to_owned());
                }
            }
        }
    }
    let mut names = BTreeSet::new();
    for name in &registered {
        for prefix in &prefixes {
            names.extend(samples_of(&format!("{prefix}_{name}")));
        }
    }
    // Families a collector fills (process metrics and the like) show up in
    // the exposition even before any event.
    for line in Metrics::new().encode().lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            names.extend(samples_of(rest.split_whitespace().next().unwrap()));
        }
    }
    assert!(
        prefixes.contains("slipstream") && registered.len() >= 10,
        "found the operator's registrations in src/: prefixes {prefixes:?}, names {registered:?}"
    );
    names
}

/// Metric names a PromQL expression selects.
#[derive(Default)]
struct Selected(BTreeSet<String>);

impl ExprVisitor for Selected {
    type Error = String;
    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        let vs = match expr {
            Expr::VectorSelector(vs) => vs,
            Expr::MatrixSelector(ms) => &ms.vs,
            _ => return Ok(true),
        };
        let name = vs
            .name
            .clone()
            .or_else(|| {
                vs.matchers
                    .find_matchers("__name__")
                    .first()
                    .map(|m| m.value.clone())
            })
            .ok_or_else(|| format!("a selector without a metric name: {expr}"))?;
        self.0.insert(name);
        Ok(true)
    }
}

/// Parses `expr` and returns the metric names it selects; panics naming
/// `what` on a syntax error.
fn metrics_of(what: &str, expr: &str) -> BTreeSet<String> {
    let ast = parse(expr).unwrap_or_else(|e| panic!("{what}: {expr:?} is not PromQL: {e}"));
    let mut selected = Selected::default();
    walk_expr(&mut selected, &ast).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(!selected.0.is_empty(), "{what}: {expr:?} selects no metric");
    selected.0
}

fn assert_all_exported(what: &str, names: &BTreeSet<String>, exported: &BTreeSet<String>) {
    let unknown: Vec<_> = names.difference(exported).collect();
    assert!(
        unknown.is_empty(),
        "{what} names metrics the operator does not export: {unknown:?} (exported: {exported:?})"
    );
}

#[test]
fn monitoring_objects_are_off_by_default() {
    let docs = render_ok(&[]);
    assert!(docs.iter().all(|d| d["kind"] != "PrometheusRule"));
    assert!(
        docs.iter()
            .all(|d| d["metadata"]["labels"].get("grafana_dashboard").is_none())
    );
}

#[test]
fn prometheus_rules_parse_and_name_only_exported_metrics() {
    let exported = exported_metric_names();
    let docs = render_ok(&[
        "prometheusRule.enabled=true",
        "prometheusRule.namespace=monitoring",
        "prometheusRule.labels.release=kube-prometheus-stack",
        "prometheusRule.bindingBehindFor=1h30m",
    ]);
    let rule = one(&docs, "PrometheusRule");
    assert_eq!(rule["metadata"]["namespace"], "monitoring");
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let rules: Vec<&Value> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let alerts: BTreeSet<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    for wanted in [
        "SlipstreamNoLeader",
        "SlipstreamBindingBehind",
        "SlipstreamBindingLagGrowing",
        "SlipstreamErrorsRising",
    ] {
        assert!(alerts.contains(wanted), "{wanted} in {alerts:?}");
    }
    let mut used = BTreeSet::new();
    for r in &rules {
        let alert = r["alert"].as_str().unwrap();
        let expr = r["expr"].as_str().unwrap();
        let names = metrics_of(alert, expr);
        // Scoped to this release's series: every selector names the job.
        assert_eq!(
            expr.matches("job=\"slipstream-metrics\"").count(),
            expr.matches("slipstream_").count(),
            "{alert}: every selector is scoped to the release's job: {expr}"
        );
        assert_all_exported(alert, &names, &exported);
        used.extend(names);
        let for_ = r["for"].as_str().unwrap();
        promql_parser::util::parse_duration(for_)
            .unwrap_or_else(|e| panic!("{alert}: for {for_:?}: {e}"));
        assert!(
            ["critical", "warning"].contains(&r["labels"]["severity"].as_str().unwrap()),
            "{alert}: severity"
        );
        assert!(
            r["annotations"]["summary"].is_string() && r["annotations"]["description"].is_string()
        );
    }
    assert_eq!(
        rules
            .iter()
            .find(|r| r["alert"] == "SlipstreamBindingBehind")
            .unwrap()["for"],
        "1h30m"
    );
    assert!(used.contains("slipstream_is_leader"));

    let err = render(&[
        "prometheusRule.enabled=true",
        "prometheusRule.noLeaderFor=soon",
    ])
    .expect_err("a bad rule duration is refused");
    assert!(err.contains("noLeaderFor"), "{err}");
}

/// Grafana's variables, replaced by values PromQL accepts.
fn without_grafana_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
}

#[test]
fn grafana_dashboard_is_valid_json_whose_queries_name_only_exported_metrics() {
    let exported = exported_metric_names();
    let file = std::fs::read_to_string(chart_dir().join("dashboards/slipstream.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&file).expect("the dashboard is JSON");
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6);
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");

    let mut queries: Vec<(String, String)> = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap();
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            queries.push((title.to_owned(), t["expr"].as_str().unwrap().to_owned()));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            // label_values(<selector>, label): the selector is PromQL.
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|s| s.rsplit_once(','))
                .map(|(sel, _)| sel.to_owned())
                .unwrap_or_else(|| panic!("variable query {q:?}"));
            queries.push((format!("variable {}", var["name"]), inner));
        }
    }
    let mut used = BTreeSet::new();
    for (what, expr) in &queries {
        let names = metrics_of(what, &without_grafana_variables(expr));
        assert_all_exported(what, &names, &exported);
        used.extend(names);
    }
    for core in [
        "slipstream_is_leader",
        "slipstream_binding_lag_revisions",
        "slipstream_configmap_writes_total",
        "slipstream_errors_total",
        "slipstream_propagation_seconds_bucket",
    ] {
        assert!(used.contains(core), "a panel shows {core}");
    }

    // The chart ships the file as it is, in a ConfigMap Grafana's sidecar finds.
    let docs = render_ok(&["grafanaDashboard.enabled=true"]);
    let cm = named(&docs, "ConfigMap", "slipstream-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value =
        serde_json::from_str(cm["data"]["slipstream.json"].as_str().unwrap()).unwrap();
    assert_eq!(shipped, dashboard);
}
