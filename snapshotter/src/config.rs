//! The daemon's configuration: one TOML file, every field optional with the
//! default documented here; command-line flags override it.
//!
//! ```toml
//! root = "/var/lib/sluice"                  # metadata, snapshots, chunk cache
//! address = "/run/sluice/snapshotter.sock"  # containerd's proxy_plugins address
//! metrics_address = "127.0.0.1:9711"        # GET /metrics and /healthz; "" = off
//!
//! [lazy]
//! enabled = true            # false: behave exactly like the overlayfs snapshotter
//! passthrough = true        # FUSE passthrough for fully cached files (kernel >= 6.9)
//! read_deadline_secs = 60   # a read waiting longer for the registry fails with EIO
//! fuse_threads = 4          # request threads per mounted layer
//! fetch_ahead_kib = 512     # a read that must fetch also takes the chunks after
//!                           # it in the layer (neighbouring files), up to this
//!                           # much compressed data, in a parallel request; 0 = off
//! whole_at_open_mib = 64    # a cached file is copied into one piece for passthrough
//!                           # at open up to this size; larger, in the background
//! follow_imports = true     # fetch what a program being loaded loads next: the
//!                           # modules an opened Python module (.pyc) imports, the
//!                           # libraries an ELF program or library needs (and
//!                           # theirs as they arrive), instead of a round trip each
//! follow_command = true     # when an image without a prefetch profile is pulled,
//!                           # fetch what its command (Entrypoint + Cmd) loads first
//!                           # while the container is created: the program, its
//!                           # loader and libraries, a Python main module's imports;
//!                           # with or without a profile, the image's /etc/passwd
//!                           # and /etc/group, which containerd and runc read first
//!                           # (needs follow_imports)
//! native = true             # a layer whose every chunk is cached is written as an
//!                           # EROFS image and mounted over its FUSE mount: containers
//!                           # created from then on read it with no daemon round trip
//!                           # (costs the layer's size again on disk)
//! fill = true               # after a layer is mounted (and its profile prefetched),
//!                           # fetch the rest of it in the background, at the lowest
//!                           # priority, two requests at a time: with `native`, every
//!                           # layer becomes native (not layers over half the cache)
//! fill_quiet_secs = 10      # fill runs only once no read had to fetch and no layer
//!                           # was mounted for this long: starts keep the link
//!
//! [cache]
//! max_mib = 10240           # chunk cache bound; least recently used chunks go first
//!
//! [profiles]
//! record = true             # record what starting containers read (eBPF, else FUSE)
//! ebpf = true               # false: record from FUSE only, never load eBPF
//! window_secs = 10          # how long after a container's first access to record
//! publish = true            # push recordings to the registry (merged, as referrers)
//! prefetch = true           # fetch an image's newest profile on pull and prefetch it
//! prefetch_concurrency = 4  # profile batches (512 KiB each) fetched at once
//!
//! [registry]
//! hosts_dir = "/etc/sluice/certs.d"   # <host>/hosts.toml, as containerd's config_path
//! docker_config = ""                  # docker config.json with credentials; "" = none
//!
//! [cri]
//! address = ""              # CRI image-service proxy socket for kubelet's
//!                           # --image-service-endpoint; "" = off
//! containerd_address = "/run/containerd/containerd.sock"  # where it forwards
//! ```

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub root: PathBuf,
    pub address: PathBuf,
    pub metrics_address: String,
    pub lazy: LazyConfig,
    pub cache: CacheConfig,
    pub profiles: ProfilesConfig,
    pub registry: RegistryConfig,
    pub cri: CriConfig,
}

/// The CRI image-service proxy: kubelet pulls through it, so the credentials
/// of its image pull secrets reach lazy pulls too.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriConfig {
    pub address: PathBuf,
    pub containerd_address: PathBuf,
}

impl Default for CriConfig {
    fn default() -> Self {
        CriConfig {
            address: PathBuf::new(),
            containerd_address: "/run/containerd/containerd.sock".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfilesConfig {
    pub record: bool,
    pub ebpf: bool,
    pub window_secs: u64,
    pub publish: bool,
    pub prefetch: bool,
    pub prefetch_concurrency: usize,
}

impl Default for ProfilesConfig {
    fn default() -> Self {
        ProfilesConfig {
            record: true,
            ebpf: true,
            window_secs: 10,
            publish: true,
            prefetch: true,
            prefetch_concurrency: 4,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LazyConfig {
    pub enabled: bool,
    pub passthrough: bool,
    pub read_deadline_secs: u64,
    pub fuse_threads: usize,
    pub fetch_ahead_kib: u64,
    pub whole_at_open_mib: u64,
    pub follow_imports: bool,
    pub follow_command: bool,
    pub native: bool,
    pub fill: bool,
    pub fill_quiet_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    pub max_mib: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    pub hosts_dir: PathBuf,
    pub docker_config: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: "/var/lib/sluice".into(),
            address: "/run/sluice/snapshotter.sock".into(),
            metrics_address: "127.0.0.1:9711".into(),
            lazy: LazyConfig::default(),
            cache: CacheConfig::default(),
            profiles: ProfilesConfig::default(),
            registry: RegistryConfig::default(),
            cri: CriConfig::default(),
        }
    }
}

impl Default for LazyConfig {
    fn default() -> Self {
        LazyConfig {
            enabled: true,
            passthrough: true,
            read_deadline_secs: 60,
            fuse_threads: 4,
            fetch_ahead_kib: sluice_puller::layer::DEFAULT_FETCH_AHEAD >> 10,
            whole_at_open_mib: sluice_puller::fs::FsOptions::default().whole_at_open_max >> 20,
            follow_imports: sluice_puller::fs::FsOptions::default().follow_imports,
            follow_command: true,
            native: true,
            fill: true,
            fill_quiet_secs: sluice_puller::prefetch::DEFAULT_FILL_QUIET.as_secs(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { max_mib: 10240 }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            hosts_dir: "/etc/sluice/certs.d".into(),
            docker_config: PathBuf::new(),
        }
    }
}

impl Config {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.root, PathBuf::from("/var/lib/sluice"));
        assert!(c.lazy.enabled);
        let c = Config::parse("root = '/x'\n[lazy]\npassthrough = false\n").unwrap();
        assert_eq!(c.root, PathBuf::from("/x"));
        assert!(!c.lazy.passthrough);
        assert_eq!(c.lazy.read_deadline_secs, 60);
        assert!(c.lazy.fill && c.lazy.native);
        assert_eq!(c.lazy.fill_quiet_secs, 10);
        let c = Config::parse("[lazy]\nfill_quiet_secs = 0\n").unwrap();
        assert_eq!((c.lazy.fill, c.lazy.fill_quiet_secs), (true, 0));
        let e = Config::parse("[lazy]\npasthrough = false\n").unwrap_err();
        assert!(e.to_string().contains("pasthrough"), "{e}");
    }
}
