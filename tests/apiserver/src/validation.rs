//! Validation with the messages of kube-apiserver: object names (DNS-1123),
//! labels, ConfigMap/Secret keys and size, and custom resources against their
//! CRD's structural `openAPIV3Schema` (pruning and defaulting first, as the
//! real server does).

use std::sync::OnceLock;

use regex::Regex;
use serde_json::{Map, Value};

use crate::{errors::Cause, resources::ResourceDef};

/// ConfigMap and Secret size limit (`core.MaxSecretSize`).
pub const MAX_CONFIG_SIZE: usize = 1024 * 1024;

fn re(cell: &'static OnceLock<Option<Regex>>, pat: &str) -> Option<&'static Regex> {
    cell.get_or_init(|| Regex::new(pat).ok()).as_ref()
}

fn matches(cell: &'static OnceLock<Option<Regex>>, pat: &str, s: &str) -> bool {
    re(cell, pat).is_some_and(|r| r.is_match(s))
}

const DNS1123_SUBDOMAIN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
const DNS1123_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
const CONFIG_KEY: &str = r"^[-._a-zA-Z0-9]+$";
const LABEL_VALUE: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";
const QUALIFIED_NAME: &str = r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$";

pub fn dns1123_subdomain(field: &str, name: &str) -> Vec<Cause> {
    static R: OnceLock<Option<Regex>> = OnceLock::new();
    let v = Value::String(name.to_string());
    let mut out = Vec::new();
    if name.len() > 253 {
        out.push(Cause::invalid(
            field,
            &v,
            "must be no more than 253 characters",
        ));
    }
    if !matches(&R, DNS1123_SUBDOMAIN, name) {
        out.push(Cause::invalid(field, &v, "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"));
    }
    out
}

pub fn dns1123_label(field: &str, name: &str) -> Vec<Cause> {
    static R: OnceLock<Option<Regex>> = OnceLock::new();
    static SUB: OnceLock<Option<Regex>> = OnceLock::new();
    let v = Value::String(name.to_string());
    let mut out = Vec::new();
    if name.len() > 63 {
        out.push(Cause::invalid(
            field,
            &v,
            "must be no more than 63 characters",
        ));
    }
    if !matches(&R, DNS1123_LABEL, name) && matches(&SUB, DNS1123_SUBDOMAIN, name) {
        // A valid subdomain that is no label: the length was checked, so it is the dots.
        out.push(Cause::invalid(field, &v, "must not contain dots"));
    } else if !matches(&R, DNS1123_LABEL, name) {
        out.push(Cause::invalid(field, &v, "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"));
    }
    out
}

fn qualified_name(field: &str, key: &str) -> Vec<Cause> {
    static R: OnceLock<Option<Regex>> = OnceLock::new();
    let v = Value::String(key.to_string());
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let mut out = Vec::new();
    if let Some(p) = prefix {
        if p.is_empty() {
            out.push(Cause::invalid(field, &v, "prefix part must be non-empty"));
        } else {
            out.extend(dns1123_subdomain(field, p).into_iter().map(|mut c| {
                c.message = format!(
                    "Invalid value: {}: prefix part {}",
                    crate::errors::render_value(&v),
                    c.message.split_once(": ").map(|x| x.1).unwrap_or_default()
                );
                c
            }));
        }
    }
    if name.is_empty() || name.len() > 63 || !matches(&R, QUALIFIED_NAME, name) {
        out.push(Cause::invalid(field, &v, "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') and be no more than 63 characters"));
    }
    out
}

/// Object metadata rules shared by every kind: name, labels, annotation keys.
pub fn validate_meta(res: &ResourceDef, obj: &Value) -> Vec<Cause> {
    let meta = &obj["metadata"];
    let mut out = Vec::new();
    let name = meta["name"].as_str().unwrap_or_default();
    if name.is_empty() {
        out.push(Cause::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else if res.kind == "Namespace" {
        out.extend(dns1123_label("metadata.name", name));
    } else if !res.custom && res.kind != "Event" {
        out.extend(dns1123_subdomain("metadata.name", name));
    } else if res.custom {
        // CRDs validate names as DNS-1123 subdomains too (unless overridden by a webhook).
        out.extend(dns1123_subdomain("metadata.name", name));
    }
    static LV: OnceLock<Option<Regex>> = OnceLock::new();
    if let Some(labels) = meta["labels"].as_object() {
        for (k, v) in labels {
            out.extend(qualified_name("metadata.labels", k));
            let s = v.as_str().unwrap_or_default();
            if s.len() > 63 {
                out.push(Cause::invalid(
                    "metadata.labels",
                    v,
                    "must be no more than 63 characters",
                ));
            } else if !matches(&LV, LABEL_VALUE, s) {
                out.push(Cause::invalid("metadata.labels", v, "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"));
            }
        }
    }
    if let Some(ann) = meta["annotations"].as_object() {
        let mut total = 0;
        for (k, v) in ann {
            out.extend(qualified_name("metadata.annotations", k));
            total += k.len() + v.as_str().map(str::len).unwrap_or(0);
        }
        if total > 256 * 1024 {
            out.push(Cause::too_long("metadata.annotations", 256 * 1024, "bytes"));
        }
    }
    out
}

fn config_key(field: &str, key: &str) -> Vec<Cause> {
    static R: OnceLock<Option<Regex>> = OnceLock::new();
    let v = Value::String(key.to_string());
    let f = format!("{field}[{key}]");
    let mut out = Vec::new();
    if key.len() > 253 {
        out.push(Cause::invalid(
            &f,
            &v,
            "must be no more than 253 characters",
        ));
    }
    if !matches(&R, CONFIG_KEY, key) {
        out.push(Cause::invalid(&f, &v, "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"));
    }
    out
}

fn b64_decoded_len(s: &str) -> Option<usize> {
    let t = s.trim_end_matches('=');
    if !s.len().is_multiple_of(4)
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    {
        return None;
    }
    Some(t.len() * 3 / 4)
}

/// ConfigMap (`data`, `binaryData`) and Secret (`data`, `stringData`) rules.
/// The 1 MiB limit counts values only, not keys (like kube-apiserver).
pub fn validate_config(res: &ResourceDef, obj: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    let mut total = 0usize;
    let (text_field, bin_field) = match res.kind.as_str() {
        "ConfigMap" if res.group.is_empty() => ("data", "binaryData"),
        "Secret" if res.group.is_empty() => ("stringData", "data"),
        _ => return out,
    };
    let text = obj[text_field].as_object();
    let bin = obj[bin_field].as_object();
    for (k, v) in text.into_iter().flatten() {
        out.extend(config_key(text_field, k));
        match v.as_str() {
            Some(s) => total += s.len(),
            None => out.push(Cause::type_invalid(
                &format!("{text_field}[{k}]"),
                v,
                "must be a string",
            )),
        }
    }
    for (k, v) in bin.into_iter().flatten() {
        out.extend(config_key(bin_field, k));
        if res.kind == "ConfigMap" && text.is_some_and(|t| t.contains_key(k)) {
            out.push(Cause::invalid(
                &format!("data[{k}]"),
                &Value::String(k.clone()),
                "duplicate of key present in binaryData",
            ));
        }
        match v.as_str().and_then(b64_decoded_len) {
            Some(n) => total += n,
            None => out.push(Cause::invalid(
                &format!("{bin_field}[{k}]"),
                v,
                "must be base64-encoded bytes",
            )),
        }
    }
    if total > MAX_CONFIG_SIZE {
        // The real server names the whole ConfigMap `[]`, and a Secret's `data`.
        let field = if res.kind == "ConfigMap" {
            "[]"
        } else {
            "data"
        };
        out.push(Cause::too_long(field, MAX_CONFIG_SIZE, "bytes"));
    }
    out
}

/// CRD objects: the name must be `<plural>.<group>`, names and versions present.
pub fn validate_crd(obj: &Value) -> Vec<Cause> {
    let spec = &obj["spec"];
    let mut out = Vec::new();
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    if group.is_empty() {
        out.push(Cause::required("spec.group", ""));
    }
    if plural.is_empty() {
        out.push(Cause::required("spec.names.plural", ""));
    }
    if spec["names"]["kind"]
        .as_str()
        .unwrap_or_default()
        .is_empty()
    {
        out.push(Cause::required("spec.names.kind", ""));
    }
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        out.push(Cause::invalid(
            "metadata.name",
            &obj["metadata"]["name"],
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    match spec["scope"].as_str() {
        Some("Namespaced") | Some("Cluster") => {}
        _ => out.push(Cause::not_supported(
            "spec.scope",
            &spec["scope"],
            &[Value::from("Cluster"), Value::from("Namespaced")],
        )),
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty()
        || versions
            .iter()
            .filter(|v| v["storage"].as_bool() == Some(true))
            .count()
            != 1
    {
        out.push(Cause::invalid(
            "spec.versions",
            &spec["versions"],
            "must have exactly one version marked as storage version",
        ));
    }
    out
}

fn preserves_unknown(s: &Value) -> bool {
    s.get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

fn join_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Removes fields the schema does not know (recording their paths) and applies `default`s.
pub fn prune_and_default(v: &mut Value, s: &Value, path: &str, pruned: &mut Vec<String>) {
    if s.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true) {
        return;
    }
    match v {
        Value::Object(m) => {
            let props = s.get("properties").and_then(Value::as_object);
            let additional = s.get("additionalProperties");
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let child = props
                    .and_then(|p| p.get(&k))
                    .or(additional.filter(|a| a.is_object()));
                match child {
                    Some(cs) => {
                        if let Some(cv) = m.get_mut(&k) {
                            prune_and_default(cv, cs, &join_path(path, &k), pruned);
                        }
                    }
                    None => {
                        let keep = preserves_unknown(s)
                            || additional.and_then(Value::as_bool) == Some(true);
                        if !keep {
                            m.remove(&k);
                            pruned.push(join_path(path, &k));
                        }
                    }
                }
            }
            for (k, cs) in props.into_iter().flatten() {
                if !m.contains_key(k)
                    && let Some(d) = cs.get("default")
                {
                    let mut d = d.clone();
                    prune_and_default(&mut d, cs, &join_path(path, k), &mut Vec::new());
                    m.insert(k.clone(), d);
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = s.get("items") {
                for (n, i) in items.iter_mut().enumerate() {
                    prune_and_default(i, is, &format!("{path}[{n}]"), pruned);
                }
            }
        }
        _ => {}
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Validates `v` against a structural schema node, collecting causes.
pub fn validate_schema(v: &Value, s: &Value, path: &str, out: &mut Vec<Cause>) {
    let int_or_string = s.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true);
    if v.is_null() {
        if s.get("nullable").and_then(Value::as_bool) != Some(true) && s.get("type").is_some() {
            out.push(Cause::type_invalid(
                path,
                v,
                &format!(
                    "{path} in body must be of type {}: \"null\"",
                    s["type"].as_str().unwrap_or("object")
                ),
            ));
        }
        return;
    }
    if let Some(t) = s.get("type").and_then(Value::as_str) {
        let actual = type_name(v);
        let ok = actual == t
            || (t == "number" && actual == "integer")
            || (int_or_string && (actual == "integer" || actual == "string"));
        if !ok {
            out.push(Cause::type_invalid(
                path,
                v,
                &format!("{path} in body must be of type {t}: \"{actual}\""),
            ));
            return;
        }
    }
    if let Some(allowed) = s.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        out.push(Cause::not_supported(path, v, allowed));
    }
    match v {
        Value::String(st) => {
            let n = st.chars().count();
            if let Some(max) = s.get("maxLength").and_then(Value::as_u64)
                && n as u64 > max
            {
                out.push(Cause::too_long(path, max as usize, "bytes"));
            }
            if let Some(min) = s.get("minLength").and_then(Value::as_u64)
                && (n as u64) < min
            {
                out.push(Cause::invalid(
                    path,
                    v,
                    &format!("{path} in body should be at least {min} chars long"),
                ));
            }
            if let Some(p) = s.get("pattern").and_then(Value::as_str) {
                match Regex::new(p) {
                    Ok(r) if !r.is_match(st) => out.push(Cause::invalid(
                        path,
                        v,
                        &format!("{path} in body should match '{p}'"),
                    )),
                    Ok(_) => {}
                    Err(_) => out.push(Cause::invalid(
                        path,
                        v,
                        &format!("pattern '{p}' is not a valid regular expression"),
                    )),
                }
            }
        }
        Value::Number(num) => {
            let x = num.as_f64().unwrap_or(0.0);
            let excl_min = s.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true);
            let excl_max = s.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true);
            if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
                if excl_min && x <= min {
                    out.push(Cause::invalid(
                        path,
                        v,
                        &format!("{path} in body should be greater than {}", s["minimum"]),
                    ));
                } else if x < min {
                    out.push(Cause::invalid(
                        path,
                        v,
                        &format!(
                            "{path} in body should be greater than or equal to {}",
                            s["minimum"]
                        ),
                    ));
                }
            }
            if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
                if excl_max && x >= max {
                    out.push(Cause::invalid(
                        path,
                        v,
                        &format!("{path} in body should be less than {}", s["maximum"]),
                    ));
                } else if x > max {
                    out.push(Cause::invalid(
                        path,
                        v,
                        &format!(
                            "{path} in body should be less than or equal to {}",
                            s["maximum"]
                        ),
                    ));
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = s.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                out.push(Cause::too_many(path, items.len(), max as usize));
            }
            if let Some(min) = s.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                out.push(Cause::invalid(
                    path,
                    v,
                    &format!("{path} in body should have at least {min} items"),
                ));
            }
            if let Some(is) = s.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate_schema(item, is, &format!("{path}[{i}]"), out);
                }
            }
            if s.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set") {
                for (i, item) in items.iter().enumerate() {
                    if items[..i].contains(item) {
                        out.push(Cause::duplicate(&format!("{path}[{i}]"), item));
                    }
                }
            }
        }
        Value::Object(m) => validate_object(m, s, path, out),
        _ => {}
    }
}

