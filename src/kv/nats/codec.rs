//! What NATS KV records mean: the headers that say put, delete or purge,
//! the ack subject that carries a delivery's sequences, the stream's
//! creation time that tells bucket incarnations apart. Pure functions,
//! shared by the reads (`bucket`) and the watch (`watch`).

use std::time::Duration;

use async_nats::{
    HeaderMap, HeaderName, HeaderValue,
    header::NATS_MARKER_REASON,
    jetstream::{self, message::StreamMessage},
};
use bytes::Bytes;

use crate::kv::{KvEntry, KvError, KvUpdate, Result, VersionToken};

/// A stream's creation time in Unix nanoseconds, which changes when a
/// bucket is deleted and created again.
pub(crate) fn incarnation_of(info: &jetstream::stream::Info) -> Option<u64> {
    u64::try_from(info.created.unix_timestamp_nanos()).ok()
}

pub(crate) const KV_OPERATION: HeaderName = HeaderName::from_static("KV-Operation");

/// What a stored record means, from its headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operation {
    Put,
    Delete,
    Purge,
}

/// Maps the `KV-Operation` header, else the server's `Nats-Marker-Reason`
/// (set on TTL expiry and limit markers), to an operation.
pub(crate) fn operation_of(kv_operation: Option<&str>, marker_reason: Option<&str>) -> Operation {
    match (kv_operation, marker_reason) {
        (Some("DEL"), _) => Operation::Delete,
        (Some("PURGE"), _) => Operation::Purge,
        (Some(_), _) => Operation::Put,
        (None, Some("Remove")) => Operation::Delete,
        // "MaxAge", "Purge" and any future reason: the key is gone.
        (None, Some(_)) => Operation::Purge,
        (None, None) => Operation::Put,
    }
}

pub(crate) fn operation_from_headers(headers: Option<&HeaderMap>) -> Operation {
    match headers {
        None => Operation::Put,
        Some(h) => operation_of(
            h.get(KV_OPERATION).map(HeaderValue::as_str),
            h.get(NATS_MARKER_REASON).map(HeaderValue::as_str),
        ),
    }
}

pub(crate) fn to_update(
    key: String,
    op: Operation,
    value: Bytes,
    revision: u64,
    published: Option<std::time::SystemTime>,
) -> KvUpdate {
    let version = VersionToken::from_u64(revision);
    match op {
        Operation::Put => KvUpdate::Put(KvEntry {
            key,
            // detached from the connection's read buffer: a value kept for
            // long pins its own bytes, not the 64 KiB buffer it arrived in
            value: Bytes::copy_from_slice(&value),
            version,
            published,
        }),
        Operation::Delete => KvUpdate::Delete { key, version },
        Operation::Purge => KvUpdate::Purge { key, version },
    }
}

/// Whole seconds for the `Nats-TTL` header: rounded up, at least one.
pub(crate) fn ttl_seconds(ttl: Duration) -> Result<u64> {
    if ttl.is_zero() {
        return Err(KvError::OperationFailed(
            "ttl must be positive (NATS counts whole seconds)".to_owned(),
        ));
    }
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Ok(secs)
}

/// The update a stored record of `key` stands for.
pub(crate) fn record_update(key: String, message: StreamMessage) -> KvUpdate {
    let op = operation_from_headers(Some(&message.headers));
    to_update(key, op, message.payload, message.sequence, None)
}

/// Where the numbers of a delivered message are: its ack reply subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Delivery {
    pub stream_seq: u64,
    pub consumer_seq: u64,
    pub pending: u64,
    /// When the server stored the message (Unix ns).
    pub published_ns: u64,
}

/// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`
/// (v1) and `$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<token>]` (v2).
pub(crate) fn parse_ack_subject(subject: &str) -> Option<Delivery> {
    // No allocation: this runs once per delivered message.
    let mut tokens = [""; 12];
    let mut n = 0;
    for t in subject.split('.') {
        if n < tokens.len() {
            tokens[n] = t;
        }
        n += 1;
    }
    if n < 9 || tokens[0] != "$JS" || tokens[1] != "ACK" {
        return None;
    }
    let base = match n {
        9 => 5,
        n if n >= 11 => 7,
        _ => return None,
    };
    Some(Delivery {
        stream_seq: tokens[base].parse().ok()?,
        consumer_seq: tokens[base + 1].parse().ok()?,
        pending: tokens[base + 3].parse().ok()?,
        published_ns: tokens[base + 2].parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_comes_from_kv_header_then_marker_reason() {
        assert_eq!(operation_of(None, None), Operation::Put);
        assert_eq!(operation_of(Some("PUT"), None), Operation::Put);
        assert_eq!(operation_of(Some("DEL"), None), Operation::Delete);
        assert_eq!(
            operation_of(Some("PURGE"), Some("MaxAge")),
            Operation::Purge
        );
        assert_eq!(operation_of(None, Some("MaxAge")), Operation::Purge);
        assert_eq!(operation_of(None, Some("Purge")), Operation::Purge);
        assert_eq!(operation_of(None, Some("Remove")), Operation::Delete);
    }

    #[test]
    fn ttl_rounds_up_to_whole_seconds_and_rejects_zero() {
        assert_eq!(ttl_seconds(Duration::from_secs(2)).unwrap(), 2);
        assert_eq!(ttl_seconds(Duration::from_millis(1500)).unwrap(), 2);
        assert_eq!(ttl_seconds(Duration::from_millis(1)).unwrap(), 1);
        assert!(ttl_seconds(Duration::ZERO).is_err());
    }

    #[test]
    fn ack_subjects_of_both_formats_parse() {
        assert_eq!(
            parse_ack_subject("$JS.ACK.KV_b.cons.1.42.7.1700000000000000000.3"),
            Some(Delivery {
                stream_seq: 42,
                consumer_seq: 7,
                pending: 3,
                published_ns: 1_700_000_000_000_000_000,
            })
        );
        assert_eq!(
            parse_ack_subject("$JS.ACK.dom.hash.KV_b.cons.1.42.7.1700000000000000000.0.rnd"),
            Some(Delivery {
                stream_seq: 42,
                consumer_seq: 7,
                pending: 0,
                published_ns: 1_700_000_000_000_000_000,
            })
        );
        assert_eq!(parse_ack_subject("$JS.ACK.a.b"), None);
        assert_eq!(parse_ack_subject("_INBOX.x.y.z.a.b.c.d.e"), None);
        assert_eq!(parse_ack_subject("$JS.ACK.KV_b.c.1.x.7.1.3"), None);
    }
}
