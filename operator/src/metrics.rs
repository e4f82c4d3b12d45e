//! The operator's own metrics: reconcile duration, errors and writes per
//! controller, requests to the API server, EdgeServices by readiness, and
//! leadership.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgewire_api::crd::EdgeService;
use kube::runtime::reflector::Store;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    reconcile_duration: HistogramVec,
    reconcile_errors: IntCounterVec,
    writes: IntCounterVec,
    api_requests: IntCounterVec,
    edgeservices: IntGaugeVec,
    leader: IntGauge,
    services: Mutex<Option<Store<EdgeService>>>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "edgewire_operator_reconcile_duration_seconds",
                "Time per reconcile.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["controller"],
        )
        .expect("static metric");
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "edgewire_operator_reconcile_errors_total",
                "Reconciles that failed.",
            ),
            &["controller"],
        )
        .expect("static metric");
        let writes = IntCounterVec::new(
            Opts::new(
                "edgewire_operator_writes_total",
                "Writes to the API server, by object kind.",
            ),
            &["kind"],
        )
        .expect("static metric");
        let api_requests = IntCounterVec::new(
            Opts::new(
                "edgewire_operator_api_requests_total",
                "Requests sent to the API server, by verb (a watch counts once, when it starts).",
            ),
            &["verb"],
        )
        .expect("static metric");
        let edgeservices = IntGaugeVec::new(
            Opts::new(
                "edgewire_operator_edgeservices",
                "EdgeServices by readiness.",
            ),
            &["ready"],
        )
        .expect("static metric");
        let leader = IntGauge::new(
            "edgewire_operator_leader",
            "1 while this replica holds the lease.",
        )
        .expect("static metric");
        let registry = Registry::new();
        for c in [
            Box::new(reconcile_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_errors.clone()),
            Box::new(writes.clone()),
            Box::new(api_requests.clone()),
            Box::new(edgeservices.clone()),
            Box::new(leader.clone()),
        ] {
            registry.register(c).expect("each metric registered once");
        }
        for controller in ["edgeservice", "edgenode"] {
            reconcile_duration.with_label_values(&[controller]);
            reconcile_errors.with_label_values(&[controller]);
        }
        Metrics {
            inner: Arc::new(Inner {
                registry,
                reconcile_duration,
                reconcile_errors,
                writes,
                api_requests,
                edgeservices,
                leader,
                services: Mutex::new(None),
            }),
        }
    }

    pub fn reconciled(&self, controller: &str, took: Duration, failed: bool) {
        self.inner
            .reconcile_duration
            .with_label_values(&[controller])
            .observe(took.as_secs_f64());
        if failed {
            self.inner
                .reconcile_errors
                .with_label_values(&[controller])
                .inc();
        }
    }

    pub fn write(&self, kind: &str) {
        self.inner.writes.with_label_values(&[kind]).inc();
    }

    /// Counts one request to the API server.
    pub fn api_request<B>(&self, request: &http::Request<B>) {
        self.inner
            .api_requests
            .with_label_values(&[verb(request.method(), request.uri().query())])
            .inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.inner.leader.set(i64::from(leader));
    }

    /// The EdgeService cache the readiness gauge is counted from (the
    /// current leader term's).
    pub fn watch_services(&self, store: Store<EdgeService>) {
        *self
            .inner
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(store);
    }

    pub fn render(&self) -> String {
        let store = self
            .inner
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(store) = store {
            let (mut ready, mut not_ready) = (0, 0);
            for es in store.state() {
                let is_ready = es.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                });
                if is_ready {
                    ready += 1;
                } else {
                    not_ready += 1;
                }
            }
            self.inner
                .edgeservices
                .with_label_values(&["true"])
                .set(ready);
            self.inner
                .edgeservices
                .with_label_values(&["false"])
                .set(not_ready);
        }
        let mut buf = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.inner.registry.gather(), &mut buf) {
            tracing::error!(%err, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The Kubernetes verb of a request, from its method and query: a bounded
/// label (names and namespaces are left out).
pub fn verb(method: &http::Method, query: Option<&str>) -> &'static str {
    let watching =
        query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    match *method {
        http::Method::GET if watching => "watch",
        http::Method::GET => "get",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_from_requests() {
        let m = |s: &str| http::Method::from_bytes(s.as_bytes()).unwrap();
        assert_eq!(
            verb(&m("GET"), Some("watch=true&resourceVersion=5")),
            "watch"
        );
        assert_eq!(verb(&m("GET"), Some("labelSelector=a")), "get");
        assert_eq!(verb(&m("GET"), None), "get");
        assert_eq!(verb(&m("PATCH"), Some("fieldManager=x")), "patch");
        assert_eq!(verb(&m("POST"), None), "create");
        assert_eq!(verb(&m("OPTIONS"), None), "other");
    }

    #[test]
    fn counted_requests_are_rendered() {
        let metrics = Metrics::new();
        let request = http::Request::patch("/apis/x?fieldManager=y")
            .body(())
            .unwrap();
        metrics.api_request(&request);
        metrics.api_request(&request);
        assert!(
            metrics
                .render()
                .contains("edgewire_operator_api_requests_total{verb=\"patch\"} 2")
        );
    }
}
