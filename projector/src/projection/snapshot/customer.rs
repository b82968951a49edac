//! `customer.*`: who the customer is, and whether they were deleted.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::decode::{decode, expect_object, required_id};
use super::ObjectKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerSnapshot {
    pub id: String,
    pub livemode: bool,
    pub email: Option<String>,
    pub name: Option<String>,
    /// The event is `customer.deleted`, or the object says `deleted: true`.
    pub deleted: bool,
    /// The exact JSON text of `data.object`.
    pub raw: String,
}

/// The members of a customer the projection reads.
#[derive(Deserialize)]
struct Customer {
    object: Option<String>,
    id: Option<String>,
    livemode: Option<bool>,
    email: Option<String>,
    name: Option<String>,
    deleted: Option<bool>,
}

impl CustomerSnapshot {
    pub(super) fn parse(
        event_type: &str,
        object: &RawValue,
        livemode: bool,
    ) -> Result<Self, String> {
        let c: Customer = decode(object)?;
        expect_object(c.object.as_deref(), ObjectKind::Customer)?;
        Ok(CustomerSnapshot {
            id: required_id(c.id, &"id")?,
            livemode: c.livemode.unwrap_or(livemode),
            email: c.email,
            name: c.name,
            deleted: event_type == "customer.deleted" || c.deleted == Some(true),
            raw: object.get().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{parse, shape_error, with};
    use super::super::Snapshot;
    use super::*;
    use crate::projection::testing::{self, Api};

    #[test]
    fn deleted_customer_stub_is_read_as_deleted() {
        let object = testing::fixture(Api::Legacy, "deleted_customer");

        let s = match parse(ObjectKind::Customer, "customer.updated", &object) {
            Ok(Snapshot::Customer(s)) => s,
            other => panic!("expected a customer, got {other:?}"),
        };

        assert!(s.deleted);
        assert_eq!(s.email, None);
    }

    #[test]
    fn customer_with_a_wrong_email_type_is_rejected_with_the_field_at_fault() {
        let object = with(
            testing::fixture(Api::Legacy, "customer"),
            "/email",
            json!(["a"]),
        );

        assert_eq!(
            shape_error(ObjectKind::Customer, "customer.updated", &object),
            "`data.object.email`: invalid type: sequence, expected a string"
        );
    }
}
