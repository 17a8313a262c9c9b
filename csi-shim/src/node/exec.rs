//! Running the node's helper programs (mount, losetup, mkfs, blkid, resize2fs, …).
//!
//! Invariant: every program runs with a timeout, with stdin closed (so a tool that would
//! ask "Proceed anyway?" refuses instead of hanging), and is killed when its timeout
//! expires or its caller is cancelled. A failure carries the command line and what the
//! program printed on stderr, so the status a person reads says exactly what to run again.

use std::ffi::OsStr;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::Command;

use super::error::{NodeError, Result};

/// Default limit for quick tools (mount, losetup, blkid).
pub const SHORT: Duration = Duration::from_secs(30);
/// Limit for tools whose work grows with the volume (mkfs, resize2fs, xfs_growfs).
pub const LONG: Duration = Duration::from_secs(300);

/// The command line as a person would type it.
pub fn render<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut line = program.to_string();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.as_ref().to_string_lossy());
    }
    line
}

/// Runs `program args…`; returns its output when it exits 0.
pub async fn run<S: AsRef<OsStr>>(program: &str, args: &[S], timeout: Duration) -> Result<Output> {
    let output = run_unchecked(program, args, timeout).await?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(failed(program, args, &output))
    }
}

/// Runs `program args…` and returns its output whatever its exit status.
pub async fn run_unchecked<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
) -> Result<Output> {
    let command = render(program, args);
    tracing::debug!(command = %command, "running");
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| NodeError::io(format!("Cannot run `{command}`"), e))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(e)) => Err(NodeError::io(format!("Waiting for `{command}`"), e)),
        Err(_) => Err(NodeError::CommandTimeout { command, timeout }),
    }
}

/// The error for a program that exited non-zero.
pub fn failed<S: AsRef<OsStr>>(program: &str, args: &[S], output: &Output) -> NodeError {
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&output.stdout).trim().to_string();
    }
    if stderr.is_empty() {
        stderr = "(no output)".to_string();
    }
    NodeError::Command {
        command: render(program, args),
        status: output.status.to_string(),
        stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_name_the_command_and_its_stderr() {
        let err = run("sh", &["-c", "echo boom >&2; exit 3"], SHORT)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sh -c echo boom"), "{text}");
        assert!(
            text.contains("boom") && text.contains("exit status: 3"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn slow_commands_time_out() {
        let err = run("sleep", &["5"], Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, NodeError::CommandTimeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn missing_programs_are_reported() {
        let err = run("/nonexistent/tool", &["x"], SHORT).await.unwrap_err();
        assert!(err.to_string().contains("/nonexistent/tool x"), "{err}");
    }
}
