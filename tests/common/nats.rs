//! A real `nats-server` per test: JetStream on, a temp store dir, a free
//! loopback port, killed on drop. It can be killed, stopped, restarted on the
//! same port and store, and paused (SIGSTOP) for fault tests.
//!
//! The binary comes from `NATS_SERVER_BIN`, else `PATH`, and must be >= 2.11
//! (per-key TTL and limit markers); `make tools` installs a pinned one.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use super::util::free_port;

const MIN_VERSION: (u64, u64) = (2, 11);
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The nats-server binary to run, checked once per process.
pub fn nats_server_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(find_bin) {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

fn find_bin() -> Result<PathBuf, String> {
    let hint = "set NATS_SERVER_BIN or put nats-server on PATH; `make tools` installs nats-server 2.15.1 into .tools/bin";
    let candidate = match std::env::var_os("NATS_SERVER_BIN").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("nats-server"))
                    .find(|p| p.is_file())
            })
            .ok_or_else(|| format!("nats-server not found: {hint}"))?,
    };
    let out = Command::new(&candidate)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}; {hint}", candidate.display()))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let version = parse_version(&text).ok_or_else(|| {
        format!(
            "cannot read the version of {} from {text:?}; {hint}",
            candidate.display()
        )
    })?;
    if (version.0, version.1) < MIN_VERSION {
        return Err(format!(
            "{} is v{}.{}.{}, need >= {}.{}; {hint}",
            candidate.display(),
            version.0,
            version.1,
            version.2,
            MIN_VERSION.0,
            MIN_VERSION.1
        ));
    }
    Ok(candidate)
}

/// "nats-server: v2.15.1" -> (2, 15, 1)
fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next().and_then(|p| p.parse().ok()).unwrap_or(0),
    ))
}

/// A running nats-server owned by one test.
pub struct NatsServer {
    dir: tempfile::TempDir,
    port: u16,
    config: PathBuf,
    child: Option<Child>,
    paused: bool,
}

impl NatsServer {
    /// JetStream on, default limits.
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// Like [`start`](Self::start), with `extra` appended to the top level of
    /// the config file (e.g. `authorization { token: "s3cret" }`).
    pub fn start_with_config(extra: &str) -> Self {
        Self::start_with(extra, "")
    }

    /// `extra` at the top level, `jetstream_extra` inside the `jetstream {}`
    /// block (e.g. `max_memory_store: 1GB`).
    pub fn start_with(extra: &str, jetstream_extra: &str) -> Self {
        nats_server_bin();
        let mut dir = tempfile::Builder::new()
            .prefix("nats-test-")
            .tempdir()
            .expect("temp dir");
        let mut last_err = String::new();
        // A port picked as free can be taken before the server binds it: retry.
        for _ in 0..5 {
            let port = free_port();
            let config = dir.path().join("nats.conf");
            let store = dir.path().join("js");
            let text = format!(
                "listen: \"127.0.0.1:{port}\"\nserver_name: \"test-{port}\"\nlog_file: \"{log}\"\njetstream {{\n  store_dir: \"{store}\"\n  {jetstream_extra}\n}}\n{extra}\n",
                log = dir.path().join("server.log").display(),
                store = store.display(),
            );
            std::fs::write(&config, text).expect("write nats config");
            let mut server = NatsServer {
                dir,
                port,
                config,
                child: None,
                paused: false,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => {
                    last_err = e;
                    dir = server.take_dir();
                }
            }
        }
        panic!("nats-server did not start: {last_err}");
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        self.kill();
        let placeholder = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let stderr = std::fs::File::create(self.dir.path().join("stderr.log"))
            .map_err(|e| format!("create stderr log: {e}"))?;
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|e| format!("spawn nats-server: {e}"))?;
        self.child = Some(child);
        self.paused = false;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let stderr =
                    std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
                self.child = None;
                return Err(format!(
                    "nats-server exited with {status}: {stderr}\n{}",
                    self.log()
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > START_TIMEOUT {
                self.kill();
                return Err(format!(
                    "nats-server did not accept connections within {START_TIMEOUT:?}\n{}",
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (survives kill/stop/restart).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }

    /// A scratch directory removed with the server (for creds, certs, ...).
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: no shutdown, no flush beyond what the OS already has.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                signal(child.id(), "CONT");
            }
            signal(child.id(), "TERM");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    self.paused = false;
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// Starts again on the same port and store (kills a running server first).
    pub fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        // The port may linger briefly; the store lock is released on exit.
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            thread::sleep(Duration::from_millis(250));
        }
        panic!("nats-server did not restart on port {}: {last}", self.port);
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing.
    pub fn pause(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP");
            self.paused = true;
        }
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
            self.paused = false;
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn versions_parse_from_the_version_banner() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.11.0-RC.1"), Some((2, 11, 0)));
        assert_eq!(parse_version("garbage"), None);
    }
}
