//! The watch of the NATS backend: an ordered push consumer of our own.
//!
//! async-nats has no multi-filter resume, and its ordered consumer restarts
//! from the beginning of the stream when it is recreated before the first
//! delivery. This one:
//! - serves N prefixes with one consumer (`filter_subjects`), filtering by
//!   string prefix on the client;
//! - state-syncs with `LastPerSubject`, resumes with `ByStartSequence(c+1)`
//!   after checking that `c` is not older than the stream's first sequence;
//! - knows when the initial state is delivered from the consumer's pending
//!   count at creation (not a timer), so `Synced` also comes when nothing
//!   matches;
//! - recreates its consumer after a gap, a lost connection or missed
//!   heartbeats, from the last position it reached, and never yields a
//!   revision at or below one it already yielded.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use async_nats::{
    StatusCode, Subscriber,
    header::NATS_LAST_CONSUMER,
    jetstream::consumer::{AckPolicy, DeliverPolicy, ReplayPolicy, push},
};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;

use super::{
    codec::{incarnation_of, operation_from_headers, parse_ack_subject, to_update},
    handle::{BucketInner, ConnectionState, ConnectionStatus, timed},
};
use crate::{
    kv::{
        KvError, KvUpdate, Result, VersionToken, WatchCursor, WatchEvent, WatchStream,
        filter::{checked_prefixes, matches_any, subject_filters},
    },
    util::backoff::Backoff,
};

/// How often an idle consumer sends a heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which the consumer is presumed gone and recreated.
const MISSED_HEARTBEATS: Duration = Duration::from_secs(4);
/// How long an unattended consumer survives on the server.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(60);
/// How long a lost consumer is retried, once connected, before the watch
/// gives up with an error the caller can resume from.
const RECREATE_BUDGET: Duration = Duration::from_secs(30);

const CONSUMER_STALLED: &str = "Nats-Consumer-Stalled";

/// A watch over `prefixes` starting at `cursor`; the consumer exists when this returns.
pub(crate) async fn watch(
    inner: Arc<BucketInner>,
    prefixes: &[String],
    cursor: WatchCursor,
) -> Result<WatchStream> {
    let mut w = Box::new(Watcher::new(inner, prefixes, cursor, false, true)?);
    w.start().await?;
    Ok(Box::pin(futures::stream::unfold(w, |mut w| async move {
        w.next_event().await.map(|ev| (ev, w))
    })))
}

/// The latest record of every key under `prefix`, tombstones included,
/// read with one state-sync that stops at `Synced`. Fails instead of
/// recreating a lost consumer.
pub(crate) async fn snapshot(
    inner: &Arc<BucketInner>,
    prefix: &str,
    headers_only: bool,
) -> Result<BTreeMap<String, KvUpdate>> {
    let mut w = Watcher::new(
        inner.clone(),
        &[prefix.to_owned()],
        WatchCursor::none(),
        headers_only,
        false,
    )?;
    w.start().await?;
    let mut latest = BTreeMap::new();
    while let Some(ev) = w.next_event().await {
        match ev? {
            WatchEvent::Update(u) => {
                latest.insert(u.key().to_owned(), u);
            }
            WatchEvent::Synced { .. } => break,
        }
    }
    Ok(latest)
}

struct Incarnation {
    name: String,
    sub: Subscriber,
    /// Last consumer sequence received, to detect gaps.
    consumer_seq: u64,
    /// Consumer sequence by which everything pending at creation is delivered.
    sync_at: u64,
    /// Connection epoch the consumer was created in.
    reconnects: u64,
}

