//! The chart's documentation cannot drift: its README lists every value of
//! values.yaml with its default, `helm lint --strict` passes with every
//! option on, and Chart.yaml's Artifact Hub annotations are well-formed and
//! name the CRDs the chart ships.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{chart::EVERYTHING_ON, chart_dir, parse_documents, run_helm};

/// values.yaml as JSON.
fn values() -> Value {
    let text = std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap();
    parse_documents(&text).remove(0)
}

/// Every path of `v`: maps with keys are inner nodes, anything else
/// (a scalar, a list, an empty map) is a leaf. (path, value, is_leaf).
fn paths(v: &Value, prefix: &str, out: &mut Vec<(String, Value, bool)>) {
    let Value::Object(map) = v else { return };
    for (k, child) in map {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let leaf = !matches!(child, Value::Object(m) if !m.is_empty());
        out.push((path.clone(), child.clone(), leaf));
        if !leaf {
            paths(child, &path, out);
        }
    }
}

/// How the README writes a leaf's default.
fn shown(v: &Value) -> String {
    let inner = match v {
        Value::String(s) if s.is_empty() => "\"\"".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let items: Vec<String> = items
                .iter()
                .map(|i| match i {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(m) if m.is_empty() => "{}".to_owned(),
        other => other.to_string(),
    };
    format!("`{inner}`")
}

/// The README's value rows (under `## Values`): key -> default cell.
fn readme_rows() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(chart_dir().join("README.md")).unwrap();
    let section = text
        .split("\n## ")
        .find(|s| s.starts_with("Values\n"))
        .expect("a `## Values` section");
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let key = cells[0]
            .trim_start_matches("| ")
            .trim_matches('`')
            .to_owned();
        assert!(cells.len() >= 3, "row {key}: Value | Default | Meaning");
        let previous = rows.insert(key.clone(), cells[1].trim().to_owned());
        assert!(previous.is_none(), "two rows for {key}");
    }
    rows
}

#[test]
fn chart_readme_lists_every_value_with_its_default() {
    let mut all = Vec::new();
    paths(&values(), "", &mut all);
    let rows = readme_rows();
    let known: BTreeMap<&str, (&Value, bool)> = all
        .iter()
        .map(|(p, v, leaf)| (p.as_str(), (v, *leaf)))
        .collect();

    let stale: Vec<&String> = rows
        .keys()
        .filter(|k| !known.contains_key(k.as_str()))
        .collect();
    assert!(
        stale.is_empty(),
        "README rows for values that values.yaml does not have: {stale:?}"
    );

    let mut problems = Vec::new();
    for (path, value, leaf) in &all {
        if !leaf {
            continue;
        }
        // A leaf is documented by its own row or by one row of an ancestor
        // (e.g. `resources` for `resources.requests.cpu`).
        let covering: Vec<&String> = rows
            .keys()
            .filter(|k| path == *k || path.starts_with(&format!("{k}.")))
            .collect();
        match covering.as_slice() {
            [] => problems.push(format!("{path}: no README row")),
            [one] if *one == path => {
                if rows[path.as_str()] != shown(value) {
                    problems.push(format!(
                        "{path}: README default {} but values.yaml has {}",
                        rows[path.as_str()],
                        shown(value)
                    ));
                }
            }
            [_] => {}
            many => problems.push(format!("{path}: several rows {many:?}")),
        }
    }
    assert!(
        problems.is_empty(),
        "charts/slipstream/README.md drifted from values.yaml:\n{}",
        problems.join("\n")
    );
}

#[test]
fn chart_passes_helm_lint_strict_with_every_option_on() {
    let chart = chart_dir();
    let mut args = vec!["lint", "--strict", chart.to_str().unwrap()];
    let more = [
        "prometheusRule.enabled=true",
        "grafanaDashboard.enabled=true",
        "watchNamespace=shop",
        "extraArgs[0]=--coalesce=100ms",
        "commonLabels.team=platform",
    ];
    for s in EVERYTHING_ON.iter().chain(&more) {
        args.extend(["--set", s]);
    }
    let out = run_helm(&args).unwrap_or_else(|e| panic!("helm lint failed: {e}"));
    assert!(out.contains("0 chart(s) failed"), "{out}");
    // Strict lint treats warnings as failures; INFO lines are only advice.
    assert!(
        !out.contains("[WARNING]") && !out.contains("[ERROR]"),
        "{out}"
    );
}

#[test]
fn chart_yaml_carries_artifact_hub_annotations() {
    let text = std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap();
    let chart = parse_documents(&text).remove(0);
    let cargo = std::fs::read_to_string(crate::root().join("Cargo.toml")).unwrap();
    let license = cargo
        .lines()
        .find_map(|l| l.strip_prefix("license = "))
        .unwrap()
        .trim_matches('"');
    let a = &chart["annotations"];
    assert_eq!(a["artifacthub.io/license"], license, "the crate's license");
    assert_eq!(a["artifacthub.io/operator"], "true");
    // The YAML-in-a-string annotations parse, and the CRD list is what crds/ holds.
    let list = |key: &str| -> Vec<Value> {
        let s = a[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} is a string"));
        match parse_documents(s).remove(0) {
            Value::Array(items) => items,
            other => panic!("{key} is a YAML list, got {other}"),
        }
    };
    let crd_dir = chart_dir().join("crds");
    let mut shipped = Vec::new();
    for entry in std::fs::read_dir(&crd_dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for crd in parse_documents(&text) {
            shipped.push((
                crd["spec"]["names"]["kind"].as_str().unwrap().to_owned(),
                crd["spec"]["versions"][0]["name"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            ));
        }
    }
    let listed: Vec<(String, String)> = list("artifacthub.io/crds")
        .iter()
        .map(|c| {
            assert!(c["description"].is_string() && c["displayName"].is_string());
            (
                c["kind"].as_str().unwrap().to_owned(),
                c["version"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(listed, shipped);
    for example in list("artifacthub.io/crdsExamples") {
        assert!(shipped.iter().any(|(k, _)| example["kind"] == k.as_str()));
    }
    for link in list("artifacthub.io/links") {
        assert!(link["name"].is_string() && link["url"].as_str().unwrap().starts_with("https://"));
    }
    for change in list("artifacthub.io/changes") {
        let kind = change["kind"].as_str().unwrap();
        assert!(
            [
                "added",
                "changed",
                "deprecated",
                "removed",
                "fixed",
                "security"
            ]
            .contains(&kind),
            "{kind}"
        );
        assert!(change["description"].is_string());
    }
}
