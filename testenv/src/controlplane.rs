//! Starting and stopping the control plane: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok, all on 127.0.0.1 with
//! free ports and a data directory of their own.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::kubeconfig;
use crate::listeners;
use crate::pki::Pki;
use crate::process::{self, Component};

/// How long each component gets to come up on a busy two-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often a component is started on new ports after finding one taken.
const PORT_ATTEMPTS: usize = 5;
/// Kubernetes needs a service range to allocate from; nothing is ever sent to it.
const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service's address: the first of `SERVICE_CIDR`.
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Also run kwok, so Node objects with the kwok annotation become ready
    /// simulated nodes and pods on them report Running.
    pub kwok: bool,
    /// Leave the processes running after this process exits (the CLI's `up`).
    pub detached: bool,
    /// Where to put the data; a new temporary directory when None.
    pub dir: Option<PathBuf>,
    /// An audit policy (YAML) for the API server. When set, the API server
    /// writes its audit log, one JSON event a line, to
    /// [`ControlPlane::audit_log`].
    pub audit_policy: Option<String>,
    /// Ports to try first instead of free ones; any found taken is replaced.
    pub first_ports: Option<Ports>,
    /// Serve the API to real nodes too (see `realnode`).
    pub node_access: Option<NodeAccess>,
}

/// How real nodes (kubelets in network namespaces on a bridge) reach the API
/// server: it listens and advertises on the host's address on that bridge
/// instead of 127.0.0.1, and authorizes kubelets as a real cluster does (Node
/// authorization, NodeRestriction, a client certificate towards kubelets).
#[derive(Clone, Debug)]
pub struct NodeAccess {
    pub address: std::net::Ipv4Addr,
}

/// The ports the control plane listens on, all on 127.0.0.1.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ports {
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub apiserver: u16,
    pub controller_manager: u16,
    pub scheduler: u16,
    pub kwok: Option<u16>,
}

impl Ports {
    pub fn all(&self) -> Vec<u16> {
        let mut ports = vec![
            self.etcd_client,
            self.etcd_peer,
            self.apiserver,
            self.controller_manager,
            self.scheduler,
        ];
        ports.extend(self.kwok);
        ports
    }
}

/// What the CLI's `down` needs to find a detached control plane again.
#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    pub pids: Vec<i32>,
    pub ports: Ports,
    pub kubeconfig: PathBuf,
}

pub const STATE_FILE: &str = "state.json";

pub struct ControlPlane {
    id: u64,
    pub dir: PathBuf,
    pub server: String,
    /// Admin (system:masters) kubeconfig.
    pub kubeconfig: PathBuf,
    pub ports: Ports,
    pub pki: Pki,
    components: Vec<Component>,
    /// Started in sessions of their own, to outlive this process.
    detached: bool,
    /// Set once a detached start succeeded; until then a failure (or drop)
    /// stops everything, so a failed `up` leaves nothing behind.
    keep_running: bool,
    stopped: bool,
}

/// The directory of the pinned binaries: `EDGEWIRE_TESTENV_BIN`, or whatever
/// `testenv/build.sh` prints after building (or finding) them in its cache.
pub fn bin_dir() -> Result<PathBuf, Error> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(dir) = std::env::var_os("EDGEWIRE_TESTENV_BIN") {
            return Ok(PathBuf::from(dir));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!("{} failed ({})", script.display(), out.status));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .last()
            .map(PathBuf::from)
            .ok_or_else(|| format!("{} printed no directory", script.display()))
    })
    .clone()
    .map_err(Error::Setup)
}

/// A file `testenv/build.sh` puts in the cache, or an error saying so.
fn built(path: PathBuf) -> Result<PathBuf, Error> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Setup(format!(
            "{} is missing; run testenv/build.sh",
            path.display()
        )))
    }
}

pub fn binary(name: &str) -> Result<PathBuf, Error> {
    built(bin_dir()?.join(name))
}

fn kwok_stages() -> Result<PathBuf, Error> {
    let cache = bin_dir()?;
    let dir = cache
        .parent()
        .ok_or_else(|| Error::Setup("the bin dir has no parent".into()))?;
    built(dir.join("kwok-stages.yaml"))
}

