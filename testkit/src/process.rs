//! The real service binaries as child processes: spawned with exactly the environment a test
//! gives them, ready once they log their port, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a service may take to log that it listens (it checks Kafka and migrates first).
pub const READY_DEADLINE: Duration = Duration::from_secs(90);

/// `binary args…` with an empty environment but `PATH`, then `env`: a test states every variable
/// the process sees, so the developer's shell cannot change what it tests.
pub fn command<K: AsRef<str>, V: AsRef<str>>(
    binary: &Path,
    args: &[&str],
    env: impl IntoIterator<Item = (K, V)>,
) -> Command {
    let mut command = Command::new(binary);
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "RUST_LOG",
            std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
    for (key, value) in env {
        command.env(key.as_ref(), value.as_ref());
    }
    command
}

/// A running service binary; SIGKILLed on drop.
pub struct Service {
    pub child: Child,
    pub port: u16,
    pub name: &'static str,
    stderr_lines: mpsc::Receiver<String>,
}

impl Service {
    /// Starts `binary` and waits (up to [`READY_DEADLINE`]) for the stderr line containing
    /// `ready_marker` and `port=<port>`. Its log is echoed with `TEST_LOG=1`.
    pub fn spawn(
        name: &'static str,
        binary: impl AsRef<Path>,
        args: &[&str],
        env: &[(String, String)],
        ready_marker: &str,
    ) -> Service {
        let binary = binary.as_ref();
        let mut child = command(binary, args, env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, stderr_lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("TEST_LOG").is_some() {
                    eprintln!("[{name}] {line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + READY_DEADLINE;
        let port = loop {
            let line = stderr_lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("{name} did not start (set TEST_LOG=1 to see its log)"));
            if !line.contains(ready_marker) {
                continue;
            }
            if let Some(port) = line
                .split("port=")
                .nth(1)
                .and_then(|p| p.split_whitespace().next())
                .and_then(|p| p.parse::<u16>().ok())
            {
                break port;
            }
        };
        Service {
            child,
            port,
            name,
            stderr_lines,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Stderr lines printed since it became ready, up to and including the first that
    /// contains `pattern`; panics when none does within 10 s.
    pub fn logs_until(&self, pattern: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut lines = Vec::new();
        loop {
            match self
                .stderr_lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    let found = line.contains(pattern);
                    lines.push(line);
                    if found {
                        return lines;
                    }
                }
                Err(_) => panic!("no log line containing {pattern:?}; got {lines:#?}"),
            }
        }
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (up to 30 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the child") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within 30 s of SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `command` to completion with its output captured; SIGKILLs it and fails the test after
/// `deadline` (a subcommand that waits forever, e.g. on a lock, must not hang the suite).
pub fn output_within_deadline(mut command: Command, deadline: Duration) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline) {
        Ok(output) => output.expect("wait for the command"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let stderr = rx
                .recv_timeout(Duration::from_secs(5))
                .ok()
                .and_then(Result::ok)
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default();
            panic!("{command:?} did not finish within {deadline:?}; stderr:\n{stderr}");
        }
    }
}

/// The stdout of a command that must have succeeded; its whole output otherwise.
#[track_caller]
pub fn succeeded(what: &str, output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
