//! `edgewire-testenv`: the test control plane as a command.
//!
//! - `up` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler
//!   and kwok on 127.0.0.1, waits until the API server is ready, and prints
//!   the admin kubeconfig's path (last line). The processes keep running.
//! - `nodes` adds kwok-simulated nodes with labels.
//! - `down DIR` stops them and removes the directory.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgewire_testenv::{ControlPlane, NodeSpec, Options};

#[derive(Parser)]
#[command(
    name = "edgewire-testenv",
    about = "A Kubernetes control plane on loopback for edgewire's tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a control plane and print its kubeconfig path.
    Up {
        /// Data directory (created); a new temporary one by default.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Do not start kwok.
        #[arg(long)]
        no_kwok: bool,
    },
    /// Add simulated nodes named PREFIX-0 .. PREFIX-(COUNT-1).
    Nodes {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value = "edge")]
        prefix: String,
        /// A label KEY=VALUE for every node; repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Stop the control plane in DIR and remove DIR.
    Down { dir: PathBuf },
    /// Build (or find) the pinned binaries and print their directory.
    Bin,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Up { dir, no_kwok } => {
            let plane = ControlPlane::start(Options {
                kwok: !no_kwok,
                detached: true,
                dir,
                ..Options::default()
            })
            .await
            .context("starting the control plane")?;
            eprintln!(
                "control plane ready: {} (data in {})",
                plane.server,
                plane.dir.display()
            );
            eprintln!(
                "stop it with: edgewire-testenv down {}",
                plane.dir.display()
            );
            println!("{}", plane.kubeconfig.display());
        }
        Cmd::Nodes {
            kubeconfig,
            count,
            prefix,
            labels,
        } => {
            let client = edgewire_testenv::client_for(&kubeconfig).await?;
            let nodes: Vec<NodeSpec> = (0..count)
                .map(|i| {
                    labels
                        .iter()
                        .fold(NodeSpec::new(format!("{prefix}-{i}")), |n, (k, v)| {
                            n.label(k, v)
                        })
                })
                .collect();
            edgewire_testenv::add_nodes(&client, &nodes)
                .await
                .context("creating nodes")?;
            for node in &nodes {
                println!("{}", node.name);
            }
        }
        Cmd::Down { dir } => {
            edgewire_testenv::stop_detached(&dir).context("stopping the control plane")?;
            eprintln!("stopped; removed {}", dir.display());
        }
        Cmd::Bin => println!("{}", edgewire_testenv::bin_dir()?.display()),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("edgewire-testenv: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("edgewire-testenv: {err:#}");
            ExitCode::FAILURE
        }
    }
}
