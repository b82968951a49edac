//! `projector history <customer>`: a customer's entitlement timeline straight from the log, for
//! questions like "why did this user lose access on the 3rd?".

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use shared::EventEnvelope;

use crate::config::Config;
use crate::projection::entitlements::rfc3339;
use crate::projection::{
    compute, project, CustomerState, EntitlementPolicy, EntitlementView, ProjectedEvent,
};
use crate::store::same_entitlements;

/// One change of the customer's entitlement object.
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

/// Replays `events` (in log order) for one customer: every change, and the object as of the
/// end (or as of `until`, unix seconds: only events created at or before it count).
pub fn replay<'a>(
    events: impl IntoIterator<Item = &'a ProjectedEvent>,
    account: &str,
    customer: &str,
    policy: &EntitlementPolicy,
    until: Option<i64>,
) -> (Vec<HistoryEntry>, Option<EntitlementView>) {
    let mut state = CustomerState::new(account, customer);
    let mut timeline = Vec::new();
    let mut current: Option<(serde_json::Value, EntitlementView)> = None;
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
        let value = serde_json::to_value(&view).unwrap_or_default();
        if current
            .as_ref()
            .is_some_and(|(old, _)| same_entitlements(old, &value))
        {
            // Not a change, but the object as of now still moves its `updated_at`, as the API's.
            current = Some((value, view));
            continue;
        }
        let old_features = current
            .as_ref()
            .map(|(_, v)| v.features.clone())
            .unwrap_or_default();
        timeline.push(HistoryEntry {
            at: rfc3339(event.created),
            event_id: event.event_id.clone(),
            event_type: event.event_type.clone(),
            added: view
                .features
                .iter()
                .filter(|f| !old_features.contains(f))
                .cloned()
                .collect(),
            removed: old_features
                .iter()
                .filter(|f| !view.features.contains(f))
                .cloned()
                .collect(),
            features: view.features.clone(),
            subscriptions: view
                .subscriptions
                .iter()
                .map(|s| format!("{}={}", s.id, s.status))
                .collect(),
        });
        current = Some((value, view));
    }
    (timeline, current.map(|(_, view)| view))
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
        if let Ok(envelope) = EventEnvelope::parse(payload) {
            if let Ok(event) = project(&envelope) {
                events.push(event);
            }
        }
    }
    Ok(events)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` into unix seconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b't' || b[10] == b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && &rest[3..4] == ":" =>
        {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (rest[1..3].parse::<i64>().ok()? * 3600 + rest[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // Howard Hinnant's days-from-civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::{Grant, Matcher, PastDue};

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
        let body = format!(
            r#"{{"id":"{id}","type":"{event_type}","created":{created},"data":{{"object":{{"id":"sub_1","object":"subscription","customer":"cus_1","status":"{status}","cancel_at_period_end":false,"items":{{"data":[{{"id":"si_1","price":{{"id":"price_1","product":"prod_pro"}},"quantity":1,"current_period_end":{end}}}]}}}}}}}}"#,
            end = created + 2_592_000
        );
        project(&EventEnvelope::parse(body.as_bytes()).unwrap()).unwrap()
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

        let (timeline, view) = replay(&events, "", "cus_1", &policy(), None);

        assert_eq!(timeline.len(), 3);
        assert_eq!(timeline[0].added, ["pro"]);
        assert_eq!(timeline[1].subscriptions, ["sub_1=active"]);
        assert!(timeline[1].added.is_empty() && timeline[1].removed.is_empty());
        assert_eq!(timeline[2].event_id, "evt_3");
        assert_eq!(timeline[2].removed, ["pro"]);
        assert_eq!(timeline[2].at, "2026-01-04T00:00:00Z");
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

        let (_, before) = replay(&events, "", "cus_1", &policy(), Some(1_767_484_799));
        let (_, after) = replay(&events, "", "cus_1", &policy(), Some(1_767_484_800));

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
        assert!(replay(&events, "acct_1", "cus_1", &policy(), None)
            .0
            .is_empty());
        assert!(replay(&events, "", "cus_2", &policy(), None).0.is_empty());
    }

    #[test]
    fn parses_rfc3339_instants() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-01-04T00:00:00Z"), Some(1_767_484_800));
        assert_eq!(
            parse_rfc3339("2026-01-04T01:00:00+01:00"),
            Some(1_767_484_800)
        );
        assert_eq!(
            parse_rfc3339("2026-01-03T23:00:00.5-01:00"),
            Some(1_767_484_800)
        );
        for bad in [
            "2026-01-04",
            "2026-13-01T00:00:00Z",
            "2026-01-04T00:00:00",
            "yesterday",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
