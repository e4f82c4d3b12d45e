//! `edgewire-opbench`: the operator at scale. On the real control plane
//! (etcd, kube-apiserver, controller manager, scheduler) with kwok nodes, it
//! measures how long edgewire-operator takes from applying EdgeServices to
//! all Ready, its reconcile times, API requests and memory; the same after a
//! burst of node relabels; and, as the peer, the stock path for the same
//! intent (a Deployment per service, placed by kube-scheduler and run by
//! kwok) from apply to all Available. It prints figures and never fails on a
//! time. Every wait is bounded. A watch of the EdgeServices counts every
//! time one leaves Ready and judges it against the simulated agents'
//! heartbeats (false NotReady transitions).

mod agents;
mod apiserver;
mod fleet;
mod phase;
mod promtext;
mod report;
mod transitions;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use edgewire_testenv::{ControlPlane, NodeSpec, Options};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};

use fleet::Shape;
use phase::{Bench, Operator};
use report::{Figures, Report, Steady, Summary};
use transitions::TransitionWatch;

/// Where the EdgeServices go, and where the peer's Deployments go.
const NAMESPACE: &str = "edgewire-bench";
const PEER_NAMESPACE: &str = "peer-bench";

#[derive(Parser)]
#[command(
    name = "edgewire-opbench",
    version,
    about = "edgewire's operator benchmark"
)]
struct Cli {
    /// The edgewire-operator binary to measure (a release build).
    #[arg(long, env = "EDGEWIRE_OPERATOR", required_unless_present = "summarize")]
    operator: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    #[arg(long, default_value_t = 500)]
    services: usize,
    /// Sites (node groups) the services select; each service picks one.
    #[arg(long, default_value_t = 50)]
    sites: usize,
    #[arg(long, default_value_t = 5)]
    zones: usize,
    /// placement.maxNodes of each service, and replicas of each Deployment.
    #[arg(long, default_value_t = 3)]
    max_nodes: usize,
    /// Nodes moved to another site in the relabel burst.
    #[arg(long, default_value_t = 100)]
    relabels: usize,
    /// Seconds between a simulated agent's heartbeats.
    #[arg(long, default_value_t = 20)]
    heartbeat_interval: u64,
    /// Seconds between a simulated agent's status reports whose only change
    /// is a connection count, at least (the agent's
    /// --connections-report-interval).
    #[arg(long, default_value_t = 60)]
    connections_report_interval: u64,
    /// How the simulated agents heartbeat: renewing their node Lease (what
    /// the agent does with --lease-namespace), or writing their EdgeNode
    /// status every time (without one), to compare the two.
    #[arg(long, value_enum, default_value_t = agents::HeartbeatMode::Lease)]
    agent_heartbeats: agents::HeartbeatMode,
    /// The operator's --heartbeat-timeout, in seconds.
    #[arg(long, default_value_t = 60)]
    heartbeat_timeout: u64,
    /// The operator's --status-interval, in seconds: the least time between
    /// status writes whose only change is a connection count.
    #[arg(long, default_value_t = 30)]
    status_interval: u64,
    /// Length of each steady-state window (connection counts changing, then
    /// constant), in seconds.
    #[arg(long, default_value_t = 60)]
    steady_seconds: u64,
    /// Upper bound on each wait, in seconds.
    #[arg(long, default_value_t = 600)]
    phase_timeout: u64,
    /// Upper bound on the whole run, in seconds: once spent, the wait under
    /// way ends with how far it got and the steps after it are not run.
    #[arg(long)]
    budget: Option<u64>,
    /// The operator's --log-level (its log is kept; the path is printed).
    #[arg(long, default_value = "warn")]
    operator_log_level: String,
    /// Skip the Deployment peer.
    #[arg(long)]
    no_peer: bool,
    /// One more argument for the operator, e.g.
    /// `--operator-arg=--reconcile-batch-period-ms=0`; repeat for several.
    #[arg(long = "operator-arg", allow_hyphen_values = true)]
    operator_args: Vec<String>,
    /// Where to write the report (markdown).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to write this size's headline figures (JSON), for --summarize.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Print the table that sets these sizes side by side (files written
    /// by --summary) and exit.
    #[arg(long, num_args = 1..)]
    summarize: Vec<PathBuf>,
}

