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
mod tests;
