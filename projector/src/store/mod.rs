//! Postgres: the projections, progress, dedupe, dead letters and the outbox. Only moves data;
//! what the data means is decided in `projection`.

mod batch;
mod dedupe;
pub mod error;
mod load;
pub mod locks;
mod poison;
pub mod read;
pub mod text;

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub(crate) use batch::subscription_items_json;
pub use batch::{
    apply_batch, BatchContext, BatchMode, BatchOutcome, InputRecord, DLQ_SQLSTATE, REBUILD_LOCK,
};
pub use dedupe::prune_processed_events;
pub use load::load_states;
pub use locks::{lock_customers, RELAY_LEADER_LOCK};
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
