//! The figures of one run and how they are printed: the full report of one
//! size, and the summary table that sets several sizes side by side.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fleet::Shape;
use crate::promtext::{Scrape, quantile};
use crate::transitions::{Counts, PHASES};

/// How long a wait took, or how far it got before its limit.
pub type Waited = Result<Duration, String>;

/// What the operator did between two scrapes.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub service_reconciles: f64,
    pub node_reconciles: f64,
    pub errors: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub api_requests: f64,
    pub writes: f64,
    /// Writes by object kind.
    pub writes_by_kind: std::collections::BTreeMap<String, f64>,
}

impl Figures {
    pub fn between(before: &Scrape, after: &Scrape) -> Figures {
        let delta =
            |metric: &str, filter: &str| after.sum(metric, filter) - before.sum(metric, filter);
        let duration = "edgewire_operator_reconcile_duration_seconds";
        let es = "controller=\"edgeservice\"";
        Figures {
            service_reconciles: delta(&format!("{duration}_count"), es),
            node_reconciles: delta(&format!("{duration}_count"), "controller=\"edgenode\""),
            errors: delta("edgewire_operator_reconcile_errors_total", ""),
            p50: quantile(before, after, duration, es, 0.5),
            p99: quantile(before, after, duration, es, 0.99),
            api_requests: delta("edgewire_operator_api_requests_total", ""),
            writes: delta("edgewire_operator_writes_total", ""),
            writes_by_kind: after
                .label_values("edgewire_operator_writes_total", "kind")
                .into_iter()
                .map(|k| {
                    let n = delta("edgewire_operator_writes_total", &format!("kind=\"{k}\""));
                    (k, n)
                })
                .filter(|(_, n)| *n > 0.0)
                .collect(),
        }
    }

    fn per_reconcile(&self, n: f64) -> String {
        let reconciles = self.service_reconciles + self.node_reconciles;
        if reconciles > 0.0 {
            format!("{:.2}", n / reconciles)
        } else {
            "n/a".into()
        }
    }
}

/// A steady-state window: what the operator did, over how long, and how
/// many heartbeats the simulated agents wrote meanwhile.
#[derive(Clone, Debug, Default)]
pub struct Steady {
    pub figures: Figures,
    pub seconds: f64,
    pub heartbeats: u64,
}

impl Steady {
    fn rate(&self, n: f64) -> String {
        if self.seconds > 0.0 {
            format!("{:.2}", n / self.seconds)
        } else {
            "n/a".into()
        }
    }
}

pub fn secs(d: &Waited) -> String {
    match d {
        Ok(d) => format!("{:.1} s", d.as_secs_f64()),
        Err(state) => state.clone(),
    }
}