enum Step {
    Message(async_nats::Message),
    Lost(&'static str),
    Closed,
}

struct Watcher {
    inner: Arc<BucketInner>,
    prefixes: Vec<String>,
    filters: Vec<String>,
    headers_only: bool,
    /// Recreate lost consumers (watches) or fail at once (snapshots).
    resilient: bool,
    /// True for a state-sync watch (no cursor given).
    state_sync: bool,
    /// Every stream sequence <= position is reflected in what was delivered.
    position: u64,
    /// Stream's last sequence when the state-sync consumer was created.
    sync_floor: u64,
    last_yielded: u64,
    synced: bool,
    consumer: Option<Incarnation>,
    status: tokio::sync::watch::Receiver<ConnectionStatus>,
    out: VecDeque<WatchEvent>,
    done: bool,
}

impl Watcher {
    fn new(
        inner: Arc<BucketInner>,
        prefixes: &[String],
        cursor: WatchCursor,
        headers_only: bool,
        resilient: bool,
    ) -> Result<Self> {
        if prefixes.is_empty() {
            return Err(KvError::WatchError(
                "a watch needs at least one prefix (\"\" = all keys)".to_owned(),
            ));
        }
        let prefixes = checked_prefixes(prefixes)?;
        let filters = subject_filters(&inner.subject_prefix, &prefixes);
        let position = match cursor.version() {
            None => 0,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| KvError::WatchError(format!("cursor {v} is not a NATS revision")))?,
        };
        Ok(Self {
            status: inner.status.clone(),
            inner,
            prefixes,
            filters,
            headers_only,
            resilient,
            state_sync: cursor.is_none(),
            position,
            sync_floor: 0,
            last_yielded: position,
            synced: false,
            consumer: None,
            out: VecDeque::new(),
            done: false,
        })
    }

    async fn start(&mut self) -> Result<()> {
        self.create_consumer().await
    }

    fn mark_synced(&mut self) {
        if self.synced {
            return;
        }
        self.synced = true;
        self.position = self.position.max(self.sync_floor);
        self.out.push_back(WatchEvent::Synced {
            cursor: WatchCursor::after(VersionToken::from_u64(self.position)),
        });
    }

    async fn create_consumer(&mut self) -> Result<()> {
        let t = self.inner.timeout;
        let reconnects = self.status.borrow().reconnects;
        let info = self.inner.stream_info().await?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        if self.inner.incarnation.is_some() && incarnation_of(&info) != self.inner.incarnation {
            // deleted and created again: our position means nothing here
            return Err(KvError::CursorExpired {
                cursor: VersionToken::from_u64(self.position),
                first_retained: VersionToken::from_u64(first),
            });
        }
        let deliver_policy = if self.state_sync && !self.synced {
            self.sync_floor = last;
            DeliverPolicy::LastPerSubject
        } else {
            // `position + 1` must still be retained; `position == first - 1`
            // loses nothing. A position beyond the last sequence means the
            // stream was recreated: the caller must resync as well.
            if self.position.saturating_add(1) < first || self.position > last {
                return Err(KvError::CursorExpired {
                    cursor: VersionToken::from_u64(self.position),
                    first_retained: VersionToken::from_u64(first),
                });
            }
            DeliverPolicy::ByStartSequence {
                start_sequence: self.position + 1,
            }
        };

        let client = &self.inner.client;
        let inbox = client.new_inbox();
        let sub = timed(t, client.subscribe(inbox.clone()))
            .await?
            .map_err(|e| KvError::WatchError(format!("subscribe: {e}")))?;
        let config = push::Config {
            deliver_subject: inbox,
            description: Some("slipstream watch".to_owned()),
            deliver_policy,
            ack_policy: AckPolicy::None,
            max_deliver: 1,
            filter_subjects: self.filters.clone(),
            replay_policy: ReplayPolicy::Instant,
            headers_only: self.headers_only,
            flow_control: true,
            idle_heartbeat: HEARTBEAT,
            memory_storage: true,
            num_replicas: 1,
            inactive_threshold: INACTIVE_THRESHOLD,
            ..Default::default()
        };
        let consumer = timed(
            t,
            self.inner
                .js
                .create_consumer_on_stream(config, &self.inner.stream_name),
        )
        .await?
        .map_err(|e| KvError::WatchError(format!("create consumer: {e}")))?;
        self.inner
            .stats
            .consumers_created
            .fetch_add(1, Ordering::Relaxed);
        let ci = consumer.cached_info();
        let resumed = !self.state_sync || self.synced;
        if resumed && ci.delivered.stream_sequence > self.position {
            // The server clamped the start to its first sequence: messages
            // after the position expired between our check and the creation.
            delete_in_background(&self.inner, ci.name.clone());
            return Err(KvError::CursorExpired {
                cursor: VersionToken::from_u64(self.position),
                first_retained: VersionToken::from_u64(ci.delivered.stream_sequence + 1),
            });
        }
        self.consumer = Some(Incarnation {
            name: ci.name.clone(),
            sub,
            consumer_seq: 0,
            sync_at: ci.num_pending,
            reconnects,
        });
        if ci.num_pending == 0 {
            self.mark_synced();
        }
        Ok(())
    }

