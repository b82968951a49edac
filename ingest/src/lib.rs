//! Ingest: verifies Stripe webhooks and appends the raw events to Kafka before answering.
#![forbid(unsafe_code)]

pub mod append;
pub mod config;
pub mod error;
pub mod metrics;
pub mod routes;
pub mod signature;
pub mod startup;
