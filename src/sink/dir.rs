//! Directory sink: projected content written the way the kubelet lays out a
//! ConfigMap volume, so a reader never sees a half-written set.
//!
//! ```text
//! DIR/
//!   ..2026_11_26_13_10_19.123456789/   one complete version (files + state)
//!     greeting
//!     ..slipstream-state               what `slipstream sync` needs to resume
//!   ..data -> ..2026_11_26_13_10_19.123456789
//!   greeting -> ..data/greeting        user-visible, one per key
//! ```
//!
//! A write builds a new timestamped directory, then swaps `..data` to it with
//! one `rename` of a fresh `..data_tmp` symlink (atomic on POSIX), then adds
//! and removes the per-key symlinks and deletes the previous version. Each
//! file read through a per-key symlink is always complete; a reader that
//! wants several files from one version resolves `..data` once and reads
//! inside that directory (retrying if it was removed meanwhile).
//!
//! The state blob lives inside the timestamped directory, so content and the
//! cursor it reflects change in the same rename. Names starting with `..` are
//! never valid keys (ConfigMap keys cannot start with `..` either), so they
//! cannot clash with the layout.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, symlink},
    path::{Path, PathBuf},
};

/// The symlink naming the current version.
pub const DATA_LINK: &str = "..data";
/// Where the next `..data` is prepared before the atomic rename.
const DATA_TMP_LINK: &str = "..data_tmp";
/// The state blob inside each version.
pub const STATE_FILE: &str = "..slipstream-state";
const STATE_TMP_FILE: &str = "..slipstream-state.tmp";
/// Mode of written files (the kubelet's default for ConfigMap volumes).
const FILE_MODE: u32 = 0o644;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "invalid file name {0:?}: must be non-empty, without '/', and not start with '..' or be '.'"
    )]
    InvalidName(String),
    #[error("{0} exists and is not a symlink this sink made; refusing to replace it")]
    Occupied(PathBuf),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Io { .. } => "IoError",
            Error::InvalidName(_) => "InvalidKey",
            Error::Occupied(_) => "TargetConflict",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// One complete version of the directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirContent {
    pub files: BTreeMap<String, Vec<u8>>,
    /// The state blob written with these files, if any.
    pub state: Option<Vec<u8>>,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Files and state were already as asked: nothing touched.
    Unchanged,
    /// Files unchanged; only the state blob was replaced (atomically, in place).
    StateOnly,
    /// A new version was swapped in; its directory name.
    Swapped(String),
}

/// Writes versions of a file set into one directory. One writer per
/// directory; any number of readers.
///
/// Readers are protected by the rename alone. Durability against a power
/// loss is opt-in ([`DirSink::durable`]): each fsync costs milliseconds on
/// ordinary disks, and a caller can instead verify a version on restart
/// (`slipstream sync` stores a checksum per file and resyncs on mismatch).
#[derive(Debug)]
pub struct DirSink {
    root: PathBuf,
    /// fsync files and directories before and after the swap.
    durable: bool,
    /// This sink made every per-key symlink of the current version and
    /// removed leftovers, so only the previous version needs removing.
    tidy: bool,
    /// The last version written or read, to skip writes that change nothing.
    current: Option<DirContent>,
}

