//! The one place where ingest's failures become HTTP responses.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::append::AppendError;
use crate::signature::SignatureError;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the Stripe-Signature header is missing")]
    MissingSignature,
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("the payload is not a Stripe event envelope: {0}")]
    InvalidPayload(String),
    #[error("the body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the body could not be read")]
    BodyRead,
    #[error("the body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("the event could not be stored durably; retry later")]
    Unavailable(#[source] AppendError),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
}

impl IngestError {
    /// The stable error code of the response body.
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::MissingSignature => "missing_signature",
            IngestError::Signature(e) => e.code(),
            IngestError::InvalidPayload(_) => "invalid_payload",
            IngestError::PayloadTooLarge { .. } => "payload_too_large",
            IngestError::BodyRead => "bad_request",
            IngestError::BodyTimeout(_) => "request_timeout",
            IngestError::Unavailable(_) => "unavailable",
        }
    }
}

impl ResponseError for IngestError {
    fn status_code(&self) -> StatusCode {
        match self {
            IngestError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            IngestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        // The message names the failure, never a cause chain with broker internals.
        let mut response = HttpResponse::build(self.status_code());
        match self {
            IngestError::Unavailable(_) => {
                response.insert_header(("Retry-After", "5"));
            }
            // The rest of the body is not wanted: closing the connection stops it from being
            // read (and drained) at all, where keeping it alive would read 100 MB to discard.
            IngestError::PayloadTooLarge { .. } | IngestError::BodyTimeout(_) => {
                response.force_close();
            }
            _ => {}
        }
        response.json(ErrorBody {
            error: self.code(),
            message: self.to_string(),
        })
    }
}