/// A port that is free now. Something else may take it before the component
/// that is given it binds it; `launch_listening` starts that component again
/// on another port.
pub fn free_port() -> Result<u16, Error> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::io("finding a free port", e))
}

fn s(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

impl ControlPlane {
    pub async fn start(options: Options) -> Result<ControlPlane, Error> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let dir = match &options.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io("creating the data dir", e))?;
                dir.clone()
            }
            None => tempfile::Builder::new()
                .prefix("edgewire-testenv-")
                .tempdir()
                .map_err(|e| Error::io("creating the data dir", e))?
                .keep(),
        };
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| Error::io("creating the log dir", e))?;
        let api_address = options
            .node_access
            .as_ref()
            .map_or_else(|| "127.0.0.1".to_string(), |a| a.address.to_string());
        let extra_sans: Vec<String> = options
            .node_access
            .iter()
            .map(|a| a.address.to_string())
            .collect();
        let pki = Pki::generate(&dir.join("pki"), &extra_sans)?;
        let node_flags: Vec<String> = match &options.node_access {
            None => s(&["--authorization-mode=RBAC"]),
            Some(_) => vec![
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                format!(
                    "--kubelet-client-certificate={}",
                    path(&pki.kubelet_client.cert)
                ),
                format!("--kubelet-client-key={}", path(&pki.kubelet_client.key)),
                // Node names are not in any DNS; logs and exec go to the address.
                "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
            ],
        };
        let mut ports = match &options.first_ports {
            Some(first) => first.clone(),
            None => Ports {
                etcd_client: free_port()?,
                etcd_peer: free_port()?,
                apiserver: free_port()?,
                controller_manager: free_port()?,
                scheduler: free_port()?,
                kwok: if options.kwok {
                    Some(free_port()?)
                } else {
                    None
                },
            },
        };
        if options.kwok && ports.kwok.is_none() {
            ports.kwok = Some(free_port()?);
        }
        let kubeconfig = dir.join("admin.kubeconfig");
        let kcm_kubeconfig = dir.join("controller-manager.kubeconfig");
        let scheduler_kubeconfig = dir.join("scheduler.kubeconfig");

        let mut plane = ControlPlane {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            dir: dir.clone(),
            server: String::new(),
            kubeconfig: kubeconfig.clone(),
            ports: ports.clone(),
            pki: pki.clone(),
            components: Vec::new(),
            detached: options.detached,
            keep_running: false,
            stopped: false,
        };
        let etcd_dir = dir.join("etcd");
        plane
            .launch_listening(
                "etcd",
                &mut ports,
                |p| {
                    p.etcd_client = free_port()?;
                    p.etcd_peer = free_port()?;
                    // Whatever the failed start wrote names the old ports.
                    let _ = std::fs::remove_dir_all(&etcd_dir);
                    Ok(())
                },
                |p| {
                    let client = format!("http://127.0.0.1:{}", p.etcd_client);
                    let peer = format!("http://127.0.0.1:{}", p.etcd_peer);
                    vec![
                        "--name=testenv".into(),
                        format!("--data-dir={}", path(&etcd_dir)),
                        format!("--listen-client-urls={client}"),
                        format!("--advertise-client-urls={client}"),
                        format!("--listen-peer-urls={peer}"),
                        format!("--initial-advertise-peer-urls={peer}"),
                        format!("--initial-cluster=testenv={peer}"),
                        // A test cluster does not need its writes on disk before the
                        // ack; this keeps etcd off the critical path of every test.
                        "--unsafe-no-fsync".into(),
                        "--log-level=warn".into(),
                    ]
                },
                |p| vec![p.etcd_client, p.etcd_peer],
            )
            .await?;
        let etcd_client_port = ports.etcd_client;
        plane
            .wait_for("etcd", || etcd_healthy(etcd_client_port))
            .await?;

        let etcd_client = format!("http://127.0.0.1:{}", ports.etcd_client);
        let apiserver_dir = dir.join("apiserver");
        let audit = audit_args(&dir, options.audit_policy.as_deref())?;
        plane
            .launch_listening(
                "kube-apiserver",
                &mut ports,
                |p| {
                    p.apiserver = free_port()?;
                    Ok(())
                },
                |p| {
                    [
                        vec![
                            format!("--bind-address={api_address}"),
                            format!("--advertise-address={api_address}"),
                        ],
                        node_flags.clone(),
                        s(&[
                            "--allow-privileged=true",
                            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                            "--enable-priority-and-fairness=false",
                            "--profiling=false",
                        ]),
                        vec![
                            format!("--etcd-servers={etcd_client}"),
                            format!("--secure-port={}", p.apiserver),
                            format!("--cert-dir={}", path(&apiserver_dir)),
                            format!("--tls-cert-file={}", path(&pki.serving.cert)),
                            format!("--tls-private-key-file={}", path(&pki.serving.key)),
                            format!("--client-ca-file={}", path(&pki.ca.cert)),
                            format!(
                                "--service-account-key-file={}",
                                path(&pki.service_account_pub)
                            ),
                            format!(
                                "--service-account-signing-key-file={}",
                                path(&pki.service_account_key)
                            ),
                            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                        ],
                        audit.clone(),
                    ]
                    .concat()
                },
                |p| vec![p.apiserver],
            )
            .await?;
        // The kubeconfigs name the API server's port, known only now.
        let server = format!("https://{api_address}:{}", ports.apiserver);
        let write = |file: &Path, text: String| {
            std::fs::write(file, text)
                .map_err(|e| Error::io(format!("writing {}", file.display()), e))
        };
        write(
            &kubeconfig,
            kubeconfig::render(&server, &pki.ca.cert, "admin", &pki.admin),
        )?;
        write(
            &kcm_kubeconfig,
            kubeconfig::render(
                &server,
                &pki.ca.cert,
                "controller-manager",
                &pki.controller_manager,
            ),
        )?;
        write(
            &scheduler_kubeconfig,
            kubeconfig::render(&server, &pki.ca.cert, "scheduler", &pki.scheduler),
        )?;
        plane.server = server;
        let client = plane.client().await?;
        plane
            .wait_for_async("kube-apiserver /readyz", || readyz(client.clone()))
            .await?;

        let kcm_dir = dir.join("controller-manager");
        plane
            .launch_listening(
                "kube-controller-manager",
                &mut ports,
                |p| {
                    p.controller_manager = free_port()?;
                    Ok(())
                },
                |p| {
                    vec![
                        format!("--kubeconfig={}", path(&kcm_kubeconfig)),
                        format!("--authentication-kubeconfig={}", path(&kcm_kubeconfig)),
                        format!("--authorization-kubeconfig={}", path(&kcm_kubeconfig)),
                        "--bind-address=127.0.0.1".into(),
                        format!("--secure-port={}", p.controller_manager),
                        format!("--cert-dir={}", path(&kcm_dir)),
                        "--leader-elect=false".into(),
                        // As kubeadm runs it: each controller under its own service account,
                        // with the RBAC roles Kubernetes bootstraps for it.
                        "--use-service-account-credentials=true".into(),
                        format!(
                            "--service-account-private-key-file={}",
                            path(&pki.service_account_key)
                        ),
                        format!("--root-ca-file={}", path(&pki.ca.cert)),
                        format!("--cluster-signing-cert-file={}", path(&pki.ca.cert)),
                        format!("--cluster-signing-key-file={}", path(&pki.ca.key)),
                        // Simulated nodes come and go in tests; do not wait five
                        // minutes before evicting from one that went away.
                        "--node-monitor-grace-period=20s".into(),
                    ]
                },
                |p| vec![p.controller_manager],
            )
            .await?;
        let scheduler_dir = dir.join("scheduler");
        plane
            .launch_listening(
                "kube-scheduler",
                &mut ports,
                |p| {
                    p.scheduler = free_port()?;
                    Ok(())
                },
                |p| {
                    vec![
                        format!("--kubeconfig={}", path(&scheduler_kubeconfig)),
                        format!(
                            "--authentication-kubeconfig={}",
                            path(&scheduler_kubeconfig)
                        ),
                        format!("--authorization-kubeconfig={}", path(&scheduler_kubeconfig)),
                        "--bind-address=127.0.0.1".into(),
                        format!("--secure-port={}", p.scheduler),
                        format!("--cert-dir={}", path(&scheduler_dir)),
                        "--leader-elect=false".into(),
                    ]
                },
                |p| vec![p.scheduler],
            )
            .await?;
        if options.kwok {
            let stages = kwok_stages()?;
            plane
                .launch_listening(
                    "kwok",
                    &mut ports,
                    |p| {
                        p.kwok = Some(free_port()?);
                        Ok(())
                    },
                    |p| {
                        vec![
                            format!("--kubeconfig={}", path(&kubeconfig)),
                            format!("--config={}", path(&stages)),
                            "--manage-all-nodes=false".into(),
                            format!(
                                "--manage-nodes-with-annotation-selector={}=fake",
                                crate::nodes::KWOK_ANNOTATION
                            ),
                            format!("--server-address=127.0.0.1:{}", p.kwok.unwrap_or(0)),
                            // Renew a Lease per node, as kwokctl runs kwok: the
                            // heartbeat stage refreshes node status only every
                            // 10-20 minutes, so without leases the node lifecycle
                            // controller marks every node Unknown within its grace
                            // period, and its pods NotReady for good (kwok readies
                            // Pending pods only).
                            "--node-lease-duration-seconds=40".into(),
                        ]
                    },
                    |p| p.kwok.into_iter().collect(),
                )
                .await?;
        }
        plane.ports = ports;
        if plane.detached {
            plane.write_state()?;
            plane.keep_running = true;
        } else {
            process::register(plane.id, plane.pids(), plane.dir.clone());
        }
        tracing::info!(kubeconfig = %plane.kubeconfig.display(), "control plane ready");
        Ok(plane)
    }

    fn launch(&mut self, name: &str, args: Vec<String>) -> Result<(), Error> {
        let program = binary(name)?;
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let component = process::start(name, &program, &args, log, self.detached)?;
        self.components.push(component);
        if !self.detached {
            // Registered as soon as it runs, so a failure later in start-up
            // still leaves nothing behind.
            process::register(self.id, self.pids(), self.dir.clone());
        }
        Ok(())
    }

    /// Starts a component and waits until it listens, itself, on each of
    /// `own(ports)`. Its ports come from `free_port()` and it binds them
    /// later, so something else on the machine may take one in between: then
    /// it fails with "address already in use", and it is started again on
    /// ports `repick` chooses, a bounded number of times.
    async fn launch_listening(
        &mut self,
        name: &str,
        ports: &mut Ports,
        repick: impl Fn(&mut Ports) -> Result<(), Error>,
        args: impl Fn(&Ports) -> Vec<String>,
        own: impl Fn(&Ports) -> Vec<u16>,
    ) -> Result<(), Error> {
        for attempt in 1..=PORT_ATTEMPTS {
            self.launch(name, args(ports))?;
            let started = Instant::now();
            let lost = loop {
                let Some(component) = self.components.last_mut() else {
                    return Err(Error::Setup(format!("{name} was not started")));
                };
                let pid = component.pid();
                let exited = component.child.try_wait().ok().flatten();
                let log = std::fs::read_to_string(&component.log).unwrap_or_default();
                if listeners::lost_port_race(&log) {
                    break true;
                }
                if let Some(status) = exited {
                    return Err(Error::Exited {
                        name: name.to_string(),
                        status: status.to_string(),
                        log: component.log_tail(),
                    });
                }
                if own(ports)
                    .into_iter()
                    .all(|port| listeners::process_listens(pid, port))
                {
                    break false;
                }
                if started.elapsed() > START_TIMEOUT {
                    return Err(Error::Timeout {
                        what: format!("{name} listening on {:?}", own(ports)),
                        last: String::new(),
                        log: component.log_tail(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if !lost {
                return Ok(());
            }
            let Some(mut failed) = self.components.pop() else {
                return Err(Error::Setup(format!("{name} was not started")));
            };
            let tail = failed.log_tail();
            process::stop_all(std::slice::from_mut(&mut failed), STOP_GRACE);
            if attempt == PORT_ATTEMPTS {
                return Err(Error::Setup(format!(
                    "{name} found its port taken {PORT_ATTEMPTS} times; its log ends:\n{tail}"
                )));
            }
            tracing::info!(name, ports = ?own(ports), "port taken before the component bound it; new ports");
            repick(ports)?;
        }
        Ok(())
    }

    /// Fails fast when a component has exited, with the end of its log.
    fn check_running(&mut self) -> Result<(), Error> {
        for c in &mut self.components {
            if let Ok(Some(status)) = c.child.try_wait() {
                return Err(Error::Exited {
                    name: c.name.clone(),
                    status: status.to_string(),
                    log: c.log_tail(),
                });
            }
        }
        Ok(())
    }

    async fn wait_for(&mut self, what: &str, mut ready: impl FnMut() -> bool) -> Result<(), Error> {
        self.wait_for_async(what, || {
            let ok = ready();
            async move { Ok::<bool, String>(ok) }
        })
        .await
    }

    async fn wait_for_async<F, Fut>(&mut self, what: &str, mut ready: F) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool, String>>,
    {
        let started = Instant::now();
        let mut last = String::new();
        loop {
            self.check_running()?;
            match ready().await {
                Ok(true) => {
                    tracing::debug!(what, elapsed = ?started.elapsed(), "ready");
                    return Ok(());
                }
                Ok(false) => {}
                Err(err) => last = err,
            }
            if started.elapsed() > START_TIMEOUT {
                let logs = self
                    .components
                    .last()
                    .map(|c| format!("{}:\n{}", c.name, c.log_tail()))
                    .unwrap_or_default();
                return Err(Error::Timeout {
                    what: what.to_string(),
                    last,
                    log: logs,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops one component (e.g. `kube-apiserver`, to test what happens
    /// while the API is out of reach); `start_component` brings it back.
    pub fn stop_component(&mut self, name: &str) -> Result<(), Error> {
        let component = self
            .components
            .iter_mut()
            .find(|c| c.name == name)
            .ok_or_else(|| Error::Setup(format!("no component {name}")))?;
        process::stop_all(std::slice::from_mut(component), STOP_GRACE);
        Ok(())
    }

    /// Starts a stopped component again with the same flags and ports, and
    /// waits until it is ready (the API server: `/readyz`). Components that
    /// gave up while it was away (the controller manager exits when the API
    /// server vanishes mid-start) are started again too, as a kubelet would.
    pub async fn start_component(&mut self, name: &str) -> Result<(), Error> {
        self.restart(name)?;
        if name == "kube-apiserver" {
            let client = self.client().await?;
            let started = Instant::now();
            loop {
                if readyz(client.clone()).await == Ok(true) {
                    break;
                }
                if started.elapsed() > START_TIMEOUT {
                    return Err(Error::Timeout {
                        what: "kube-apiserver /readyz after a restart".into(),
                        last: String::new(),
                        log: String::new(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let exited: Vec<String> = self
            .components
            .iter_mut()
            .filter_map(|c| matches!(c.child.try_wait(), Ok(Some(_))).then(|| c.name.clone()))
            .collect();
        for other in exited {
            self.restart(&other)?;
        }
        Ok(())
    }

    fn restart(&mut self, name: &str) -> Result<(), Error> {
        let index = self
            .components
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| Error::Setup(format!("no component {name}")))?;
        let old = &self.components[index];
        let restarted =
            process::start(name, &old.program, &old.args, old.log.clone(), old.detached)?;
        self.components[index] = restarted;
        if !self.detached {
            process::register(self.id, self.pids(), self.dir.clone());
        }
        Ok(())
    }

    /// The API server's audit log (written only when started with
    /// `Options::audit_policy`).
    pub fn audit_log(&self) -> PathBuf {
        audit_log_path(&self.dir)
    }

    /// A client with the admin identity.
    pub async fn client(&self) -> Result<kube::Client, Error> {
        client_for(&self.kubeconfig).await
    }

    pub fn pids(&self) -> Vec<i32> {
        self.components.iter().map(Component::pid).collect()
    }

    /// The process of one component (e.g. `kube-apiserver`), to measure it.
    pub fn pid_of(&self, name: &str) -> Option<i32> {
        self.components
            .iter()
            .find(|c| c.name == name)
            .map(Component::pid)
    }

    /// kubectl from the pinned build, pointed at this control plane.
    pub fn kubectl(&self) -> Result<Command, Error> {
        let mut command = Command::new(binary("kubectl")?);
        command.env("KUBECONFIG", &self.kubeconfig);
        Ok(command)
    }

    /// helm from the pinned build, pointed at this control plane, with its
    /// caches inside the data dir.
    pub fn helm(&self) -> Result<Command, Error> {
        let mut command = Command::new(binary("helm")?);
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"));
        Ok(command)
    }

    fn write_state(&self) -> Result<(), Error> {
        let state = State {
            pids: self.pids(),
            ports: self.ports.clone(),
            kubeconfig: self.kubeconfig.clone(),
        };
        let file = self.dir.join(STATE_FILE);
        let text = serde_json::to_string_pretty(&state).map_err(|e| Error::Setup(e.to_string()))?;
        std::fs::write(&file, text).map_err(|e| Error::io(format!("writing {}", file.display()), e))
    }

    /// Stops every component and removes the data directory.
    pub fn stop(mut self) -> Result<(), Error> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), Error> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        process::stop_all(&mut self.components, STOP_GRACE);
        process::unregister(self.id);
        std::fs::remove_dir_all(&self.dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| Error::io(format!("removing {}", self.dir.display()), e))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if !self.keep_running
            && let Err(err) = self.stop_inner()
        {
            eprintln!("testenv: stopping the control plane: {err}");
        }
    }
}

/// Stops a detached control plane from its state file and removes its directory.
pub fn stop_detached(dir: &Path) -> Result<(), Error> {
    let file = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&file).map_err(|e| {
        Error::io(
            format!("reading {} (is this a control plane dir?)", file.display()),
            e,
        )
    })?;
    let state: State = serde_json::from_str(&text)
        .map_err(|e| Error::Setup(format!("{}: {e}", file.display())))?;
    process::stop_pids(&state.pids, STOP_GRACE);
    std::fs::remove_dir_all(dir).map_err(|e| Error::io(format!("removing {}", dir.display()), e))
}

fn audit_log_path(dir: &Path) -> PathBuf {
    dir.join("logs").join("audit.log")
}

/// The API server's audit flags for `policy`, written next to the data;
/// none without a policy.
fn audit_args(dir: &Path, policy: Option<&str>) -> Result<Vec<String>, Error> {
    let Some(policy) = policy else {
        return Ok(Vec::new());
    };
    let file = dir.join("audit-policy.yaml");
    std::fs::write(&file, policy)
        .map_err(|e| Error::io(format!("writing {}", file.display()), e))?;
    Ok(vec![
        format!("--audit-policy-file={}", path(&file)),
        format!("--audit-log-path={}", path(&audit_log_path(dir))),
        "--audit-log-format=json".into(),
        // Requests wait for their events to be written, so none is dropped
        // when the log falls behind (the log backend's default, said aloud).
        "--audit-log-mode=blocking".into(),
    ])
}

async fn readyz(client: kube::Client) -> Result<bool, String> {
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    client
        .request_text(request)
        .await
        .map(|body| body.trim() == "ok")
        .map_err(|e| e.to_string())
}

pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client, Error> {
    let raw = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| Error::Setup(format!("reading {}: {e}", kubeconfig.display())))?;
    let config =
        kube::Config::from_custom_kubeconfig(raw, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Setup(format!("loading {}: {e}", kubeconfig.display())))?;
    kube::Client::try_from(config).map_err(Error::Kube)
}

/// Whether something accepts connections on 127.0.0.1:`port`.
pub fn listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

fn etcd_healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut tcp) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
    if tcp
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = tcp.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}
