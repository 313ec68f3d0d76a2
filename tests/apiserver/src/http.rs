//! HTTP routing: discovery, resource paths, verbs, content types, the request
//! log and fault injection around every request.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use axum::{
    extract::{Query, State as AxState},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use serde_json::{Value, json};

use crate::{
    Shared,
    control::RequestRecord,
    errors::{ApiError, ApiResult},
    resources::ResourceDef,
    selectors::{FieldSelector, LabelSelector, Selectors},
    store::{self, DeleteOpts, PatchType, State, Stored, WriteOpts, Written, parse_body},
    watch::{self, WatchParams},
};

fn json_response(code: StatusCode, v: &Value) -> Response {
    let mut resp = (code, v.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn ok(v: &Value) -> Response {
    json_response(StatusCode::OK, v)
}

fn bytes_response(code: StatusCode, body: Bytes) -> Response {
    let mut resp = (code, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Runs CPU-heavy work (a large list) without stalling the other requests
/// queued on this runtime worker.
pub(crate) fn heavy<T>(items: usize, f: impl FnOnce() -> T) -> T {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if items > 1_000 && multi {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// A list response assembled from the stored JSON of each item.
fn list_response(res: &ResourceDef, rv: u64, cont: &str, items: &[Stored]) -> Response {
    heavy(items.len(), || {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if !cont.is_empty() {
            meta["continue"] = json!(cont);
        }
        let head = format!(
            "{{\"kind\":{},\"apiVersion\":{},\"metadata\":{meta},\"items\":[",
            json!(res.list_kind),
            json!(res.api_version())
        );
        let bodies: Vec<Bytes> = items.iter().map(|s| s.body(res)).collect();
        let size = head.len() + bodies.iter().map(|b| b.len() + 1).sum::<usize>() + 2;
        let mut buf = Vec::with_capacity(size);
        buf.extend_from_slice(head.as_bytes());
        for (i, b) in bodies.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(b);
        }
        buf.extend_from_slice(b"]}");
        bytes_response(StatusCode::OK, Bytes::from(buf))
    })
}

/// What a request is about, for routing and for the request log.
#[derive(Default, Clone)]
struct Target {
    verb: String,
    group: String,
    resource: String,
    subresource: String,
    namespace: String,
    name: String,
}

enum Route {
    Version,
    ApiVersions,
    GroupList,
    Group(String),
    ResourceList(String, String),
    Health,
    OpenApiRoot,
    OpenApi(String, String),
    Resource {
        res: Arc<ResourceDef>,
        ns: Option<String>,
        name: Option<String>,
        status: bool,
    },
    NotFound,
}

fn route(shared: &Shared, path: &str) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Route::Version,
        ["healthz"] | ["readyz"] | ["livez"] => return Route::Health,
        ["openapi", "v3"] => return Route::OpenApiRoot,
        ["openapi", "v3", "api", v] => return Route::OpenApi(String::new(), v.to_string()),
        ["openapi", "v3", "apis", g, v] => return Route::OpenApi(g.to_string(), v.to_string()),
        ["api"] => return Route::ApiVersions,
        ["apis"] => return Route::GroupList,
        ["apis", g] => return Route::Group(g.to_string()),
        ["api", v] => return Route::ResourceList(String::new(), v.to_string()),
        ["apis", g, v] => return Route::ResourceList(g.to_string(), v.to_string()),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Route::NotFound,
    };
    // The registry is replaced, never mutated: look it up outside the store lock.
    let Ok(reg) = shared.state.lock().map(|st| st.registry.clone()) else {
        return Route::NotFound;
    };
    let (ns, plural, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if reg
                .find(group, version, plural)
                .is_some_and(|r| r.namespaced) =>
        {
            (
                Some(ns.to_string()),
                *plural,
                tail.first().copied(),
                tail.get(1).copied(),
            )
        }
        [plural, tail @ ..] => (None, *plural, tail.first().copied(), tail.get(1).copied()),
        _ => return Route::NotFound,
    };
    if rest.len() > 5 {
        return Route::NotFound;
    }
    let Some(res) = reg.find(group, version, plural) else {
        return Route::NotFound;
    };
    let status = match sub {
        None => false,
        Some("status") if res.status => true,
        Some(_) => return Route::NotFound,
    };
    if ns.is_some() && !res.namespaced {
        return Route::NotFound;
    }
    Route::Resource {
        res,
        ns,
        name: name.map(str::to_string),
        status,
    }
}

/// The default field manager: the user agent up to the first `/` (as the real server).
fn default_manager(user_agent: &str) -> String {
    let m = user_agent.split('/').next().unwrap_or_default();
    if m.is_empty() {
        "unknown".to_string()
    } else {
        m.chars().take(128).collect()
    }
}

pub async fn handle(
    AxState(shared): AxState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        // Over the 3 MiB request limit (or an unreadable body): a Status, like the real server.
        Err(e) => {
            let code = e.status().as_u16();
            let reason = if code == 413 {
                "RequestEntityTooLarge"
            } else {
                "BadRequest"
            };
            return ApiError::new(
                code,
                reason,
                format!("Request entity too large: limit is 3145728 ({e})"),
            )
            .into_response();
        }
    };
    let started = Instant::now();
    let mut paused = shared.paused.subscribe();
    while *paused.borrow_and_update() {
        if paused.changed().await.is_err() {
            break;
        }
    }
    let q: HashMap<String, String> = Query::<HashMap<String, String>>::try_from_uri(&uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let path = uri.path().to_string();
    let r = route(&shared, &path);
    let mut target = Target::default();
    if let Route::Resource {
        res,
        ns,
        name,
        status,
    } = &r
    {
        target = Target {
            verb: crate::control::verb(
                method.as_str(),
                name.is_some(),
                q.get("watch").is_some_and(|w| w == "true" || w == "1"),
            )
            .to_string(),
            group: res.group.clone(),
            resource: res.plural.clone(),
            subresource: if *status {
                "status".into()
            } else {
                String::new()
            },
            namespace: ns.clone().unwrap_or_default(),
            name: name.clone().unwrap_or_default(),
        };
    } else {
        target.verb = "discovery".into();
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let patch_type = PatchType::from_content_type(&content_type);
    let is_write = matches!(
        target.verb.as_str(),
        "create" | "update" | "patch" | "delete" | "deletecollection"
    );
    let field_manager = if is_write {
        q.get("fieldManager")
            .cloned()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| {
                if patch_type == Some(PatchType::Apply) {
                    String::new()
                } else {
                    default_manager(&user_agent)
                }
            })
    } else {
        String::new()
    };
    let injected = shared.faults.take(
        &target.verb,
        &target.resource,
        &target.namespace,
        &target.name,
    );
    let resp = match injected {
        Some(code) => ApiError::injected(code).into_response(),
        None => {
            if is_write {
                let latency = shared.faults.write_latency(&target.namespace);
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
            }
            let accept = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let req = Req {
                method: &method,
                q: &q,
                body: &body,
                content_type: &content_type,
                accept: &accept,
                manager: &field_manager,
            };
            match dispatch(&shared, r, req) {
                Ok(resp) => resp,
                Err(e) => e.into_response(),
            }
        }
    };
    let record = RequestRecord {
        method: method.to_string(),
        verb: target.verb,
        path,
        query: uri.query().unwrap_or_default().to_string(),
        group: target.group,
        resource: target.resource,
        subresource: target.subresource,
        namespace: target.namespace,
        name: target.name,
        patch_type: match patch_type {
            Some(PatchType::Apply) if method == Method::PATCH => "apply",
            Some(PatchType::Merge) if method == Method::PATCH => "merge",
            Some(PatchType::Json) if method == Method::PATCH => "json",
            Some(PatchType::Strategic) if method == Method::PATCH => "strategic",
            _ => "",
        }
        .to_string(),
        field_manager,
        user_agent,
        status: resp.status().as_u16(),
        storage_writes: resp
            .extensions()
            .get::<StorageWrites>()
            .map(|w| w.0)
            .unwrap_or(0),
        timestamp: SystemTime::now(),
        duration: started.elapsed(),
    };
    shared.record(record);
    resp
}

struct Req<'a> {
    method: &'a Method,
    q: &'a HashMap<String, String>,
    body: &'a Bytes,
    content_type: &'a str,
    accept: &'a str,
    manager: &'a str,
}

fn dispatch(shared: &Arc<Shared>, r: Route, req: Req<'_>) -> ApiResult<Response> {
    let st = || {
        shared
            .state
            .lock()
            .map_err(|_| ApiError::internal("store lock poisoned"))
    };
    match r {
        Route::Version => Ok(ok(&json!({
            "major": "1", "minor": "35", "gitVersion": "v1.35.0-slipstream-emulator", "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25.0", "compiler": "gc", "platform": "linux/amd64"
        }))),
        Route::Health => Ok((StatusCode::OK, "ok").into_response()),
        Route::ApiVersions => Ok(ok(&json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}]
        }))),
        Route::GroupList => {
            let st = st()?;
            let groups: Vec<Value> = st
                .registry
                .groups()
                .iter()
                .map(|(g, vs)| st.registry.api_group(g, vs))
                .collect();
            Ok(ok(
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            ))
        }
        Route::Group(g) => {
            let st = st()?;
            let found = st
                .registry
                .groups()
                .into_iter()
                .find(|(name, _)| *name == g);
            match found {
                Some((name, vs)) => {
                    let mut v = st.registry.api_group(&name, &vs);
                    v["kind"] = json!("APIGroup");
                    v["apiVersion"] = json!("v1");
                    Ok(ok(&v))
                }
                None => Err(ApiError::path_not_found(&format!("/apis/{g}"))),
            }
        }
        Route::ResourceList(g, v) => {
            let st = st()?;
            st.registry
                .resource_list(&g, &v)
                .map(|l| ok(&l))
                .ok_or_else(|| ApiError::path_not_found(&format!("{g}/{v}")))
        }
        Route::OpenApiRoot => {
            let st = st()?;
            let mut paths = serde_json::Map::new();
            let mut gvs: Vec<(String, String)> = vec![(String::new(), "v1".to_string())];
            for (g, vs) in st.registry.groups() {
                gvs.extend(vs.into_iter().map(|v| (g.clone(), v)));
            }
            for (g, v) in gvs {
                let key = if g.is_empty() {
                    format!("api/{v}")
                } else {
                    format!("apis/{g}/{v}")
                };
                let url = format!("/openapi/v3/{key}?hash={}", st.rv);
                paths.insert(key, json!({"serverRelativeURL": url}));
            }
            Ok(ok(&json!({"paths": paths})))
        }
        Route::OpenApi(g, v) => {
            let st = st()?;
            crate::openapi::group_version_doc(&st.registry, &g, &v)
                .map(|d| ok(&d))
                .ok_or_else(|| ApiError::path_not_found("openapi"))
        }
        Route::NotFound => Err(ApiError::path_not_found("")),
        Route::Resource {
            res,
            ns,
            name,
            status,
        } => resource(shared, &res, ns, name, status, req),
    }
}

