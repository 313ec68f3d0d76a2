//! `slipstream sync`: atomic versions, restart delta, deletes, binary values,
//! refused projections, expired cursors.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use slipstream::{
    cmd::sync::{SyncConfig, SyncReport, run},
    crd::KeyPolicy,
    kv::{
        KvPurge, KvWriter,
        nats::{BucketConfig, NatsBucket},
    },
};
use tokio::{sync::oneshot, task::JoinHandle};

use crate::{
    bucket, bucket_with,
    common::{
        NatsServer, free_port,
        http::{Answer, http_get, metric_f64},
    },
    eventually, files, read_dir_files, slipstream, slipstream_ok, summary,
};

fn config(dir: &Path, prefixes: &[&str], strip_prefix: bool) -> SyncConfig {
    SyncConfig {
        bucket: String::new(),
        prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
        strip_prefix,
        key_policy: KeyPolicy::Escape,
        dir: dir.to_owned(),
        coalesce: Duration::from_millis(20),
        fsync: false,
    }
}

/// A live (not `--once`) sync running in the background.
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<SyncReport>>,
}

fn start(bucket: NatsBucket, mut config: SyncConfig) -> Running {
    config.bucket = bucket.name().to_owned();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        run(&bucket, config, false, async {
            let _ = stopped.await;
        })
        .await
    });
    Running { stop, task }
}

impl Running {
    async fn stop(self) -> SyncReport {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap()
    }
}

fn sync_once(server: &NatsServer, bucket: &str, dir: &Path, extra: &[&str]) -> Vec<u8> {
    let url = server.url();
    let mut args = vec![
        "sync",
        "--nats",
        &url,
        "--bucket",
        bucket,
        "--dir",
        dir.to_str().unwrap(),
        "--once",
    ];
    args.extend_from_slice(extra);
    slipstream_ok(&args, None)
}

#[tokio::test]
async fn sync_once_writes_the_projected_prefixes_as_a_kubelet_style_volume() {
    let server = NatsServer::start();
    let b = bucket(&server, "app").await;
    b.put("web.greeting", Bytes::from("hello")).await.unwrap();
    b.put("web.a/b=c", Bytes::from("escaped")).await.unwrap();
    b.put("api.secret", Bytes::from("not mine")).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("config");

    let out = sync_once(
        &server,
        "app",
        &dir,
        &["--prefix", "web.", "--strip-prefix"],
    );
    let s = summary(&out);
    assert_eq!(s["updates"], "2");
    assert_eq!(s["files"], "2");
    assert_eq!(s["resumed_from"], "none");

    assert_eq!(
        read_dir_files(&dir),
        files(&[("greeting", b"hello"), ("a_2Fb_3Dc", b"escaped")])
    );
    // Per-key symlinks into ..data, like a ConfigMap volume.
    assert_eq!(
        std::fs::read_link(dir.join("greeting")).unwrap(),
        Path::new("..data/greeting")
    );
    assert_eq!(std::fs::read(dir.join("greeting")).unwrap(), b"hello");
}

