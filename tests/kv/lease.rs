//! The CAS lease: at most one holder, in one process and across processes.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rand::Rng;
use slipstream::kv::{
    KvStore,
    lease::{Lease, LeaseConfig, LeaseError},
    nats::{BucketConfig, ConnectOptions, NatsKv},
};
use tokio::time::Instant;

use crate::{b, bucket, common::NatsServer, eventually};

fn fast() -> LeaseConfig {
    LeaseConfig {
        ttl: Duration::from_millis(900),
        renew_deadline: Duration::from_millis(600),
        renew_interval: Duration::from_millis(150),
        retry_interval: Duration::from_millis(40),
    }
}

async fn store(server: &NatsServer) -> Arc<dyn KvStore> {
    Arc::new(bucket(server, "leases").await)
}

#[tokio::test]
async fn release_lets_another_contender_acquire_at_once() {
    let server = NatsServer::start();
    let s = store(&server).await;
    let a = Lease::new(s.clone(), "leader", "a", fast()).unwrap();
    let b_ = Lease::new(s.clone(), "leader", "b", fast()).unwrap();
    assert!(a.try_acquire().await.unwrap());
    assert!(a.is_held());
    assert!(!b_.try_acquire().await.unwrap());
    assert_eq!(b_.holder().await.unwrap().unwrap().holder, "a");
    a.release().await.unwrap();
    assert!(!a.is_held());
    assert!(b_.holder().await.unwrap().is_none());
    assert!(
        b_.try_acquire().await.unwrap(),
        "no wait for expiry after a release"
    );
    assert_eq!(a.holder().await.unwrap().unwrap().holder, "b");
}

