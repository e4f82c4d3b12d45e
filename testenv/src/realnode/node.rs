//! One real node: containerd, kubelet and kube-proxy, each run in the
//! node's network namespace and a mount namespace of its own.
//!
//! The mount namespace keeps the node's mounts (pod volumes, container root
//! filesystems, pod network namespaces) out of the host's mount table, gives
//! each node its own copy of the host paths the chart mounts, and lets the
//! kubelet find the global sysctls it insists on (`vm.overcommit_memory=1`,
//! `kernel.panic=10`, `kernel.panic_on_oops=1`) already set in files
//! bind-mounted over `/proc/sys`, so the machine's own values never change.
//! (`ip netns exec` would remount `/sys` and hide the cgroup hierarchies, so
//! processes enter the namespaces with `nsenter`.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::cmd::run;
use super::net::{NodeNet, PREFIX};
use crate::Error;
use crate::kubeconfig;
use crate::pki::CertFiles;
use crate::process::{self, Component};

const STOP_GRACE: Duration = Duration::from_secs(10);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);
/// The sandbox image every node has, imported from `images`.
pub const PAUSE_IMAGE: &str = "localhost/pause:3.10";
/// Debian installs the CNI plugins here, not in /opt/cni/bin.
const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// What a node is started with.
#[derive(Clone, Debug)]
pub struct NodeSetup {
    pub name: String,
    pub net: NodeNet,
    /// The node's own directory (state, configs, logs).
    pub dir: PathBuf,
    /// The pin file of its mount namespace.
    pub mount_ns: PathBuf,
    /// `https://<bridge address>:<port>`.
    pub server: String,
    pub ca: PathBuf,
    /// The kubelet's identity: `system:node:<name>` in `system:nodes`.
    pub kubelet_cert: CertFiles,
    /// kube-proxy's identity: `system:kube-proxy`.
    pub proxy_cert: CertFiles,
    pub labels: BTreeMap<String, String>,
    /// Host paths each node gets a copy of its own (the chart's hostPath).
    pub private_dirs: Vec<PathBuf>,
    pub bin: PathBuf,
}

/// A running node.
pub struct RealNode {
    pub setup: NodeSetup,
    containerd: Option<Component>,
    kubelet: Option<Component>,
    kube_proxy: Option<Component>,
}

/// The cgroup v1 hierarchies (or the v2 root) the node's cgroup is made in.
fn cgroup_roots() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    std::fs::read_dir(root)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir() && !p.ends_with("unified"))
                .collect()
        })
        .unwrap_or_default()
}

/// The name of the node's cgroup (the kubelet's `cgroupRoot`).
pub fn cgroup_name(net: &NodeNet) -> String {
    net.netns.clone()
}