#[tokio::test]
async fn restart_resumes_from_the_cursor_in_the_directory_with_only_the_delta() {
    let server = NatsServer::start();
    let b = bucket(&server, "app").await;
    for i in 0..200 {
        b.put(&format!("web.k{i:03}"), Bytes::from(format!("v{i}")))
            .await
            .unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let args = ["--prefix", "web."];

    let first = summary(&sync_once(&server, "app", dir, &args));
    assert_eq!(
        first["updates"], "200",
        "a fresh directory gets the full state"
    );

    // While the sync is down: 3 changes, 2 deletes, and noise outside the prefix.
    for i in 0..3 {
        b.put(&format!("web.k{i:03}"), Bytes::from("changed"))
            .await
            .unwrap();
    }
    b.delete("web.k100").await.unwrap();
    b.delete("web.k101").await.unwrap();
    b.put("other.x", Bytes::from("noise")).await.unwrap();

    let second = summary(&sync_once(&server, "app", dir, &args));
    assert_eq!(second["resumed_from"], first["cursor"]);
    assert_eq!(second["updates"], "5", "only the delta is delivered");
    assert_eq!(second["files"], "198");
    let got = read_dir_files(dir);
    assert_eq!(got["web.k000"], b"changed");
    assert_eq!(got["web.k199"], b"v199");
    assert!(!got.contains_key("web.k100") && !got.contains_key("web.k101"));

    let third = summary(&sync_once(&server, "app", dir, &args));
    assert_eq!(third["updates"], "0", "nothing changed, nothing delivered");
    assert_eq!(third["swaps"], "0", "and nothing rewritten");
}

#[tokio::test]
async fn a_version_torn_by_a_crash_is_detected_and_resynced() {
    let server = NatsServer::start();
    let b = bucket(&server, "app").await;
    b.put("web.a", Bytes::from("complete value")).await.unwrap();
    b.put("web.b", Bytes::from("other")).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    sync_once(&server, "app", tmp.path(), &["--prefix", "web."]);

    // A power loss without --fsync can leave the renamed version with a
    // short file; the stored checksum catches it.
    let version = std::fs::read_link(tmp.path().join("..data")).unwrap();
    std::fs::write(tmp.path().join(version).join("web.a"), b"compl").unwrap();
    let s = summary(&sync_once(
        &server,
        "app",
        tmp.path(),
        &["--prefix", "web."],
    ));
    assert_eq!(
        s["resumed_from"], "none",
        "a torn version is not resumed from"
    );
    assert_eq!(s["updates"], "2");
    assert_eq!(
        read_dir_files(tmp.path()),
        files(&[("web.a", b"complete value"), ("web.b", b"other")])
    );
}

#[tokio::test]
async fn changed_settings_trigger_a_full_resync_instead_of_a_wrong_delta() {
    let server = NatsServer::start();
    let b = bucket(&server, "app").await;
    b.put("web.a", Bytes::from("1")).await.unwrap();
    b.put("api.b", Bytes::from("2")).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();

    sync_once(&server, "app", tmp.path(), &["--prefix", "web."]);
    assert_eq!(read_dir_files(tmp.path()), files(&[("web.a", b"1")]));

    let s = summary(&sync_once(
        &server,
        "app",
        tmp.path(),
        &["--prefix", "web.", "api."],
    ));
    assert_eq!(s["resumed_from"], "none");
    assert_eq!(
        read_dir_files(tmp.path()),
        files(&[("web.a", b"1"), ("api.b", b"2")])
    );
}

#[tokio::test]
async fn deleted_purged_and_tombstoned_keys_remove_their_files() {
    let server = NatsServer::start();
    let b = bucket(&server, "app").await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let sync = start(b.clone(), config(&dir, &["web."], true));

    for k in ["a", "b", "c", "d"] {
        b.put(&format!("web.{k}"), Bytes::from(k)).await.unwrap();
    }
    eventually("four files", || read_dir_files(&dir).len() == 4).await;

    b.delete("web.a").await.unwrap();
    b.purge("web.b").await.unwrap();
    let rev = b.put("web.c", Bytes::from("c2")).await.unwrap();
    b.delete_with_version("web.c", rev).await.unwrap();
    eventually("only d left", || {
        read_dir_files(&dir) == files(&[("d", b"d")])
    })
    .await;
    for gone in ["a", "b", "c"] {
        assert!(
            std::fs::symlink_metadata(dir.join(gone)).is_err(),
            "{gone} symlink removed"
        );
    }
    let report = sync.stop().await;
    assert_eq!(report.files, 1);
}

#[tokio::test]
async fn binary_values_are_written_byte_exact() {
    let server = NatsServer::start();
    bucket(&server, "app").await;
    let url = server.url();
    let blob: Vec<u8> = (0..=255u8).rev().chain([0, 0, 0xc3]).collect();
    // Written through `slipstream kv put` with the value on stdin.
    slipstream_ok(
        &["kv", "--nats", &url, "--bucket", "app", "put", "web.blob"],
        Some(&blob),
    );
    slipstream_ok(
        &[
            "kv", "--nats", &url, "--bucket", "app", "put", "web.text", "héllo",
        ],
        None,
    );
    let tmp = tempfile::tempdir().unwrap();
    sync_once(
        &server,
        "app",
        tmp.path(),
        &["--prefix", "web.", "--strip-prefix"],
    );
    assert_eq!(std::fs::read(tmp.path().join("blob")).unwrap(), blob);
    assert_eq!(
        std::fs::read(tmp.path().join("text")).unwrap(),
        "héllo".as_bytes()
    );
    // And read back exactly through `slipstream kv get`.
    let got = slipstream_ok(
        &["kv", "--nats", &url, "--bucket", "app", "get", "web.blob"],
        None,
    );
    assert_eq!(got, blob);
}

/// The writer puts `a` then `b`, both carrying round number n, so KV only
/// ever holds (a, b) = (n, n) or (n+1, n). A reader that resolves `..data`
/// once and reads both files from that version must only see those states;
/// a torn write (files updated in place, or a partial swap) shows b > a or
/// a file whose chunks differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_polling_during_bursts_never_sees_a_mix_of_two_versions() {
    let server = NatsServer::start();
    let b = bucket(&server, "app").await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let mut cfg = config(&dir, &["web."], true);
    cfg.coalesce = Duration::from_millis(1);
    let value = |n: u64| Bytes::from(format!("{n:08};").repeat(2048)); // 18 KiB
    b.put("web.a", value(0)).await.unwrap();
    b.put("web.b", value(0)).await.unwrap();
    let sync = start(b.clone(), cfg);
    eventually("first version", || read_dir_files(&dir).len() == 2).await;

    let done = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicU64::new(0));
    let reader = {
        let (dir, done, polls) = (dir.clone(), done.clone(), polls.clone());
        std::thread::spawn(move || {
            let round = |bytes: &[u8]| -> u64 {
                let text = std::str::from_utf8(bytes).unwrap();
                let first = &text[..9];
                assert!(
                    text.len() == 9 * 2048
                        && text.as_bytes().chunks(9).all(|c| c == first.as_bytes()),
                    "a file holds parts of two values"
                );
                first[..8].parse().unwrap()
            };
            let mut seen_rounds = std::collections::BTreeSet::new();
            while !done.load(Ordering::Relaxed) {
                let Ok(version) = std::fs::read_link(dir.join("..data")) else {
                    continue;
                };
                let base = dir.join(version);
                let (Ok(a), Ok(b)) = (std::fs::read(base.join("a")), std::fs::read(base.join("b")))
                else {
                    continue; // that version was just removed: resolve again
                };
                let (a, b) = (round(&a), round(&b));
                assert!(
                    a == b || a == b + 1,
                    "saw a={a} b={b}: a state KV never held"
                );
                // Each per-key file alone is always complete.
                if let Ok(bytes) = std::fs::read(dir.join("a")) {
                    round(&bytes);
                }
                seen_rounds.insert((a, b));
                polls.fetch_add(1, Ordering::Relaxed);
            }
            seen_rounds.len()
        })
    };

    let rounds = 1000u64;
    let started = Instant::now();
    for n in 1..=rounds {
        b.put("web.a", value(n)).await.unwrap();
        b.put("web.b", value(n)).await.unwrap();
        if n % 25 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let expected = files(&[("a", &value(rounds)), ("b", &value(rounds))]);
    eventually("last round", || read_dir_files(&dir) == expected).await;
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let distinct_states = reader.join().expect("reader saw only states KV held");
    let report = sync.stop().await;
    println!(
        "{rounds} rounds in {elapsed:?}: {} swaps for {} updates, reader polled {} times and saw {distinct_states} distinct states",
        report.swaps,
        report.updates,
        polls.load(Ordering::Relaxed)
    );
    assert!(distinct_states > 1, "the reader observed versions changing");
    assert!(
        report.swaps < report.updates,
        "bursts were coalesced into fewer writes"
    );
}

