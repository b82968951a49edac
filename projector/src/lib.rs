//! The projector: consumes `stripe.events`, keeps projections in Postgres, publishes entitlement
//! changes and serves the read API.
#![forbid(unsafe_code)]

pub mod projection;
