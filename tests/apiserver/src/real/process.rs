//! Control-plane processes that never outlive the test process.
//!
//! Each binary runs under a small `sh` guard in its own process group: the
//! guard kills it as soon as the test process is gone (also after a panic,
//! or when the shared control plane lives in a `static` and is never
//! dropped), and dropping a [`Process`] kills the whole group at once.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::Error;

const GUARD: &str = r#"parent=$1; cleanup=$2; shift 2
"$@" &
child=$!
trap 'kill -9 $child 2>/dev/null; exit 0' TERM INT
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done
kill -9 "$child" 2>/dev/null
wait "$child" 2>/dev/null
if [ -n "$cleanup" ] && ! kill -0 "$parent" 2>/dev/null; then rm -rf "$cleanup"; fi
"#;

/// One running binary; killed (with its guard) when dropped.
pub(crate) struct Process {
    pub name: &'static str,
    pub log: PathBuf,
    child: Child,
}

impl Process {
    /// Starts `bin args` with stdout and stderr in `<dir>/<name>.log`.
    /// `cleanup` is removed by the guard once the test process has exited.
    pub(crate) fn spawn(
        name: &'static str,
        bin: &Path,
        args: &[String],
        dir: &Path,
        cleanup: Option<&Path>,
    ) -> Result<Process, Error> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(GUARD)
            .arg(format!("{name}-guard"))
            .arg(std::process::id().to_string())
            .arg(cleanup.map(|p| p.display().to_string()).unwrap_or_default())
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::Other(format!("starting {}: {e}", bin.display())))?;
        Ok(Process { name, log, child })
    }

    /// Whether the binary (or its guard) has exited.
    pub(crate) fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// The last `lines` lines of its log, for error messages.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills the binary and its guard (the whole process group).
    pub(crate) fn kill(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Finds a control-plane binary: `$<ENV>`, then `.tools/bin` of this
/// repository (`make tools` builds it there), then `PATH`.
pub(crate) fn find_binary(name: &str, env: &str) -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin");
    let candidate = tools.join(name);
    if candidate.exists() {
        return Ok(candidate);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(Error::Other(format!(
        "{name} not found: run `make tools` (it builds kube-apiserver, kube-controller-manager \
         and etcd from tools/controlplane with Go), or set {env}"
    )))
}

impl Process {
    /// Process ids of the binary: the children of its guard, but for the
    /// guard's own `sleep`.
    pub(crate) fn pids(&self) -> Vec<u32> {
        let guard = self.child.id();
        std::fs::read_to_string(format!("/proc/{guard}/task/{guard}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() != "sleep")
            })
            .collect()
    }

    /// Resident memory of the binary (the guard's child), in bytes.
    pub(crate) fn rss_bytes(&self) -> u64 {
        self.pids()
            .into_iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .filter_map(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .sum::<u64>()
            * 1024
    }
}
