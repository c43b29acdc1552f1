//! The overlayfs snapshotter's semantics, checked over gRPC against the
//! daemon, modelled on containerd's snapshotter test suite: prepare/commit
//! chains whose mounts really stack, views, removal order, labels, walk
//! filters, usage, cleanup, errors and restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::*;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::Code;
use sluice_snapshotter::{Config, Daemon};
use tokio::sync::oneshot;

struct Harness {
    client: SnapshotsClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    root: PathBuf,
}

async fn start(root: &Path) -> Harness {
    let config = Config {
        root: root.to_owned(),
        address: root.join("snapshotter.sock"),
        metrics_address: String::new(),
        ..Config::default()
    };
    let socket = config.address.clone();
    let daemon = Daemon::open(config, tokio::runtime::Handle::current()).expect("daemon opens");
    daemon.restore().await.expect("restore");
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        daemon
            .serve(async {
                let _ = rx.await;
            })
            .await
            .expect("daemon serves");
    });
    // Until it answers: after a restart the old daemon's socket file is
    // there before the new daemon listens on it.
    let mut tries = 0;
    let channel = loop {
        match containerd_client::connect(&socket).await {
            Ok(c) => break c,
            Err(e) if tries == 500 => panic!("connect: {e}"),
            Err(_) => tries += 1,
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    Harness {
        client: SnapshotsClient::new(channel),
        stop: Some(tx),
        task: Some(task),
        root: root.to_owned(),
    }
}

impl Harness {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }

    async fn prepare(&mut self, key: &str, parent: &str) -> Vec<containerd_client::types::Mount> {
        self.client
            .prepare(PrepareSnapshotRequest {
                key: key.into(),
                parent: parent.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("prepare {key}: {e}"))
            .into_inner()
            .mounts
    }

    async fn view(&mut self, key: &str, parent: &str) -> Vec<containerd_client::types::Mount> {
        self.client
            .view(ViewSnapshotRequest {
                key: key.into(),
                parent: parent.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("view {key}: {e}"))
            .into_inner()
            .mounts
    }

    async fn commit(&mut self, name: &str, key: &str) -> Result<(), Code> {
        self.client
            .commit(CommitSnapshotRequest {
                name: name.into(),
                key: key.into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| e.code())
    }

    async fn remove(&mut self, key: &str) -> Result<(), Code> {
        self.client
            .remove(RemoveSnapshotRequest {
                key: key.into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| e.code())
    }

    async fn stat(&mut self, key: &str) -> Result<Info, Code> {
        self.client
            .stat(StatSnapshotRequest {
                key: key.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().info.unwrap())
            .map_err(|e| e.code())
    }

    async fn list(&mut self, filters: &[&str]) -> Result<Vec<String>, Code> {
        let mut stream = self
            .client
            .list(ListSnapshotsRequest {
                filters: filters.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .await
            .map_err(|e| e.code())?
            .into_inner();
        let mut names = Vec::new();
        while let Some(batch) = stream.message().await.map_err(|e| e.code())? {
            names.extend(batch.info.into_iter().map(|i| i.name));
        }
        names.sort();
        Ok(names)
    }
}

/// Mounts what the snapshotter returned at `target`, as containerd would.
fn mount(mounts: &[containerd_client::types::Mount], target: &Path) -> MountGuard {
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let m = &mounts[0];
    std::fs::create_dir_all(target).unwrap();
    let mut cmd = Command::new("mount");
    if m.r#type != "bind" {
        cmd.args(["-t", &m.r#type]);
    }
    cmd.arg("-o")
        .arg(m.options.join(","))
        .arg(&m.source)
        .arg(target);
    sluice_testkit::run(&mut cmd);
    MountGuard(target.to_owned())
}

struct MountGuard(PathBuf);
impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn needs_root() -> bool {
    if !sluice_testkit::is_root() {
        eprintln!("SKIP: snapshotter semantics need root (mounts)");
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_stack_and_views_are_read_only() {
    if !needs_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut h = start(&tmp.path().join("root")).await;
    let mnt = tmp.path().join("mnt");

    // Base layer: a bind mount, written through.
    let m = h.prepare("base-active", "").await;
    assert_eq!(m[0].r#type, "bind");
    {
        let _g = mount(&m, &mnt);
        std::fs::write(mnt.join("a"), "base a").unwrap();
        std::fs::write(mnt.join("gone"), "to be deleted").unwrap();
        std::fs::create_dir(mnt.join("dir")).unwrap();
    }
    h.commit("base", "base-active").await.unwrap();
    assert_eq!(h.stat("base").await.unwrap().kind, Kind::Committed as i32);
    assert_eq!(h.stat("base-active").await.unwrap_err(), Code::NotFound);

    // Second layer on top: an overlay; changes land in the upper dir only.
    let m = h.prepare("top-active", "base").await;
    assert_eq!(m[0].r#type, "overlay");
    {
        let _g = mount(&m, &mnt);
        assert_eq!(std::fs::read_to_string(mnt.join("a")).unwrap(), "base a");
        std::fs::write(mnt.join("a"), "top a").unwrap();
        std::fs::remove_file(mnt.join("gone")).unwrap();
        std::fs::write(mnt.join("dir/b"), "top b").unwrap();
    }
    h.commit("top", "top-active").await.unwrap();

    // A view of the top: sees both layers merged, deletions included.
    let m = h.view("v", "top").await;
    {
        let _g = mount(&m, &mnt);
        assert_eq!(std::fs::read_to_string(mnt.join("a")).unwrap(), "top a");
        assert_eq!(std::fs::read_to_string(mnt.join("dir/b")).unwrap(), "top b");
        assert!(!mnt.join("gone").exists());
        assert!(std::fs::write(mnt.join("new"), "x").is_err());
        assert!(!mnt.join("new").exists());
    }
    // A view of a single layer is a read-only bind mount of it.
    let m = h.view("v1", "base").await;
    assert_eq!(m[0].r#type, "bind");
    assert!(m[0].options.contains(&"ro".to_string()));
    {
        let _g = mount(&m, &mnt);
        assert_eq!(std::fs::read_to_string(mnt.join("a")).unwrap(), "base a");
        assert!(mnt.join("gone").exists());
    }
    // The base layer itself was not changed by the upper one.
    let base_id = h.list(&[]).await.unwrap();
    assert_eq!(base_id, ["base", "top", "v", "v1"]);

    // Views cannot be committed; Mounts answers for active and view only.
    assert_eq!(
        h.commit("x", "v").await.unwrap_err(),
        Code::FailedPrecondition
    );
    let err = h
        .client
        .mounts(MountsRequest {
            key: "top".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let again = h
        .client
        .mounts(MountsRequest {
            key: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(again, m_of(&mut h, "v").await);
    h.stop().await;
}

async fn m_of(h: &mut Harness, key: &str) -> Vec<containerd_client::types::Mount> {
    h.client
        .mounts(MountsRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .mounts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_order_errors_and_cleanup() {
    if !needs_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut h = start(&tmp.path().join("root")).await;
    h.prepare("a", "").await;
    // Same key twice; parent that does not exist or is not committed.
    let dup = h
        .client
        .prepare(PrepareSnapshotRequest {
            key: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let orphan = h
        .client
        .prepare(PrepareSnapshotRequest {
            key: "b".into(),
            parent: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(orphan.code(), Code::NotFound, "{orphan}");
    let uncommitted = h
        .client
        .prepare(PrepareSnapshotRequest {
            key: "b".into(),
            parent: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        uncommitted.code(),
        Code::FailedPrecondition,
        "{uncommitted}"
    );
    assert_eq!(h.commit("x", "nope").await.unwrap_err(), Code::NotFound);

    h.commit("a-c", "a").await.unwrap();
    h.prepare("b", "a-c").await;
    h.commit("b-c", "b").await.unwrap();
    h.view("v", "b-c").await;
    // A parent with children cannot go; leaves first, then it can.
    assert_eq!(h.remove("a-c").await.unwrap_err(), Code::FailedPrecondition);
    assert_eq!(h.remove("b-c").await.unwrap_err(), Code::FailedPrecondition);
    h.remove("v").await.unwrap();
    h.remove("b-c").await.unwrap();
    h.remove("a-c").await.unwrap();
    assert_eq!(h.remove("a-c").await.unwrap_err(), Code::NotFound);
    assert!(h.list(&[]).await.unwrap().is_empty());
    let dirs = std::fs::read_dir(h.root.join("snapshots")).unwrap().count();
    assert_eq!(dirs, 0, "removed snapshots leave no directories");

    // A directory no record owns (an interrupted operation) goes on Cleanup.
    std::fs::create_dir_all(h.root.join("snapshots/999/fs")).unwrap();
    h.client.cleanup(CleanupRequest::default()).await.unwrap();
    assert!(!h.root.join("snapshots/999").exists());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_walk_filters_usage_and_restart() {
    if !needs_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let mut h = start(&root).await;
    let labels = HashMap::from([
        (
            "containerd.io/snapshot.ref".to_string(),
            "sha256:aaa".to_string(),
        ),
        ("team".to_string(), "ml".to_string()),
    ]);
    let m = h
        .client
        .prepare(PrepareSnapshotRequest {
            key: "l1".into(),
            labels: labels.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    {
        let mnt = tmp.path().join("mnt");
        let _g = mount(&m, &mnt);
        std::fs::write(mnt.join("payload"), vec![7u8; 1 << 20]).unwrap();
    }
    let usage = h
        .client
        .usage(UsageRequest {
            key: "l1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(usage.size >= 1 << 20, "{usage:?}");
    assert_eq!(usage.inodes, 2, "the root dir and one file: {usage:?}");
    h.client
        .commit(CommitSnapshotRequest {
            name: "l1-c".into(),
            key: "l1".into(),
            labels: labels.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let committed_usage = h
        .client
        .usage(UsageRequest {
            key: "l1-c".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(committed_usage, usage, "usage is fixed at commit");
    h.prepare("l2", "l1-c").await;

    // Update: one label by path, then all labels; other fields are immutable.
    let mut info = h.stat("l1-c").await.unwrap();
    info.labels = HashMap::from([("team".to_string(), "infra".to_string())]);
    let updated = h
        .client
        .update(UpdateSnapshotRequest {
            info: Some(info.clone()),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.team".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(updated.labels["team"], "infra");
    assert_eq!(updated.labels["containerd.io/snapshot.ref"], "sha256:aaa");
    let bad = h
        .client
        .update(UpdateSnapshotRequest {
            info: Some(info.clone()),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // Walk with containerd's filter syntax, including the filter its metadata
    // layer sends to find a remote snapshot.
    assert_eq!(h.list(&["kind==committed"]).await.unwrap(), ["l1-c"]);
    assert_eq!(h.list(&["kind==active"]).await.unwrap(), ["l2"]);
    assert_eq!(h.list(&["parent==l1-c"]).await.unwrap(), ["l2"]);
    assert_eq!(
        h.list(&[r#"labels."containerd.io/snapshot.ref"==sha256:aaa,parent=="""#])
            .await
            .unwrap(),
        ["l1-c"]
    );
    assert_eq!(
        h.list(&["labels.team==infra", "name==l2"]).await.unwrap(),
        ["l1-c", "l2"]
    );
    assert_eq!(h.list(&["name~=^l[0-9]$"]).await.unwrap(), ["l2"]);
    assert_eq!(
        h.list(&["kind=="]).await.unwrap_err(),
        Code::InvalidArgument
    );

    // Restart: everything is still there, with the same mounts.
    let before = m_of(&mut h, "l2").await;
    let created = h.stat("l1-c").await.unwrap().created_at;
    h.stop().await;
    let mut h = start(&root).await;
    assert_eq!(h.list(&[]).await.unwrap(), ["l1-c", "l2"]);
    assert_eq!(m_of(&mut h, "l2").await, before);
    let info = h.stat("l1-c").await.unwrap();
    assert_eq!(info.created_at, created);
    assert_eq!(info.labels["team"], "infra");
    h.stop().await;
}
