//! Editing containerd's `config.toml` so that containerd uses sluice: the
//! `[proxy_plugins.sluice]` section and, for Kubernetes, the CRI plugin's
//! `snapshotter = "sluice"` and `disable_snapshot_annotations = false`.
//!
//! The edit keeps everything else as it was (comments, order, other proxy
//! plugins) by working on the document with `toml_edit`; it is a pure function
//! of the text, so that applying it twice changes nothing the second time.

use toml_edit::{value, DocumentMut, Item, Table, TableLike, Value};

/// What sluice needs in containerd's config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The daemon's socket: `proxy_plugins.sluice.address`.
    pub socket: String,
    /// Also make sluice the CRI plugin's snapshotter (Kubernetes nodes).
    pub cri: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("not valid TOML: {0}")]
    Syntax(#[from] toml_edit::TomlError),
    #[error("`{path}` is not a table, so sluice's settings cannot be added below it")]
    NotATable { path: String },
    #[error("unsupported config version {0} (containerd knows 1, 2 and 3)")]
    Version(i64),
}

/// Where the CRI plugin's image settings live in each config version.
fn cri_path(doc: &DocumentMut) -> Result<&'static [&'static str], ConfigError> {
    match doc.get("version").and_then(Item::as_integer) {
        // containerd 2.x: the images plugin owns snapshotter and annotations.
        Some(3) => Ok(&["plugins", "io.containerd.cri.v1.images"]),
        Some(2) => Ok(&["plugins", "io.containerd.grpc.v1.cri", "containerd"]),
        None | Some(1) => Ok(&["plugins", "cri", "containerd"]),
        Some(v) => Err(ConfigError::Version(v)),
    }
}

/// Parses `text`; an empty (or absent) config becomes a version 2 document,
/// what containerd 1.6 and 1.7 document.
fn parse(text: &str) -> Result<DocumentMut, ConfigError> {
    if text.trim().is_empty() {
        let mut doc = DocumentMut::new();
        doc["version"] = value(2);
        return Ok(doc);
    }
    Ok(text.parse::<DocumentMut>()?)
}

/// The table at `path`, created (as an implicit table, so no empty headers
/// appear) where missing.
fn table_at<'a>(
    mut table: &'a mut dyn TableLike,
    path: &[&str],
) -> Result<&'a mut dyn TableLike, ConfigError> {
    for (i, key) in path.iter().enumerate() {
        if table.get(key).is_none() {
            let mut t = Table::new();
            t.set_implicit(true);
            table.insert(key, Item::Table(t));
        }
        table = table
            .get_mut(key)
            .and_then(Item::as_table_like_mut)
            .ok_or_else(|| ConfigError::NotATable {
                path: path[..=i].join("."),
            })?;
    }
    Ok(table)
}

/// Sets `key` to `new`, keeping the comments around an existing value.
fn set(table: &mut dyn TableLike, key: &str, new: Value) {
    match table.get_mut(key).and_then(Item::as_value_mut) {
        Some(old) => {
            let decor = old.decor().clone();
            *old = new;
            *old.decor_mut() = decor;
        }
        None => {
            table.insert(key, Item::Value(new));
        }
    }
}

/// `text` with sluice's settings in place. Unchanged text means the config
/// already says what sluice needs.
pub fn patch(text: &str, settings: &Settings) -> Result<String, ConfigError> {
    let mut doc = parse(text)?;
    let cri = cri_path(&doc)?;
    let root = doc.as_table_mut() as &mut dyn TableLike;
    let plugin = table_at(root, &["proxy_plugins", "sluice"])?;
    if plugin.get("type").and_then(Item::as_str) != Some("snapshot") {
        set(plugin, "type", "snapshot".into());
    }
    if plugin.get("address").and_then(Item::as_str) != Some(settings.socket.as_str()) {
        set(plugin, "address", settings.socket.as_str().into());
    }
    if settings.cri {
        let images = table_at(doc.as_table_mut(), cri)?;
        if images.get("snapshotter").and_then(Item::as_str) != Some("sluice") {
            set(images, "snapshotter", "sluice".into());
        }
        if images
            .get("disable_snapshot_annotations")
            .and_then(Item::as_bool)
            != Some(false)
        {
            set(images, "disable_snapshot_annotations", false.into());
        }
    }
    render(doc, text)
}

/// `text` without sluice's settings, for when the backup taken at install
/// time cannot be used (the config was edited since): removes
/// `[proxy_plugins.sluice]` and a CRI `snapshotter = "sluice"` (containerd's
/// default, overlayfs, applies again). `disable_snapshot_annotations` stays:
/// it is harmless for other snapshotters and may have been set by someone
/// else.
pub fn unpatch(text: &str) -> Result<String, ConfigError> {
    let mut doc = parse(text)?;
    let cri = cri_path(&doc)?;
    if let Some(plugins) = doc
        .get_mut("proxy_plugins")
        .and_then(Item::as_table_like_mut)
    {
        // An implicit `proxy_plugins` left empty prints as nothing; an
        // explicit `[proxy_plugins]` header was there before and stays.
        plugins.remove("sluice");
    }
    let mut table = Some(doc.as_table_mut() as &mut dyn TableLike);
    for key in cri {
        table = table
            .and_then(|t| t.get_mut(key))
            .and_then(Item::as_table_like_mut);
    }
    if let Some(images) = table {
        if images.get("snapshotter").and_then(Item::as_str) == Some("sluice") {
            images.remove("snapshotter");
        }
    }
    render(doc, text)
}

