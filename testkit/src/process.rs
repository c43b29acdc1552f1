//! Real services started for a test and stopped when their handle drops.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (and reaped) on drop.
pub struct Service {
    child: Child,
    name: String,
    stopped: bool,
}

impl Service {
    fn spawn(name: &str, cmd: &mut Command) -> Self {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Service {
            child,
            name: name.to_owned(),
            stopped: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails the test if the process has already exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early with {status}", self.name);
        }
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} did not become ready within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `sluice-registry serve`.
pub struct SluiceRegistry {
    pub service: Service,
    pub addr: SocketAddr,
    pub root: PathBuf,
}

impl SluiceRegistry {
    /// Starts the registry binary on a free port with storage under `root`.
    pub fn start(binary: &Path, root: &Path, extra_args: &[&str]) -> Self {
        let mut cmd = Command::new(binary);
        cmd.args(["serve", "--addr", "127.0.0.1:0", "--root"])
            .arg(root)
            .args(extra_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut service = Service::spawn("sluice-registry", &mut cmd);
        let stdout = service.child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the registry's first line");
        let addr = line
            .trim()
            .rsplit("http://")
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("registry did not announce its address, said {line:?}"));
        SluiceRegistry {
            service,
            addr,
            root: root.to_owned(),
        }
    }

    /// `127.0.0.1:port`, as image references spell it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits (up to 120 s) for convert-on-push to publish the lazy twin of
    /// manifest `subject`; returns the twin's descriptor from the referrers list.
    pub async fn wait_for_twin(&self, repo: &str, subject: &str) -> serde_json::Value {
        self.wait_for_twin_as(repo, subject, None).await
    }

    /// [`wait_for_twin`](Self::wait_for_twin) on a registry that needs
    /// credentials (user, password).
    pub async fn wait_for_twin_with_auth(
        &self,
        repo: &str,
        subject: &str,
        creds: (&str, &str),
    ) -> serde_json::Value {
        self.wait_for_twin_as(repo, subject, Some(creds)).await
    }

    async fn wait_for_twin_as(
        &self,
        repo: &str,
        subject: &str,
        creds: Option<(&str, &str)>,
    ) -> serde_json::Value {
        use base64::Engine as _;
        let auth = creds.map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = crate::http::request(
                http::Method::GET,
                &self.url(&format!(
                    "/v2/{repo}/referrers/{subject}?artifactType=application/vnd.sluice.image.lazy.v1"
                )),
                &headers,
                bytes::Bytes::new(),
            )
            .await;
            if let Some(m) = r.json()["manifests"].as_array().and_then(|a| a.first()) {
                return m.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no lazy twin of {subject} after 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The sum of a counter (all label sets) in the registry's /metrics.
    pub async fn metric(&self, name: &str) -> f64 {
        metric_sum(&crate::http::get(&self.url("/metrics")).await.body, name)
    }
}

/// Sums the samples of metric `name` (any labels) in a Prometheus exposition.
pub fn metric_sum(exposition: &[u8], name: &str) -> f64 {
    String::from_utf8_lossy(exposition)
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A running `sluice-snapshotter` with its own root and socket.
pub struct SluiceSnapshotter {
    pub service: Service,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub metrics_addr: SocketAddr,
    binary: PathBuf,
    args: Vec<String>,
}

impl SluiceSnapshotter {
    /// With no registry host configuration (an empty hosts dir).
    pub fn start(binary: &Path, root: &Path) -> Self {
        let hosts = root.join("no-hosts").display().to_string();
        Self::start_with_args(binary, root, &["--hosts-dir", &hosts])
    }

    /// With extra command-line flags (`--hosts-dir`, `--docker-config`, …).
    pub fn start_with_args(binary: &Path, root: &Path, args: &[&str]) -> Self {
        let socket = root.join("snapshotter.sock");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Self::spawn(binary, root, &socket, args)
    }

    /// Starts the daemon with its metrics on a port it picks (a port picked
    /// here and bound there could be taken in between) and waits for the
    /// stdout lines that say where the metrics are and that it serves.
    fn spawn(binary: &Path, root: &Path, socket: &Path, args: Vec<String>) -> Self {
        std::fs::create_dir_all(root).expect("snapshotter root");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.with_extension("log"))
            .expect("snapshotter log");
        let mut cmd = Command::new(binary);
        cmd.arg("--root")
            .arg(root)
            .arg("--address")
            .arg(socket)
            .arg("--metrics-address")
            .arg("127.0.0.1:0")
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(log);
        let mut service = Service::spawn("sluice-snapshotter", &mut cmd);
        let stdout = service.child.stdout.take().expect("piped stdout");
        let (lines, said) = std::sync::mpsc::channel();
        // Reads to the end, so the daemon never writes into a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut metrics_addr = None;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let line = said.recv_timeout(wait).unwrap_or_else(|e| {
                service.assert_running();
                panic!(
                    "sluice-snapshotter did not say it serves ({e}); its log: {}",
                    root.with_extension("log").display()
                )
            });
            if let Some(addr) = line.strip_prefix("sluice-snapshotter metrics on http://") {
                metrics_addr = addr.parse().ok();
            }
            if line.starts_with("sluice-snapshotter listening on ") {
                break;
            }
        }
        SluiceSnapshotter {
            service,
            root: root.to_owned(),
            socket: socket.to_owned(),
            metrics_addr: metrics_addr
                .expect("sluice-snapshotter did not say where its metrics are"),
            binary: binary.to_owned(),
            args,
        }
    }

