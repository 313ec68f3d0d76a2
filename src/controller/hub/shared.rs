//! The state of one bucket watch that its tasks and its bindings' handles
//! share: the subscribers and their prefix index, the attached store.

use std::{collections::HashMap, sync::Arc};

use tokio::sync::mpsc;

use super::{event::HubEvent, index::PrefixIndex};
use crate::{
    kv::{KvError, KvStore, WatchCursor},
    projection::ProjectionRules,
};

pub(super) struct Subscriber {
    pub rules: ProjectionRules,
    pub tx: mpsc::UnboundedSender<HubEvent>,
}

#[derive(Default)]
pub(super) struct Shared {
    pub subscribers: HashMap<u64, Subscriber>,
    /// Subscriber ids by prefix, for the live fan-out.
    pub index: PrefixIndex<u64>,
    pub attached: Option<Arc<dyn KvStore>>,
    pub last_error: Option<KvError>,
}

impl Shared {
    pub fn add(&mut self, id: u64, sub: Subscriber) {
        self.remove(id);
        self.index.insert(sub.rules.prefixes(), id);
        self.subscribers.insert(id, sub);
    }

    pub fn remove(&mut self, id: u64) {
        if let Some(old) = self.subscribers.remove(&id) {
            self.index.remove(old.rules.prefixes(), id);
        }
    }
}

/// A binding's wish for its history: `from` none = full state.
pub(super) struct CatchupRequest {
    pub id: u64,
    pub ticket: u64,
    pub from: WatchCursor,
}
