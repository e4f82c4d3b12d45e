//! The outage is made by the driver (`bench/uplink.py`), which owns the
//! processes; the load generator owns the clock. At each step it prints
//! `{"event": NAME}` on stdout and waits for the driver's line on stdin
//! saying the step is done, so every moment is judged by its own clock.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::Context;

/// How long the driver may take for one step.
const STEP: Duration = Duration::from_secs(120);

/// Asks the driver for `event` and waits until it answers.
pub async fn step(event: &str) -> anyhow::Result<()> {
    let line = serde_json::json!({ "event": event }).to_string();
    let answer = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        Ok(answer)
    });
    let answer = tokio::time::timeout(STEP, answer)
        .await
        .with_context(|| format!("the driver did not answer {event} within {STEP:?}"))???;
    anyhow::ensure!(
        !answer.trim().is_empty(),
        "the driver closed its end before answering {event}"
    );
    Ok(())
}
