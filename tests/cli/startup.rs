//! `slipstream run` and `slipstream sync` refuse bad start-up input at once,
//! with a message that names it, instead of starting half-way and retrying
//! forever.

use std::{
    io::Read,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::BIN;

/// Long enough for a start-up check, far shorter than "runs forever".
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// A kubeconfig whose server never answers: a `run` that got past its
/// start-up checks keeps retrying it, so it never exits by itself.
fn dead_kubeconfig(dir: &Path) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n\
         users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n\
         current-context: x\n",
    )
    .unwrap();
    path
}

/// Runs `slipstream ARGS`; `Some(stderr)` when it exited with a failure
/// within [`EXIT_WITHIN`], `None` when it was still running (then killed).
fn exits_with_error(args: &[&str]) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(args)
        .env("KUBECONFIG", dead_kubeconfig(dir.path()))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > EXIT_WITHIN {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = status?;
    assert!(!status.success(), "run exited 0: {stderr}");
    Some(stderr)
}

fn assert_exits_naming(args: &[&str], wants: &[&str]) {
    let stderr = exits_with_error(args)
        .unwrap_or_else(|| panic!("slipstream {args:?} still running after {EXIT_WITHIN:?}"));
    for want in wants {
        assert!(
            stderr.contains(want),
            "slipstream {args:?}: stderr lacks {want:?}:\n{stderr}"
        );
    }
}

#[test]
fn metrics_addr_in_use_is_an_error_at_start() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_exits_naming(
        &[
            "run",
            "--nats",
            "nats://127.0.0.1:9",
            "--metrics-addr",
            &addr,
        ],
        &["--metrics-addr", &addr, "in use"],
    );
}

#[test]
fn malformed_nats_urls_are_an_error_at_start() {
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = free.local_addr().unwrap().to_string();
    drop(free);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    for url in [
        "not-a-url",
        "http://127.0.0.1:4222",
        "nats://127.0.0.1:99999",
    ] {
        assert_exits_naming(
            &["run", "--nats", url, "--metrics-addr", &metrics],
            &["NATS URL", url],
        );
        // A long-running sync waits for NATS to appear, never for a typo.
        assert_exits_naming(
            &[
                "sync", "--nats", url, "--bucket", "b", "--prefix", "a.", "--dir", &out,
            ],
            &["NATS URL", url],
        );
    }
}

#[test]
fn policy_file_typos_are_an_error_at_start_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        (
            "namespace:\n  shop: []\n",
            "unknown field `namespace`",
            "line 1",
        ),
        (
            "namespaces:\n  shop:\n    - bucket: app\n      prefix: [web.]\n",
            "unknown field `prefix`",
            "line 4",
        ),
        (
            "namespaces:\n  shop:\n    - {bucket: 'bad name!', prefixes: [a.]}\n",
            "invalid bucket name",
            "line 3",
        ),
    ];
    for (i, (yaml, says, line)) in rows.into_iter().enumerate() {
        let path = dir.path().join(format!("policy-{i}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let path = path.display().to_string();
        assert_exits_naming(
            &[
                "run",
                "--nats",
                "nats://127.0.0.1:9",
                "--metrics-addr",
                "127.0.0.1:0",
                "--policy-file",
                &path,
            ],
            &[&path, says, line],
        );
    }
}
