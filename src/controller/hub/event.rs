//! What a bucket watch tells its bindings.

use std::{sync::Arc, time::Instant};

use crate::kv::{KvError, KvStore, KvUpdate, WatchCursor};

/// What a bucket watch tells its bindings.
#[derive(Clone)]
pub enum HubEvent {
    /// The shared watch is (re)started; ask for a catch-up from your cursor.
    Attached(Arc<dyn KvStore>),
    /// A live update matching the binding's prefixes, with when it arrived;
    /// shared by every binding it goes to (one copy however many match).
    Update(Arc<KvUpdate>, Instant),
    /// The shared watch failed; a new `Attached` follows once it recovers.
    Lost(KvError),
    /// The next updates of catch-up `ticket`, in revision order: only keys
    /// under the binding's prefixes, only revisions after the cursor it asked
    /// from (a full catch-up reports tombstones too). Sent in chunks of up to
    /// [`CATCHUP_CHUNK`]: a binding's channel holds a few events, not one
    /// slot per key, and nothing waits for the end of the scan.
    Catchup { ticket: u64, updates: Vec<KvUpdate> },
    /// Catch-up `ticket` is complete: every update of the binding's
    /// prefixes with a revision <= `cursor` was delivered or was covered by
    /// the cursor asked from (invariant 1).
    CaughtUp { ticket: u64, cursor: WatchCursor },
    /// Catch-up `ticket` failed; `CursorExpired` means this binding's own
    /// cursor is older than the bucket keeps.
    CatchupFailed { ticket: u64, error: KvError },
}

/// Most updates one `Catchup` event carries.
pub const CATCHUP_CHUNK: usize = 32;
