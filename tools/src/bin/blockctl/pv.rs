//! `blockctl volume pv`: a Kubernetes PersistentVolume for a volume that already exists in
//! blockd (static provisioning).
//!
//! The PV says what csi-shim's controller would have said had it made the volume: driver
//! `blockd.csi.io`, volume handle `NODE/VOLUME` (csi-shim's `ids.rs`: the node whose blockd
//! holds the data, then the blockd name), the capacity as a Kubernetes quantity, and a
//! node affinity on the topology key `topology.blockd.io/node`, so that pods using it are
//! scheduled where the data is. The volume is looked up in blockd first: a PV for a volume
//! that does not exist would only fail later, in kubelet, far from the mistake.
//!
//! Output is YAML (or the same object as JSON with `-o json`); `kubectl apply -f -` reads
//! both. Strings are written as double-quoted scalars (JSON string syntax, which YAML
//! shares), so no name or value can change the document's structure.

use anyhow::{bail, Context};
use blockd_proto::v1;
use clap::{Args, ValueEnum};
use serde_json::{json, Map, Value};

use crate::cli::Output;
use crate::Api;

/// The CSI driver name csi-shim registers (csi-shim `ids::DRIVER_NAME`, the name of the
/// CSIDriver object in `deploy/kubernetes/csidriver.yaml`).
pub const DRIVER_NAME: &str = "blockd.csi.io";

/// The topology key whose value is the node holding a volume (csi-shim
/// `ids::TOPOLOGY_KEY`).
pub const TOPOLOGY_KEY: &str = "topology.blockd.io/node";

/// The volume context key csi-shim's controller sets to the volume's pool.
const CONTEXT_POOL: &str = "pool";

#[derive(Debug, Args)]
pub struct PvArgs {
    /// The blockd volume.
    pub volume: String,
    /// The Kubernetes node whose blockd holds the volume (csi-shim's --node-id there).
    #[arg(long, value_name = "NODE")]
    pub node: String,
    /// File system of the volume (made on first use when the volume is blank).
    #[arg(long, value_enum, default_value_t = FsType::Ext4, conflicts_with = "block")]
    pub fs_type: FsType,
    /// Publish the raw block device (volumeMode: Block) instead of a file system.
    #[arg(long)]
    pub block: bool,
    /// What Kubernetes does with the volume when its claim is deleted: Retain keeps it in
    /// blockd; Delete lets csi-shim delete it.
    #[arg(long, value_enum, default_value_t = Reclaim::Retain)]
    pub reclaim: Reclaim,
    /// The PersistentVolume's name (default: the volume's name).
    #[arg(long, value_name = "PVNAME")]
    pub name: Option<String>,
    /// The StorageClass a claim must name to bind to this volume (default: none; the
    /// claim then sets `storageClassName: ""` and `volumeName`).
    #[arg(long, value_name = "NAME")]
    pub storage_class: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Reclaim {
    #[value(name = "Retain")]
    Retain,
    #[value(name = "Delete")]
    Delete,
}

impl Reclaim {
    fn as_str(self) -> &'static str {
        match self {
            Reclaim::Retain => "Retain",
            Reclaim::Delete => "Delete",
        }
    }
}

