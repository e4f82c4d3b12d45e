//! Test support: the agent binary started as a process on loopback, with a
//! config file the test can rewrite, and small real clients for HTTP and
//! WebSocket.
#![allow(dead_code)]

pub mod cluster;
pub mod prometheus;
pub mod tls;

use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Upper bound on any single wait in these tests; generous for two noisy cores.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub struct AgentProcess {
    child: Child,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl AgentProcess {
    /// Starts the agent with `config` (YAML) and waits until it is ready.
    pub async fn start(config: &str) -> AgentProcess {
        let agent = AgentProcess::spawn(Some(config), &[]);
        agent.wait_ready().await;
        agent
    }

    /// Starts the agent without waiting; `config` None runs the built-in default.
    pub fn spawn(config: Option<&str>, extra_args: &[&str]) -> AgentProcess {
        AgentProcess::spawn_on("127.0.0.1", config, extra_args)
    }

    /// Starts the agent with its services (and admin endpoint) on `ip`.
    pub fn spawn_on(ip: &str, config: Option<&str>, extra_args: &[&str]) -> AgentProcess {
        AgentProcess::spawn_with_env(ip, config, extra_args, &[])
    }

    /// As `spawn_on`, with extra environment variables.
    pub fn spawn_with_env(
        ip: &str,
        config: Option<&str>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("agent.yaml");
        let log_path = dir.path().join("agent.log");
        let admin: SocketAddr = format!("{ip}:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgewire-agent"));
        cmd.arg("--listen-address")
            .arg(ip)
            .arg("--admin-address")
            .arg(admin.to_string())
            .arg("--reload-interval")
            .arg("0.2")
            .arg("--log-level")
            .arg("debug")
            .args(extra_args)
            .envs(env.iter().copied())
            .env_remove("EDGEWIRE_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).expect("log file"));
        if let Some(config) = config {
            std::fs::write(&config_path, config).expect("write config");
            cmd.arg("--config").arg(&config_path);
        }
        let child = cmd.spawn().expect("start edgewire-agent");
        AgentProcess {
            child,
            admin,
            config_path,
            log_path,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok((200, _)) = http_get(self.admin, "/readyz").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready in time; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn readyz(&self) -> (u16, Value) {
        let (status, body) = http_get(self.admin, "/readyz").await.expect("readyz");
        (status, serde_json::from_str(&body).expect("readyz is JSON"))
    }

    /// The address a service listens on, from `/readyz`.
    pub async fn service_addr(&self, service: &str) -> SocketAddr {
        let (_, body) = self.readyz().await;
        body["services"]
            .as_array()
            .and_then(|all| all.iter().find(|s| s["name"] == service))
            .and_then(|s| s["address"].as_str())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("service {service} has no address in {body}"))
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics").await.expect("metrics");
        assert_eq!(status, 200);
        body
    }

    /// Waits until `metric{labels}` reaches `at_least`; returns the value.
    pub async fn wait_metric(&self, series: &str, at_least: f64) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = metric_value(&self.metrics().await, series);
            if value >= at_least {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{series} stayed at {value}, wanted {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Rewrites the config file atomically, as a ConfigMap update would.
    pub fn write_config(&self, config: &str) {
        let tmp = self.config_path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp).expect("temp config");
        file.write_all(config.as_bytes())
            .expect("write temp config");
        file.sync_all().ok();
        std::fs::rename(&tmp, &self.config_path).expect("replace config");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process' resident set size, now and at its peak, in bytes (Linux).
    pub fn rss(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map(|kib| kib * 1024)
                .unwrap_or_else(|| panic!("no {name} in /proc/PID/status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The mesh public key of the node whose private key is at `path` (made
/// there if missing), as `edgewire-agent --print-mesh-public-key` prints it.
pub fn mesh_public_key(path: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_edgewire-agent"))
        .arg("--mesh-key-file")
        .arg(path)
        .arg("--print-mesh-public-key")
        .output()
        .expect("run edgewire-agent --print-mesh-public-key");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The value of one series in a Prometheus text exposition; 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// `http_get` with the body read as JSON: a body that is not JSON as a
/// string, a request that failed as status 0 and its error.
pub async fn http_get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    match http_get(addr, path).await {
        Ok((status, body)) => (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        ),
        Err(err) => (0, Value::String(err.to_string())),
    }
}

/// A plain HTTP/1.1 GET; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

pub async fn connect(addr: SocketAddr, path: &str) -> Client {
    let url = format!("ws://{addr}{path}");
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(&url))
        .await
        .expect("connect in time")
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    ws
}

pub async fn send_text(ws: &mut Client, text: impl Into<String>) {
    ws.send(Message::text(text.into())).await.expect("send");
}

/// The next text or close message, skipping pings; panics after `WAIT`.
pub async fn next_message(ws: &mut Client) -> Message {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("stream open")
            .expect("no error");
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

pub async fn next_text(ws: &mut Client) -> String {
    match next_message(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

pub async fn next_json(ws: &mut Client) -> Value {
    serde_json::from_str(&next_text(ws).await).expect("server sends JSON")
}

/// Reads until the server's close frame; returns it.
pub async fn expect_close(ws: &mut Client) -> CloseFrame {
    let deadline = Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, ws.next()).await {
            Err(_) => panic!("no close frame in time"),
            Ok(Some(Ok(Message::Close(Some(frame))))) => return frame,
            Ok(Some(Ok(Message::Close(None)))) => panic!("close without a code"),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => panic!("error before close frame: {e}"),
            Ok(None) => panic!("stream ended without a close frame"),
        }
    }
}

/// Lets late messages land for `settle`, then drops whatever `subs` have
/// received (each read bounded at 50 ms): what a probe loop leaves behind.
pub async fn drop_late_messages(subs: &mut [&mut Client], settle: Duration) {
    tokio::time::sleep(settle).await;
    for sub in subs.iter_mut() {
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(50), (**sub).next()).await
        {}
    }
}

/// Subscribes to `channel` at `to`, then publishes at `from` (up to 200
/// rounds, 100 ms each) until the subscriber hears one. Returns the
/// subscriber, the publisher and the first message that crossed the mesh.
pub async fn first_across_mesh(
    from: SocketAddr,
    to: SocketAddr,
    channel: &str,
) -> (Client, Client, Option<Value>) {
    let mut subscriber = connect(to, "/relay").await;
    assert_eq!(
        request(
            &mut subscriber,
            serde_json::json!({"type": "subscribe", "channel": channel, "id": 1})
        )
        .await["type"],
        "subscribed"
    );
    let mut publisher = connect(from, "/relay").await;
    for round in 0..200 {
        send_text(
            &mut publisher,
            serde_json::json!({"type": "publish", "channel": channel, "data": {"round": round}})
                .to_string(),
        )
        .await;
        if let Ok(message) =
            tokio::time::timeout(Duration::from_millis(100), next_json(&mut subscriber)).await
        {
            return (subscriber, publisher, Some(message));
        }
    }
    (subscriber, publisher, None)
}

/// A subscriber to `channel` at `addr` with a tiny receive buffer that never
/// reads: its socket fills at once, then its send queue in the agent.
pub async fn never_reading_subscriber(addr: SocketAddr, channel: &str) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("a small receive buffer");
    let tcp = socket.connect(addr).await.expect("connect");
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("ws://{addr}/relay"), MaybeTlsStream::Plain(tcp))
            .await
            .expect("WebSocket handshake");
    let reply = request(
        &mut ws,
        serde_json::json!({"type": "subscribe", "channel": channel}),
    )
    .await;
    assert_eq!(reply["type"], "subscribed");
    ws
}

/// Sends a request and returns the reply.
pub async fn request(ws: &mut Client, request: Value) -> Value {
    send_text(ws, request.to_string()).await;
    next_json(ws).await
}

/// A binary of another workspace package, next to this test's own build
/// (`cargo test --workspace` builds every package's binaries). Built here
/// when a narrower `cargo test -p` left it out.
pub fn workspace_binary(package: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = profile_dir.join(package);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", package, "--bin", package])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p {package} failed");
    }
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// `EDGEWIRE_PYTHON`, or a virtualenv in `target/test-venv` that this test
/// creates (once) with the seed clients' packages.
pub fn python() -> String {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(find_or_make_python).clone()
}

fn find_or_make_python() -> String {
    if let Ok(python) = std::env::var("EDGEWIRE_PYTHON") {
        return python;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join("target/test-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let made = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "python3 -m venv {} failed",
            venv.display()
        );
    }
    let requirements =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seed/requirements.txt");
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements)
        .status();
    assert!(
        installed.is_ok_and(|s| s.success()),
        "installing {} failed",
        requirements.display()
    );
    python.display().to_string()
}

pub fn run_seed_client(file: &str) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/seed")
        .join(file);
    let out = Command::new(python())
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} {}: {e}", python(), script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "{file} needs websockets and requests (see tests/seed/requirements.txt):\n{stderr}"
    );
    assert!(out.status.success(), "{file} failed:\n{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The example Wasm components, built (once per test binary; cargo caches
/// across runs) for wasm32-wasip2 from `examples/wasm/`: the directory that
/// holds `<name>.wasm`.
pub fn wasm_components() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wasm");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .current_dir(&examples)
            .args([
                "build",
                "--release",
                "--locked",
                "--target",
                "wasm32-wasip2",
            ])
            .arg("--target-dir")
            .arg(examples.join("target"))
            .output()
            .expect("run cargo build for the example components");
        assert!(
            out.status.success(),
            "building examples/wasm failed (needs `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        examples.join("target/wasm32-wasip2/release")
    })
}
