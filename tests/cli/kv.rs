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
