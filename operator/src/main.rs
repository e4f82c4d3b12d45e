//! `edgewire-operator`: `crd` prints the CRDs; `run` runs the controllers.
//!
//! A map: `controller.rs` is the EdgeService reconcile loop; `placement.rs`,
//! `desired.rs` and `status.rs` are its pure decisions; `edgenode.rs` keeps
//! EdgeNode readiness; `leader.rs` is leader election (and its write
//! fence); `metrics.rs` and
//! `admin.rs` are what Prometheus and the kubelet probes see; `watch.rs` is
//! how the watches ride out an API server outage; `triggers.rs` which
//! Node and EdgeNode changes are worth a reconcile; `caches.rs` runs each
//! watch on its own task and `queue.rs` carries what they learn to the
//! controller; `freshness.rs` judges heartbeats by when they were seen;
//! `index.rs` keeps the lookups a reconcile needs.

mod address;
mod admin;
mod caches;
mod controller;
mod crdgen;
mod desired;
mod edgenode;
mod events;
#[cfg(test)]
mod fixtures;
mod freshness;
mod index;
mod leader;
mod metrics;
mod placement;
mod placement_book;
mod placement_slices;
mod ports;
mod queue;
mod secret_access;
mod secret_check;
mod service_events;
mod status;
mod triggers;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use kube::runtime::events::{Recorder, Reporter};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "edgewire-operator",
    version,
    about = "edgewire's operator: places EdgeServices onto edge nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the CRD YAML (or write one file per CRD into --dir).
    Crd {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run the controllers (in-cluster credentials, or $KUBECONFIG).
    // Boxed: the flags outweigh every other subcommand.
    Run(Box<RunArgs>),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "EDGEWIRE_METRICS_ADDRESS", default_value = "0.0.0.0:9181", value_parser = admin::parse_address)]
    metrics_address: SocketAddr,
    /// Connections the metrics endpoint serves at once; more wait to be accepted.
    #[arg(long, env = "EDGEWIRE_ADMIN_MAX_CONNECTIONS", default_value_t = admin::Limits::default().max_connections)]
    admin_max_connections: usize,
    /// Seconds a metrics client has to send a complete request head.
    #[arg(long, env = "EDGEWIRE_ADMIN_HEADER_TIMEOUT", default_value_t = admin::Limits::default().header_timeout.as_secs())]
    admin_header_timeout: u64,
    /// Namespace of the leader-election Lease, and of the agents' node
    /// Leases (their heartbeats), watched here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "edgewire-system")]
    lease_namespace: String,
    #[arg(long, default_value = "edgewire-operator")]
    lease_name: String,
    /// This replica's name in the Lease; the pod name in a cluster.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a standby waits, after it last saw the Lease change, before
    /// it takes the Lease over.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Seconds the leader goes on leading without a successful renewal;
    /// shorter than the lease duration, so it has stopped writing before a
    /// standby may take over.
    #[arg(long, default_value_t = 10)]
    renew_deadline: u64,
    /// Seconds between renewals, and between a standby's tries.
    #[arg(long, default_value_t = 2)]
    retry_period: u64,
    /// Only EdgeServices of this namespace (all namespaces when unset).
    #[arg(long, env = "EDGEWIRE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Only Nodes and EdgeNodes matching this label selector.
    #[arg(long, env = "EDGEWIRE_NODE_SELECTOR")]
    node_selector: Option<String>,
    /// Seconds after an agent's last heartbeat before its node is stale and
    /// leaves the endpoints.
    #[arg(long, default_value_t = 30)]
    heartbeat_timeout: u64,
    /// Seconds a node may stay stale before its services move elsewhere.
    #[arg(long, default_value_t = 300)]
    eviction_timeout: u64,
    /// Seconds between EdgeService status writes whose only change is a
    /// connection count.
    #[arg(long, default_value_t = 30)]
    status_interval: u64,
    /// EdgeServices reconciled at the same time, at most. Most of a
    /// reconcile is waiting on the API server's answers to its writes, so
    /// more at once keep a busy API server fed.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    reconcile_concurrency: u16,
    /// EdgeNodes reconciled at the same time, at most. A new leader's first
    /// pass writes the conditions of every EdgeNode; the bound keeps what
    /// that pass holds in memory small.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    edgenode_concurrency: u16,
    /// Milliseconds an EdgeService waits after a change before it is
    /// reconciled; changes that come meanwhile join the wait and never
    /// lengthen it. The writes of one reconcile, or agents reporting
    /// together, are then decided on once (as the EndpointSlice
    /// controller's `--endpoint-updates-batch-period` batches Pod changes).
    /// 0: at once.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    reconcile_batch_period_ms: u64,
    /// Nodes per PlacementSlice at most (an EdgeService's placement is
    /// written in slices of this many nodes).
    #[arg(long, default_value_t = placement_slices::DEFAULT_NODES_PER_SLICE as u64,
          value_parser = clap::value_parser!(u64).range(1..=5_000))]
    placement_slice_size: u64,
    /// The host ports EdgeServices may use, `MIN-MAX`; others are not placed.
    #[arg(long, env = "EDGEWIRE_HOST_PORTS", default_value = "1024-65535")]
    host_ports: ports::PortRange,
    /// Namespaces whose EdgeServices may also use ports below the range
    /// (comma-separated).
    #[arg(
        long,
        env = "EDGEWIRE_PRIVILEGED_PORT_NAMESPACES",
        value_delimiter = ','
    )]
    privileged_port_namespaces: Vec<String>,
    /// The agents' ServiceAccount, `NAMESPACE/NAME`: in each namespace it is
    /// granted `get` on exactly the Secrets the EdgeServices there name (a
    /// Role and RoleBinding the operator keeps). Unset: no such grants.
    #[arg(long, env = "EDGEWIRE_AGENT_SERVICE_ACCOUNT")]
    agent_service_account: Option<secret_access::AgentAccount>,
    #[arg(long, env = "EDGEWIRE_LOG", default_value = "info")]
    log_level: String,
    #[arg(long, env = "EDGEWIRE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Crd { dir } => match write_crds(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("edgewire-operator: {err:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Run(args) => {
            if let Err(err) = init_logging(&args) {
                eprintln!("edgewire-operator: {err:#}");
                return ExitCode::from(2);
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    eprintln!("edgewire-operator: cannot start the runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(*args)) {
                Ok(code) => code,
                Err(err) => {
                    tracing::error!("{err:#}");
                    eprintln!("edgewire-operator: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn write_crds(dir: Option<PathBuf>) -> anyhow::Result<()> {
    match dir {
        None => print!("{}", crdgen::all().context("rendering the CRDs")?),
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, text) in crdgen::files().context("rendering the CRDs")? {
                let path = dir.join(name);
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

fn init_logging(args: &RunArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("invalid log filter {:?}", args.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// How long in-flight reconciles may take to finish on a clean shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A client of the API server that counts the requests it sends and, with a
/// fence, sends writes only while the fence is open.
fn api_client(
    config: kube::Config,
    metrics: &metrics::Metrics,
    fence: Option<leader::Fence>,
) -> anyhow::Result<kube::Client> {
    let counted = metrics.clone();
    let builder = kube::client::ClientBuilder::try_from(config)
        .context("building the Kubernetes client")?
        .with_layer(&tower::util::MapRequestLayer::new(
            move |request: http::Request<kube::client::Body>| {
                counted.api_request(&request);
                request
            },
        ));
    Ok(match fence {
        Some(fence) => builder
            .with_layer(&tower::filter::FilterLayer::new(fence))
            .build(),
        None => builder.build(),
    })
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let timing = leader::Timing::new(
        Duration::from_secs(args.lease_duration),
        Duration::from_secs(args.renew_deadline),
        Duration::from_secs(args.retry_period),
    )
    .context("--lease-duration, --renew-deadline, --retry-period")?;
    let metrics = metrics::Metrics::new();
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes credentials (in-cluster or $KUBECONFIG)")?;
    // The controllers write through the fence; the elector must reach the
    // Lease while not leading, so it has a client of its own.
    let fence = leader::Fence::default();
    let client = api_client(config.clone(), &metrics, Some(fence.clone()))?;
    let lease_client = api_client(config, &metrics, None)?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("edgewire-operator-{}", std::process::id()));
    let health = Arc::new(admin::Health::default());
    let stop = CancellationToken::new();

    let listener = tokio::net::TcpListener::bind(args.metrics_address)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_address))?;
    let admin_task = tokio::spawn(admin::serve(
        listener,
        metrics.clone(),
        Arc::clone(&health),
        admin::Limits {
            max_connections: args.admin_max_connections,
            header_timeout: Duration::from_secs(args.admin_header_timeout.max(1)),
        },
        stop.clone(),
    ));
    health.ready.store(true, Ordering::Release);

    let signals = stop.clone();
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        signals.cancel();
    });

    let mut elector = leader::Elector::new(
        lease_client,
        &args.lease_namespace,
        &args.lease_name,
        &identity,
        timing,
    );
    let settings = controller::Settings {
        heartbeat_timeout: Duration::from_secs(args.heartbeat_timeout),
        eviction_timeout: Duration::from_secs(args.eviction_timeout.max(args.heartbeat_timeout)),
        status_interval: Duration::from_secs(args.status_interval),
        concurrency: args.reconcile_concurrency,
        batch_period: Duration::from_millis(args.reconcile_batch_period_ms),
        placement_slice_size: usize::try_from(args.placement_slice_size)
            .unwrap_or(placement_slices::DEFAULT_NODES_PER_SLICE),
        ports: ports::PortPolicy {
            range: args.host_ports,
            privileged_namespaces: (args.privileged_port_namespaces.iter())
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect(),
        },
        agent_account: args.agent_service_account.clone(),
    };
    let scope = controller::Scope {
        namespace: args.watch_namespace.clone(),
        node_selector: args.node_selector.clone(),
        lease_namespace: args.lease_namespace.clone(),
    };
    tracing::info!(%identity, lease = %args.lease_name, namespace = %args.lease_namespace, "acquiring leadership");
    // Lead until stopped. Losing the lease (e.g. the API server was away for
    // longer than the renew deadline, or this process was frozen) aborts the
    // controllers and goes back to standby: another replica may lead by now.
    while let Some(acquired) = elector.acquire(&stop).await {
        fence.open_until(acquired + timing.renew_deadline);
        tracing::info!(%identity, "leading; starting controllers");
        metrics.set_leader(true);
        let controllers_stop = CancellationToken::new();
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "edgewire-operator".into(),
                instance: Some(identity.clone()),
            },
        );
        // A new term observes heartbeats afresh: every node gets a full
        // heartbeat timeout from now before it can be judged stale.
        let clock = Arc::new(freshness::HeartbeatClock::new(settings.timeouts()));
        let mut controllers = tokio::task::JoinSet::new();
        controllers.spawn(controller::run(
            client.clone(),
            recorder.clone(),
            metrics.clone(),
            settings.clone(),
            scope.clone(),
            Arc::clone(&clock),
            controllers_stop.clone(),
        ));
        controllers.spawn(edgenode::run(
            client.clone(),
            recorder,
            metrics.clone(),
            clock,
            scope.clone(),
            args.edgenode_concurrency,
            controllers_stop.clone(),
        ));
        let ended = elector.hold(&fence, &stop).await;
        if let leader::Ended::Stopped = ended {
            // Still the leader: in-flight reconciles may finish while the
            // Lease is ours, then it is handed over at once.
            controllers_stop.cancel();
            let grace = fence
                .remaining(std::time::Instant::now())
                .unwrap_or_default()
                .min(SHUTDOWN_GRACE);
            if tokio::time::timeout(grace, async {
                while controllers.join_next().await.is_some() {}
            })
            .await
            .is_err()
            {
                controllers.shutdown().await;
            }
            fence.close();
            metrics.set_leader(false);
            elector.release().await;
            break;
        }
        // Not (surely) the leader any more: nothing may be written from
        // now on, and nothing in flight may finish.
        fence.close();
        controllers.shutdown().await;
        metrics.set_leader(false);
        tracing::warn!(%identity, reason = %ended, "lost leadership; controllers stopped, standing by");
    }
    health.ready.store(false, Ordering::Release);
    stop.cancel();
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
