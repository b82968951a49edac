//! Decoding `data.object` so that every error names the field at fault, which is what an
//! operator reads in the dead-letter queue.
//!
//! Each object is one derived struct of the members the projection needs (serde skips the
//! others without keeping them); `serde_path_to_error` records where a wrong type was found.
//! What serde cannot say (a member that is required, an id that is empty, an object of the
//! wrong family) is checked after decoding, naming the member the same way. Errors depend
//! only on the bytes, never on the time or the order of arrival, so a redrive of the same
//! bytes fails the same way.

use std::fmt::{self, Display};
use std::marker::PhantomData;

use serde::de::{self, value::MapAccessDeserializer, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::ObjectKind;

/// Where every path starts: the event's `data.object`.
pub(super) const ROOT: &str = "data.object";

/// Decodes `data.object` as `T`. A wrong type reads
/// `` `data.object.items.data[0].price`: invalid type: integer `7`, expected … ``.
pub(super) fn decode<'a, T: Deserialize<'a>>(object: &'a RawValue) -> Result<T, String> {
    let mut json = serde_json::Deserializer::from_str(object.get());
    serde_path_to_error::deserialize(&mut json)
        .map(|Object(decoded)| decoded)
        .map_err(|error| {
            let path = error.path().to_string();
            let at = if path == "." {
                ROOT.to_owned()
            } else {
                format!("{ROOT}.{path}")
            };
            format!("`{at}`: {}", message(error.inner()))
        })
}

/// serde_json's message without its "at line … column …" suffix: the field path says more.
fn message(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(end) => text[..end].to_owned(),
        None => text,
    }
}

/// A member Stripe always sends: absent and `null` are both an error. `member` is its path
/// below `data.object`, rendered only when it is missing.
pub(super) fn required<T>(value: Option<T>, member: &dyn Display) -> Result<T, String> {
    value.ok_or_else(|| format!("`{ROOT}.{member}` is missing or null"))
}

/// A required id, which Stripe never sends empty.
pub(super) fn required_id(value: Option<String>, member: &dyn Display) -> Result<String, String> {
    let id = required(value, member)?;
    if id.is_empty() {
        return Err(format!("`{ROOT}.{member}` is empty"));
    }
    Ok(id)
}

/// A required reference to another object: its id, whether or not it was expanded.
pub(super) fn required_ref(
    value: Option<Reference>,
    member: &dyn Display,
) -> Result<String, String> {
    required_id(value.map(Reference::into_id), member)
}

/// The family check: an event type promises an object type, and a mismatch means the event
/// cannot be trusted for either.
pub(super) fn expect_object(found: Option<&str>, kind: ObjectKind) -> Result<(), String> {
    let expected = kind.stripe_object();
    match found {
        Some(found) if found == expected => Ok(()),
        Some(found) => Err(format!(
            "`{ROOT}.object` is {found:?}, expected {expected:?}"
        )),
        None => Err(format!(
            "`{ROOT}.object` is missing or null, expected {expected:?}"
        )),
    }
}

/// A JSON object decoded as `T`. A derived struct alone would also take an array, positionally,
/// which Stripe never sends and which would make a wrong shape look right.
pub(super) struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        only_object(deserializer, "an object").map(Object)
    }
}

/// The elements of a Stripe list object, `{"object":"list","data":[…],"has_more":…}`.
pub(super) struct List<T>(pub Vec<T>);

#[derive(Deserialize)]
#[serde(bound = "T: Deserialize<'de>")]
struct ListMembers<T> {
    data: Vec<Object<T>>,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let list: ListMembers<T> = only_object(deserializer, "a list object")?;
        Ok(List(list.data.into_iter().map(|Object(t)| t).collect()))
    }
}

fn only_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
    expecting: &'static str,
) -> Result<T, D::Error> {
    struct ObjectVisitor<T> {
        expecting: &'static str,
        decoded: PhantomData<T>,
    }

    impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map))
        }
    }

    deserializer.deserialize_map(ObjectVisitor {
        expecting,
        decoded: PhantomData,
    })
}

/// A reference Stripe renders as an id string, or as the whole object when it was expanded.
pub(super) enum Expandable<T> {
    Id(String),
    Object(T),
}

/// Any expanded Stripe object, of which only the id is needed.
#[derive(Deserialize)]
pub(super) struct IdOnly {
    id: String,
}

/// A reference to another object, of which only the id is needed.
pub(super) type Reference = Expandable<IdOnly>;

impl Reference {
    pub(super) fn into_id(self) -> String {
        match self {
            Expandable::Id(id) | Expandable::Object(IdOnly { id }) => id,
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Expandable<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExpandableVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ExpandableVisitor<T> {
            type Value = Expandable<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an id string or an expanded object")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Expandable::Id(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Expandable::Id(v))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Expandable::Object)
            }
        }

        deserializer.deserialize_any(ExpandableVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Probe {
        #[allow(dead_code)]
        status: Option<String>,
    }

    fn error(text: &str) -> String {
        let raw: Box<RawValue> = serde_json::from_str(text).expect("valid JSON");
        decode::<Probe>(&raw).expect_err("a decode error")
    }

    #[test]
    fn an_array_is_not_an_object_even_where_a_struct_would_take_it() {
        assert_eq!(
            error(r#"["active"]"#),
            "`data.object`: invalid type: sequence, expected an object"
        );
    }

    #[test]
    fn a_wrong_type_names_the_member_without_a_position() {
        assert_eq!(
            error(r#"{"status": 5}"#),
            "`data.object.status`: invalid type: integer `5`, expected a string"
        );
    }

    #[test]
    fn missing_and_empty_ids_name_their_member() {
        assert_eq!(
            required_id(None, &"items.data[2].id").unwrap_err(),
            "`data.object.items.data[2].id` is missing or null"
        );
        assert_eq!(
            required_id(Some(String::new()), &"id").unwrap_err(),
            "`data.object.id` is empty"
        );
    }
}
