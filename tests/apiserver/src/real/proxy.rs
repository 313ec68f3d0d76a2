//! A fault-injecting HTTP proxy in front of the real kube-apiserver, so the
//! tests that need the emulator's faults (409, 429 with Retry-After, 500,
//! write latency, closed watch streams) also run against the real server.
//! It serves plain HTTP on loopback and forwards every request as the admin
//! user; it records each request like the emulator's request log.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    body::Body,
    extract::{Request, State},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use http::{HeaderMap, Method, header};
use tokio::sync::watch;

use crate::{ApiError, Counters, Error, FaultRule, RequestRecord, control::FaultSet};

pub(crate) struct ProxyShared {
    upstream: kube::Client,
    faults: FaultSet,
    /// Bumped to end watches: all of them (`None`) or one namespace's.
    close_watches: watch::Sender<(u64, Option<String>)>,
    log: Mutex<Vec<RequestRecord>>,
}

/// Handle for the proxy's faults and request log (the same calls as the
/// emulator's [`crate::Faults`] where the real server allows them).
#[derive(Clone)]
pub struct ProxyFaults {
    shared: Arc<ProxyShared>,
}

impl ProxyFaults {
    /// Fails the next `count` requests of any kind with `code`.
    pub fn fail_next(&self, count: usize, code: u16) {
        self.add(FaultRule::new(code, count));
    }

    /// Fails the next requests matching `rule` (a 429 carries `Retry-After: 1`).
    pub fn add(&self, rule: FaultRule) {
        self.shared.faults.add(rule);
    }

    pub fn clear(&self) {
        self.shared.faults.clear();
    }

    /// Removes the rules scoped to `namespace`.
    pub fn clear_in(&self, namespace: &str) {
        self.shared.faults.clear_in(namespace);
    }

    /// Delay before every write is forwarded.
    pub fn set_write_latency(&self, latency: Duration) {
        self.shared.faults.set_write_latency(latency);
    }

    /// Delay before every write to `namespace` is forwarded (other
    /// namespaces, other tests of the binary, keep theirs).
    pub fn set_write_latency_in(&self, namespace: &str, latency: Duration) {
        self.shared.faults.set_write_latency_in(namespace, latency);
    }

    /// Ends every watch stream open through the proxy (clients re-watch).
    pub fn close_watches(&self) {
        self.shared
            .close_watches
            .send_modify(|(g, ns)| (*g, *ns) = (*g + 1, None));
    }

    /// Ends the watch streams of one namespace only.
    pub fn close_watches_in(&self, namespace: &str) {
        self.shared
            .close_watches
            .send_modify(|(g, ns)| (*g, *ns) = (*g + 1, Some(namespace.to_string())));
    }

    /// A copy of the request log, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared
            .log
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    pub fn clear_requests(&self) {
        if let Ok(mut l) = self.shared.log.lock() {
            l.clear();
        }
    }

    /// Request counts. `storage_writes` stays 0: only the emulator knows
    /// whether a write reached storage (on the real server compare
    /// resourceVersions instead).
    pub fn counters(&self) -> Counters {
        Counters::from_log(&self.requests())
    }
}

