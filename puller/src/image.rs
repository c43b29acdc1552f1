//! From an image reference to the lazy layers to mount.
//!
//! A layer is mounted lazily if it is zstd:chunked with a TOC checksum as
//! pushed, or if the registry has a lazy twin of it: the image's referrers with
//! artifact type [`LAZY_TWIN_ARTIFACT_TYPE`] (any OCI 1.1 registry that ran a
//! converter), or sluice-registry's per-layer twin endpoint. Otherwise it has
//! to be pulled in full, and the caller is told so.

use std::collections::HashMap;
use std::pin::pin;

use bytes::Bytes;
use futures_util::future::{select, Either};

use sluice_format::chunked::Footer;
use sluice_format::convert::{is_lazy_capable, LAZY_TWIN_ARTIFACT_TYPE};
use sluice_format::oci::{self, Descriptor, Manifest};
use sluice_format::Digest;

use crate::registry::{FetchError, ImageRef, RegistryClient};

/// One layer of an image and how to get it lazily, if at all.
#[derive(Debug, Clone)]
pub struct ImageLayer {
    pub original: Descriptor,
    /// The zstd:chunked layer to mount: the original itself or its twin.
    pub lazy: Option<Descriptor>,
}

/// An image resolved for lazy mounting.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub image: ImageRef,
    pub manifest_digest: Digest,
    /// The manifest as served (for stores that keep it, like containerd's).
    pub manifest_bytes: bytes::Bytes,
    pub manifest_media_type: String,
    pub manifest: Manifest,
    pub config: Descriptor,
    pub layers: Vec<ImageLayer>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{image}: {source}")]
    Fetch {
        image: String,
        source: Box<FetchError>,
    },
    #[error("{image}: {reason}")]
    Invalid { image: String, reason: String },
}

fn has_checksum(d: &Descriptor) -> bool {
    matches!(Footer::from_annotations(&d.annotations), Ok(Some(f)) if f.toc_digest.is_some())
}

/// Whether the layer as pushed can be mounted lazily (no twin needed).
fn is_lazy_as_pushed(d: &Descriptor) -> bool {
    is_lazy_capable(d) && has_checksum(d)
}