#[tokio::test]
async fn colliding_keys_are_refused_and_the_last_good_content_stays() {
    let server = NatsServer::start();
    let b = bucket(&server, "app").await;
    b.put("web.x", Bytes::from("from web")).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let sync = start(b.clone(), config(&dir, &["web.", "api."], true));
    eventually("x written", || {
        read_dir_files(&dir) == files(&[("x", b"from web")])
    })
    .await;

    // api.x strips to "x" too: the set must not be written.
    b.put("api.x", Bytes::from("from api")).await.unwrap();
    b.put("web.y", Bytes::from("y")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read_dir_files(&dir), files(&[("x", b"from web")]));

    // Removing the collision writes everything since.
    b.delete("api.x").await.unwrap();
    eventually("y written", || {
        read_dir_files(&dir) == files(&[("x", b"from web"), ("y", b"y")])
    })
    .await;
    let report = sync.stop().await;
    assert!(report.refused >= 1);

    // Through the binary: `--once` on a colliding set fails and says why.
    b.put("api.x", Bytes::from("again")).await.unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let url = server.url();
    let out = slipstream(
        &[
            "sync",
            "--nats",
            &url,
            "--bucket",
            "app",
            "--prefix",
            "web.",
            "api.",
            "--strip-prefix",
            "--dir",
            fresh.path().to_str().unwrap(),
            "--once",
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("KeyCollision"), "{stderr}");
    assert!(read_dir_files(fresh.path()).is_empty());
}

#[tokio::test]
async fn an_expired_cursor_falls_back_to_a_full_resync() {
    let server = NatsServer::start();
    let b = bucket_with(&server, BucketConfig::new("app")).await; // history 1
    b.put("web.a", Bytes::from("1")).await.unwrap();
    b.put("web.b", Bytes::from("1")).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let first = summary(&sync_once(
        &server,
        "app",
        tmp.path(),
        &["--prefix", "web."],
    ));
    // Superseding both keys twice drops every revision at or after the
    // cursor's successor: the delta is gone from the stream.
    for v in ["2", "3"] {
        b.put("web.a", Bytes::from(v)).await.unwrap();
        b.put("web.b", Bytes::from(v)).await.unwrap();
    }
    b.delete("web.a").await.unwrap();
    let out = slipstream(
        &[
            "sync",
            "--nats",
            &server.url(),
            "--bucket",
            "app",
            "--prefix",
            "web.",
            "--dir",
            tmp.path().to_str().unwrap(),
            "--once",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cursor expired"), "{stderr}");
    let second = summary(&out.stdout);
    assert_eq!(second["resumed_from"], first["cursor"]);
    assert_eq!(read_dir_files(tmp.path()), files(&[("web.b", b"3")]));
}

#[tokio::test]
async fn a_live_sync_waits_for_its_bucket_then_syncs_and_stops_cleanly_on_sigterm() {
    let server = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let mut child = std::process::Command::new(crate::BIN)
        .args([
            "sync",
            "--nats",
            &server.url(),
            "--bucket",
            "late",
            "--prefix",
            "web.",
            "--strip-prefix",
            "--dir",
            dir.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "still waiting, not exited"
    );

    let b = bucket(&server, "late").await;
    b.put("web.greeting", Bytes::from("hi")).await.unwrap();
    eventually("the file appears", || {
        read_dir_files(&dir) == files(&[("greeting", b"hi")])
    })
    .await;
    b.put("web.greeting", Bytes::from("hi again"))
        .await
        .unwrap();
    eventually("the file changes", || {
        read_dir_files(&dir) == files(&[("greeting", b"hi again")])
    })
    .await;

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("not syncing yet"), "{stderr}");
}

#[tokio::test]
async fn bad_input_gives_a_clear_error_and_writes_nothing() {
    let server = NatsServer::start();
    let url = server.url();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "sync", "--nats", &url, "--bucket", "missing", "--prefix", "a.", "--dir", d,
                "--once",
            ],
            "missing",
        ),
        (
            &[
                "sync", "--nats", &url, "--bucket", "app", "--dir", d, "--once",
            ],
            "--prefix",
        ),
        (
            &[
                "sync", "--nats", &url, "--bucket", "app", "--prefix", "a.", "a.", "--dir", d,
                "--once",
            ],
            "twice",
        ),
        (
            &[
                "sync",
                "--nats",
                &url,
                "--bucket",
                "app",
                "--prefix",
                "a.",
                "--key-policy",
                "Ignore",
                "--dir",
                d,
            ],
            "Escape, Skip or Fail",
        ),
        (
            &[
                "sync",
                "--nats",
                &url,
                "--bucket",
                "app",
                "--prefix",
                "a.",
                "--coalesce",
                "soon",
                "--dir",
                d,
            ],
            "invalid duration",
        ),
        (
            &[
                "sync",
                "--nats",
                "nats://127.0.0.1:1",
                "--nats-timeout",
                "1s",
                "--bucket",
                "app",
                "--prefix",
                "a.",
                "--dir",
                d,
                "--once",
            ],
            "connecting to NATS",
        ),
    ];
    for (args, needle) in cases {
        let out = slipstream(args, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(needle),
            "{args:?}: stderr lacks {needle:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    assert!(read_dir_files(tmp.path()).is_empty());
}

/// Polls `GET path` until `check` holds for the answer, for up to 15 s.
async fn wait_http(
    port: u16,
    path: &str,
    accept: Option<&str>,
    check: impl Fn(&Answer) -> bool,
) -> Answer {
    let start = Instant::now();
    loop {
        if let Some(a) = http_get(port, path, accept).await
            && check(&a)
        {
            return a;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting on {path}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_sidecar_configured_by_env_serves_metrics_and_readiness_and_logs_json() {
    let server = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("config");
    let port = free_port();
    // every setting from the environment, none from flags
    let mut child = std::process::Command::new(crate::BIN)
        .arg("sync")
        .env("SLIPSTREAM_NATS_URL", server.url())
        .env("SLIPSTREAM_SYNC_BUCKET", "side")
        .env("SLIPSTREAM_SYNC_PREFIXES", "web.,api.")
        .env("SLIPSTREAM_SYNC_STRIP_PREFIX", "true")
        .env("SLIPSTREAM_SYNC_DIR", &dir)
        .env("SLIPSTREAM_SYNC_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("SLIPSTREAM_LOG_FORMAT", "json")
        .env("SLIPSTREAM_LOG_LEVEL", "debug")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // no bucket yet: alive, not ready
    wait_http(port, "/healthz", None, |a| a.status() == 200).await;
    let not_ready = wait_http(port, "/readyz", None, |a| a.status() != 0).await;
    assert_eq!(not_ready.status(), 503, "{}", not_ready.body);

    let b = bucket(&server, "side").await;
    b.put("web.a", Bytes::from("1")).await.unwrap();
    b.put("api.b", Bytes::from("2")).await.unwrap();
    b.put("other.c", Bytes::from("3")).await.unwrap();
    eventually("both prefixes synced", || {
        read_dir_files(&dir) == files(&[("a", b"1"), ("b", b"2")])
    })
    .await;
    wait_http(port, "/readyz", None, |a| a.status() == 200).await;
    let om = wait_http(
        port,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
        |a| metric_f64(&a.body, "slipstream_sync_cursor ").is_some_and(|c| c >= 2.0),
    )
    .await;
    assert_eq!(
        om.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.body.ends_with("# EOF\n"));
    assert!(metric_f64(&om.body, "slipstream_sync_swaps_total ").is_some_and(|n| n >= 1.0));
    assert!(metric_f64(&om.body, "slipstream_sync_updates_total ").is_some_and(|n| n >= 2.0));
    assert_eq!(metric_f64(&om.body, "slipstream_sync_ready "), Some(1.0));
    assert!(om.body.contains("slipstream_build_info{"));
    let classic = http_get(port, "/metrics", None).await.unwrap();
    assert_eq!(
        classic.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(
        classic
            .body
            .contains("# TYPE slipstream_sync_swaps_total counter\n")
    );
    assert!(!classic.body.contains("# EOF"));

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let stderr = {
        use std::io::Read;
        let mut s = String::new();
        child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
        s
    };
    assert!(child.wait().unwrap().success(), "{stderr}");
    let mut messages = Vec::new();
    for raw in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let line: serde_json::Value =
            serde_json::from_str(raw).unwrap_or_else(|e| panic!("not JSON ({e}): {raw}"));
        assert!(
            line["level"].is_string() && line["timestamp"].is_string(),
            "{raw}"
        );
        assert_eq!(raw.matches("\"message\":").count(), 1, "{raw}");
        messages.push(line["message"].as_str().unwrap().to_owned());
    }
    assert!(
        messages.iter().any(|m| m == "wrote a new version"),
        "{stderr}"
    );
    assert!(messages.iter().any(|m| m == "not syncing yet"), "{stderr}");
}
