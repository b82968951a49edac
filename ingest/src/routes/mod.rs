mod health;
mod webhook;

pub use health::{healthz, metrics, readyz};
pub use webhook::{stripe_webhook, RelatedObjectFetch, RelatedObjectRequest};
