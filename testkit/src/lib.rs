//! Test support shared by sluice's integration tests, benchmarks and demo.
//!
//! Everything here drives *real* components: the `sluice-registry` binary, the
//! CNCF `docker-registry`, containerd, skopeo. Nothing is mocked. A missing tool
//! is reported with the command that installs it, never silently skipped.

pub mod http;
pub mod images;
pub mod kernel;
pub mod mounts;
pub mod process;
pub mod proxy;

use std::path::{Path, PathBuf};

/// Fails the test with a clear message if `tool` is not on PATH.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed: run `cargo xtask setup` (or `apt-get install {package}`); \
         `cargo xtask test` installs everything the tests need"
    );
}

/// True when running as root (containerd, mounts and FUSE need it).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// Runs a command, failing the test with its output if it does not succeed.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Path of a workspace binary built by cargo (tests of other crates use this
/// to find `sluice-registry`).
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not built: run `cargo build --workspace` first");
}

/// A fixture built by `cargo xtask fixtures` (cached under `target/fixtures`,
/// or `SLUICE_FIXTURES`); fails the test with the command to build it.
pub fn fixture(name: &str) -> std::path::PathBuf {
    let base = std::env::var_os("SLUICE_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures"));
    assert!(
        base.join(name).join(".complete").exists(),
        "fixture {name} is missing under {}: run `cargo xtask fixtures` (`cargo xtask test` does)",
        base.display()
    );
    base.join(name)
}

/// Lazily unmounts every mount point below `dir` (deepest first): what a
/// killed demo, benchmark or test may have left behind.
pub fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = std::process::Command::new("umount")
            .args(["-l", point])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A `skopeo` command that uses an empty auth file and an accept-anything
/// policy kept in `work`, never the machine's own.
pub fn skopeo(work: &Path) -> std::process::Command {
    require_tool("skopeo", "skopeo");
    std::fs::write(work.join("auth.json"), "{}").expect("writing skopeo auth file");
    std::fs::write(
        work.join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .expect("writing skopeo policy");
    let mut c = std::process::Command::new("skopeo");
    c.env("REGISTRY_AUTH_FILE", work.join("auth.json"))
        .arg("--policy")
        .arg(work.join("policy.json"));
    c
}

/// Pushes `LAYOUT:TAG` to `docker://DEST` (plain HTTP) with skopeo.
pub fn push_layout(work: &Path, layout: &Path, tag: &str, dest: &str) {
    run(skopeo(work)
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dest}")));
}

/// A throwaway certificate authority and a server certificate it signed for
/// 127.0.0.1 and localhost, made with the openssl command line. Returns
/// (ca.pem, server.pem, server.key) under `dir`.
pub fn test_tls_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    require_tool("openssl", "openssl");
    std::fs::create_dir_all(dir).expect("certificate dir");
    let p = |n: &str| dir.join(n);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(std::process::Command::new("openssl")
        .args(["req", "-x509", "-days", "2", "-subj", "/CN=sluice test CA"])
        .args(ec)
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem")));
    run(std::process::Command::new("openssl")
        .args(["req", "-subj", "/CN=127.0.0.1"])
        .args(ec)
        .arg("-keyout")
        .arg(p("server.key"))
        .arg("-out")
        .arg(p("server.csr")));
    std::fs::write(
        p("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("extensions file");
    run(std::process::Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(p("server.csr"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-extfile")
        .arg(p("server.ext"))
        .arg("-out")
        .arg(p("server.pem")));
    (p("ca.pem"), p("server.pem"), p("server.key"))
}