fn validate_object(m: &Map<String, Value>, s: &Value, path: &str, out: &mut Vec<Cause>) {
    for r in s
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(k) = r.as_str()
            && !m.contains_key(k)
        {
            out.push(Cause::required(&join(path, k), ""));
        }
    }
    if let Some(max) = s.get("maxProperties").and_then(Value::as_u64)
        && m.len() as u64 > max
    {
        out.push(Cause::too_many(path, m.len(), max as usize));
    }
    let props = s.get("properties").and_then(Value::as_object);
    for (k, cv) in m {
        let child = props
            .and_then(|p| p.get(k))
            .or(s.get("additionalProperties").filter(|a| a.is_object()));
        if let Some(cs) = child {
            validate_schema(cv, cs, &join(path, k), out);
        }
    }
}

/// Fields of a custom resource's `obj` its schema does not declare (what a
/// create would prune), as `spec.x` paths. `apiVersion`, `kind` and
/// `metadata` are the server's.
pub fn undeclared_fields(res: &ResourceDef, obj: &Value) -> Vec<String> {
    let mut copy = obj.clone();
    let mut pruned = Vec::new();
    validate_custom(res, &mut copy, &mut pruned);
    pruned
}

/// Events: the namespace of the object an event is about (core/v1
/// `involvedObject`, events.k8s.io/v1 `regarding`). Without an `eventTime`
/// (old clients) it must be the event's own, or empty in `default`; with
/// one, it may be empty only in `default` and `kube-system`.
pub fn validate_event(res: &ResourceDef, obj: &Value) -> Vec<Cause> {
    let about = match (res.kind.as_str(), res.group.as_str()) {
        ("Event", "") => "involvedObject",
        ("Event", "events.k8s.io") => "regarding",
        _ => return Vec::new(),
    };
    let event_ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
    let involved = obj[about]["namespace"].as_str().unwrap_or_default();
    let ok = match (obj["eventTime"].is_null(), involved.is_empty()) {
        (true, true) => matches!(event_ns, "" | "default"),
        (true, false) => involved == event_ns,
        (false, true) => matches!(event_ns, "" | "default" | "kube-system"),
        (false, false) => true,
    };
    if ok {
        return Vec::new();
    }
    vec![Cause::invalid(
        "involvedObject.namespace",
        &Value::String(involved.to_string()),
        "does not match event.namespace",
    )]
}

