//! Test support shared by the `ingest` and `projector` suites: unique names, the real binaries
//! as child processes, Kafka topic readers, a database per test that is dropped afterwards,
//! Stripe signing (through `ingest::signature`, never a copy), Stripe payload builders and the
//! projection snapshot compare.
//!
//! It depends on `ingest` but never on `projector`, so that the projector's own unit tests can
//! use it without linking a second copy of the crate under test.
#![forbid(unsafe_code)]

pub mod database;
pub mod http;
pub mod kafka;
pub mod localstripe;
pub mod names;
pub mod process;
pub mod projections;
pub mod signing;
pub mod stripe;

pub use database::{admin_database_url, database_url_for, TestDatabase};
pub use kafka::{brokers, kafka_settings, read_topic, read_topic_to_end};
pub use names::{now, unique};
pub use process::{output_within_deadline, Service};
pub use signing::signature_header;
