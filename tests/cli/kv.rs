//! `slipstream kv` through the real binary.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::{BIN, common::NatsServer, slipstream, slipstream_ok};

fn kv_args<'a>(url: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["kv", "--nats", url, "--bucket", "app"];
    args.extend_from_slice(rest);
    args
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}

#[test]
fn kv_creates_a_bucket_and_puts_gets_lists_and_deletes_keys() {
    let server = NatsServer::start();
    let url = server.url();
    let kv = |rest: &[&str]| text(slipstream_ok(&kv_args(&url, rest), None));

    assert_eq!(kv(&["create-bucket"]), "bucket app ready\n");
    assert_eq!(kv(&["create-bucket"]), "bucket app ready\n", "idempotent");
    let r1: u64 = kv(&["put", "web.a", "1"]).trim().parse().unwrap();
    let r2: u64 = kv(&["put", "web.b", "2"]).trim().parse().unwrap();
    assert!(r2 > r1, "put prints increasing revisions");
    kv(&["put", "api.c", "3"]);

    assert_eq!(kv(&["get", "web.a"]), "1", "value exactly as stored");
    assert_eq!(kv(&["ls", "web."]), "web.a\nweb.b\n");
    assert_eq!(kv(&["ls"]), "api.c\nweb.a\nweb.b\n");

    kv(&["del", "web.a"]);
    assert_eq!(kv(&["ls", "web."]), "web.b\n");
    let out = slipstream(&kv_args(&url, &["get", "web.a"]), None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[test]
fn kv_watch_prints_the_current_state_then_live_changes() {
    let server = NatsServer::start();
    let url = server.url();
    slipstream_ok(&kv_args(&url, &["create-bucket"]), None);
    slipstream_ok(&kv_args(&url, &["put", "web.a", "1"]), None);

    let mut child = Command::new(BIN)
        .args(kv_args(&url, &["watch", "web."]))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let next = || rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(next().starts_with("PUT web.a @"), "current value first");
    assert!(next().starts_with("-- synced at "));
    slipstream_ok(&kv_args(&url, &["put", "web.b", "two"]), None);
    slipstream_ok(&kv_args(&url, &["put", "api.x", "not shown"]), None);
    slipstream_ok(&kv_args(&url, &["del", "web.a"]), None);
    let put = next();
    assert!(
        put.starts_with("PUT web.b @") && put.ends_with(" two"),
        "{put}"
    );
    assert!(next().starts_with("DEL web.a @"));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn kv_against_a_missing_bucket_says_so() {
    let server = NatsServer::start();
    let out = slipstream(&kv_args(&server.url(), &["ls"]), None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("opening bucket \"app\""), "{stderr}");
}

#[test]
fn kv_history_purge_info_and_cas_update() {
    let server = NatsServer::start();
    let url = server.url();
    let kv = |rest: &[&str]| text(slipstream_ok(&kv_args(&url, rest), None));
    kv(&["create-bucket", "--history", "5"]);

    // info on the empty bucket: its settings, no revisions yet
    let info = kv(&["info"]);
    for line in [
        "bucket: app\n",
        "history: 5\n",
        "max_age: forever\n",
        "storage: file\n",
        "replicas: 1\n",
        "keys: 0\n",
        "first_revision: -\n",
        "last_revision: -",
    ] {
        assert!(info.contains(line), "{line:?} missing in\n{info}");
    }

    let r1 = kv(&["put", "web.a", "one"]);
    let r2 = kv(&["put", "web.a", "two"]);
    kv(&["put", "web.b", "x"]);
    let r4 = kv(&["del", "web.a"]);
    let history = kv(&["history", "web.a"]);
    let want = format!(
        "PUT web.a @{} one\nPUT web.a @{} two\nDEL web.a @{}\n",
        r1.trim(),
        r2.trim(),
        r4.trim()
    );
    assert_eq!(history, want);
    let info = kv(&["info"]);
    assert!(info.contains("keys: 2\n"), "{info}");
    assert!(info.contains("records: 4\n"), "{info}");
    assert!(info.contains("first_revision: 1\n"), "{info}");
    assert!(
        info.contains(&format!("last_revision: {}", r4.trim())),
        "{info}"
    );

    // CAS: the right revision writes, a stale one is refused and says where the key is
    assert_eq!(kv(&["get", "web.b"]), "x");
    let hist_b = kv(&["history", "web.b"]);
    let b_at = hist_b
        .split('@')
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    let new = kv(&["update", "web.b", "y", "--revision", &b_at]);
    assert!(new.trim().parse::<u64>().unwrap() > r4.trim().parse().unwrap());
    assert_eq!(kv(&["get", "web.b"]), "y");
    let stale = slipstream(
        &kv_args(&url, &["update", "web.b", "z", "--revision", &b_at]),
        None,
    );
    assert!(!stale.status.success());
    let err = String::from_utf8_lossy(&stale.stderr);
    assert!(
        err.contains("refused") && err.contains(&format!("revision {}", new.trim())),
        "{err}"
    );
    assert_eq!(
        kv(&["get", "web.b"]),
        "y",
        "a refused update writes nothing"
    );
    // --revision 0: only when the key has no live value
    kv(&["update", "web.new", "fresh", "--revision", "0"]);
    let taken = slipstream(
        &kv_args(&url, &["update", "web.new", "again", "--revision", "0"]),
        None,
    );
    assert!(!taken.status.success());

    // purge: one marker left, older records gone
    let purged = kv(&["purge", "web.a"]);
    let history = kv(&["history", "web.a"]);
    assert_eq!(history, format!("PURGE web.a @{}\n", purged.trim()));
    assert_eq!(kv(&["ls", "web."]), "web.b\nweb.new\n");

    let none = slipstream(&kv_args(&url, &["history", "never.written"]), None);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no record"));
}

#[test]
fn kv_global_flags_may_follow_the_verb_and_a_missing_bucket_flag_is_named() {
    let server = NatsServer::start();
    let url = server.url();
    slipstream_ok(
        &["kv", "create-bucket", "--nats", &url, "--bucket", "late"],
        None,
    );
    slipstream_ok(
        &["kv", "put", "k", "v", "--bucket", "late", "--nats", &url],
        None,
    );
    let got = slipstream_ok(
        &["kv", "--nats", &url, "get", "--bucket", "late", "k"],
        None,
    );
    assert_eq!(text(got), "v");
    let out = slipstream(&["kv", "--nats", &url, "ls"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--bucket"), "{err}");
}