pub fn ms(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{:.1} ms", v * 1000.0))
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// edgewire's time over the peer's, and which way it leans.
pub fn ratio(edgewire: &Waited, peer: &Waited) -> String {
    match (edgewire, peer) {
        (Ok(a), Ok(b)) if b.as_secs_f64() > 0.0 => {
            let r = a.as_secs_f64() / b.as_secs_f64();
            format!("{r:.2} ({})", if r < 1.0 { "better" } else { "worse" })
        }
        _ => "n/a".into(),
    }
}

pub struct Report {
    pub shape: Shape,
    pub version: String,
    pub heartbeat_interval: u64,
    pub connections_interval: u64,
    pub agent_heartbeats: crate::agents::HeartbeatMode,
    /// CPU seconds the API server used from the first EdgeService applied
    /// to all Ready.
    pub apply_apiserver_cpu: Option<f64>,
    /// The API server's time for Service writes, and for the rest, from
    /// the first EdgeService applied to all Ready.
    pub apply_write_waits: Option<crate::apiserver::WriteWaits>,
    pub heartbeat_timeout: u64,
    pub status_interval: u64,
    pub applied_in: Duration,
    pub all_ready: Waited,
    pub apply: Figures,
    pub steady_churn: Steady,
    pub steady_still: Steady,
    pub relabelled: usize,
    pub relabel_settled: Waited,
    pub relabel: Figures,
    pub idle_rss_kib: u64,
    pub apply_rss_kib: u64,
    pub relabel_rss_kib: u64,
    pub max_rss_kib: u64,
    pub agent_writes: u64,
    pub agent_status_writes: u64,
    pub agent_failures: u64,
    pub heartbeat_late_ms: u64,
    pub transitions: [Counts; PHASES.len()],
    pub false_examples: Vec<String>,
    pub peer_all_available: Waited,
    /// The peer's pods and nodes when its wait ended.
    pub peer_last: String,
    /// Anything the run cut short, and why.
    pub notes: Vec<String>,
}

impl Report {
    /// One row per phase, one column per kind the operator wrote.
    fn writes_by_kind(&self) -> String {
        let phases = [
            ("apply", &self.apply),
            ("steady, counts changing", &self.steady_churn.figures),
            ("steady, counts constant", &self.steady_still.figures),
            ("relabels", &self.relabel),
        ];
        let mut kinds: Vec<&str> = phases
            .iter()
            .flat_map(|(_, f)| f.writes_by_kind.keys().map(String::as_str))
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        let mut out = vec![
            format!("| operator writes by kind | {} |", kinds.join(" | ")),
            format!("| --- |{}", " --- |".repeat(kinds.len())),
        ];
        for (label, f) in phases {
            let cells: Vec<String> = kinds
                .iter()
                .map(|k| format!("{:.0}", f.writes_by_kind.get(*k).copied().unwrap_or(0.0)))
                .collect();
            out.push(format!("| {label} | {} |", cells.join(" | ")));
        }
        out.join("\n")
    }

    pub fn new(shape: Shape, version: String) -> Report {
        Report {
            shape,
            version,
            heartbeat_interval: 0,
            connections_interval: 0,
            agent_heartbeats: crate::agents::HeartbeatMode::Lease,
            apply_apiserver_cpu: None,
            apply_write_waits: None,
            heartbeat_timeout: 0,
            status_interval: 0,
            applied_in: Duration::ZERO,
            all_ready: Err("not run".into()),
            apply: Figures::default(),
            steady_churn: Steady::default(),
            steady_still: Steady::default(),
            relabelled: 0,
            relabel_settled: Err("not run".into()),
            relabel: Figures::default(),
            idle_rss_kib: 0,
            apply_rss_kib: 0,
            relabel_rss_kib: 0,
            max_rss_kib: 0,
            agent_writes: 0,
            agent_status_writes: 0,
            agent_failures: 0,
            heartbeat_late_ms: 0,
            transitions: Default::default(),
            false_examples: Vec::new(),
            peer_all_available: Err("not run".into()),
            peer_last: String::new(),
            notes: Vec::new(),
        }
    }

    pub fn size(&self) -> String {
        format!(
            "{} nodes × {} services",
            self.shape.nodes, self.shape.services
        )
    }

    /// The headline figures of this size, one cell per summary row.
    /// How the simulated agents heartbeat and report, in words.
    fn agents(&self) -> String {
        match self.agent_heartbeats {
            crate::agents::HeartbeatMode::Lease => format!(
                "simulated agents renew their node Lease every {} s and report their status on change, \
                 connection counts per service alone at most every {} s",
                self.heartbeat_interval, self.connections_interval
            ),
            crate::agents::HeartbeatMode::Status => format!(
                "simulated agents without a node Lease: every {} s a status report with connection counts \
                 per service, and soon after a change",
                self.heartbeat_interval
            ),
        }
    }

    pub fn summary(&self) -> Summary {
        let phases = |f: fn(&Counts) -> usize| {
            self.transitions
                .iter()
                .map(|c| f(c).to_string())
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let per_second = |s: &Steady| {
            format!(
                "{} / {}",
                s.rate(s.figures.api_requests),
                s.rate(s.figures.writes)
            )
        };
        let p = |f: &Figures| format!("{} / {}", ms(f.p50), ms(f.p99));
        Summary {
            size: self.size(),
            cells: vec![
                ("apply to all Ready".into(), secs(&self.all_ready)),
                (
                    "API server CPU in the apply".into(),
                    self.apply_apiserver_cpu
                        .map_or("n/a".into(), |s| format!("{s:.1} s")),
                ),
                (
                    "API server's mean time per write in the apply: Services / the rest".into(),
                    self.apply_write_waits.map_or("n/a".into(), |w| {
                        format!(
                            "{} ({:.0} writes) / {} ({:.0})",
                            ms(w.services.mean_seconds),
                            w.services.count,
                            ms(w.others.mean_seconds),
                            w.others.count,
                        )
                    }),
                ),
                (
                    "Deployments: apply to all Available".into(),
                    // The first clause of how far it got; the full report
                    // has the rest.
                    secs(&self.peer_all_available)
                        .split(';')
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                ),
                (
                    "edgewire/Deployments".into(),
                    ratio(&self.all_ready, &self.peer_all_available),
                ),
                (
                    format!("relabel burst ({} nodes) to settled", self.relabelled),
                    secs(&self.relabel_settled),
                ),
                (
                    "false NotReady transitions (apply / steady / relabel)".into(),
                    phases(|c| c.false_not_ready),
                ),
                (
                    "NotReady while moving to a new node (apply / steady / relabel)".into(),
                    phases(|c| c.moves),
                ),
                (
                    "NotReady with a node really late (apply / steady / relabel)".into(),
                    phases(|c| c.late),
                ),
                (
                    "steady, connection counts changing: API requests/s / writes/s".into(),
                    per_second(&self.steady_churn),
                ),
                (
                    "steady, connection counts constant: API requests/s / writes/s".into(),
                    per_second(&self.steady_still),
                ),
                ("reconcile p50 / p99, apply".into(), p(&self.apply)),
                (
                    "reconcile p50 / p99, steady (counts changing)".into(),
                    p(&self.steady_churn.figures),
                ),
                ("reconcile p50 / p99, relabel".into(), p(&self.relabel)),
                (
                    "operator RSS: idle / after apply / max".into(),
                    format!(
                        "{} / {} / {}",
                        mib(self.idle_rss_kib),
                        mib(self.apply_rss_kib),
                        mib(self.max_rss_kib)
                    ),
                ),
            ],
        }
    }

    pub fn render(&self) -> String {
        let s = &self.shape;
        let row = |label: &str, f: &Figures| {
            format!(
                "| {label} | {:.0} | {:.0} | {} | {} | {:.0} | {} | {:.0} | {} | {:.0} |",
                f.service_reconciles,
                f.node_reconciles,
                ms(f.p50),
                ms(f.p99),
                f.api_requests,
                f.per_reconcile(f.api_requests),
                f.writes,
                f.per_reconcile(f.writes),
                f.errors,
            )
        };
        let steady_row = |label: &str, st: &Steady| {
            format!(
                "| {label} | {:.0} s | {} | {} | {} | {} |",
                st.seconds,
                st.rate(st.heartbeats as f64),
                st.rate(st.figures.api_requests),
                st.rate(st.figures.writes),
                st.rate(st.figures.service_reconciles),
            )
        };
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let transitions = |label: &str, f: fn(&Counts) -> usize| {
            let cells: Vec<String> = self.transitions.iter().map(|c| f(c).to_string()).collect();
            format!("| {label} | {} |", cells.join(" | "))
        };
        let mut out = vec![
            format!("### {}", self.size()),
            String::new(),
            format!(
                "Kubernetes {} (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok) on {cores} cores; \
                 {} kwok nodes in {} sites × {} zones; {} EdgeServices, each on at most {} nodes of one site, spread by zone; \
                 {}; operator heartbeat timeout {} s, status interval {} s.",
                self.version, s.nodes, s.sites, s.zones, s.services, s.max_nodes,
                self.agents(), self.heartbeat_timeout, self.status_interval
            ),
            String::new(),
            "| from apply to settled | edgewire-operator | Deployments (kube-scheduler, controller manager, kwok) | edgewire/Deployments |".into(),
            "| --- | --- | --- | --- |".into(),
            format!(
                "| {} services on {} nodes each: apply to all Ready / Available | {} | {} | {} |",
                s.services,
                s.max_nodes,
                secs(&self.all_ready),
                secs(&self.peer_all_available),
                ratio(&self.all_ready, &self.peer_all_available),
            ),
            format!(
                "| burst of {} node relabels: to every service Ready on its site's nodes | {} | not comparable: a Deployment's pods stay where they were scheduled | |",
                self.relabelled,
                secs(&self.relabel_settled)
            ),
            String::new(),
            format!("| transitions out of Ready | {} |", PHASES.join(" | ")),
            format!("| --- |{}", " --- |".repeat(PHASES.len())),
            transitions("false: every node it needs heartbeating on time", |c| {
                c.false_not_ready
            }),
            transitions("moving to a newly placed node (nodes on time)", |c| c.moves),
            transitions("a node it needs really late", |c| c.late),
            String::new(),
            "| phase | EdgeService reconciles | EdgeNode reconciles | reconcile p50 | reconcile p99 | API requests | per reconcile | writes | per reconcile | errors |".into(),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |".into(),
            row(
                &format!(
                    "apply {} EdgeServices (applied in {:.1} s; the API server used {} of CPU until all Ready)",
                    s.services,
                    self.applied_in.as_secs_f64(),
                    self.apply_apiserver_cpu
                        .map_or("n/a".into(), |c| format!("{c:.1} s")),
                ),
                &self.apply,
            ),
            row(
                "steady state, connection counts changing",
                &self.steady_churn.figures,
            ),
            row(
                "steady state, connection counts constant",
                &self.steady_still.figures,
            ),
            row(&format!("{} node relabels", self.relabelled), &self.relabel),
            String::new(),
            "| steady state | window | heartbeats/s | API requests/s | writes/s | EdgeService reconciles/s |".into(),
            "| --- | --- | --- | --- | --- | --- |".into(),
            steady_row("connection counts changing at every heartbeat", &self.steady_churn),
            steady_row("connection counts constant", &self.steady_still),
            String::new(),
            self.writes_by_kind(),
            String::new(),
            format!(
                "Operator memory (RSS): {} at start, {} with every service Ready, {} after the relabels, {} at peak. \
                 Simulated agents wrote {} times: {} EdgeNode statuses, the rest Lease renewals ({} failed); \
                 their latest heartbeat was {:.1} s late (nodes go stale after {} s).",
                mib(self.idle_rss_kib),
                mib(self.apply_rss_kib),
                mib(self.relabel_rss_kib),
                mib(self.max_rss_kib),
                self.agent_writes,
                self.agent_status_writes,
                self.agent_failures,
                self.heartbeat_late_ms as f64 / 1000.0,
                self.heartbeat_timeout
            ),
        ];
        if !self.false_examples.is_empty() {
            out.push(String::new());
            out.push(
                "First false NotReady transitions (service, phase, Ready reason and message):"
                    .into(),
            );
            out.push(String::new());
            out.extend(self.false_examples.iter().map(|e| format!("- {e}")));
        }
        if !self.peer_last.is_empty() {
            out.push(String::new());
            out.push(format!("The peer when its wait ended: {}.", self.peer_last));
        }
        for note in &self.notes {
            out.push(String::new());
            out.push(note.clone());
        }
        out.join("\n")
    }
}

/// One size's headline figures: `(row label, cell)` in row order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub size: String,
    pub cells: Vec<(String, String)>,
}

/// Sets sizes side by side: one column per size, one row per figure, in
/// the order the first size lists them (rows only some sizes have come
/// after, with "n/a" where a size lacks them).
pub fn render_summary(sizes: &[Summary]) -> String {
    let mut labels: Vec<&str> = Vec::new();
    for s in sizes {
        for (label, _) in &s.cells {
            if !labels.contains(&label.as_str()) {
                labels.push(label);
            }
        }
    }
    let mut out = vec![
        format!(
            "| figure | {} |",
            sizes
                .iter()
                .map(|s| s.size.as_str())
                .collect::<Vec<_>>()
                .join(" | ")
        ),
        format!("| --- |{}", " --- |".repeat(sizes.len())),
    ];
    for label in labels {
        let cells: Vec<&str> = sizes
            .iter()
            .map(|s| {
                s.cells
                    .iter()
                    .find(|(l, _)| l == label)
                    .map_or("n/a", |(_, v)| v.as_str())
            })
            .collect();
        out.push(format!("| {label} | {} |", cells.join(" | ")));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        nodes: 1000,
        services: 500,
        sites: 50,
        zones: 5,
        max_nodes: 3,
    };

    #[test]
    fn ratios_lean_the_right_way_and_need_both_times() {
        let s = |x: f64| Ok(Duration::from_secs_f64(x));
        assert_eq!(ratio(&s(10.0), &s(40.0)), "0.25 (better)");
        assert_eq!(ratio(&s(30.0), &s(20.0)), "1.50 (worse)");
        assert_eq!(ratio(&s(30.0), &Err("not reached".into())), "n/a");
        assert_eq!(secs(&s(12.34)), "12.3 s");
        assert_eq!(
            secs(&Err("not reached in 600 s: 3/5".into())),
            "not reached in 600 s: 3/5"
        );
    }

    #[test]
    fn summary_rows_carry_rates_and_transitions_per_phase() {
        let mut r = Report::new(SHAPE, "v1.35.4".into());
        r.all_ready = Ok(Duration::from_secs(20));
        r.peer_all_available = Ok(Duration::from_secs(80));
        r.transitions[2].false_not_ready = 3;
        r.transitions[2].moves = 40;
        r.steady_churn = Steady {
            figures: Figures {
                api_requests: 120.0,
                writes: 30.0,
                ..Figures::default()
            },
            seconds: 60.0,
            heartbeats: 3000,
        };
        let s = r.summary();
        let cell = |label: &str| {
            s.cells
                .iter()
                .find(|(l, _)| l.starts_with(label))
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(s.size, "1000 nodes × 500 services");
        assert_eq!(cell("edgewire/Deployments"), "0.25 (better)");
        assert_eq!(cell("false NotReady"), "0 / 0 / 3");
        assert_eq!(cell("NotReady while moving"), "0 / 0 / 40");
        assert_eq!(cell("steady, connection counts changing"), "2.00 / 0.50");
        assert_eq!(cell("steady, connection counts constant"), "n/a / n/a");
        let text = r.render();
        assert!(text.contains("| false: every node it needs heartbeating on time | 0 | 0 | 3 |"));
        assert!(text.contains(
            "| connection counts changing at every heartbeat | 60 s | 50.00 | 2.00 | 0.50 | 0.00 |"
        ));
    }

    #[test]
    fn sizes_side_by_side_with_gaps_marked() {
        let a = Summary {
            size: "1000 nodes × 500 services".into(),
            cells: vec![("x".into(), "1".into()), ("y".into(), "2".into())],
        };
        let b = Summary {
            size: "5000 nodes × 1000 services".into(),
            cells: vec![("y".into(), "4".into()), ("z".into(), "5".into())],
        };
        let text = render_summary(&[a.clone(), b]);
        assert_eq!(
            text,
            "| figure | 1000 nodes × 500 services | 5000 nodes × 1000 services |\n\
             | --- | --- | --- |\n\
             | x | 1 | n/a |\n\
             | y | 2 | 4 |\n\
             | z | n/a | 5 |"
        );
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Summary>(&json).unwrap(), a);
    }
}