fn selectors(res: &ResourceDef, q: &HashMap<String, String>) -> ApiResult<Selectors> {
    Ok(Selectors {
        labels: LabelSelector::parse(
            q.get("labelSelector")
                .map(String::as_str)
                .unwrap_or_default(),
        )?,
        fields: FieldSelector::parse(
            q.get("fieldSelector")
                .map(String::as_str)
                .unwrap_or_default(),
            &res.kind,
        )?,
    })
}

fn write_opts(req: &Req<'_>) -> WriteOpts {
    WriteOpts {
        manager: req.manager.to_string(),
        dry_run: req.q.get("dryRun").is_some_and(|d| d == "All"),
        force: req.q.get("force").is_some_and(|f| f == "true" || f == "1"),
        strict: req.q.get("fieldValidation").is_some_and(|f| f == "Strict"),
    }
}

fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

fn resource(
    shared: &Arc<Shared>,
    res: &Arc<ResourceDef>,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
    req: Req<'_>,
) -> ApiResult<Response> {
    let nsr = ns.as_deref();
    let lock = || {
        shared
            .state
            .lock()
            .map_err(|_| ApiError::internal("store lock poisoned"))
    };
    match (req.method.as_str(), name) {
        ("GET", None) if req.q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            let sel = selectors(res, req.q)?;
            let rv = match req.q.get("resourceVersion").map(String::as_str) {
                None | Some("") => None,
                Some(s) => Some(s.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version: {s}"))
                })?),
            };
            let timeout = req
                .q
                .get("timeoutSeconds")
                .and_then(|t| t.parse::<u64>().ok())
                .map(Duration::from_secs);
            let p = WatchParams {
                resource_version: rv,
                bookmarks: req
                    .q
                    .get("allowWatchBookmarks")
                    .is_some_and(|b| b == "true" || b == "1"),
                send_initial_events: req
                    .q
                    .get("sendInitialEvents")
                    .is_some_and(|b| b == "true" || b == "1"),
                timeout,
            };
            if p.send_initial_events && !p.bookmarks {
                return Err(ApiError::invalid(
                    res,
                    "",
                    vec![crate::errors::Cause::forbidden(
                        "sendInitialEvents",
                        "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled and allowWatchBookmarks is set",
                    )],
                ));
            }
            watch::start(shared.clone(), res.clone(), ns, sel, p)
        }
        ("GET", None) => {
            let sel = selectors(res, req.q)?;
            let st = lock()?;
            let mut items = st.list(res, nsr, &sel);
            let rv = st.rv;
            drop(st);
            let mut cont = String::new();
            if let Some(c) = req.q.get("continue").filter(|c| !c.is_empty()) {
                let (cns, cname) = c
                    .split_once('/')
                    .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
                items.retain(|o| {
                    let k = (
                        o.obj["metadata"]["namespace"].as_str().unwrap_or_default(),
                        o.obj["metadata"]["name"].as_str().unwrap_or_default(),
                    );
                    k > (cns, cname)
                });
            }
            if let Some(limit) = req
                .q
                .get("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| *l > 0)
                && items.len() > limit
            {
                items.truncate(limit);
                if let Some(last) = items.last() {
                    cont = format!(
                        "{}/{}",
                        last.obj["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or_default(),
                        last.obj["metadata"]["name"].as_str().unwrap_or_default()
                    );
                }
            }
            if wants_table(req.accept) {
                let objs: Vec<_> = items.iter().map(|s| s.obj.clone()).collect();
                return Ok(ok(&crate::table::render(res, &objs, rv)));
            }
            Ok(list_response(res, rv, &cont, &items))
        }
        ("GET", Some(name)) => {
            let (o, rv) = {
                let st = lock()?;
                (st.get_stored(res, nsr, &name)?, st.rv)
            };
            if wants_table(req.accept) {
                return Ok(ok(&crate::table::render(res, &[o.obj], rv)));
            }
            Ok(bytes_response(StatusCode::OK, o.body(res)))
        }
        ("POST", None) => {
            let body = if req
                .content_type
                .starts_with("application/vnd.kubernetes.protobuf")
            {
                crate::protobuf::decode(req.body)
                    .ok_or_else(|| ApiError::unsupported_media_type(req.content_type))?
            } else {
                parse_body(req.body, true)?
            };
            let mut body = body;
            let opts = write_opts(&req);
            let name = store::name_for_create(&mut body);
            let w = store::write(&shared.state, res, nsr, &name, |v| {
                v.create(res, nsr, body.clone(), &opts)
            })?;
            Ok(written(shared, res, w))
        }
        ("PUT", Some(name)) => {
            reject_protobuf(req.content_type)?;
            let opts = write_opts(&req);
            // Parsed by each attempt (a retry is rare; a clone of every body is not).
            let w = store::write(&shared.state, res, nsr, &name, |v| {
                v.update(res, nsr, &name, status, parse_body(req.body, false)?, &opts)
            })?;
            Ok(written(shared, res, w))
        }
        ("PATCH", Some(name)) => {
            let ptype = PatchType::from_content_type(req.content_type)
                .ok_or_else(|| ApiError::unsupported_media_type(req.content_type))?;
            let opts = write_opts(&req);
            let w = store::write(&shared.state, res, nsr, &name, |v| {
                v.patch(res, nsr, &name, status, ptype, req.body, &opts)
            })?;
            Ok(written(shared, res, w))
        }
        ("DELETE", Some(name)) => {
            let opts = delete_opts(req.body, req.q)?;
            let w = store::write(&shared.state, res, nsr, &name, |v| {
                v.delete(res, nsr, &name, &opts)
            })?;
            Ok(written(shared, res, w))
        }
        ("DELETE", None) => {
            let opts = delete_opts(req.body, req.q)?;
            let sel = selectors(res, req.q)?;
            mutate(shared, |st| {
                let items = st.delete_collection(res, nsr, &sel, &opts)?;
                Ok(list_response(res, st.rv, "", &items))
            })
        }
        (m, _) => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({m})"
        ))),
    }
}

