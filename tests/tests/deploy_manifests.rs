//! The Kubernetes manifests in `deploy/kubernetes/`, validated offline: kustomize renders
//! them (`kubectl kustomize`), `kubernetes-validate --strict` checks every object against
//! the API schemas, and a few checks of our own pin what the CSI issue requires of them
//! (the CSIDriver's flags, the sidecars in node-deployment mode, the seed's two classes,
//! the snapshot class) — schemas cannot say that a provisioner runs per node.
//!
//! `tools/test.sh` installs kubectl and a venv with kubernetes-validate (`BLOCKD_VENV`);
//! the validation itself is `blockd_tests::manifests`, shared with the tests of printed
//! objects (`blockctl volume pv`).

use std::path::Path;
use std::process::Command;

use blockd_tests::manifests::{repo, tools, validate, validate_with_crds};

fn render() -> String {
    kustomize(&repo().join("deploy/kubernetes"))
}

/// `kubectl kustomize DIR`, offline: the rendered manifests.
fn kustomize(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 manifests")
}

#[test]
fn kustomization_renders_and_every_object_validates() {
    let (validator, _) = match tools() {
        Ok(tools) => tools,
        Err(reason) => {
            blockd_tests::skip(&reason);
            return;
        }
    };
    let rendered = render();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).expect("write rendered manifests");
    validate(&validator, &file);
    for example in std::fs::read_dir(repo().join("deploy/kubernetes/examples")).expect("examples") {
        let path = example.expect("dir entry").path();
        // Directories are kustomizations of their own (kbench: its own test below).
        if path.extension().is_some_and(|e| e == "yaml") {
            validate(&validator, &path);
        }
    }
}

