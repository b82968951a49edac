//! Postgres: the projections, progress, dedupe, dead letters and the outbox. Only moves data;
//! what the data means is decided in `projection`.
//!
//! Where each rule lives:
//! - [`batch`]: one batch → one transaction, the order of its steps, and what each
//!   [`BatchMode`] writes;
//! - [`decode`]: a record's bytes → a projected event or a dead letter's reason (pure, so the
//!   consumer runs it ahead of the transaction);
//! - [`offsets`]: `consumer_offsets`, progress written with the data it covers;
//! - [`dedupe`]: `processed_events`, event-id dedupe and its pruning window;
//! - [`objects`]: the five projection tables, upserted under the rank guard;
//! - [`load`]: stored snapshots → `CustomerState`;
//! - [`entitlements`]: `entitlements`, recomputed per touched customer, versioned, announced;
//! - [`outbox`] and [`dead_letters`]: rows for the relay and for redrive;
//! - [`locks`]: every advisory lock; [`poison`]: a record Postgres refused; [`error`]: which
//!   failures are retried; [`read`]: the read API's queries; [`text`]: what Postgres cannot
//!   store.

mod batch;
mod dead_letters;
mod decode;
mod dedupe;
mod entitlements;
pub mod error;
mod load;
pub mod locks;
mod objects;
mod offsets;
mod outbox;
mod poison;
pub mod read;
pub mod text;

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use batch::{apply_batch, BatchContext, BatchMode, BatchOutcome, REBUILD_LOCK};
pub use dead_letters::DLQ_SQLSTATE;
pub use decode::{decode, BatchRecord, Decoded, DecodedRecord, InputRecord, Rejection};
pub use dedupe::prune_processed_events;
pub use load::load_states;
pub use locks::{lock_customers, REBUILD_RUNNING_LOCK, RELAY_LEADER_LOCK};
pub(crate) use objects::subscription_items_json;
pub use poison::{dead_letter_rejected, DATABASE_REJECTED};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// A pool on `url`; fails fast when the database is unreachable.
pub async fn connect(url: &SecretString, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    connect_in(url, max_connections, None).await
}

/// A pool whose unqualified table names resolve in `schema` (a rebuild's fresh tables).
pub async fn connect_in(
    url: &SecretString,
    max_connections: u32,
    schema: Option<&str>,
) -> Result<PgPool, sqlx::Error> {
    let mut options: PgConnectOptions = url.expose_secret().parse()?;
    if let Some(schema) = schema {
        options = options.options([("search_path", schema)]);
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
}

/// Applies the migrations that have not run yet.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

#[cfg(test)]
mod tests {
    use sqlx::postgres::PgConnectOptions;

    /// `PgSslMode` has no `PartialEq`; its Debug name is the mode.
    fn mode_of(url: &str) -> String {
        let options: PgConnectOptions = url.parse().unwrap();
        format!("{:?}", options.get_ssl_mode())
    }

    #[test]
    fn database_urls_take_libpqs_tls_modes_and_root_certificate() {
        for (mode, want) in [
            ("disable", "Disable"),
            ("prefer", "Prefer"),
            ("require", "Require"),
            ("verify-ca", "VerifyCa"),
            ("verify-full", "VerifyFull"),
        ] {
            let url =
                format!("postgres://u:p@db.example:5432/x?sslmode={mode}&sslrootcert=/etc/ca.pem");
            assert_eq!(mode_of(&url), want, "{mode}");
        }
        assert_eq!(mode_of("postgres://u:p@db.example/x"), "Prefer");
        assert!("postgres://u:p@db.example/x?sslmode=sometimes"
            .parse::<PgConnectOptions>()
            .is_err());
    }
}
