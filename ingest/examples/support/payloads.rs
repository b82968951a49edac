//! Realistic Stripe webhook bodies for the benchmarks: subscriptions with several items and
//! invoices with several lines, 2-8 KB each, shaped like the API's (basil and later) objects.
//! Rendering is a concatenation of pre-serialised pieces, so the generator spends its CPU on
//! the connections and on signing, not on JSON.

use serde_json::json;

/// What varies per request; everything else is fixed per template.
enum Piece {
    Text(String),
    EventId,
    Created,
    Customer,
}

/// One pre-serialised event body with holes for the event id, `created` and the customer.
pub struct Template {
    pieces: Vec<Piece>,
    /// Bytes of one rendering, for reporting.
    pub approx_len: usize,
    pub event_type: &'static str,
}

const EVENT_ID: &str = "@@EVENT_ID@@";
/// `created` is a number: the template holds it as this string, quotes included in the hole.
const CREATED: &str = "@@CREATED@@";
const CREATED_HOLE: &str = "\"@@CREATED@@\"";
const CUSTOMER: &str = "@@CUSTOMER@@";

impl Template {
    fn new(event_type: &'static str, body: serde_json::Value) -> Self {
        let text = body.to_string();
        let mut pieces = Vec::new();
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let next = [
                (rest.find(EVENT_ID), EVENT_ID.len(), 0),
                (rest.find(CREATED_HOLE), CREATED_HOLE.len(), 1),
                (rest.find(CUSTOMER), CUSTOMER.len(), 2),
            ]
            .into_iter()
            .filter_map(|(at, len, which)| at.map(|at| (at, len, which)))
            .min_by_key(|(at, _, _)| *at);
            match next {
                None => {
                    pieces.push(Piece::Text(rest.to_owned()));
                    break;
                }
                Some((at, len, which)) => {
                    pieces.push(Piece::Text(rest[..at].to_owned()));
                    pieces.push(match which {
                        0 => Piece::EventId,
                        1 => Piece::Created,
                        _ => Piece::Customer,
                    });
                    rest = &rest[at + len..];
                }
            }
        }
        Template {
            approx_len: text.len(),
            pieces,
            event_type,
        }
    }

    /// Appends one body to `out`.
    pub fn render(&self, out: &mut Vec<u8>, event_id: &str, created: i64, customer: &str) {
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.extend_from_slice(t.as_bytes()),
                Piece::EventId => out.extend_from_slice(event_id.as_bytes()),
                Piece::Created => out.extend_from_slice(created.to_string().as_bytes()),
                Piece::Customer => out.extend_from_slice(customer.as_bytes()),
            }
        }
    }
}

fn price(n: usize) -> serde_json::Value {
    let (id, product, amount) = [
        ("price_pro_month", "prod_pro", 4900),
        ("price_team_month", "prod_team", 19900),
        ("price_basic", "prod_basic", 900),
        ("price_seats", "prod_seats", 1200),
        ("price_storage", "prod_storage", 500),
        ("price_support", "prod_support", 9900),
    ][n % 6];
    json!({
        "id": id, "object": "price", "active": true, "billing_scheme": "per_unit",
        "created": 1_700_000_000 + n as i64, "currency": "usd", "custom_unit_amount": null,
        "livemode": false, "lookup_key": null, "metadata": {"tier": "standard", "catalog": "2026"},
        "nickname": null, "product": product,
        "recurring": {"aggregate_usage": null, "interval": "month", "interval_count": 1,
                      "meter": null, "trial_period_days": null, "usage_type": "licensed"},
        "tax_behavior": "exclusive", "tiers_mode": null, "transform_quantity": null,
        "type": "recurring", "unit_amount": amount, "unit_amount_decimal": amount.to_string()
    })
}

fn envelope(event_type: &str, object: serde_json::Value) -> serde_json::Value {
    json!({
        "id": EVENT_ID, "object": "event", "api_version": "2025-03-31.basil",
        "created": CREATED, "data": {"object": object, "previous_attributes": {"metadata": {"seats": "4"}}},
        "livemode": false, "pending_webhooks": 2,
        "request": {"id": "req_Q8h2kLm3NpR4sT", "idempotency_key": "a2f3c1d4-7b8e-4e9a-9c1b-2d3e4f5a6b7c"},
        "type": event_type
    })
}

