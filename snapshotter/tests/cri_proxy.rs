//! The CRI image-service proxy with a real containerd 1.6 CRI plugin: a
//! kubelet-style `PullImage` with credentials goes through sluice's proxy,
//! containerd pulls with them, and the lazy mounts it triggers fetch with
//! them too (the daemon has no credentials of its own).

mod common;

use std::path::Path;

use bytes::Bytes;
use common::{needs_root, private_busybox};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use sluice_snapshotter::cri_proxy::messages::{
    AuthConfig, ImageSpec, PullImageRequest, PullImageResponse,
};
use sluice_testkit::process::{Containerd, SluiceSnapshotter};
use sluice_testkit::{run, workspace_binary};

/// One unary gRPC call over a unix socket, as kubelet makes it: returns
/// grpc-status, grpc-message and the reply message bytes.
async fn grpc_unary(socket: &Path, path: &str, message: Vec<u8>) -> (u32, String, Bytes) {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let req = hyper::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| headers.get(name))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let status = field("grpc-status")
        .and_then(|s| s.parse().ok())
        .expect("a grpc-status");
    let body = collected.to_bytes();
    let reply = if body.len() >= 5 {
        body.slice(5..)
    } else {
        Bytes::new()
    };
    (status, field("grpc-message").unwrap_or_default(), reply)
}

async fn pull(proxy: &Path, image: &str, creds: Option<(&str, &str)>) -> (u32, String, String) {
    let req = PullImageRequest {
        image: Some(ImageSpec {
            image: image.to_owned(),
        }),
        auth: creds.map(|(u, p)| AuthConfig {
            username: u.into(),
            password: p.into(),
            ..Default::default()
        }),
    };
    let (status, message, reply) = grpc_unary(
        proxy,
        "/runtime.v1.ImageService/PullImage",
        req.encode_to_vec(),
    )
    .await;
    let image_ref = PullImageResponse::decode(reply)
        .map(|r| r.image_ref)
        .unwrap_or_default();
    (status, message, image_ref)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_pull_secrets_reach_lazy_pulls_through_the_cri_proxy() {
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (reg, reference) = private_busybox(dir.path(), "kubelet", "pull-secret").await;

    // containerd with its CRI plugin, plain HTTP to the test registry, and
    // sluice plugged in by the installer.
    let cdir = dir.path().join("containerd");
    let hosts = cdir.join("certs.d");
    let host_dir = hosts.join(reg.host());
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{h}\"\n[host.\"http://{h}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            h = reg.host()
        ),
    )
    .unwrap();
    let config = cdir.join("config.toml");
    std::fs::create_dir_all(&cdir).unwrap();
    std::fs::write(
        &config,
        format!(
            "version = 2\n{}[plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_port = \"0\"\n  [plugins.\"io.containerd.grpc.v1.cri\".registry]\n    config_path = \"{}\"\n",
            Containerd::private_paths(&cdir),
            hosts.display()
        ),
    )
    .unwrap();
    let sluice_root = dir.path().join("sluice");
    let cri_socket = dir.path().join("cri.sock");
    let snapshotter = SluiceSnapshotter::start_with_args(
        &workspace_binary("sluice-snapshotter"),
        &sluice_root,
        &[
            "--hosts-dir",
            sluice_root.join("no-hosts").to_str().unwrap(),
            "--cri-address",
            cri_socket.to_str().unwrap(),
            "--containerd-address",
            cdir.join("containerd.sock").to_str().unwrap(),
        ],
    );
    run(
        std::process::Command::new(workspace_binary("sluice-snapshotter"))
            .args(["install-node", "--no-restart", "--containerd-config"])
            .arg(&config)
            .arg("--socket")
            .arg(&snapshotter.socket),
    );
    let containerd = Containerd::start_with_config(&cdir, &config);

    // Without the secret containerd's own pull is refused.
    let (status, message, _) = pull(&cri_socket, &reference, None).await;
    assert_ne!(status, 0, "pulled without credentials: {message}");
    assert_eq!(
        snapshotter.metric("sluice_snapshotter_layers_total").await,
        0.0
    );

    let (status, message, image_ref) =
        pull(&cri_socket, &reference, Some(("kubelet", "pull-secret"))).await;
    assert_eq!(
        status,
        0,
        "PullImage through the proxy failed: {message}\ncontainerd:\n{}\nsluice:\n{}",
        containerd.log(),
        snapshotter.log()
    );
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    let body = sluice_testkit::http::get(&format!("http://{}/metrics", snapshotter.metrics_addr))
        .await
        .body;
    let metrics = String::from_utf8_lossy(&body);
    assert!(
        metrics.contains("sluice_snapshotter_layers_total{path=\"lazy\"} 2"),
        "both layers lazy with the pull secret:\n{metrics}\n{}",
        snapshotter.log()
    );
    assert!(
        metrics.contains("sluice_snapshotter_cri_pulls_total{credentials=\"yes\"} 1")
            && metrics.contains("sluice_snapshotter_cri_pulls_total{credentials=\"no\"} 1"),
        "{metrics}"
    );
    // kubelet's other image calls pass through unchanged.
    let (status, message, _) =
        grpc_unary(&cri_socket, "/runtime.v1.ImageService/ListImages", vec![]).await;
    assert_eq!(status, 0, "{message}");
    let images = run(containerd
        .ctr()
        .args(["-n", "k8s.io", "images", "ls", "-q"]));
    assert!(images.contains(&reference), "{images}");
    drop(containerd);
}
