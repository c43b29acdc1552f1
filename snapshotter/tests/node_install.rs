//! `sluice-snapshotter install-node` / `uninstall-node` on real containerd
//! 1.6 config files: the patched config is loaded by a real containerd that
//! then lists sluice as an ok snapshotter (and, where the CRI plugin is on,
//! CRI accepts it as its snapshotter); uninstalling restores the original
//! byte for byte; containerd is restarted only when the file changed.

mod common;

use std::path::Path;
use std::process::Command;

use common::needs_root;
use sluice_testkit::process::{Containerd, SluiceSnapshotter};
use sluice_testkit::{run, workspace_binary};

/// Runs install-node or uninstall-node with a restart command that counts
/// its calls in `restarts`.
fn node_command(sub: &str, config: &Path, socket: Option<&Path>, restarts: &Path) -> String {
    let script = restarts.with_extension("sh");
    std::fs::write(&script, format!("echo restart >> {}\n", restarts.display())).unwrap();
    let mut cmd = Command::new(workspace_binary("sluice-snapshotter"));
    cmd.arg(sub)
        .arg("--containerd-config")
        .arg(config)
        .arg("--restart-command")
        .arg(format!("/bin/sh {}", script.display()));
    if let Some(s) = socket {
        cmd.arg("--socket").arg(s);
    }
    run(&mut cmd)
}

fn restarts(counter: &Path) -> usize {
    std::fs::read_to_string(counter)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// `ctr plugins ls` lines as (type, id, status).
fn plugins(containerd: &Containerd) -> Vec<(String, String, String)> {
    run(containerd.ctr().args(["plugins", "ls"]))
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.to_string(),
                f.get(1)?.to_string(),
                f.last()?.to_string(),
            ))
        })
        .collect()
}

struct Case {
    name: &'static str,
    /// The config before install (`None`: no file), given containerd's
    /// private paths for the test.
    original: Option<String>,
    cri: bool,
}

fn cases(dir: &Path) -> Vec<Case> {
    let private = Containerd::private_paths(dir);
    // containerd's own default config for this version, as `containerd
    // config default` prints it, moved to the test's paths.
    let default = run(Command::new("containerd").args(["config", "default"]));
    let mut default: toml_edit::DocumentMut = default.parse().unwrap();
    let paths: toml_edit::DocumentMut = private.parse().unwrap();
    for (k, v) in paths.iter() {
        default[k] = v.clone();
    }
    // The CRI plugin's own state and stream port, so that it does not meet
    // a node's real containerd.
    let cri = &mut default["plugins"]["io.containerd.grpc.v1.cri"];
    cri["stream_server_port"] = toml_edit::value("0");
    vec![
        Case {
            name: "no config file (containerd's defaults)",
            original: None,
            cri: false,
        },
        Case {
            name: "containerd config default",
            original: Some(default.to_string()),
            cri: true,
        },
        Case {
            name: "another proxy plugin and CRI settings present, CRI off",
            original: Some(format!(
                "# hand-written\nversion = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n{private}\n[proxy_plugins]\n  [proxy_plugins.stargz]\n    type = \"snapshot\"\n    address = \"/run/containerd-stargz-grpc/containerd-stargz-grpc.sock\"\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"   # as shipped\n  disable_snapshot_annotations = true\n"
            )),
            cri: false,
        },
        Case {
            name: "version 1 config without CRI settings",
            original: Some(format!(
                "disabled_plugins = [\"cri\"]\n{private}"
            )),
            cri: false,
        },
    ]
}

