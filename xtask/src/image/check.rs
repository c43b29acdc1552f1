//! `cargo xtask image --check`: the node image run on a node the way the
//! DaemonSet runs it, with real containerd, runc, FUSE and eBPF.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sluice_format::layout::Compression;

use super::{push, BINARY, TARGET};
use crate::setup::{run_ok, step, workspace};

/// The node image on a node, as the DaemonSet runs it:
/// 1. both ways onto a node: the archive imported into a private containerd,
///    and the layout pushed to the image's own `sluice-registry` and pulled
///    back (the same digest must arrive);
/// 2. the daemon started from the pulled image with the DaemonSet's
///    settings: privileged, host network, the state directory mounted with
///    shared (Bidirectional) propagation, the socket directory shared with
///    the host; it must answer /healthz;
/// 3. the host's containerd uses it as its `sluice` proxy plugin: a test
///    image is pulled lazily (`sluice pull`) and run (`ctr run`), which only
///    works if the FUSE mounts made inside the container reach the host;
/// 4. SIGTERM: the daemon stops and its mounts are gone from the host.
pub fn check(layout: &Path, archive: &Path, tag: &str) -> anyhow::Result<()> {
    use sluice_testkit::process::{Containerd, SluiceRegistry};
    step("checking the node image: import, push + pull, run as the DaemonSet does, lazy pull through it");
    let dir = tempfile::Builder::new()
        .prefix("sluice-image-check")
        .tempdir()?;
    let (state, sockets) = (dir.path().join("state"), dir.path().join("sockets"));
    std::fs::create_dir_all(&state)?;
    std::fs::create_dir_all(&sockets)?;
    // This containerd runs the daemon's container; a second one (below)
    // plays the node's containerd restarted with sluice configured.
    let containerd = Containerd::start(&dir.path().join("containerd"), "");
    let ctr = |args: &[&str]| {
        run_ok(
            containerd.ctr().args(args),
            &format!("ctr {}", args.join(" ")),
        )
    };
    let base = format!("docker.io/sluice/{BINARY}");
    ctr(&[
        "images",
        "import",
        "--base-name",
        &base,
        &archive.display().to_string(),
    ])?;
    let bin_dir = workspace().join(format!("target/{TARGET}/release"));
    let registry = SluiceRegistry::start(
        &bin_dir.join("sluice-registry"),
        &dir.path().join("registry"),
        &[],
    );
    let reference = format!("{}/sluice/sluice:{tag}", registry.host());
    push(layout, tag, &reference)?;
    ctr(&["images", "pull", "--plain-http", &reference])?;
    let digests = ctr(&["images", "ls"])?;
    let digest_of = |name: &str| {
        digests
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_owned)
    };
    let (imported, pulled) = (digest_of(&format!("{base}:{tag}")), digest_of(&reference));
    if imported.is_none() || imported != pulled {
        bail!("imported {imported:?} and pulled {pulled:?} differ:\n{digests}");
    }

    // A shared mount point, as a kubelet makes of a Bidirectional hostPath.
    run_ok(
        Command::new("mount").arg("--bind").arg(&state).arg(&state),
        "mount --bind",
    )?;
    run_ok(
        Command::new("mount").arg("--make-shared").arg(&state),
        "mount --make-shared",
    )?;
    let result = run_daemon_and_pull(
        &containerd,
        &registry,
        &reference,
        &state,
        &sockets,
        &bin_dir,
        dir.path(),
    );
    let _ = Command::new("umount").arg("-R").arg(&state).status();
    result
}