/// The parts of a request path that fault rules and the log use.
#[derive(Default, Debug, PartialEq)]
pub(crate) struct Target {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

/// Parses `/api/v1/...` and `/apis/{group}/{version}/...` like the real
/// server's RequestInfo; anything else is `discovery`.
pub(crate) fn target(method: &Method, path: &str, query: &str) -> Target {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest) = match segs.as_slice() {
        ["api", _v, rest @ ..] => ("", rest),
        ["apis", g, _v, rest @ ..] => (*g, rest),
        _ => ("", &[][..]),
    };
    if rest.is_empty() {
        return Target {
            verb: "discovery".into(),
            ..Target::default()
        };
    }
    let (namespace, rest) = match rest {
        ["namespaces", ns, r @ ..] if !r.is_empty() => (*ns, r),
        r => ("", r),
    };
    let (resource, name, subresource) = match rest {
        [res] => (*res, "", ""),
        [res, name] => (*res, *name, ""),
        [res, name, sub, ..] => (*res, *name, *sub),
        [] => ("", "", ""),
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = crate::control::verb(method.as_str(), !name.is_empty(), watch);
    Target {
        verb: verb.into(),
        group: group.into(),
        resource: resource.into(),
        subresource: subresource.into(),
        namespace: namespace.into(),
        name: name.into(),
    }
}

const HOP_BY_HOP: [header::HeaderName; 5] = [
    header::HOST,
    header::CONNECTION,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::AUTHORIZATION,
];

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if !HOP_BY_HOP.contains(k) {
            to.append(k.clone(), v.clone());
        }
    }
}

async fn forward(State(shared): State<Arc<ProxyShared>>, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or_default().to_string();
    let t = target(&parts.method, &path, &query);
    let header = |h: header::HeaderName| {
        parts
            .headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let user_agent = header(header::USER_AGENT);
    let content_type = header(header::CONTENT_TYPE);
    let field_manager = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("fieldManager="))
        .unwrap_or_default()
        .to_string();
    let patch_type = match content_type.as_str() {
        "application/apply-patch+yaml" => "apply",
        "application/merge-patch+json" => "merge",
        "application/json-patch+json" => "json",
        "application/strategic-merge-patch+json" => "strategic",
        _ => "",
    };
    let mut record = RequestRecord {
        method: parts.method.to_string(),
        verb: t.verb.clone(),
        path: path.clone(),
        query: query.clone(),
        group: t.group.clone(),
        resource: t.resource.clone(),
        subresource: t.subresource.clone(),
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        patch_type: if parts.method == Method::PATCH {
            patch_type.into()
        } else {
            String::new()
        },
        field_manager,
        user_agent,
        status: 0,
        storage_writes: 0,
        timestamp: SystemTime::now(),
        duration: Duration::ZERO,
    };
    let resp = match shared
        .faults
        .take(&t.verb, &t.resource, &t.namespace, &t.name)
    {
        Some(code) => ApiError::injected(code).into_response(),
        None => {
            if record.is_write() {
                let latency = shared.faults.write_latency(&t.namespace);
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
            }
            let watch = (t.verb == "watch").then(|| t.namespace.clone());
            send(&shared, parts, body, watch).await
        }
    };
    record.status = resp.status().as_u16();
    record.duration = started.elapsed();
    // Like the emulator's log: the time the answer was ready, so
    // `timestamp - duration` is when the request arrived.
    record.timestamp = SystemTime::now();
    if let Ok(mut log) = shared.log.lock() {
        log.push(record);
    }
    resp
}

async fn send(
    shared: &ProxyShared,
    parts: http::request::Parts,
    body: Body,
    watch: Option<String>,
) -> Response {
    let bytes = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return ApiError::new(400, "BadRequest", e.to_string()).into_response(),
    };
    let uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut up = http::Request::builder()
        .method(parts.method.clone())
        .uri(uri);
    if let Some(h) = up.headers_mut() {
        copy_headers(&parts.headers, h);
    }
    let up = match up.body(kube::client::Body::from(bytes.to_vec())) {
        Ok(r) => r,
        Err(e) => return ApiError::new(400, "BadRequest", e.to_string()).into_response(),
    };
    let answer = match shared.upstream.send(up).await {
        Ok(a) => a,
        Err(e) => {
            return ApiError::new(502, "InternalError", format!("proxy: {e}")).into_response();
        }
    };
    let (up_parts, up_body) = answer.into_parts();
    let mut out = Response::builder().status(up_parts.status);
    if let Some(h) = out.headers_mut() {
        copy_headers(&up_parts.headers, h);
    }
    let body = if let Some(namespace) = watch {
        // A watch ends when its namespace's watches are closed, like a dropped connection.
        let mut closed = shared.close_watches.subscribe();
        closed.mark_unchanged();
        let stream = http_body_util::BodyDataStream::new(up_body)
            .take_until(async move {
                while closed.changed().await.is_ok() {
                    let target = closed.borrow_and_update().1.clone();
                    if target.is_none_or(|t| t == namespace) {
                        return;
                    }
                }
            })
            .map(|r| r.map_err(axum::Error::new));
        Body::from_stream(stream)
    } else {
        Body::new(up_body)
    };
    out.body(body).unwrap_or_else(|e| {
        ApiError::new(502, "InternalError", format!("proxy: {e}")).into_response()
    })
}