fn subscription(items: usize) -> Template {
    let data: Vec<serde_json::Value> = (0..items)
        .map(|n| {
            json!({
                "id": format!("si_R{n}x8LmNqP2vW"), "object": "subscription_item",
                "billing_thresholds": null, "created": 1_767_000_000, "current_period_end": CREATED,
                "current_period_start": 1_767_000_000, "discounts": [], "metadata": {},
                "plan": {"id": price(n)["id"], "object": "plan", "active": true, "amount": price(n)["unit_amount"],
                         "billing_scheme": "per_unit", "currency": "usd", "interval": "month",
                         "interval_count": 1, "product": price(n)["product"], "usage_type": "licensed"},
                "price": price(n), "quantity": 1 + n as i64, "subscription": "sub_@@CUSTOMER@@",
                "tax_rates": []
            })
        })
        .collect();
    let object = json!({
        "id": "sub_@@CUSTOMER@@", "object": "subscription", "application": null,
        "application_fee_percent": null,
        "automatic_tax": {"disabled_reason": null, "enabled": false, "liability": null},
        "billing_cycle_anchor": 1_767_000_000, "billing_cycle_anchor_config": null,
        "cancel_at": null, "cancel_at_period_end": false, "canceled_at": null,
        "cancellation_details": {"comment": null, "feedback": null, "reason": null},
        "collection_method": "charge_automatically", "created": 1_767_000_000, "currency": "usd",
        "customer": "@@CUSTOMER@@", "days_until_due": null,
        "default_payment_method": "pm_1QzXk2LmNqP2vW8h", "default_source": null,
        "default_tax_rates": [], "description": null, "discounts": [], "ended_at": null,
        "invoice_settings": {"account_tax_ids": null, "issuer": {"type": "self"}},
        "items": {"object": "list", "data": data, "has_more": false, "total_count": items,
                  "url": "/v1/subscription_items?subscription=sub_@@CUSTOMER@@"},
        "latest_invoice": "in_1QzXk2LmNqP2vW8h", "livemode": false,
        "metadata": {"workspace": "ws_4821", "plan_source": "checkout"},
        "next_pending_invoice_item_invoice": null, "on_behalf_of": null, "pause_collection": null,
        "payment_settings": {"payment_method_options": null, "payment_method_types": null,
                             "save_default_payment_method": "off"},
        "pending_invoice_item_interval": null, "pending_setup_intent": null, "pending_update": null,
        "schedule": null, "start_date": 1_767_000_000, "status": "active", "test_clock": null,
        "transfer_data": null, "trial_end": null,
        "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": null
    });
    Template::new(
        "customer.subscription.updated",
        envelope("customer.subscription.updated", object),
    )
}

fn invoice(lines: usize) -> Template {
    let data: Vec<serde_json::Value> = (0..lines)
        .map(|n| {
            json!({
                "id": format!("il_1QzXk{n}LmNqP2vW8h"), "object": "line_item", "amount": 4900,
                "currency": "usd", "description": format!("{} x Pro (at $49.00 / month)", 1 + n),
                "discount_amounts": [], "discountable": true, "discounts": [],
                "invoice": "in_@@EVENT_ID@@", "livemode": false, "metadata": {},
                "parent": {"invoice_item_details": null, "subscription_item_details": {
                    "invoice_item": null, "proration": false, "proration_details": {"credited_items": null},
                    "subscription": "sub_@@CUSTOMER@@", "subscription_item": format!("si_R{n}x8LmNqP2vW")},
                    "type": "subscription_item_details"},
                "period": {"end": CREATED, "start": 1_767_000_000},
                "pricing": {"price_details": {"price": price(n)["id"], "product": price(n)["product"]},
                            "type": "price_details", "unit_amount_decimal": "4900"},
                "quantity": 1 + n as i64, "taxes": []
            })
        })
        .collect();
    let object = json!({
        "id": "in_@@EVENT_ID@@", "object": "invoice", "account_country": "US",
        "account_name": "Example SaaS Inc.", "account_tax_ids": null, "amount_due": 4900,
        "amount_overpaid": 0, "amount_paid": 4900, "amount_remaining": 0, "amount_shipping": 0,
        "application": null, "attempt_count": 1, "attempted": true, "auto_advance": false,
        "automatic_tax": {"disabled_reason": null, "enabled": false, "liability": null, "status": null},
        "billing_reason": "subscription_cycle", "collection_method": "charge_automatically",
        "created": 1_767_000_000, "currency": "usd", "customer": "@@CUSTOMER@@",
        "customer_address": {"city": "Berlin", "country": "DE", "line1": "Torstrasse 1",
                             "line2": null, "postal_code": "10119", "state": null},
        "customer_email": "billing@example.com", "customer_name": "Example GmbH",
        "customer_tax_exempt": "none", "customer_tax_ids": [], "default_payment_method": null,
        "description": null, "discounts": [], "due_date": null, "ending_balance": 0,
        "hosted_invoice_url": "https://invoice.stripe.com/i/acct_1Qz/test_YWNjdF8xUXo",
        "invoice_pdf": "https://pay.stripe.com/invoice/acct_1Qz/test_YWNjdF8xUXo/pdf",
        "lines": {"object": "list", "data": data, "has_more": false, "total_count": lines,
                  "url": "/v1/invoices/in_@@EVENT_ID@@/lines"},
        "livemode": false, "metadata": {}, "next_payment_attempt": null,
        "number": "A1B2C3D4-0042", "parent": {"quote_details": null, "subscription_details": {
            "metadata": {}, "subscription": "sub_@@CUSTOMER@@"}, "type": "subscription_details"},
        "period_end": CREATED, "period_start": 1_767_000_000, "status": "paid",
        "status_transitions": {"finalized_at": 1_767_000_100, "marked_uncollectible_at": null,
                               "paid_at": 1_767_000_200, "voided_at": null},
        "subtotal": 4900, "total": 4900, "total_discount_amounts": [], "total_taxes": []
    });
    Template::new("invoice.paid", envelope("invoice.paid", object))
}

/// The mix the load generator cycles through: subscriptions with 1-4 items, invoices with
/// 1-6 lines.
pub fn templates() -> Vec<Template> {
    let mut all: Vec<Template> = (1..=4).map(subscription).collect();
    all.extend((1..=6).map(invoice));
    all
}
