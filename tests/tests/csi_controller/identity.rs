//! Identity (GetPluginInfo, GetPluginCapabilities, Probe) and the controller's
//! capabilities, Probe across a blockd restart and a failed pool, controller-only mode.

use super::*;

#[test]
fn identity_info_capabilities_and_controller_capabilities() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut id = env.identity().await;
        let info = id
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .expect("GetPluginInfo")
            .into_inner();
        assert_eq!(info.name, "blockd.csi.io");
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

        let caps = plugin_capabilities(&mut id).await;
        let mut services = HashSet::new();
        let mut expansion = None;
        for c in caps {
            match c.r#type.expect("a capability type") {
                csi::plugin_capability::Type::Service(s) => {
                    services.insert(s.r#type);
                }
                csi::plugin_capability::Type::VolumeExpansion(e) => expansion = Some(e.r#type),
            }
        }
        assert!(services.contains(&(service::Type::ControllerService as i32)));
        assert!(services.contains(&(service::Type::VolumeAccessibilityConstraints as i32)));
        assert_eq!(expansion, Some(volume_expansion::Type::Online as i32));

        let caps = controller_rpcs(&mut env.controller().await).await;
        for want in [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::CloneVolume,
            rpc::Type::ListVolumes,
            rpc::Type::ListSnapshots,
            rpc::Type::GetCapacity,
            rpc::Type::ExpandVolume,
            rpc::Type::GetVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
            rpc::Type::ListVolumesPublishedNodes,
            rpc::Type::GetSnapshot,
            rpc::Type::ModifyVolume,
        ] {
            assert!(caps.contains(&(want as i32)), "missing {want:?}");
        }
        // Not advertised, so not served: the spec's UNIMPLEMENTED.
        assert!(!caps.contains(&(rpc::Type::PublishUnpublishVolume as i32)));
        let publish = env
            .controller()
            .await
            .controller_publish_volume(csi::ControllerPublishVolumeRequest::default())
            .await;
        assert_eq!(publish.unwrap_err().code(), Code::Unimplemented);
    });
}

async fn probe_ready(id: &mut IdentityClient<Channel>) -> bool {
    id.probe(csi::ProbeRequest {})
        .await
        .expect("Probe answers OK whether or not blockd is up")
        .into_inner()
        .ready
        .expect("Probe sets ready")
}

/// Polls Probe until it says `want` (the shim's channel to blockd reconnects lazily).
async fn wait_probe(id: &mut IdentityClient<Channel>, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if probe_ready(id).await == want {
            return;
        }
        assert!(Instant::now() < deadline, "Probe never said ready={want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn probe_follows_blockd_down_and_up() {
    let mut env = Env::start();
    let rt = runtime();
    let mut id = rt.block_on(env.identity());
    rt.block_on(wait_probe(&mut id, true));
    assert!(env.daemon.stop().success(), "blockd stops cleanly");
    // Not ready while blockd is away, and the answer comes quickly (no hang).
    let started = Instant::now();
    assert!(!rt.block_on(probe_ready(&mut id)));
    assert!(started.elapsed() < Duration::from_secs(10));
    // Controller calls that need blockd fail with a retryable code meanwhile.
    let err = rt
        .block_on(async {
            env.controller()
                .await
                .create_volume(create_req("while-down", 4 * MIB))
                .await
        })
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("blockd"), "{err:?}");
    env.daemon.restart();
    rt.block_on(wait_probe(&mut id, true));
    rt.block_on(async {
        create(
            &mut env.controller().await,
            create_req("after-restart", 4 * MIB),
        )
        .await;
    });
}

#[test]
fn controller_only_mode_serves_the_controller() {
    let env = Env::start_with(&[], &["--mode", "controller"]);
    env.rt.block_on(async {
        let caps = plugin_capabilities(&mut env.identity().await).await;
        assert!(offers_service(&caps, service::Type::ControllerService));
        create(&mut env.controller().await, create_req("ctl-only", 4 * MIB)).await;
    });
    // Node mode does not claim a controller service.
    let daemon = Daemon::start();
    let shim = CsiShim::start(&daemon, NODE, &["--mode", "node"]);
    let rt = runtime();
    rt.block_on(async {
        let caps = plugin_capabilities(&mut IdentityClient::new(shim.channel().await)).await;
        assert!(!offers_service(&caps, service::Type::ControllerService));
    });
}

#[test]
fn a_failed_pool_makes_probe_unhealthy_and_volumes_abnormal() {
    // A real blockd hands its socket path over to the stand-in.
    let mut env = Env::start();
    assert!(env.daemon.stop().success());
    failed_blockd::serve(&env.rt, &env.daemon.api_socket());
    env.rt.block_on(async {
        let mut id = env.identity().await;
        // The shim's channel may still hold the old connection for a moment.
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            match id.probe(csi::ProbeRequest {}).await {
                Err(status) => break status,
                Ok(_) => {
                    assert!(Instant::now() < deadline, "Probe never saw the failed pool");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains(failed_blockd::HEALTH),
            "{status:?}"
        );

        let mut c = env.controller().await;
        let got = get_volume(&mut c, &format!("{NODE}/vol")).await;
        let status = got.status.expect("status");
        assert_eq!(status.published_node_ids, vec![NODE.to_string()]);
        let condition = status.volume_condition.expect("condition");
        assert!(condition.abnormal);
        assert!(
            condition.message.contains(failed_blockd::HEALTH),
            "{condition:?}"
        );

        let listed = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner()
            .entries;
        assert_eq!(listed.len(), 1);
        let condition = listed[0].status.clone().unwrap().volume_condition.unwrap();
        assert!(condition.abnormal);

        let room = capacity(&mut c, HashMap::new()).await;
        assert_eq!(
            (room.available_capacity, room.maximum_volume_size),
            (0, Some(0))
        );
        expect_code(
            "create on a failed pool",
            c.create_volume(create_req("new", 4 * MIB)).await,
            Code::ResourceExhausted,
            "Input/output error",
        );
    });
}
