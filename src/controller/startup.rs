//! The read-back of a start in bulk: each worker needs its ConfigMap once
//! when it starts (to resume from its cursor), and a restart starts all of
//! them together. So during [`STARTUP_WINDOW`] the first worker of a
//! namespace lists that namespace's managed ConfigMaps in pages (label
//! selector, `limit`/`continue`), and each worker of the namespace takes its
//! own from the list instead of a GET: a restart of 10,000 bindings costs a
//! few tens of list pages, not 10,000 GETs.
//!
//! A listed ConfigMap is handed out once and dropped as soon as its worker
//! takes it (a page at a time, so a restart never holds every ConfigMap at
//! once when workers are waiting); whatever is left is dropped at the end
//! of the window. A name not in the finished list is absent, unless it is a
//! ConfigMap without our label: for an Owner target the create that follows
//! then fails with 409 and the worker reads it, as after any lost race; a
//! Merge target (someone else's ConfigMap, unlabelled until our first write)
//! is always read with a GET. After the window, or when the list fails,
//! workers read their ConfigMap with a GET as before.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{ListParams, ObjectList},
};
use tokio::{
    sync::{Semaphore, watch},
    time::Instant,
};
use tracing::{debug, info};

use crate::{
    sink::configmap::{MANAGED_BY_LABEL, MANAGED_BY_VALUE},
    util::lock,
};

/// How long after the operator starts its workers read from bulk lists.
pub const STARTUP_WINDOW: Duration = Duration::from_secs(120);

/// ConfigMaps per list page.
const PAGE: u32 = 500;

/// What a list says of one ConfigMap.
#[derive(Debug)]
pub enum Listed {
    Found(Box<ConfigMap>),
    /// Not among the namespace's managed ConfigMaps.
    Absent,
    /// The list cannot say (window over, list failed, taken before): GET it.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    /// Pages received so far.
    Listing(u32),
    Complete,
    Failed,
}

struct NamespaceList {
    found: Mutex<HashMap<String, ConfigMap>>,
    taken: Mutex<HashSet<String>>,
    progress: watch::Sender<Progress>,
}

/// The bulk lists of one start, shared by every worker.
pub struct StartupReads {
    until: Instant,
    namespaces: Arc<Mutex<HashMap<String, Arc<NamespaceList>>>>,
}

impl StartupReads {
    /// Lists for `window` from now; everything left is dropped then.
    pub fn new(window: Duration) -> Self {
        let reads = Self {
            until: Instant::now() + window,
            namespaces: Arc::default(),
        };
        let namespaces = Arc::downgrade(&reads.namespaces);
        let until = reads.until;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                tokio::time::sleep_until(until).await;
                if let Some(ns) = namespaces.upgrade() {
                    lock(&ns).clear();
                }
            });
        }
        reads
    }

    /// What the list of `namespace` says of ConfigMap `name`; the first
    /// call for a namespace starts its list (one API permit per page).
    pub async fn take(
        &self,
        client: &Client,
        permits: &Arc<Semaphore>,
        namespace: &str,
        name: &str,
    ) -> Listed {
        if Instant::now() >= self.until {
            return Listed::Unknown;
        }
        let list = {
            let mut namespaces = lock(&self.namespaces);
            match namespaces.get(namespace) {
                Some(list) => list.clone(),
                None => {
                    let list = Arc::new(NamespaceList {
                        found: Mutex::default(),
                        taken: Mutex::default(),
                        progress: watch::Sender::new(Progress::Listing(0)),
                    });
                    namespaces.insert(namespace.to_owned(), list.clone());
                    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
                    tokio::spawn(fill(api, permits.clone(), list.clone()));
                    list
                }
            }
        };
        // a second worker for the same name (the binding restarted) reads afresh
        if !lock(&list.taken).insert(name.to_owned()) {
            return Listed::Unknown;
        }
        let mut progress = list.progress.subscribe();
        loop {
            // progress first: a Complete seen here means every page is in
            let now = *progress.borrow_and_update();
            if let Some(cm) = lock(&list.found).remove(name) {
                return Listed::Found(Box::new(cm));
            }
            match now {
                Progress::Complete => return Listed::Absent,
                Progress::Failed => return Listed::Unknown,
                Progress::Listing(_) => {}
            }
            if progress.changed().await.is_err() {
                return Listed::Unknown;
            }
        }
    }
}

/// Lists the namespace's managed ConfigMaps page by page into `list`.
async fn fill(api: Api<ConfigMap>, permits: Arc<Semaphore>, list: Arc<NamespaceList>) {
    let mut params = ListParams::default()
        .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"))
        .limit(PAGE);
    let (mut pages, mut total) = (0u32, 0usize);
    loop {
        let page: kube::Result<ObjectList<ConfigMap>> = {
            let _permit = permits.acquire().await.ok();
            api.list(&params).await
        };
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                info!(error = %e, "listing ConfigMaps at start failed; each binding reads its own");
                list.progress.send_replace(Progress::Failed);
                return;
            }
        };
        pages += 1;
        total += page.items.len();
        let next = page.metadata.continue_.filter(|c| !c.is_empty());
        {
            let mut found = lock(&list.found);
            for cm in page.items {
                if let Some(name) = cm.metadata.name.clone() {
                    found.insert(name, cm);
                }
            }
        }
        match next {
            Some(token) => {
                list.progress.send_replace(Progress::Listing(pages));
                params = params.continue_token(&token);
            }
            None => {
                debug!(pages, configmaps = total, "ConfigMaps listed at start");
                list.progress.send_replace(Progress::Complete);
                return;
            }
        }
    }
}
