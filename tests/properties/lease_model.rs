//! A model check of the leader lease and the ConfigMap write fence: every
//! interleaving of a small system, explored exhaustively (breadth-first,
//! with a visited set), up to a bound.
//!
//! # The model
//!
//! - **Time** is discrete: one global tick is the smallest step; any number
//!   of other steps may happen within a tick, in any order. Every replica's
//!   monotonic clock runs at real rate (drift is folded into the skew);
//!   replica `i`'s wall clock reads `tick + offset[i]`.
//! - **Clock skew bound**: `|offset[i] - offset[j]| < ttl - renew_deadline`.
//!   The lease timing follows the product's rules (`LeaseConfig::new`,
//!   renew_deadline = 2/3 of the ttl) at ttl = 3 ticks, renew_deadline =
//!   2 ticks: the bound is 1 tick, so the safe runs use equal clocks and the
//!   skew mutant uses 2. (A ttl of 6 ticks, which allows a skew of 1, is
//!   out of reach of the search's time budget in a debug build.)
//! - **Bounds**: 2 replicas, 2 KV updates, ticks 0..=4 for the safe run
//!   (the lease expires at tick 3, so a takeover after a pause past the TTL
//!   is inside), 0..=5 for the mutants; at most one lease request per
//!   replica in flight, one lease call per replica per tick (the product's
//!   renew and retry intervals are not zero), one ConfigMap write per
//!   replica in flight.
//! - **The lease record** lives in a KV key with CAS: create (only on a
//!   missing or deleted key), update and delete on an expected revision;
//!   every successful write bumps the revision. A replica's acquire reads
//!   the latest record, asks the product's `kv::lease::decide` (with its own
//!   wall clock) whether it may create or replace it, and sends a record
//!   expiring at `wall + ttl`; a renew is a CAS update on the revision it
//!   wrote last; a release drops the holding state first, then CAS-deletes
//!   (the replica then stops). A holder trusts a success until
//!   `sent + renew_deadline` on its monotonic clock (`is_held`); a
//!   `RevisionMismatch` on a renew loses the lease at once. These are the
//!   rules of `src/kv/lease.rs`.
//! - **The network** may delay any request or reply for any number of
//!   ticks; one delayed past the horizon is lost. A replica may stop
//!   waiting for a reply at any tick after sending (its timeout); the
//!   abandoned request may still land later.
//! - **Pauses** need no step of their own: the scheduler may leave a replica
//!   idle for any number of ticks (past the TTL), between any two of its
//!   steps, e.g. after deciding to write and before the write is sent.
//! - **The write gate** the controller reads opens on a successful
//!   acquire/renew and closes at the renew deadline *or any time later* (a
//!   task on a loaded machine may lag): writes are gated on it, not on the
//!   exact `is_held`.
//! - **The ConfigMap** has a resourceVersion and a cursor annotation. The
//!   KV head advances (`revisions` updates in all); each replica's mirror
//!   catches up on its own. To write, a replica reads the ConfigMap and asks
//!   the product's `controller::decide::decide` with what it read, its
//!   cursor and its gate (one step), then sends the apply guarded by the
//!   resourceVersion it read; the write may be delayed, so the read is
//!   stale by the time it lands. The API server applies a write only when
//!   that resourceVersion is current (then bumps it).
//!
//! # What is checked, in every reachable state
//!
//! 1. No ConfigMap write moves its cursor backward.
//! 2. No two writes both succeed on one resourceVersion.
//! 3. At no tick do two replicas both hold the lease (`is_held`).
//!
//! 1 and 2 are the fence's and hold even when the lease fails; 3 is the
//! lease's. Each safety is shown to matter: a mutant that removes it (the
//! resourceVersion precondition, the cursor check, the skew bound, trusting
//! the send time rather than the reply time) makes the search find a
//! violation.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use foldhash::HashMap;
use slipstream::{
    controller::decide::{Decision, Observation, Refusal, TargetState, Write, decide},
    crd::CreationPolicy,
    kv::{
        KvEntry, KvUpdate, VersionToken, WatchCursor,
        lease::{self, LeaseConfig, LeaseRecord, Takeover},
    },
    projection::Projected,
    sink::configmap::{Observed, TargetRef},
};