    /// Kills the daemon with SIGKILL (no cleanup at all) and starts it again
    /// on the same root and socket.
    pub fn kill9_and_restart(self) -> Self {
        let SluiceSnapshotter {
            mut service,
            root,
            socket,
            binary,
            args,
            ..
        } = self;
        let _ = service.child.kill();
        let _ = service.child.wait();
        service.stopped = true;
        Self::spawn(&binary, &root, &socket, args)
    }

    /// The daemon's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.with_extension("log")).unwrap_or_default()
    }

    /// The containerd config section that plugs this daemon in as `sluice`.
    pub fn containerd_config(&self) -> String {
        format!(
            "[proxy_plugins.sluice]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            self.socket.display()
        )
    }

    /// The sum of a metric in the daemon's /metrics.
    pub async fn metric(&self, name: &str) -> f64 {
        let r = crate::http::get(&format!("http://{}/metrics", self.metrics_addr)).await;
        metric_sum(&r.body, name)
    }
}

/// A running CNCF distribution registry (Debian's `docker-registry`).
pub struct DistributionRegistry {
    pub service: Service,
    pub addr: SocketAddr,
}

impl DistributionRegistry {
    pub fn start(root: &Path) -> Self {
        Self::start_with(root, None)
    }

    /// Serving HTTPS with `tls` = (certificate, key) PEM files.
    pub fn start_tls(root: &Path, cert: &Path, key: &Path) -> Self {
        Self::start_with(root, Some((cert, key)))
    }

    fn start_with(root: &Path, tls: Option<(&Path, &Path)>) -> Self {
        crate::require_tool("docker-registry", "docker-registry");
        // docker-registry cannot say which port it bound, so the port is
        // picked here; another socket may take it before the registry binds
        // it, and then the registry exits: it gets another port.
        for _ in 0..5 {
            if let Some(registry) = Self::try_start(root, tls) {
                return registry;
            }
        }
        panic!("docker-registry exited at start five times (ports taken?)");
    }

    fn try_start(root: &Path, tls: Option<(&Path, &Path)>) -> Option<Self> {
        let port = free_port();
        let config = root.join("config.yml");
        std::fs::create_dir_all(root.join("data")).expect("registry data dir");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{}",
                root.join("data").display(),
                tls.map(|(c, k)| format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    c.display(),
                    k.display()
                ))
                .unwrap_or_default()
            ),
        )
        .expect("writing registry config");
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut service = Service::spawn("docker-registry", &mut cmd);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(_)) = service.child.try_wait() {
                service.stopped = true;
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not become ready within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(DistributionRegistry { service, addr })
    }
}

/// A private containerd with its own root, state and socket.
pub struct Containerd {
    pub service: Service,
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl Containerd {
    /// Starts containerd with `extra_config` appended to a minimal config
    /// (CRI disabled; add `[proxy_plugins…]` sections here).
    pub fn start(dir: &Path, extra_config: &str) -> Self {
        std::fs::create_dir_all(dir).expect("containerd test dir");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n{}{extra_config}\n",
                Self::private_paths(dir)
            ),
        )
        .expect("writing containerd config");
        Self::start_with_config(dir, &config)
    }

    /// The top-level settings that give a containerd in `dir` its own root,
    /// state and sockets (`root`, `state`, `[grpc]`, `[ttrpc]`), for configs
    /// written by a test.
    pub fn private_paths(dir: &Path) -> String {
        let socket = dir.join("containerd.sock");
        format!(
            "root = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
        )
    }

    /// Starts containerd with a complete config file that uses
    /// [`Containerd::private_paths`] for `dir`.
    pub fn start_with_config(dir: &Path, config: &Path) -> Self {
        crate::require_tool("containerd", "containerd");
        crate::require_tool("ctr", "containerd");
        assert!(crate::is_root(), "containerd tests need root");
        std::fs::create_dir_all(dir).expect("containerd test dir");
        let socket = dir.join("containerd.sock");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("containerd log");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log);
        let mut service = Service::spawn("containerd", &mut cmd);
        wait_until("containerd", Duration::from_secs(30), || {
            service.assert_running();
            socket.exists()
                && Command::new("ctr")
                    .arg("--address")
                    .arg(&socket)
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
        });
        Containerd {
            service,
            dir: dir.to_owned(),
            socket,
        }
    }

    /// A `ctr` command bound to this containerd.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.socket);
        c
    }

    /// `ctr image pull --plain-http`, failing the test with containerd's log.
    pub fn pull_plain_http(&self, reference: &str) {
        let out = self
            .ctr()
            .args(["image", "pull", "--plain-http", reference])
            .output()
            .expect("running ctr");
        assert!(
            out.status.success(),
            "ctr pull {reference} failed: {}\n{}\ncontainerd log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// `ctr run --rm IMAGE ID [ARGS…]`; returns what the container printed.
    pub fn run_container(&self, reference: &str, id: &str, args: &[&str]) -> String {
        crate::require_tool("runc", "runc");
        crate::run(self.ctr().args(["run", "--rm", reference, id]).args(args))
    }

    /// containerd's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}
