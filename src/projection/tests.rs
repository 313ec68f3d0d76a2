//! Table tests of the projection rules.

use super::*;

fn rules(prefixes: &[&str], strip: bool, policy: KeyPolicy) -> ProjectionRules {
    ProjectionRules::new(
        prefixes.iter().map(|s| s.to_string()).collect(),
        strip,
        policy,
    )
    .unwrap()
}

#[test]
fn key_mapping_table() {
    use KeyDecision::{Mapped, NotMine};
    use KeyPolicy::{Escape, Fail};
    let skip = KeyPolicy::Skip;
    let skipped = |s: &str| KeyDecision::Skip(s.into());
    let invalid = |s: &str| KeyDecision::Invalid(s.into());
    let rows: &[(&[&str], bool, KeyPolicy, &str, KeyDecision)] = &[
        (
            &["web."],
            false,
            Escape,
            "web.port",
            Mapped("web.port".into()),
        ),
        (&["web."], true, Escape, "web.port", Mapped("port".into())),
        (&["web."], true, Escape, "api.port", NotMine),
        (
            &["web."],
            true,
            Escape,
            "web.a/b=c",
            Mapped("a_2Fb_3Dc".into()),
        ),
        (&["web."], true, Escape, "web.a_b", Mapped("a__b".into())),
        (
            &["web."],
            true,
            Escape,
            "web.a_2Fb",
            Mapped("a__2Fb".into()),
        ),
        (&["web."], true, Escape, "web.é", Mapped("_C3_A9".into())),
        (&["web."], true, Escape, "web...x", Mapped("_2E.x".into())),
        (&["web."], true, Escape, "web..", Mapped("_2E".into())),
        (
            &["web."],
            true,
            Escape,
            "web.",
            skipped("empty after stripping the prefix"),
        ),
        (
            &["web."],
            true,
            skip,
            "web.a/b",
            skipped("character '/' is not allowed (only [-._a-zA-Z0-9])"),
        ),
        (
            &["web."],
            true,
            skip,
            "web.ok-key_1",
            Mapped("ok-key_1".into()),
        ),
        (
            &["web."],
            true,
            Fail,
            "web.a=b",
            invalid("character '=' is not allowed (only [-._a-zA-Z0-9])"),
        ),
        (
            &["web."],
            true,
            Fail,
            "web...",
            invalid("must not be '.', '..' or start with '..'"),
        ),
        // longest prefix wins
        (&["a.", "a.b."], true, Escape, "a.b.c", Mapped("c".into())),
        (&["a.", "a.b."], true, Escape, "a.x", Mapped("x".into())),
        (
            &["a.", "a.b."],
            false,
            Escape,
            "a.b.c",
            Mapped("a.b.c".into()),
        ),
    ];
    for (prefixes, strip, policy, key, want) in rows {
        let got = rules(prefixes, *strip, *policy).map_key(key);
        assert_eq!(&got, want, "{prefixes:?} strip={strip} {policy:?} {key:?}");
    }
}

#[test]
fn escaped_keys_over_253_are_skipped_not_truncated() {
    let long = format!("web.{}", "/".repeat(100));
    let r = rules(&["web."], true, KeyPolicy::Escape);
    assert!(matches!(r.map_key(&long), KeyDecision::Skip(_)));
}

#[test]
fn utf8_goes_to_data_other_bytes_to_binary_data() {
    let r = rules(&["p."], true, KeyPolicy::Escape);
    let out = r
        .project([("p.text", "héllo".as_bytes()), ("p.bin", &[0xff, 0x00][..])])
        .unwrap();
    assert_eq!(out.data["text"], "héllo");
    assert_eq!(out.binary_data["bin"], &[0xff, 0x00][..]);
    assert_eq!(out.keys, 2);
    assert_eq!(out.bytes, "héllo".len() + 2);
}

#[test]
fn skip_policy_lists_skipped_keys_sorted() {
    let r = rules(&["p."], true, KeyPolicy::Skip);
    let out = r
        .project([("p.z/1", &b"1"[..]), ("p.ok", b"2"), ("p.a=1", b"3")])
        .unwrap();
    assert_eq!(out.skipped, ["p.a=1", "p.z/1"]);
    assert_eq!(out.data.keys().collect::<Vec<_>>(), ["ok"]);
}

#[test]
fn fail_policy_refuses_the_whole_content() {
    let r = rules(&["p."], true, KeyPolicy::Fail);
    let err = r
        .project([("p.ok", &b"1"[..]), ("p.a/b", b"2")])
        .unwrap_err();
    assert_eq!(err.reason(), "InvalidKey");
    assert!(err.to_string().contains("p.a/b"));
}

#[test]
fn colliding_keys_name_both_kv_keys() {
    let r = rules(&["a.", "b."], true, KeyPolicy::Escape);
    let err = r.project([("b.x", &b"1"[..]), ("a.x", b"2")]).unwrap_err();
    assert_eq!(
        err,
        ProjectionError::KeyCollision {
            configmap_key: "x".into(),
            first: "a.x".into(),
            second: "b.x".into()
        }
    );
}

#[test]
fn content_over_one_mebibyte_is_too_large_and_exactly_at_limit_is_fine() {
    let r = rules(&["p."], false, KeyPolicy::Escape);
    let half = vec![b'x'; MAX_CONFIGMAP_BYTES / 2];
    assert!(r.project([("p.a", &half[..]), ("p.b", &half[..])]).is_ok());
    let err = r
        .project([("p.a", &half[..]), ("p.b", &half[..]), ("p.c", b"!")])
        .unwrap_err();
    assert_eq!(err.reason(), "TooLarge");
    let one = vec![0xffu8; MAX_CONFIGMAP_BYTES + 1];
    let err = r.project([("p.big", &one[..])]).unwrap_err();
    assert!(matches!(err, ProjectionError::TooLarge { largest_key, .. } if largest_key == "p.big"));
}