/// The kbench example (`deploy/kubernetes/examples/kbench`): renders offline, validates,
/// and wires what its README promises: one Job pod with a PVC of every StorageClass the
/// base defines, each at /volumes/CLASS, the hostPath baseline at /volumes/BASELINE, and
/// the fio job file, run script and table script from the repository in its ConfigMap
/// (the same files tests/tests/kbench.rs runs).
#[test]
fn kbench_example_renders_validates_and_benchmarks_every_class() {
    let (validator, python) = match tools() {
        Ok(tools) => tools,
        Err(reason) => {
            blockd_tests::skip(&reason);
            return;
        }
    };
    let kbench = repo().join("deploy/kubernetes/examples/kbench");
    let rendered = kustomize(&kbench);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kbench.yaml");
    std::fs::write(&file, &rendered).expect("write rendered manifests");
    validate(&validator, &file);
    let base = dir.path().join("base.yaml");
    std::fs::write(&base, render()).expect("write rendered base");
    let out = Command::new(python)
        .arg("-c")
        .arg(KBENCH_CHECKS)
        .arg(&file)
        .arg(&base)
        .arg(&kbench)
        .output()
        .expect("run the kbench checks");
    assert!(
        out.status.success(),
        "kbench example checks failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const KBENCH_CHECKS: &str = r#"
import os, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
base = [d for d in yaml.safe_load_all(open(sys.argv[2])) if d]
src = sys.argv[3]
bad = []
def check(cond, what):
    if not cond:
        bad.append(what)
kinds = {}
for d in docs:
    kinds.setdefault(d["kind"], []).append(d)
jobs = kinds.get("Job", [])
check(len(jobs) == 1, "one Job")
classes = {d["metadata"]["name"] for d in base if d["kind"] == "StorageClass"}
pvcs = {d["metadata"]["name"]: d for d in kinds.get("PersistentVolumeClaim", [])}
by_class = {p["spec"].get("storageClassName"): n for n, p in pvcs.items()}
check(classes and set(by_class) == classes,
      f"a PVC of every StorageClass of the base: {sorted(classes)} vs {sorted(by_class)}")
cms = kinds.get("ConfigMap", [])
check(len(cms) == 1, "one ConfigMap")
for cm in cms:
    for f in ["kbench.fio", "kbench-run.sh", "kbench-table.py"]:
        check(cm["data"].get(f) == open(os.path.join(src, f)).read(),
              f"the ConfigMap holds the repository's {f}")
for job in jobs:
    check(job["spec"].get("backoffLimit") == 0, "the Job does not retry (one table per run)")
    pod = job["spec"]["template"]["spec"]
    check(pod.get("restartPolicy") == "Never", "restartPolicy Never")
    check(len(pod["containers"]) == 1, "one container: volumes run one after the other")
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    root = env.get("KBENCH_VOLUMES", "/volumes")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod["volumes"]}
    cm_mount = [mounts.get(n) for n, v in vols.items() if "configMap" in v]
    check(len(cm_mount) == 1 and cm_mount[0] and c["command"] == ["sh", cm_mount[0] + "/kbench-run.sh"],
          "the container runs kbench-run.sh from the ConfigMap")
    for n, v in vols.items():
        if "configMap" in v:
            check(v["configMap"]["name"] == cms[0]["metadata"]["name"], "the ConfigMap's generated name")
    claims = {v["persistentVolumeClaim"]["claimName"]: mounts.get(n) for n, v in vols.items()
              if "persistentVolumeClaim" in v}
    for cls, pvc in by_class.items():
        check(claims.get(pvc) == f"{root}/{cls}", f"PVC {pvc} is mounted at {root}/{cls}")
    host = [mounts.get(n) for n, v in vols.items() if "hostPath" in v]
    baseline = env.get("KBENCH_BASELINE", "hostpath")
    check(host == [f"{root}/{baseline}"], f"the hostPath baseline is mounted at {root}/{baseline}")
    for k in ["KBENCH_SIZE", "KBENCH_RUNTIME", "KBENCH_RAMP"]:
        check(env.get(k), f"the Job sets {k}")
for line in bad:
    print("FAILED:", line)
sys.exit(1 if bad else 0)
"#;

/// Semantic checks, in Python (PyYAML comes with kubernetes-validate): each failed check
/// prints one line and the script exits 1.
const CHECKS: &str = r#"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
bad = []
def check(cond, what):
    if not cond:
        bad.append(what)

drv = by.get(("CSIDriver", "blockd.csi.io"))
check(drv is not None, "CSIDriver blockd.csi.io exists")
if drv:
    spec = drv["spec"]
    check(spec.get("attachRequired") is False, "CSIDriver attachRequired: false")
    check(spec.get("podInfoOnMount") is True,
          "CSIDriver podInfoOnMount: true (kubelet marks ephemeral publishes only then)")
    check(spec.get("volumeLifecycleModes") == ["Persistent", "Ephemeral"],
          "CSIDriver lifecycle modes Persistent and Ephemeral")

ds = by.get(("DaemonSet", "blockd"))
check(ds is not None, "DaemonSet blockd exists")
if ds:
    pod = ds["spec"]["template"]["spec"]
    cs = {c["name"]: c for c in pod["containers"]}
    for name in ["blockd", "csi-shim", "node-driver-registrar", "csi-provisioner",
                 "csi-snapshotter", "csi-resizer", "liveness-probe"]:
        check(name in cs, f"DaemonSet runs container {name}")
    def args(name):
        c = cs.get(name, {})
        return c.get("args", []) + c.get("command", [])
    for name in ["csi-provisioner", "csi-snapshotter"]:
        check("--node-deployment=true" in args(name), f"{name} in node-deployment mode")
        env = {e["name"] for e in cs.get(name, {}).get("env", [])}
        check("NODE_NAME" in env, f"{name} gets NODE_NAME")
    check("--enable-capacity=true" in args("csi-provisioner"), "capacity tracking on")
    shim = args("csi-shim")
    for flag in ["--endpoint=unix:///csi/csi.sock", "--blockd-api=/run/blockd/api.sock",
                 "--node-id=$(NODE_NAME)"]:
        check(flag in shim, f"csi-shim {flag}")
    mounts = {m["name"]: m for m in cs.get("csi-shim", {}).get("volumeMounts", [])}
    check(mounts.get("kubelet-dir", {}).get("mountPropagation") == "Bidirectional",
          "csi-shim mounts the kubelet dir with Bidirectional propagation")
    check(cs.get("csi-shim", {}).get("securityContext", {}).get("privileged") is True,
          "csi-shim is privileged")
    init = {c["name"]: c for c in pod.get("initContainers", [])}
    nbd = " ".join(init.get("load-nbd", {}).get("command", []))
    check("modprobe nbd" in nbd and "max_part=0" in nbd,
          "an init container loads the nbd module without partition scanning")
    check(init.get("load-nbd", {}).get("securityContext", {}).get("privileged") is True,
          "the nbd loader is privileged")
    modules = [m for m in init.get("load-nbd", {}).get("volumeMounts", [])
               if m["mountPath"] == "/lib/modules"]
    check(len(modules) == 1, "the nbd loader sees the host's /lib/modules")
    reg = args("node-driver-registrar")
    check("--kubelet-registration-path=/var/lib/kubelet/plugins/blockd.csi.io/csi.sock" in reg,
          "registrar registers the plugin socket")

d = by.get(("StorageClass", "default-block"))
p = by.get(("StorageClass", "performance-block"))
check(d is not None and p is not None, "StorageClasses default-block and performance-block")
for sc in [d, p]:
    if sc:
        n = sc["metadata"]["name"]
        check(sc["provisioner"] == "blockd.csi.io", f"{n} uses blockd.csi.io")
        check(sc.get("volumeBindingMode") == "WaitForFirstConsumer", f"{n} WaitForFirstConsumer")
        check(sc.get("allowVolumeExpansion") is True, f"{n} allows expansion")
        allowed = {"pool", "csi.storage.k8s.io/fstype", "maxIops", "iopsPerGB", "maxBandwidth"}
        check(set(sc.get("parameters", {})) <= allowed, f"{n} uses only known parameters")
if d:
    ann = d["metadata"].get("annotations", {})
    check(ann.get("storageclass.kubernetes.io/is-default-class") == "true",
          "default-block is the default class")
if p:
    check("iopsPerGB" in p.get("parameters", {}), "performance-block has IOPS per GB")

vsc = [x for x in docs if x["kind"] == "VolumeSnapshotClass"]
check(len(vsc) == 1, "one VolumeSnapshotClass")
for x in vsc:
    check(x["apiVersion"] == "snapshot.storage.k8s.io/v1", "VolumeSnapshotClass is v1")
    check(x.get("driver") == "blockd.csi.io", "VolumeSnapshotClass driver")
    check(x.get("deletionPolicy") in ("Delete", "Retain"), "VolumeSnapshotClass deletionPolicy")

# VolumeAttributesClass and VolumeGroupSnapshot gates are opt-in components (a cluster
# without those APIs would lose the sidecars' other work): the base has none of them.
if ds:
    check("--feature-gates=Topology=true" in args("csi-provisioner"),
          "csi-provisioner runs with only the Topology gate in the base")
    gates = [a for c in ("csi-provisioner", "csi-resizer", "csi-snapshotter") for a in args(c)
             if "VolumeAttributesClass" in a or "CSIVolumeGroupSnapshot" in a]
    check(not gates, f"the base turns on no opt-in feature gate: {gates}")
role = by.get(("ClusterRole", "blockd-csi"))
if role:
    groups = {g for r in role["rules"] for g in r.get("apiGroups", [])}
    check("groupsnapshot.storage.k8s.io" in groups, "RBAC for group snapshot contents")

for line in bad:
    print("FAILED:", line)
sys.exit(1 if bad else 0)
"#;

#[test]
fn manifests_say_what_the_csi_driver_needs() {
    let (_, python) = match tools() {
        Ok(tools) => tools,
        Err(reason) => {
            blockd_tests::skip(&reason);
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, render()).expect("write rendered manifests");
    let out = Command::new(python)
        .arg("-c")
        .arg(CHECKS)
        .arg(&file)
        .output()
        .expect("run the manifest checks");
    assert!(
        out.status.success(),
        "manifest checks failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn walkthrough_examples_follow_the_seed_chapter() {
    let dir = repo().join("deploy/kubernetes/examples");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("example file");
    let pvcs = read("01-pvcs.yaml");
    assert!(pvcs.contains("name: pvc0") && pvcs.contains("storage: 11Gi"));
    assert!(pvcs.contains("name: pvc1") && pvcs.contains("storageClassName: performance-block"));
    let snap = read("03-snapshot.yaml");
    assert!(snap.contains("name: snap1") && snap.contains("persistentVolumeClaimName: pvc0"));
    let restore = read("04-restore.yaml");
    assert!(restore.contains("name: pvc-reclaim") && restore.contains("storage: 600Gi"));
    assert!(restore.contains("kind: VolumeSnapshot") && restore.contains("name: snap1"));
}

/// The VolumeAttributesClass and VolumeGroupSnapshotClass examples name this driver and
/// only parameters csi-shim accepts (the CSI tests prove what they do).
#[test]
fn attributes_and_group_snapshot_class_examples() {
    let dir = repo().join("deploy/kubernetes/examples");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("example file");
    let vac = read("07-volumeattributesclass.yaml");
    assert!(
        vac.contains("kind: VolumeAttributesClass") && vac.contains("driverName: blockd.csi.io")
    );
    assert!(vac.contains("volumeAttributesClassName: blockd-gold"));
    let mut in_params = false;
    for line in vac.lines() {
        let trimmed = line.trim_start();
        if line.starts_with("parameters:") {
            in_params = true;
        } else if in_params && line.starts_with("  ") && !trimmed.starts_with('#') {
            let key = trimmed.split(':').next().unwrap();
            assert!(
                ["maxIops", "iopsPerGB", "maxBandwidth"].contains(&key),
                "VolumeAttributesClass parameter {key} is not one csi-shim can change"
            );
        } else {
            in_params = false;
        }
    }
    let group = read("08-group-snapshot.yaml");
    assert!(
        group.contains("kind: VolumeGroupSnapshotClass") && group.contains("driver: blockd.csi.io")
    );
    assert!(group.contains("kind: VolumeGroupSnapshot\n"));
}

/// The static-provisioning and inline-ephemeral examples use the driver as csi-shim
/// serves it: the PV's handle and node affinity, the claim bound to it by name, the pod's
/// inline volume with a size.
#[test]
fn static_and_ephemeral_examples_match_the_driver() {
    let python = match tools() {
        Ok((_, python)) => python,
        Err(reason) => {
            blockd_tests::skip(&reason);
            return;
        }
    };
    let dir = repo().join("deploy/kubernetes/examples");
    let out = Command::new(python)
        .arg("-c")
        .arg(EXAMPLE_CHECKS)
        .arg(dir.join("05-static-pv.yaml"))
        .arg(dir.join("06-ephemeral-pod.yaml"))
        .output()
        .expect("run the example checks");
    assert!(
        out.status.success(),
        "example checks failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const EXAMPLE_CHECKS: &str = r#"
import sys, yaml
static = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
eph = [d for d in yaml.safe_load_all(open(sys.argv[2])) if d]
bad = []
def check(cond, what):
    if not cond:
        bad.append(what)
kinds = {d["kind"]: d for d in static}
pv, pvc, pod = kinds.get("PersistentVolume"), kinds.get("PersistentVolumeClaim"), kinds.get("Pod")
check(pv and pvc and pod, "05-static-pv.yaml has a PV, a PVC and a pod")
if pv and pvc and pod:
    csi = pv["spec"]["csi"]
    check(csi["driver"] == "blockd.csi.io", "PV driver blockd.csi.io")
    node, _, vol = csi["volumeHandle"].partition("/")
    check(node and vol and "/" not in vol, "PV volumeHandle is NODE/VOLUME")
    expr = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
    check(expr["key"] == "topology.blockd.io/node" and expr["values"] == [node],
          "PV node affinity names the handle's node on topology.blockd.io/node")
    check(pv["spec"]["claimRef"]["name"] == pvc["metadata"]["name"], "PV claimRef names the PVC")
    check(pvc["spec"].get("volumeName") == pv["metadata"]["name"], "PVC volumeName names the PV")
    check(pvc["spec"].get("storageClassName") == "", "PVC has no class (static binding)")
    check(pvc["spec"]["resources"]["requests"]["storage"] == pv["spec"]["capacity"]["storage"],
          "PVC asks for the PV's capacity")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]]
    check(claims == [pvc["metadata"]["name"]], "the pod mounts the claim")
pods = [d for d in eph if d["kind"] == "Pod"]
check(len(pods) == 1, "06-ephemeral-pod.yaml has one pod")
for p in pods:
    inline = [v["csi"] for v in p["spec"]["volumes"] if "csi" in v]
    check(len(inline) == 1 and inline[0]["driver"] == "blockd.csi.io",
          "the pod has an inline blockd.csi.io volume")
    for v in inline:
        check("size" in v.get("volumeAttributes", {}), "the inline volume sets a size")
for line in bad:
    print("FAILED:", line)
sys.exit(1 if bad else 0)
"#;

/// Renders the base with the opt-in snapshot-metadata component enabled, the way its
/// README says to: `components: [components/snapshot-metadata]` in a copy of the base.
fn render_with_snapshot_metadata(dir: &Path) -> String {
    render_with_components(dir, &["components/snapshot-metadata"])
}

/// Renders a copy of the base with `components` (paths relative to the base) enabled.
fn render_with_components(dir: &Path, components: &[&str]) -> String {
    let copy = dir.join("kubernetes");
    let status = Command::new("cp")
        .arg("-r")
        .arg(repo().join("deploy/kubernetes"))
        .arg(&copy)
        .status()
        .expect("copy the manifests");
    assert!(status.success());
    let kustomization = copy.join("kustomization.yaml");
    let mut text = std::fs::read_to_string(&kustomization).expect("kustomization");
    text.push_str("components:\n");
    for component in components {
        text.push_str(&format!("  - {component}\n"));
    }
    std::fs::write(&kustomization, text).expect("write kustomization");
    kustomize(&copy)
}

/// What the external-snapshot-metadata sidecar needs, checked on the rendered objects.
const SNAPSHOT_METADATA_CHECKS: &str = r#"
import sys, yaml, base64
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
bad = []
def check(cond, what):
    if not cond:
        bad.append(what)

ds = by[("DaemonSet", "blockd")]
pod = ds["spec"]["template"]["spec"]
cs = {c["name"]: c for c in pod["containers"]}
side = cs.get("csi-snapshot-metadata")
check(side is not None, "the blockd pods run the csi-snapshot-metadata sidecar")
check("csi-shim" in cs, "the patch keeps the existing containers")
if side:
    args = side.get("args", [])
    check("--csi-address=/csi/csi.sock" in args, "sidecar talks to csi-shim's socket")
    check(any(a.startswith("--tls-cert=") for a in args) and any(a.startswith("--tls-key=") for a in args),
          "sidecar serves TLS")
    mounts = {m["name"]: m["mountPath"] for m in side.get("volumeMounts", [])}
    check(mounts.get("plugin-dir") == "/csi", "sidecar mounts the CSI socket directory")
    vols = {v["name"]: v for v in pod["volumes"]}
    certs = vols.get("snapshot-metadata-certs", {}).get("secret", {}).get("secretName")
    check(certs == "blockd-snapshot-metadata-tls", "sidecar mounts the TLS secret")
    port = {p["name"]: p["containerPort"] for p in side.get("ports", [])}.get("snap-metadata")
    check(f"--port={port}" in args, "sidecar listens on its declared port")
sec = by.get(("Secret", "blockd-snapshot-metadata-tls"))
check(sec is not None and sec.get("type") == "kubernetes.io/tls", "TLS secret placeholder")
svc = by.get(("Service", "blockd-snapshot-metadata"))
check(svc is not None, "Service blockd-snapshot-metadata")
sms = by.get(("SnapshotMetadataService", "blockd.csi.io"))
check(sms is not None, "SnapshotMetadataService named after the driver")
if svc and sms:
    ns = svc["metadata"]["namespace"]
    port = svc["spec"]["ports"][0]["port"]
    check(sms["spec"]["address"] == f"blockd-snapshot-metadata.{ns}:{port}",
          "the CR's address is the Service")
    check(svc["spec"]["selector"] == ds["spec"]["selector"]["matchLabels"],
          "the Service selects the blockd pods")
    check(svc["spec"]["ports"][0]["targetPort"] == "snap-metadata", "Service targets the sidecar port")
    base64.b64decode(sms["spec"]["caCert"], validate=True)
    check(sms["spec"].get("audience"), "the CR names an audience")
role = by.get(("ClusterRole", "blockd-snapshot-metadata"))
rules = {(g, r): set(x["verbs"]) for x in (role or {}).get("rules", [])
         for g in x["apiGroups"] for r in x["resources"]}
check("create" in rules.get(("authentication.k8s.io", "tokenreviews"), set()), "may create TokenReviews")
check("create" in rules.get(("authorization.k8s.io", "subjectaccessreviews"), set()),
      "may create SubjectAccessReviews")
check("get" in rules.get(("cbt.storage.k8s.io", "snapshotmetadataservices"), set()),
      "may read SnapshotMetadataServices")
check("get" in rules.get(("snapshot.storage.k8s.io", "volumesnapshots"), set()), "may read VolumeSnapshots")
rb = by.get(("ClusterRoleBinding", "blockd-snapshot-metadata"))
check(rb is not None and rb["subjects"][0]["name"] == pod["serviceAccountName"],
      "the role is bound to the pods' service account")

for line in bad:
    print("FAILED:", line)
sys.exit(1 if bad else 0)
"#;

#[test]
fn snapshot_metadata_component_renders_validates_and_wires_the_sidecar() {
    let (validator, python) = match tools() {
        Ok(tools) => tools,
        Err(reason) => {
            blockd_tests::skip(&reason);
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let rendered = render_with_snapshot_metadata(dir.path());
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).expect("write rendered manifests");
    validate_with_crds(
        &validator,
        &file,
        &["snapshot.storage.k8s.io/v1", "cbt.storage.k8s.io/v1alpha1"],
    );
    let out = Command::new(python)
        .arg("-c")
        .arg(SNAPSHOT_METADATA_CHECKS)
        .arg(&file)
        .output()
        .expect("run the snapshot-metadata checks");
    assert!(
        out.status.success(),
        "snapshot-metadata manifest checks failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The base stays without it (opt-in).
    assert!(!render().contains("csi-snapshot-metadata"));
}

/// The opt-in VolumeAttributesClass and group-snapshot components turn on exactly the
/// sidecar feature gates csi-shim's ModifyVolume and GroupController need, and the
/// result still validates.
#[test]
fn attribute_class_and_group_snapshot_components_turn_on_their_gates() {
    let (validator, python) = match tools() {
        Ok(tools) => tools,
        Err(reason) => {
            blockd_tests::skip(&reason);
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let rendered = render_with_components(
        dir.path(),
        &[
            "components/volume-attributes-class",
            "components/group-snapshots",
        ],
    );
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).expect("write rendered manifests");
    validate(&validator, &file);
    let out = Command::new(python)
        .arg("-c")
        .arg(GATE_CHECKS)
        .arg(&file)
        .output()
        .expect("run the gate checks");
    assert!(
        out.status.success(),
        "gate checks failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const GATE_CHECKS: &str = r#"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
ds = [d for d in docs if d["kind"] == "DaemonSet"][0]
args = {c["name"]: c.get("args", []) for c in ds["spec"]["template"]["spec"]["containers"]}
want = {
    "csi-provisioner": "--feature-gates=Topology=true,VolumeAttributesClass=true",
    "csi-resizer": "--feature-gates=VolumeAttributesClass=true",
    "csi-snapshotter": "--feature-gates=CSIVolumeGroupSnapshot=true",
}
bad = [f"{c}: {flag} missing from {args[c]}" for c, flag in want.items() if flag not in args[c]]
gates = [a for a in args["csi-provisioner"] if a.startswith("--feature-gates")]
if len(gates) != 1:
    bad.append(f"csi-provisioner has one --feature-gates flag, not {gates}")
for line in bad:
    print("FAILED:", line)
sys.exit(1 if bad else 0)
"#;
