//! The projector: consumes `stripe.events`, keeps projections in Postgres, publishes entitlement
//! changes and serves the read API.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod consumer;
pub mod history;
pub mod isolation;
pub mod metrics;
pub mod outbox;
pub mod projection;
pub mod pruning;
pub mod rebuild;
pub mod redrive;
pub mod startup;
pub mod store;
