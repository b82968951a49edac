//! `invoice.*`: whether and until when an invoice paid for its subscription.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::decode::{decode, expect_object, required_id, List, Reference};
use super::ObjectKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceSnapshot {
    pub id: String,
    pub customer: Option<String>,
    /// `subscription` (before basil) or `parent.subscription_details.subscription`.
    pub subscription: Option<String>,
    pub status: Option<String>,
    /// `paid` (before basil) or `status == "paid"` (basil removed the flag).
    pub paid: bool,
    pub amount_paid: i64,
    pub attempt_count: i64,
    pub next_payment_attempt: Option<i64>,
    /// The latest `lines.data[].period.end`, falling back to `period_end`.
    pub paid_through: Option<i64>,
    pub livemode: bool,
    pub raw: String,
}

/// The members of an invoice the projection reads, from both API shapes.
#[derive(Deserialize)]
struct Invoice {
    object: Option<String>,
    id: Option<String>,
    customer: Option<Reference>,
    subscription: Option<Reference>,
    parent: Option<Parent>,
    status: Option<String>,
    paid: Option<bool>,
    amount_paid: Option<i64>,
    attempt_count: Option<i64>,
    next_payment_attempt: Option<i64>,
    lines: Option<List<Line>>,
    period_end: Option<i64>,
    livemode: Option<bool>,
}

/// Basil's `invoice.parent`.
#[derive(Deserialize)]
struct Parent {
    subscription_details: Option<SubscriptionDetails>,
}

#[derive(Deserialize)]
struct SubscriptionDetails {
    subscription: Option<Reference>,
}

#[derive(Deserialize)]
struct Line {
    period: Option<Period>,
}

#[derive(Deserialize)]
struct Period {
    end: Option<i64>,
}

impl InvoiceSnapshot {
    pub(super) fn parse(object: &RawValue, livemode: bool) -> Result<Self, String> {
        let i: Invoice = decode(object)?;
        expect_object(i.object.as_deref(), ObjectKind::Invoice)?;
        let subscription = i
            .subscription
            .or_else(|| i.parent?.subscription_details?.subscription)
            .map(Reference::into_id);
        let line_end = i
            .lines
            .and_then(|List(lines)| lines.into_iter().filter_map(|l| l.period?.end).max());
        Ok(InvoiceSnapshot {
            id: required_id(i.id, &"id")?,
            customer: i.customer.map(Reference::into_id),
            subscription,
            paid: i.paid == Some(true) || i.status.as_deref() == Some("paid"),
            status: i.status,
            amount_paid: i.amount_paid.unwrap_or(0),
            attempt_count: i.attempt_count.unwrap_or(0),
            next_payment_attempt: i.next_payment_attempt,
            paid_through: line_end.or(i.period_end),
            livemode: i.livemode.unwrap_or(livemode),
            raw: object.get().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{parse, shape_error, with, without};
    use super::super::Snapshot;
    use super::*;
    use crate::projection::testing::{self, set, Api};

    fn invoice(object: &serde_json::Value) -> InvoiceSnapshot {
        match parse(ObjectKind::Invoice, "invoice.paid", object) {
            Ok(Snapshot::Invoice(s)) => s,
            other => panic!("expected an invoice, got {other:?}"),
        }
    }

    #[test]
    fn legacy_invoice_reads_subscription_paid_flag_and_line_periods() {
        let mut object = testing::fixture(Api::Legacy, "invoice");
        set(&mut object, "/subscription", json!("sub_legacy"));
        set(&mut object, "/paid", json!(true));
        set(&mut object, "/status", json!("paid"));
        set(&mut object, "/amount_paid", json!(2000));

        let i = invoice(&object);

        assert_eq!(i.id, "in_1MoqxGLgUG5tbmjcJeILGSau");
        assert_eq!(i.customer.as_deref(), Some("cus_NZbFQAsc0ptasX"));
        assert_eq!(i.subscription.as_deref(), Some("sub_legacy"));
        assert!(i.paid);
        assert_eq!(i.amount_paid, 2000);
        assert_eq!(i.attempt_count, 0);
        assert_eq!(i.next_payment_attempt, Some(1_234_567_890));
        assert_eq!(i.paid_through, Some(1_679_588_731));
    }

    #[test]
    fn basil_invoice_reads_subscription_from_parent_and_paid_from_status() {
        let mut object = testing::fixture(Api::Basil, "invoice");
        set(&mut object, "/status", json!("paid"));

        let i = invoice(&object);

        assert_eq!(
            i.subscription.as_deref(),
            Some("sub_1MoqxHLgUG5tbmjcG8lOfx2N")
        );
        assert!(i.paid);
    }

    #[test]
    fn unpaid_basil_invoice_is_not_paid() {
        let object = testing::fixture(Api::Basil, "invoice");

        let i = invoice(&object);

        assert_eq!(i.status.as_deref(), Some("draft"));
        assert!(!i.paid);
    }

    #[test]
    fn invoice_without_lines_falls_back_to_period_end() {
        let mut object = testing::fixture(Api::Legacy, "invoice");
        set(&mut object, "/lines/data", json!([]));
        set(&mut object, "/period_end", json!(1_700_000_000));

        assert_eq!(invoice(&object).paid_through, Some(1_700_000_000));
    }

    #[test]
    fn invoice_paid_through_is_the_latest_line_period_end() {
        let mut object = testing::fixture(Api::Legacy, "invoice");
        let mut later = object["lines"]["data"][0].clone();
        set(&mut later, "/period/end", json!(1_900_000_000));
        object["lines"]["data"]
            .as_array_mut()
            .expect("array")
            .insert(0, later);

        assert_eq!(invoice(&object).paid_through, Some(1_900_000_000));
    }

    #[test]
    fn malformed_invoices_are_rejected_with_the_field_at_fault() {
        let inv = || testing::fixture(Api::Legacy, "invoice");
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (without(inv(), "id"), "`data.object.id` is missing or null"),
            (
                with(inv(), "/lines", json!("nope")),
                "`data.object.lines`: invalid type: string \"nope\", expected a list object",
            ),
            (
                with(inv(), "/lines/data/0/period/end", json!("soon")),
                "`data.object.lines.data[0].period.end`: invalid type: string \"soon\", expected i64",
            ),
        ];
        for (object, expected) in cases {
            assert_eq!(
                shape_error(ObjectKind::Invoice, "invoice.paid", &object),
                expected
            );
        }
    }
}