fn run_daemon_and_pull(
    containerd: &sluice_testkit::process::Containerd,
    registry: &sluice_testkit::process::SluiceRegistry,
    node_image: &str,
    state: &Path,
    sockets: &Path,
    bin_dir: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let log_path = dir.join("daemon.log");
    let log = std::fs::File::create(&log_path)?;
    // With a spec of its own, ctr takes the root filesystem as a path.
    let rootfs = dir.join("node-image-rootfs");
    std::fs::create_dir_all(&rootfs)?;
    run_ok(
        containerd
            .ctr()
            .args(["images", "mount", node_image])
            .arg(&rootfs),
        "ctr images mount",
    )?;
    let unmount = || {
        let _ = containerd
            .ctr()
            .args(["images", "unmount"])
            .arg(&rootfs)
            .output();
    };
    // The daemon patches a containerd config once it serves, as in the
    // DaemonSet (restarting is left out: this containerd is configured).
    let node_config_dir = dir.join("etc-containerd");
    std::fs::create_dir_all(&node_config_dir)?;
    let node_config = node_config_dir.join("config.toml");
    std::fs::write(&node_config, "version = 2\n")?;
    let spec = dir.join("daemonset-spec.json");
    std::fs::write(
        &spec,
        serde_json::to_vec_pretty(&daemonset_spec(
            containerd,
            &rootfs,
            &[
                &format!("/usr/bin/{BINARY}"),
                "--config",
                "/etc/sluice/snapshotter.toml",
                // Port 0: the daemon says on stdout (the log) which it
                // bound; a port picked here could be taken before it binds.
                "--metrics-address",
                "127.0.0.1:0",
                "--root",
                &state.display().to_string(),
                "--install-node",
                "--no-restart",
                "--containerd-config",
                &node_config.display().to_string(),
            ],
            state,
            sockets,
            &node_config_dir,
        )?)?,
    )?;
    let mut task = containerd
        .ctr()
        .args(["run", "--rm", "--config"])
        .arg(&spec)
        .arg("sluice-image-check")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("ctr run")?;
    let daemon_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let outcome = (|| -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = task.try_wait() {
                bail!("the daemon in the image exited ({status})");
            }
            let port = daemon_log()
                .lines()
                .find_map(|l| {
                    l.split("sluice-snapshotter metrics on http://127.0.0.1:")
                        .nth(1)
                })
                .and_then(|p| p.trim().parse::<u16>().ok());
            if let Some(reply) = port.and_then(healthz) {
                if reply.starts_with("HTTP/1.1 200") && reply.ends_with("\r\n\r\nok\n") {
                    break;
                }
                bail!("/healthz answered:\n{reply}");
            }
            if Instant::now() > deadline {
                bail!("no answer on /healthz within 60 s");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        println!("    the daemon in the image answers /healthz");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&node_config)?;
            if text.contains("[proxy_plugins.sluice]")
                && text.contains("address = \"/run/sluice/snapshotter.sock\"")
                && node_config_dir.join("config.toml.sluice-backup").exists()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("the daemon did not plug itself into containerd's config:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        println!("    it plugged itself into containerd's config (--install-node)");
        // A lazy image for it to mount.
        let images = dir.join("test-image");
        let image = sluice_testkit::images::busybox_image(&images, Compression::Gzip);
        let test_ref = format!("{}/check/busybox:v1", registry.host());
        push(&image.layout, &image.tag, &test_ref)?;
        tokio::runtime::Runtime::new()?
            .block_on(registry.wait_for_twin("check/busybox", &image.manifest.digest.to_string()));
        // The node's containerd, started (as after --install-node restarts
        // it) with the daemon already serving: had it dialled the socket
        // before the daemon existed, it would answer with that old dial error
        // until its backoff let it redial.
        let node = sluice_testkit::process::Containerd::start(
            &dir.join("containerd-node"),
            &format!(
                "[proxy_plugins.sluice]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                sockets.join("snapshotter.sock").display()
            ),
        );
        let out = Command::new(bin_dir.join("sluice"))
            .arg("pull")
            .arg("--address")
            .arg(&node.socket)
            .arg(&test_ref)
            .output()?;
        let pulled = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || !pulled.contains("(2 lazy, 0 full") {
            let socket = sockets.join("snapshotter.sock");
            let reach = std::os::unix::net::UnixStream::connect(&socket)
                .map(|_| "connects".to_owned())
                .unwrap_or_else(|e| e.to_string());
            bail!(
                "sluice pull through the containerized daemon: {pulled}{}\n{} from the host: {reach}\ncontainerd's log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                socket.display(),
                node.log()
            );
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        let on_host = mounts
            .lines()
            .filter(|l| l.contains(" - fuse sluice:") && l.contains(&state.display().to_string()))
            .count();
        if on_host != 2 {
            // What the daemon's own mount namespace has, for the diagnosis.
            let tasks = containerd.ctr().args(["tasks", "ls"]).output()?;
            let pid = String::from_utf8_lossy(&tasks.stdout)
                .lines()
                .find(|l| l.starts_with("sluice-image-check "))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
                .unwrap_or_default();
            let inside = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("sluice") || l.contains(" / / "))
                .collect::<Vec<_>>()
                .join("\n");
            bail!(
                "{on_host} lazy mounts visible on the host (expected 2): propagation broken; \
                 the daemon's mounts:\n{inside}"
            );
        }
        let ran = node
            .ctr()
            .args([
                "run",
                "--rm",
                "--snapshotter",
                "sluice",
                &test_ref,
                "check-app",
            ])
            .output()?;
        let said = String::from_utf8_lossy(&ran.stdout).into_owned();
        if !ran.status.success() || said.trim() != "sluice test app ready" {
            bail!(
                "ctr run of the lazily pulled image: {said}{}",
                String::from_utf8_lossy(&ran.stderr)
            );
        }
        Ok(format!(
            "    {}    lazy mounts made in the container: {on_host} visible on the host; the app said {:?}",
            pulled,
            said.trim()
        ))
    })();
    let _ = containerd
        .ctr()
        .args(["tasks", "kill", "-s", "SIGTERM", "sluice-image-check"])
        .output();
    let stopped = task.wait()?;
    unmount();
    let report = outcome.map_err(|e| e.context(format!("daemon log:\n{}", daemon_log())))?;
    println!("{report}");
    let left = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter(|l| l.contains(" - fuse sluice:") && l.contains(&state.display().to_string()))
        .count();
    if left != 0 {
        bail!("{left} lazy mounts left on the host after the daemon stopped ({stopped})");
    }
    if !daemon_log().contains("unmounting lazy layers") {
        bail!("the daemon did not shut down cleanly:\n{}", daemon_log());
    }
    let log = daemon_log();
    let ebpf = if log.contains("eBPF access tracing on") {
        "eBPF access tracing on"
    } else {
        "eBPF access tracing off (see the daemon's warning)"
    };
    println!("node image runs as the DaemonSet runs it: lazy pull and run through it, {ebpf}, clean stop");
    Ok(())
}

