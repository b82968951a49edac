//! `projector run` inside the test process: the real [`Application::build`] from the same
//! environment the binary would get, for the tests where a real process is not the point (the
//! API, the lifecycles). The crash, CLI, chaos and instances tests keep the binary.

use std::collections::HashMap;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use projector::config::Config;
use projector::startup::{Application, StopOn};
use testkit::process::READY_DEADLINE;

/// How long a stop may take: the batch in flight, the pending outbox rows, the API's
/// connections (`shutdown_timeout(10)`).
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// A running [`Application`] on a thread and a runtime of its own, so that it runs whatever the
/// test's runtime (a `current_thread` one blocked in a `Drop` would stall it). Dropping it
/// stops it as SIGTERM stops the binary, and waits for that.
pub struct TestApp {
    pub port: u16,
    handle: ServerHandle,
    stopped: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl TestApp {
    /// Builds and starts the application from `env` (the variables `projector run` reads);
    /// returns once its API listens. Panics when it does not start.
    pub fn start(env: &[(String, String)]) -> TestApp {
        let env: HashMap<String, String> = env.iter().cloned().collect();
        let config = Config::from_lookup(|name| env.get(name).cloned())
            .unwrap_or_else(|e| panic!("invalid projector configuration: {e}"));
        let (ready_tx, ready) = mpsc::channel();
        let (stopped_tx, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("projector-app".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime for the projector");
                runtime.block_on(async move {
                    match Application::build_stopped_on(config, StopOn::Handle).await {
                        Ok(app) => {
                            let _ = ready_tx.send(Ok((app.port(), app.handle())));
                            if let Err(e) = app.run_until_stopped().await {
                                eprintln!("projector stopped with an error: {e}");
                            }
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("({}) {e}", e.code())));
                        }
                    }
                });
                let _ = stopped_tx.send(());
            })
            .expect("spawn the projector thread");
        let (port, handle) = match ready.recv_timeout(READY_DEADLINE) {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => panic!("projector failed to start {e}"),
            Err(_) => panic!("projector did not start within {READY_DEADLINE:?}"),
        };
        TestApp {
            port,
            handle,
            stopped,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for TestApp {
    /// Stops it as SIGTERM would and waits (up to [`STOP_DEADLINE`]); a stop that hangs is
    /// reported, never raised (a panic while a failed test unwinds aborts).
    fn drop(&mut self) {
        // The command is sent when `stop` is called; the future only awaits its completion,
        // which `stopped` reports once the consumer and the relay are done too.
        drop(self.handle.stop(true));
        match self.stopped.recv_timeout(STOP_DEADLINE) {
            Ok(()) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
            Err(_) => eprintln!("projector did not stop within {STOP_DEADLINE:?}"),
        }
    }
}
