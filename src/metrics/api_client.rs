//! Kubernetes API request metrics: a tower layer on the kube client counts
//! every request by verb and HTTP status code and times it (to the response
//! headers; for a watch, until the stream opens).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use http::{Method, Request, Response, Uri};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use tower::{Layer, Service};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`, or the HTTP method for anything else.
    pub verb: String,
    /// The HTTP status code, or `error` when no response came.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    pub verb: String,
}

type DurationFamily = Family<VerbLabels, Histogram, fn() -> Histogram>;

/// Request counts and latencies of the operator's Kubernetes client.
#[derive(Clone)]
pub struct ApiClientMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: DurationFamily,
}

impl Default for ApiClientMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
            }),
        }
    }
}

impl ApiClientMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kube_api_requests",
            "Kubernetes API requests by verb and HTTP status code",
            self.requests.clone(),
        );
        registry.register(
            "kube_api_request_duration_seconds",
            "Kubernetes API request latency to the response headers, by verb",
            self.duration.clone(),
        );
    }

    /// Requests with `verb` answered with `code` so far.
    pub fn count(&self, verb: &str, code: &str) -> u64 {
        self.requests
            .get(&RequestLabels {
                verb: verb.to_owned(),
                code: code.to_owned(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// The layer to put on a kube client (`ClientBuilder::with_layer`).
    pub fn layer(&self) -> ApiClientLayer {
        ApiClientLayer(self.clone())
    }

    fn observe(&self, verb: String, code: String, started: Instant) {
        self.duration
            .get_or_create(&VerbLabels { verb: verb.clone() })
            .observe(started.elapsed().as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels { verb, code })
            .inc();
    }
}

/// The Kubernetes verb of a request, from its method and path (collection
/// or single object) and the `watch` query parameter.
pub fn verb_of(method: &Method, uri: &Uri) -> String {
    let watch = uri.query().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "watch=true" || p == "watch=1" || p == "watch")
    });
    let collection = is_collection(uri.path());
    let verb = match *method {
        Method::GET if watch => "watch",
        Method::GET if collection => "list",
        Method::GET => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if collection => "deletecollection",
        Method::DELETE => "delete",
        ref other => return other.as_str().to_ascii_lowercase(),
    };
    verb.to_owned()
}

/// `/api/v1[/namespaces/NS]/RESOURCE` and `/apis/G/V[/namespaces/NS]/RESOURCE`
/// name a collection; one more segment names an object.
fn is_collection(path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segments.first() {
        Some(&"api") => segments.get(2..),
        Some(&"apis") => segments.get(3..),
        _ => None,
    };
    let Some(mut rest) = rest else {
        return false;
    };
    if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        rest = &rest[2..];
    }
    rest.len() == 1
}

/// Wraps a client service with [`ApiClientMetrics`].
#[derive(Clone)]
pub struct ApiClientLayer(ApiClientMetrics);

impl<S> Layer<S> for ApiClientLayer {
    type Service = ApiClientService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiClientService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ApiClientService<S> {
    inner: S,
    metrics: ApiClientMetrics,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ApiClientService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResBody: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let verb = verb_of(req.method(), req.uri());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "error".to_owned(),
            };
            metrics.observe(verb, code, started);
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verb(method: Method, uri: &str) -> String {
        verb_of(&method, &uri.parse().unwrap())
    }

    #[test]
    fn verbs_follow_the_kubernetes_request_kinds() {
        let cms = "/api/v1/namespaces/shop/configmaps";
        assert_eq!(verb(Method::GET, cms), "list");
        assert_eq!(
            verb(Method::GET, &format!("{cms}?watch=true&resourceVersion=1")),
            "watch"
        );
        assert_eq!(verb(Method::GET, &format!("{cms}/web")), "get");
        assert_eq!(
            verb(Method::PATCH, &format!("{cms}/web?fieldManager=x")),
            "patch"
        );
        assert_eq!(verb(Method::POST, cms), "create");
        assert_eq!(verb(Method::DELETE, &format!("{cms}/web")), "delete");
        assert_eq!(verb(Method::DELETE, cms), "deletecollection");
        let bindings = "/apis/slipstream.io/v1alpha1/configbindings";
        assert_eq!(verb(Method::GET, bindings), "list");
        assert_eq!(
            verb(
                Method::PUT,
                "/apis/slipstream.io/v1alpha1/namespaces/a/configbindings/b/status"
            ),
            "update"
        );
        assert_eq!(verb(Method::GET, "/api/v1/namespaces"), "list");
        assert_eq!(verb(Method::GET, "/api/v1/namespaces/shop"), "get");
        assert_eq!(verb(Method::GET, "/version"), "get");
    }
}