/// An image's manifest as fetched: linux/amd64 picked from an index.
#[derive(Debug, Clone)]
pub struct ImageManifest {
    pub digest: Digest,
    /// The manifest as served (for stores that keep it, like containerd's).
    pub bytes: Bytes,
    pub media_type: String,
    pub manifest: Manifest,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// Fetches the image's manifest (choosing linux/amd64 in an index), and
/// nothing else: `sluice pull` needs no lazy forms (the snapshotter finds
/// them), and asking for them cost it two round trips.
pub async fn fetch_manifest(
    client: &RegistryClient,
    image: &ImageRef,
) -> Result<ImageManifest, ImageError> {
    let fetch = |source| ImageError::Fetch {
        image: image.to_string(),
        source: Box::new(source),
    };
    let invalid = |reason: String| ImageError::Invalid {
        image: image.to_string(),
        reason,
    };
    let (mut bytes, mut media_type, mut digest) = client.manifest(image).await.map_err(fetch)?;
    let mut manifest = Manifest::parse(&bytes).map_err(|e| invalid(e.to_string()))?;
    if manifest.is_index() {
        let pick = manifest
            .manifests
            .iter()
            .flatten()
            .find(|m| {
                m.platform.as_ref().is_none_or(|p| {
                    p["os"].as_str().unwrap_or("linux") == "linux"
                        && p["architecture"].as_str().unwrap_or("amd64") == "amd64"
                })
            })
            .ok_or_else(|| invalid("index has no linux/amd64 manifest".into()))?;
        let child = image.with_reference(pick.digest.to_string());
        (bytes, media_type, digest) = client.manifest(&child).await.map_err(fetch)?;
        manifest = Manifest::parse(&bytes).map_err(|e| invalid(e.to_string()))?;
    }
    let config = manifest
        .config
        .clone()
        .ok_or_else(|| invalid("manifest has no config".into()))?;
    let layers = manifest.layers.clone().unwrap_or_default();
    Ok(ImageManifest {
        digest,
        bytes,
        media_type,
        manifest,
        config,
        layers,
    })
}

/// Fetches the manifest (choosing linux/amd64 in an index) and finds a lazy
/// form of every layer.
pub async fn resolve(
    client: &RegistryClient,
    image: &ImageRef,
) -> Result<ResolvedImage, ImageError> {
    // A reference by digest (the snapshotter's case: containerd names the
    // manifest) already names the manifest whose referrers hold the twins:
    // they are asked for while the manifest comes, a round trip less. The
    // answer is used only if the manifest is that one (not an index) and
    // needs a twin; otherwise it is not waited for.
    let pinned: Option<Digest> = image.reference.parse().ok();
    let mut early = pin!(async {
        match &pinned {
            Some(digest) => twin_manifests(client, image, digest).await,
            None => Vec::new(),
        }
    });
    let mut early_answer = None;
    let m = match select(pin!(fetch_manifest(client, image)), early.as_mut()).await {
        Either::Left((m, _)) => m?,
        Either::Right((answer, m)) => {
            early_answer = Some(answer);
            m.await?
        }
    };
    let twins = if m.layers.iter().all(is_lazy_as_pushed) {
        HashMap::new()
    } else {
        let candidates = if pinned.as_ref() == Some(&m.digest) {
            match early_answer {
                Some(answer) => answer,
                None => early.await,
            }
        } else {
            twin_manifests(client, image, &m.digest).await
        };
        find_twins(client, image, &m.layers, candidates).await
    };
    let layers = m
        .layers
        .into_iter()
        .map(|l| {
            let lazy = if is_lazy_as_pushed(&l) {
                Some(l.clone())
            } else {
                twins.get(&l.digest).cloned()
            };
            ImageLayer { original: l, lazy }
        })
        .collect();
    Ok(ResolvedImage {
        image: image.clone(),
        manifest_digest: m.digest,
        manifest_bytes: m.bytes,
        manifest_media_type: m.media_type,
        manifest: m.manifest,
        config: m.config,
        layers,
    })
}

/// What a container of an image runs unless told otherwise: its
/// configuration's `Entrypoint` and `Cmd`, with the `PATH` and working
/// directory they are run with. Known before any container exists, so the
/// files it starts with can be fetched while the pull finishes (see
/// `fs`'s `LayerSlot::start_command`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartCommand {
    /// `Entrypoint` then `Cmd`; never empty.
    pub argv: Vec<String>,
    /// The directories of `PATH` in `Env` (runc's default when unset).
    pub path: Vec<String>,
    /// `WorkingDir`, absolute (`/` when unset).
    pub working_dir: String,
    /// The locale of character types in `Env`: `LC_ALL`, else `LC_CTYPE`,
    /// else `LANG` (`None`: none set, the C locale).
    pub locale: Option<String>,
}

/// The `PATH` of a container whose image sets none (runc, containerd).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An image configuration larger than this is not read for its command
/// (they are a few KiB; history entries make some a few hundred).
const CONFIG_MAX: u64 = 4 << 20;

impl StartCommand {
    /// From an image configuration's `config` object; `None` if it runs
    /// nothing (no `Entrypoint` and no `Cmd`) or is not shaped as the
    /// image spec says.
    pub fn from_config(config: &serde_json::Value) -> Option<StartCommand> {
        let strings = |key: &str| -> Option<Vec<String>> {
            match config.get(key) {
                None | Some(serde_json::Value::Null) => Some(Vec::new()),
                Some(serde_json::Value::Array(a)) => {
                    a.iter().map(|v| v.as_str().map(str::to_string)).collect()
                }
                Some(_) => None,
            }
        };
        let mut argv = strings("Entrypoint")?;
        argv.extend(strings("Cmd")?);
        if argv.first().is_none_or(|p| p.is_empty()) {
            return None;
        }
        let env = strings("Env")?;
        let var = |name: &str| {
            env.iter()
                .rev()
                .find_map(|e| e.strip_prefix(name)?.strip_prefix('=').map(str::to_string))
        };
        let path = var("PATH").unwrap_or_else(|| DEFAULT_PATH.to_string());
        let locale = ["LC_ALL", "LC_CTYPE", "LANG"]
            .into_iter()
            .find_map(|v| var(v).filter(|l| !l.is_empty()));
        let working_dir = match config.get("WorkingDir").and_then(|w| w.as_str()) {
            Some(w) if w.starts_with('/') => w.to_string(),
            Some(w) if !w.is_empty() => format!("/{w}"),
            _ => "/".to_string(),
        };
        Some(StartCommand {
            argv,
            path: path
                .split(':')
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect(),
            working_dir,
            locale,
        })
    }
}