/// Looks the volume up and prints its PersistentVolume.
pub async fn print(api: &mut Api, out: Output, args: PvArgs) -> anyhow::Result<()> {
    check_dns_subdomain("--node", &args.node)?;
    let pv_name = args.name.clone().unwrap_or_else(|| args.volume.clone());
    if let Err(reason) = dns_subdomain(&pv_name) {
        if args.name.is_some() {
            bail!("--name {pv_name:?} is not a valid PersistentVolume name: {reason}");
        }
        bail!(
            "volume name {pv_name:?} cannot be a PersistentVolume name ({reason}); \
             choose one with --name"
        );
    }
    if let Some(class) = &args.storage_class {
        check_dns_subdomain("--storage-class", class)?;
    }
    let volume = match api
        .volumes
        .get_volume(v1::GetVolumeRequest {
            name: args.volume.clone(),
        })
        .await
    {
        Ok(volume) => volume.into_inner(),
        Err(status) if status.code() == tonic::Code::NotFound => bail!(
            "volume {:?} does not exist in blockd (create it with `blockctl volume create`)",
            args.volume
        ),
        Err(status) => {
            return Err(anyhow::Error::new(status))
                .with_context(|| format!("looking up volume {:?}", args.volume))
        }
    };
    let pv = persistent_volume(&args, &pv_name, &volume);
    let text = match out {
        Output::Json => serde_json::to_string_pretty(&pv)? + "\n",
        Output::Table => yaml(&pv),
    };
    use std::io::Write;
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

/// The PersistentVolume object for `volume`.
fn persistent_volume(args: &PvArgs, pv_name: &str, volume: &v1::Volume) -> Value {
    let mut metadata = Map::new();
    metadata.insert("name".into(), json!(pv_name));
    if args.reclaim == Reclaim::Delete {
        // external-provisioner deletes only the PVs that name it as their provisioner.
        metadata.insert(
            "annotations".into(),
            json!({ "pv.kubernetes.io/provisioned-by": DRIVER_NAME }),
        );
    }
    let mut csi = Map::new();
    csi.insert("driver".into(), json!(DRIVER_NAME));
    csi.insert(
        "volumeHandle".into(),
        json!(format!("{}/{}", args.node, volume.name)),
    );
    if !args.block {
        csi.insert("fsType".into(), json!(args.fs_type.as_str()));
    }
    let mut attributes = Map::new();
    attributes.insert(CONTEXT_POOL.into(), json!(volume.pool));
    csi.insert("volumeAttributes".into(), Value::Object(attributes));
    let mut spec = Map::new();
    spec.insert(
        "capacity".into(),
        json!({ "storage": quantity(volume.size_bytes) }),
    );
    spec.insert("accessModes".into(), json!(["ReadWriteOnce"]));
    spec.insert(
        "volumeMode".into(),
        json!(if args.block { "Block" } else { "Filesystem" }),
    );
    spec.insert(
        "persistentVolumeReclaimPolicy".into(),
        json!(args.reclaim.as_str()),
    );
    if let Some(class) = &args.storage_class {
        spec.insert("storageClassName".into(), json!(class));
    }
    spec.insert("csi".into(), Value::Object(csi));
    spec.insert(
        "nodeAffinity".into(),
        json!({
            "required": {
                "nodeSelectorTerms": [{
                    "matchExpressions": [{
                        "key": TOPOLOGY_KEY,
                        "operator": "In",
                        "values": [args.node],
                    }]
                }]
            }
        }),
    );
    let mut pv = Map::new();
    pv.insert("apiVersion".into(), json!("v1"));
    pv.insert("kind".into(), json!("PersistentVolume"));
    pv.insert("metadata".into(), Value::Object(metadata));
    pv.insert("spec".into(), Value::Object(spec));
    Value::Object(pv)
}

/// `bytes` as a Kubernetes quantity that means exactly `bytes`: the largest binary suffix
/// that divides it (`10Gi`, `1536Mi`), or plain bytes.
pub fn quantity(bytes: u64) -> String {
    for (shift, suffix) in [
        (60, "Ei"),
        (50, "Pi"),
        (40, "Ti"),
        (30, "Gi"),
        (20, "Mi"),
        (10, "Ki"),
    ] {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

fn check_dns_subdomain(flag: &str, value: &str) -> anyhow::Result<()> {
    dns_subdomain(value).map_err(|reason| {
        anyhow::anyhow!("{flag} {value:?} is not a valid Kubernetes name: {reason}")
    })
}

/// Checks a Kubernetes object name (RFC 1123 subdomain: at most 253 characters, dot-
/// separated labels of lowercase letters, digits and '-' that start and end alphanumeric).
fn dns_subdomain(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it must not be empty");
    }
    if name.len() > 253 {
        return Err("it must be at most 253 characters");
    }
    for label in name.split('.') {
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let bytes = label.as_bytes();
        if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return Err(
                "each dot-separated part must start and end with a lowercase letter or digit",
            );
        }
        if !bytes.iter().all(|&b| alnum(b) || b == b'-') {
            return Err("it may contain only lowercase letters, digits, '-' and '.'");
        }
    }
    Ok(())
}

/// Renders a JSON value as block-style YAML. Mapping keys and strings are JSON strings
/// (quoted only when a key is not a plain word), which every YAML 1.2 parser reads back
/// as the same value.
pub fn yaml(value: &Value) -> String {
    let mut out = String::new();
    emit(value, 0, &mut out);
    out
}

fn key(k: &str) -> String {
    let plain = !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
        && k.as_bytes()[0].is_ascii_alphabetic();
    if plain {
        k.to_string()
    } else {
        Value::String(k.to_string()).to_string()
    }
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::Object(m) if m.is_empty() => Some("{}".into()),
        Value::Array(a) if a.is_empty() => Some("[]".into()),
        Value::Object(_) | Value::Array(_) => None,
        other => Some(other.to_string()),
    }
}

/// Writes the entries of an object or array at `indent`, one per line.
fn emit(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match scalar(v) {
                    Some(s) => out.push_str(&format!("{pad}{}: {s}\n", key(k))),
                    None => {
                        out.push_str(&format!("{pad}{}:\n", key(k)));
                        emit(v, indent + 2, out);
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match scalar(item) {
                    Some(s) => out.push_str(&format!("{pad}- {s}\n")),
                    None => {
                        // The first line of the nested block goes after the dash.
                        let mut inner = String::new();
                        emit(item, indent + 2, &mut inner);
                        let first_line = inner
                            .strip_prefix(&" ".repeat(indent + 2))
                            .unwrap_or(&inner);
                        out.push_str(&format!("{pad}- {first_line}"));
                    }
                }
            }
        }
        other => out.push_str(&format!("{pad}{other}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_exact() {
        assert_eq!(quantity(10 << 30), "10Gi");
        assert_eq!(quantity(1536 << 20), "1536Mi");
        assert_eq!(quantity(4096), "4Ki");
        assert_eq!(quantity(1 << 40), "1Ti");
        assert_eq!(quantity(1000), "1000");
        assert_eq!(quantity(0), "0");
    }

    #[test]
    fn kubernetes_names_are_checked() {
        for ok in ["node-a", "n1", "worker-1.example.com", "a"] {
            assert!(dns_subdomain(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Node",
            "node_a",
            "-a",
            "a-",
            "a..b",
            "a/b",
            &"x".repeat(254),
        ] {
            assert!(dns_subdomain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn yaml_nests_maps_and_lists() {
        let v = json!({
            "a": "x:y",
            "b": {"c": [1, {"d": "e", "f": ["g"]}], "e": {}},
            "pv.kubernetes.io/x": true,
        });
        assert_eq!(
            yaml(&v),
            "a: \"x:y\"\nb:\n  c:\n    - 1\n    - d: \"e\"\n      f:\n        - \"g\"\n  e: {}\npv.kubernetes.io/x: true\n"
        );
    }
}