#[test]
fn keys_outside_the_prefixes_are_ignored() {
    let r = rules(&["p."], false, KeyPolicy::Escape);
    let out = r.project([("q.a", &b"1"[..]), ("p", b"2")]).unwrap();
    assert_eq!(out, Projected::default());
}

#[test]
fn invertible_rules_rebuild_kv_keys_from_configmap_keys() {
    let cases = [
        (rules(&["web."], true, KeyPolicy::Escape), "web.a/b_c"),
        (rules(&["a.", "b."], false, KeyPolicy::Escape), "b.x=1"),
        (rules(&["a."], false, KeyPolicy::Skip), "a.plain"),
    ];
    for (r, kv) in cases {
        let KeyDecision::Mapped(cm) = r.map_key(kv) else {
            panic!("{kv} not mapped")
        };
        assert_eq!(r.kv_key_of(&cm).as_deref(), Some(kv));
    }
    let r = rules(&["a.", "b."], true, KeyPolicy::Escape);
    assert!(!r.is_invertible());
    assert_eq!(r.kv_key_of("x"), None);
    // a ConfigMap key this binding would not produce maps to nothing
    assert_eq!(
        rules(&["web."], false, KeyPolicy::Escape).kv_key_of("api.x"),
        None
    );
}

#[test]
fn sources_map_stripped_keys_of_several_prefixes_back() {
    let r = rules(&["a.", "b.", "b.x."], true, KeyPolicy::Escape);
    let kv = ["a.k/1", "b.j", "b.x.j2"];
    let text = r.sources(kv).unwrap();
    assert_eq!(text, r#"{"a.":["k_2F1"],"b.":["j"],"b.x.":["j2"]}"#);
    let mut back = r.parse_sources(&text).unwrap();
    back.sort();
    assert_eq!(
        back,
        [
            ("j".to_string(), "b.j".to_string()),
            ("j2".into(), "b.x.j2".into()),
            ("k_2F1".into(), "a.k/1".into()),
        ]
    );
    // a key listed under a prefix that does not produce it is refused
    assert_eq!(r.parse_sources(r#"{"b.":["x.j2"]}"#), None);
    assert_eq!(r.parse_sources(r#"{"c.":["j"]}"#), None);
    assert_eq!(r.parse_sources("not json"), None);
}

#[test]
fn sources_of_tens_of_thousands_of_keys_fit_and_map_back() {
    let r = rules(&["a.", "b."], true, KeyPolicy::Escape);
    let keys: Vec<String> = (0..30_000)
        .map(|i| format!("{}service.setting-{i:06}", ["a.", "b."][i % 2]))
        .collect();
    let text = r.sources(keys.iter().map(String::as_str)).unwrap();
    assert!(text.len() <= MAX_SOURCES_BYTES, "{}", text.len());
    let mut back: Vec<String> = r
        .parse_sources(&text)
        .unwrap()
        .into_iter()
        .map(|(_, kv)| kv)
        .collect();
    back.sort();
    let mut want = keys.clone();
    want.sort();
    assert_eq!(back, want);
}

#[test]
fn sources_too_large_for_an_annotation_are_left_out() {
    let r = rules(&["p."], false, KeyPolicy::Escape);
    // keys that share nothing but the prefix barely compress
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let keys: Vec<String> = (0..40_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("p.{x:016x}")
        })
        .collect();
    assert_eq!(r.sources(keys.iter().map(String::as_str)), None);
    assert!(r.sources(keys[..100].iter().map(String::as_str)).is_some());
}

#[test]
fn spec_validation_table() {
    let ok: ConfigBindingSpec = serde_yaml::from_str("bucket: app\nprefixes: [a.]").unwrap();
    let cases: &[(&str, Option<&str>)] = &[
        ("bucket: app\nprefixes: [a., b.]", None),
        (
            "bucket: 'bad.name'\nprefixes: [a.]",
            Some("InvalidBucketName"),
        ),
        ("bucket: ''\nprefixes: [a.]", Some("InvalidBucketName")),
        ("bucket: app\nprefixes: []", Some("InvalidPrefixes")),
        ("bucket: app\nprefixes: ['']", Some("InvalidPrefixes")),
        ("bucket: app\nprefixes: [a., a.]", Some("InvalidPrefixes")),
        (
            "bucket: app\nprefixes: [a.]\ntarget: {name: Bad_Name}",
            Some("InvalidTargetName"),
        ),
    ];
    assert!(ProjectionRules::from_spec(&ok).is_ok());
    for (yaml, want) in cases {
        let spec: ConfigBindingSpec = serde_yaml::from_str(yaml).unwrap();
        let got = ProjectionRules::from_spec(&spec)
            .err()
            .map(|e| e.reason().as_str());
        assert_eq!(got, *want, "{yaml}");
    }
    let many: Vec<String> = (0..33).map(|i| format!("p{i}.")).collect();
    assert_eq!(
        ProjectionRules::new(many, false, KeyPolicy::Escape),
        Err(SpecError::TooManyPrefixes(33))
    );
}

#[test]
fn overlapping_prefixes_are_reported() {
    let r = rules(&["a.", "a.b.", "c."], true, KeyPolicy::Escape);
    assert_eq!(r.overlaps(), [("a.".to_string(), "a.b.".to_string())]);
}