/// Every cgroup whose name starts with the prefix, in every hierarchy (the
/// kubelet also makes its cgroups in a hybrid host's unified one): what is
/// removed after a run.
pub fn prefixed_cgroups() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut roots = cgroup_roots();
    if root.join("unified").is_dir() {
        roots.push(root.join("unified"));
    }
    roots
        .into_iter()
        .flat_map(|root| {
            std::fs::read_dir(&root)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| {
                            p.file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(|n| n.starts_with(&format!("{PREFIX}-")))
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect()
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    }
    std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn mkdir(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

impl NodeSetup {
    fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    fn containerd_config(&self) -> String {
        let n = p(&self.dir);
        format!(
            r#"version = 2
root = "{n}/containerd/root"
state = "{n}/containerd/state"
[grpc]
  address = "{n}/containerd/containerd.sock"
[ttrpc]
  address = "{n}/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  # Without CAP_SYS_RESOURCE (some VMs withhold it) runc cannot set a
  # negative oom_score_adj; clamp it to containerd's own.
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  # Pod network namespaces pinned under this node's state, not /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        # runc's state per node, so a killed node's leaves with its directory.
        Root = "{n}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{n}/cni/net.d"
    max_conf_num = 1
[plugins."io.containerd.internal.v1.opt"]
  path = "{n}/containerd/opt"
"#
        )
    }

    fn cni_config(&self) -> String {
        serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "edgewire-realnode",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": self.dir.join("cni/ipam"),
                        "ranges": [[{"subnet": self.net.pod_cidr}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        })
        .to_string()
    }

    fn kubelet_config(&self) -> String {
        let socket = format!("unix://{}", p(&self.containerd_socket()));
        serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            // Kubernetes 1.35 refuses cgroup v1 hosts unless told otherwise.
            "failCgroupV1": false,
            "failSwapOn": false,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{}", cgroup_name(&self.net)),
            "containerRuntimeEndpoint": socket,
            "imageServiceEndpoint": socket,
            "podLogsDir": self.dir.join("pod-logs"),
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "readOnlyPort": 0,
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": true},
                "x509": {"clientCAFile": self.ca},
            },
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local",
            "clusterDNS": ["10.96.0.10"],
            "resolvConf": "/etc/resolv.conf",
            "serializeImagePulls": false,
            // The images were imported, not pulled: never collect them.
            "imageGCHighThresholdPercent": 100,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
        })
        .to_string()
    }

    fn kube_proxy_config(&self) -> String {
        serde_json::json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": self.dir.join("kube-proxy.kubeconfig")},
            "hostnameOverride": self.name,
            "mode": "iptables",
            "clusterCIDR": "10.244.0.0/16",
            "bindAddress": self.net.address.to_string(),
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            // Zero leaves the kernel's conntrack settings alone: some are
            // global, and the machine's are not the test's to change.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        })
        .to_string()
    }

    fn write_files(&self) -> Result<(), Error> {
        for sub in ["logs", "cni/net.d", "cni/ipam", "kubelet", "pod-logs"] {
            mkdir(&self.dir.join(sub))?;
        }
        write(&self.dir.join("containerd.toml"), &self.containerd_config())?;
        write(
            &self.dir.join("cni/net.d/10-edgewire-realnode.conflist"),
            &self.cni_config(),
        )?;
        write(&self.dir.join("kubelet.yaml"), &self.kubelet_config())?;
        write(
            &self.dir.join("kubelet.kubeconfig"),
            &kubeconfig::render(&self.server, &self.ca, &self.name, &self.kubelet_cert),
        )?;
        write(&self.dir.join("kube-proxy.yaml"), &self.kube_proxy_config())?;
        write(
            &self.dir.join("kube-proxy.kubeconfig"),
            &kubeconfig::render(&self.server, &self.ca, "kube-proxy", &self.proxy_cert),
        )?;
        Ok(())
    }

    /// The node's own cgroup in every hierarchy (cpuset needs its cpus and
    /// mems copied from the parent before anything can join it).
    fn make_cgroups(&self) -> Result<(), Error> {
        for root in cgroup_roots() {
            let dir = root.join(cgroup_name(&self.net));
            mkdir(&dir)?;
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = std::fs::read_to_string(root.join(file))
                    && !root.join("cgroup.controllers").exists()
                {
                    write(&dir.join(file), &value)?;
                }
            }
            if root.join("cgroup.controllers").exists() {
                // cgroup v2: hand the node's cgroup every controller the root has.
                let controllers = std::fs::read_to_string(root.join("cgroup.subtree_control"))
                    .unwrap_or_default();
                let enable: Vec<String> = controllers
                    .split_whitespace()
                    .map(|c| format!("+{c}"))
                    .collect();
                if !enable.is_empty() {
                    write(&dir.join("cgroup.subtree_control"), &enable.join(" "))?;
                }
            }
        }
        Ok(())
    }

    /// The node's persistent mount namespace, with the sysctl files and the
    /// private directories mounted in it.
    fn make_mount_namespace(&self) -> Result<(), Error> {
        std::fs::File::create(&self.mount_ns)
            .map_err(|e| Error::io(format!("creating {}", self.mount_ns.display()), e))?;
        run(
            "unshare",
            &[
                &format!("--mount={}", p(&self.mount_ns)),
                "--propagation",
                "private",
                "true",
            ],
        )?;
        let sysctl = self.dir.join("sysctl");
        let enter = format!("--mount={}", p(&self.mount_ns));
        for (file, value, target) in [
            ("overcommit_memory", "1", "/proc/sys/vm/overcommit_memory"),
            ("panic", "10", "/proc/sys/kernel/panic"),
            ("panic_on_oops", "1", "/proc/sys/kernel/panic_on_oops"),
        ] {
            let source = sysctl.join(file);
            write(&source, &format!("{value}\n"))?;
            run(
                "nsenter",
                &[&enter, "--", "mount", "--bind", &p(&source), target],
            )?;
        }
        for private in &self.private_dirs {
            let relative = private.strip_prefix("/").unwrap_or(private);
            let copy = self.dir.join("rootfs").join(relative);
            mkdir(&copy)?;
            mkdir(private)?;
            run(
                "nsenter",
                &[&enter, "--", "mount", "--bind", &p(&copy), &p(private)],
            )?;
        }
        Ok(())
    }

    fn enter_args(&self, program: &Path, args: Vec<String>) -> Vec<String> {
        let mut all = vec![
            format!("--mount={}", p(&self.mount_ns)),
            format!("--net={}", p(&self.net.netns_path())),
            "--".to_string(),
            p(program),
        ];
        all.extend(args);
        all
    }

    fn kubelet_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--config={}", p(&self.dir.join("kubelet.yaml"))),
            format!("--kubeconfig={}", p(&self.dir.join("kubelet.kubeconfig"))),
            format!("--root-dir={}", p(&self.dir.join("kubelet"))),
            format!("--hostname-override={}", self.name),
            format!("--node-ip={}", self.net.address),
            "--v=1".to_string(),
        ];
        if !self.labels.is_empty() {
            let labels: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            args.push(format!("--node-labels={}", labels.join(",")));
        }
        args
    }
}

