//! Small helpers shared by tests and benchmarks.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    time::Duration,
};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("local addr").port()
}

/// The `p`-quantile (0.0..=1.0) of an ascending sample; zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// A test tool (`helm`, `kubectl`, ...) from PATH, else from `.tools/bin`
/// (`make tools` installs it there); panics with that hint when neither has it.
pub fn tool(name: &str) -> PathBuf {
    let in_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    let tools = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".tools/bin")
        .join(name);
    in_path
        .or_else(|| tools.is_file().then_some(tools))
        .unwrap_or_else(|| panic!("{name} not found on PATH nor in .tools/bin: run `make tools`"))
}
