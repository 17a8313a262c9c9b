//! ControllerExpandVolume.

use super::*;

#[test]
fn expand_volume() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let v = create(&mut c, create_req("grow", 8 * MIB)).await;
        let expand = |required, limit, capability: Option<csi::VolumeCapability>| {
            csi::ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: range(required, limit),
                volume_capability: capability,
                ..Default::default()
            }
        };
        let grown = c
            .controller_expand_volume(expand(16 * MIB, 0, Some(rwo())))
            .await
            .expect("expand")
            .into_inner();
        assert_eq!(grown.capacity_bytes, 16 * MIB);
        assert!(grown.node_expansion_required, "mount volumes need the node");
        assert_eq!(
            env.blockd_volume("grow").await.unwrap().size_bytes,
            16 << 20
        );
        // Again, and smaller than now: nothing to do, same answer.
        for required in [16 * MIB, 8 * MIB] {
            let again = c
                .controller_expand_volume(expand(required, 0, Some(rwo())))
                .await
                .expect("idempotent expand")
                .into_inner();
            assert_eq!(again.capacity_bytes, 16 * MIB);
        }
        // Block volumes need no node step.
        let block_cap = cap(Mode::SingleNodeWriter, block());
        let grown = c
            .controller_expand_volume(expand(20 * MIB + 1, 24 * MIB, Some(block_cap)))
            .await
            .expect("expand block")
            .into_inner();
        assert_eq!(grown.capacity_bytes, 20 * MIB + 4096);
        assert!(!grown.node_expansion_required);

        for (what, req, code, needle) in [
            (
                "limit below the current size",
                expand(0, 8 * MIB, None),
                Code::OutOfRange,
                "shrink",
            ),
            (
                "limit below required",
                expand(32 * MIB, 24 * MIB, None),
                Code::InvalidArgument,
                "limit_bytes",
            ),
            (
                "no capacity range",
                csi::ControllerExpandVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "capacity_range",
            ),
            (
                "unsupported capability",
                expand(32 * MIB, 0, Some(cap(Mode::MultiNodeMultiWriter, block()))),
                Code::InvalidArgument,
                "MULTI_NODE",
            ),
            (
                "past the over-provisioning ratio",
                expand(9 * GIB, 0, None),
                Code::ResourceExhausted,
                "over-provisioning",
            ),
            (
                "unknown volume",
                csi::ControllerExpandVolumeRequest {
                    volume_id: format!("{NODE}/nope"),
                    capacity_range: range(32 * MIB, 0),
                    ..Default::default()
                },
                Code::NotFound,
                "nope",
            ),
            (
                "another node's volume",
                csi::ControllerExpandVolumeRequest {
                    volume_id: "node-b/grow".into(),
                    capacity_range: range(32 * MIB, 0),
                    ..Default::default()
                },
                Code::FailedPrecondition,
                "node-b",
            ),
            (
                "no volume id",
                csi::ControllerExpandVolumeRequest {
                    capacity_range: range(32 * MIB, 0),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "volume_id",
            ),
        ] {
            expect_code(what, c.controller_expand_volume(req).await, code, needle);
        }
        assert_eq!(
            env.blockd_volume("grow").await.unwrap().size_bytes,
            (20 << 20) + 4096,
            "refused expansions change nothing"
        );
    });
}
