//! Running the host's tools (ip, iptables, ctr, nsenter) and saying what
//! failed when they do.

use std::process::{Command, Stdio};

use crate::Error;

/// Runs `program args`, returning its standard output, or an error with its
/// standard error when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("running {program}"), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Setup(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