/// How many storage writes (resourceVersion increments) a request caused.
#[derive(Clone, Copy)]
pub struct StorageWrites(pub u64);

/// The answer to a write computed outside the store lock ([`store::write`]):
/// 201 when it created the object, tagged with its storage writes.
fn written(shared: &Shared, res: &ResourceDef, w: Written) -> Response {
    let code = if w.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut resp = bytes_response(code, w.stored.body(res));
    resp.extensions_mut().insert(StorageWrites(w.writes));
    if w.gc {
        shared.gc.notify_one();
    }
    resp
}

/// Runs a write under the store lock and tags the response with its storage writes.
fn mutate(
    shared: &Shared,
    f: impl FnOnce(&mut State) -> ApiResult<Response>,
) -> ApiResult<Response> {
    let mut st = shared
        .state
        .lock()
        .map_err(|_| ApiError::internal("store lock poisoned"))?;
    let before = st.rv;
    let mut resp = f(&mut st)?;
    resp.extensions_mut().insert(StorageWrites(st.rv - before));
    let gc = st.gc_dirty;
    let trash = std::mem::take(&mut st.trash);
    drop(st);
    drop(trash);
    if gc {
        shared.gc.notify_one();
    }
    Ok(resp)
}

/// Protobuf bodies (typed client-go clients such as `kubectl create configmap`)
/// are not decoded; the answer is the 415 a server without that codec gives.
fn reject_protobuf(content_type: &str) -> ApiResult<()> {
    if content_type.starts_with("application/vnd.kubernetes.protobuf")
        || content_type.starts_with("application/cbor")
    {
        return Err(ApiError::unsupported_media_type(content_type));
    }
    Ok(())
}

fn delete_opts(body: &Bytes, q: &HashMap<String, String>) -> ApiResult<DeleteOpts> {
    let b = if body.is_empty() {
        json!({})
    } else {
        parse_body(body, false)?
    };
    let pick = |k: &str| {
        b[k].as_str()
            .map(str::to_string)
            .or_else(|| q.get(k).cloned())
    };
    Ok(DeleteOpts {
        propagation: pick("propagationPolicy").or_else(|| match b["orphanDependents"].as_bool() {
            Some(true) => Some("Orphan".into()),
            _ => None,
        }),
        uid: b["preconditions"]["uid"].as_str().map(str::to_string),
        resource_version: b["preconditions"]["resourceVersion"]
            .as_str()
            .map(str::to_string),
        dry_run: b["dryRun"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == "All"))
            || q.get("dryRun").is_some_and(|d| d == "All"),
    })
}