/// The OCI runtime spec the DaemonSet's pod gets from kubelet and
/// containerd's CRI, built on `ctr oci spec`'s default: privileged (every
/// capability, every device, /sys writable, nothing masked), the host's
/// network, the state directory `Bidirectional` (an `rshared` bind, and the
/// container's root `rshared` too, as CRI sets it), /run/sluice, /dev/fuse,
/// tracefs and the BPF filesystem from the host. (`ctr run --privileged`
/// cannot say rshared for the root, and without it no mount made inside
/// reaches the host.)
fn daemonset_spec(
    containerd: &sluice_testkit::process::Containerd,
    rootfs: &Path,
    args: &[&str],
    state: &Path,
    sockets: &Path,
    containerd_config_dir: &Path,
) -> anyhow::Result<serde_json::Value> {
    use serde_json::json;
    let default = run_ok(containerd.ctr().args(["oci", "spec"]), "ctr oci spec")?;
    let mut spec: serde_json::Value = serde_json::from_str(&default)?;
    // Every capability this process may pass on (its bounding set), as
    // privileged gives.
    let status = std::fs::read_to_string("/proc/self/status")?;
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .context("no CapBnd in /proc/self/status")?;
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let caps: Vec<String> = NAMES
        .iter()
        .enumerate()
        .filter(|(bit, _)| bounding & (1 << bit) != 0)
        .map(|(_, n)| format!("CAP_{n}"))
        .collect();
    spec["root"] = json!({"path": rootfs, "readonly": true});
    let process = &mut spec["process"];
    process["args"] = json!(args);
    process["env"] = json!([
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "RUST_LOG=info"
    ]);
    for set in ["bounding", "effective", "permitted"] {
        process["capabilities"][set] = json!(caps);
    }
    let linux = &mut spec["linux"];
    linux["rootfsPropagation"] = json!("rshared");
    linux["maskedPaths"] = json!([]);
    linux["readonlyPaths"] = json!([]);
    linux["resources"]["devices"] = json!([{"allow": true, "access": "rwm"}]);
    linux["devices"] = json!([{
        "path": "/dev/fuse", "type": "c", "major": 10, "minor": 229,
        "fileMode": 0o666, "uid": 0, "gid": 0
    }]);
    if let Some(ns) = linux["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "network");
    }
    let mounts = spec["mounts"]
        .as_array_mut()
        .context("ctr oci spec has no mounts")?;
    for m in mounts.iter_mut().filter(|m| m["destination"] == "/sys") {
        m["options"] = json!(["nosuid", "noexec", "nodev", "rw"]);
    }
    let bind = |src: &Path, dst: &str, extra: &[&str]| {
        let mut options = vec!["rbind", "rw"];
        options.extend_from_slice(extra);
        json!({"destination": dst, "type": "bind", "source": src, "options": options})
    };
    // The state directory at the same path inside as outside: the daemon
    // hands containerd mount paths (lower dirs) as it sees them. The chart
    // does the same (mountPath = hostPath path). Below /tmp here, a tmpfs
    // holds the mount point, since the image's root is read-only.
    mounts.push(
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
        "options": ["nosuid", "nodev", "mode=1777"]}),
    );
    mounts.push(bind(state, &state.display().to_string(), &["rshared"]));
    mounts.push(bind(sockets, "/run/sluice", &[]));
    mounts.push(bind(
        containerd_config_dir,
        &containerd_config_dir.display().to_string(),
        &[],
    ));
    for host in ["/sys/kernel/tracing", "/sys/fs/bpf"] {
        if Path::new(host).is_dir() {
            mounts.push(bind(Path::new(host), host, &[]));
        }
    }
    Ok(spec)
}

/// The raw reply to `GET /healthz`, if the port answers.
fn healthz(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    Some(reply)
}
