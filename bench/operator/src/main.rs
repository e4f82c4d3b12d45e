//! `edgewire-opbench`: the operator at scale. On the real control plane
//! (etcd, kube-apiserver, controller manager, scheduler) with kwok nodes, it
//! measures how long edgewire-operator takes from applying EdgeServices to
//! all Ready, its reconcile times, API requests and memory; the same after a
//! burst of node relabels; and, as the peer, the stock path for the same
//! intent (a Deployment per service, placed by kube-scheduler and run by
//! kwok) from apply to all Available. It prints figures and never fails on a
//! time. Every wait is bounded.

mod agents;
mod fleet;
mod phase;
mod promtext;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use edgewire_testenv::{ControlPlane, NodeSpec, Options};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};

use fleet::Shape;
use phase::{Bench, Operator, Report};

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
    #[arg(long, env = "EDGEWIRE_OPERATOR")]
    operator: PathBuf,
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
    /// The operator's --heartbeat-timeout, in seconds.
    #[arg(long, default_value_t = 60)]
    heartbeat_timeout: u64,
    /// Upper bound on each wait, in seconds.
    #[arg(long, default_value_t = 600)]
    phase_timeout: u64,
    /// The operator's --log-level (its log is kept; the path is printed).
    #[arg(long, default_value = "warn")]
    operator_log_level: String,
    /// Skip the Deployment peer.
    #[arg(long)]
    no_peer: bool,
    /// Where to write the report (markdown).
    #[arg(long)]
    out: Option<PathBuf>,
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    let started = Instant::now();
    let shape = Shape {
        nodes: cli.nodes,
        services: cli.services,
        sites: cli.sites.max(1),
        zones: cli.zones.max(1),
        max_nodes: cli.max_nodes.max(1),
    };
    let limit = Duration::from_secs(cli.phase_timeout);
    anyhow::ensure!(
        cli.operator.is_file(),
        "no operator binary at {}",
        cli.operator.display()
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
            fleet::node_labels(&shape, i).iter().fold(
                // The operator takes endpoint addresses from the Node.
                NodeSpec::new(fleet::node_name(i)).internal_ip(fleet::node_address(i)),
                |n, (k, v)| n.label(k, v),
            )
        })
        .collect();
    let bench = Bench {
        client: client.clone(),
        limit,
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
    )
    .await
    .context("creating the EdgeNodes")?;

    let mut operator = Operator::start(
        &cli.operator,
        &plane,
        NAMESPACE,
        cli.heartbeat_timeout,
        &cli.operator_log_level,
    )
    .await?;
    progress(
        started,
        format!("operator leading; RSS {} MiB", operator.rss_kib() / 1024),
    );

    let mut report = Report::new(
        shape,
        version,
        cli.heartbeat_interval,
        cli.heartbeat_timeout,
    );
    report.idle_rss_kib = operator.rss_kib();

    // Phase 1: apply every EdgeService, wait for all Ready.
    let before = operator.scrape().await;
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
    report.apply = phase::Figures::between(&before, &after);
    report.apply_rss_kib = operator.rss_kib();
    progress(started, format!("all Ready: {:?}", report.all_ready));

    // Let the heartbeats run a full interval with nothing else changing:
    // the operator's steady-state cost per heartbeat.
    let before = operator.scrape().await;
    let steady = Duration::from_secs(cli.heartbeat_interval);
    progress(started, format!("steady state for {}s", steady.as_secs()));
    tokio::time::sleep(steady).await;
    let after = operator.scrape().await;
    report.steady = phase::Figures::between(&before, &after);
    report.steady_seconds = steady.as_secs_f64();

    // Phase 2: the relabel burst.
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
    report.relabel = phase::Figures::between(&before, &after);
    report.relabel_rss_kib = operator.rss_kib();
    report.max_rss_kib = operator.max_rss_kib();
    progress(
        started,
        format!("settled after relabels: {:?}", report.relabel_settled),
    );
    report.agent_writes = agents.writes.load(std::sync::atomic::Ordering::Relaxed);
    report.agent_failures = agents.failures.load(std::sync::atomic::Ordering::Relaxed);
    report.heartbeat_late_ms = agents.latest_ms.load(std::sync::atomic::Ordering::Relaxed);
    drop(agents);
    operator.stop();
    progress(
        started,
        format!("the operator's log: {}", operator.log.display()),
    );

    // The peer: the same intent as Deployments, on a quiet control plane.
    if !cli.no_peer {
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
        report.peer_all_available = bench
            .wait_deployments_available(PEER_NAMESPACE, shape.services, shape.max_nodes, t0)
            .await?;
        progress(
            started,
            format!("peer all Available: {:?}", report.peer_all_available),
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