/// The edited document as text, or `text` itself when the edit changed
/// nothing: re-serialising an untouched document can differ in
/// insignificant whitespace, and "no change needed" must mean "same bytes".
fn render(doc: DocumentMut, text: &str) -> Result<String, ConfigError> {
    let out = doc.to_string();
    Ok(if parse(text)?.to_string() == out {
        text.to_owned()
    } else {
        out
    })
}

/// The settings `text` carries, if it plugs sluice in: what an install
/// with them would have written.
pub fn installed_settings(text: &str) -> Option<Settings> {
    let doc = parse(text).ok()?;
    let socket = doc
        .get("proxy_plugins")?
        .get("sluice")?
        .get("address")?
        .as_str()?
        .to_owned();
    let cri = cri_path(&doc)
        .ok()?
        .iter()
        .try_fold(doc.as_item(), |item, key| item.get(key))
        .and_then(|t| t.get("snapshotter"))
        .and_then(Item::as_str)
        == Some("sluice");
    Some(Settings { socket, cri })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCK: &str = "/run/sluice/snapshotter.sock";

    fn settings(cri: bool) -> Settings {
        Settings {
            socket: SOCK.into(),
            cri,
        }
    }

    fn get<'a>(doc: &'a toml::Value, path: &[&str]) -> Option<&'a toml::Value> {
        path.iter().try_fold(doc, |v, k| v.get(k))
    }

    #[test]
    fn empty_config_becomes_version_2_with_sluice() {
        let out = patch("", &settings(true)).unwrap();
        let doc: toml::Value = toml::from_str(&out).unwrap();
        assert_eq!(doc["version"].as_integer(), Some(2));
        assert_eq!(
            get(&doc, &["proxy_plugins", "sluice", "address"])
                .unwrap()
                .as_str(),
            Some(SOCK)
        );
        let cri = get(
            &doc,
            &["plugins", "io.containerd.grpc.v1.cri", "containerd"],
        )
        .unwrap();
        assert_eq!(cri["snapshotter"].as_str(), Some("sluice"));
        assert_eq!(cri["disable_snapshot_annotations"].as_bool(), Some(false));
        // No empty `[plugins]` headers.
        assert!(!out.contains("[plugins]\n"), "{out}");
        assert_eq!(patch(&out, &settings(true)).unwrap(), out);
    }

    #[test]
    fn keeps_comments_other_plugins_and_values() {
        let text = "# node config\nversion = 2\n\n[proxy_plugins]\n  [proxy_plugins.stargz]\n    type = \"snapshot\"\n    address = \"/run/stargz.sock\"\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\" # the default\n  default_runtime_name = \"runc\"\n  disable_snapshot_annotations = true\n";
        let out = patch(text, &settings(true)).unwrap();
        assert!(out.starts_with("# node config\n"), "{out}");
        assert!(
            out.contains("snapshotter = \"sluice\" # the default"),
            "{out}"
        );
        assert!(out.contains("address = \"/run/stargz.sock\""), "{out}");
        assert!(out.contains("default_runtime_name = \"runc\""), "{out}");
        assert!(
            out.contains("disable_snapshot_annotations = false"),
            "{out}"
        );
        let found = installed_settings(&out).unwrap();
        assert!(found.cri && found.socket == SOCK);
        // Structural revert: sluice gone, stargz and the rest still there.
        let back = unpatch(&out).unwrap();
        assert!(!back.contains("sluice"), "{back}");
        assert!(back.contains("[proxy_plugins.stargz]"), "{back}");
    }

    #[test]
    fn without_cri_only_the_proxy_plugin() {
        let text = "version = 2\n";
        let out = patch(text, &settings(false)).unwrap();
        assert!(!out.contains("cri"), "{out}");
        assert_eq!(unpatch(&out).unwrap().trim(), "version = 2");
    }

    #[test]
    fn version_1_and_3_paths() {
        let v1 = patch("root = \"/var/lib/containerd\"\n", &settings(true)).unwrap();
        let doc: toml::Value = toml::from_str(&v1).unwrap();
        assert_eq!(
            get(&doc, &["plugins", "cri", "containerd", "snapshotter"])
                .unwrap()
                .as_str(),
            Some("sluice")
        );
        let v3 = patch("version = 3\n", &settings(true)).unwrap();
        let doc: toml::Value = toml::from_str(&v3).unwrap();
        assert_eq!(
            get(
                &doc,
                &["plugins", "io.containerd.cri.v1.images", "snapshotter"]
            )
            .unwrap()
            .as_str(),
            Some("sluice")
        );
        assert!(matches!(
            patch("version = 9\n", &settings(true)),
            Err(ConfigError::Version(9))
        ));
    }

    #[test]
    fn a_changed_socket_is_updated_and_bad_configs_are_refused() {
        let out = patch("", &settings(false)).unwrap();
        let moved = patch(
            &out,
            &Settings {
                socket: "/other.sock".into(),
                cri: false,
            },
        )
        .unwrap();
        let found = installed_settings(&moved).unwrap();
        assert!(found.socket == "/other.sock" && !found.cri);
        assert!(installed_settings("version = 2\n").is_none());
        let e = patch("version = 2\nproxy_plugins = 3\n", &settings(false)).unwrap_err();
        assert!(
            e.to_string().contains("`proxy_plugins` is not a table"),
            "{e}"
        );
        let e = patch("version = [\n", &settings(false)).unwrap_err();
        assert!(e.to_string().starts_with("not valid TOML"), "{e}");
    }
}
