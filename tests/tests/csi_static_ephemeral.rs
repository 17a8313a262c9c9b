//! Static provisioning and inline ephemeral volumes, on real mounts.
//!
//! - Static: a volume made with `blockctl volume create` (never seen by the CSI
//!   controller) gets a PersistentVolume from `blockctl volume pv`; the PV validates
//!   offline against the Kubernetes schemas, and its `volumeHandle` is staged and published
//!   through the CSI Node RPCs, as kubelet would, with the file system it names.
//! - Ephemeral: NodePublishVolume with `csi.storage.k8s.io/ephemeral: "true"` creates,
//!   stages and publishes a volume; NodeUnpublishVolume removes it all; csi-shim killed
//!   between the steps (its crash points) and restarted, then kubelet's retry and
//!   unpublish leave no volume, mount, attachment, export or record behind.
//!
//! The harness is `blockd_tests::csi_node` (the one `tests/csi_node.rs` uses); the
//! attacher is `BLOCKD_TEST_ATTACH` (fuse-loop here, kernel NBD in the guest).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use blockd_proto::csi;
use blockd_proto::csi::node_client::NodeClient;
use blockd_tests::csi_node::*;
use blockd_tests::{manifests, require_root_and_tools, runtime, Daemon};
use serde_json::Value;
use tonic::Code;

/// A volume id of the kind kubelet makes for an inline volume (`csi-` + a SHA-256).
const KUBELET_ID: &str = "csi-5e1f0a6b9c2d4e8f7a3b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f";

