//! A Postgres database per test, dropped when the test ends, passed or failed.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use crate::names::unique;

/// The prefix of every test database, so that one left behind (a SIGKILLed test run) is
/// recognisable: `SELECT datname FROM pg_database WHERE datname LIKE 'testkit\_%'`.
pub const PREFIX: &str = "testkit";

pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://stripe:stripe@127.0.0.1:5432/stripe_pipeline".into())
}

/// `url` with its database replaced, keeping the options (`?sslmode=…&sslrootcert=…`).
pub fn database_url_for(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let server = &base[..base.rfind('/').expect("a database URL with a path")];
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

/// A database of one test. Dropping it drops the database (`WITH (FORCE)`, so connections
/// still open, e.g. a killed service's pool, do not keep it alive); that runs during a failed
/// test's unwinding too, so failures leave nothing behind either.
#[derive(Debug)]
pub struct TestDatabase {
    pub name: String,
    /// The URL services and the test connect with.
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates an empty database on the server of `admin_url` (whose query options are kept).
    pub async fn create(admin_url: &str) -> TestDatabase {
        let name = unique(PREFIX);
        let mut admin = PgConnection::connect(admin_url)
            .await
            .expect("connect to Postgres (scripts/stack up)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        TestDatabase {
            url: database_url_for(admin_url, &name),
            name,
            admin_url: admin_url.to_owned(),
        }
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.name))
    }
}

/// Tries to drop a test database this many times more after a failure.
const DROP_ATTEMPTS: u64 = 5;

async fn drop_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    Ok(())
}

impl Drop for TestDatabase {
    /// `Drop` cannot await, and may run inside the test's runtime, where blocking on another
    /// future panics: the drop runs on a thread of its own with a runtime of its own, and the
    /// test waits for it. A failure is reported, never raised (a panic while unwinding aborts).
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            // The server is shared (connection slots run out under load), so a failed
            // attempt is retried for a while before the database is reported as left behind.
            runtime.block_on(async {
                let mut attempts = 0;
                loop {
                    match drop_database(&admin_url, &name).await {
                        Ok(()) => return Ok(()),
                        Err(e) if attempts >= DROP_ATTEMPTS => return Err(e.to_string()),
                        Err(_) => attempts += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(200 * attempts)).await;
                }
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("testkit: could not drop database {}: {e}", self.name),
            Err(_) => eprintln!("testkit: dropping database {} panicked", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_for_keeps_the_server_and_the_tls_options() {
        assert_eq!(
            database_url_for("postgres://u:p@h:5432/admin?sslmode=verify-full", "t1"),
            "postgres://u:p@h:5432/t1?sslmode=verify-full"
        );
        assert_eq!(
            database_url_for("postgres://u:p@h:5432/admin", "t1"),
            "postgres://u:p@h:5432/t1"
        );
    }

    async fn exists(name: &str) -> bool {
        let mut admin = PgConnection::connect(&admin_database_url())
            .await
            .expect("connect");
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await
            .expect("pg_database")
    }

    /// Needs the local stack's Postgres.
    #[tokio::test]
    async fn a_test_database_is_gone_once_its_guard_is_dropped_even_with_a_connection_open() {
        let database = TestDatabase::create(&admin_database_url()).await;
        let name = database.name.clone();
        let _open = database.connect().await;
        assert!(exists(&name).await, "{name} was not created");

        drop(database);

        assert!(!exists(&name).await, "{name} is still there");
    }

    /// Needs the local stack's Postgres.
    #[tokio::test]
    async fn a_test_database_is_dropped_when_its_test_panics() {
        let database = TestDatabase::create(&admin_database_url()).await;
        let name = database.name.clone();

        let failed = tokio::spawn(async move {
            let _database = database;
            panic!("the test fails");
        })
        .await;

        assert!(failed.is_err());
        assert!(!exists(&name).await, "{name} outlived its failed test");
    }
}