#[tokio::test]
async fn release_also_frees_a_renew_that_landed_after_it_was_abandoned() {
    // A shutdown that races a renew drops the call after NATS stored it: the
    // holder never learns the new revision. Its release must still free the
    // lease, or standbys wait out the renewed record's TTL.
    let server = NatsServer::start();
    let s = store(&server).await;
    let a = Lease::new(s.clone(), "leader", "a", fast()).unwrap();
    let b_ = Lease::new(s.clone(), "leader", "b", fast()).unwrap();
    assert!(a.try_acquire().await.unwrap());
    let Some(slipstream::kv::KvUpdate::Put(held)) = s.entry("leader").await.unwrap() else {
        panic!("a's record is stored");
    };
    let mut renewed = slipstream::kv::lease::LeaseRecord::parse(&held.value).unwrap();
    renewed.expires_at_ms += 60_000;
    s.update("leader", renewed.to_bytes().unwrap(), held.version)
        .await
        .unwrap();
    a.release().await.unwrap();
    assert!(!a.is_held());
    assert!(
        b_.holder().await.unwrap().is_none(),
        "the renewed record of the same term is deleted too"
    );
    assert!(
        b_.try_acquire().await.unwrap(),
        "no wait for the renewed TTL"
    );
    // A record of another holder is never deleted by a release.
    a.release().await.unwrap();
    assert_eq!(a.holder().await.unwrap().unwrap().holder, "b");
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_the_old_holder_renews_into_lost() {
    let server = NatsServer::start();
    let s = store(&server).await;
    let a = Lease::new(s.clone(), "leader", "a", fast()).unwrap();
    let b_ = Lease::new(s.clone(), "leader", "b", fast()).unwrap();
    let mut a_state = a.subscribe();
    assert!(a.try_acquire().await.unwrap());
    assert!(*a_state.borrow_and_update());
    // a stops renewing (stalled); b must wait until the record expires.
    assert!(!b_.try_acquire().await.unwrap());
    tokio::time::sleep(fast().renew_deadline).await;
    assert!(
        !a.is_held(),
        "the holder stops before its record can be taken over"
    );
    assert!(!*a_state.borrow());
    tokio::time::sleep(fast().ttl - fast().renew_deadline).await;
    assert!(b_.try_acquire().await.unwrap());
    match a.renew().await {
        Err(LeaseError::Lost { key }) => assert_eq!(key, "leader"),
        other => panic!("expected Lost, got {other:?}"),
    }
    assert!(!a.is_held());
    assert!(!a.try_acquire().await.unwrap());
    assert!(b_.is_held());
    assert_eq!(a.transitions(), 2, "gained once, lost once");
}

#[tokio::test]
async fn a_corrupt_lease_record_is_taken_over() {
    let server = NatsServer::start();
    let s = store(&server).await;
    s.put("leader", b("{not json")).await.unwrap();
    let a = Lease::new(s.clone(), "leader", "a", fast()).unwrap();
    assert!(a.holder().await.is_err());
    assert!(a.try_acquire().await.unwrap());
    let rec = a.holder().await.unwrap().unwrap();
    assert_eq!(rec.holder, "a");
    assert!(rec.expires_at_ms > slipstream::kv::lease::unix_ms());
}

#[tokio::test]
async fn renew_after_losing_fails_cleanly_and_flips_the_holding_state() {
    let server = NatsServer::start();
    let s = store(&server).await;
    let a = Lease::new(s.clone(), "leader", "a", fast()).unwrap();
    let mut state = a.subscribe();
    assert!(a.try_acquire().await.unwrap());
    a.renew().await.unwrap();
    assert!(*state.borrow_and_update());
    // Someone else writes the key: any later CAS by a fails.
    s.put("leader", b("{\"holder\":\"intruder\"}"))
        .await
        .unwrap();
    assert!(matches!(a.renew().await, Err(LeaseError::Lost { .. })));
    assert!(!a.is_held());
    assert!(!*state.borrow_and_update());
    assert!(matches!(a.renew().await, Err(LeaseError::NotHeld { .. })));
    assert!(matches!(
        Lease::new(s.clone(), "bad key", "a", fast()),
        Err(LeaseError::Kv(_))
    ));
    let bad = LeaseConfig {
        renew_deadline: Duration::from_secs(5),
        ..fast()
    };
    assert!(matches!(
        Lease::new(s, "leader", "a", bad),
        Err(LeaseError::InvalidConfig(_))
    ));
}

#[tokio::test]
async fn the_background_loop_keeps_the_lease_and_releases_it_on_stop() {
    let server = NatsServer::start();
    let s = store(&server).await;
    let a = Arc::new(Lease::new(s.clone(), "leader", "a", fast()).unwrap());
    let b_ = Lease::new(s.clone(), "leader", "b", fast()).unwrap();
    let mut state = a.subscribe();
    let task = a.clone().spawn();
    tokio::time::timeout(Duration::from_secs(10), state.wait_for(|h| *h))
        .await
        .unwrap()
        .unwrap();
    // Held across several ttls thanks to renewals.
    for _ in 0..4 {
        tokio::time::sleep(fast().ttl / 2).await;
        assert!(a.is_held());
        assert!(!b_.try_acquire().await.unwrap());
    }
    task.stop().await;
    assert!(!a.is_held());
    assert!(b_.try_acquire().await.unwrap());
}

/// A contender's lease, and those it went silent in: a paused process that
/// wakes up believes it still holds until its own deadline, so the samplers
/// keep looking at them.
struct Slot {
    current: Arc<Lease>,
    silent: Vec<Arc<Lease>>,
}

impl Slot {
    fn new(lease: Lease) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            current: Arc::new(lease),
            silent: Vec::new(),
        }))
    }

    fn held(&self) -> bool {
        self.current.is_held() || self.silent.iter().any(|l| l.is_held())
    }

    /// Goes silent in the current lease and starts afresh.
    fn crash(&mut self, fresh: Lease) {
        let old = std::mem::replace(&mut self.current, Arc::new(fresh));
        self.silent.retain(|l| l.is_held());
        self.silent.push(old);
    }
}