impl RealNode {
    /// Prepares the node (files, cgroups, mount namespace) and starts its
    /// containerd. Images are imported next (`import`), then `start_kubelet`.
    pub async fn create(setup: NodeSetup) -> Result<RealNode, Error> {
        setup.write_files()?;
        setup.make_cgroups()?;
        setup.make_mount_namespace()?;
        let mut node = RealNode {
            setup,
            containerd: None,
            kubelet: None,
            kube_proxy: None,
        };
        node.start_containerd().await?;
        Ok(node)
    }

    fn launch(&self, name: &str, program: &Path, args: Vec<String>) -> Result<Component, Error> {
        let log = self.setup.dir.join("logs").join(format!("{name}.log"));
        // Appending, so a restart keeps what the previous run logged.
        let previous = std::fs::read(&log).unwrap_or_default();
        let component = process::start(
            name,
            Path::new("nsenter"),
            &self.setup.enter_args(program, args),
            log.clone(),
            false,
        )?;
        if !previous.is_empty() {
            let old = log.with_extension("log.previous");
            let _ = std::fs::write(old, previous);
        }
        Ok(component)
    }

    /// Starts containerd and waits for its socket.
    pub async fn start_containerd(&mut self) -> Result<(), Error> {
        let socket = self.setup.containerd_socket();
        let _ = std::fs::remove_file(&socket);
        let config = self.setup.dir.join("containerd.toml");
        let mut component = self.launch(
            "containerd",
            Path::new("/usr/bin/containerd"),
            vec!["--config".into(), p(&config)],
        )?;
        let started = Instant::now();
        while !socket.exists() {
            if let Ok(Some(status)) = component.child.try_wait() {
                return Err(Error::Exited {
                    name: format!("{} containerd", self.setup.name),
                    status: status.to_string(),
                    log: component.log_tail(),
                });
            }
            if started.elapsed() > SOCKET_TIMEOUT {
                let log = component.log_tail();
                process::stop_all(std::slice::from_mut(&mut component), STOP_GRACE);
                return Err(Error::Timeout {
                    what: format!("{} containerd's socket", self.setup.name),
                    last: String::new(),
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.containerd = Some(component);
        Ok(())
    }

    /// Imports an OCI image archive into the node's containerd, for
    /// Kubernetes (namespace `k8s.io`).
    pub fn import(&self, archive: &Path) -> Result<(), Error> {
        run(
            "ctr",
            &[
                "--address",
                &p(&self.setup.containerd_socket()),
                "--namespace",
                "k8s.io",
                "images",
                "import",
                &p(archive),
            ],
        )
        .map(|_| ())
    }

    pub fn start_kubelet(&mut self) -> Result<(), Error> {
        let program = self.setup.bin.join("kubelet");
        self.kubelet = Some(self.launch("kubelet", &program, self.setup.kubelet_args())?);
        Ok(())
    }

    pub fn start_kube_proxy(&mut self) -> Result<(), Error> {
        let program = self.setup.bin.join("kube-proxy");
        let config = self.setup.dir.join("kube-proxy.yaml");
        self.kube_proxy = Some(self.launch(
            "kube-proxy",
            &program,
            vec![format!("--config={}", p(&config))],
        )?);
        Ok(())
    }

    /// Stops the kubelet (SIGTERM, as a service manager would); its pods
    /// keep running, as they do when a real kubelet stops.
    pub fn stop_kubelet(&mut self) {
        if let Some(mut kubelet) = self.kubelet.take() {
            process::stop_all(std::slice::from_mut(&mut kubelet), STOP_GRACE);
        }
    }

    /// Kills containerd outright (SIGKILL); the containers, under their
    /// shims, keep running. `start_containerd` brings it back.
    pub fn kill_containerd(&mut self) {
        if let Some(mut containerd) = self.containerd.take() {
            let _ = containerd.child.kill();
            let _ = containerd.child.wait();
        }
    }

    /// The process ids this node's components run as.
    pub fn pids(&self) -> Vec<i32> {
        [&self.containerd, &self.kubelet, &self.kube_proxy]
            .into_iter()
            .flatten()
            .map(Component::pid)
            .collect()
    }

    /// The end of a component's log (`kubelet`, `containerd`, `kube-proxy`).
    pub fn log_tail(&self, component: &str) -> String {
        process::log_tail(&self.setup.dir.join("logs").join(format!("{component}.log")))
    }

    /// Stops kube-proxy, the kubelet and containerd, in that order.
    pub fn stop(&mut self) {
        let mut running: Vec<Component> = [
            self.containerd.take(),
            self.kubelet.take(),
            self.kube_proxy.take(),
        ]
        .into_iter()
        .flatten()
        .collect();
        process::stop_all(&mut running, STOP_GRACE);
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop();
    }
}