/// Custom resource: prune, default, then validate against the version's schema.
/// `metadata`, `apiVersion` and `kind` are the server's, never pruned. Pruned
/// field paths are appended to `pruned` (strict field validation rejects them).
pub fn validate_custom(res: &ResourceDef, obj: &mut Value, pruned: &mut Vec<String>) -> Vec<Cause> {
    let Some(schema) = res.schema.as_ref() else {
        return Vec::new();
    };
    let Some(m) = obj.as_object_mut() else {
        return Vec::new();
    };
    let keep: Vec<(String, Value)> = ["apiVersion", "kind", "metadata"]
        .iter()
        .filter_map(|k| m.remove(*k).map(|v| (k.to_string(), v)))
        .collect();
    let mut body = Value::Object(std::mem::take(m));
    let mut schema_no_meta = schema.clone();
    if let Some(p) = schema_no_meta
        .get_mut("properties")
        .and_then(Value::as_object_mut)
    {
        for k in ["apiVersion", "kind", "metadata"] {
            p.remove(k);
        }
    }
    if let Some(r) = schema_no_meta
        .get_mut("required")
        .and_then(Value::as_array_mut)
    {
        r.retain(|k| !matches!(k.as_str(), Some("apiVersion" | "kind" | "metadata")));
    }
    prune_and_default(&mut body, &schema_no_meta, "", pruned);
    let mut out = Vec::new();
    validate_schema(&body, &schema_no_meta, "", &mut out);
    let Value::Object(mut bm) = body else {
        return out;
    };
    for (k, v) in keep {
        bm.insert(k, v);
    }
    *m = bm;
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn schema_rules_report_real_server_messages() {
        let s = json!({"type": "object", "required": ["a"], "properties": {
            "a": {"type": "integer", "minimum": 1, "maximum": 3},
            "b": {"type": "string", "enum": ["x", "y"]},
            "c": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3},
            "d": {"type": "array", "maxItems": 1, "items": {"type": "string"}},
            "e": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}}});
        let mut out = Vec::new();
        validate_schema(
            &json!({"a": 5, "b": "z", "c": "ABCD", "d": ["1", "2"], "e": ["x", "y", "x"]}),
            &s,
            "spec",
            &mut out,
        );
        let msgs: Vec<String> = out.iter().map(Cause::render).collect();
        assert!(
            msgs.contains(
                &"spec.a: Invalid value: 5: spec.a in body should be less than or equal to 3"
                    .to_string()
            ),
            "{msgs:?}"
        );
        assert!(
            msgs.contains(
                &"spec.b: Unsupported value: \"z\": supported values: \"x\", \"y\"".to_string()
            ),
            "{msgs:?}"
        );
        assert!(
            msgs.iter().any(|m| m.starts_with("spec.c: Too long")),
            "{msgs:?}"
        );
        assert!(msgs.iter().any(|m| m.contains("should match")), "{msgs:?}");
        assert!(
            msgs.contains(&"spec.d: Too many: 2: must have at most 1 items".to_string()),
            "{msgs:?}"
        );
        assert!(
            msgs.contains(&"spec.e[2]: Duplicate value: \"x\"".to_string()),
            "{msgs:?}"
        );
    }

    #[test]
    fn base64_length_is_decoded_length() {
        assert_eq!(b64_decoded_len("aGVsbG8="), Some(5));
        assert_eq!(b64_decoded_len("!!"), None);
    }
}
