//! CSI ControllerModifyVolume (Kubernetes VolumeAttributesClass) and CreateVolume's
//! `mutable_parameters`: QoS changes live on an exported volume, refusals change nothing,
//! and an `iopsPerGB` limit follows ControllerExpandVolume.
//!
//! Rates are only ever bounded from above (a busy machine only makes I/O slower): N
//! requests under a limit of L IOPS cannot finish faster than (N - burst) / L.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockd_proto::csi;
use blockd_proto::v1;
use blockd_tests::csi_controller::{
    controller_rpcs, create, create_block_req, params, Env, GIB, MIB, NODE,
};
use blockd_tests::nbd::NbdClient;
use blockd_tests::{expect_status, have_tool, skip};
use tonic::Code;

/// (effective max_iops, max_bandwidth_bytes, policy iops_per_gb) of a volume in blockd.
async fn qos(env: &Env, name: &str) -> (u64, u64, u64) {
    let v = env
        .blockd_volume(name)
        .await
        .expect("blockd has the volume");
    let q = v.qos.unwrap_or_default();
    let p = v.qos_policy.unwrap_or_default();
    (q.max_iops, q.max_bandwidth_bytes, p.iops_per_gb)
}

/// A raw block volume of `bytes` with StorageClass `parameters`.
fn create_req(name: &str, bytes: i64, parameters: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        parameters: params(parameters),
        ..create_block_req(name, bytes)
    }
}

fn modify(volume_id: &str, pairs: &[(&str, &str)]) -> csi::ControllerModifyVolumeRequest {
    csi::ControllerModifyVolumeRequest {
        volume_id: volume_id.into(),
        mutable_parameters: params(pairs),
        ..Default::default()
    }
}

/// An NBD connection held open across QoS changes.
struct NbdConn {
    c: NbdClient,
    cookie: u64,
}

impl NbdConn {
    fn open(socket: &Path, export: &str) -> NbdConn {
        let mut c = NbdClient::connect(socket, Duration::from_secs(60));
        if let Err(reply) = c.go(export) {
            panic!("NBD_OPT_GO for {export:?} refused: reply type {reply:#x}");
        }
        NbdConn { c, cookie: 0 }
    }

    /// Reads 4 KiB `n` times, one request at a time; answers how long it took.
    fn reads(&mut self, n: u32) -> Duration {
        let start = Instant::now();
        for i in 0..n {
            self.cookie += 1;
            self.c.read(self.cookie, u64::from(i % 64) * 4096, 4096);
        }
        start.elapsed()
    }
}

/// fio's measured read IOPS on `uri` (its nbd engine), or None without fio.
fn fio_iops(uri: &str) -> Option<f64> {
    if !have_tool("fio") {
        skip("fio is not installed (tools/test.sh installs it): the fio half of the check");
        return None;
    }
    let out = Command::new("fio")
        .args([
            "--name=qos",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randread",
            "--bs=4k",
            "--size=4M",
            "--iodepth=4",
            "--time_based=1",
            "--runtime=2",
            "--output-format=json",
        ])
        .output()
        .expect("run fio");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = &text[text.find('{').expect("fio json")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio json parses");
    Some(v["jobs"][0]["read"]["iops"].as_f64().expect("iops"))
}

#[test]
fn modify_volume_changes_the_qos_of_running_io() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let id = create(&mut c, create_req("live", 64 * MIB, &[("maxIops", "20")]))
            .await
            .volume_id;
        assert_eq!(qos(&env, "live").await, (20, 0, 0));
        let uri = env
            .daemon
            .grpc()
            .await
            .exports
            .export(v1::ExportRequest {
                image: "live".into(),
            })
            .await
            .expect("export")
            .into_inner()
            .uri;
        let socket = env.daemon.nbd_socket();
        let mut conn = tokio::task::spawn_blocking(move || NbdConn::open(&socket, "live"))
            .await
            .unwrap();

        // 30 reads under 20 IOPS (burst 2): at least 28 / 20 = 1.4 s.
        let (elapsed, back) = tokio::task::spawn_blocking(move || (conn.reads(30), conn))
            .await
            .unwrap();
        conn = back;
        assert!(
            elapsed >= Duration::from_millis(1300),
            "30 reads at 20 IOPS took only {elapsed:?}"
        );

        // Raise: blockd's view changes at once (a rate can only be bounded from above).
        c.controller_modify_volume(modify(&id, &[("maxIops", "2000")]))
            .await
            .expect("ControllerModifyVolume raises");
        assert_eq!(qos(&env, "live").await, (2000, 0, 0));
        let (_, back) = tokio::task::spawn_blocking(move || (conn.reads(20), conn))
            .await
            .unwrap();
        conn = back;

        // Lower, on the same open connection: 15 reads under 10 IOPS take at least
        // 14 / 10 = 1.4 s; under the old 2000 (or the first 20) they would not.
        c.controller_modify_volume(modify(&id, &[("maxIops", "10")]))
            .await
            .expect("ControllerModifyVolume lowers");
        assert_eq!(qos(&env, "live").await, (10, 0, 0));
        let (elapsed, conn) = tokio::task::spawn_blocking(move || (conn.reads(15), conn))
            .await
            .unwrap();
        drop(conn);
        assert!(
            elapsed >= Duration::from_millis(1300),
            "15 reads after lowering to 10 IOPS took only {elapsed:?}: the open connection \
             did not get the new limit"
        );

        // The next run of a real client sees the limit too.
        if let Some(iops) = fio_iops(&uri) {
            assert!(
                iops <= 15.0,
                "fio measured {iops:.1} IOPS under a 10 IOPS limit"
            );
        }
        // Idempotent: the same change again is OK and changes nothing.
        c.controller_modify_volume(modify(&id, &[("maxIops", "10")]))
            .await
            .expect("repeat ControllerModifyVolume");
        assert_eq!(qos(&env, "live").await, (10, 0, 0));
    });
}

