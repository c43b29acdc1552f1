//! Installing sluice on a node: `sluice-snapshotter install-node` and
//! `uninstall-node` (run by hand, by a systemd unit's `ExecStartPre`, or by
//! the DaemonSet's init container).
//!
//! Installing patches containerd's config ([`containerd_config`]), keeps the
//! original next to it (`config.toml.sluice-backup`, or a
//! `config.toml.sluice-created` marker when there was none) and restarts
//! containerd only when the file changed. Uninstalling puts the original
//! back byte for byte, unless the config was edited since, in which case
//! only sluice's settings are taken out and the backup is left for the
//! operator.

pub mod containerd_config;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use containerd_config::{ConfigError, Settings};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Config { path: String, source: ConfigError },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("restarting containerd with `{command}` failed: {reason}")]
    Restart { command: String, reason: String },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> InstallError {
    let context = context.into();
    move |source| InstallError::Io { context, source }
}

/// How containerd is restarted after its config changed.
#[derive(Debug, Clone, Default)]
pub struct Restart {
    /// The program and its arguments (split at whitespace; no shell is
    /// needed, the node image has none). Empty: do not restart.
    pub command: Vec<String>,
    /// Run it in the mount namespace of this process (by PID): `Some(1)`,
    /// the host's init with `hostPID`, is where `systemctl` and the system
    /// bus are: what an init container of the DaemonSet needs.
    pub namespace_of: Option<u32>,
}

/// What an install or uninstall did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The config already said that; nothing written, nothing restarted.
    Unchanged,
    /// The config was written and containerd restarted (if a command is set).
    Changed,
}

pub fn backup_path(config: &Path) -> PathBuf {
    with_suffix(config, ".sluice-backup")
}

pub fn created_marker(config: &Path) -> PathBuf {
    with_suffix(config, ".sluice-created")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}

/// The config's bytes, or `None` if it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, InstallError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

/// Replaces `path` atomically (temporary file in the same directory, fsync,
/// rename), keeping the mode and owner of the file it replaces. On failure
/// (a full disk) `path` is as it was and the temporary file is gone.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let tmp = with_suffix(path, ".sluice-tmp");
    let result = write_then_rename(path, &tmp, bytes);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn write_then_rename(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<(), InstallError> {
    let ctx = format!("writing {}", tmp.display());
    let mut f = std::fs::File::create(tmp).map_err(io(ctx.clone()))?;
    f.write_all(bytes).map_err(io(ctx.clone()))?;
    match std::fs::metadata(path) {
        Ok(meta) => {
            f.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(io(ctx.clone()))?;
            std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))
                .map_err(io(ctx.clone()))?;
        }
        Err(_) => f
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io(ctx.clone()))?,
    }
    f.sync_all().map_err(io(ctx))?;
    std::fs::rename(tmp, path).map_err(io(format!("replacing {}", path.display())))
}

fn config_error(path: &Path) -> impl FnOnce(ConfigError) -> InstallError + '_ {
    move |source| InstallError::Config {
        path: path.display().to_string(),
        source,
    }
}

/// Patches containerd's config at `config` and restarts containerd if the
/// file changed. The first change keeps the original as the backup; later
/// ones (a moved socket) keep that first backup.
pub fn install(
    config: &Path,
    settings: &Settings,
    restart: &Restart,
) -> Result<Outcome, InstallError> {
    let current = read_optional(config)?;
    let text = current.as_deref().unwrap_or("");
    let patched = containerd_config::patch(text, settings).map_err(config_error(config))?;
    if current.is_some() && patched == text {
        tracing::info!(config = %config.display(), "containerd's config already uses sluice; nothing to do");
        return Ok(Outcome::Unchanged);
    }
    let backup = backup_path(config);
    let marker = created_marker(config);
    if !backup.exists() && !marker.exists() {
        match &current {
            Some(original) => write_atomic(&backup, original.as_bytes())?,
            None => write_atomic(&marker, b"")?,
        }
    }
    write_atomic(config, patched.as_bytes())?;
    tracing::info!(config = %config.display(), backup = %backup.display(), "containerd's config now uses sluice");
    restart_containerd(restart)?;
    Ok(Outcome::Changed)
}

/// Takes sluice out of containerd's config: the backup back byte for byte if
/// nothing else changed since the install, else only sluice's settings
/// removed (the backup is then kept). Restarts containerd if the file changed.
pub fn uninstall(config: &Path, restart: &Restart) -> Result<Outcome, InstallError> {
    let current = read_optional(config)?;
    let backup = backup_path(config);
    let marker = created_marker(config);
    let original = read_optional(&backup)?;
    let created = marker.exists();
    let Some(current) = current else {
        tracing::info!(config = %config.display(), "no containerd config; nothing to undo");
        return Ok(Outcome::Unchanged);
    };
    let without = containerd_config::unpatch(&current).map_err(config_error(config))?;
    // Untouched since the install: the config is exactly what installing
    // (with the settings it carries) made of the original.
    let untouched_since = match (containerd_config::installed_settings(&current), &original) {
        (Some(settings), Some(o)) => {
            containerd_config::patch(o, &settings).map_err(config_error(&backup))? == current
        }
        (Some(settings), None) if created => {
            containerd_config::patch("", &settings).map_err(config_error(config))? == current
        }
        _ => false,
    };
    if untouched_since {
        match original {
            Some(o) => {
                write_atomic(config, o.as_bytes())?;
                std::fs::remove_file(&backup)
                    .map_err(io(format!("removing {}", backup.display())))?;
            }
            None => {
                std::fs::remove_file(config)
                    .map_err(io(format!("removing {}", config.display())))?;
                std::fs::remove_file(&marker)
                    .map_err(io(format!("removing {}", marker.display())))?;
            }
        }
        tracing::info!(config = %config.display(), "containerd's config restored from the backup");
    } else if without != current {
        write_atomic(config, without.as_bytes())?;
        if original.is_some() || created {
            tracing::warn!(config = %config.display(), backup = %backup.display(),
                "the config changed since sluice was installed: only sluice's settings were removed; the backup is kept");
        } else {
            tracing::info!(config = %config.display(), "sluice's settings removed (no backup was found)");
        }
    } else {
        tracing::info!(config = %config.display(), "containerd's config does not use sluice; nothing to do");
        return Ok(Outcome::Unchanged);
    }
    restart_containerd(restart)?;
    Ok(Outcome::Changed)
}

fn restart_containerd(restart: &Restart) -> Result<(), InstallError> {
    let Some((program, args)) = restart.command.split_first() else {
        tracing::info!(
            "not restarting containerd (no restart command); restart it to apply the config"
        );
        return Ok(());
    };
    let shown = restart.command.join(" ");
    let failed = |reason: String| InstallError::Restart {
        command: shown.clone(),
        reason,
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(pid) = restart.namespace_of {
        let path = format!("/proc/{pid}/ns/mnt");
        let ns = std::fs::File::open(&path).map_err(|e| {
            failed(format!(
                "opening {path} (needs a privileged container with hostPID): {e}"
            ))
        })?;
        use std::os::fd::AsRawFd;
        let fd = ns.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls: setns(2).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().map_err(|e| failed(e.to_string()))?;
        drop(ns);
        return check(out, failed);
    }
    let out = cmd.output().map_err(|e| failed(e.to_string()))?;
    check(out, failed)
}

fn check(
    out: std::process::Output,
    failed: impl Fn(String) -> InstallError,
) -> Result<(), InstallError> {
    if out.status.success() {
        tracing::info!("containerd restarted");
        Ok(())
    } else {
        Err(failed(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