/// What is explored, and which safeties are on.
#[derive(Clone, Copy, Debug)]
struct Model {
    /// Wall-clock offset of each replica, in ticks; its length is the
    /// number of replicas.
    offsets: &'static [i16],
    /// The last tick explored.
    horizon: u8,
    /// KV updates in all.
    revisions: u8,
    ttl: u8,
    renew_deadline: u8,
    /// Writes carry the resourceVersion they were decided on.
    rv_precondition: bool,
    /// A write carrying an older cursor than the ConfigMap's is refused.
    cursor_fence: bool,
    /// A holder trusts a success from when the call was sent (not from when
    /// the reply arrived).
    trust_send_time: bool,
}

impl Model {
    fn new(ttl: u64, offsets: &'static [i16], horizon: u8, revisions: u8) -> Self {
        // the product's timing rules, one tick per second
        let config = LeaseConfig::new(Duration::from_secs(ttl));
        Self {
            offsets,
            horizon,
            revisions,
            ttl: config.ttl.as_secs() as u8,
            renew_deadline: config.renew_deadline.as_secs() as u8,
            rv_precondition: true,
            cursor_fence: true,
            trust_send_time: true,
        }
    }

    /// Replica `i`'s wall clock at `tick` (far from zero, so never negative).
    fn wall(&self, i: usize, tick: u8) -> i16 {
        100 + i16::from(tick) + self.offsets[i]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Cm {
    rv: u8,
    cursor: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Call {
    Acquire,
    Renew,
    Release,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Cas {
    Create,
    Update(u8),
    Delete(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct LeaseRequest {
    from: u8,
    call: Call,
    sent: u8,
    cas: Cas,
    /// The record's expiry, on the sender's wall clock.
    expires: i16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct LeaseReply {
    to: u8,
    call: Call,
    sent: u8,
    /// The new revision, or `None` for a lost CAS.
    revision: Option<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct CmWrite {
    from: u8,
    /// The resourceVersion the write was decided on.
    based_on: u8,
    cursor: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
struct Replica {
    /// The mirror's cursor: KV updates merged.
    cursor: u8,
    /// The lease revision this holder wrote last, and the tick before which
    /// it trusts it.
    held: Option<(u8, u8)>,
    /// The lease call awaited, by its send tick.
    waiting: Option<(Call, u8)>,
    /// The tick of its last lease call: at most one per tick (the
    /// product's renew and retry intervals are not zero).
    last_call: Option<u8>,
    gate: bool,
    stopped: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    now: u8,
    head: u8,
    /// The lease key's live record (holder, expiry on the holder's wall
    /// clock); `None` when missing or deleted.
    record: Option<(u8, i16)>,
    lease_revision: u8,
    cm: Cm,
    replicas: Vec<Replica>,
    requests: Vec<LeaseRequest>,
    replies: Vec<LeaseReply>,
    writes: Vec<CmWrite>,
}

impl State {
    fn initial(model: &Model) -> Self {
        Self {
            now: 0,
            head: 0,
            record: None,
            lease_revision: 0,
            cm: Cm { rv: 1, cursor: 0 },
            replicas: vec![Replica::default(); model.offsets.len()],
            requests: Vec::new(),
            replies: Vec::new(),
            writes: Vec::new(),
        }
    }

    fn holds(&self, i: usize) -> bool {
        self.replicas[i]
            .held
            .is_some_and(|(_, until)| self.now < until)
    }

    /// Sorted message lists: one state, one representation.
    /// Replies nobody waits for any more are dropped (the caller gave up).
    fn normalized(mut self) -> Self {
        let replicas = &self.replicas;
        self.replies.retain(|p| {
            let r = &replicas[usize::from(p.to)];
            !r.stopped && r.waiting == Some((p.call, p.sent))
        });
        self.requests.sort();
        self.replies.sort();
        self.writes.sort();
        self
    }
}

/// The latest record of the lease key, as `kv::lease::decide` reads it.
fn latest(s: &State) -> Option<KvUpdate> {
    let version = VersionToken::from_u64(u64::from(s.lease_revision));
    match s.record {
        None if s.lease_revision == 0 => None,
        None => Some(KvUpdate::Delete {
            key: "leader".into(),
            version,
        }),
        Some((holder, expires)) => Some(KvUpdate::Put(KvEntry {
            key: "leader".into(),
            value: LeaseRecord {
                holder: format!("replica-{holder}"),
                expires_at_ms: ms(expires),
                acquired_at_ms: 0,
                transitions: 1,
            }
            .to_bytes()
            .unwrap(),
            version,
            published: None,
        })),
    }
}

fn ms(wall: i16) -> u64 {
    u64::try_from(wall).unwrap() * 1000
}

/// What `controller::decide::decide` tells replica `i` to do with content
/// at its cursor, given the ConfigMap it last read.
fn write_decision(model: &Model, r: &Replica, observed: Cm) -> Option<u8> {
    const VALUES: [&str; 8] = ["0", "1", "2", "3", "4", "5", "6", "7"];
    let content = Projected {
        data: [("k".into(), VALUES[usize::from(r.cursor)])].into(),
        keys: 1,
        bytes: 1,
        ..Projected::default()
    };
    let target = TargetRef {
        namespace: "ns".into(),
        name: "cm".into(),
        binding: "b".into(),
        generation: 1,
        policy: CreationPolicy::Owner,
        owner: None,
        labels: Default::default(),
        annotations: Default::default(),
    };
    let configmap = TargetState::Present(Box::new(Observed {
        resource_version: Some(observed.rv.to_string()),
        cursor: cursor(observed.cursor),
        binding: Some("b".into()),
        generation: Some(1),
        ..Observed::default()
    }));
    let decision = decide(&Observation {
        suspend: false,
        content: Ok(&content),
        target: &target,
        configmap: &configmap,
        other_binding_exists: None,
        cursor: cursor(r.cursor),
        incarnation: None,
        applied_keys: None,
        leader: r.gate,
        // every cursor in the model is a revision the bucket has (values
        // index `VALUES`), so no cursor is ever past the last revision
        bucket_last: Some(VALUES.len() as u64 - 1),
    });
    match decision {
        Decision::Write(Write::Apply {
            resource_version: Some(rv),
        }) => Some(rv.parse().unwrap()),
        Decision::Refuse(Refusal::StaleWriter { .. }) if !model.cursor_fence && r.gate => {
            Some(observed.rv)
        }
        Decision::Refuse(Refusal::StaleWriter { .. }) | Decision::Standby => None,
        other => panic!("the model does not expect {other:?}"),
    }
}

fn cursor(n: u8) -> WatchCursor {
    if n == 0 {
        WatchCursor::none()
    } else {
        WatchCursor::after(VersionToken::from_u64(u64::from(n)))
    }
}

/// One step, named for a counterexample's trace.
#[allow(dead_code)] // the fields are read through Debug, in traces
#[derive(Clone, Copy, Debug)]
enum Step {
    Tick,
    KvUpdate,
    Replica(usize, &'static str),
    KvServerApplies(LeaseRequest, bool),
    ReplicaGets(LeaseReply),
    ApiServerHandles(CmWrite, bool),
}

type TakeoverQuestion = (Option<(u8, i16)>, u8, i16);

/// Answers of the product's pure functions, by their inputs: the search
/// asks the same questions many times.
#[derive(Default)]
struct Memo {
    /// (record, lease revision, wall clock) -> the CAS to send.
    takeover: HashMap<TakeoverQuestion, Option<Cas>>,
    write: HashMap<(u8, bool, Cm), Option<u8>>,
}

/// Every state one step away from `s`, or the violation a step commits.
fn successors(
    model: &Model,
    memo: &mut Memo,
    s: &State,
    out: &mut Vec<(Step, State)>,
) -> Result<(), String> {
    let mut push = |step: Step, next: State| out.push((step, next.normalized()));
    if s.now < model.horizon {
        let mut n = s.clone();
        n.now += 1;
        push(Step::Tick, n);
    }
    if s.head < model.revisions {
        let mut n = s.clone();
        n.head += 1;
        push(Step::KvUpdate, n);
    }
    for i in 0..s.replicas.len() {
        let r = s.replicas[i];
        if r.stopped {
            continue;
        }
        let id = i as u8;
        let mut with = |step: &'static str, f: &dyn Fn(&mut State, &mut Replica)| {
            let mut n = s.clone();
            let mut r = r;
            f(&mut n, &mut r);
            n.replicas[i] = r;
            push(Step::Replica(i, step), n);
        };
        if r.cursor < s.head {
            with("merges the next KV update", &|_, r| r.cursor += 1);
        }
        let in_flight = s.requests.iter().filter(|q| q.from == id).count();
        if r.waiting.is_none() && in_flight < 1 && r.last_call != Some(s.now) {
            let expires = model.wall(i, s.now) + i16::from(model.ttl);
            let send = |call: Call, cas: Cas| LeaseRequest {
                from: id,
                call,
                sent: s.now,
                cas,
                expires,
            };
            match r.held {
                Some((revision, _)) => {
                    with("renews the lease", &|n, r| {
                        n.requests.push(send(Call::Renew, Cas::Update(revision)));
                        r.waiting = Some((Call::Renew, s.now));
                        r.last_call = Some(s.now);
                    });
                    with("releases the lease and stops", &|n, r| {
                        r.held = None;
                        r.gate = false;
                        r.stopped = true;
                        n.requests.push(send(Call::Release, Cas::Delete(revision)));
                    });
                }
                None => {
                    let wall = model.wall(i, s.now);
                    let key = (s.record, s.lease_revision, wall);
                    let cas = *memo.takeover.entry(key).or_insert_with(|| {
                        match lease::decide(latest(s).as_ref(), ms(wall)) {
                            Takeover::Held { .. } => None,
                            Takeover::Create => Some(Cas::Create),
                            Takeover::Replace(v) => Some(Cas::Update(v.as_u64().unwrap() as u8)),
                        }
                    });
                    if let Some(cas) = cas {
                        with("tries to acquire the lease", &|n, r| {
                            n.requests.push(send(Call::Acquire, cas));
                            r.waiting = Some((Call::Acquire, s.now));
                            r.last_call = Some(s.now);
                        });
                    }
                }
            }
        }
        if r.waiting.is_some_and(|(_, sent)| s.now > sent) {
            with("stops waiting for its lease call", &|_, r| r.waiting = None);
        }
        if r.gate && !s.holds(i) {
            with("closes its write gate", &|_, r| r.gate = false);
        }
        let writing = s.writes.iter().any(|w| w.from == id);
        let observed = s.cm;
        if !writing
            && r.cursor > 0
            && observed.cursor != r.cursor
            && let Some(based_on) = *memo
                .write
                .entry((r.cursor, r.gate, observed))
                .or_insert_with(|| write_decision(model, &r, observed))
        {
            with("reads the ConfigMap and sends a write", &|n, r| {
                n.writes.push(CmWrite {
                    from: id,
                    based_on,
                    cursor: r.cursor,
                });
            });
        }
    }
    // A message delayed past the horizon is lost: no step of its own.
    for (k, q) in s.requests.iter().enumerate() {
        let mut n = s.clone();
        n.requests.remove(k);
        let ok = match q.cas {
            Cas::Create => n.record.is_none(),
            Cas::Update(v) | Cas::Delete(v) => n.lease_revision == v,
        };
        if ok {
            n.lease_revision += 1;
            n.record = match q.cas {
                Cas::Delete(_) => None,
                _ => Some((q.from, q.expires)),
            };
        }
        n.replies.push(LeaseReply {
            to: q.from,
            call: q.call,
            sent: q.sent,
            revision: ok.then_some(n.lease_revision),
        });
        push(Step::KvServerApplies(*q, ok), n);
    }
    for (k, p) in s.replies.iter().enumerate() {
        let i = usize::from(p.to);
        let mut n = s.clone();
        n.replies.remove(k);
        let r = &mut n.replicas[i];
        r.waiting = None;
        match (p.revision, p.call) {
            (Some(revision), _) => {
                let from = if model.trust_send_time { p.sent } else { s.now };
                let until = from + model.renew_deadline;
                r.held = Some((revision, until));
                r.gate = s.now < until;
            }
            (None, Call::Renew) => {
                r.held = None;
                r.gate = false;
            }
            (None, _) => {}
        }
        push(Step::ReplicaGets(*p), n);
    }
    for (k, w) in s.writes.iter().enumerate() {
        let mut n = s.clone();
        n.writes.remove(k);
        let applies = !model.rv_precondition || w.based_on == s.cm.rv;
        if applies {
            if w.based_on != s.cm.rv {
                return Err(format!(
                    "two writes succeeded on resourceVersion {}: {w:?} lands on {:?}",
                    w.based_on, s.cm
                ));
            }
            if w.cursor < s.cm.cursor {
                return Err(format!(
                    "the ConfigMap moved backward from cursor {} to {}",
                    s.cm.cursor, w.cursor
                ));
            }
            n.cm = Cm {
                rv: s.cm.rv + 1,
                cursor: w.cursor,
            };
        }
        push(Step::ApiServerHandles(*w, applies), n);
    }
    Ok(())
}

/// The state violates the lease's exclusion.
fn two_holders(s: &State) -> Option<String> {
    let holders: Vec<usize> = (0..s.replicas.len()).filter(|i| s.holds(*i)).collect();
    (holders.len() > 1)
        .then(|| format!("replicas {holders:?} all hold the lease at tick {}", s.now))
}

struct Outcome {
    states: usize,
    /// The violation found and the steps leading to it.
    violation: Option<(String, Vec<String>)>,
}

/// Breadth-first search of every state reachable within the bounds.
fn explore(model: &Model) -> Outcome {
    let start = State::initial(model);
    let mut memo = Memo::default();
    let mut index: HashMap<State, usize> = HashMap::default();
    // (state, parent and step)
    let mut nodes: Vec<(State, Option<(usize, Step)>)> = vec![(start.clone(), None)];
    index.insert(start, 0);
    let mut queue = VecDeque::from([0usize]);
    let mut next = Vec::new();
    let trace = |nodes: &Vec<(State, Option<(usize, Step)>)>, mut at: usize, last: Option<Step>| {
        let mut steps: Vec<String> = last.into_iter().map(|s| format!("{s:?}")).collect();
        while let Some((parent, step)) = &nodes[at].1 {
            steps.push(format!("{step:?} (then at tick {})", nodes[at].0.now));
            at = *parent;
        }
        steps.reverse();
        steps
    };
    while let Some(at) = queue.pop_front() {
        next.clear();
        let state = nodes[at].0.clone();
        if let Err(violation) = successors(model, &mut memo, &state, &mut next) {
            return Outcome {
                states: nodes.len(),
                violation: Some((violation, trace(&nodes, at, None))),
            };
        }
        for (step, n) in next.drain(..) {
            if index.contains_key(&n) {
                continue;
            }
            if let Some(violation) = two_holders(&n) {
                let steps = trace(&nodes, at, Some(step));
                return Outcome {
                    states: nodes.len(),
                    violation: Some((violation, steps)),
                };
            }
            index.insert(n.clone(), nodes.len());
            nodes.push((n, Some((at, step))));
            queue.push_back(nodes.len() - 1);
        }
    }
    Outcome {
        states: nodes.len(),
        violation: None,
    }
}

fn run(name: &str, model: &Model) -> Outcome {
    let started = Instant::now();
    let outcome = explore(model);
    println!(
        "{name}: {} states explored in {:.1?} ({} replicas, offsets {:?}, ticks 0..={}, {} KV updates, ttl {} renew_deadline {})",
        outcome.states,
        started.elapsed(),
        model.offsets.len(),
        model.offsets,
        model.horizon,
        model.revisions,
        model.ttl,
        model.renew_deadline
    );
    if let Some((violation, steps)) = &outcome.violation {
        println!("{name}: {violation}, after:\n  {}", steps.join("\n  "));
    }
    outcome
}

fn assert_safe(name: &str, model: &Model) {
    let outcome = run(name, model);
    if let Some((violation, steps)) = outcome.violation {
        panic!("{violation}, after:\n  {}", steps.join("\n  "));
    }
    assert!(outcome.states > 1000, "only {} states", outcome.states);
}

fn assert_found(name: &str, model: &Model, what: &str) {
    let outcome = run(name, model);
    match outcome.violation {
        Some((violation, _)) => assert!(
            violation.contains(what),
            "found {violation:?}, not {what:?}"
        ),
        None => panic!(
            "{} states and no violation: the model would not notice",
            outcome.states
        ),
    }
}

#[test]
fn two_replicas_never_move_a_configmap_backward_nor_share_a_version_or_the_lease() {
    assert_safe("2 replicas", &Model::new(3, &[0, 0], 4, 2));
}

#[test]
fn without_the_resource_version_precondition_the_search_finds_a_lost_write() {
    let model = Model {
        rv_precondition: false,
        ..Model::new(3, &[0, 0], 5, 2)
    };
    assert_found(
        "no resourceVersion precondition",
        &model,
        "two writes succeeded",
    );
}

#[test]
fn without_the_cursor_fence_the_search_finds_a_backward_move() {
    let model = Model {
        cursor_fence: false,
        ..Model::new(3, &[0, 0], 5, 2)
    };
    assert_found("no cursor fence", &model, "moved backward");
}

#[test]
fn a_clock_skew_beyond_the_bound_lets_two_replicas_hold_the_lease() {
    // ttl - renew_deadline = 1 tick; 2 is beyond it
    assert_found("skew 2", &Model::new(3, &[0, 2], 5, 2), "hold the lease");
}

#[test]
fn trusting_the_reply_time_instead_of_the_send_time_lets_two_replicas_hold_the_lease() {
    let model = Model {
        trust_send_time: false,
        ..Model::new(3, &[0, 0], 5, 2)
    };
    assert_found("trust from the reply", &model, "hold the lease");
}

#[test]
fn the_modelled_lease_timing_is_the_products() {
    // the skew bound in the module docs is ttl - renew_deadline = 1 tick
    let model = Model::new(3, &[0], 0, 0);
    assert_eq!((model.ttl, model.renew_deadline), (3, 2));
}
