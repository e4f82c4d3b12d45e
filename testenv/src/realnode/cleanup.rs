//! Removing everything real nodes leave on the machine, found by name: the
//! processes that name the nodes' directory, whatever runs in the nodes'
//! cgroups, mounts under that directory, the cgroups, the network
//! namespaces and the bridge, stale shim sockets, the directory itself.
//!
//! The same removal runs when a cluster is dropped, at the exit of a test
//! process that still has one, and before a cluster starts (for what an
//! interrupted run left behind), so it depends on nothing but names.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::net;
use super::node;

/// Where every real node keeps its state, configs and logs.
pub const BASE: &str = "/var/tmp/edgewire-realnodes";
/// containerd's shims put their sockets here whatever the config says.
const SHIM_SOCKETS: &str = "/run/containerd/s";
/// Bounded rounds of killing, for processes that fork while being killed.
const KILL_ROUNDS: usize = 20;

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: plain kill(2).
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Processes whose command line names `base` (containerd, kubelet,
/// kube-proxy, the shims, whose `-address` is the node's socket).
pub fn processes_naming(base: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                cmdline
                    .split(|b| *b == 0)
                    .any(|arg| String::from_utf8_lossy(arg).contains(base))
            })
        })
        .collect()
}

/// Every process in a cgroup tree.
fn cgroup_processes(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_dir()),
            );
        }
    }
    pids
}

/// Every directory of a cgroup tree, children before parents.
fn cgroup_dirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_dir()),
            );
        }
        all.push(dir);
    }
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    all
}

/// The mount points under `base` in this mount namespace, deepest first.
pub fn mounts_under(mountinfo: &str, base: &str) -> Vec<String> {
    let mut mounts: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| *m == base || m.starts_with(&format!("{base}/")))
        .map(String::from)
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    mounts.dedup();
    mounts
}

/// Unix socket paths someone listens on (`/proc/net/unix`).
fn live_unix_sockets() -> Vec<String> {
    std::fs::read_to_string("/proc/net/unix")
        .map(|t| {
            t.lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(7))
                .map(|p| p.trim_start_matches('@').to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the shim sockets no process listens on any more (what killed
/// shims leave), then the shim directory if that left it empty.
fn remove_stale_shim_sockets() {
    let live = live_unix_sockets();
    if let Ok(entries) = std::fs::read_dir(SHIM_SOCKETS) {
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let name = path.display().to_string();
            if !live.contains(&name) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let _ = std::fs::remove_dir(SHIM_SOCKETS);
    let _ = std::fs::remove_dir("/run/containerd");
}

/// Removes everything; returns what could not be removed (empty when all
/// went). `private_dirs` are the host paths the nodes had copies of: their
/// (empty) mount points are removed if nothing else is in them.
pub fn remove_all(private_dirs: &[PathBuf]) -> Vec<String> {
    let mut problems = Vec::new();
    let cgroups = node::prefixed_cgroups();
    for round in 0..KILL_ROUNDS {
        let mut pids = processes_naming(BASE);
        for cgroup in &cgroups {
            pids.extend(cgroup_processes(cgroup));
        }
        pids.sort_unstable();
        pids.dedup();
        if pids.is_empty() {
            break;
        }
        for &pid in &pids {
            signal(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
        if round + 1 == KILL_ROUNDS {
            problems.push(format!("processes still running: {pids:?}"));
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for mount in mounts_under(&mountinfo, BASE) {
        let Ok(target) = std::ffi::CString::new(mount.clone()) else {
            continue;
        };
        // SAFETY: umount2 on a path string we own.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            problems.push(format!(
                "unmounting {mount}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    for cgroup in &cgroups {
        for dir in cgroup_dirs_deepest_first(cgroup) {
            // A cgroup whose last process just died may take a moment.
            let mut removed = false;
            for _ in 0..50 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    removed = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !removed {
                problems.push(format!("cgroup {} not removed", dir.display()));
            }
        }
    }
    net::down();
    remove_stale_shim_sockets();
    if Path::new(BASE).exists()
        && let Err(e) = std::fs::remove_dir_all(BASE)
    {
        problems.push(format!("removing {BASE}: {e}"));
    }
    for dir in private_dirs {
        let _ = std::fs::remove_dir(dir);
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_under_the_base_come_deepest_first_and_others_not_at_all() {
        let mountinfo = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
90 22 254:0 /var/tmp/edgewire-realnodes/mnt /var/tmp/edgewire-realnodes/mnt rw - ext4 /dev/vda rw
91 90 0:4 mnt:[4026532] /var/tmp/edgewire-realnodes/mnt/ewrn-n1 rw - nsfs nsfs rw
92 22 0:4 / /var/tmp/edgewire-realnodes-other rw - ext4 /dev/vda rw
";
        assert_eq!(
            mounts_under(mountinfo, BASE),
            vec![
                "/var/tmp/edgewire-realnodes/mnt/ewrn-n1".to_string(),
                "/var/tmp/edgewire-realnodes/mnt".to_string(),
            ]
        );
    }

    #[test]
    fn a_process_naming_a_path_is_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("marker").display().to_string();
        // The path as the shell's $0; the `; true` keeps the shell itself
        // running instead of exec'ing sleep.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30; true", &marker])
            .spawn()
            .expect("sh");
        std::thread::sleep(Duration::from_millis(100));
        let found = processes_naming(&marker);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found, vec![child.id() as i32]);
    }
}
