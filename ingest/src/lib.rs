//! Ingest: verifies Stripe webhooks and appends the raw events to Kafka before answering;
//! backfills and reconciles an account from the Stripe API into the same log.
#![forbid(unsafe_code)]

pub mod append;
pub mod backfill;
pub mod cli;
pub mod config;
pub mod error;
pub mod metrics;
pub mod reconcile;
pub mod related_fetch;
pub mod routes;
pub mod signature;
pub mod startup;
pub mod stripe_api;
