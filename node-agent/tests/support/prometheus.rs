//! A real Prometheus for the end-to-end tests, built from its Go module
//! with the test control plane (`testenv/build.sh`; Debian's build leaves
//! out Kubernetes service discovery): started on loopback with the test's
//! scrape config, asked PromQL over its HTTP API, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::{WAIT, free_port};

/// How long a PromQL answer may take to become what the test expects:
/// scrapes every second, on two busy cores.
const PROMQL_WAIT: Duration = Duration::from_secs(90);
/// Starts tried when another program takes the port first.
const START_ATTEMPTS: u32 = 5;

/// A child process killed (and reaped) when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Prometheus {
    pub port: u16,
    log: PathBuf,
    _process: Killed,
}

impl Prometheus {
    /// Starts Prometheus with `config` (its YAML) in `dir` and waits until it
    /// serves queries. A port lost to another program between choosing and
    /// binding it is retried on a new one.
    pub async fn start(config: &str, dir: &Path) -> Prometheus {
        let program = edgewire_testenv::binary("prometheus")
            .expect("prometheus, which testenv/build.sh builds with the control plane");
        std::fs::create_dir_all(dir).expect("prometheus dir");
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port();
            let log = dir.join(format!("prometheus-{attempt}.log"));
            let mut process = Killed(
                Command::new(&program)
                    .arg(format!("--config.file={}", config_file.display()))
                    .arg(format!(
                        "--storage.tsdb.path={}",
                        dir.join(format!("data-{attempt}")).display()
                    ))
                    .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).expect("prometheus log"))
                    .spawn()
                    .expect("start prometheus"),
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(status)) = process.0.try_wait() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        text.contains("address already in use") && attempt < START_ATTEMPTS,
                        "prometheus exited ({status}):\n{text}"
                    );
                    break;
                }
                // Only Prometheus answers its own readiness path this way.
                if let Some((200, body)) = get(port, "/-/ready").await
                    && body.contains("Prometheus")
                {
                    return Prometheus {
                        port,
                        log,
                        _process: process,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus not ready on 127.0.0.1:{port}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        unreachable!("the last start attempt either returns or fails")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The answer to an instant query, or Null when Prometheus did not give one.
    pub async fn query(&self, query: &str) -> Value {
        let path = format!(
            "/api/v1/query?query={}",
            form_urlencoded::byte_serialize(query.as_bytes()).collect::<String>()
        );
        match get(self.port, &path).await {
            Some((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    /// The scrape targets, each as `address health lastError`: what a
    /// failing wait shows.
    pub async fn targets(&self) -> Vec<String> {
        let answer = match get(self.port, "/api/v1/targets").await {
            Some((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
            _ => Value::Null,
        };
        answer["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                format!(
                    "{} {} {}",
                    t["scrapeUrl"].as_str().unwrap_or_default(),
                    t["health"].as_str().unwrap_or_default(),
                    t["lastError"].as_str().unwrap_or_default()
                )
            })
            .collect()
    }

    /// The series of an instant query's answer (`data.result`).
    pub async fn series(&self, query: &str) -> Vec<Value> {
        self.query(query).await["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Polls `query` until its first sample satisfies `ok`; returns it.
    pub async fn wait_value(&self, query: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let mut last = Value::Null;
        let found = self
            .wait_series(query, |series| {
                last = Value::from(series.to_vec());
                sample(series.first()?).filter(|v| ok(*v))
            })
            .await;
        match found {
            Some(value) => value,
            None => panic!(
                "PromQL {query} never satisfied; last answer {last}; targets:\n{}",
                self.targets().await.join("\n")
            ),
        }
    }

    /// Polls `query` until `judge` finds in its series what it wants, at
    /// most `PROMQL_WAIT`; None when it never does.
    pub async fn wait_series<T>(
        &self,
        query: &str,
        mut judge: impl FnMut(&[Value]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + PROMQL_WAIT;
        loop {
            if let Some(found) = judge(&self.series(query).await) {
                return Some(found);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// GET `path` from Prometheus on 127.0.0.1:`port` with hyper's client
/// (its answers may be chunked); status and body, None when it fails.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let tcp = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(("127.0.0.1", port)))
        .await
        .ok()?
        .ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
        .body(Empty::<bytes::Bytes>::new())
        .ok()?;
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .ok()?
        .ok()?;
    let status = response.status().as_u16();
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The value of one series of an instant query.
pub fn sample(series: &Value) -> Option<f64> {
    series["value"][1].as_str()?.parse().ok()
}
