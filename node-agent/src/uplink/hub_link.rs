//! What the link needs from a hub, whatever kind it is: send queued
//! messages in order, and report what comes back. The two kinds (an
//! edgewire relay, a NATS server with JetStream) differ only here; the
//! queue, the window and the reconnecting are theirs in common (`link`).

use std::future::Future;

use edgewire_api::wire::Origin;

use super::record::Record;

/// Something the hub said.
#[derive(Debug)]
pub enum Event {
    /// It has the message with this sequence (and, in order, all before it).
    Acked(u64),
    /// It refused the message with this sequence for good.
    Rejected { seq: u64, why: String },
    /// A message published at the hub on a downlink channel.
    Down {
        channel: String,
        data: serde_json::Value,
        origin: Option<Origin>,
    },
    /// The downlink subscriptions are in place.
    Ready,
    /// A frame with nothing for the link (a reply it does not track).
    Nothing,
}

/// One open connection to a hub.
pub trait HubLink: Send {
    /// Writes `batch`, in order, within the link's write deadline. Each
    /// message gets exactly one `Acked` or `Rejected`, in order.
    fn send(&mut self, batch: &[Record]) -> impl Future<Output = Result<(), String>> + Send;
    /// Whether the hub takes a message this large at all. One it does not
    /// would end the connection at every attempt (a relay closes it with
    /// 1009) and hold everything behind it, so it is never sent.
    fn takes(&self, record: &Record) -> bool;
    /// The next event. Cancel-safe: dropping the future loses nothing.
    fn next(&mut self) -> impl Future<Output = Result<Event, String>> + Send;
    /// Called every few seconds: fails when the hub has gone quiet.
    fn keepalive(&mut self) -> impl Future<Output = Result<(), String>> + Send;
    /// A clean goodbye, bounded in time.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}
