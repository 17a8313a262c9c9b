//! Offline validation of Kubernetes manifests, shared by `tests/deploy_manifests.rs` (the
//! manifests in `deploy/kubernetes/`) and the tests of objects blockd's tools print
//! (`blockctl volume pv`): `kubernetes-validate --strict` checks every object against the
//! API schemas. `tools/test.sh` installs kubectl and a venv with kubernetes-validate
//! (`BLOCKD_VENV`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The Python venv holding kubernetes-validate (and PyYAML).
pub fn venv() -> PathBuf {
    std::env::var_os("BLOCKD_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/blockd-venv")
        })
}

/// The validator and the venv's python, or the reason they cannot run here.
pub fn tools() -> Result<(PathBuf, PathBuf), String> {
    if !crate::have_tool("kubectl") {
        return Err("kubectl is not installed (tools/test.sh installs it)".into());
    }
    let venv = venv();
    let validate = venv.join("bin/kubernetes-validate");
    if !validate.exists() {
        return Err(format!(
            "{} is missing (tools/test.sh installs it)",
            validate.display()
        ));
    }
    Ok((validate, venv.join("bin/python3")))
}

/// Runs kubernetes-validate --strict on `file`; every object must pass or (only for the
/// snapshot.storage.k8s.io CRD kinds, which have no built-in schema) be unknown.
pub fn validate(validate: &Path, file: &Path) {
    validate_with_crds(validate, file, &["snapshot.storage.k8s.io/v1"]);
}

/// [`validate`], with the CRD api versions (no built-in schema) that may be unknown.
pub fn validate_with_crds(validate: &Path, file: &Path, crds: &[&str]) {
    let out = Command::new(validate)
        .arg("--strict")
        .arg(file)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} failed validation:\n{text}",
        file.display()
    );
    for line in text.lines() {
        if line.starts_with("INFO") && line.contains(" passed ") {
            continue;
        }
        let crd_without_schema = line.starts_with("WARN")
            && line.contains("Couldn't find schema")
            && crds.iter().any(|crd| line.contains(crd));
        assert!(crd_without_schema, "{}: {line}", file.display());
    }
}
