//! A relay publish read in place. Most of what a relay client sends is
//! `{"type":"publish","channel":...,"data":...}`; building a JSON tree of the
//! whole request and serialising a tree again as the delivered message costs
//! more than the rest of the publish path together. This reads such a frame
//! straight into its fields, keeps a string `data` (the usual case) borrowed
//! from the frame, and writes the delivered message from it: byte for byte
//! what the tree would have given. Anything else (other fields, repeated
//! fields, an `origin`, an id the full parser would refuse) is left to
//! `edgewire_api::wire::parse_client_message`, so every answer and error
//! stays what it was.

use std::borrow::Cow;
use std::fmt;

use edgewire_api::wire::{RequestId, ServerMessage};
use serde::Deserialize;
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The longest request id the full parser accepts.
const MAX_ID_LEN: usize = 128;

/// A plain publish, borrowed from the client's frame where it can be.
#[derive(Debug)]
pub struct PlainPublish<'a> {
    pub id: Option<RequestId>,
    pub channel: Cow<'a, str>,
    data: Data<'a>,
}

/// A publish's `data`: a string, kept as it is, or any other JSON value.
#[derive(Debug)]
enum Data<'a> {
    Text(Cow<'a, str>),
    Other(Value),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    data: Data<'a>,
    #[serde(default)]
    id: Option<RequestId>,
}

/// `text` as a plain publish; `None` for anything else, which the full
/// parser then reads (and answers or refuses as it always has).
pub fn parse(text: &str) -> Option<PlainPublish<'_>> {
    let fields: Fields = serde_json::from_str(text).ok()?;
    if fields.kind != "publish" {
        return None;
    }
    if let Some(RequestId::Text(id)) = &fields.id
        && id.len() > MAX_ID_LEN
    {
        return None;
    }
    Some(PlainPublish {
        id: fields.id,
        channel: fields.channel,
        data: fields.data,
    })
}

impl PlainPublish<'_> {
    /// The message delivered to subscribers: the same text as
    /// `ServerMessage::Message { channel, data, origin: None }.to_json()`.
    pub fn message_frame(self) -> String {
        match self.data {
            Data::Text(text) => {
                let mut out = Vec::with_capacity(36 + self.channel.len() + text.len());
                out.extend_from_slice(br#"{"type":"message","channel":"#);
                // Writing strings into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut out, self.channel.as_ref());
                out.extend_from_slice(br#","data":"#);
                let _ = serde_json::to_writer(&mut out, text.as_ref());
                out.push(b'}');
                String::from_utf8(out).unwrap_or_default()
            }
            Data::Other(data) => ServerMessage::Message {
                channel: self.channel.into_owned(),
                data,
                origin: None,
            }
            .to_json(),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Data<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DataVisitor(std::marker::PhantomData))
    }
}

/// Reads a string without copying it when it has no escapes, and anything
/// else into the same tree the full parser builds.
struct DataVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for DataVisitor<'a> {
    type Value = Data<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Data::Text(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Data::Text(Cow::Owned(v.to_string())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Data::Text(Cow::Owned(v)))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Data::Other(Value::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Data::Other(Value::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Data::Other(Value::from(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Data::Other(Value::from(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Data::Other(Value::Null))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Value::deserialize(MapAccessDeserializer::new(map)).map(Data::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Value::deserialize(SeqAccessDeserializer::new(seq)).map(Data::Other)
    }
}

#[cfg(test)]
mod tests {
    use edgewire_api::wire::{ClientMessage, parse_client_message};

    use super::*;

    /// What the full parser and the tree make of `text`.
    fn through_the_tree(text: &str) -> (Option<RequestId>, String) {
        match parse_client_message(text).unwrap() {
            ClientMessage::Publish {
                id,
                channel,
                data,
                origin: None,
            } => (
                id,
                ServerMessage::Message {
                    channel,
                    data,
                    origin: None,
                }
                .to_json(),
            ),
            other => panic!("not a plain publish: {other:?}"),
        }
    }

    #[test]
    fn the_delivered_message_is_the_one_the_tree_gives() {
        let datas = [
            r#""12:3456""#,
            r#""caf\u00e9 \"quoted\"""#,
            r#""line\nbreak\t\u0001 \ud83d\ude00 \/""#,
            r#""naïve / ☃""#,
            "42",
            "-7",
            "-0",
            "0",
            "123456789012345678901234",
            "1.50",
            "1e3",
            "true",
            "false",
            "null",
            r#"{"t": 21.5, "a": [1, 2]}"#,
            r#"{"b":1,"a":2}"#,
            r#"{"a":1,"a":2}"#,
            "[ ]",
        ];
        for data in datas {
            for envelope in [
                format!(r#"{{"type":"publish","channel":"chat","data":{data}}}"#),
                format!(
                    r#"{{ "data" : {data}, "id": 7, "channel": "ch\"an", "type": "publish" }}"#
                ),
                format!(r#"{{"type":"publish","id":"r-1","channel":"c","data":{data}}}"#),
            ] {
                let plain = parse(&envelope).unwrap_or_else(|| panic!("{envelope}"));
                let (id, frame) = through_the_tree(&envelope);
                assert_eq!(plain.id, id, "{envelope}");
                assert_eq!(plain.message_frame(), frame, "{envelope}");
            }
        }
    }

    #[test]
    fn everything_else_is_left_to_the_full_parser() {
        let long_id = format!(
            r#"{{"type":"publish","channel":"c","data":1,"id":"{}"}}"#,
            "x".repeat(MAX_ID_LEN + 1)
        );
        for text in [
            r#"{"type":"subscribe","channel":"c"}"#,
            r#"{"type":"publish","channel":"c"}"#,
            r#"{"type":"publish","channel":"c","data":1,"extra":true}"#,
            r#"{"type":"publish","channel":"c","data":1,"origin":{"node":"n","seq":1}}"#,
            r#"{"type":"publish","channel":"c","channel":"d","data":1}"#,
            r#"{"type":"publish","channel":7,"data":1}"#,
            r#"{"type":"publish","channel":"c","data":1,"id":-1}"#,
            r#"{"type":"publish","channel":"c","data":1,"id":1.5}"#,
            long_id.as_str(),
            r#"{"type":"publish","channel":"c","data":1} x"#,
            "not json",
            "[]",
        ] {
            assert!(parse(text).is_none(), "{text}");
        }
        let null_id = parse(r#"{"type":"publish","channel":"c","data":1,"id":null}"#).unwrap();
        assert_eq!(
            null_id.id, None,
            "a null id is no id, as in the full parser"
        );
    }
}
