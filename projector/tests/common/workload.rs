//! Generated workloads of many customers (the crash and chaos tests): one customer's ids, clock
//! and API shape, and the start of the story every such customer goes through.

use serde_json::{json, Value};

use super::events::{
    checkout_session, customer, invoice, subscription, with, Event, Item, ENTERPRISE, MONTH, PRO,
    T0, TEAM,
};

/// An event of a story before it has an id: (type, created, object).
pub type Step = (&'static str, i64, Value);

/// Customer `i` of a workload named `name`: `cus_{name}_{i}`, its subscriptions `…_a` and `…_b`,
/// its clock starting at `T0 + i * 1000 s`, the basil shape for even `i`, the 2022-11-15 shape
/// for odd ones.
pub struct Story {
    pub name: &'static str,
    pub i: usize,
    pub customer: String,
    pub sub_a: String,
    pub sub_b: String,
    pub t: i64,
    pub basil: bool,
}

impl Story {
    pub fn new(name: &'static str, i: usize) -> Story {
        Story {
            name,
            i,
            customer: format!("cus_{name}_{i:05}"),
            sub_a: format!("sub_{name}_{i:05}_a"),
            sub_b: format!("sub_{name}_{i:05}_b"),
            t: T0 + i as i64 * 1_000,
            basil: i.is_multiple_of(2),
        }
    }

    /// The period every object of the story is in ends a month after its start.
    pub fn period_end(&self) -> i64 {
        self.t + MONTH
    }

    pub fn sub(&self, id: &str, status: &str, items: &[Item<'_>]) -> Value {
        subscription(
            id,
            &self.customer,
            status,
            items,
            self.period_end(),
            self.basil,
        )
    }

    /// Invoice `n` of subscription `_a`.
    pub fn invoice(&self, n: u32, status: &str, attempts: i64, next: Option<i64>) -> Value {
        let id = format!("in_{}_{:05}_{n}", self.name, self.i);
        let end = self.period_end();
        invoice(
            &id,
            &self.customer,
            &self.sub_a,
            status,
            attempts,
            next,
            end,
            self.basil,
        )
    }

    /// The customer is created, completes a Checkout (`client_reference_id` `user_{i}`) whose
    /// subscription `_a` is created `incomplete` and becomes `active` at `t + activated`, pays
    /// the first invoice, fails the second, and goes `past_due`.
    pub fn checkout_to_past_due(&self, activated: i64) -> Vec<Step> {
        let (c, t) = (&self.customer, self.t);
        let session = checkout_session(
            &format!("cs_{}_{:05}", self.name, self.i),
            c,
            Some(&format!("user_{:05}", self.i)),
            "subscription",
            "paid",
            Some(&self.sub_a),
            json!({}),
        );
        let sub_a = &self.sub_a;
        vec![
            ("customer.created", t, customer(c, false)),
            ("checkout.session.completed", t + 5, session),
            // With `activated` 5, the same second: the type rank, then the status rank, decide.
            (
                "customer.subscription.created",
                t + 5,
                self.sub(sub_a, "incomplete", &[PRO]),
            ),
            (
                "customer.subscription.updated",
                t + activated,
                self.sub(sub_a, "active", &[PRO]),
            ),
            ("invoice.paid", t + 6, self.invoice(1, "paid", 1, None)),
            (
                "invoice.payment_failed",
                t + 100,
                self.invoice(2, "open", 1, Some(t + 300)),
            ),
            (
                "customer.subscription.updated",
                t + 100,
                self.sub(sub_a, "past_due", &[PRO]),
            ),
        ]
    }

    /// After [`checkout_to_past_due`](Self::checkout_to_past_due): upgraded to pro and team
    /// at `t + 200`, the failed invoice paid on its second attempt.
    pub fn upgraded_and_paid(&self) -> Vec<Step> {
        let upgraded = self.sub(&self.sub_a, "active", &[PRO, TEAM]);
        vec![
            ("customer.subscription.updated", self.t + 200, upgraded),
            (
                "invoice.paid",
                self.t + 200,
                self.invoice(2, "paid", 2, None),
            ),
        ]
    }

    /// After [`checkout_to_past_due`](Self::checkout_to_past_due): `unpaid` at `t + 200`,
    /// deleted (`canceled`) at `t + 300`.
    pub fn unpaid_then_canceled(&self) -> Vec<Step> {
        let unpaid = self.sub(&self.sub_a, "unpaid", &[PRO]);
        let canceled = self.sub(&self.sub_a, "canceled", &[PRO]);
        vec![
            ("customer.subscription.updated", self.t + 200, unpaid),
            ("customer.subscription.deleted", self.t + 300, canceled),
        ]
    }

    /// Subscription `_a`, active with `items`, set to cancel at the period's end at `t + 200`.
    pub fn cancel_at_period_end(&self, items: &[Item<'_>]) -> Step {
        let active = self.sub(&self.sub_a, "active", items);
        let canceling = with(active, "cancel_at_period_end", json!(true));
        ("customer.subscription.updated", self.t + 200, canceling)
    }

    /// A second subscription, `_b`, trialing the enterprise price from `t + 50`.
    pub fn second_subscription_trialing(&self) -> Step {
        let trialing = self.sub(&self.sub_b, "trialing", &[ENTERPRISE]);
        ("customer.subscription.created", self.t + 50, trialing)
    }

    /// The id of the story's `n`th event.
    pub fn event_id(&self, n: usize) -> String {
        format!("evt_{}_{:05}_{n:02}", self.name, self.i)
    }

    /// The steps as events with their ids, in the story's API shape.
    pub fn events(&self, steps: Vec<Step>) -> Vec<Event> {
        let events = steps.into_iter().enumerate();
        let event = |(n, (event_type, created, object)): (usize, Step)| {
            let event = Event::new(&self.event_id(n), event_type, created, object);
            if self.basil {
                event
            } else {
                event.legacy_api()
            }
        };
        events.map(event).collect()
    }
}
