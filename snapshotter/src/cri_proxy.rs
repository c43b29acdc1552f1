//! The CRI image-service proxy: kubelet is started with
//! `--image-service-endpoint unix:///run/sluice/cri.sock`, and every
//! ImageService call goes through here to containerd unchanged. On the way,
//! `PullImage` requests give away what kubelet alone knows: the credentials
//! of the pod's image pull secrets. They are remembered for that image's
//! repository, so the lazy mounts that containerd's pull triggers (Prepare
//! with the CRI labels) fetch with them. This is how stargz's CRI keychain
//! works; without it, only the daemon's own docker config is used.
//!
//! The proxy forwards HTTP/2 frames as they come (bodies and trailers
//! streamed); it decodes nothing but a copy of the `PullImage` request.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use sluice_puller::registry::{AuthFields, Credentials, ImageRef};
use sluice_puller::RegistryClient;
use tokio::net::{UnixListener, UnixStream};

use crate::metrics::SnapshotterMetrics;

/// The part of CRI's `runtime.v1` messages the proxy reads (field numbers
/// as in k8s.io/cri-api's api.proto; other fields are skipped when decoding
/// and forwarded untouched, since the original bytes are what is sent on).
pub mod messages {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PullImageRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<ImageSpec>,
        #[prost(message, optional, tag = "2")]
        pub auth: Option<AuthConfig>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageSpec {
        #[prost(string, tag = "1")]
        pub image: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AuthConfig {
        #[prost(string, tag = "1")]
        pub username: String,
        #[prost(string, tag = "2")]
        pub password: String,
        #[prost(string, tag = "3")]
        pub auth: String,
        #[prost(string, tag = "4")]
        pub server_address: String,
        #[prost(string, tag = "5")]
        pub identity_token: String,
        #[prost(string, tag = "6")]
        pub registry_token: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PullImageResponse {
        #[prost(string, tag = "1")]
        pub image_ref: String,
    }
}

type UpstreamBody = Either<Incoming, Full<Bytes>>;
type ReplyBody = Either<Incoming, Empty<Bytes>>;

pub struct CriProxy {
    containerd: PathBuf,
    client: Option<Arc<RegistryClient>>,
    metrics: Arc<SnapshotterMetrics>,
}

/// One connection to containerd per kubelet connection, made again if
/// containerd restarted.
struct Upstream {
    socket: PathBuf,
    sender: tokio::sync::Mutex<Option<SendRequest<UpstreamBody>>>,
}

impl Upstream {
    async fn sender(&self) -> std::io::Result<SendRequest<UpstreamBody>> {
        let mut current = self.sender.lock().await;
        if let Some(s) = current.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let stream = UnixStream::connect(&self.socket).await?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("CRI proxy: containerd connection ended: {e}");
            }
        });
        *current = Some(sender.clone());
        Ok(sender)
    }
}

/// A gRPC error as a trailers-only response.
fn grpc_error(code: u32, message: &str) -> Response<ReplyBody> {
    Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", code.to_string())
        .header(
            "grpc-message",
            message.replace(|c: char| !c.is_ascii() || c.is_ascii_control(), " "),
        )
        .body(Either::Right(Empty::new()))
        .expect("a valid response")
}

impl CriProxy {
    /// `client` is the daemon's registry client (`None` with lazy mounts off:
    /// then the proxy only forwards).
    pub fn new(
        containerd: PathBuf,
        client: Option<Arc<RegistryClient>>,
        metrics: Arc<SnapshotterMetrics>,
    ) -> Arc<Self> {
        Arc::new(CriProxy {
            containerd,
            client,
            metrics,
        })
    }

    /// Serves kubelet's connections until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("CRI proxy accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let upstream = Arc::new(Upstream {
                socket: self.containerd.clone(),
                sender: Default::default(),
            });
            let this = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let (this, upstream) = (this.clone(), upstream.clone());
                    async move { Ok::<_, Infallible>(this.forward(&upstream, req).await) }
                });
                if let Err(e) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!("CRI proxy: kubelet connection ended: {e}");
                }
            });
        }
    }

    async fn forward(&self, upstream: &Upstream, req: Request<Incoming>) -> Response<ReplyBody> {
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        let body = if is_pull_image(&path) {
            match body.collect().await {
                Ok(b) => {
                    let bytes = b.to_bytes();
                    self.learn_credentials(&bytes);
                    Either::Right(Full::new(bytes))
                }
                Err(e) => return grpc_error(13, &format!("reading the request: {e}")),
            }
        } else {
            Either::Left(body)
        };
        // The server side saw kubelet's authority; containerd gets its own.
        parts.uri = match format!(
            "http://localhost{}",
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        )
        .parse()
        {
            Ok(uri) => uri,
            Err(e) => return grpc_error(13, &format!("request path: {e}")),
        };
        let mut sender = match upstream.sender().await {
            Ok(s) => s,
            Err(e) => {
                return grpc_error(
                    14,
                    &format!(
                        "sluice CRI proxy: containerd at {} unreachable: {e}",
                        self.containerd.display()
                    ),
                )
            }
        };
        match sender.send_request(Request::from_parts(parts, body)).await {
            Ok(resp) => resp.map(Either::Left),
            Err(e) => grpc_error(14, &format!("sluice CRI proxy: forwarding {path}: {e}")),
        }
    }

    /// Reads the image and credentials of a `PullImage` request (one gRPC
    /// message: flag byte, length, protobuf) and remembers the credentials.
    fn learn_credentials(&self, body: &[u8]) {
        let Some((&flag, rest)) = body.split_first() else {
            return;
        };
        if flag != 0 {
            tracing::warn!("CRI proxy: compressed PullImage request; its credentials are not used for lazy pulls");
            return;
        }
        let Some((len, msg)) = rest.split_first_chunk::<4>() else {
            return;
        };
        let Some(msg) = msg.get(..u32::from_be_bytes(*len) as usize) else {
            return;
        };
        let req = match messages::PullImageRequest::decode(msg) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("CRI proxy: PullImage request not understood: {e}");
                return;
            }
        };
        let image = req.image.map(|i| i.image).unwrap_or_default();
        let with = match (&req.auth, &self.client) {
            (Some(auth), Some(client)) => match remember(client, &image, auth) {
                Ok(known) => known,
                Err(e) => {
                    tracing::warn!(image, "CRI proxy: credentials not used: {e}");
                    false
                }
            },
            _ => false,
        };
        tracing::info!(image, credentials = with, "kubelet pulls an image");
        self.metrics.count_cri_pull(with);
    }
}

fn is_pull_image(path: &str) -> bool {
    matches!(
        path,
        "/runtime.v1.ImageService/PullImage" | "/runtime.v1alpha2.ImageService/PullImage"
    )
}

/// Stores the credentials of `auth` for `image`; `Ok(false)` if it carries none.
fn remember(
    client: &RegistryClient,
    image: &str,
    auth: &messages::AuthConfig,
) -> Result<bool, String> {
    let fields = AuthFields {
        auth: Some(&auth.auth),
        username: Some(&auth.username),
        password: Some(&auth.password),
        identity_token: Some(&auth.identity_token),
    };
    let Some(creds) = Credentials::from_fields(&fields)? else {
        if !auth.registry_token.is_empty() {
            return Err(
                "a registry token alone (no user or identity token) is not supported".into(),
            );
        }
        return Ok(false);
    };
    let image = ImageRef::parse_normalized(image).map_err(|e| e.to_string())?;
    client.remember_credentials(&image, creds);
    Ok(true)
}