#[test]
fn modify_volume_refusals_change_nothing() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let id = create(
            &mut c,
            create_req(
                "vol",
                64 * MIB,
                &[("maxIops", "300"), ("maxBandwidth", "1Mi")],
            ),
        )
        .await
        .volume_id;
        let before = qos(&env, "vol").await;
        assert_eq!(before, (300, 1 << 20, 0));
        let cases: Vec<(&str, csi::ControllerModifyVolumeRequest, Code, &str)> = vec![
            (
                "no volume_id",
                modify("", &[("maxIops", "5")]),
                Code::InvalidArgument,
                "volume_id",
            ),
            (
                "no mutable_parameters",
                modify(&id, &[]),
                Code::InvalidArgument,
                "mutable_parameters",
            ),
            (
                "unknown key",
                modify(&id, &[("maxIops", "5"), ("tier", "gold")]),
                Code::InvalidArgument,
                "tier",
            ),
            (
                "StorageClass-only key",
                modify(&id, &[("pool", "default")]),
                Code::InvalidArgument,
                "pool",
            ),
            (
                "zero",
                modify(&id, &[("maxIops", "0")]),
                Code::InvalidArgument,
                "maxIops",
            ),
            (
                "not a number",
                modify(&id, &[("iopsPerGB", "lots")]),
                Code::InvalidArgument,
                "iopsPerGB",
            ),
            (
                "bad quantity",
                modify(&id, &[("maxBandwidth", "10GB"), ("maxIops", "5")]),
                Code::InvalidArgument,
                "maxBandwidth",
            ),
            (
                "missing volume",
                modify(&format!("{NODE}/missing"), &[("maxIops", "5")]),
                Code::NotFound,
                "does not exist",
            ),
            (
                "malformed id",
                modify("no-slash", &[("maxIops", "5")]),
                Code::NotFound,
                "does not exist",
            ),
            (
                "another node's volume",
                modify("node-b/vol", &[("maxIops", "5")]),
                Code::FailedPrecondition,
                "node-b",
            ),
        ];
        for (what, req, code, needle) in cases {
            expect_status(what, c.controller_modify_volume(req).await, code, needle);
            assert_eq!(qos(&env, "vol").await, before, "{what} changed the volume");
        }
    });
}

#[test]
fn iops_per_gb_follows_expansion_and_keys_change_one_at_a_time() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let rpcs = controller_rpcs(&mut c).await;
        assert!(
            rpcs.contains(&(csi::controller_service_capability::rpc::Type::ModifyVolume as i32))
        );

        let id = create(&mut c, create_req("scaled", GIB, &[("iopsPerGB", "20")]))
            .await
            .volume_id;
        assert_eq!(qos(&env, "scaled").await, (20, 0, 20));
        let expanded = c
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 3 * GIB / 2,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .expect("ControllerExpandVolume")
            .into_inner();
        assert_eq!(expanded.capacity_bytes, 3 * GIB / 2);
        assert_eq!(
            qos(&env, "scaled").await,
            (30, 0, 20),
            "the limit follows the size"
        );

        // Only the keys given change.
        c.controller_modify_volume(modify(&id, &[("maxBandwidth", "2Mi")]))
            .await
            .unwrap();
        assert_eq!(qos(&env, "scaled").await, (30, 2 << 20, 20));
        c.controller_modify_volume(modify(&id, &[("maxIops", "25")]))
            .await
            .unwrap();
        assert_eq!(
            qos(&env, "scaled").await,
            (25, 2 << 20, 20),
            "maxIops caps iopsPerGB"
        );
        c.controller_modify_volume(modify(&id, &[("iopsPerGB", "10")]))
            .await
            .unwrap();
        assert_eq!(qos(&env, "scaled").await, (15, 2 << 20, 10));
        c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 2 * GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(qos(&env, "scaled").await, (20, 2 << 20, 10));

        // mutable_parameters at creation win over the StorageClass's keys.
        let mut req = create_req("vac", GIB, &[("iopsPerGB", "20"), ("maxBandwidth", "1Mi")]);
        req.mutable_parameters = params(&[("maxIops", "15"), ("maxBandwidth", "3Mi")]);
        create(&mut c, req.clone()).await;
        assert_eq!(qos(&env, "vac").await, (15, 3 << 20, 20));
        // Idempotent with the same request.
        create(&mut c, req).await;
        // ValidateVolumeCapabilities judges mutable parameters the same way.
        let v = c
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: format!("{NODE}/vac"),
                volume_capabilities: create_req("x", GIB, &[]).volume_capabilities,
                mutable_parameters: params(&[("colour", "blue")]),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(v.confirmed.is_none());
        assert!(v.message.contains("colour"), "{}", v.message);
    });
}
