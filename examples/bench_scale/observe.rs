//! What the benchmark sees through the Kubernetes API: one watch of the
//! managed ConfigMaps (propagation latency, completeness) and one of the
//! ConfigBindings (Ready).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use slipstream::crd::ConfigBinding;

/// Digits of the sequence number every benchmark value starts with.
pub const SEQ_DIGITS: usize = 12;

pub fn binding_name(i: usize) -> String {
    format!("b{i:05}")
}

pub fn churn_name(i: usize) -> String {
    format!("c{i:05}")
}

fn binding_index(name: &str) -> Option<usize> {
    name.strip_prefix('b')?.parse().ok()
}

pub fn kv_key(binding: usize, key: usize) -> String {
    format!("p{binding:05}.k{key:03}")
}

pub fn cm_key(key: usize) -> String {
    format!("k{key:03}")
}

/// `<seq, 12 digits>-<padding>` of `len` bytes (at least 13).
pub fn value(seq: u64, len: usize) -> bytes::Bytes {
    let mut s = format!("{seq:0SEQ_DIGITS$}-");
    while s.len() < len {
        s.push('v');
    }
    bytes::Bytes::from(s)
}

pub fn value_seq(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v.get(..SEQ_DIGITS)?).ok()?.parse().ok()
}

struct Pending {
    key: usize,
    seq: u64,
    t0: Instant,
}

#[derive(Default)]
struct State {
    pending: HashMap<usize, Vec<Pending>>,
    pending_count: usize,
    latencies: Vec<Duration>,
    cm_keys: HashMap<usize, usize>,
    /// When each binding's outstanding updates were last all visible.
    done_at: HashMap<usize, Instant>,
}

/// Expected updates per ConfigMap, satisfied by ConfigMap watch events.
#[derive(Clone, Default)]
pub struct Tracker {
    st: Arc<Mutex<State>>,
}

impl Tracker {
    /// Registers an update before it is published.
    pub fn expect(&self, binding: usize, key: usize, seq: u64, t0: Instant) {
        let mut st = self.st.lock().unwrap();
        st.pending
            .entry(binding)
            .or_default()
            .push(Pending { key, seq, t0 });
        st.pending_count += 1;
    }

    pub fn pending(&self) -> usize {
        self.st.lock().unwrap().pending_count
    }

    pub fn take_latencies(&self) -> Vec<Duration> {
        std::mem::take(&mut self.st.lock().unwrap().latencies)
    }

    pub fn take_done(&self) -> HashMap<usize, Instant> {
        std::mem::take(&mut self.st.lock().unwrap().done_at)
    }

    /// ConfigMaps of `b*` bindings holding at least `keys` keys.
    pub fn complete(&self, keys: usize) -> usize {
        let st = self.st.lock().unwrap();
        st.cm_keys.values().filter(|n| **n >= keys).count()
    }

    fn observe(&self, cm: &ConfigMap) {
        let Some(idx) = binding_index(&cm.name_any()) else {
            return;
        };
        let now = Instant::now();
        let empty = Default::default();
        let data = cm.data.as_ref().unwrap_or(&empty);
        let mut st = self.st.lock().unwrap();
        st.cm_keys.insert(idx, data.len());
        let State {
            pending,
            latencies,
            pending_count,
            done_at,
            ..
        } = &mut *st;
        if let Some(list) = pending.get_mut(&idx) {
            list.retain(|p| {
                let have = data
                    .get(&cm_key(p.key))
                    .and_then(|v| value_seq(v.as_bytes()));
                if have >= Some(p.seq) {
                    latencies.push(now - p.t0);
                    *pending_count -= 1;
                    false
                } else {
                    true
                }
            });
            if list.is_empty() {
                pending.remove(&idx);
                done_at.insert(idx, now);
            }
        }
    }

    /// Follows the managed ConfigMaps until the process ends.
    pub fn spawn_watch(&self, client: Client) {
        let tracker = self.clone();
        tokio::spawn(async move {
            let api: Api<ConfigMap> = Api::all(client);
            let wc = watcher::Config::default().labels("app.kubernetes.io/managed-by=slipstream");
            let mut stream = watcher(api, wc).default_backoff().boxed();
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(cm)) | Ok(watcher::Event::InitApply(cm)) => {
                        tracker.observe(&cm)
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("bench: ConfigMap watch error: {e}"),
                }
            }
        });
    }
}

/// Ready bindings, by name.
#[derive(Clone, Default)]
pub struct Bindings {
    st: Arc<Mutex<(HashSet<String>, HashSet<String>)>>,
}

impl Bindings {
    /// (bindings present, bindings Ready) whose name starts with `prefix`.
    pub fn counts(&self, prefix: char) -> (usize, usize) {
        let st = self.st.lock().unwrap();
        let present = st.0.iter().filter(|n| n.starts_with(prefix)).count();
        let ready = st.1.iter().filter(|n| n.starts_with(prefix)).count();
        (present, ready)
    }

    fn observe(&self, b: &ConfigBinding, deleted: bool) {
        let name = b.name_any();
        let ready = !deleted
            && b.status.as_ref().is_some_and(|s| {
                s.observed_generation == b.metadata.generation
                    && s.condition("Ready").is_some_and(|c| c.status == "True")
            });
        let mut st = self.st.lock().unwrap();
        if deleted {
            st.0.remove(&name);
        } else {
            st.0.insert(name.clone());
        }
        if ready {
            st.1.insert(name);
        } else {
            st.1.remove(&name);
        }
    }

    pub fn spawn_watch(&self, client: Client) {
        let this = self.clone();
        tokio::spawn(async move {
            let api: Api<ConfigBinding> = Api::all(client);
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(b)) | Ok(watcher::Event::InitApply(b)) => {
                        this.observe(&b, false)
                    }
                    Ok(watcher::Event::Delete(b)) => this.observe(&b, true),
                    Ok(_) => {}
                    Err(e) => eprintln!("bench: ConfigBinding watch error: {e}"),
                }
            }
        });
    }
}