impl DirSink {
    /// Opens `root`, creating it when missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_err("create directory", &root))?;
        Ok(Self {
            root,
            durable: false,
            tidy: false,
            current: None,
        })
    }

    /// With `true`, every version is on disk before `..data` points at it,
    /// and the swap itself is on disk before `write` returns.
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The current version, `None` when nothing was written yet.
    pub fn read(&self) -> Result<Option<DirContent>> {
        let Some(version) = self.current_version()? else {
            return Ok(None);
        };
        let dir = self.root.join(&version);
        let mut content = DirContent::default();
        for entry in fs::read_dir(&dir).map_err(io_err("read directory", &dir))? {
            let entry = entry.map_err(io_err("read directory", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name == STATE_FILE {
                content.state = Some(fs::read(&path).map_err(io_err("read", &path))?);
            } else if !name.starts_with("..") {
                let bytes = fs::read(&path).map_err(io_err("read", &path))?;
                content.files.insert(name, bytes);
            }
        }
        Ok(Some(content))
    }

    /// Makes `files` (name -> bytes) and `state` the directory's content,
    /// as one atomic step for readers. Nothing is written when both are
    /// already current; a state-only change replaces just the state blob.
    pub fn write(&mut self, files: &BTreeMap<String, Vec<u8>>, state: &[u8]) -> Result<Written> {
        if self.current.is_none() {
            self.current = self.read()?;
        }
        // Same keys as a version this sink already linked and cleaned up
        // after: only the version directory changes (the common case of a
        // value update), so skip the per-key symlink and leftover scans.
        let same_keys = self.tidy
            && self
                .current
                .as_ref()
                .is_some_and(|c| c.files.keys().eq(files.keys()));
        for name in files.keys() {
            check_name(name)?;
            if !same_keys {
                self.check_not_occupied(name)?;
            }
        }
        let previous = self.current_version()?;
        if let (Some(cur), Some(version)) = (&self.current, &previous)
            && cur.files == *files
        {
            if cur.state.as_deref() == Some(state) {
                return Ok(Written::Unchanged);
            }
            self.replace_state(version, state)?;
            self.current = Some(DirContent {
                files: files.clone(),
                state: Some(state.to_vec()),
            });
            return Ok(Written::StateOnly);
        }

        let version = self.write_version(files, state)?;
        self.swap_data_link(&version)?;
        if same_keys {
            if let Some(prev) = previous.filter(|p| *p != version && is_version_name(p)) {
                let path = self.root.join(prev);
                fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
            }
        } else {
            self.link_keys(files)?;
            self.unlink_gone_keys(files)?;
            self.remove_old_versions(&version)?;
            self.tidy = true;
        }
        self.current = Some(DirContent {
            files: files.clone(),
            state: Some(state.to_vec()),
        });
        Ok(Written::Swapped(version))
    }

    /// The directory `..data` points to, if any.
    fn current_version(&self) -> Result<Option<String>> {
        let link = self.root.join(DATA_LINK);
        match fs::read_link(&link) {
            Ok(target) => Ok(Some(target.to_string_lossy().into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read symlink", &link)(e)),
        }
    }

    /// A regular file or directory where a per-key symlink should go.
    fn check_not_occupied(&self, name: &str) -> Result<()> {
        let path = self.root.join(name);
        match fs::symlink_metadata(&path) {
            Ok(m) if !m.file_type().is_symlink() => Err(Error::Occupied(path)),
            _ => Ok(()),
        }
    }

    /// Creates a fresh timestamped directory holding `files` and `state`
    /// (synced to disk when durable).
    fn write_version(&self, files: &BTreeMap<String, Vec<u8>>, state: &[u8]) -> Result<String> {
        let now = time::OffsetDateTime::now_utc();
        let (name, dir) = (0u32..1000)
            .find_map(|bump| {
                let name = version_name(now, bump);
                let dir = self.root.join(&name);
                match fs::create_dir(&dir) {
                    Ok(()) => Some(Ok((name, dir))),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
                    Err(e) => Some(Err(io_err("create directory", &dir)(e))),
                }
            })
            .unwrap_or_else(|| {
                Err(Error::Io {
                    op: "create a unique version directory in",
                    path: self.root.clone(),
                    source: io::ErrorKind::AlreadyExists.into(),
                })
            })?;
        for (file, bytes) in files {
            write_file(&dir.join(file), bytes, self.durable)?;
        }
        write_file(&dir.join(STATE_FILE), state, self.durable)?;
        if self.durable {
            sync_dir(&dir)?;
        }
        Ok(name)
    }

    /// Points `..data` at `version` with one atomic rename.
    fn swap_data_link(&self, version: &str) -> Result<()> {
        let tmp = self.root.join(DATA_TMP_LINK);
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove stale", &tmp)(e)),
        }
        symlink(version, &tmp).map_err(io_err("create symlink", &tmp))?;
        let data = self.root.join(DATA_LINK);
        fs::rename(&tmp, &data).map_err(io_err("rename into place", &data))?;
        if self.durable {
            sync_dir(&self.root)?;
        }
        Ok(())
    }

    /// Replaces the state blob of the current version in place (atomic rename).
    fn replace_state(&self, version: &str, state: &[u8]) -> Result<()> {
        let dir = self.root.join(version);
        let tmp = dir.join(STATE_TMP_FILE);
        let _ = fs::remove_file(&tmp);
        write_file(&tmp, state, self.durable)?;
        let dest = dir.join(STATE_FILE);
        fs::rename(&tmp, &dest).map_err(io_err("rename into place", &dest))?;
        if self.durable {
            sync_dir(&dir)?;
        }
        Ok(())
    }

    /// `key -> ..data/key` for every key (also repairs links lost in a crash).
    fn link_keys(&self, files: &BTreeMap<String, Vec<u8>>) -> Result<()> {
        for name in files.keys() {
            let path = self.root.join(name);
            if fs::symlink_metadata(&path).is_err() {
                symlink(Path::new(DATA_LINK).join(name), &path)
                    .map_err(io_err("create symlink", &path))?;
            }
        }
        Ok(())
    }

    /// Removes per-key symlinks into `..data` whose key is gone.
    fn unlink_gone_keys(&self, files: &BTreeMap<String, Vec<u8>>) -> Result<()> {
        let keep: BTreeSet<&str> = files.keys().map(String::as_str).collect();
        for entry in fs::read_dir(&self.root).map_err(io_err("read directory", &self.root))? {
            let entry = entry.map_err(io_err("read directory", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("..") || keep.contains(name.as_str()) {
                continue;
            }
            let path = entry.path();
            let ours = fs::read_link(&path)
                .is_ok_and(|t| t.starts_with(DATA_LINK) && t.components().count() == 2);
            if ours {
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(())
    }

    /// Deletes every version directory except `keep` (the previous one, and
    /// any left behind by a crash).
    fn remove_old_versions(&self, keep: &str) -> Result<()> {
        for entry in fs::read_dir(&self.root).map_err(io_err("read directory", &self.root))? {
            let entry = entry.map_err(io_err("read directory", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && name != keep && is_version_name(&name) {
                let path = entry.path();
                fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(())
    }
}

/// `..YYYY_MM_DD_HH_MM_SS.NNNNNNNNN` (UTC), `bump` added to the nanoseconds
/// to stay unique within one nanosecond.
fn version_name(now: time::OffsetDateTime, bump: u32) -> String {
    format!(
        "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        u64::from(now.nanosecond()) + u64::from(bump),
    )
}

/// True for names `version_name` makes.
fn is_version_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("..") else {
        return false;
    };
    let Some((stamp, nanos)) = rest.split_once('.') else {
        return false;
    };
    let parts: Vec<&str> = stamp.split('_').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && !nanos.is_empty()
        && nanos.bytes().all(|b| b.is_ascii_digit())
}

fn check_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name == "."
        || name.starts_with("..")
        || name.contains('/')
        || name.contains('\0');
    if bad {
        return Err(Error::InvalidName(name.to_owned()));
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(io_err("create", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    if durable {
        f.sync_data().map_err(io_err("sync", path))?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

#[cfg(test)]
mod tests {
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
}
