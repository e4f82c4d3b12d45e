//! What the API server's own metrics say of the writes in a phase: how long
//! it took to answer Service writes, against every other write.
//!
//! A new Service waits for its ClusterIP, and the API server allocates them
//! one at a time (each under a lock held across the write of its IPAddress
//! object), so a burst of new Services queues there while other writes go
//! on. These figures show whether an apply was bound by that queue. The
//! API server times a request from its arrival, so a wait for the handler
//! counts too; the IPAddress writes of the allocation itself are among the
//! other writes.

use kube::Client;

use crate::promtext::Scrape;

const DURATION: &str = "apiserver_request_duration_seconds";
/// The verbs that write. Server-side applies have a verb of their own
/// (`APPLY`, not `PATCH`), and they are most of the operator's writes.
const WRITES: [&str; 6] = [
    "APPLY",
    "POST",
    "PUT",
    "PATCH",
    "DELETE",
    "DELETECOLLECTION",
];

/// The API server's metrics now, or None (said on stderr) if it would not
/// give them.
pub async fn scrape(client: &Client) -> Option<Scrape> {
    let request = http::Request::get("/metrics").body(Vec::new()).ok()?;
    match client.request_text(request).await {
        Ok(text) => Some(Scrape::parse(&text)),
        Err(err) => {
            eprintln!("cannot read the API server's /metrics: {err}");
            None
        }
    }
}

/// How many writes were answered between two scrapes, and the mean time
/// the API server took for each (None when there were none, or when its
/// counters went back, as after a restart).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Waits {
    pub count: f64,
    pub mean_seconds: Option<f64>,
}

/// Service writes, and every other write, between two scrapes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WriteWaits {
    pub services: Waits,
    pub others: Waits,
}

pub fn write_waits(before: &Scrape, after: &Scrape) -> WriteWaits {
    let delta = |suffix: &str, labels: &[(&str, &str)]| {
        let metric = format!("{DURATION}_{suffix}");
        after.sum_labelled(&metric, labels) - before.sum_labelled(&metric, labels)
    };
    let (mut all, mut services) = ((0.0, 0.0), (0.0, 0.0));
    for verb in WRITES {
        let of_verb = [("verb", verb)];
        let of_services = [("verb", verb), ("resource", "services"), ("group", "")];
        all.0 += delta("count", &of_verb);
        all.1 += delta("sum", &of_verb);
        services.0 += delta("count", &of_services);
        services.1 += delta("sum", &of_services);
    }
    let waits = |(count, sum): (f64, f64)| Waits {
        count,
        mean_seconds: (count > 0.0 && sum >= 0.0).then(|| sum / count),
    };
    WriteWaits {
        services: waits(services),
        others: waits((all.0 - services.0, all.1 - services.1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_writes_apart_from_the_rest() {
        let before = Scrape::parse(
            r#"
apiserver_request_duration_seconds_sum{group="",resource="services",verb="APPLY"} 1
apiserver_request_duration_seconds_count{group="",resource="services",verb="APPLY"} 1
apiserver_request_duration_seconds_sum{group="",resource="pods",verb="POST"} 0.5
apiserver_request_duration_seconds_count{group="",resource="pods",verb="POST"} 10
"#,
        );
        let after = Scrape::parse(
            r#"
apiserver_request_duration_seconds_sum{group="",resource="services",verb="APPLY"} 41
apiserver_request_duration_seconds_count{group="",resource="services",verb="APPLY"} 11
apiserver_request_duration_seconds_sum{group="",resource="services",verb="GET"} 100
apiserver_request_duration_seconds_count{group="",resource="services",verb="GET"} 100
apiserver_request_duration_seconds_sum{group="",resource="pods",verb="POST"} 1.5
apiserver_request_duration_seconds_count{group="",resource="pods",verb="POST"} 30
apiserver_request_duration_seconds_sum{group="x.io",resource="services",verb="PUT"} 1
apiserver_request_duration_seconds_count{group="x.io",resource="services",verb="PUT"} 20
"#,
        );
        let w = write_waits(&before, &after);
        assert_eq!(w.services.count, 10.0);
        assert!((w.services.mean_seconds.unwrap() - 4.0).abs() < 1e-9);
        // 20 pod creations and 20 writes of another group's "services";
        // reads are not writes.
        assert_eq!(w.others.count, 40.0);
        assert!((w.others.mean_seconds.unwrap() - 2.0 / 40.0).abs() < 1e-9);
    }

    #[test]
    fn nothing_written_is_no_wait() {
        let none = Scrape::parse("");
        assert_eq!(write_waits(&none, &none), WriteWaits::default());
    }
}
