//! Tests of the directory sink's layout and swaps, on a temporary directory.

use super::*;

fn files(pairs: &[(&str, &[u8])]) -> BTreeMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
        .collect()
}

fn entries(root: &Path) -> BTreeSet<String> {
    fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn first_write_lays_out_a_kubelet_style_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = DirSink::open(tmp.path().join("config")).unwrap();
    assert_eq!(sink.read().unwrap(), None);

    let w = sink
        .write(&files(&[("a", b"1"), ("b.txt", b"two")]), b"s1")
        .unwrap();
    let Written::Swapped(version) = w else {
        panic!("expected a swap, got {w:?}")
    };
    assert!(is_version_name(&version), "{version}");
    let root = sink.root();
    assert_eq!(
        fs::read_link(root.join(DATA_LINK)).unwrap(),
        Path::new(&version)
    );
    assert_eq!(
        fs::read_link(root.join("a")).unwrap(),
        Path::new("..data/a")
    );
    assert_eq!(fs::read(root.join("b.txt")).unwrap(), b"two");
    assert_eq!(
        entries(root),
        ["..data", "a", "b.txt", version.as_str()]
            .map(String::from)
            .into()
    );
    let mode = fs::metadata(root.join("a")).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o644
    );
    assert_eq!(
        sink.read().unwrap(),
        Some(DirContent {
            files: files(&[("a", b"1"), ("b.txt", b"two")]),
            state: Some(b"s1".to_vec())
        })
    );
}

#[test]
fn next_write_swaps_versions_adds_and_removes_keys_and_deletes_the_old_version() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = DirSink::open(tmp.path()).unwrap();
    let Written::Swapped(v1) = sink
        .write(&files(&[("a", b"1"), ("b", b"2")]), b"s1")
        .unwrap()
    else {
        panic!()
    };
    let Written::Swapped(v2) = sink
        .write(&files(&[("b", b"3"), ("c", b"4")]), b"s2")
        .unwrap()
    else {
        panic!()
    };
    assert_ne!(v1, v2);
    assert_eq!(
        entries(tmp.path()),
        ["..data", "b", "c", v2.as_str()].map(String::from).into()
    );
    assert_eq!(fs::read(tmp.path().join("b")).unwrap(), b"3");
    assert_eq!(fs::read(tmp.path().join("c")).unwrap(), b"4");
}

#[test]
fn value_only_updates_keep_one_version_and_every_link() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = DirSink::open(tmp.path()).unwrap();
    let mut last = String::new();
    for i in 0..5u8 {
        let Written::Swapped(v) = sink
            .write(&files(&[("a", &[i]), ("b", &[i])]), b"")
            .unwrap()
        else {
            panic!()
        };
        last = v;
    }
    assert_eq!(
        entries(tmp.path()),
        ["..data", "a", "b", last.as_str()].map(String::from).into()
    );
    assert_eq!(fs::read(tmp.path().join("b")).unwrap(), [4]);
    // A key change after value-only updates still links and unlinks.
    let Written::Swapped(v) = sink
        .write(&files(&[("a", b"x"), ("c", b"y")]), b"")
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        entries(tmp.path()),
        ["..data", "a", "c", v.as_str()].map(String::from).into()
    );
}

#[test]
fn unchanged_files_write_nothing_and_a_new_state_is_replaced_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = DirSink::open(tmp.path()).unwrap();
    let content = files(&[("a", b"1")]);
    let Written::Swapped(v1) = sink.write(&content, b"s1").unwrap() else {
        panic!()
    };
    assert_eq!(sink.write(&content, b"s1").unwrap(), Written::Unchanged);
    assert_eq!(sink.write(&content, b"s2").unwrap(), Written::StateOnly);
    assert_eq!(
        fs::read_link(tmp.path().join(DATA_LINK)).unwrap(),
        Path::new(&v1)
    );
    // A fresh sink (a restart) sees the same version and state.
    let mut reopened = DirSink::open(tmp.path()).unwrap();
    assert_eq!(
        reopened.read().unwrap().unwrap().state,
        Some(b"s2".to_vec())
    );
    assert_eq!(reopened.write(&content, b"s2").unwrap(), Written::Unchanged);
}

