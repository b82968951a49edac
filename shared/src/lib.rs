//! What `ingest` and `projector` agree on: the Stripe event envelope, the partition key, the
//! record headers of the raw log, topic settings, Kafka client settings, telemetry, metrics
//! rendering and the entitlement change message. No I/O policy lives here.
#![forbid(unsafe_code)]

pub mod change;
pub mod config;
pub mod envelope;
pub mod kafka;
pub mod limits;
pub mod metrics;
pub mod telemetry;

pub use change::{Cause, ChangeMessage};
pub use envelope::{
    EnvelopeError, EventBody, EventEnvelope, EventSource, RelatedObject, ThinEvent,
};
