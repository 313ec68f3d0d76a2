//! Watch streams: initial events, replay from the retained history, live
//! events, selector transitions, bookmarks, `timeoutSeconds`, 410 Gone.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{body::Body, response::Response};
use bytes::Bytes;
use http::{HeaderValue, header};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::{
    Shared,
    errors::{ApiError, ApiResult},
    resources::ResourceDef,
    selectors::Selectors,
    store::{Change, EventType, State, Stored},
};

pub struct WatchParams {
    pub resource_version: Option<u64>,
    pub bookmarks: bool,
    pub send_initial_events: bool,
    pub timeout: Option<Duration>,
}

fn line(etype: &str, object: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(object.len() + 32);
    v.extend_from_slice(b"{\"type\":\"");
    v.extend_from_slice(etype.as_bytes());
    v.extend_from_slice(b"\",\"object\":");
    v.extend_from_slice(object);
    v.extend_from_slice(b"}\n");
    Bytes::from(v)
}

fn bookmark(res: &ResourceDef, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let obj = json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": meta});
    line("BOOKMARK", obj.to_string().as_bytes())
}

struct Filter {
    res: Arc<ResourceDef>,
    api_version: String,
    ns: Option<String>,
    sel: Selectors,
}

impl Filter {
    fn object_bytes(&self, obj: &Arc<Value>, json: &Bytes) -> Bytes {
        if obj["apiVersion"].as_str() == Some(self.api_version.as_str()) {
            json.clone()
        } else {
            Bytes::from(State::present(&self.res, obj).to_string())
        }
    }

    /// The event a watch with this filter sees for `change`, if any. An object
    /// that stops matching the selectors is seen as DELETED, one that starts
    /// matching as ADDED (as the real watch cache does).
    fn event(&self, c: &Change) -> Option<Bytes> {
        if c.storage != self.res.storage {
            return None;
        }
        if let Some(ns) = &self.ns
            && self.res.namespaced
            && c.ns != *ns
        {
            return None;
        }
        let now = self.sel.matches(&c.obj);
        let before = c.old.as_ref().is_some_and(|o| self.sel.matches(o));
        let etype = match (c.etype, before, now) {
            (EventType::Added, _, true) => EventType::Added,
            (EventType::Modified, true, true) => EventType::Modified,
            (EventType::Modified, false, true) => EventType::Added,
            (EventType::Modified, true, false) => EventType::Deleted,
            (EventType::Deleted, true, _) | (EventType::Deleted, _, true) => EventType::Deleted,
            _ => return None,
        };
        if etype == c.etype && c.obj["apiVersion"].as_str() == Some(self.api_version.as_str()) {
            // The common case: the line serialized at commit time, shared by all watches.
            return Some(c.line.clone());
        }
        Some(line(etype.as_str(), &self.object_bytes(&c.obj, &c.json)))
    }
}

/// ADDED lines for the initial objects, in chunks of about 1 MiB.
fn initial_lines(res: &ResourceDef, items: &[Stored]) -> Vec<Bytes> {
    const CHUNK: usize = 1 << 20;
    let mut out = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    for o in items {
        let body = o.body(res);
        buf.extend_from_slice(b"{\"type\":\"ADDED\",\"object\":");
        buf.extend_from_slice(&body);
        buf.extend_from_slice(b"}\n");
        if buf.len() >= CHUNK {
            out.push(Bytes::from(std::mem::take(&mut buf)));
        }
    }
    if !buf.is_empty() {
        out.push(Bytes::from(buf));
    }
    out
}