/// One contender: acquires, holds for a while renewing, then releases or
/// "crashes" (goes silent and comes back as a fresh process). Counts each
/// term it starts in `terms`, which contenders may share.
async fn contend(
    slot: Arc<Mutex<Slot>>,
    make: impl Fn() -> Lease,
    terms: Arc<AtomicU64>,
    done: impl Fn() -> bool,
) {
    while !done() {
        let lease = slot.lock().unwrap().current.clone();
        match lease.try_acquire().await {
            Ok(true) => {}
            _ => {
                tokio::time::sleep(lease.config().retry_interval).await;
                continue;
            }
        }
        terms.fetch_add(1, Ordering::Relaxed);
        let (hold, crash) = {
            let mut rng = rand::rng();
            (
                Duration::from_millis(rng.random_range(100..400)),
                rng.random_bool(0.3),
            )
        };
        let end = Instant::now() + hold;
        while Instant::now() < end {
            tokio::time::sleep(lease.config().renew_interval).await;
            if lease.renew().await.is_err() && !lease.is_held() {
                break;
            }
        }
        if crash {
            // Silent: no release, the record must expire before a takeover.
            slot.lock().unwrap().crash(make());
        } else {
            let _ = lease.release().await;
            // Give the others, polling every retry interval, their chance:
            // a handover, not the same holder again at once.
            tokio::time::sleep(lease.config().retry_interval * 2).await;
        }
    }
    let lease = slot.lock().unwrap().current.clone();
    let _ = lease.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_contenders_in_one_process_never_hold_the_lease_at_once() {
    let server = NatsServer::start();
    // Run until the lease has changed hands enough times (a loaded machine
    // only takes longer), with a cap that fails the count below.
    let terms = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(60);
    let mut slots = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..8 {
        // One connection per contender, as separate replicas would have.
        let s: Arc<dyn KvStore> = Arc::new(bucket(&server, "leases").await);
        let id = format!("c{i}");
        let make = move || Lease::new(s.clone(), "leader", id.clone(), fast()).unwrap();
        let slot = Slot::new(make());
        slots.push(slot.clone());
        let done = {
            let terms = terms.clone();
            move || terms.load(Ordering::Relaxed) >= TERMS as u64 || Instant::now() >= until
        };
        tasks.push(tokio::spawn(contend(slot, make, terms.clone(), done)));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let max_holders = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, max_holders, slots) = (stop.clone(), max_holders.clone(), slots.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let holders = slots.iter().filter(|s| s.lock().unwrap().held()).count() as u64;
                max_holders.fetch_max(holders, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    assert_eq!(
        max_holders.load(Ordering::Relaxed),
        1,
        "never two holders, and one at times"
    );
    let terms = terms.load(Ordering::Relaxed);
    assert!(
        terms >= TERMS as u64,
        "the lease changed hands only {terms} times"
    );
}

const CHILD_URL: &str = "SLIPSTREAM_LEASE_CHILD_URL";
const CHILD_OUT: &str = "SLIPSTREAM_LEASE_CHILD_OUT";
const CHILD_ID: &str = "SLIPSTREAM_LEASE_CHILD_ID";
const CHILD_STOP: &str = "SLIPSTREAM_LEASE_CHILD_STOP";

/// Terms the contention tests wait for, whatever the machine's load.
const TERMS: usize = 8;
/// A child gives up on its own past this, should the parent be gone.
const CHILD_CAP: Duration = Duration::from_secs(120);

fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Appends one held interval as `id start end` and flushes it, so the
/// parent can count terms while the children still run.
fn record_interval(out: &std::path::Path, id: &str, (start, end): (u64, u64)) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .unwrap();
    writeln!(file, "{id} {start} {end}").unwrap();
}

fn read_intervals(out: &std::path::Path) -> Vec<(String, u64, u64)> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.lines()
        .map(|line| {
            let mut parts = line.split(' ');
            let id = parts.next().unwrap().to_owned();
            let s: u64 = parts.next().unwrap().parse().unwrap();
            let e: u64 = parts.next().unwrap().parse().unwrap();
            (id, s, e)
        })
        .collect()
}

/// The child role of [`eight_contender_processes_never_hold_the_lease_at_once`]:
/// that test starts its own binary again, selecting itself with `--exact`,
/// and the environment makes the copy a contender (not a test of its own).
async fn lease_contender_child(url: String, out: String, id: String, stop_file: String) {
    let opts = ConnectOptions {
        request_timeout: Duration::from_secs(2),
        ..ConnectOptions::new(url)
    };
    let s: Arc<dyn KvStore> = Arc::new(
        NatsKv::connect(&opts)
            .await
            .unwrap()
            .create_or_open(&BucketConfig::new("leases"))
            .await
            .unwrap(),
    );
    let make = {
        let id = id.clone();
        move || Lease::new(s.clone(), "leader", id.clone(), fast()).unwrap()
    };
    let slot = Slot::new(make());
    let out = std::path::PathBuf::from(out);
    let stop = Arc::new(AtomicBool::new(false));
    // Held intervals as seen by `is_held()`, the check before each write.
    let sampler = {
        let (slot, stop, out, id) = (slot.clone(), stop.clone(), out.clone(), id.clone());
        tokio::spawn(async move {
            let mut open: Option<(u64, u64)> = None;
            while !stop.load(Ordering::Relaxed) {
                let held = slot.lock().unwrap().held();
                let now = wall_micros();
                open = match (open, held) {
                    (None, true) => Some((now, now)),
                    (Some((s, _)), true) => Some((s, now)),
                    (Some(iv), false) => {
                        record_interval(&out, &id, iv);
                        None
                    }
                    (None, false) => None,
                };
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            if let Some(iv) = open {
                record_interval(&out, &id, iv);
            }
        })
    };
    let started = Instant::now();
    let stop_file = std::path::PathBuf::from(stop_file);
    contend(slot, make, Arc::new(AtomicU64::new(0)), move || {
        stop_file.exists() || started.elapsed() > CHILD_CAP
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
}

#[tokio::test]
async fn eight_contender_processes_never_hold_the_lease_at_once() {
    if let (Ok(url), Ok(out), Ok(id), Ok(stop_file)) = (
        std::env::var(CHILD_URL),
        std::env::var(CHILD_OUT),
        std::env::var(CHILD_ID),
        std::env::var(CHILD_STOP),
    ) {
        return lease_contender_child(url, out, id, stop_file).await;
    }
    let server = NatsServer::start();
    // The bucket exists before the children race to open it.
    bucket(&server, "leases").await;
    let dir = tempfile::tempdir().unwrap();
    let stop_file = dir.path().join("stop");
    let exe = std::env::current_exe().unwrap();
    let mut children = Vec::new();
    for i in 0..8 {
        let out = dir.path().join(format!("c{i}.txt"));
        let child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "lease::eight_contender_processes_never_hold_the_lease_at_once",
                "--test-threads=1",
            ])
            .env(CHILD_URL, server.url())
            .env(CHILD_OUT, &out)
            .env(CHILD_ID, format!("p{i}"))
            .env(CHILD_STOP, &stop_file)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        children.push((child, out));
    }
    // Run until enough terms have ended, held by more than one process,
    // rather than for a fixed time: a loaded CI machine hands the lease
    // over more slowly, not wrongly.
    let outs: Vec<_> = children.iter().map(|(_, out)| out.clone()).collect();
    let enough = || {
        let ended: Vec<_> = outs.iter().flat_map(|o| read_intervals(o)).collect();
        let holders: std::collections::BTreeSet<_> = ended.iter().map(|(id, _, _)| id).collect();
        ended.len() >= TERMS && holders.len() >= 2
    };
    let deadline = Instant::now() + CHILD_CAP - Duration::from_secs(10);
    while !enough() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(&stop_file, b"").unwrap();
    let mut intervals: Vec<(String, u64, u64)> = Vec::new();
    for (mut child, out) in children {
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "a contender process failed: {status}");
        intervals.extend(read_intervals(&out));
    }
    intervals.sort_by_key(|(_, s, _)| *s);
    for pair in intervals.windows(2) {
        let ((a, _, a_end), (b_, b_start, _)) = (&pair[0], &pair[1]);
        assert!(
            b_start > a_end,
            "{a} held until {a_end} but {b_} already from {b_start}"
        );
    }
    let holders: std::collections::BTreeSet<&str> =
        intervals.iter().map(|(id, _, _)| id.as_str()).collect();
    assert!(intervals.len() >= TERMS, "only {} terms", intervals.len());
    assert!(holders.len() >= 2, "only {holders:?} ever held the lease");
}

#[tokio::test]
async fn holder_reports_the_current_record() {
    let server = NatsServer::start();
    let s = store(&server).await;
    let a = Lease::new(s.clone(), "leader", "pod-a", fast()).unwrap();
    assert!(a.holder().await.unwrap().is_none());
    assert!(a.try_acquire().await.unwrap());
    let rec = a.holder().await.unwrap().unwrap();
    assert_eq!(rec.holder, "pod-a");
    assert_eq!(rec.transitions, 1);
    assert!(eventually(Duration::from_secs(1), || async { a.is_held() }).await);
}

#[tokio::test]
async fn a_holder_whose_renewals_hang_stops_being_leader_at_its_deadline() {
    let mut server = NatsServer::start();
    // Calls hang for up to 10 s; the lease deadline is 600 ms.
    let opts = ConnectOptions {
        request_timeout: Duration::from_secs(10),
        ..ConnectOptions::new(server.url())
    };
    let s: Arc<dyn KvStore> = Arc::new(
        NatsKv::connect(&opts)
            .await
            .unwrap()
            .create_or_open(&BucketConfig::new("leases"))
            .await
            .unwrap(),
    );
    let a = Arc::new(Lease::new(s, "leader", "a", fast()).unwrap());
    let mut state = a.subscribe();
    let task = a.clone().spawn();
    tokio::time::timeout(Duration::from_secs(10), state.wait_for(|h| *h))
        .await
        .unwrap()
        .unwrap();
    server.pause();
    // Well before the hanging renew call could return, the holding state is
    // false: it follows the deadline, not the call.
    tokio::time::timeout(Duration::from_secs(5), state.wait_for(|h| !*h))
        .await
        .expect("still leader while renewals hang")
        .unwrap();
    assert!(!a.is_held());
    server.resume();
    drop(task);
}
