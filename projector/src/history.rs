//! `projector history <customer>`: a customer's entitlement timeline straight from the log, for
//! questions like "why did this user lose access on the 3rd?".

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use shared::{Cause, ChangeMessage, EventEnvelope};

use crate::config::Config;
use crate::projection::entitlements::rfc3339;
use crate::projection::{
    change_message, compute, project, same_entitlements, CustomerState, EntitlementPolicy,
    EntitlementView, ProjectedEvent,
};
use crate::store::text::storable_json;

/// One change of the customer's entitlement object, as `projector history` prints it: the
/// change message the live projector announced for it, with Stripe's time of its cause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// Stripe's `created` of the event that caused it (RFC 3339).
    pub at: String,
    pub event_id: String,
    pub event_type: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub features: Vec<String>,
    /// Subscription statuses after the change, `sub_…=status`.
    pub subscriptions: Vec<String>,
}

impl HistoryEntry {
    /// `change`, caused by an event Stripe created at `created` (unix seconds).
    fn new(created: i64, change: &ChangeMessage<&EntitlementView>) -> Self {
        HistoryEntry {
            at: rfc3339(created),
            event_id: change.cause.event_id.clone().unwrap_or_default(),
            event_type: change.cause.event_type.clone(),
            added: change.added.clone(),
            removed: change.removed.clone(),
            features: change.object.features.clone(),
            subscriptions: change
                .object
                .subscriptions
                .iter()
                .map(|s| format!("{}={}", s.id, s.status))
                .collect(),
        }
    }
}

/// Replays `events` (in log order) for one customer: every change, and the object as of the
/// end (or as of `until`, unix seconds: only events created at or before it count). A change
/// is what the live projector would announce: [`same_entitlements`] decides, [`change_message`]
/// describes it.
pub fn replay<'a>(
    events: impl IntoIterator<Item = &'a ProjectedEvent>,
    account: &str,
    customer: &str,
    policy: &EntitlementPolicy,
    until: Option<i64>,
) -> (Vec<HistoryEntry>, Option<EntitlementView>) {
    /// The object as of the last event replayed, and the same as stored JSON, compared.
    struct Current {
        stored: serde_json::Value,
        view: EntitlementView,
    }

    let mut state = CustomerState::new(account, customer);
    let mut timeline = Vec::new();
    let mut current: Option<Current> = None;
    for event in events {
        if event.account != account
            || event.customer.as_deref() != Some(customer)
            || event.snapshot.is_none()
        {
            continue;
        }
        if until.is_some_and(|until| event.created > until) {
            continue;
        }
        state.apply(event);
        let view = compute(&state, policy);
        let stored = serde_json::to_value(&view).unwrap_or_default();
        let changed = current
            .as_ref()
            .is_none_or(|current| !same_entitlements(&current.stored, &stored));
        if changed {
            let before: &[String] = current.as_ref().map_or(&[], |c| &c.view.features);
            // The version is the change's place in this replay: the store's counter is not in
            // the log.
            let version = timeline.len() as i64 + 1;
            let change = change_message(
                &view,
                version,
                before,
                &view.features,
                Cause::event(&event.event_id, &event.event_type),
            );
            timeline.push(HistoryEntry::new(event.created, &change));
        }
        // Not a change or not, the object as of now moves its `updated_at`, as the API's does.
        current = Some(Current { stored, view });
    }
    (timeline, current.map(|current| current.view))
}

