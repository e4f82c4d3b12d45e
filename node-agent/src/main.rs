//! `edgewire-agent`: runs the services of one edge node. With no `--config` it
//! serves the built-in default (the seed's echo and add services).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use edgewire_agent::budget::Budget;
use edgewire_agent::handlers::wasm::WasmRuntime;
use edgewire_agent::mesh::noise::{Identity, StaticKey};
use edgewire_agent::service::Shared;
use edgewire_agent::{admin, agent::Agent, cluster, config_source, mesh::Mesh, metrics::Metrics};
use edgewire_api::AgentConfig;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "edgewire-agent",
    version,
    about = "edgewire's edge node agent: WebSocket relay, compute handlers and metrics"
)]
struct Cli {
    /// Config file (YAML or JSON). Without it (and without --cluster) the
    /// built-in default runs.
    #[arg(long, env = "EDGEWIRE_CONFIG", conflicts_with = "cluster")]
    config: Option<PathBuf>,
    /// Run as a cluster node: follow the EdgeServices placed on --node-name
    /// (in-cluster credentials, or $KUBECONFIG) and report its EdgeNode.
    #[arg(long, env = "EDGEWIRE_CLUSTER")]
    cluster: bool,
    /// In a cluster: the address written to this node's EdgeNode, where
    /// clients and peers reach it. Defaults to --listen-address.
    #[arg(long, env = "NODE_IP")]
    advertise_address: Option<String>,
    /// In a cluster: where the last received config is kept for offline
    /// restarts. Always: where compiled Wasm code is cached by module digest
    /// (best effort; an unwritable directory only costs a compile per start),
    /// where a service with a hub keeps its uplink queue (`uplink/`), and
    /// where a hub keeps what it has delivered (`uplink-dedup/`).
    #[arg(long, env = "EDGEWIRE_STATE_DIR", default_value = "/var/lib/edgewire")]
    state_dir: PathBuf,
    /// In a cluster: seconds between heartbeats (node Lease renewals, or
    /// EdgeNode status reports without --lease-namespace).
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    heartbeat_interval: f64,
    /// In a cluster: the namespace of this node's Lease (the operator's
    /// --lease-namespace), renewed as the heartbeat; the EdgeNode status is
    /// then written only when it changes. Without it, every heartbeat writes
    /// the status.
    #[arg(long, env = "EDGEWIRE_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// In a cluster with a node Lease: seconds between status reports whose
    /// only change is a connection count, at least.
    #[arg(long, default_value_t = 60.0, value_parser = seconds)]
    connections_report_interval: f64,
    /// In a cluster: a KEY=VALUE label for this node's EdgeNode; repeatable.
    #[arg(long = "edge-node-label", value_parser = key_value)]
    edge_node_labels: Vec<(String, String)>,
    /// Address the services listen on.
    #[arg(long, env = "EDGEWIRE_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    listen_address: IpAddr,
    /// Address of /metrics, /healthz and /readyz (IP:PORT).
    #[arg(long, env = "EDGEWIRE_ADMIN_ADDRESS", default_value = "0.0.0.0:9180", value_parser = admin::parse_address)]
    admin_address: SocketAddr,
    /// Connections the admin endpoint serves at once; more wait to be accepted.
    #[arg(long, env = "EDGEWIRE_ADMIN_MAX_CONNECTIONS", default_value_t = admin::Limits::default().max_connections)]
    admin_max_connections: usize,
    /// Seconds an admin client has to send a complete request head.
    #[arg(long, env = "EDGEWIRE_ADMIN_HEADER_TIMEOUT", default_value_t = admin::Limits::default().header_timeout.as_secs_f64(), value_parser = seconds)]
    admin_header_timeout: f64,
    /// Log filter: a level (info, debug...) or tracing directives.
    #[arg(long, env = "EDGEWIRE_LOG", default_value = "info")]
    log_level: String,
    #[arg(long, env = "EDGEWIRE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// How often the config file is checked for changes, in seconds.
    #[arg(long, default_value_t = 2.0, value_parser = seconds)]
    reload_interval: f64,
    /// How long shutdown waits for connections to close, in seconds.
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    drain_timeout: f64,
    /// In a cluster, on SIGTERM: how long the agent, having reported its
    /// services as not listening, waits for the operator to take this node
    /// out of the endpoints before it closes its ports, in seconds.
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    leave_timeout: f64,
    /// This node's name: how mesh peers know it (and, in a cluster, the Node).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Listen for mesh links from peer agents here (enables the mesh).
    #[arg(long, env = "EDGEWIRE_MESH_ADDRESS")]
    mesh_address: Option<SocketAddr>,
    /// File holding an optional mesh secret (a mounted Kubernetes Secret):
    /// when set, every agent must have the same one, mixed into each mesh
    /// handshake as a pre-shared key on top of the node keys.
    #[arg(long, env = "EDGEWIRE_MESH_SECRET_FILE")]
    mesh_secret_file: Option<PathBuf>,
    /// This node's mesh private key; made there (mode 0600) when missing.
    /// Defaults to mesh.key in --state-dir.
    #[arg(long, env = "EDGEWIRE_MESH_KEY_FILE")]
    mesh_key_file: Option<PathBuf>,
    /// Print this node's mesh public key (making the key if missing) and exit.
    #[arg(long)]
    print_mesh_public_key: bool,
    /// Bytes each mesh link may have queued for its peer; more is dropped
    /// (counted as mesh_unavailable).
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    mesh_link_queue_bytes: usize,
    /// Bytes the agent may have queued in all, for every client and mesh
    /// link together; more is dropped (counted as memory_budget). The
    /// default leaves room under the chart's 512 MiB memory limit.
    #[arg(long, env = "EDGEWIRE_QUEUE_BUDGET", default_value_t = 256 * 1024 * 1024)]
    queue_budget: usize,
    /// A Docker config file (as `docker login` or `oras login` write it)
    /// with the credentials for pulling image modules. In a cluster, a
    /// module's `imagePullSecret` is used instead.
    #[arg(long, env = "EDGEWIRE_REGISTRY_CONFIG")]
    registry_config: Option<PathBuf>,
    /// Seconds between two resolutions of an image module's reference (a
    /// tag pushed anew rolls out within this).
    #[arg(long, default_value_t = edgewire_agent::handlers::wasm::DEFAULT_IMAGE_RECHECK.as_secs_f64(), value_parser = seconds)]
    image_recheck_interval: f64,
    /// Validate the config and exit.
    #[arg(long)]
    check: bool,
    /// Print the built-in default config as YAML and exit.
    #[arg(long)]
    print_default_config: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&cli.log_level)
        .with_context(|| format!("invalid log filter {:?}", cli.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Where this node's mesh private key lives.
fn mesh_key_path(cli: &Cli) -> PathBuf {
    cli.mesh_key_file
        .clone()
        .unwrap_or_else(|| cli.state_dir.join("mesh.key"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_mesh_public_key {
        return match StaticKey::load_or_create(&mesh_key_path(&cli)) {
            Ok(key) => {
                println!("{}", key.public_hex());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("edgewire-agent: {:#}", anyhow::Error::from(err));
                ExitCode::FAILURE
            }
        };
    }
    if cli.print_default_config {
        match AgentConfig::builtin_default().to_yaml() {
            Ok(text) => {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            Err(err) => {
                eprintln!("edgewire-agent: {err:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Err(err) = init_logging(&cli) {
        eprintln!("edgewire-agent: {err:#}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("edgewire-agent: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("edgewire-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the secret, binds the mesh listener and starts accepting peers.
async fn start_mesh(
    cli: &Cli,
    address: SocketAddr,
    metrics: Metrics,
    queue_budget: Arc<Budget>,
) -> anyhow::Result<Arc<Mesh>> {
    let node = cli
        .node_name
        .clone()
        .context("--mesh-address needs --node-name (or NODE_NAME)")?;
    let key = StaticKey::load_or_create(&mesh_key_path(cli))?;
    let secret = match &cli.mesh_secret_file {
        Some(path) => {
            let secret = std::fs::read(path)
                .with_context(|| format!("cannot read the mesh secret {}", path.display()))?;
            let secret = secret.trim_ascii().to_vec();
            anyhow::ensure!(
                secret.len() >= 16,
                "the mesh secret in {} must be at least 16 bytes",
                path.display()
            );
            Some(secret)
        }
        None => None,
    };
    let identity = Identity::new(node.clone(), key, secret.as_deref());
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for mesh links on {address}"))?;
    tracing::info!(
        %address,
        node = %node,
        public_key = %identity.public_hex(),
        pre_shared_key = secret.is_some(),
        "mesh listening"
    );
    let mesh = Mesh::new(identity, metrics, cli.mesh_link_queue_bytes, queue_budget);
    tokio::spawn(Arc::clone(&mesh).serve(listener));
    Ok(mesh)
}

/// Connects to the cluster and starts following this node's placement.
async fn start_cluster(
    cli: &Cli,
    mesh_public_key: Option<String>,
    agent: Arc<Agent>,
    stop: CancellationToken,
    leave: cluster::Leave,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let node = cli
        .node_name
        .clone()
        .context("--cluster needs --node-name (or NODE_NAME, from the downward API)")?;
    let advertise_address = match &cli.advertise_address {
        Some(address) => address.clone(),
        None if !cli.listen_address.is_unspecified() => cli.listen_address.to_string(),
        None => anyhow::bail!(
            "--cluster needs --advertise-address (or NODE_IP) when listening on {}",
            cli.listen_address
        ),
    };
    // Building the client reads credentials only; it does not need the API
    // server to be up, so an agent starting offline still serves.
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes credentials (in-cluster or $KUBECONFIG)")?;
    let options = cluster::Options {
        node,
        advertise_address,
        mesh_port: cli.mesh_address.map(|a| a.port()),
        mesh_public_key,
        state_dir: cli.state_dir.clone(),
        heartbeat_interval: Duration::from_secs_f64(cli.heartbeat_interval),
        lease_namespace: cli.lease_namespace.clone(),
        connections_interval: Duration::from_secs_f64(cli.connections_report_interval),
        edge_node_labels: cli.edge_node_labels.iter().cloned().collect(),
        leave_timeout: Duration::from_secs_f64(cli.leave_timeout),
    };
    Ok(tokio::spawn(cluster::run(
        agent, client, options, stop, leave,
    )))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let (config, source) = match &cli.config {
        Some(path) => {
            let (config, bytes) = config_source::load(path).await?;
            (config, Some((path.clone(), bytes)))
        }
        None => (AgentConfig::builtin_default(), None),
    };
    if cli.check {
        println!("config is valid: {} service(s)", config.services.len());
        return Ok(ExitCode::SUCCESS);
    }

    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let queue_budget = Budget::new(cli.queue_budget);
    let mesh = match cli.mesh_address {
        Some(address) => {
            Some(start_mesh(&cli, address, metrics.clone(), Arc::clone(&queue_budget)).await?)
        }
        None => None,
    };
    let shared = Shared {
        metrics,
        mesh: mesh.clone(),
        queue_budget,
        wasm: WasmRuntime::with_images(
            Some(cli.state_dir.clone()),
            cli.registry_config.clone(),
            Duration::from_secs_f64(cli.image_recheck_interval),
        ),
        uplink: edgewire_agent::uplink::Context {
            node: cli.node_name.clone(),
            state_dir: cli.state_dir.clone(),
        },
    };
    let agent = Arc::new(Agent::new(cli.listen_address, shared));

    let admin = admin::bind(cli.admin_address)
        .await
        .with_context(|| format!("cannot listen on admin address {}", cli.admin_address))?;
    tracing::info!(address = %cli.admin_address, "admin endpoint (/metrics, /healthz, /readyz) listening");
    let limits = admin::Limits {
        max_connections: cli.admin_max_connections,
        header_timeout: Duration::from_secs_f64(cli.admin_header_timeout),
    };
    let admin_task = tokio::spawn(admin::serve(
        admin,
        Arc::clone(&agent),
        limits,
        stop.clone(),
    ));

    let leave = CancellationToken::new();
    let (left_tx, left) = tokio::sync::oneshot::channel();
    let cluster_task = if cli.cluster {
        let handoff = cluster::Leave {
            now: leave.clone(),
            done: left_tx,
        };
        let key = mesh.as_ref().map(|m| m.public_key());
        Some(start_cluster(&cli, key, Arc::clone(&agent), stop.clone(), handoff).await?)
    } else {
        agent.apply(&config).await;
        None
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        services = config.services.len(),
        source = cli
            .config
            .as_ref()
            .map_or("built-in default".to_string(), |p| p.display().to_string()),
        "edgewire-agent started"
    );

    let watch_task = source.map(|(path, bytes)| {
        tokio::spawn(config_source::watch(
            path,
            config.clone(),
            bytes,
            Arc::clone(&agent),
            Duration::from_secs_f64(cli.reload_interval),
            stop.clone(),
        ))
    });

    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    if cluster_task.is_some() {
        // Out of the endpoints first, so no new client is sent to a port
        // that is about to close; the services serve on meanwhile.
        tracing::info!(
            signal = which,
            "shutting down: reporting the services as leaving"
        );
        agent.leave().await;
        leave.cancel();
        let bound = Duration::from_secs_f64(cli.leave_timeout) + Duration::from_secs(10);
        let _ = tokio::time::timeout(bound, left).await;
    }
    let drain = Duration::from_secs_f64(cli.drain_timeout);
    tracing::info!(
        signal = which,
        drain_seconds = cli.drain_timeout,
        "shutting down: closing connections"
    );
    let drained = agent.shutdown(drain).await;
    stop.cancel();
    let _ = admin_task.await;
    if let Some(task) = watch_task {
        let _ = task.await;
    }
    if let Some(task) = cluster_task {
        let _ = task.await;
    }
    if drained {
        tracing::info!("all connections closed; bye");
    } else {
        tracing::warn!("drain time ran out with connections still open; exiting anyway");
    }
    Ok(ExitCode::SUCCESS)
}