/// The command of the image whose configuration is `config` (fetched,
/// verified against its digest); `Ok(None)` if it has none.
pub async fn start_command(
    client: &RegistryClient,
    image: &ImageRef,
    config: &Descriptor,
) -> Result<Option<StartCommand>, ImageError> {
    let invalid = |reason: String| ImageError::Invalid {
        image: image.to_string(),
        reason,
    };
    if config.size > CONFIG_MAX {
        return Err(invalid(format!(
            "image configuration of {} bytes, more than the {CONFIG_MAX} read for its command",
            config.size
        )));
    }
    let bytes = client
        .blob(image, &config.digest)
        .await
        .map_err(|e| ImageError::Fetch {
            image: image.to_string(),
            source: Box::new(e),
        })?;
    let parsed: oci::ImageConfig =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("image configuration: {e}")))?;
    Ok(StartCommand::from_config(&parsed.config))
}

/// The lazy-twin manifests that the registry lists as referrers of
/// `manifest`, in its order. Failures only mean "none".
async fn twin_manifests(
    client: &RegistryClient,
    image: &ImageRef,
    manifest: &Digest,
) -> Vec<Digest> {
    let path = format!(
        "referrers/{manifest}?artifactType={}",
        LAZY_TWIN_ARTIFACT_TYPE.replace('+', "%2B")
    );
    let Ok(f) = client.get(image, &path, Some(oci::OCI_INDEX)).await else {
        return Vec::new();
    };
    let Ok(index) = Manifest::parse(&f.bytes) else {
        return Vec::new();
    };
    index
        .manifests
        .iter()
        .flatten()
        .filter(|r| r.artifact_type.as_deref() == Some(LAZY_TWIN_ARTIFACT_TYPE))
        .map(|r| r.digest.clone())
        .collect()
}

/// Twins of plain layers: from the first of `candidates` (lazy-twin
/// manifests) that can be fetched, else from the registry's per-layer
/// endpoint, asked for all layers at once. Failures only mean "no twin".
async fn find_twins(
    client: &RegistryClient,
    image: &ImageRef,
    layers: &[Descriptor],
    candidates: Vec<Digest>,
) -> HashMap<Digest, Descriptor> {
    let mut twins = HashMap::new();
    for candidate in candidates {
        let Ok((bytes, _, _)) = client
            .manifest(&image.with_reference(candidate.to_string()))
            .await
        else {
            continue;
        };
        let Ok(twin) = Manifest::parse(&bytes) else {
            continue;
        };
        for (orig, lazy) in layers.iter().zip(twin.layers.iter().flatten()) {
            if has_checksum(lazy) {
                twins.insert(orig.digest.clone(), lazy.clone());
            }
        }
        break;
    }
    let missing = layers
        .iter()
        .filter(|l| !(twins.contains_key(&l.digest) || is_lazy_as_pushed(l)));
    let per_layer = futures_util::future::join_all(missing.map(|l| async move {
        let f = client
            .get(image, &format!("_sluice/twins/{}", l.digest), None)
            .await
            .ok()?;
        let d = serde_json::from_slice::<Descriptor>(&f.bytes).ok()?;
        has_checksum(&d).then(|| (l.digest.clone(), d))
    }))
    .await;
    twins.extend(per_layer.into_iter().flatten());
    twins
}

#[cfg(test)]
mod tests {
    //! The round trips a resolve overlaps, proven without timing: a registry
    //! that holds one answer until another request has arrived. Sequential
    //! code would wait out the hold; overlapped code releases it.

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use sluice_format::chunked::{Footer, MetadataLocation};
    use tokio::sync::Notify;

    use super::*;
    use crate::registry::RetryPolicy;

    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// Long enough that a released hold is not the timeout on a busy machine.
    const HOLD: Duration = Duration::from_secs(20);