/// Reads the customer's events from the log (records keyed by the customer) and projects them.
pub fn read_customer_events(
    config: &Config,
    account: Option<&str>,
    customer: &str,
) -> Result<Vec<ProjectedEvent>, String> {
    let key = shared::envelope::scoped_key(account, customer);
    let consumer: BaseConsumer = config
        .kafka
        .client_config()
        .set("group.id", format!("{}-history", config.group_id))
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    let topic = &config.events_topic;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0i64;
    let mut ends = std::collections::HashMap::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            ends.insert(p.id(), high);
            if high > low {
                remaining += high - low;
                assignment
                    .add_partition_offset(topic, p.id(), Offset::Beginning)
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    let mut events = Vec::new();
    if remaining == 0 {
        return Ok(events);
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    // The watermarks read above fix the end: records appended while we read belong to a later
    // question.
    let mut read = 0i64;
    while read < remaining {
        let Some(message) = consumer.poll(Duration::from_secs(10)) else {
            return Err(format!(
                "the log stopped answering after {read} of {remaining} records"
            ));
        };
        let message = message.map_err(|e| e.to_string())?;
        if message.offset() >= ends.get(&message.partition()).copied().unwrap_or(i64::MAX) {
            continue;
        }
        read += 1;
        if message.key() != Some(key.as_bytes()) {
            continue;
        }
        let Some(payload) = message.payload() else {
            continue;
        };
        // As the live projector does, so that a record it projects is in the timeline too.
        let payload = storable_json(payload);
        if let Ok(envelope) = EventEnvelope::parse(&payload) {
            if let Ok(event) = project(&envelope) {
                events.push(event);
            }
        }
    }
    Ok(events)
}

/// Parses an RFC 3339 instant (`2026-01-04T00:00:00Z`, `…T01:00:00.5+01:00`) into unix seconds,
/// rejecting what is not one (`2026-02-31`, a date without a time, anything non-ASCII) with
/// a message for the command line. The `value_parser` of `projector history --at`.
pub fn parse_instant(text: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|instant| instant.unix_timestamp())
        .map_err(|e| format!("expected an RFC 3339 instant such as 2026-01-04T00:00:00Z ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::testing::{self, event, Api, Item, CUSTOMER};
    use crate::projection::{Grant, Matcher, PastDue};

    const PRO: Item<'static> = ("price_1", "prod_pro", None);

    fn policy() -> EntitlementPolicy {
        EntitlementPolicy {
            past_due: PastDue::Grant,
            grants: vec![Grant {
                matcher: Matcher::Product("prod_pro".into()),
                features: vec!["pro".into()],
            }],
        }
    }

    fn subscription_event(
        id: &str,
        event_type: &str,
        created: i64,
        status: &str,
    ) -> ProjectedEvent {
        let object = testing::subscription(Api::Basil, "sub_1", status, &[PRO]);
        event(event_type, object)
            .id(id)
            .created(created)
            .api(Api::Basil)
            .project()
    }

    #[test]
    fn timeline_lists_each_change_with_its_cause() {
        let events = [
            subscription_event(
                "evt_1",
                "customer.subscription.created",
                1_767_225_600,
                "trialing",
            ),
            subscription_event(
                "evt_2",
                "customer.subscription.updated",
                1_767_225_700,
                "active",
            ),
            subscription_event(
                "evt_3",
                "customer.subscription.updated",
                1_767_484_800,
                "unpaid",
            ),
        ];

        let (timeline, view) = replay(&events, "", CUSTOMER, &policy(), None);

        assert_eq!(timeline.len(), 3);
        assert_eq!(timeline[0].added, ["pro"]);
        assert_eq!(timeline[1].subscriptions, ["sub_1=active"]);
        assert!(timeline[1].added.is_empty() && timeline[1].removed.is_empty());
        assert_eq!(timeline[2].event_id, "evt_3");
        assert_eq!(timeline[2].removed, ["pro"]);
        assert_eq!(timeline[2].at, "2026-01-04T00:00:00Z");
        assert_eq!(timeline[2].event_type, "customer.subscription.updated");
        assert!(view.unwrap().features.is_empty());
    }

    #[test]
    fn as_of_an_instant_only_earlier_events_count() {
        let events = [
            subscription_event(
                "evt_1",
                "customer.subscription.created",
                1_767_225_600,
                "active",
            ),
            subscription_event(
                "evt_2",
                "customer.subscription.updated",
                1_767_484_800,
                "canceled",
            ),
        ];

        let (_, before) = replay(&events, "", CUSTOMER, &policy(), Some(1_767_484_799));
        let (_, after) = replay(&events, "", CUSTOMER, &policy(), Some(1_767_484_800));

        assert_eq!(before.unwrap().features, ["pro"]);
        assert!(after.unwrap().features.is_empty());
    }

    #[test]
    fn other_customers_and_accounts_are_not_replayed() {
        let events = [subscription_event(
            "evt_1",
            "customer.subscription.created",
            1_767_225_600,
            "active",
        )];
        let (other_account, _) = replay(&events, "acct_1", CUSTOMER, &policy(), None);
        let (other_customer, _) = replay(&events, "", "cus_2", &policy(), None);

        assert!(other_account.is_empty());
        assert!(other_customer.is_empty());
    }

    #[test]
    fn parses_rfc3339_instants() {
        assert_eq!(parse_instant("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_instant("2026-01-04T00:00:00Z"), Ok(1_767_484_800));
        assert_eq!(
            parse_instant("2026-01-04T01:00:00+01:00"),
            Ok(1_767_484_800)
        );
        assert_eq!(
            parse_instant("2026-01-03T23:00:00.5-01:00"),
            Ok(1_767_484_800)
        );
        assert_eq!(parse_instant("2024-02-29T00:00:00Z"), Ok(1_709_164_800));
    }

    #[test]
    fn refuses_what_is_not_an_instant_without_panicking() {
        for bad in [
            "2026-01-04",
            "2026-13-01T00:00:00Z",
            "2026-02-31T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-01-04T00:00:00",
            "2026-01-04T24:00:00Z",
            "yesterday",
            "",
            "2026-01-0\u{e9}T00:00:00Z",
            "\u{e9}\u{e9}\u{e9}\u{e9}-01-04T00:00:00Z",
            "2026-01-04T00:00:00\u{2212}01:00",
            "２０２６-01-04T00:00:00Z",
        ] {
            let error = parse_instant(bad).expect_err(bad);
            assert!(
                error.starts_with("expected an RFC 3339 instant"),
                "{bad}: {error}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_text(text in "\\PC{0,40}") {
            let _ = parse_instant(&text);
        }

        #[test]
        fn formats_and_parses_back_every_second(unix in -62_135_596_800i64..=253_402_300_799) {
            proptest::prop_assert_eq!(parse_instant(&rfc3339(unix)), Ok(unix));
        }
    }
}
