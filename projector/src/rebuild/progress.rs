//! Rebuild progress on a terminal (one rewritten line) or as periodic log lines.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Progress on a terminal (one rewritten line) or as periodic log lines.
pub(super) struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
    tty: bool,
}

impl Progress {
    pub(super) fn new(total: u64) -> Self {
        let now = Instant::now();
        Progress {
            total,
            done: 0,
            started: now,
            last: now,
            tty: std::io::stderr().is_terminal(),
        }
    }

    pub(super) fn advance(&mut self, n: u64) {
        self.done += n;
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if self.last.elapsed() >= every {
            self.last = Instant::now();
            self.report(false);
        }
    }

    fn report(&self, last: bool) {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done as f64 / elapsed;
        let remaining = self.total.saturating_sub(self.done) as f64 / rate.max(1.0);
        if self.tty {
            let width = 30usize;
            let filled = if self.total == 0 {
                width
            } else {
                ((self.done.min(self.total) as f64 / self.total as f64) * width as f64) as usize
            };
            let mut err = std::io::stderr();
            let _ = write!(
                err,
                "\r[{}{}] {}/{} events  {:.0}/s  ETA {:.0}s   ",
                "#".repeat(filled),
                "-".repeat(width - filled),
                self.done,
                self.total,
                rate,
                remaining
            );
            if last {
                let _ = writeln!(err);
            }
        } else {
            tracing::info!(
                done = self.done,
                total = self.total,
                events_per_sec = rate as u64,
                eta_secs = remaining as u64,
                "rebuild progress"
            );
        }
    }

    pub(super) fn finish(&self) {
        self.report(true);
    }
}
