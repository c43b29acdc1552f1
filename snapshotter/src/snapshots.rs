//! Snapshots with the semantics of containerd's overlayfs snapshotter.
//!
//! On disk, under the daemon root:
//! ```text
//! metadata.redb              every snapshot's record (see metadata)
//! snapshots/<id>/fs          the snapshot's files: the upper dir of an active
//!                            snapshot, or the mount point of a lazy layer
//! snapshots/<id>/work        overlayfs work dir (active snapshots)
//! ```
//! An active snapshot with parents is an overlay mount (upper = its fs, lower
//! = the parents' fs, nearest first); without parents a bind mount. A view is
//! read-only: a bind mount of its single parent, or an overlay of lower dirs.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::api::Mount;
use crate::error::SnapshotError;
use crate::filters::{Fields, Filter};
use crate::metadata::{now_nanos, Kind, Record, RemoteSource, Store};

/// containerd's limit on one label (key plus value).
const MAX_LABEL_BYTES: usize = 4096;

pub struct Snapshotter {
    dir: PathBuf,
    store: Store,
    overlay_index_param: bool,
    /// Held while a snapshot's directories are made and its record
    /// committed, and through a Cleanup: otherwise a Cleanup finds the new
    /// directories before their record and removes them, and overlayfs
    /// then fails on a missing `work` directory (seen in the containerd
    /// tests: a Cleanup after a pull's lease went, beside the `Prepare` of
    /// a container).
    dirs: std::sync::Mutex<()>,
}

/// A snapshot's public description (containerd's `Info`).
#[derive(Debug, Clone)]
pub struct Info {
    pub name: String,
    pub record: Record,
}

impl Fields for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "name" => Some(self.name.clone()),
            // Always present, empty for a base layer, as in containerd.
            [f] if f == "parent" => Some(self.record.parent.clone().unwrap_or_default()),
            [f] if f == "kind" => Some(self.record.kind.as_str().to_owned()),
            [f, rest @ ..] if f == "labels" && !rest.is_empty() => {
                self.record.labels.get(&rest.join(".")).cloned()
            }
            _ => None,
        }
    }
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), SnapshotError> {
    for (k, v) in labels {
        if k.len() + v.len() > MAX_LABEL_BYTES {
            return Err(SnapshotError::InvalidArgument(format!(
                "label {k:?} is longer than {MAX_LABEL_BYTES} bytes"
            )));
        }
    }
    Ok(())
}

/// Unmounts everything mounted at `path` (lazily, so a busy mount cannot
/// block), ignoring "not mounted".
pub fn detach_mount(path: &Path) {
    // A layer's mount can have its native (EROFS) mount on top: detach
    // every mount stacked there (a bound keeps a misbehaving kernel from
    // looping forever).
    for _ in 0..8 {
        if !sluice_puller::fs::detach(path) {
            break;
        }
    }
}

/// Disk usage of a tree as `du` counts it: allocated blocks of each inode
/// once, and the number of inodes. Does not cross into other filesystems.
pub fn disk_usage(root: &Path) -> std::io::Result<(i64, i64)> {
    let top = std::fs::symlink_metadata(root)?;
    let mut seen = HashSet::new();
    let (mut size, mut inodes) = (0i64, 0i64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p)?;
        if md.dev() != top.dev() {
            continue;
        }
        if seen.insert(md.ino()) {
            inodes += 1;
            size += (md.blocks() * 512) as i64;
        }
        if md.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok((size, inodes))
}