    /// Drops the current consumer and deletes it on the server in the background.
    fn abandon_consumer(&mut self) {
        if let Some(inc) = self.consumer.take() {
            delete_in_background(&self.inner, inc.name);
        }
    }

    /// Recreates a lost consumer from the last position; waits while the
    /// connection is down, gives up after [`RECREATE_BUDGET`] of failures.
    async fn recover(&mut self, reason: &str) -> Result<()> {
        self.abandon_consumer();
        if !self.resilient {
            return Err(match reason {
                "missed heartbeats" => KvError::Timeout(MISSED_HEARTBEATS),
                _ => KvError::WatchError(format!("consumer lost: {reason}")),
            });
        }
        tracing::debug!(bucket = %self.inner.name, reason, position = self.position, "recreating watch consumer");
        let mut deadline: Option<Instant> = None;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let state = self.status.borrow().state;
            match state {
                ConnectionState::Closed => return Err(KvError::NotConnected),
                ConnectionState::Disconnected => {
                    deadline = None;
                    if self.status.changed().await.is_err() {
                        return Err(KvError::NotConnected);
                    }
                    continue;
                }
                ConnectionState::Connected => {}
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + RECREATE_BUDGET);
            match self.create_consumer().await {
                Ok(()) => return Ok(()),
                Err(e @ (KvError::CursorExpired { .. } | KvError::BucketNotFound(_))) => {
                    return Err(e);
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(KvError::WatchError(format!(
                        "watch consumer lost ({reason}) and not recreated: {e}; resume after the last version received"
                    )));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "watch consumer recreation failed, retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    async fn next_event(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(ev) = self.out.pop_front() {
                return Some(Ok(ev));
            }
            if self.done {
                return None;
            }
            let step = self.wait().await;
            let outcome = match step {
                Step::Message(m) => self.handle(m).await,
                Step::Lost(reason) => self.recover(reason).await,
                Step::Closed => Err(KvError::NotConnected),
            };
            if let Err(e) = outcome {
                self.abandon_consumer();
                self.done = true;
                return Some(Err(e));
            }
        }
    }

