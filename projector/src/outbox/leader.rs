//! Relay leadership: at most one `projector run` instance relays the outbox at a time, the one
//! holding a session-level advisory lock on a dedicated Postgres connection.
//!
//! The lock lives exactly as long as that connection. When the leader's process dies, the
//! kernel closes its socket, Postgres ends the session and releases the lock, and a follower's
//! next attempt (every [`FOLLOWER_RETRY`]) takes it. The leader pings its connection every
//! [`HEARTBEAT`]; when a ping fails, its session (and the lock) may already be gone, so it stops
//! relaying at once rather than race a new leader.

use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, PgPool};

use crate::store::RELAY_LEADER_LOCK;

/// How often a follower tries to take the lock.
pub const FOLLOWER_RETRY: Duration = Duration::from_secs(1);
/// How often the leader checks that its lock connection is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// A ping slower than this counts as a lost connection.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one confirmation of the lock counts for the `projector_relay_leader` gauge: two
/// heartbeats, so that a leader that stops confirming (cut off, starved) stops reporting the lead
/// within a second even before its heartbeat notices.
pub const CONFIRMED_FOR: Duration = HEARTBEAT.saturating_mul(2);
/// How long a fresh leader keeps its gauge at 0 after taking the lock. Its predecessor's last
/// confirmation was sent before the predecessor's session ended, so before this lock was taken,
/// and runs out [`CONFIRMED_FOR`] after it was sent; a heartbeat more keeps the two reports half a
/// second apart, so that one round of scrapes across the instances does not see both either.
/// Relaying itself starts at once: only the report waits.
pub const QUIET: Duration = CONFIRMED_FOR.saturating_add(HEARTBEAT);
/// `application_name` of the lock connection, so operators find the leader in
/// `pg_stat_activity`.
const APPLICATION_NAME: &str = "projector-relay-leader";

/// Postgres ends the lock session after this long without a query from it (the leader pings
/// every [`HEARTBEAT`]), so a leader that is frozen or cut off from the database loses the lock
/// within this time even where no TCP reset reaches the server.
const LEASE: &str = "10s";

/// The answer to one attempt at the lock.
#[derive(sqlx::FromRow)]
struct LockAttempt {
    taken: bool,
    /// The backend pid of the lock session.
    session: i32,
}

/// The lock connection of one instance, leading or not.
pub struct LeaderLock {
    options: PgConnectOptions,
    connection: Option<PgConnection>,
    /// The backend pid of the lock session while it holds the lock; the relay reads pending rows
    /// only while this session holds it (see `Relay::publish_round`).
    holder: Option<i32>,
}

impl LeaderLock {
    /// Connects like `pool` (same server, credentials and TLS), but outside it: a pooled
    /// connection is returned and reused, and the lock must stay with one session.
    pub fn new(pool: &PgPool) -> LeaderLock {
        let options = (*pool.connect_options())
            .clone()
            .application_name(APPLICATION_NAME);
        LeaderLock {
            options,
            connection: None,
            holder: None,
        }
    }

    /// One attempt to become the leader; `Ok(false)` while another instance leads.
    pub async fn try_acquire(&mut self) -> Result<bool, sqlx::Error> {
        let connection = match &mut self.connection {
            Some(connection) => connection,
            None => {
                let mut connection = PgConnection::connect_with(&self.options).await?;
                // Postgres 14 and later; an older server keeps the session until TCP tells it.
                if let Err(e) = sqlx::query(&format!("SET idle_session_timeout = '{LEASE}'"))
                    .execute(&mut connection)
                    .await
                {
                    tracing::debug!(error = %e, "no idle_session_timeout on this server");
                }
                self.connection.insert(connection)
            }
        };
        let attempt = sqlx::query_as::<_, LockAttempt>(
            "SELECT pg_try_advisory_lock($1) AS taken, pg_backend_pid() AS session",
        )
        .bind(RELAY_LEADER_LOCK)
        .fetch_one(&mut *connection)
        .await;
        match attempt {
            Ok(LockAttempt { taken, session }) => {
                self.holder = taken.then_some(session);
                Ok(taken)
            }
            Err(e) => {
                // A broken connection is replaced at the next attempt.
                self.connection = None;
                self.holder = None;
                Err(e)
            }
        }
    }

    /// The backend pid of the session holding the lock, while this instance leads.
    pub fn holder(&self) -> Option<i32> {
        self.holder
    }

    /// Resolves when the lock can no longer be trusted: the lock connection failed or was too
    /// slow to answer a ping. Afterwards the instance is a follower again. `alive` runs after
    /// each ping that succeeded, with the moment the ping was sent.
    pub async fn lost(&mut self, alive: impl Fn(Instant)) {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            let Some(connection) = self.connection.as_mut() else {
                return;
            };
            let sent = Instant::now();
            match tokio::time::timeout(PING_TIMEOUT, connection.ping()).await {
                Ok(Ok(())) => alive(sent),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the relay lock connection failed");
                    break;
                }
                Err(_) => {
                    tracing::warn!(
                        timeout_ms = PING_TIMEOUT.as_millis() as u64,
                        "the relay lock connection did not answer"
                    );
                    break;
                }
            }
        }
        self.connection = None;
        self.holder = None;
    }

    /// Ends the session, which releases the lock at once for the next leader.
    pub async fn release(&mut self) {
        self.holder = None;
        if let Some(connection) = self.connection.take() {
            if let Err(e) = connection.close().await {
                tracing::warn!(error = %e, "closing the relay lock connection failed; Postgres releases the lock when it notices");
            }
        }
    }
}