/// The PV `blockctl volume pv ARGS` prints, as YAML (validated offline when the validator
/// is installed, and read back with PyYAML) and as `-o json`; asserts both say the same.
fn printed_pv(daemon: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["volume", "pv"];
    all.extend_from_slice(args);
    let yaml = daemon.ctl_ok(&all);
    let json = daemon.ctl_json(&all);
    match manifests::tools() {
        Ok((validator, python)) => {
            let dir = tempfile::tempdir().expect("tempdir");
            let file = dir.path().join("pv.yaml");
            std::fs::write(&file, &yaml).expect("write pv.yaml");
            manifests::validate(&validator, &file);
            let out = Command::new(python)
                .args([
                    "-c",
                    "import sys, yaml, json; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
                ])
                .arg(&file)
                .output()
                .expect("run python");
            assert!(
                out.status.success(),
                "PyYAML: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let from_yaml: Value = serde_json::from_slice(&out.stdout).expect("JSON from PyYAML");
            assert_eq!(from_yaml, json, "YAML and JSON output differ:\n{yaml}");
        }
        Err(reason) => blockd_tests::skip(&reason),
    }
    json
}

#[test]
fn blockctl_pv_for_a_blockctl_volume_is_valid_and_csi_node_mounts_its_handle() {
    require_root_and_tools!();
    runtime().block_on(async {
        let mut env = Env::start(&[]).await;
        env.daemon
            .ctl_ok(&["volume", "create", "legacy", "--size", "320M"]);
        let pv = printed_pv(&env.daemon, &["legacy", "--node", NODE, "--fs-type", "xfs"]);

        assert_eq!(pv["kind"], "PersistentVolume");
        assert_eq!(pv["metadata"]["name"], "legacy");
        let spec = &pv["spec"];
        assert_eq!(spec["capacity"]["storage"], "320Mi");
        assert_eq!(spec["accessModes"], serde_json::json!(["ReadWriteOnce"]));
        assert_eq!(spec["volumeMode"], "Filesystem");
        assert_eq!(spec["persistentVolumeReclaimPolicy"], "Retain");
        assert_eq!(spec["csi"]["fsType"], "xfs");
        assert_eq!(spec["csi"]["volumeAttributes"]["pool"], "default");
        assert!(spec.get("storageClassName").is_none());

        // The driver is the CSIDriver object's name; the affinity key is the topology key
        // csi-shim's NodeGetInfo reports, with this node as its value.
        let driver = spec["csi"]["driver"].as_str().expect("driver");
        let csidriver =
            std::fs::read_to_string(manifests::repo().join("deploy/kubernetes/csidriver.yaml"))
                .expect("csidriver.yaml");
        assert!(csidriver.contains(&format!("name: {driver}\n")), "{driver}");
        let info = env
            .node
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo")
            .into_inner();
        let expr = &spec["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0];
        let key = expr["key"].as_str().expect("affinity key");
        assert_eq!(expr["operator"], "In");
        assert_eq!(expr["values"], serde_json::json!([NODE]));
        let topology = info.accessible_topology.expect("topology").segments;
        assert_eq!(
            topology.get(key).map(String::as_str),
            Some(NODE),
            "{topology:?}"
        );

        // Kubelet's view: stage and publish the handle with the PV's fsType.
        let handle = spec["csi"]["volumeHandle"]
            .as_str()
            .expect("handle")
            .to_string();
        assert_eq!(handle, format!("{NODE}/legacy"));
        let (staging, target) = env.mount(&handle, "legacy", mount_cap("xfs")).await;
        let (_, fs_type) = mounts_under(&env.root)
            .into_iter()
            .find(|(p, _)| *p == staging)
            .expect("staging path is mounted");
        assert_eq!(fs_type, "xfs");
        let data = content(7, 1 << 20);
        write_synced(&target.join("kept"), &data);
        env.umount(&handle, &staging, &target).await;
        env.assert_clean().await;
        // Retain: the data stays in blockd and comes back on the next mount.
        let (staging, target) = env.mount(&handle, "legacy", mount_cap("")).await;
        let back = std::fs::read(target.join("kept")).expect("file survives");
        assert_eq!(checksum(&back), checksum(&data));
        env.umount(&handle, &staging, &target).await;
        env.assert_clean().await;
    });
}

#[test]
fn blockctl_pv_options_and_errors() {
    // Needs no mounts: only blockd and blockctl.
    let daemon = Daemon::start();
    {
        daemon.ctl_ok(&["volume", "create", "raw", "--size", "1536M"]);
        let pv = printed_pv(
            &daemon,
            &[
                "raw",
                "--node",
                "worker-1.example.com",
                "--block",
                "--reclaim",
                "Delete",
                "--name",
                "raw-pv",
                "--storage-class",
                "local-blockd",
            ],
        );
        let spec = &pv["spec"];
        assert_eq!(pv["metadata"]["name"], "raw-pv");
        assert_eq!(
            pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"], "blockd.csi.io",
            "Delete needs the provisioner to own the PV"
        );
        assert_eq!(spec["capacity"]["storage"], "1536Mi");
        assert_eq!(spec["volumeMode"], "Block");
        assert!(spec["csi"].get("fsType").is_none());
        assert_eq!(spec["persistentVolumeReclaimPolicy"], "Delete");
        assert_eq!(spec["storageClassName"], "local-blockd");
        assert_eq!(spec["csi"]["volumeHandle"], "worker-1.example.com/raw");

        let err = daemon.ctl_err(&["volume", "pv", "nope", "--node", NODE]);
        assert!(err.contains("\"nope\" does not exist"), "{err}");
        for bad in ["Node_A", "node/a", "a-", ""] {
            let err = daemon.ctl_err(&["volume", "pv", "raw", "--node", bad]);
            assert!(err.contains("--node"), "{bad:?}: {err}");
        }
        let err = daemon.ctl_err(&["volume", "pv", "raw", "--node", NODE, "--name", "Raw PV"]);
        assert!(err.contains("--name"), "{err}");
        // Usage errors (exit 2): a file system or policy the driver does not know.
        for args in [
            ["volume", "pv", "raw", "--node", NODE, "--fs-type", "btrfs"],
            [
                "volume",
                "pv",
                "raw",
                "--node",
                NODE,
                "--reclaim",
                "Recycle",
            ],
        ] {
            let out = daemon.ctl(&args);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
            assert!(out.stderr.contains(args[6]), "{args:?}: {}", out.stderr);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Inline ephemeral volumes

fn ephemeral_context(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    let mut ctx: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // What kubelet adds with podInfoOnMount.
    ctx.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    ctx.insert("csi.storage.k8s.io/pod.name".into(), "app".into());
    ctx.insert("csi.storage.k8s.io/pod.namespace".into(), "default".into());
    ctx
}

async fn publish_ephemeral(
    node: &mut NodeClient<tonic::transport::Channel>,
    id: &str,
    target: &Path,
    ctx: &HashMap<String, String>,
) -> Result<(), tonic::Status> {
    node.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap("")),
        volume_context: ctx.clone(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

/// The blockd volumes, as (name, size).
fn blockd_volumes(env: &Env) -> Vec<(String, u64)> {
    env.daemon
        .ctl_json(&["volume", "list"])
        .as_array()
        .expect("volume list is an array")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().expect("name").to_string(),
                v["size_bytes"].as_u64().expect("size"),
            )
        })
        .collect()
}

/// Nothing of any ephemeral volume is left: no blockd volume, no record or staging
/// directory, and (assert_clean) no mount, device, helper or export.
async fn assert_no_ephemeral_left(env: &Env) {
    let volumes = blockd_volumes(env);
    assert!(volumes.is_empty(), "volumes left in blockd: {volumes:?}");
    let dir = env.shim.state_dir().join("ephemeral");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "ephemeral state left: {left:?}");
    env.assert_clean().await;
}

#[test]
fn ephemeral_publish_creates_and_unpublish_deletes_the_volume() {
    require_root_and_tools!();
    runtime().block_on(async {
        let mut env = Env::start(&[]).await;
        let target = env.target("eph");
        let ctx = ephemeral_context(&[("size", "64Mi"), ("fsType", "ext4"), ("maxIops", "900")]);
        for round in 0..2 {
            publish_ephemeral(&mut env.node, KUBELET_ID, &target, &ctx)
                .await
                .unwrap_or_else(|s| panic!("publish #{round}: {s}\n{}", env.shim.log()));
        }
        let volumes = blockd_volumes(&env);
        assert_eq!(volumes.len(), 1, "{volumes:?}");
        let (name, size) = &volumes[0];
        assert!(name.starts_with("eph-"), "{name}");
        assert_eq!(*size, 64 << 20);
        let shown = env.daemon.ctl_json(&["volume", "show", name]);
        assert_eq!(shown["max_iops"], 900, "{shown}");
        let (source, _) = mount_of(&target).expect("target is mounted");
        assert!(source.starts_with(device_prefix()), "{source}");

        let data = content(3, 2 << 20);
        write_synced(&target.join("scratch"), &data);
        assert_eq!(
            checksum(&std::fs::read(target.join("scratch")).unwrap()),
            checksum(&data)
        );
        // Kubelet asks for stats with its own id and the target path.
        let stats = env
            .node
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: KUBELET_ID.into(),
                volume_path: target.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .expect("stats of an ephemeral volume")
            .into_inner();
        let bytes = usage(&stats, csi::volume_usage::Unit::Bytes);
        assert!(bytes.used >= data.len() as i64, "{stats:?}");

        for round in 0..2 {
            env.unpublish(KUBELET_ID, &target)
                .await
                .unwrap_or_else(|s| panic!("unpublish #{round}: {s}\n{}", env.shim.log()));
        }
        assert!(!target.exists());
        assert_no_ephemeral_left(&env).await;
    });
}

#[test]
fn ephemeral_errors_follow_the_spec_and_leave_nothing() {
    require_root_and_tools!();
    runtime().block_on(async {
        let mut env = Env::start(&[]).await;
        let target = env.target("bad");
        for (attrs, code, needle) in [
            (&[("size", "lots")][..], Code::InvalidArgument, "size"),
            (&[("size", "0")][..], Code::InvalidArgument, "size"),
            (&[("fsType", "btrfs")][..], Code::InvalidArgument, "fstype"),
            (&[("colour", "blue")][..], Code::InvalidArgument, "colour"),
            (
                &[("pool", "nosuchpool")][..],
                Code::InvalidArgument,
                "nosuchpool",
            ),
            // The test pool is 2 GiB: 100 TiB is past any over-provisioning limit.
            (&[("size", "100Ti")][..], Code::ResourceExhausted, "pool"),
        ] {
            let r = publish_ephemeral(
                &mut env.node,
                KUBELET_ID,
                &target,
                &ephemeral_context(attrs),
            )
            .await;
            let message = expect_code(r, code, &format!("{attrs:?}"));
            assert!(message.contains(needle), "{attrs:?}: {message}");
            assert_no_ephemeral_left(&env).await;
        }
        // After all that, a good request works and cleans up.
        let ctx = ephemeral_context(&[("size", "32Mi")]);
        publish_ephemeral(&mut env.node, KUBELET_ID, &target, &ctx)
            .await
            .unwrap_or_else(|s| panic!("publish: {s}\n{}", env.shim.log()));
        env.unpublish(KUBELET_ID, &target).await.expect("unpublish");
        assert_no_ephemeral_left(&env).await;
    });
}

#[test]
fn ephemeral_crash_between_steps_then_retry_and_unpublish_leave_nothing() {
    require_root_and_tools!();
    runtime().block_on(async {
        for (point, retry) in [
            ("ephemeral-created", true),
            ("ephemeral-staged", true),
            ("ephemeral-staged", false),
        ] {
            let mut env = Env::start_with_env(
                &["--attach", attach_mode()],
                &[("CSI_SHIM_CRASH_POINT", point)],
            )
            .await;
            let target = env.target("crash");
            let ctx = ephemeral_context(&[("size", "48Mi")]);
            let r = publish_ephemeral(&mut env.node, KUBELET_ID, &target, &ctx).await;
            assert!(r.is_err(), "{point}: csi-shim should have died mid-publish");
            let status = env.shim.wait_exit();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(libc::SIGKILL),
                "{point}: {status}\n{}",
                env.shim.log()
            );
            // The crash left the volume behind; a restarted csi-shim finishes the job.
            assert_eq!(blockd_volumes(&env).len(), 1, "{point}");
            env.shim.restart_with_env(&[]);
            env.reconnect().await;
            if retry {
                publish_ephemeral(&mut env.node, KUBELET_ID, &target, &ctx)
                    .await
                    .unwrap_or_else(|s| {
                        panic!("{point}: retried publish: {s}\n{}", env.shim.log())
                    });
                let data = content(11, 1 << 20);
                write_synced(&target.join("after-crash"), &data);
                assert_eq!(
                    checksum(&std::fs::read(target.join("after-crash")).unwrap()),
                    checksum(&data)
                );
            }
            for round in 0..2 {
                env.unpublish(KUBELET_ID, &target)
                    .await
                    .unwrap_or_else(|s| {
                        panic!("{point}: unpublish #{round}: {s}\n{}", env.shim.log())
                    });
            }
            assert_no_ephemeral_left(&env).await;
        }
    });
}
