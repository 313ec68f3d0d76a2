//! Decoding of the Kubernetes protobuf envelope for the few kinds typed
//! client-go clients create (`kubectl create namespace|configmap|secret`):
//! `"k8s\0"` + `runtime.Unknown{typeMeta, raw}`, with `raw` a
//! `v1.Namespace`, `v1.ConfigMap` or `v1.Secret` message. Only the fields those
//! generators set are mapped; anything else is refused with 415.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

const MAGIC: &[u8] = b"k8s\0";

/// One decoded protobuf field: number and value.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(out);
        }
    }
    None
}

fn fields(buf: &[u8]) -> Option<Vec<(u64, Field<'_>)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let (num, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((num, Field::Varint(varint(buf, &mut pos)?))),
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).ok()?;
                let end = pos.checked_add(len)?;
                out.push((num, Field::Bytes(buf.get(pos..end)?)));
                pos = end;
            }
            1 => pos = pos.checked_add(8)?,
            5 => pos = pos.checked_add(4)?,
            _ => return None,
        }
    }
    Some(out)
}

fn string(b: &[u8]) -> Option<String> {
    String::from_utf8(b.to_vec()).ok()
}

/// A `map<string, V>` entry: key = field 1, value = field 2.
fn map_entry(b: &[u8]) -> Option<(String, &[u8])> {
    let mut k = None;
    let mut v: &[u8] = &[];
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(x)) => k = string(x),
            (2, Field::Bytes(x)) => v = x,
            _ => {}
        }
    }
    Some((k?, v))
}

fn b64(bytes: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn object_meta(b: &[u8]) -> Option<Value> {
    let mut m = Map::new();
    let mut labels = BTreeMap::new();
    let mut annotations = BTreeMap::new();
    let mut finalizers = Vec::new();
    for (n, f) in fields(b)? {
        let Field::Bytes(x) = f else { continue };
        // proto3 writes empty strings too; the JSON form omits them.
        if x.is_empty() && matches!(n, 1..=3) {
            continue;
        }
        match n {
            1 => {
                m.insert("name".into(), json!(string(x)?));
            }
            2 => {
                m.insert("generateName".into(), json!(string(x)?));
            }
            3 => {
                m.insert("namespace".into(), json!(string(x)?));
            }
            11 => {
                let (k, v) = map_entry(x)?;
                labels.insert(k, string(v)?);
            }
            12 => {
                let (k, v) = map_entry(x)?;
                annotations.insert(k, string(v)?);
            }
            14 => finalizers.push(string(x)?),
            _ => {}
        }
    }
    if !labels.is_empty() {
        m.insert("labels".into(), json!(labels));
    }
    if !annotations.is_empty() {
        m.insert("annotations".into(), json!(annotations));
    }
    if !finalizers.is_empty() {
        m.insert("finalizers".into(), json!(finalizers));
    }
    Some(Value::Object(m))
}

/// Decodes a protobuf request body into the JSON object it stands for.
pub fn decode(body: &[u8]) -> Option<Value> {
    let rest = body.strip_prefix(MAGIC)?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for (n, f) in fields(rest)? {
        match (n, f) {
            (1, Field::Bytes(tm)) => {
                for (tn, tf) in fields(tm)? {
                    match (tn, tf) {
                        (1, Field::Bytes(x)) => api_version = string(x)?,
                        (2, Field::Bytes(x)) => kind = string(x)?,
                        _ => {}
                    }
                }
            }
            (2, Field::Bytes(x)) => raw = x,
            _ => {}
        }
    }
    let mut obj = json!({"apiVersion": api_version, "kind": kind});
    let mut text = BTreeMap::new();
    let mut binary = BTreeMap::new();
    for (n, f) in fields(raw)? {
        match (api_version.as_str(), kind.as_str(), n, f) {
            ("v1", _, 1, Field::Bytes(x)) => obj["metadata"] = object_meta(x)?,
            ("v1", "ConfigMap", 2, Field::Bytes(x)) => {
                let (k, v) = map_entry(x)?;
                text.insert(k, json!(string(v)?));
            }
            ("v1", "ConfigMap", 3, Field::Bytes(x)) | ("v1", "Secret", 2, Field::Bytes(x)) => {
                let (k, v) = map_entry(x)?;
                binary.insert(k, json!(b64(v)));
            }
            ("v1", "ConfigMap", 4, Field::Varint(v)) | ("v1", "Secret", 5, Field::Varint(v)) => {
                obj["immutable"] = json!(v != 0)
            }
            ("v1", "Secret", 3, Field::Bytes(x)) => obj["type"] = json!(string(x)?),
            ("v1", "Secret", 4, Field::Bytes(x)) => {
                let (k, v) = map_entry(x)?;
                text.insert(k, json!(string(v)?));
            }
            ("v1", "Namespace", _, _) => {}
            _ => {}
        }
    }
    if !matches!(
        (api_version.as_str(), kind.as_str()),
        ("v1", "ConfigMap" | "Secret" | "Namespace")
    ) {
        return None;
    }
    match kind.as_str() {
        "ConfigMap" => {
            if !text.is_empty() {
                obj["data"] = json!(text);
            }
            if !binary.is_empty() {
                obj["binaryData"] = json!(binary);
            }
        }
        "Secret" => {
            if !binary.is_empty() {
                obj["data"] = json!(binary);
            }
            if !text.is_empty() {
                obj["stringData"] = json!(text);
            }
        }
        _ => {}
    }
    Some(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(num: u64, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![(num << 3 | 2) as u8, bytes.len() as u8];
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn configmap_envelope_decodes_to_json() {
        let meta = ld(1, b"web");
        let entry = [ld(1, b"k"), ld(2, b"v")].concat();
        let bin = [ld(1, b"b"), ld(2, b"hi")].concat();
        let raw = [ld(1, &meta), ld(2, &entry), ld(3, &bin)].concat();
        let tm = [ld(1, b"v1"), ld(2, b"ConfigMap")].concat();
        let body = [MAGIC.to_vec(), ld(1, &tm), ld(2, &raw)].concat();
        let v = decode(&body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web"}, "data": {"k": "v"}, "binaryData": {"b": "aGk="}})
        );
    }
}