#[test]
fn a_durable_sink_writes_the_same_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = DirSink::open(tmp.path()).unwrap().durable(true);
    sink.write(&files(&[("a", b"1")]), b"s1").unwrap();
    assert_eq!(
        sink.write(&files(&[("a", b"1")]), b"s2").unwrap(),
        Written::StateOnly
    );
    sink.write(&files(&[("b", b"2")]), b"s3").unwrap();
    assert_eq!(
        sink.read().unwrap(),
        Some(DirContent {
            files: files(&[("b", b"2")]),
            state: Some(b"s3".to_vec())
        })
    );
}

#[test]
fn binary_values_are_written_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = DirSink::open(tmp.path()).unwrap();
    let blob: Vec<u8> = (0..=255u8).chain([0, 0xff, 0xfe]).collect();
    sink.write(&files(&[("bin", &blob), ("empty", b"")]), b"")
        .unwrap();
    assert_eq!(fs::read(tmp.path().join("bin")).unwrap(), blob);
    assert_eq!(fs::read(tmp.path().join("empty")).unwrap(), b"");
}

#[test]
fn an_empty_set_still_gets_a_data_link() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = DirSink::open(tmp.path()).unwrap();
    assert!(matches!(
        sink.write(&BTreeMap::new(), b"s").unwrap(),
        Written::Swapped(_)
    ));
    assert_eq!(
        sink.read().unwrap(),
        Some(DirContent {
            files: BTreeMap::new(),
            state: Some(b"s".to_vec())
        })
    );
}

#[test]
fn names_that_escape_or_clash_with_the_layout_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = DirSink::open(tmp.path()).unwrap();
    for bad in ["", ".", "..", "..data", "..x", "a/b", "../up", "nul\0"] {
        let err = sink.write(&files(&[(bad, b"x")]), b"").unwrap_err();
        assert!(matches!(err, Error::InvalidName(_)), "{bad:?}: {err}");
    }
    assert!(entries(tmp.path()).is_empty(), "nothing written");
    for good in [".hidden", "a..b", "-x", "A_b.c"] {
        sink.write(&files(&[(good, b"x")]), b"").unwrap();
    }
}

#[test]
fn a_foreign_file_where_a_key_goes_is_left_alone_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("a"), b"mine").unwrap();
    let mut sink = DirSink::open(tmp.path()).unwrap();
    let err = sink.write(&files(&[("a", b"1")]), b"").unwrap_err();
    assert!(matches!(err, Error::Occupied(_)), "{err}");
    assert_eq!(fs::read(tmp.path().join("a")).unwrap(), b"mine");
    assert!(!tmp.path().join(DATA_LINK).exists());
    // Unrelated files survive normal writes too.
    sink.write(&files(&[("b", b"1")]), b"").unwrap();
    sink.write(&files(&[("c", b"1")]), b"").unwrap();
    assert_eq!(fs::read(tmp.path().join("a")).unwrap(), b"mine");
}

#[test]
fn leftovers_of_a_crash_are_cleaned_and_lost_links_repaired() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut sink = DirSink::open(root).unwrap();
    sink.write(&files(&[("a", b"1")]), b"").unwrap();
    // A crash after creating a version dir and ..data_tmp, before the
    // rename; and a per-key link that was never made.
    fs::create_dir(root.join("..2020_01_01_00_00_00.000000001")).unwrap();
    symlink("..2020_01_01_00_00_00.000000001", root.join(DATA_TMP_LINK)).unwrap();
    fs::remove_file(root.join("a")).unwrap();

    let mut restarted = DirSink::open(root).unwrap();
    let Written::Swapped(v) = restarted.write(&files(&[("a", b"2")]), b"").unwrap() else {
        panic!()
    };
    assert_eq!(
        entries(root),
        ["..data", "a", v.as_str()].map(String::from).into()
    );
    assert_eq!(fs::read(root.join("a")).unwrap(), b"2");
}

#[test]
fn version_names_sort_by_time_and_are_recognised() {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(1_795_698_619_000_000_042).unwrap();
    assert_eq!(version_name(t, 0), "..2026_11_26_13_10_19.000000042");
    assert_eq!(version_name(t, 1), "..2026_11_26_13_10_19.000000043");
    assert!(is_version_name(&version_name(t, 0)));
    for not in [
        "..data",
        "..data_tmp",
        "..slipstream-state",
        "a",
        "..2026_11_26.1",
    ] {
        assert!(!is_version_name(not), "{not}");
    }
}