    async fn wait(&mut self) -> Step {
        let Self {
            consumer, status, ..
        } = self;
        let Some(inc) = consumer.as_mut() else {
            return Step::Lost("no consumer");
        };
        // Buffered messages first, without touching timers.
        if let Some(next) = inc.sub.next().now_or_never() {
            return match next {
                Some(m) => Step::Message(m),
                None => Step::Lost("subscription closed"),
            };
        }
        {
            let s = *status.borrow();
            if s.state == ConnectionState::Closed {
                return Step::Closed;
            }
            if s.state != ConnectionState::Connected || s.reconnects != inc.reconnects {
                return Step::Lost("connection lost");
            }
        }
        let deadline = tokio::time::sleep(MISSED_HEARTBEATS);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                m = inc.sub.next() => return match m {
                    Some(m) => Step::Message(m),
                    None => Step::Lost("subscription closed"),
                },
                changed = status.changed() => {
                    if changed.is_err() {
                        return Step::Closed;
                    }
                    let s = *status.borrow();
                    match s.state {
                        ConnectionState::Closed => return Step::Closed,
                        ConnectionState::Disconnected => return Step::Lost("connection lost"),
                        ConnectionState::Connected if s.reconnects != inc.reconnects => {
                            return Step::Lost("reconnected");
                        }
                        ConnectionState::Connected => {}
                    }
                }
                _ = &mut deadline => return Step::Lost("missed heartbeats"),
            }
        }
    }

    async fn handle(&mut self, m: async_nats::Message) -> Result<()> {
        if let Some(status) = m.status {
            return self.handle_status(status, m).await;
        }
        let Some(inc) = self.consumer.as_mut() else {
            return Ok(());
        };
        let Some(d) = m.reply.as_deref().and_then(parse_ack_subject) else {
            tracing::debug!(subject = %m.subject, "watch message without ack info, ignored");
            return Ok(());
        };
        if d.consumer_seq != inc.consumer_seq + 1 {
            return self.recover("gap in consumer sequence").await;
        }
        inc.consumer_seq = d.consumer_seq;
        self.inner.stats.messages.fetch_add(1, Ordering::Relaxed);
        if d.stream_seq <= self.last_yielded {
            self.inner
                .stats
                .redeliveries_skipped
                .fetch_add(1, Ordering::Relaxed);
        }
        let reached_sync = inc.consumer_seq >= inc.sync_at || d.pending == 0;
        self.position = self.position.max(d.stream_seq);
        if d.stream_seq > self.last_yielded
            && let Some(key) = m.subject.as_str().strip_prefix(&self.inner.subject_prefix)
            && matches_any(key, &self.prefixes)
        {
            let op = operation_from_headers(m.headers.as_ref());
            let value = if self.headers_only {
                Bytes::new()
            } else {
                // `to_update` copies it out of the connection's read buffer
                m.payload
            };
            self.last_yielded = d.stream_seq;
            self.out.push_back(WatchEvent::Update(to_update(
                key.to_owned(),
                op,
                value,
                d.stream_seq,
                Some(std::time::UNIX_EPOCH + Duration::from_nanos(d.published_ns)),
            )));
        }
        if !self.synced && reached_sync {
            self.mark_synced();
        }
        Ok(())
    }

    async fn handle_status(&mut self, status: StatusCode, m: async_nats::Message) -> Result<()> {
        if status != StatusCode::IDLE_HEARTBEAT {
            if status == StatusCode::REQUEST_TERMINATED || status == StatusCode::NOT_FOUND {
                // e.g. "409 Consumer Deleted"
                return self.recover("consumer deleted").await;
            }
            return Ok(());
        }
        let client = self.inner.client.clone();
        let t = self.inner.timeout;
        // Flow control asks for an empty reply; so does a stalled consumer.
        if let Some(reply) = m.reply.clone() {
            let _ = timed(t, client.publish(reply, Bytes::new())).await;
            return Ok(());
        }
        let headers = m.headers.as_ref();
        if let Some(stalled) = headers.and_then(|h| h.get(CONSUMER_STALLED)) {
            let _ = timed(t, client.publish(stalled.as_str().to_owned(), Bytes::new())).await;
        }
        let Some(inc) = self.consumer.as_ref() else {
            return Ok(());
        };
        let last = headers
            .and_then(|h| h.get(NATS_LAST_CONSUMER))
            .and_then(|v| v.as_str().parse::<u64>().ok());
        if let Some(last) = last
            && last != inc.consumer_seq
        {
            return self.recover("missed deliveries").await;
        }
        if !self.synced {
            // Idle before reaching the count taken at creation: entries were
            // removed before delivery. Ask the server whether anything is left.
            let name = inc.name.clone();
            let delivered = inc.consumer_seq;
            if let Ok(Ok(info)) = timed(t, self.inner.stream.consumer_info(&name)).await
                && info.num_pending == 0
                && info.delivered.consumer_sequence == delivered
            {
                self.mark_synced();
            }
        }
        Ok(())
    }
}

fn delete_in_background(inner: &Arc<BucketInner>, name: String) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let inner = inner.clone();
    handle.spawn(async move {
        let _ = timed(
            inner.timeout,
            inner
                .js
                .delete_consumer_from_stream(&name, &inner.stream_name),
        )
        .await;
    });
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.abandon_consumer();
    }
}