/// Starts a watch: everything up to "now" is computed under the store lock
/// together with the broadcast subscription, so no event is lost or doubled.
pub fn start(
    shared: Arc<Shared>,
    res: Arc<ResourceDef>,
    ns: Option<String>,
    sel: Selectors,
    p: WatchParams,
) -> ApiResult<Response> {
    let filter = Filter {
        api_version: res.api_version(),
        res: res.clone(),
        ns: ns.clone(),
        sel,
    };
    let mut first: Vec<Bytes> = Vec::new();
    let mut initial_items = Vec::new();
    // Subscribed before the resourceVersion is checked, so a close requested
    // after that check (a compaction and a close racing this request, say)
    // always reaches this watch.
    let mut closer = shared.close_watches.subscribe();
    closer.borrow_and_update();
    let (rx, start_rv) = {
        let st = shared
            .state
            .lock()
            .map_err(|_| ApiError::internal("store lock poisoned"))?;
        let initial = p.send_initial_events || matches!(p.resource_version, None | Some(0));
        if initial {
            // Snapshotted under the lock; the lines are built after it is released.
            initial_items = st.list(&res, ns.as_deref(), &filter.sel);
        } else if let Some(rv) = p.resource_version {
            if rv < st.floor {
                let err =
                    ApiError::gone(format!("too old resource version: {rv} ({})", st.floor + 1));
                first.push(line("ERROR", err.to_status().to_string().as_bytes()));
                let body = futures::stream::iter(first.into_iter().map(Ok::<Bytes, Infallible>));
                return Ok(stream_response(Body::from_stream(body)));
            }
            for c in st.history.iter().filter(|c| c.rv > rv) {
                if let Some(b) = filter.event(c) {
                    first.push(b);
                }
            }
        }
        (st.tx.subscribe(), st.rv)
    };
    if !initial_items.is_empty() || p.send_initial_events {
        first = crate::http::heavy(initial_items.len(), || initial_lines(&res, &initial_items));
        if p.send_initial_events {
            first.push(bookmark(&res, start_rv, true));
        }
    }
    let (tx, out) = mpsc::channel::<Bytes>(256);
    let shutdown = shared.shutdown.subscribe();
    let signals = Signals { closer, shutdown };
    tokio::spawn(pump(shared, filter, first, rx, tx, start_rv, p, signals));
    let body = futures::stream::unfold(out, |mut out| async move {
        out.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), out))
    });
    Ok(stream_response(Body::from_stream(body)))
}

fn stream_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    resp
}

struct Signals {
    closer: tokio::sync::watch::Receiver<u64>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

#[allow(clippy::too_many_arguments)]
async fn pump(
    shared: Arc<Shared>,
    filter: Filter,
    first: Vec<Bytes>,
    mut rx: broadcast::Receiver<Arc<Change>>,
    tx: mpsc::Sender<Bytes>,
    start_rv: u64,
    p: WatchParams,
    signals: Signals,
) {
    for b in first {
        if tx.send(b).await.is_err() {
            return;
        }
    }
    let Signals {
        mut closer,
        mut shutdown,
    } = signals;
    let mut seen = start_rv;
    let deadline = tokio::time::sleep(p.timeout.unwrap_or(Duration::from_secs(3600)));
    tokio::pin!(deadline);
    let mut ticker = tokio::time::interval(shared.config.bookmark_interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Ok(c) => {
                    seen = c.rv;
                    let mut batch: Vec<Bytes> = filter.event(&c).into_iter().collect();
                    // Under load, send what has queued up as one chunk (fewer wakeups and writes).
                    while batch.len() < 256 {
                        match rx.try_recv() {
                            Ok(c) => {
                                seen = c.rv;
                                batch.extend(filter.event(&c));
                            }
                            Err(broadcast::error::TryRecvError::Empty) => break,
                            Err(_) => return,
                        }
                    }
                    let chunk = match batch.len() {
                        0 => continue,
                        1 => batch.swap_remove(0),
                        _ => Bytes::from(batch.concat()),
                    };
                    if tx.send(chunk).await.is_err() {
                        return;
                    }
                }
                // A watch that cannot keep up is ended; the client re-watches from its last resourceVersion.
                Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = ticker.tick(), if p.bookmarks => {
                if tx.send(bookmark(&filter.res, seen, false)).await.is_err() {
                    return;
                }
            }
            _ = closer.changed() => return,
            _ = shutdown.changed() => return,
            _ = &mut deadline => return,
            _ = tx.closed() => return,
        }
    }
}
