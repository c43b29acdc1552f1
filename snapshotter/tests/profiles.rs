//! Prefetch profiles end to end, with eBPF loaded into this kernel: a
//! container started through containerd is recorded on one node, its profile
//! is pushed to the registry, and a second node with an empty cache fetches
//! the container's working set by prefetch before the container runs.

mod common;

use std::time::Duration;

use common::{needs_root, node_with, wait_for, Node};
use sluice_puller::registry::RetryPolicy;
use sluice_puller::{ImageRef, RegistryClient};

/// Files the test container reads, besides what python3 itself loads.
const FILES: [&str; 4] = [
    "/usr/lib/python3.11/json/decoder.py",
    "/usr/lib/python3.11/textwrap.py",
    "/usr/lib/python3.11/csv.py",
    "/etc/debian_version",
];

fn script() -> String {
    format!(
        "import hashlib\nprint('ready')\nfor p in {FILES:?}:\n    print(hashlib.sha256(open(p, 'rb').read()).hexdigest()[:12], p)\n"
    )
}

fn daemon_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("snapshotter.toml");
    std::fs::write(&path, "[profiles]\nwindow_secs = 4\n").unwrap();
    path
}

async fn metric(node: &Node, name: &str) -> f64 {
    node.snapshotter.metric(name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_on_one_node_prefetched_on_the_next() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_reg, reference, _, _) = common::python3_registry(dir.path());
    let config = daemon_config(dir.path());
    let args = ["--config", config.to_str().unwrap()];

    // Node 1 records the container's start.
    let node1 = node_with(&dir.path().join("node1"), &args);
    assert!(
        node1.snapshotter.log().contains("eBPF access tracing on"),
        "{}",
        node1.snapshotter.log()
    );
    node1.pull(&reference);
    let out = node1.run(&reference, "rec1", &["python3", "-c", &script()]);
    assert!(out.starts_with("ready\n"), "{out}");
    wait_for("a published profile", Duration::from_secs(30), async || {
        metric(&node1, "sluice_snapshotter_profiles_published_total").await >= 1.0
    })
    .await;
    assert_eq!(
        metric(&node1, "sluice_snapshotter_trace_dropped_events").await,
        0.0
    );
    // python3 runs from the lazy layers: its code arrives by page faults,
    // which this kernel reports.
    for kind in ["read", "fault"] {
        let n = metric(
            &node1,
            &format!("sluice_snapshotter_trace_events{{kind=\"{kind}\"}}"),
        )
        .await;
        assert!(n > 0.0, "no {kind} recorded");
    }

    // The profile in the registry lists the files the container read.
    let client = RegistryClient::new(RetryPolicy::default());
    let image = ImageRef::parse(&reference).unwrap();
    let (_, _, manifest) = client.manifest(&image).await.unwrap();
    let profile = sluice_puller::profile::fetch_newest(&client, &image, &manifest)
        .await
        .unwrap()
        .expect("a profile referring to the image");
    let paths: std::collections::HashSet<&str> =
        profile.entries.iter().map(|e| e.path.as_str()).collect();
    for f in FILES {
        assert!(
            paths.contains(f.trim_start_matches('/')),
            "{f} missing from the profile ({} entries)\n{}",
            profile.entries.len(),
            node1.snapshotter.log()
        );
    }
    assert!(
        paths.iter().any(|p| p.contains("bin/python3")),
        "the interpreter itself"
    );
    println!(
        "profile: {} entries, {} KiB, {} files",
        profile.entries.len(),
        profile.bytes() / 1024,
        paths.len()
    );
    drop(node1);

    // Node 2: a fresh daemon root (empty cache) and a fresh containerd.
    let node2 = node_with(&dir.path().join("node2"), &args);
    node2.pull(&reference);
    // Prefetch runs in the background after the pull; let it finish so that
    // what is measured is the profile's coverage, not a race.
    let mut last = -1.0;
    wait_for("prefetch to settle", Duration::from_secs(60), async || {
        let now = metric(&node2, "sluice_puller_layer_prefetched_bytes_total").await;
        let settled = now > 0.0 && now == last;
        last = now;
        settled
    })
    .await;
    let out = node2.run(&reference, "rec2", &["python3", "-c", &script()]);
    assert!(out.starts_with("ready\n"), "{out}");
    let demanded = metric(&node2, "sluice_puller_layer_demanded_bytes_total").await;
    let prefetched = metric(&node2, "sluice_puller_layer_prefetched_bytes_total").await;
    let hits = metric(&node2, "sluice_puller_layer_prefetch_hit_bytes_total").await;
    let share = hits / demanded;
    let waste = (prefetched - hits) / prefetched;
    println!(
        "node 2: readers needed {demanded} B of chunks, prefetch brought {prefetched} B of which \
         {hits} B were used: {:.1}% of the start's reads from prefetched chunks, {:.1}% of \
         prefetch unused",
        share * 100.0,
        waste * 100.0
    );
    assert!(
        share >= 0.90,
        "only {:.1}% of reads hit prefetched chunks",
        share * 100.0
    );
    assert!(
        waste <= 0.20,
        "{:.1}% of prefetched bytes unused",
        waste * 100.0
    );
}
