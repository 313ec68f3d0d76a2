//! Three (or more) nats-servers clustered on loopback: JetStream on, one
//! store dir and one `server_name` (`n0`, `n1`, ...) per node, routes between
//! all of them on free ports, a monitoring port per node for `/healthz`.
//! Each node can be killed (SIGKILL), restarted on the same ports and store,
//! and paused (SIGSTOP) / resumed; every node is killed on drop.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{nats::nats_server_bin, util::free_port};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One node of a [`NatsCluster`].
pub struct ClusterNode {
    name: String,
    dir: tempfile::TempDir,
    client_port: u16,
    monitor_port: u16,
    config: PathBuf,
    child: Option<Child>,
    paused: bool,
}

impl ClusterNode {
    /// The `server_name`, as JetStream reports it (e.g. a stream's leader).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    pub fn port(&self) -> u16 {
        self.client_port
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// SIGKILL: no shutdown, no flush beyond what the OS already has.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// Starts again on the same ports and store (kills a running node first).
    pub fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        // The ports may linger briefly; the store lock is released on exit.
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            thread::sleep(Duration::from_millis(250));
        }
        panic!("{} did not restart: {last}", self.name);
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing.
    pub fn pause(&mut self) {
        if let Some(child) = &self.child {
            signal(child.id(), "STOP");
            self.paused = true;
        }
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&mut self) {
        if let Some(child) = &self.child {
            signal(child.id(), "CONT");
            self.paused = false;
        }
    }

    /// True when `/healthz` answers 200: the node is up and its JetStream
    /// (meta group and assets) is current.
    pub fn healthy(&self) -> bool {
        http_get(self.monitor_port, "/healthz").is_some_and(|(status, _)| status == 200)
    }

    /// The JetStream meta leader as this node sees it (`/jsz`).
    pub fn meta_leader(&self) -> Option<String> {
        let (_, body) = http_get(self.monitor_port, "/jsz")?;
        let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
        jsz["meta_cluster"]["leader"]
            .as_str()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
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
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let stderr =
                    std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
                self.child = None;
                return Err(format!(
                    "{} exited with {status}: {stderr}\n{}",
                    self.name,
                    self.log()
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > START_TIMEOUT {
                self.kill();
                return Err(format!(
                    "{} did not accept connections within {START_TIMEOUT:?}\n{}",
                    self.name,
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A JetStream cluster of nats-servers on loopback, owned by one test.
pub struct NatsCluster {
    pub nodes: Vec<ClusterNode>,
}

impl NatsCluster {
    /// Starts `size` clustered nodes and waits until every one reports
    /// healthy (a JetStream meta leader is elected and all are current).
    pub fn start(size: usize) -> Self {
        nats_server_bin();
        let mut last_err = String::new();
        // A port picked as free can be taken before the server binds it: retry.
        for _ in 0..5 {
            match Self::try_start(size) {
                Ok(cluster) => {
                    cluster.wait_healthy();
                    return cluster;
                }
                Err(e) => last_err = e,
            }
        }
        panic!("nats cluster did not start: {last_err}");
    }

    fn try_start(size: usize) -> Result<Self, String> {
        let ports: Vec<(u16, u16, u16)> = (0..size)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route, _)| format!("\"nats-route://127.0.0.1:{route}\""))
            .collect();
        let mut nodes = Vec::with_capacity(size);
        for (i, (client, route, monitor)) in ports.iter().copied().enumerate() {
            let dir = tempfile::Builder::new()
                .prefix("nats-cluster-test-")
                .tempdir()
                .map_err(|e| format!("temp dir: {e}"))?;
            let name = format!("n{i}");
            let config = dir.path().join("nats.conf");
            let text = format!(
                "server_name: \"{name}\"\nlisten: \"127.0.0.1:{client}\"\nhttp: \"127.0.0.1:{monitor}\"\nlog_file: \"{log}\"\njetstream {{\n  store_dir: \"{store}\"\n}}\ncluster {{\n  name: \"slipstream-test\"\n  listen: \"127.0.0.1:{route}\"\n  routes: [{routes}]\n}}\n",
                log = dir.path().join("server.log").display(),
                store = dir.path().join("js").display(),
                routes = routes.join(", "),
            );
            std::fs::write(&config, text).map_err(|e| format!("write nats config: {e}"))?;
            nodes.push(ClusterNode {
                name,
                dir,
                client_port: client,
                monitor_port: monitor,
                config,
                child: None,
                paused: false,
            });
        }
        for node in &mut nodes {
            node.spawn()?;
        }
        Ok(NatsCluster { nodes })
    }

    /// Every node's URL, comma-separated: what a client of the whole
    /// cluster is given.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(ClusterNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node with this `server_name`.
    pub fn node(&mut self, name: &str) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no cluster node named {name:?}"))
    }

    /// The JetStream meta leader, as the first running, unpaused node sees it.
    pub fn meta_leader(&self) -> Option<String> {
        self.nodes
            .iter()
            .filter(|n| n.is_running() && !n.paused)
            .find_map(ClusterNode::meta_leader)
    }

    /// Waits until every running, unpaused node answers `/healthz` with 200.
    pub fn wait_healthy(&self) {
        let start = Instant::now();
        loop {
            let sick: Vec<&str> = self
                .nodes
                .iter()
                .filter(|n| n.is_running() && !n.paused && !n.healthy())
                .map(ClusterNode::name)
                .collect();
            if sick.is_empty() {
                return;
            }
            if start.elapsed() > START_TIMEOUT {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("--- {} ---\n{}", n.name, n.log()))
                    .collect();
                panic!(
                    "nats cluster nodes {sick:?} not healthy within {START_TIMEOUT:?}\n{}",
                    logs.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A plain HTTP/1.0 GET on loopback: the status code and the body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}