fn progress(started: Instant, text: impl std::fmt::Display) {
    eprintln!("[{:>5.0}s] {text}", started.elapsed().as_secs_f64());
}

async fn create_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.to_string());
    api.create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

/// The table of several sizes' headline figures, from `--summary` files.
fn summarize(files: &[PathBuf]) -> anyhow::Result<()> {
    let sizes = files
        .iter()
        .map(|f| {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            serde_json::from_str::<Summary>(&text)
                .with_context(|| format!("parsing {}", f.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!("{}", report::render_summary(&sizes));
    Ok(())
}

/// Each fake node's own pod range, 10.<i/256>.<i%256>.0/24, as a node IPAM
/// would hand out: kwok takes pod addresses from the node's podCIDR.
fn pod_cidr(i: usize) -> String {
    format!("10.{}.{}.0/24", (i / 256) % 256, i % 256)
}

/// Keeps the control plane's logs (they go with its data directory).
fn keep_logs(plane: &ControlPlane) -> Option<PathBuf> {
    let to = std::env::temp_dir().join(format!("edgewire-opbench-{}-logs", std::process::id()));
    let from = plane.dir.join("logs");
    std::fs::create_dir_all(&to).ok()?;
    for entry in std::fs::read_dir(from).ok()?.flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).ok()?;
    }
    Some(to)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if !cli.summarize.is_empty() {
        return summarize(&cli.summarize);
    }
    let started = Instant::now();
    let shape = Shape {
        nodes: cli.nodes,
        services: cli.services,
        sites: cli.sites.max(1),
        zones: cli.zones.max(1),
        max_nodes: cli.max_nodes.max(1),
    };
    let limit = Duration::from_secs(cli.phase_timeout);
    let operator_bin = cli.operator.clone().unwrap_or_default();
    anyhow::ensure!(
        operator_bin.is_file(),
        "no operator binary at {}",
        operator_bin.display()
    );

    progress(
        started,
        "starting the control plane (etcd, kube-apiserver, controller manager, scheduler, kwok)",
    );
    let plane = ControlPlane::start(Options {
        kwok: true,
        ..Options::default()
    })
    .await
    .context("starting the control plane")?;
    let client = plane.client().await?;
    let crds = edgewire_testenv::read_crds(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../crds"
    )))?;
    edgewire_testenv::install_crds(&client, &crds).await?;
    for ns in [NAMESPACE, PEER_NAMESPACE] {
        create_namespace(&client, ns).await?;
    }
    let version = client
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .unwrap_or_default();

    progress(started, format!("creating {} kwok nodes", shape.nodes));
    let specs: Vec<NodeSpec> = (0..shape.nodes)
        .map(|i| {
            fleet::node_labels(&shape, i)
                .iter()
                .fold(
                    // The operator takes endpoint addresses from the Node.
                    NodeSpec::new(fleet::node_name(i)).internal_ip(fleet::node_address(i)),
                    |n, (k, v)| n.label(k, v),
                )
                .pod_cidr(pod_cidr(i))
        })
        .collect();
    let bench = Bench {
        client: client.clone(),
        limit,
        deadline: cli.budget.map(|b| started + Duration::from_secs(b)),
        started,
    };
    bench.create_nodes(&specs).await?;
    let nodes_ready = bench.wait_nodes_ready(shape.nodes).await?;
    progress(started, format!("nodes ready: {nodes_ready:?}"));

    progress(
        started,
        format!("creating {} EdgeNodes with simulated agents", shape.nodes),
    );
    let agents = agents::Agents::start(
        client.clone(),
        NAMESPACE,
        (0..shape.nodes)
            .map(|i| (fleet::node_name(i), fleet::node_address(i)))
            .collect(),
        Duration::from_secs(cli.heartbeat_interval),
        Duration::from_secs(cli.connections_report_interval),
        cli.agent_heartbeats,
    )
    .await
    .context("creating the EdgeNodes")?;

    let mut operator = Operator::start(
        &operator_bin,
        &plane,
        NAMESPACE,
        cli.heartbeat_timeout,
        &cli.operator_log_level,
        &[
            "--status-interval".to_string(),
            cli.status_interval.to_string(),
        ]
        .into_iter()
        .chain(cli.operator_args.iter().cloned())
        .collect::<Vec<_>>(),
    )
    .await?;
    progress(
        started,
        format!("operator leading; RSS {} MiB", operator.rss_kib() / 1024),
    );
    let edgenodes_ready = bench.wait_edgenodes_ready(shape.nodes).await?;
    progress(started, format!("EdgeNodes Ready: {edgenodes_ready:?}"));

    let mut report = Report::new(shape, version);
    report.heartbeat_interval = cli.heartbeat_interval;
    report.agent_heartbeats = cli.agent_heartbeats;
    report.connections_interval = cli.connections_report_interval;
    report.heartbeat_timeout = cli.heartbeat_timeout;
    report.status_interval = cli.status_interval;
    report.idle_rss_kib = operator.rss_kib();
    let transitions = TransitionWatch::start(
        &client,
        NAMESPACE,
        agents.heartbeats.clone(),
        Duration::from_secs(cli.heartbeat_timeout),
    );

    // Phase 1: apply every EdgeService, wait for all Ready.
    let apiserver = plane.pid_of("kube-apiserver");
    let apiserver_cpu = apiserver.and_then(phase::cpu_seconds);
    let before = operator.scrape().await;
    let apiserver_before = apiserver::scrape(&client).await;
    let t0 = Instant::now();
    let services = (0..shape.services)
        .map(|j| fleet::edge_service(&shape, j))
        .collect::<anyhow::Result<Vec<_>>>()?;
    bench
        .apply_all(NAMESPACE, &services, "EdgeServices")
        .await?;
    report.applied_in = t0.elapsed();
    let site_of: BTreeMap<String, String> = (0..shape.nodes)
        .map(|i| (fleet::node_name(i), fleet::site(i % shape.sites)))
        .collect();
    report.all_ready = bench
        .wait_services_settled(NAMESPACE, &site_of, shape.services, t0)
        .await?;
    let after = operator.scrape().await;
    report.apply = Figures::between(&before, &after);
    report.apply_apiserver_cpu = apiserver
        .and_then(phase::cpu_seconds)
        .zip(apiserver_cpu)
        .map(|(after, before)| after - before);
    report.apply_write_waits = apiserver_before
        .zip(apiserver::scrape(&client).await)
        .map(|(before, after)| apiserver::write_waits(&before, &after));
    report.apply_rss_kib = operator.rss_kib();
    progress(started, format!("all Ready: {:?}", report.all_ready));

    // Steady state: heartbeats only, first with every connection count
    // changing at every heartbeat, then with the counts frozen. Between the
    // two, the time for the last changes to be reported and written passes
    // unmeasured, so the constant window sees none of them.
    transitions.set_phase(1);
    let window = Duration::from_secs(cli.steady_seconds);
    let steady = |label: &'static str| {
        let (operator, agents, bench) = (&operator, &agents, &bench);
        async move {
            if bench.over_budget() {
                return None;
            }
            progress(
                started,
                format!("steady state, {label}, for {} s", window.as_secs()),
            );
            let before = operator.scrape().await;
            let beats = agents.writes.load(Ordering::Relaxed);
            let t0 = Instant::now();
            tokio::time::sleep(window).await;
            let after = operator.scrape().await;
            Some(Steady {
                figures: Figures::between(&before, &after),
                seconds: t0.elapsed().as_secs_f64(),
                heartbeats: agents.writes.load(Ordering::Relaxed) - beats,
            })
        }
    };
    let mut skipped = Vec::new();
    match steady("connection counts changing").await {
        Some(s) => report.steady_churn = s,
        None => skipped.push("the steady state with changing connection counts"),
    }
    agents.churn.store(false, Ordering::Relaxed);
    if !bench.over_budget() {
        // Until the counts last changed have reached the EdgeServices: the
        // agents report them within a connections interval (and the next
        // heartbeat), the operator writes them within a status interval.
        let reported = match cli.agent_heartbeats {
            agents::HeartbeatMode::Lease => {
                cli.connections_report_interval + cli.heartbeat_interval
            }
            agents::HeartbeatMode::Status => cli.heartbeat_interval,
        };
        tokio::time::sleep(Duration::from_secs(reported + cli.status_interval + 2)).await;
    }
    match steady("connection counts constant").await {
        Some(s) => report.steady_still = s,
        None => skipped.push("the steady state with constant connection counts"),
    }
    agents.churn.store(true, Ordering::Relaxed);

    // Phase 2: the relabel burst.
    transitions.set_phase(2);
    if bench.over_budget() {
        skipped.push("the relabel burst");
    } else {
        let moves = fleet::relabels(&shape, cli.relabels);
        let mut site_of = site_of;
        for (i, site) in &moves {
            site_of.insert(fleet::node_name(*i), site.clone());
        }
        let before = operator.scrape().await;
        let t0 = Instant::now();
        bench.relabel(&moves).await?;
        report.relabelled = moves.len();
        report.relabel_settled = bench
            .wait_services_settled(NAMESPACE, &site_of, shape.services, t0)
            .await?;
        let after = operator.scrape().await;
        report.relabel = Figures::between(&before, &after);
        report.relabel_rss_kib = operator.rss_kib();
        progress(
            started,
            format!("settled after relabels: {:?}", report.relabel_settled),
        );
    }
    report.max_rss_kib = operator.max_rss_kib();
    report.transitions = transitions.counts();
    report.false_examples = transitions.examples();
    drop(transitions);
    report.agent_writes = agents.writes.load(Ordering::Relaxed);
    report.agent_status_writes = agents.status_writes.load(Ordering::Relaxed);
    report.agent_failures = agents.failures.load(Ordering::Relaxed);
    report.heartbeat_late_ms = agents.latest_ms.load(Ordering::Relaxed);
    progress(
        started,
        format!(
            "transitions out of Ready (apply, steady, relabel): {:?}",
            report.transitions
        ),
    );
    drop(agents);
    operator.stop();
    progress(
        started,
        format!("the operator's log: {}", operator.log.display()),
    );

    // The peer: the same intent as Deployments, on a quiet control plane.
    if cli.no_peer {
        report.peer_all_available = Err("not run (--no-peer)".into());
    } else if bench.over_budget() {
        skipped.push("the Deployment peer");
    } else {
        tokio::time::sleep(Duration::from_secs(5)).await;
        progress(
            started,
            format!(
                "peer: applying {} Deployments of {} replicas",
                shape.services, shape.max_nodes
            ),
        );
        let t0 = Instant::now();
        let deployments = (0..shape.services)
            .map(|j| fleet::deployment(&shape, j))
            .collect::<anyhow::Result<Vec<_>>>()?;
        bench
            .apply_all(PEER_NAMESPACE, &deployments, "Deployments")
            .await?;
        (report.peer_all_available, report.peer_last) = bench
            .wait_deployments_available(PEER_NAMESPACE, shape.services, shape.max_nodes, t0)
            .await?;
        progress(
            started,
            format!("peer all Available: {:?}", report.peer_all_available),
        );
    }
    if !skipped.is_empty() {
        report.notes.push(format!(
            "Not run: the run's time budget ({} s) was spent before {}.",
            cli.budget.unwrap_or_default(),
            skipped.join(", ")
        ));
    }

    if let Some(logs) = keep_logs(&plane) {
        progress(
            started,
            format!("the control plane's logs: {}", logs.display()),
        );
    }
    progress(started, "stopping the control plane");
    plane.stop().context("stopping the control plane")?;
    let text = report.render();
    println!("{text}");
    if let Some(out) = cli.out {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&out, format!("{text}\n"))
            .with_context(|| format!("writing {}", out.display()))?;
        progress(started, format!("report written to {}", out.display()));
    }
    if let Some(path) = cli.summary {
        std::fs::write(&path, serde_json::to_string_pretty(&report.summary())?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("edgewire-opbench: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("edgewire-opbench: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
