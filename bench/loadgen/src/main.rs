//! `edgewire-loadgen`: drives WebSocket and HTTP servers and prints one JSON
//! line of figures. It speaks edgewire's relay protocol, plain text echo and
//! NATS over WebSocket, NATS itself (uplink through leaf nodes), and
//! HTTP/1.1 GETs, so that edgewire and its peers
//! are measured with the same client. It is a bench tool, not a test: every run is bounded in count and
//! in time, and it only talks to loopback addresses.

mod dial;
mod http;
mod mesh;
mod uplink;
mod workload;

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use dial::Dial;

#[derive(Parser)]
#[command(
    name = "edgewire-loadgen",
    version,
    about = "WebSocket load generator for edgewire's benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Round-trip latency: each client sends a message and waits for its answer.
    Echo {
        /// ws://host:port/path
        #[arg(long)]
        url: String,
        #[command(flatten)]
        dial: Dial,
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// Round trips per client.
        #[arg(long, default_value_t = 100)]
        messages: usize,
    },
    /// One publisher, many subscribers on one server: deliveries per second.
    Fanout {
        #[arg(long)]
        url: String,
        #[command(flatten)]
        dial: Dial,
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 200)]
        messages: usize,
    },
    /// Opening handshakes per second (connect, upgrade, close).
    Handshakes {
        #[arg(long)]
        url: String,
        #[command(flatten)]
        dial: Dial,
        #[arg(long, default_value_t = 2000)]
        count: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
    },
    /// Opens idle connections, prints a line once all are open, and holds
    /// them for --hold seconds.
    Idle {
        #[arg(long)]
        url: String,
        #[command(flatten)]
        dial: Dial,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long, default_value_t = 5)]
        hold: u64,
    },
    /// HTTP GETs over keep-alive connections: requests per second and
    /// latency, every answer checked.
    Http {
        /// http://ip:port/path?query (loopback only)
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// Requests per client.
        #[arg(long, default_value_t = 200)]
        requests: usize,
        /// Each answer's body must contain this.
        #[arg(long, default_value = "")]
        expect: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// A publisher at one server, subscribers at others: publish-to-delivery
    /// latency and throughput across links, with loss and order checked.
    Mesh {
        #[arg(long)]
        publish_url: String,
        /// Where subscribers connect; repeatable.
        #[arg(long = "subscribe-url", required = true)]
        subscribe_urls: Vec<String>,
        #[command(flatten)]
        dial: Dial,
        /// Subscribers at each subscribe URL.
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        #[arg(long, default_value_t = 5000)]
        messages: u64,
        /// Messages per second; 0 publishes as fast as the link takes them.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
    },
    /// Edge nodes publishing up to a hub (edgewire edge agents and their
    /// hub, or NATS leaf servers and their hub): throughput, latency, and
    /// the drain after an outage the driver makes (see `uplink/driver.rs`).
    Uplink(uplink::UplinkRun),
}

impl Cmd {
    fn timeout(&self) -> Duration {
        let dial = match self {
            Cmd::Echo { dial, .. }
            | Cmd::Fanout { dial, .. }
            | Cmd::Handshakes { dial, .. }
            | Cmd::Idle { dial, .. }
            | Cmd::Mesh { dial, .. } => dial,
            Cmd::Http { timeout, .. } => return Duration::from_secs(*timeout),
            Cmd::Uplink(run) => return Duration::from_secs(run.timeout),
        };
        Duration::from_secs(dial.timeout)
    }

    async fn run(self) -> anyhow::Result<serde_json::Value> {
        match self {
            Cmd::Echo {
                url,
                dial,
                clients,
                messages,
            } => workload::echo(dial, url, clients, messages).await,
            Cmd::Fanout {
                url,
                dial,
                subscribers,
                messages,
            } => workload::fanout(dial, url, subscribers, messages).await,
            Cmd::Handshakes {
                url,
                dial,
                count,
                concurrency,
            } => workload::handshakes(dial, url, count, concurrency).await,
            Cmd::Idle {
                url,
                dial,
                connections,
                hold,
            } => workload::idle(dial, url, connections, hold).await,
            Cmd::Http {
                url,
                clients,
                requests,
                expect,
                timeout,
            } => {
                http::http(http::HttpRun {
                    url,
                    clients,
                    requests,
                    expect,
                    timeout: Duration::from_secs(timeout),
                })
                .await
            }
            Cmd::Mesh {
                publish_url,
                subscribe_urls,
                dial,
                subscribers,
                messages,
                rate,
            } => {
                let run = mesh::MeshRun {
                    publish_url,
                    subscribe_urls,
                    subscribers,
                    messages,
                    rate,
                };
                mesh::mesh(dial, run).await
            }
            Cmd::Uplink(run) => uplink::uplink(run).await,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cmd = Cli::parse().command;
    let limit = cmd.timeout();
    let result = tokio::time::timeout(limit, cmd.run())
        .await
        .with_context(|| format!("the run exceeded its time limit of {limit:?}"))??;
    println!("{result}");
    Ok(())
}
