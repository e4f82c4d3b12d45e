//! Child processes of the control plane, and the guarantees around them:
//! a test process that ends, however it ends, leaves none behind.
//!
//! Attached children get `PR_SET_PDEATHSIG(SIGKILL)`. Linux sends that signal
//! when the *thread* that forked the child exits, and test threads come and go,
//! so attached children are forked from one spawner thread that lives as long
//! as the process. Whatever is still registered at exit (a control plane shared
//! by a whole test binary) is killed and its directory removed by an `atexit`
//! handler.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use crate::Error;

/// A component the control plane started.
#[derive(Debug)]
pub struct Component {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    /// How it was started, so it can be started again.
    pub program: PathBuf,
    pub args: Vec<String>,
    pub detached: bool,
}

impl Component {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The last lines of the component's log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testenv-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
                // The senders live in a static, so this loop never ends and
                // the thread lives until the process exits.
            })
            .expect("spawn the testenv spawner thread");
        Mutex::new(tx)
    })
}

/// Starts `program` with its output in `log`. Attached children die with this
/// process; detached ones (for the CLI's `up`) get their own session and live on.
pub fn start(
    name: &str,
    program: &Path,
    args: &[String],
    log: PathBuf,
    detached: bool,
) -> Result<Component, Error> {
    let out =
        File::create(&log).map_err(|e| Error::io(format!("creating {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| Error::io("duplicating a log handle", e))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: the closures only make async-signal-safe system calls.
    unsafe {
        if detached {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        } else {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = if detached {
        command.spawn()
    } else {
        let (reply_tx, reply_rx) = mpsc::channel();
        spawner()
            .lock()
            .map_err(|_| Error::Setup("the spawner lock is poisoned".into()))?
            .send((command, reply_tx))
            .map_err(|_| Error::Setup("the spawner thread is gone".into()))?;
        reply_rx
            .recv()
            .map_err(|_| Error::Setup("the spawner thread is gone".into()))?
    }
    .map_err(|e| Error::io(format!("starting {}", program.display()), e))?;
    Ok(Component {
        name: name.to_string(),
        child,
        log,
        program: program.to_path_buf(),
        args: args.to_vec(),
        detached,
    })
}

pub fn is_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a pid we started.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// SIGTERM, then SIGKILL after `grace`; reaps the children we own.
pub fn stop_all(components: &mut [Component], grace: Duration) {
    for c in components.iter().rev() {
        signal(c.pid(), libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    for c in components.iter_mut().rev() {
        loop {
            match c.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = c.child.kill();
                    let _ = c.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Stops processes by pid (the CLI's `down`, which did not start them itself).
pub fn stop_pids(pids: &[i32], grace: Duration) {
    for &pid in pids.iter().rev() {
        signal(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|&p| is_alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in pids {
        if is_alive(pid) {
            signal(pid, libc::SIGKILL);
        }
    }
}

/// Control planes that must be cleaned up at exit if nobody stopped them.
static REGISTERED: Mutex<Vec<(u64, Vec<i32>, PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn cleanup_at_exit() {
    let entries = match REGISTERED.lock() {
        Ok(mut guard) => std::mem::take(&mut *guard),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    };
    for (_, pids, dir) in entries {
        for pid in pids {
            signal(pid, libc::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

pub fn register(id: u64, pids: Vec<i32>, dir: PathBuf) {
    static AT_EXIT: Once = Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registering a plain extern "C" function.
        unsafe {
            libc::atexit(cleanup_at_exit);
        }
    });
    if let Ok(mut guard) = REGISTERED.lock() {
        guard.retain(|(i, _, _)| *i != id);
        guard.push((id, pids, dir));
    }
}

pub fn unregister(id: u64) {
    if let Ok(mut guard) = REGISTERED.lock() {
        guard.retain(|(i, _, _)| *i != id);
    }
}
