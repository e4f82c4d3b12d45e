//! Real nodes: kubelet, containerd and kube-proxy, each node in its own
//! network and mount namespace on a bridge the test creates, joined to a
//! control plane that serves them as a real cluster does (Node
//! authorization, NodeRestriction), with pod networking (bridge CNI, a pod
//! range per node) and Services (kube-proxy in iptables mode).
//!
//! Needs root, cgroups, and Debian's `containerd`, `runc`,
//! `containernetworking-plugins` and `iptables` (`scripts/test.sh` installs
//! them); kubelet, kube-proxy and the pause program come from
//! `testenv/build.sh`. Everything a cluster creates is removed when it is
//! dropped, when the test process exits, and, for what an interrupted run
//! left, before the next cluster starts. The machine's sysctls and its
//! forwarding are never changed; traffic stays on the bridge.
//!
//! One cluster runs at a time on a machine (a lock file serializes them):
//! the bridge, its addresses and the leftover removal are fixed by name.

mod cleanup;
mod cmd;
pub mod images;
mod net;
mod node;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

pub use cleanup::BASE;
pub use net::{BRIDGE, HOST, NodeNet};
pub use node::{PAUSE_IMAGE, RealNode};

use crate::controlplane::{ControlPlane, NodeAccess, Options, bin_dir, binary};
use crate::{Error, nodes};

/// The chart's hostPath for the agent's state: each node gets its own.
pub const AGENT_STATE_DIR: &str = "/var/lib/edgewire";
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const LOCK_TIMEOUT: Duration = Duration::from_secs(900);
const LOCK_FILE: &str = "/var/tmp/edgewire-realnodes.lock";

#[derive(Clone, Debug)]
pub struct RealClusterOptions {
    /// How many nodes (at most 200).
    pub nodes: u8,
    /// Labels every node registers with.
    pub labels: BTreeMap<String, String>,
    /// Labels of one node each (the first map for the first node...), e.g.
    /// a zone per node.
    pub node_labels: Vec<BTreeMap<String, String>>,
    /// OCI image archives (see `images`) imported into every node.
    pub images: Vec<PathBuf>,
    /// Host paths each node gets a private copy of.
    pub private_dirs: Vec<PathBuf>,
}

impl Default for RealClusterOptions {
    fn default() -> Self {
        RealClusterOptions {
            nodes: 3,
            labels: BTreeMap::new(),
            node_labels: Vec::new(),
            images: Vec::new(),
            private_dirs: vec![PathBuf::from(AGENT_STATE_DIR)],
        }
    }
}

/// The private directories of the cluster alive in this process, for the
/// removal at exit.
static LIVE: Mutex<Option<Vec<PathBuf>>> = Mutex::new(None);

extern "C" fn remove_at_exit() {
    let live = match LIVE.lock() {
        Ok(mut guard) => guard.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    if let Some(private_dirs) = live {
        for problem in cleanup::remove_all(&private_dirs) {
            eprintln!("testenv: real nodes at exit: {problem}");
        }
    }
}

/// Holds the machine-wide lock and removes everything when dropped.
struct Guard {
    private_dirs: Vec<PathBuf>,
    _lock: std::fs::File,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for problem in cleanup::remove_all(&self.private_dirs) {
            eprintln!("testenv: removing the real nodes: {problem}");
        }
        if let Ok(mut live) = LIVE.lock() {
            *live = None;
        }
    }
}

async fn lock() -> Result<std::fs::File, Error> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .map_err(|e| Error::io(format!("opening {LOCK_FILE}"), e))?;
    let started = Instant::now();
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        if started.elapsed() > LOCK_TIMEOUT {
            return Err(Error::Setup(format!(
                "another real-node cluster holds {LOCK_FILE}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What real nodes need from the machine, or what is missing.
fn check_host() -> Result<(), Error> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Setup(
            "real nodes need root (network namespaces, bridges, cgroups, mounts)".into(),
        ));
    }
    let missing: Vec<&str> = [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/sbin/runc",
        "/usr/lib/cni/bridge",
        "/usr/lib/cni/host-local",
        "/usr/lib/cni/portmap",
        "/usr/lib/cni/loopback",
        "/usr/sbin/iptables",
        "/usr/bin/nsenter",
        "/usr/bin/unshare",
    ]
    .into_iter()
    .filter(|p| !Path::new(p).exists() && which(p).is_none())
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Setup(format!(
            "real nodes need {missing:?} (Debian: containerd runc containernetworking-plugins iptables; scripts/test.sh installs them)"
        )))
    }
}

