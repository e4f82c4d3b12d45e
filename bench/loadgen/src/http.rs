//! HTTP request load: `clients` keep-alive connections, each sending
//! `requests` GETs one after another, every answer checked. One JSON object
//! of figures, as the WebSocket workloads print.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::workload::histogram;

/// What one run asks for.
pub struct HttpRun {
    /// `http://ip:port/path?query`, loopback only.
    pub url: String,
    pub clients: usize,
    pub requests: usize,
    /// Each answer's body must contain this.
    pub expect: String,
    pub timeout: Duration,
}

/// `ip:port` and path of an `http://` URL, refusing anything not loopback.
fn target(url: &str) -> anyhow::Result<(std::net::SocketAddr, String)> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let addr: std::net::SocketAddr = authority
        .parse()
        .with_context(|| format!("{authority} is not ip:port"))?;
    if !addr.ip().is_loopback() {
        bail!("benchmarks only talk to loopback; {addr} is not");
    }
    Ok((addr, path))
}

/// One client: a connection, then its requests in turn.
async fn client(
    addr: std::net::SocketAddr,
    path: String,
    requests: usize,
    expect: String,
    timeout: Duration,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let mut hist = histogram();
    for _ in 0..requests {
        let request = Request::get(path.as_str())
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let sent = Instant::now();
        let response = tokio::time::timeout(timeout, async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        })
        .await
        .context("a request outlived the run's time limit")??;
        hist.record(sent.elapsed().as_micros() as u64).ok();
        let (status, body) = response;
        if !status.is_success() || !String::from_utf8_lossy(&body).contains(&expect) {
            bail!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    drop(sender);
    driver.abort();
    Ok(hist)
}

pub async fn http(run: HttpRun) -> anyhow::Result<Value> {
    let (addr, path) = target(&run.url)?;
    let started = Instant::now();
    let tasks: Vec<_> = (0..run.clients)
        .map(|_| {
            tokio::spawn(client(
                addr,
                path.clone(),
                run.requests,
                run.expect.clone(),
                run.timeout,
            ))
        })
        .collect();
    let mut all = histogram();
    for task in tasks {
        all.add(task.await??).ok();
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "requests": all.len(),
        "seconds": seconds,
        "p50_us": all.value_at_quantile(0.5),
        "p99_us": all.value_at_quantile(0.99),
        "p999_us": all.value_at_quantile(0.999),
        "per_second": all.len() as f64 / seconds,
    }))
}