#[test]
fn install_and_uninstall_on_real_containerd_configs() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshotter = SluiceSnapshotter::start(
        &workspace_binary("sluice-snapshotter"),
        &dir.path().join("sluice"),
    );
    let count = cases(dir.path()).len();
    for i in 0..count {
        let cdir = dir.path().join(format!("case{i}"));
        std::fs::create_dir_all(&cdir).unwrap();
        let case = cases(&cdir.join("containerd")).swap_remove(i);
        let config = cdir.join("config.toml");
        let counter = cdir.join("restarts");
        if let Some(text) = &case.original {
            std::fs::write(&config, text).unwrap();
        }
        let before = std::fs::read(&config).ok();

        let out = node_command("install-node", &config, Some(&snapshotter.socket), &counter);
        assert!(out.contains("now uses sluice"), "{}: {out}", case.name);
        assert_eq!(restarts(&counter), 1, "{}: restarted once", case.name);
        let patched = std::fs::read(&config).unwrap();
        // Idempotent: a second install changes nothing and restarts nothing.
        let out = node_command("install-node", &config, Some(&snapshotter.socket), &counter);
        assert!(out.contains("unchanged"), "{}: {out}", case.name);
        assert_eq!(restarts(&counter), 1, "{}: no second restart", case.name);
        assert_eq!(std::fs::read(&config).unwrap(), patched);

        // Without a file containerd would use the node's real paths; that
        // case is checked on the file level only.
        if case.original.is_some() {
            let containerd = Containerd::start_with_config(&cdir.join("containerd"), &config);
            let plugins = plugins(&containerd);
            assert!(
                plugins.contains(&(
                    "io.containerd.snapshotter.v1".into(),
                    "sluice".into(),
                    "ok".into()
                )),
                "{}: sluice not an ok snapshotter: {plugins:?}\n{}",
                case.name,
                containerd.log()
            );
            if case.cri {
                // The CRI plugin fails to load when its snapshotter is unknown.
                assert!(
                    plugins.contains(&("io.containerd.grpc.v1".into(), "cri".into(), "ok".into())),
                    "{}: CRI did not accept snapshotter sluice: {plugins:?}\n{}",
                    case.name,
                    containerd.log()
                );
            }
            containerd.service.stop();
        }

        let out = node_command("uninstall-node", &config, None, &counter);
        assert!(
            out.contains("no longer uses sluice"),
            "{}: {out}",
            case.name
        );
        assert_eq!(restarts(&counter), 2, "{}", case.name);
        assert_eq!(
            std::fs::read(&config).ok(),
            before,
            "{}: restored byte for byte",
            case.name
        );
        let leftovers: Vec<_> = std::fs::read_dir(&cdir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains("sluice"))
            .collect();
        assert!(leftovers.is_empty(), "{}: {leftovers:?}", case.name);
        let out = node_command("uninstall-node", &config, None, &counter);
        assert!(out.contains("unchanged"), "{}: {out}", case.name);
        assert_eq!(restarts(&counter), 2, "{}", case.name);
    }
}

/// A config that already plugs sluice in by hand (as docs/snapshotter.md
/// shows): install changes nothing and restarts nothing; containerd runs
/// with it; uninstall (no backup exists) takes sluice's settings out.
#[test]
fn a_config_patched_by_hand_is_left_as_it_is() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshotter = SluiceSnapshotter::start(
        &workspace_binary("sluice-snapshotter"),
        &dir.path().join("sluice"),
    );
    let cdir = dir.path().join("containerd");
    let config = dir.path().join("config.toml");
    let counter = dir.path().join("restarts");
    let by_hand = format!(
        "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n{}\n[proxy_plugins.sluice]\n  type = \"snapshot\"\n  address = \"{}\"\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"sluice\"\n  disable_snapshot_annotations = false\n",
        Containerd::private_paths(&cdir),
        snapshotter.socket.display()
    );
    std::fs::write(&config, &by_hand).unwrap();
    let out = node_command("install-node", &config, Some(&snapshotter.socket), &counter);
    assert!(out.contains("unchanged"), "{out}");
    assert_eq!(restarts(&counter), 0);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), by_hand);
    let containerd = Containerd::start_with_config(&cdir, &config);
    assert!(plugins(&containerd).contains(&(
        "io.containerd.snapshotter.v1".into(),
        "sluice".into(),
        "ok".into()
    )));
    containerd.service.stop();
    let out = node_command("uninstall-node", &config, None, &counter);
    assert!(out.contains("no longer uses sluice"), "{out}");
    let after = std::fs::read_to_string(&config).unwrap();
    assert!(!after.contains("sluice"), "{after}");
    assert!(after.contains("disabled_plugins"), "{after}");
    assert_eq!(restarts(&counter), 1);
}

