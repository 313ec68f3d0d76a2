//! `meta.k8s.io/v1 Table` output (what `kubectl get` asks for), with the
//! CRD's `additionalPrinterColumns` for custom resources.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::resources::ResourceDef;

/// Human age like kubectl's (`12s`, `5m`, `3h`, `2d`).
fn age(ts: &str) -> String {
    let Ok(t) = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
    else {
        return "<unknown>".into();
    };
    let secs = (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// A small JSONPath subset: `.a.b`, `.a[0]`, `.a[?(@.k=="v")].b`.
pub fn eval(obj: &Value, path: &str) -> Value {
    let mut cur = vec![obj.clone()];
    let p = path.trim().trim_start_matches('{').trim_end_matches('}');
    let mut rest = p.trim_start_matches('$');
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let key = &r[..end];
            cur = cur
                .iter()
                .map(|v| v.get(key).cloned().unwrap_or(Value::Null))
                .collect();
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else { break };
            let inner = &r[..end];
            rest = &r[end + 1..];
            if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let Some((k, v)) = filter.split_once("==") else {
                    break;
                };
                let want = v.trim().trim_matches('"').trim_matches('\'');
                cur = cur
                    .iter()
                    .flat_map(|x| x.as_array().cloned().unwrap_or_default())
                    .filter(|item| item.get(k.trim()).and_then(Value::as_str) == Some(want))
                    .collect();
            } else if let Ok(i) = inner.parse::<usize>() {
                cur = cur
                    .iter()
                    .map(|x| x.get(i).cloned().unwrap_or(Value::Null))
                    .collect();
            } else {
                break;
            }
        } else {
            break;
        }
    }
    cur.into_iter().next().unwrap_or(Value::Null)
}

fn column(name: &str, ty: &str, format: &str) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": "", "priority": 0})
}

pub fn render(res: &ResourceDef, items: &[Arc<Value>], rv: u64) -> Value {
    let mut cols = vec![column("Name", "string", "name")];
    let custom_cols: Vec<&Value> = res.printer_columns.iter().collect();
    for c in &custom_cols {
        let ty = c["type"].as_str().unwrap_or("string");
        let mut col = column(
            c["name"].as_str().unwrap_or_default(),
            if ty == "date" { "string" } else { ty },
            c["format"].as_str().unwrap_or_default(),
        );
        col["priority"] = c["priority"].clone();
        if col["priority"].is_null() {
            col["priority"] = json!(0);
        }
        cols.push(col);
    }
    let builtin_extra = match (res.group.as_str(), res.kind.as_str()) {
        ("", "ConfigMap") => Some("Data"),
        ("", "Secret") => Some("Data"),
        ("", "Namespace") => Some("Status"),
        _ => None,
    };
    if let Some(x) = builtin_extra {
        cols.push(column(
            x,
            if x == "Status" { "string" } else { "integer" },
            "",
        ));
    }
    let add_age = custom_cols.is_empty();
    if add_age {
        cols.push(column("Age", "string", ""));
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            for c in &custom_cols {
                let v = eval(o, c["jsonPath"].as_str().unwrap_or_default());
                let v = if c["type"].as_str() == Some("date") { v.as_str().map(|s| json!(age(s))).unwrap_or(Value::Null) } else { v };
                cells.push(v);
            }
            match builtin_extra {
                Some("Data") => {
                    let n = o["data"].as_object().map(|m| m.len()).unwrap_or(0) + o["binaryData"].as_object().map(|m| m.len()).unwrap_or(0);
                    cells.push(json!(n));
                }
                Some("Status") => cells.push(o["status"]["phase"].clone()),
                _ => {}
            }
            if add_age {
                cells.push(json!(age(o["metadata"]["creationTimestamp"].as_str().unwrap_or_default())));
            }
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()}, "columnDefinitions": cols, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_subset_selects_condition_status() {
        let o = json!({"status": {"conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]}, "spec": {"x": [1, 2]}});
        assert_eq!(
            eval(&o, r#".status.conditions[?(@.type=="Ready")].status"#),
            json!("True")
        );
        assert_eq!(eval(&o, ".spec.x[1]"), json!(2));
    }
}