impl Snapshotter {
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        let dir = root.join("snapshots");
        std::fs::create_dir_all(&dir)
            .map_err(|e| SnapshotError::io(format!("creating {}", dir.display()), e))?;
        let store = Store::open(&root.join("metadata.redb"))?;
        Ok(Snapshotter {
            dir,
            store,
            overlay_index_param: Path::new("/sys/module/overlay/parameters/index").exists(),
            dirs: Default::default(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string())
    }

    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    /// Creates an active (or, with `kind` View, read-only) snapshot.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Record, SnapshotError> {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument("empty snapshot key".into()));
        }
        check_labels(&labels)?;
        let now = now_nanos();
        let record = Record {
            id: 0,
            kind,
            parent: (!parent.is_empty()).then(|| parent.to_owned()),
            labels,
            created: now,
            updated: now,
            size: 0,
            inodes: 0,
            remote: None,
        };
        let _dirs = self.dirs.lock().expect("snapshot directories");
        self.store.create(key, record, |id| {
            let d = self.snapshot_dir(id);
            // A leftover of a crash between mkdir and commit has this id: reuse.
            detach_mount(&d.join("fs"));
            let _ = std::fs::remove_dir_all(&d);
            let mk = |p: PathBuf| {
                std::fs::create_dir_all(&p)
                    .map_err(|e| SnapshotError::io(format!("creating {}", p.display()), e))
            };
            mk(d.join("fs"))?;
            if kind == Kind::Active {
                mk(d.join("work"))?;
            }
            Ok(())
        })
    }

    /// The ids of `parent` and its ancestors, nearest first.
    fn chain(&self, parent: Option<&str>) -> Result<Vec<u64>, SnapshotError> {
        Ok(self
            .ancestors(parent)?
            .into_iter()
            .map(|(_, r)| r.id)
            .collect())
    }

    /// `parent` and its ancestors with their records, nearest first.
    pub fn ancestors(&self, parent: Option<&str>) -> Result<Vec<(String, Record)>, SnapshotError> {
        let mut out = Vec::new();
        let mut next = parent.map(str::to_owned);
        while let Some(name) = next {
            let r = self
                .store
                .get(&name)?
                .ok_or_else(|| SnapshotError::NotFound(format!("parent {name}")))?;
            next = r.parent.clone();
            out.push((name, r));
            if out.len() > 10_000 {
                return Err(SnapshotError::Store("parent chain loops".into()));
            }
        }
        Ok(out)
    }

    /// How to mount snapshot `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let r = self.store.require(key)?;
        if r.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is committed; only active and view snapshots have mounts"
            )));
        }
        self.mounts_of(&r)
    }

    pub fn mounts_of(&self, r: &Record) -> Result<Vec<Mount>, SnapshotError> {
        let parents = self.chain(r.parent.as_deref())?;
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let bind = |source: PathBuf, rw: bool| Mount {
            r#type: "bind".into(),
            source: path(source),
            target: String::new(),
            options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
        };
        let lowerdir = || {
            let dirs: Vec<String> = parents.iter().map(|id| path(self.fs_dir(*id))).collect();
            format!("lowerdir={}", dirs.join(":"))
        };
        Ok(match (r.kind, parents.len()) {
            (Kind::Active, 0) => vec![bind(self.fs_dir(r.id), true)],
            (Kind::View | Kind::Committed, 0) => vec![bind(self.fs_dir(r.id), false)],
            (Kind::View | Kind::Committed, 1) => vec![bind(self.fs_dir(parents[0]), false)],
            (Kind::View | Kind::Committed, _) => vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![lowerdir()],
            }],
            (Kind::Active, _) => {
                let mut options = Vec::new();
                if self.overlay_index_param {
                    // Lower layers may be FUSE mounts: no overlay index.
                    options.push("index=off".into());
                }
                options.push(format!(
                    "workdir={}",
                    path(self.snapshot_dir(r.id).join("work"))
                ));
                options.push(format!("upperdir={}", path(self.fs_dir(r.id))));
                options.push(lowerdir());
                vec![Mount {
                    r#type: "overlay".into(),
                    source: "overlay".into(),
                    target: String::new(),
                    options,
                }]
            }
        })
    }

    /// Commits active snapshot `key` as `name`. `remote` carries the usage
    /// and source of a lazily mounted layer; otherwise usage is measured.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        remote: Option<(RemoteSource, (i64, i64))>,
    ) -> Result<Record, SnapshotError> {
        if name.is_empty() {
            return Err(SnapshotError::InvalidArgument("empty snapshot name".into()));
        }
        check_labels(&labels)?;
        let r = self.store.require(key)?;
        if r.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is {}, only active snapshots can be committed",
                r.kind.as_str()
            )));
        }
        let (usage, source) = match remote {
            Some((source, usage)) => (usage, Some(source)),
            None => {
                let fs = self.fs_dir(r.id);
                let usage = disk_usage(&fs).map_err(|e| {
                    SnapshotError::io(format!("measuring usage of {}", fs.display()), e)
                })?;
                (usage, None)
            }
        };
        self.store.commit(key, name, labels, usage, source)
    }

    /// Removes the record of `key`; the caller then unmounts anything lazy and
    /// calls [`remove_dirs`](Self::remove_dirs).
    pub fn remove(&self, key: &str) -> Result<Record, SnapshotError> {
        self.store.remove(key)
    }

    /// Deletes a snapshot's directories, first detaching anything mounted there.
    pub fn remove_dirs(&self, id: u64) -> Result<(), SnapshotError> {
        let d = self.snapshot_dir(id);
        detach_mount(&d.join("fs"));
        match std::fs::remove_dir_all(&d) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SnapshotError::io(format!("removing {}", d.display()), e)),
        }
    }

    pub fn stat(&self, key: &str) -> Result<Info, SnapshotError> {
        Ok(Info {
            name: key.to_owned(),
            record: self.store.require(key)?,
        })
    }

    /// Records the usage of committed snapshot `name` (a lazy layer's,
    /// known once its index is built).
    pub fn set_usage(&self, name: &str, usage: (i64, i64)) -> Result<(), SnapshotError> {
        self.store.update(name, |r| {
            (r.size, r.inodes) = usage;
            Ok(())
        })?;
        Ok(())
    }

    /// Updates labels as containerd does: with no paths all labels are
    /// replaced; "labels" replaces all; "labels.K" sets (or, if empty,
    /// deletes) one. Other fields are immutable.
    pub fn update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Info, SnapshotError> {
        check_labels(&labels)?;
        for p in paths {
            if p != "labels" && !p.starts_with("labels.") {
                return Err(SnapshotError::InvalidArgument(format!(
                    "cannot update field {p:?} of snapshot {name}: only labels are mutable"
                )));
            }
        }
        let record = self.store.update(name, |r| {
            if paths.is_empty() || paths.iter().any(|p| p == "labels") {
                r.labels = labels.clone();
            }
            for p in paths {
                if let Some(k) = p.strip_prefix("labels.") {
                    match labels.get(k).filter(|v| !v.is_empty()) {
                        Some(v) => r.labels.insert(k.to_owned(), v.clone()),
                        None => r.labels.remove(k),
                    };
                }
            }
            Ok(())
        })?;
        Ok(Info {
            name: name.to_owned(),
            record,
        })
    }

    pub fn list(&self, filter: &Filter) -> Result<Vec<Info>, SnapshotError> {
        Ok(self
            .store
            .list()?
            .into_iter()
            .map(|(name, record)| Info { name, record })
            .filter(|i| filter.matches(i))
            .collect())
    }

    /// Disk usage: measured now for active snapshots, fixed at commit for
    /// committed ones.
    pub fn usage(&self, key: &str) -> Result<(i64, i64), SnapshotError> {
        let r = self.store.require(key)?;
        match r.kind {
            Kind::Active => {
                let fs = self.fs_dir(r.id);
                disk_usage(&fs).map_err(|e| {
                    SnapshotError::io(format!("measuring usage of {}", fs.display()), e)
                })
            }
            _ => Ok((r.size, r.inodes)),
        }
    }

    /// Removes directories no record refers to (left by crashes or by
    /// removals interrupted half-way). Returns how many.
    pub fn cleanup(&self) -> Result<usize, SnapshotError> {
        let _dirs = self.dirs.lock().expect("snapshot directories");
        let known: HashSet<u64> = self.store.list()?.iter().map(|(_, r)| r.id).collect();
        let mut removed = 0;
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| SnapshotError::io(format!("listing {}", self.dir.display()), e))?;
        for e in entries {
            let e = e.map_err(|e| SnapshotError::io("listing snapshots", e))?;
            let id = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok());
            match id {
                Some(id) if !known.contains(&id) => {
                    self.remove_dirs(id)?;
                    removed += 1;
                }
                _ => {}
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Cleanup asked for while a snapshot is being created (its
    /// directories made, its record not yet committed) waits for it and
    /// leaves them alone; a leftover no record owns is removed.
    #[test]
    fn cleanup_leaves_a_snapshot_being_created_alone() {
        let dir = tempfile::tempdir().unwrap();
        let core = std::sync::Arc::new(Snapshotter::open(dir.path()).unwrap());
        std::fs::create_dir_all(core.snapshot_dir(999).join("fs")).unwrap();
        let record = Record {
            id: 0,
            kind: Kind::Active,
            parent: None,
            labels: BTreeMap::new(),
            created: 0,
            updated: 0,
            size: 0,
            inodes: 0,
            remote: None,
        };
        // What `create` does, with a Cleanup asked for in the middle.
        let guard = core.dirs.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let created = core
            .store()
            .create("new", record, |id| {
                std::fs::create_dir_all(core.snapshot_dir(id).join("work")).unwrap();
                let c = core.clone();
                std::thread::spawn(move || tx.send(c.cleanup().unwrap()));
                // Without the lock it is done long before this.
                let early = rx.recv_timeout(std::time::Duration::from_millis(300));
                assert!(early.is_err(), "cleanup ran meanwhile: {early:?}");
                Ok(())
            })
            .unwrap();
        drop(guard);
        let removed = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("cleanup finishes once the record is there");
        assert_eq!(removed, 1, "only the leftover");
        assert!(!core.snapshot_dir(999).exists());
        assert!(core.snapshot_dir(created.id).join("work").exists());
    }
}