/// A running proxy on its own thread and runtime (it keeps serving while a
/// test's runtime is blocked or gone); stops when dropped.
pub(crate) struct Proxy {
    pub addr: SocketAddr,
    pub faults: ProxyFaults,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Proxy {
    /// `upstream` builds the admin client inside the proxy's runtime.
    pub(crate) fn start(mut upstream: kube::Config) -> Result<Proxy, Error> {
        // Transparent: the real server's 429s reach the client, which retries.
        upstream.default_retry = false;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("apiserver-proxy".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(Error::Io(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let client = match kube::Client::try_from(upstream) {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(Error::Client(e)));
                            return;
                        }
                    };
                    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(Error::Io(e)));
                            return;
                        }
                    };
                    let shared = Arc::new(ProxyShared {
                        upstream: client,
                        faults: FaultSet::default(),
                        close_watches: watch::channel((0, None)).0,
                        log: Mutex::new(Vec::new()),
                    });
                    let addr = listener.local_addr();
                    let app = axum::Router::new()
                        .fallback(forward)
                        .with_state(shared.clone());
                    let _ = ready_tx.send(addr.map_err(Error::Io).map(|a| (a, shared)));
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stop_rx.await;
                        })
                        .await;
                });
            })?;
        let (addr, shared) = ready_rx.recv().map_err(|_| Error::NotStarted)??;
        Ok(Proxy {
            addr,
            faults: ProxyFaults { shared },
            stop: Some(stop_tx),
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_parsed_like_the_real_request_info() {
        let cases = [
            (
                "GET",
                "/api/v1/namespaces/a/configmaps/x",
                "",
                ("get", "", "configmaps", "", "a", "x"),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/configmaps",
                "watch=true",
                ("watch", "", "configmaps", "", "a", ""),
            ),
            (
                "GET",
                "/api/v1/namespaces/a",
                "",
                ("get", "", "namespaces", "", "", "a"),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/a/configmaps",
                "",
                ("deletecollection", "", "configmaps", "", "a", ""),
            ),
            (
                "PATCH",
                "/apis/slipstream.io/v1alpha1/namespaces/a/configbindings/b/status",
                "",
                (
                    "patch",
                    "slipstream.io",
                    "configbindings",
                    "status",
                    "a",
                    "b",
                ),
            ),
            (
                "POST",
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                "",
                (
                    "create",
                    "apiextensions.k8s.io",
                    "customresourcedefinitions",
                    "",
                    "",
                    "",
                ),
            ),
            (
                "GET",
                "/apis/apps/v1",
                "",
                ("discovery", "", "", "", "", ""),
            ),
            ("GET", "/version", "", ("discovery", "", "", "", "", "")),
        ];
        for (m, path, q, (verb, group, res, sub, ns, name)) in cases {
            let t = target(&Method::from_bytes(m.as_bytes()).unwrap(), path, q);
            assert_eq!(
                (
                    t.verb.as_str(),
                    t.group.as_str(),
                    t.resource.as_str(),
                    t.subresource.as_str(),
                    t.namespace.as_str(),
                    t.name.as_str()
                ),
                (verb, group, res, sub, ns, name),
                "{m} {path}?{q}"
            );
        }
    }
}