/// The DaemonSet's way: the daemon plugs itself in once it serves, so
/// containerd never names a snapshotter that is not up; a config it cannot
/// patch stops it with the reason.
#[test]
fn the_daemon_installs_itself_once_serving() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cdir = dir.path().join("containerd");
    std::fs::create_dir_all(&cdir).unwrap();
    let config = cdir.join("config.toml");
    let original = format!(
        "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n{}",
        Containerd::private_paths(&cdir)
    );
    std::fs::write(&config, &original).unwrap();
    let counter = dir.path().join("restarts");
    let script = dir.path().join("restart.sh");
    std::fs::write(&script, format!("echo restart >> {}\n", counter.display())).unwrap();
    let restart = format!("/bin/sh {}", script.display());
    let snapshotter = SluiceSnapshotter::start_with_args(
        &workspace_binary("sluice-snapshotter"),
        &dir.path().join("sluice"),
        &[
            "--hosts-dir",
            dir.path().join("no-hosts").to_str().unwrap(),
            "--install-node",
            "--containerd-config",
            config.to_str().unwrap(),
            "--restart-command",
            &restart,
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while restarts(&counter) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no install within 20 s:\n{}",
            snapshotter.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let patched = std::fs::read_to_string(&config).unwrap();
    assert!(
        patched.contains(&format!("address = \"{}\"", snapshotter.socket.display())),
        "{patched}"
    );
    let containerd = Containerd::start_with_config(&cdir, &config);
    assert!(plugins(&containerd).contains(&(
        "io.containerd.snapshotter.v1".into(),
        "sluice".into(),
        "ok".into()
    )));
    containerd.service.stop();
    snapshotter.service.stop();

    // A config that cannot be patched: the daemon stops and says why.
    std::fs::write(&config, "version = 2\nproxy_plugins = 1\n").unwrap();
    let out = Command::new(workspace_binary("sluice-snapshotter"))
        .arg("--root")
        .arg(dir.path().join("sluice2"))
        .arg("--address")
        .arg(dir.path().join("sluice2.sock"))
        .args(["--metrics-address", "", "--install-node", "--no-restart"])
        .arg("--hosts-dir")
        .arg(dir.path().join("no-hosts"))
        .arg("--containerd-config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("`proxy_plugins` is not a table"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "version = 2\nproxy_plugins = 1\n"
    );
}

/// A config edited by someone else after the install: uninstall takes only
/// sluice's settings out, keeps the other edit and the backup.
#[test]
fn uninstall_after_other_edits_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let counter = dir.path().join("restarts");
    std::fs::write(&config, "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n").unwrap();
    node_command(
        "install-node",
        &config,
        Some(Path::new("/run/s.sock")),
        &counter,
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[metrics]\n  address = \"127.0.0.1:1338\"\n");
    std::fs::write(&config, &text).unwrap();
    node_command("uninstall-node", &config, None, &counter);
    let after = std::fs::read_to_string(&config).unwrap();
    assert!(!after.contains("sluice"), "{after}");
    assert!(after.contains("127.0.0.1:1338"), "{after}");
    assert!(dir.path().join("config.toml.sluice-backup").exists());
    assert_eq!(restarts(&counter), 2);
}

/// The DaemonSet's way: the restart command runs in another process's
/// mount namespace (`--host-namespace` is PID 1's, with hostPID in the pod;
/// here a process in a mount namespace of its own stands in for it, since
/// this machine's PID 1 is out of reach).
#[test]
fn restart_runs_in_another_mount_namespace() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let seen = dir.path().join("seen");
    let script = dir.path().join("restart.sh");
    std::fs::write(
        &script,
        format!("readlink /proc/self/ns/mnt > {}\n", seen.display()),
    )
    .unwrap();
    let mut other = Command::new("unshare")
        .args(["--mount", "--propagation", "unchanged", "sleep", "60"])
        .spawn()
        .unwrap();
    let pid = other.id();
    // unshare execs sleep once the namespace exists.
    let own = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let theirs = loop {
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        if ns != own {
            break ns;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let result = Command::new(workspace_binary("sluice-snapshotter"))
        .args([
            "install-node",
            "--namespace-of",
            &pid.to_string(),
            "--containerd-config",
        ])
        .arg(&config)
        .arg("--restart-command")
        .arg(format!("/bin/sh {}", script.display()))
        .output()
        .unwrap();
    let _ = other.kill();
    let _ = other.wait();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap().trim(),
        theirs.to_str().unwrap()
    );
}

/// A full disk: the install fails saying so, containerd's config is as it
/// was, and no partial file is left behind.
#[test]
fn a_full_disk_loses_nothing() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&small));
    let config = small.join("config.toml");
    let original = format!("version = 2\n# {}\n", "x".repeat(20_000));
    std::fs::write(&config, &original).unwrap();
    // Fill the rest: no room for the backup.
    let _ = std::fs::write(small.join("filler"), vec![0u8; 64 * 1024]);
    let out = Command::new(workspace_binary("sluice-snapshotter"))
        .args(["install-node", "--no-restart", "--containerd-config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let names: Vec<String> = std::fs::read_dir(&small)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let after = std::fs::read_to_string(&config).unwrap();
    run(Command::new("umount").arg(&small));
    assert!(!out.status.success());
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(after, original);
    let mut names = names;
    names.sort();
    assert_eq!(names, ["config.toml", "filler"]);
}

/// A config containerd itself would refuse is not touched, and says why.
#[test]
fn a_broken_config_is_left_alone_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "version = 2\n[plugins\n").unwrap();
    let out = Command::new(workspace_binary("sluice-snapshotter"))
        .args(["install-node", "--no-restart", "--containerd-config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.toml: not valid TOML"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "version = 2\n[plugins\n"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
