//! The uplink's metrics: the queue, what left it and why, and the link.

use prometheus::{
    Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Why a queued message left without reaching the hub; the `reason` label
/// of `edgewire_uplink_dropped_total`.
pub const DROP_REASONS: [&str; 5] = ["capacity", "ttl", "store_failed", "rejected", "too_large"];
/// The `state` label of `edgewire_uplink_link`.
pub const STATES: [&str; 2] = ["connecting", "connected"];

#[derive(Clone)]
pub struct UplinkMetrics {
    pub queue_bytes: IntGaugeVec,
    pub queue_messages: IntGaugeVec,
    pub oldest_seconds: GaugeVec,
    pub delivered: IntCounterVec,
    pub sent_bytes: IntCounterVec,
    pub dropped: IntCounterVec,
    pub link: IntGaugeVec,
    pub connect_failures: IntCounterVec,
    pub downlink: IntCounterVec,
    pub duplicates: IntCounterVec,
}

/// One service's series that change with every message, looked up once:
/// a lookup by label hashes the labels and takes the vector's lock.
#[derive(Clone)]
pub struct ServiceSeries {
    pub queue_bytes: IntGauge,
    pub queue_messages: IntGauge,
    pub oldest_seconds: Gauge,
    pub delivered: IntCounter,
    pub sent_bytes: IntCounter,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl UplinkMetrics {
    pub fn new() -> UplinkMetrics {
        let service = &["service"];
        let gauge = |name, help| {
            IntGaugeVec::new(opts(name, help), service).expect("static gauge definition is valid")
        };
        let counter = |name, help, labels: &[&str]| {
            IntCounterVec::new(opts(name, help), labels)
                .expect("static counter definition is valid")
        };
        UplinkMetrics {
            queue_bytes: gauge(
                "edgewire_uplink_queue_bytes",
                "Bytes of uplink messages waiting for the hub.",
            ),
            queue_messages: gauge(
                "edgewire_uplink_queue_messages",
                "Uplink messages waiting for the hub.",
            ),
            oldest_seconds: GaugeVec::new(
                opts(
                    "edgewire_uplink_oldest_seconds",
                    "Age of the oldest waiting uplink message, by this node's clock at enqueue.",
                ),
                service,
            )
            .expect("static gauge definition is valid"),
            delivered: counter(
                "edgewire_uplink_delivered_total",
                "Uplink messages the hub acknowledged.",
                service,
            ),
            sent_bytes: counter(
                "edgewire_uplink_sent_bytes_total",
                "Payload bytes of uplink messages sent to the hub, resends included.",
                service,
            ),
            dropped: counter(
                "edgewire_uplink_dropped_total",
                "Uplink messages lost before the hub had them, by reason.",
                &["service", "reason"],
            ),
            link: gauge_state(),
            connect_failures: counter(
                "edgewire_uplink_connect_failures_total",
                "Failed attempts to reach the hub, by reason.",
                &["service", "reason"],
            ),
            downlink: counter(
                "edgewire_downlink_messages_total",
                "Messages from the hub delivered to this node's subscribers.",
                service,
            ),
            duplicates: counter(
                "edgewire_uplink_duplicates_total",
                "Forwarded publishes this agent, as a hub, had already delivered and dropped.",
                service,
            ),
        }
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.queue_bytes.clone()))?;
        registry.register(Box::new(self.queue_messages.clone()))?;
        registry.register(Box::new(self.oldest_seconds.clone()))?;
        registry.register(Box::new(self.delivered.clone()))?;
        registry.register(Box::new(self.sent_bytes.clone()))?;
        registry.register(Box::new(self.dropped.clone()))?;
        registry.register(Box::new(self.link.clone()))?;
        registry.register(Box::new(self.connect_failures.clone()))?;
        registry.register(Box::new(self.downlink.clone()))?;
        registry.register(Box::new(self.duplicates.clone()))
    }

    /// Every series of a service with a hub, at zero.
    pub fn init_service(&self, service: &str, failure_reasons: &[&str]) {
        self.queue_bytes.with_label_values(&[service]);
        self.queue_messages.with_label_values(&[service]);
        self.oldest_seconds.with_label_values(&[service]);
        self.delivered.with_label_values(&[service]);
        self.sent_bytes.with_label_values(&[service]);
        self.downlink.with_label_values(&[service]);
        for reason in DROP_REASONS {
            self.dropped.with_label_values(&[service, reason]);
        }
        for reason in failure_reasons {
            self.connect_failures.with_label_values(&[service, reason]);
        }
        self.set_state(service, "connecting");
    }

    /// `service`'s per-message series.
    pub fn series(&self, service: &str) -> ServiceSeries {
        let labels = [service];
        ServiceSeries {
            queue_bytes: self.queue_bytes.with_label_values(&labels),
            queue_messages: self.queue_messages.with_label_values(&labels),
            oldest_seconds: self.oldest_seconds.with_label_values(&labels),
            delivered: self.delivered.with_label_values(&labels),
            sent_bytes: self.sent_bytes.with_label_values(&labels),
        }
    }

    pub fn set_state(&self, service: &str, state: &str) {
        for s in STATES {
            self.link
                .with_label_values(&[service, s])
                .set(i64::from(s == state));
        }
    }

    pub fn drop_n(&self, service: &str, reason: &str, n: u64) {
        if n > 0 {
            self.dropped.with_label_values(&[service, reason]).inc_by(n);
        }
    }
}

impl Default for UplinkMetrics {
    fn default() -> Self {
        UplinkMetrics::new()
    }
}

fn gauge_state() -> IntGaugeVec {
    IntGaugeVec::new(
        opts(
            "edgewire_uplink_link",
            "The link to the hub: 1 for its current state (connecting or connected).",
        ),
        &["service", "state"],
    )
    .expect("static gauge definition is valid")
}
