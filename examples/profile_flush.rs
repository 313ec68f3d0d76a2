//! The CPU path of one coalesced update of one binding, without servers:
//! merge the update into the entries, project the whole content, decide
//! "same as the ConfigMap?", build the apply body, and read the response
//! back (`ConfigMapHead`), as `flush` does for every write.
//!
//! For instruction counts (the issue asks for no whole-content clone per
//! update on this path):
//!
//! ```sh
//! cargo build --release --example profile_flush
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/profile_flush --updates 2000
//! callgrind_annotate /tmp/cg.out | head -40
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{collections::BTreeMap, time::Instant};

use bytes::Bytes;
use clap::Parser;
use slipstream::{
    crd::{CreationPolicy, KeyPolicy},
    kv::{VersionToken, WatchCursor},
    projection::ProjectionRules,
    sink::configmap::{ConfigMapHead, ConfigMapSink, Observed, TargetRef},
};

#[derive(Parser)]
struct Args {
    /// Keys of the binding.
    #[arg(long, default_value_t = 100)]
    keys: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 32)]
    value_bytes: usize,
    /// Single-key updates to run.
    #[arg(long, default_value_t = 20_000)]
    updates: usize,
}

fn main() {
    let args = Args::parse();
    let rules = ProjectionRules::new(vec!["app.".into()], true, KeyPolicy::Escape).unwrap();
    let target = TargetRef {
        namespace: "default".into(),
        name: "app".into(),
        binding: "app".into(),
        generation: 1,
        policy: CreationPolicy::Owner,
        owner: None,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
    };
    let value = |i: usize, round: usize| {
        let mut v = format!("{round:08}-{i:06}-");
        v.extend(std::iter::repeat_n(
            'x',
            args.value_bytes.saturating_sub(v.len()),
        ));
        Bytes::from(v)
    };
    let mut entries: BTreeMap<String, Bytes> = (0..args.keys)
        .map(|i| (format!("app.key-{i:05}"), value(i, 0)))
        .collect();
    let mut observed = Observed::default();
    let mut body_bytes = 0usize;
    let started = Instant::now();
    for n in 1..=args.updates {
        // one update: a new value of one key
        let i = n % args.keys;
        entries.insert(format!("app.key-{i:05}"), value(i, n));
        let projected = rules
            .project(entries.iter().map(|(k, v)| (k.as_str(), v.as_ref())))
            .unwrap();
        let same =
            observed.holds(&projected, CreationPolicy::Owner) && observed.stamped(&projected);
        assert!(!same, "every update changes the content");
        let cursor = WatchCursor::after(VersionToken::from_u64(n as u64));
        let body = ConfigMapSink::apply_body_json(&target, &projected, cursor, Some("1")).unwrap();
        body_bytes += body.len();
        // the server answers with the object it stored: read back as a head
        let head: ConfigMapHead = serde_json::from_slice(&body).unwrap();
        observed = Observed::from_head(head);
    }
    let per = started.elapsed() / args.updates as u32;
    println!(
        "{} updates of one key in a {}-key binding: {:.1} us per update, apply body {} bytes",
        args.updates,
        args.keys,
        per.as_secs_f64() * 1e6,
        body_bytes / args.updates
    );
}