/// A program by its file name anywhere on PATH (runc is in /usr/bin on
/// some systems and /usr/sbin on others).
fn which(path: &str) -> Option<PathBuf> {
    let name = Path::new(path).file_name()?;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A control plane and its real nodes.
pub struct RealCluster {
    pub nodes: Vec<RealNode>,
    pub plane: ControlPlane,
    images_dir: PathBuf,
    _guard: Guard,
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        // Everything at once (SIGKILL), before the components are reaped
        // and the control plane stops: a graceful stop per node would take
        // long and the test is over.
        for problem in cleanup::remove_all(&self._guard.private_dirs) {
            eprintln!("testenv: removing the real nodes: {problem}");
        }
    }
}

impl RealCluster {
    pub async fn start(options: RealClusterOptions) -> Result<RealCluster, Error> {
        check_host()?;
        binary("kubelet")?;
        binary("kube-proxy")?;
        let pause = binary("pause")?;
        let lock = lock().await?;
        // What an interrupted run left behind goes first.
        let leftovers = cleanup::remove_all(&options.private_dirs);
        if !leftovers.is_empty() {
            return Err(Error::Setup(format!(
                "could not remove an earlier run's real nodes: {leftovers:?}"
            )));
        }
        let guard = Guard {
            private_dirs: options.private_dirs.clone(),
            _lock: lock,
        };
        if let Ok(mut live) = LIVE.lock() {
            *live = Some(options.private_dirs.clone());
        }
        static AT_EXIT: std::sync::Once = std::sync::Once::new();
        AT_EXIT.call_once(|| {
            // SAFETY: registering a plain extern "C" function.
            unsafe {
                libc::atexit(remove_at_exit);
            }
        });
        let routes = cmd::run("ip", &["route"])?;
        let conflicts = net::conflicting_routes(&routes);
        if !conflicts.is_empty() {
            return Err(Error::Setup(format!(
                "the host already routes the real nodes' ranges: {conflicts:?}"
            )));
        }

        let base = PathBuf::from(BASE);
        let mount_dir = base.join("mnt");
        let images_dir = base.join("images");
        for dir in [&mount_dir, &images_dir] {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        // Mount namespace pins must sit on a private mount.
        let mount_dir_arg = mount_dir.display().to_string();
        cmd::run("mount", &["--bind", &mount_dir_arg, &mount_dir_arg])?;
        cmd::run("mount", &["--make-private", &mount_dir_arg])?;

        let nets: Vec<NodeNet> = (1..=options.nodes).map(NodeNet::new).collect();
        net::up(&nets)?;
        let plane = ControlPlane::start(Options {
            dir: Some(base.join("control-plane")),
            node_access: Some(NodeAccess { address: HOST }),
            ..Options::default()
        })
        .await?;

        let pause_archive = images_dir.join("pause.tar");
        images::write_archive(
            &images::single_binary(&pause, "/pause", PAUSE_IMAGE),
            &pause_archive,
        )?;
        let proxy_cert =
            plane
                .pki
                .issue_client(&base.join("pki"), "kube-proxy", "system:kube-proxy", None)?;
        let bin = bin_dir()?;
        let mut cluster = RealCluster {
            nodes: Vec::new(),
            plane,
            images_dir,
            _guard: guard,
        };
        for net in nets {
            let name = format!("realnode-{}", net.index);
            let mut labels = options.labels.clone();
            if let Some(own) = options.node_labels.get(usize::from(net.index) - 1) {
                labels.extend(own.clone());
            }
            let dir = base.join(&net.netns);
            let kubelet_cert = cluster.plane.pki.issue_client(
                &dir.join("pki"),
                "kubelet",
                &format!("system:node:{name}"),
                Some("system:nodes"),
            )?;
            let setup = node::NodeSetup {
                name,
                mount_ns: mount_dir.join(&net.netns),
                net,
                dir,
                server: cluster.plane.server.clone(),
                ca: cluster.plane.pki.ca.cert.clone(),
                kubelet_cert,
                proxy_cert: proxy_cert.clone(),
                labels,
                private_dirs: options.private_dirs.clone(),
                bin: bin.clone(),
            };
            let node = RealNode::create(setup).await?;
            cluster.nodes.push(node);
        }
        let archives: Vec<PathBuf> = std::iter::once(pause_archive)
            .chain(options.images.iter().cloned())
            .collect();
        for node in &mut cluster.nodes {
            for archive in &archives {
                node.import(archive)?;
            }
            node.start_kubelet()?;
            node.start_kube_proxy()?;
        }
        cluster.wait_ready().await?;
        tracing::info!(nodes = cluster.nodes.len(), "real nodes ready");
        Ok(cluster)
    }

    /// Waits until every node reports Ready.
    pub async fn wait_ready(&self) -> Result<(), Error> {
        let client = self.plane.client().await?;
        let api: Api<Node> = Api::all(client);
        let started = Instant::now();
        loop {
            let mut not_ready = Vec::new();
            for node in &self.nodes {
                let ready = api
                    .get_opt(&node.setup.name)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|n| nodes::is_ready(&n));
                if !ready {
                    not_ready.push(node);
                }
            }
            if not_ready.is_empty() {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                let logs: Vec<String> = not_ready
                    .iter()
                    .map(|n| format!("{} kubelet:\n{}", n.setup.name, n.log_tail("kubelet")))
                    .collect();
                return Err(Error::Timeout {
                    what: "real nodes Ready".into(),
                    last: String::new(),
                    log: logs.join("\n"),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Imports an image archive into every node's containerd.
    pub fn import(&self, archive: &Path) -> Result<(), Error> {
        for node in &self.nodes {
            node.import(archive)?;
        }
        Ok(())
    }

    /// Where image archives for this cluster can be written.
    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.setup.name.clone()).collect()
    }

    /// Node `index`'s address on the bridge (its InternalIP).
    pub fn address(&self, index: usize) -> std::net::Ipv4Addr {
        self.nodes[index].setup.net.address
    }

    /// `program`, to be run inside node `index`'s network namespace (as a
    /// process on that node, e.g. a client of a ClusterIP Service).
    pub fn command_in(&self, index: usize, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!(
                "--net={}",
                self.nodes[index].setup.net.netns_path().display()
            ))
            .arg("--")
            .arg(program);
        command
    }

    /// Cuts node `index`'s cable: nothing reaches it, it reaches nothing.
    pub fn cut_link(&self, index: usize) -> Result<(), Error> {
        net::set_link(&self.nodes[index].setup.net, false)
    }

    pub fn restore_link(&self, index: usize) -> Result<(), Error> {
        net::set_link(&self.nodes[index].setup.net, true)
    }

    /// Makes the API server unreachable from node `index` only (its own
    /// processes and its pods); everything else on the node keeps working.
    pub fn isolate_from_apiserver(&self, index: usize) -> Result<(), Error> {
        net::apiserver_rules(
            &self.nodes[index].setup.net,
            self.plane.ports.apiserver,
            true,
        )
    }

    pub fn reconnect_to_apiserver(&self, index: usize) -> Result<(), Error> {
        net::apiserver_rules(
            &self.nodes[index].setup.net,
            self.plane.ports.apiserver,
            false,
        )
    }

    pub fn stop_kubelet(&mut self, index: usize) {
        self.nodes[index].stop_kubelet();
    }

    pub fn start_kubelet(&mut self, index: usize) -> Result<(), Error> {
        self.nodes[index].start_kubelet()
    }

    /// SIGKILLs node `index`'s containerd; `start_containerd` restarts it.
    pub fn kill_containerd(&mut self, index: usize) {
        self.nodes[index].kill_containerd();
    }

    pub async fn start_containerd(&mut self, index: usize) -> Result<(), Error> {
        self.nodes[index].start_containerd().await
    }
}
