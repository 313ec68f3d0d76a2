//! NATS side of the benchmark: filling the buckets, publishing updates,
//! and the references that need no operator (the raw put -> watch floor,
//! a raw state-sync, the naive one-consumer-per-binding design).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{
    Params,
    observe::{Tracker, kv_key, value, value_seq},
};

pub fn bucket_name(j: usize) -> String {
    format!("scale{j}")
}

/// Publishes KV updates straight through async-nats (acks awaited by a
/// separate task) and registers each with the tracker and the floor watch.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    per_bucket: usize,
    value_bytes: usize,
    seq: Arc<AtomicU64>,
    tracker: Tracker,
    floor: Arc<Mutex<HashMap<u64, Instant>>>,
    pub floor_on: Arc<std::sync::atomic::AtomicBool>,
    acks: tokio::sync::mpsc::UnboundedSender<jetstream::context::PublishAckFuture>,
    pub failed: Arc<AtomicUsize>,
}

impl Publisher {
    pub fn new(js: jetstream::Context, p: &Params, tracker: Tracker) -> Self {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<jetstream::context::PublishAckFuture>();
        let failed = Arc::new(AtomicUsize::new(0));
        let f = failed.clone();
        tokio::spawn(async move {
            while let Some(ack) = rx.recv().await {
                if ack.await.is_err() {
                    f.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self {
            js,
            per_bucket: p.per_bucket,
            value_bytes: p.value_bytes,
            seq: Arc::new(AtomicU64::new(1)),
            tracker,
            floor: Arc::default(),
            floor_on: Arc::default(),
            acks: tx,
            failed,
        }
    }

    pub async fn update(&self, binding: usize, key: usize) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let subject = format!(
            "$KV.{}.{}",
            bucket_name(binding / self.per_bucket),
            kv_key(binding, key)
        );
        let t0 = Instant::now();
        self.tracker.expect(binding, key, seq, t0);
        if self.floor_on.load(Ordering::Relaxed) {
            self.floor.lock().unwrap().insert(seq, t0);
        }
        match self.js.publish(subject, value(seq, self.value_bytes)).await {
            Ok(ack) => {
                let _ = self.acks.send(ack);
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `rate` updates per second over `bindings` for `secs`; returns the count.
    pub async fn steady(
        &self,
        rate: f64,
        secs: f64,
        bindings: usize,
        keys: usize,
        seed: u64,
    ) -> usize {
        let mut rng = StdRng::seed_from_u64(seed);
        let start = tokio::time::Instant::now();
        let total = (rate * secs) as usize;
        for i in 0..total {
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(at).await;
            self.update(rng.random_range(0..bindings), rng.random_range(0..keys))
                .await;
        }
        total
    }
}

/// Raw async-nats watches of every bucket: the put -> watch floor.
pub fn start_floor(
    client: &async_nats::Client,
    buckets: usize,
    publisher: &Publisher,
    out: Arc<Mutex<Vec<Duration>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let js = jetstream::new(client.clone());
    (0..buckets)
        .map(|j| {
            let js = js.clone();
            let floor = publisher.floor.clone();
            let out = out.clone();
            tokio::spawn(async move {
                let store = js.get_key_value(bucket_name(j)).await.unwrap();
                let mut w = store.watch(">").await.unwrap();
                while let Some(Ok(e)) = w.next().await {
                    let now = Instant::now();
                    if let Some(seq) = value_seq(&e.value)
                        && let Some(t0) = floor.lock().unwrap().remove(&seq)
                    {
                        out.lock().unwrap().push(now - t0);
                    }
                }
            })
        })
        .collect()
}

#[derive(Default, Clone, Copy)]
pub struct Peak {
    pub total: usize,
    pub per_bucket: usize,
}

/// Samples the consumer count of every bucket stream every 100 ms.
pub fn start_consumer_sampler(js: jetstream::Context, buckets: usize) -> Arc<Mutex<Peak>> {
    let peak = Arc::new(Mutex::new(Peak::default()));
    let p = peak.clone();
    tokio::spawn(async move {
        let mut streams = Vec::new();
        for j in 0..buckets {
            streams.push(
                js.get_stream(format!("KV_{}", bucket_name(j)))
                    .await
                    .unwrap(),
            );
        }
        loop {
            let mut total = 0;
            let mut max = 0;
            for s in &streams {
                if let Ok(info) = s.get_info().await {
                    total += info.state.consumer_count;
                    max = max.max(info.state.consumer_count);
                }
            }
            {
                let mut pk = p.lock().unwrap();
                pk.total = pk.total.max(total);
                pk.per_bucket = pk.per_bucket.max(max);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    peak
}

pub fn take_peak(p: &Mutex<Peak>) -> Peak {
    std::mem::take(&mut *p.lock().unwrap())
}

pub async fn fill_buckets(js: &jetstream::Context, p: &Params) -> Duration {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..p.buckets)
        .map(|j| {
            let js = js.clone();
            let (per_bucket, keys, vb, total) = (p.per_bucket, p.keys, p.value_bytes, p.bindings);
            tokio::spawn(async move {
                let mut acks = Vec::with_capacity(512);
                let first = j * per_bucket;
                let last = ((j + 1) * per_bucket).min(total);
                let v = value(0, vb);
                for b in first..last {
                    for k in 0..keys {
                        let subject = format!("$KV.{}.{}", bucket_name(j), kv_key(b, k));
                        acks.push(js.publish(subject, v.clone()).await.unwrap());
                        if acks.len() == 500 {
                            for a in acks.drain(..) {
                                a.await.unwrap();
                            }
                        }
                    }
                }
                for a in acks {
                    a.await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    t0.elapsed()
}

/// Raw async-nats state-sync of every bucket at once: (time, entries).
pub async fn raw_state_sync(client: &async_nats::Client, buckets: usize) -> (Duration, usize) {
    let js = jetstream::new(client.clone());
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..buckets)
        .map(|j| {
            let js = js.clone();
            tokio::spawn(async move {
                let store = js.get_key_value(bucket_name(j)).await.unwrap();
                let mut w = store.watch_with_history(">").await.unwrap();
                let mut n = 0;
                while let Some(e) = w.next().await {
                    n += 1;
                    if e.unwrap().delta == 0 {
                        break;
                    }
                }
                n
            })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    (t0.elapsed(), n)
}

pub struct Naive {
    pub created: usize,
    pub refused: usize,
    pub first_error: String,
    /// Consumers one stream took before refusing (the server's per-stream limit).
    pub stream_limit: Option<usize>,
    pub time: Duration,
}

/// The naive design: one consumer per binding (filtered on its prefix).
/// Creates them all, then keeps adding to the first stream until the server
/// refuses, then deletes everything.
pub async fn naive_baseline(js: &jetstream::Context, p: &Params) -> Naive {
    let t0 = Instant::now();
    let streams: Vec<_> = futures::future::join_all(
        (0..p.buckets).map(|j| js.get_stream(format!("KV_{}", bucket_name(j)))),
    )
    .await
    .into_iter()
    .map(|s| s.unwrap())
    .collect();
    let make = |j: usize, subject: String| {
        let stream = streams[j].clone();
        async move {
            let cfg = pull::Config {
                filter_subject: subject,
                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                inactive_threshold: Duration::from_secs(300),
                ..Default::default()
            };
            stream
                .create_consumer(cfg)
                .await
                .map(|c| (j, c.cached_info().name.clone()))
                .map_err(|e| e.to_string())
        }
    };
    let results: Vec<_> = futures::stream::iter(0..p.bindings)
        .map(|b| {
            let j = b / p.per_bucket;
            make(j, format!("$KV.{}.p{b:05}.>", bucket_name(j)))
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let time = t0.elapsed();
    let mut names = Vec::new();
    let mut refused = 0;
    let mut first_error = String::new();
    for r in results {
        match r {
            Ok(n) => names.push(n),
            Err(e) => {
                refused += 1;
                if first_error.is_empty() {
                    first_error = e;
                }
            }
        }
    }
    let created = names.len();
    // probe the per-stream limit on the first stream
    let mut on_first = names.iter().filter(|(j, _)| *j == 0).count();
    let mut stream_limit = None;
    for i in 0..2000 {
        match make(0, format!("$KV.{}.probe{i}.>", bucket_name(0))).await {
            Ok(n) => {
                names.push(n);
                on_first += 1;
            }
            Err(e) => {
                stream_limit = Some(on_first);
                if first_error.is_empty() {
                    first_error = e;
                }
                break;
            }
        }
    }
    futures::stream::iter(names)
        .map(|(j, name)| {
            let stream = streams[j].clone();
            async move {
                let _ = stream.delete_consumer(&name).await;
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    Naive {
        created,
        refused,
        first_error,
        stream_limit,
        time,
    }
}