    /// One image with a plain layer and a lazy twin of it, served from memory.
    struct Image {
        manifest: Bytes,
        manifest_digest: Digest,
        config: Bytes,
        config_digest: Digest,
        twin: Bytes,
        twin_digest: Digest,
        referrers: Bytes,
        plain_layer: Digest,
        lazy_layer: Descriptor,
    }

    /// With `pushed_lazy`, the image's layer is zstd:chunked as pushed (it
    /// needs no twin; the registry still lists one).
    fn image_with(pushed_lazy: bool) -> Image {
        let config = Bytes::from_static(br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#);
        let config_digest = Digest::sha256(&config);
        let plain_layer = Digest::sha256(b"plain layer");
        let mut lazy_layer = Descriptor::new(
            "application/vnd.oci.image.layer.v1.tar+zstd",
            Digest::sha256(b"lazy layer"),
            10,
        );
        lazy_layer.annotations = Footer {
            toc: MetadataLocation {
                offset: 1,
                compressed_len: 2,
                uncompressed_len: 3,
            },
            tarsplit: None,
            toc_digest: Some(Digest::sha256(b"toc")),
        }
        .annotations();
        let layer = match pushed_lazy {
            true => serde_json::to_value(&lazy_layer).unwrap(),
            false => serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                        "digest": plain_layer.to_string(), "size": 11}),
        };
        let manifest = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_digest.to_string(), "size": config.len()},
                "layers": [layer],
            }))
            .unwrap(),
        );
        let manifest_digest = Digest::sha256(&manifest);
        let twin = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "artifactType": LAZY_TWIN_ARTIFACT_TYPE,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                           "digest": Digest::sha256(b"{}").to_string(), "size": 2},
                "layers": [lazy_layer],
                "subject": {"mediaType": MANIFEST, "digest": manifest_digest.to_string(),
                            "size": manifest.len()},
            }))
            .unwrap(),
        );
        let twin_digest = Digest::sha256(&twin);
        let referrers = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": oci::OCI_INDEX,
                "manifests": [{"mediaType": MANIFEST, "digest": twin_digest.to_string(),
                               "size": twin.len(), "artifactType": LAZY_TWIN_ARTIFACT_TYPE}],
            }))
            .unwrap(),
        );
        Image {
            manifest,
            manifest_digest,
            config,
            config_digest,
            twin,
            twin_digest,
            referrers,
            plain_layer,
            lazy_layer,
        }
    }

    /// A registry for [`image`] that holds the answer to the first path
    /// starting with `held` until a request for a path starting with
    /// `release` has arrived (or [`HOLD`] has passed).
    struct GatedRegistry {
        host: String,
        /// Request paths in order of arrival.
        requests: Arc<Mutex<Vec<String>>>,
        /// Whether the held answer was released by the awaited request.
        released: Arc<Mutex<Option<bool>>>,
    }

    async fn gated_registry(image: Image, held: String, release: String) -> GatedRegistry {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let released = Arc::new(Mutex::new(None));
        let arrived = Arc::new(Notify::new());
        let image = Arc::new(image);
        let state = (requests.clone(), released.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (image, (requests, released), arrived) =
                    (image.clone(), state.clone(), arrived.clone());
                let (held, release) = (held.clone(), release.clone());
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (image, requests, released, arrived) = (
                        image.clone(),
                        requests.clone(),
                        released.clone(),
                        arrived.clone(),
                    );
                    let (held, release) = (held.clone(), release.clone());
                    async move {
                        let path = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        requests.lock().unwrap().push(path.clone());
                        if path.starts_with(&release) {
                            arrived.notify_one();
                        }
                        let hold = path.starts_with(&held) && released.lock().unwrap().is_none();
                        if hold {
                            let by_request =
                                tokio::time::timeout(HOLD, arrived.notified()).await.is_ok();
                            *released.lock().unwrap() = Some(by_request);
                        }
                        let repo = "/v2/test/img";
                        let (status, media_type, body) = match path.as_str() {
                            "/v2/" => (200, "application/json", Bytes::from_static(b"{}")),
                            p if p == format!("{repo}/manifests/v1")
                                || p == format!("{repo}/manifests/{}", image.manifest_digest) =>
                            {
                                (200, MANIFEST, image.manifest.clone())
                            }
                            p if p == format!("{repo}/manifests/{}", image.twin_digest) => {
                                (200, MANIFEST, image.twin.clone())
                            }
                            p if p.starts_with(&format!(
                                "{repo}/referrers/{}",
                                image.manifest_digest
                            )) =>
                            {
                                (200, oci::OCI_INDEX, image.referrers.clone())
                            }
                            p if p == format!("{repo}/blobs/{}", image.config_digest) => {
                                (200, "application/octet-stream", image.config.clone())
                            }
                            _ => (404, "application/json", Bytes::from_static(b"{}")),
                        };
                        let response = hyper::Response::builder()
                            .status(status)
                            .header("content-type", media_type)
                            .body(Full::new(body))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        GatedRegistry {
            host,
            requests,
            released,
        }
    }

    /// Resolves `img` by its manifest's digest (as the snapshotter does)
    /// from a [`gated_registry`].
    async fn resolve_by_digest(
        img: Image,
        held: String,
        release: String,
    ) -> (GatedRegistry, ResolvedImage) {
        let digest = img.manifest_digest.clone();
        let registry = gated_registry(img, held, release).await;
        let client = RegistryClient::new(RetryPolicy::default());
        let image = ImageRef::parse(&format!("{}/test/img@{digest}", registry.host)).unwrap();
        let resolved = resolve(&client, &image).await.unwrap();
        (registry, resolved)
    }

    #[test]
    fn the_start_command_of_a_configuration() {
        let c = |v: serde_json::Value| StartCommand::from_config(&v);
        assert_eq!(
            c(serde_json::json!({
                "Entrypoint": ["python3"],
                "Cmd": ["-c", "import numpy"],
                "Env": ["LANG=C.UTF-8", "PATH=/opt/venv/bin:/usr/bin", "LC_CTYPE="],
                "WorkingDir": "/app"
            })),
            Some(StartCommand {
                argv: vec!["python3".into(), "-c".into(), "import numpy".into()],
                path: vec!["/opt/venv/bin".into(), "/usr/bin".into()],
                working_dir: "/app".into(),
                locale: Some("C.UTF-8".into()),
            })
        );
        let defaults = c(serde_json::json!({"Cmd": ["/bin/sh"], "Entrypoint": null})).unwrap();
        assert_eq!(defaults.working_dir, "/");
        assert_eq!(defaults.locale, None);
        assert_eq!(defaults.path.len(), 6);
        // Nothing to run, or not shaped as the spec says.
        for v in [
            serde_json::json!({}),
            serde_json::json!({"Cmd": []}),
            serde_json::json!({"Cmd": [""]}),
            serde_json::json!({"Cmd": "python3"}),
            serde_json::json!({"Cmd": ["python3", 1]}),
            serde_json::json!({"Cmd": ["sh"], "Env": "PATH=/bin"}),
            serde_json::json!(null),
        ] {
            assert_eq!(c(v.clone()), None, "{v}");
        }
    }

    #[tokio::test]
    async fn a_digest_reference_asks_for_twins_while_the_manifest_comes() {
        let img = image_with(false);
        let (manifest_digest, plain, lazy) = (
            img.manifest_digest.clone(),
            img.plain_layer.clone(),
            img.lazy_layer.clone(),
        );
        let (registry, resolved) = resolve_by_digest(
            img,
            format!("/v2/test/img/manifests/{manifest_digest}"),
            format!("/v2/test/img/referrers/{manifest_digest}"),
        )
        .await;
        assert_eq!(
            *registry.released.lock().unwrap(),
            Some(true),
            "the manifest's answer waited for the referrers request: {:?}",
            registry.requests.lock().unwrap()
        );
        assert_eq!(resolved.layers[0].original.digest, plain);
        assert_eq!(resolved.layers[0].lazy.as_ref(), Some(&lazy));
        let referrers = registry
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.contains("/referrers/"))
            .count();
        assert_eq!(referrers, 1, "the early answer is used, not asked again");
    }

    #[tokio::test]
    async fn the_early_referrers_are_not_waited_for_when_no_twin_is_needed() {
        let img = image_with(true);
        let (manifest_digest, lazy) = (img.manifest_digest.clone(), img.lazy_layer.clone());
        // The referrers' answer is held (for HOLD) until a request that
        // never comes: a resolve that waited for it would see it released.
        let (registry, resolved) = resolve_by_digest(
            img,
            format!("/v2/test/img/referrers/{manifest_digest}"),
            "/nothing".into(),
        )
        .await;
        assert_eq!(
            *registry.released.lock().unwrap(),
            None,
            "the resolve waited for the referrers"
        );
        assert_eq!(resolved.layers[0].lazy.as_ref(), Some(&lazy));
    }

    #[tokio::test]
    async fn the_command_is_read_from_the_verified_configuration() {
        let config = |c: serde_json::Value| {
            Bytes::from(
                serde_json::to_vec(&serde_json::json!({
                    "architecture": "amd64", "os": "linux", "config": c,
                    "rootfs": {"type": "layers", "diff_ids": []},
                }))
                .unwrap(),
            )
        };
        // A registry that answers `served` for the blob `digest`.
        let command_of = |served: Bytes, digest: Digest, size: u64| async move {
            let mut img = image_with(false);
            (img.config, img.config_digest) = (served, digest.clone());
            let registry = gated_registry(img, "/nothing".into(), "/nothing".into()).await;
            let client = RegistryClient::new(RetryPolicy::default());
            let image = ImageRef::parse(&format!("{}/test/img:v1", registry.host)).unwrap();
            let desc = Descriptor::new("application/vnd.oci.image.config.v1+json", digest, size);
            let got = start_command(&client, &image, &desc).await;
            let requests = registry.requests.lock().unwrap().clone();
            (got, requests)
        };
        let good = config(serde_json::json!({"Cmd": ["python3", "-c", "import json"]}));
        let digest = Digest::sha256(&good);
        let (got, _) = command_of(good.clone(), digest.clone(), good.len() as u64).await;
        let cmd = got.unwrap().expect("a command");
        assert_eq!(cmd.argv, ["python3", "-c", "import json"]);
        // No command in it: none, and no error.
        let none = config(serde_json::json!({"Env": ["PATH=/bin"]}));
        let (got, _) = command_of(none.clone(), Digest::sha256(&none), none.len() as u64).await;
        assert!(matches!(got, Ok(None)), "{got:?}");
        // Bytes that are not the digest's: a fetch error, not a command.
        let (got, _) = command_of(none.clone(), digest.clone(), none.len() as u64).await;
        assert!(matches!(got, Err(ImageError::Fetch { .. })), "{got:?}");
        // Not an image configuration.
        let junk = Bytes::from_static(b"{\"config\": 1");
        let (got, _) = command_of(junk.clone(), Digest::sha256(&junk), junk.len() as u64).await;
        assert!(
            matches!(&got, Err(ImageError::Invalid { reason, .. }) if reason.contains("image configuration")),
            "{got:?}"
        );
        // Declared too big: refused before any request for it.
        let (got, requests) = command_of(good, digest.clone(), CONFIG_MAX + 1).await;
        assert!(matches!(got, Err(ImageError::Invalid { .. })), "{got:?}");
        assert!(
            !requests.iter().any(|p| p.contains("/blobs/")),
            "{requests:?}"
        );
    }

    #[tokio::test]
    async fn a_pull_fetches_the_manifest_alone() {
        let img = image_with(false);
        let (manifest_digest, config_digest, plain) = (
            img.manifest_digest.clone(),
            img.config_digest.clone(),
            img.plain_layer.clone(),
        );
        // Nothing held: every request is answered at once.
        let registry = gated_registry(img, "/nothing".into(), "/nothing".into()).await;
        let client = RegistryClient::new(RetryPolicy::default());
        let image = ImageRef::parse(&format!("{}/test/img:v1", registry.host)).unwrap();
        let m = fetch_manifest(&client, &image).await.unwrap();
        assert_eq!(m.digest, manifest_digest);
        assert_eq!(m.config.digest, config_digest);
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.layers[0].digest, plain);
        assert_eq!(
            *registry.requests.lock().unwrap(),
            ["/v2/test/img/manifests/v1"],
            "no referrers or twins for a pull"
        );
    }
}
