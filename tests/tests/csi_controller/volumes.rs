//! CreateVolume, DeleteVolume, ValidateVolumeCapabilities and ListVolumes: defaults,
//! idempotency, every spec error, pools, seeded QoS offerings and concurrent calls.

use super::*;

#[test]
fn create_volume_defaults_topology_context_and_idempotency() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        // No capacity range: the 1 GiB default.
        let v = create(&mut c, create_req("pvc-default", 0)).await;
        assert_eq!(v.capacity_bytes, GIB);
        assert_eq!(v.volume_id, format!("{NODE}/pvc-default"));
        assert_eq!(v.accessible_topology, vec![topology(NODE)]);
        assert_eq!(v.volume_context["pool"], "default");
        assert_eq!(v.volume_context["fsType"], "ext4");
        assert!(v.content_source.is_none());

        // Round up to 4 KiB; the same request again returns the same volume.
        let mut req = create_req("pvc-odd", 5000);
        req.parameters = params(&[
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/pvc/namespace", "default"),
            ("csi.storage.k8s.io/pv/name", "pvc-odd"),
        ]);
        let first = create(&mut c, req.clone()).await;
        assert_eq!(first.capacity_bytes, 8192);
        let second = create(&mut c, req.clone()).await;
        assert_eq!(first, second);
        // A compatible range (the existing size fits it) is the same volume too.
        let mut wider = req.clone();
        wider.capacity_range = range(4096, 1 << 20);
        assert_eq!(create(&mut c, wider).await.volume_id, first.volume_id);
        assert_eq!(env.blockd_volume("pvc-odd").await.unwrap().size_bytes, 8192);

        // Rounding never passes the limit: the largest 4 KiB multiple below it.
        let mut capped = create_req("pvc-capped", 0);
        capped.capacity_range = range(4000, 5000);
        assert_eq!(create(&mut c, capped).await.capacity_bytes, 4096);

        // Same name, incompatible: ALREADY_EXISTS.
        let mut bigger = req.clone();
        bigger.capacity_range = range(64 * MIB, 0);
        expect_code(
            "same name, other size",
            c.create_volume(bigger).await,
            Code::AlreadyExists,
            "pvc-odd",
        );
        let mut limited = req.clone();
        limited.parameters = params(&[("maxIops", "100")]);
        expect_code(
            "same name, other QoS",
            c.create_volume(limited).await,
            Code::AlreadyExists,
            "QoS",
        );

        // Names that are not blockd names map to a stable derived name.
        let odd = create(&mut c, create_req("My Volume #1", 4 * MIB)).await;
        let again = create(&mut c, create_req("My Volume #1", 4 * MIB)).await;
        assert_eq!(odd.volume_id, again.volume_id);
        assert!(odd.volume_id.starts_with(&format!("{NODE}/csi-")));

        // Topology: a requisite that admits this node is fine; one that does not is
        // RESOURCE_EXHAUSTED so that the provisioner tries elsewhere.
        let mut here = create_req("pvc-topo", 4 * MIB);
        here.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![topology("node-z"), topology(NODE)],
            preferred: vec![topology(NODE)],
        });
        create(&mut c, here).await;
        let mut elsewhere = create_req("pvc-elsewhere", 4 * MIB);
        elsewhere.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![topology("node-b")],
            preferred: vec![],
        });
        expect_code(
            "requisite topology of another node",
            c.create_volume(elsewhere).await,
            Code::ResourceExhausted,
            NODE,
        );
        assert!(env.blockd_volume("pvc-elsewhere").await.is_none());

        // A pool this node does not have: provision elsewhere.
        let mut no_pool = create_req("pvc-nopool", 4 * MIB);
        no_pool.parameters = params(&[("pool", "ssd")]);
        expect_code(
            "unknown pool",
            c.create_volume(no_pool).await,
            Code::ResourceExhausted,
            "ssd",
        );

        // Block and every single-node mode are served.
        for (i, mode) in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ]
        .into_iter()
        .enumerate()
        {
            let mut req = create_req(&format!("pvc-mode-{i}"), 4 * MIB);
            req.volume_capabilities = vec![cap(mode, block()), cap(mode, mount("xfs"))];
            let v = create(&mut c, req).await;
            assert_eq!(v.volume_context["fsType"], "xfs");
        }
    });
}

#[test]
fn create_volume_refuses_bad_requests_with_spec_codes() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let base = create_req("pvc-bad", 4 * MIB);
        let cases: Vec<(&str, csi::CreateVolumeRequest, Code, &str)> = vec![
            (
                "no name",
                csi::CreateVolumeRequest {
                    name: String::new(),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "name",
            ),
            (
                "no capabilities",
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![],
                    ..base.clone()
                },
                Code::InvalidArgument,
                "volume_capabilities",
            ),
            (
                "multi-node reader",
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![cap(Mode::MultiNodeReaderOnly, mount(""))],
                    ..base.clone()
                },
                Code::InvalidArgument,
                "MULTI_NODE_READER_ONLY",
            ),
            (
                "multi-node writer",
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![cap(Mode::MultiNodeMultiWriter, block())],
                    ..base.clone()
                },
                Code::InvalidArgument,
                "MULTI_NODE_MULTI_WRITER",
            ),
            (
                "no access mode",
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![csi::VolumeCapability {
                        access_mode: None,
                        access_type: Some(block()),
                    }],
                    ..base.clone()
                },
                Code::InvalidArgument,
                "access_mode",
            ),
            (
                "no access type",
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![csi::VolumeCapability {
                        access_mode: Some(AccessMode {
                            mode: Mode::SingleNodeWriter as i32,
                        }),
                        access_type: None,
                    }],
                    ..base.clone()
                },
                Code::InvalidArgument,
                "access_type",
            ),
            (
                "btrfs",
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![cap(Mode::SingleNodeWriter, mount("btrfs"))],
                    ..base.clone()
                },
                Code::InvalidArgument,
                "btrfs",
            ),
            (
                "unknown parameter",
                csi::CreateVolumeRequest {
                    parameters: params(&[("type", "io1")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "type",
            ),
            (
                "bad fstype parameter",
                csi::CreateVolumeRequest {
                    parameters: params(&[("csi.storage.k8s.io/fstype", "zfs")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "zfs",
            ),
            (
                "fstype parameter against capability",
                csi::CreateVolumeRequest {
                    parameters: params(&[("csi.storage.k8s.io/fstype", "xfs")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "fs_type",
            ),
            (
                "bad maxIops",
                csi::CreateVolumeRequest {
                    parameters: params(&[("maxIops", "lots")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "maxIops",
            ),
            (
                "bad iopsPerGB",
                csi::CreateVolumeRequest {
                    parameters: params(&[("iopsPerGB", "0")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "iopsPerGB",
            ),
            (
                "bad maxBandwidth",
                csi::CreateVolumeRequest {
                    parameters: params(&[("maxBandwidth", "10GB")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "maxBandwidth",
            ),
            (
                "limit below required",
                csi::CreateVolumeRequest {
                    capacity_range: range(8 * MIB, 4 * MIB),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "limit_bytes",
            ),
            (
                "negative required",
                csi::CreateVolumeRequest {
                    capacity_range: range(-1, 0),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "negative",
            ),
            (
                "no 4 KiB multiple in range",
                csi::CreateVolumeRequest {
                    capacity_range: range(4097, 8000),
                    ..base.clone()
                },
                Code::OutOfRange,
                "4096",
            ),
            (
                "larger than blockd allows",
                csi::CreateVolumeRequest {
                    capacity_range: range(i64::MAX, 0),
                    ..base.clone()
                },
                Code::OutOfRange,
                "largest",
            ),
            (
                "past the over-provisioning ratio",
                csi::CreateVolumeRequest {
                    // The test pool is 2 GiB and the default ratio 4.
                    capacity_range: range(9 * GIB, 0),
                    ..base.clone()
                },
                Code::ResourceExhausted,
                "over-provisioning",
            ),
            (
                "mutable parameter the driver cannot change",
                csi::CreateVolumeRequest {
                    mutable_parameters: params(&[("pool", "default")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "mutable_parameters",
            ),
            (
                "content source without a type",
                csi::CreateVolumeRequest {
                    volume_content_source: Some(csi::VolumeContentSource { r#type: None }),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "volume_content_source",
            ),
        ];
        for (what, req, code, needle) in cases {
            expect_code(what, c.create_volume(req).await, code, needle);
        }
        assert!(
            env.blockd_volume_names().await.is_empty(),
            "no refused request may leave a volume behind"
        );
    });
}

#[test]
fn seed_offerings_give_their_qos() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        // deploy/kubernetes/storageclasses.yaml, after the seed chapter's table 4.1.
        let default_block = params(&[
            ("pool", "default"),
            ("csi.storage.k8s.io/fstype", "ext4"),
            ("maxBandwidth", "90Mi"),
        ]);
        let performance_block = params(&[
            ("pool", "default"),
            ("csi.storage.k8s.io/fstype", "xfs"),
            ("iopsPerGB", "20"),
            ("maxIops", "64000"),
            ("maxBandwidth", "1000Mi"),
        ]);
        let mut req = create_req("pvc0", GIB);
        req.parameters = default_block;
        let v = create(&mut c, req).await;
        assert_eq!(v.volume_context["fsType"], "ext4");
        let qos = env.blockd_volume("pvc0").await.unwrap().qos.unwrap();
        assert_eq!((qos.max_iops, qos.max_bandwidth_bytes), (0, 90 << 20));

        let mut req = create_req("pvc1", 3 * GIB / 2);
        req.volume_capabilities = vec![cap(Mode::SingleNodeWriter, mount("xfs"))];
        req.parameters = performance_block.clone();
        let v = create(&mut c, req.clone()).await;
        assert_eq!(v.volume_context["fsType"], "xfs");
        let qos = env.blockd_volume("pvc1").await.unwrap().qos.unwrap();
        assert_eq!(qos.max_iops, 30, "20 IOPS per GiB of a 1.5 GiB volume");
        assert_eq!(qos.max_bandwidth_bytes, 1000 << 20);
        // Idempotent with the same class.
        assert_eq!(create(&mut c, req).await, v);

        // maxIops caps iopsPerGB.
        let mut req = create_req("pvc2", 2 * GIB);
        req.parameters = params(&[("iopsPerGB", "20"), ("maxIops", "25")]);
        create(&mut c, req).await;
        let qos = env.blockd_volume("pvc2").await.unwrap().qos.unwrap();
        assert_eq!((qos.max_iops, qos.max_bandwidth_bytes), (25, 0));

        // Bandwidth as plain bytes.
        let mut req = create_req("pvc3", 4 * MIB);
        req.parameters = params(&[("maxBandwidth", "1048576"), ("maxIops", "500")]);
        create(&mut c, req).await;
        let qos = env.blockd_volume("pvc3").await.unwrap().qos.unwrap();
        assert_eq!((qos.max_iops, qos.max_bandwidth_bytes), (500, 1 << 20));

        // No QoS parameters: unlimited.
        create(&mut c, create_req("pvc4", 4 * MIB)).await;
        let qos = env.blockd_volume("pvc4").await.unwrap().qos.unwrap();
        assert_eq!((qos.max_iops, qos.max_bandwidth_bytes), (0, 0));
    });
}

#[test]
fn delete_volume_is_idempotent_and_refuses_what_it_must() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let v = create(&mut c, create_req("doomed", 4 * MIB)).await;
        for id in [
            v.volume_id.clone(),
            v.volume_id.clone(),
            format!("{NODE}/never-existed"),
            "malformed".into(),
            format!("{NODE}/UPPER"),
        ] {
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("DeleteVolume {id}: {s}"));
        }
        assert!(env.blockd_volume("doomed").await.is_none());
        expect_code(
            "no id",
            c.delete_volume(csi::DeleteVolumeRequest::default()).await,
            Code::InvalidArgument,
            "volume_id",
        );
        expect_code(
            "another node's volume",
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: "node-b/doomed".into(),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
            "node-b",
        );
        // In use (staged on this node, i.e. exported): FAILED_PRECONDITION, untouched.
        let busy = create(&mut c, create_req("busy", 4 * MIB)).await;
        env.export("busy").await;
        expect_code(
            "exported volume",
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: busy.volume_id.clone(),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
            "in use",
        );
        assert!(env.blockd_volume("busy").await.is_some());
    });
}

#[test]
fn validate_volume_capabilities() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let v = create(&mut c, create_req("vvc", 4 * MIB)).await;
        let validate =
            |caps: Vec<csi::VolumeCapability>, parameters| csi::ValidateVolumeCapabilitiesRequest {
                volume_id: v.volume_id.clone(),
                volume_capabilities: caps,
                parameters,
                volume_context: v.volume_context.clone(),
                ..Default::default()
            };
        let ok = c
            .validate_volume_capabilities(validate(
                vec![rwo(), cap(Mode::SingleNodeMultiWriter, block())],
                params(&[("maxIops", "10")]),
            ))
            .await
            .expect("Validate")
            .into_inner();
        let confirmed = ok.confirmed.expect("supported capabilities are confirmed");
        assert_eq!(confirmed.volume_capabilities.len(), 2);
        assert_eq!(confirmed.volume_context, v.volume_context);

        for (what, caps, parameters) in [
            (
                "multi-node",
                vec![cap(Mode::MultiNodeMultiWriter, mount(""))],
                HashMap::new(),
            ),
            (
                "btrfs",
                vec![cap(Mode::SingleNodeWriter, mount("btrfs"))],
                HashMap::new(),
            ),
            ("unknown parameter", vec![rwo()], params(&[("zone", "a")])),
        ] {
            let answer = c
                .validate_volume_capabilities(validate(caps, parameters))
                .await
                .unwrap_or_else(|s| panic!("{what}: {s}"))
                .into_inner();
            assert!(answer.confirmed.is_none(), "{what} must not be confirmed");
            assert!(!answer.message.is_empty(), "{what}: say why");
        }

        expect_code(
            "no capabilities",
            c.validate_volume_capabilities(validate(vec![], HashMap::new()))
                .await,
            Code::InvalidArgument,
            "volume_capabilities",
        );
        for id in [format!("{NODE}/missing"), "garbage".to_string()] {
            expect_code(
                "unknown volume",
                c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: id,
                    volume_capabilities: vec![rwo()],
                    ..Default::default()
                })
                .await,
                Code::NotFound,
                "does not exist",
            );
        }
        expect_code(
            "no volume id",
            c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_capabilities: vec![rwo()],
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "volume_id",
        );
    });
}

#[test]
fn list_volumes_paginates_and_reports_status() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let mut want = HashSet::new();
        for i in 0..7 {
            want.insert(
                create(&mut c, create_req(&format!("vol-{i}"), 4 * MIB))
                    .await
                    .volume_id,
            );
        }
        env.export("vol-3").await;

        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = c
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 3,
                    starting_token: token.clone(),
                })
                .await
                .expect("ListVolumes")
                .into_inner();
            assert!(page.entries.len() <= 3);
            pages += 1;
            for entry in page.entries {
                let volume = entry.volume.expect("volume");
                let status = entry.status.expect("status");
                let published = volume.volume_id == format!("{NODE}/vol-3");
                assert_eq!(
                    status.published_node_ids,
                    if published {
                        vec![NODE.to_string()]
                    } else {
                        vec![]
                    },
                    "{}",
                    volume.volume_id
                );
                assert!(!status.volume_condition.expect("condition").abnormal);
                assert_eq!(volume.capacity_bytes, 4 * MIB);
                assert_eq!(volume.accessible_topology, vec![topology(NODE)]);
                seen.push(volume.volume_id);
            }
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        assert_eq!(pages, 3);
        assert_eq!(seen.len(), 7, "no duplicates across pages: {seen:?}");
        assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), want);

        // A page past a volume deleted in between still continues correctly.
        let first = c
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: format!("{NODE}/vol-1"),
            ..Default::default()
        })
        .await
        .unwrap();
        let rest = c
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 0,
                starting_token: first.next_token,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(rest.entries.len(), 5);
        assert!(rest.next_token.is_empty());

        expect_code(
            "invalid starting_token",
            c.list_volumes(csi::ListVolumesRequest {
                max_entries: 1,
                starting_token: "not-a-token".into(),
            })
            .await,
            Code::Aborted,
            "starting_token",
        );
        expect_code(
            "negative max_entries",
            c.list_volumes(csi::ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new(),
            })
            .await,
            Code::InvalidArgument,
            "max_entries",
        );

        // ControllerGetVolume: published and healthy, or NOT_FOUND.
        let got = get_volume(&mut c, &format!("{NODE}/vol-3")).await;
        let status = got.status.expect("status");
        assert_eq!(status.published_node_ids, vec![NODE.to_string()]);
        let condition = status.volume_condition.expect("condition");
        assert!(!condition.abnormal, "{}", condition.message);
        assert_eq!(
            got.volume.expect("volume").volume_context["pool"],
            "default"
        );
        for (id, code) in [
            (format!("{NODE}/vol-1"), Code::NotFound),
            ("junk".to_string(), Code::NotFound),
            (String::new(), Code::InvalidArgument),
            ("node-b/vol-3".to_string(), Code::FailedPrecondition),
        ] {
            expect_code(
                &format!("ControllerGetVolume {id:?}"),
                c.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id })
                    .await,
                code,
                "",
            );
        }
    });
}

#[test]
fn concurrent_identical_calls_are_aborted_not_duplicated() {
    let env = Env::start();
    env.rt.block_on(async {
        let c = env.controller().await;
        let mut aborted = 0;
        // Races are timing-dependent: a few rounds make an overlap (and so ABORTED)
        // certain in practice; every round must end with exactly one volume.
        for round in 0..5 {
            let name = format!("race-{round}");
            let mut calls = Vec::new();
            for _ in 0..24 {
                let mut c = c.clone();
                let req = create_req(&name, 4 * MIB);
                calls.push(tokio::spawn(async move { c.create_volume(req).await }));
            }
            let mut ok = 0;
            for call in calls {
                match call.await.expect("task") {
                    Ok(answer) => {
                        ok += 1;
                        let v = answer.into_inner().volume.expect("volume");
                        assert_eq!(v.volume_id, format!("{NODE}/{name}"));
                        assert_eq!(v.capacity_bytes, 4 * MIB);
                    }
                    Err(status) => {
                        assert_eq!(status.code(), Code::Aborted, "{status:?}");
                        assert!(status.message().contains("in progress"));
                        aborted += 1;
                    }
                }
            }
            assert!(ok >= 1, "round {round}: at least one call must succeed");
            let names = env.blockd_volume_names().await;
            assert_eq!(
                names.iter().filter(|n| **n == name).count(),
                1,
                "round {round}: {names:?}"
            );
            // The retry after the race succeeds with the same volume.
            let mut c = c.clone();
            create(&mut c, create_req(&name, 4 * MIB)).await;

            // Racing deletes: only OK or ABORTED, and the volume is gone after.
            let mut calls = Vec::new();
            for _ in 0..12 {
                let mut c = c.clone();
                let req = csi::DeleteVolumeRequest {
                    volume_id: format!("{NODE}/{name}"),
                    ..Default::default()
                };
                calls.push(tokio::spawn(async move { c.delete_volume(req).await }));
            }
            for call in calls {
                if let Err(status) = call.await.expect("task") {
                    assert_eq!(status.code(), Code::Aborted, "{status:?}");
                    aborted += 1;
                }
            }
            let mut c = c.clone();
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: format!("{NODE}/{name}"),
                ..Default::default()
            })
            .await
            .expect("DeleteVolume after the race");
            assert!(env.blockd_volume(&name).await.is_none());
        }
        assert!(
            aborted > 0,
            "no call was ever aborted: the op locks do not serialise"
        );
    });
}

#[test]
fn volumes_live_in_the_named_pool_and_clones_stay_with_their_source() {
    let dir = tempfile::tempdir().expect("pool dir");
    let default_pool = format!("default={},size=1G", dir.path().join("a.img").display());
    let fast_pool = format!("fast={},size=512M", dir.path().join("b.img").display());
    let env = Env::start_with(&["--pool", &default_pool, "--pool", &fast_pool], &[]);
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let mut req = create_req("on-fast", 8 * MIB);
        req.parameters = params(&[("pool", "fast")]);
        let v = create(&mut c, req.clone()).await;
        assert_eq!(v.volume_context["pool"], "fast");
        assert_eq!(env.blockd_volume("on-fast").await.unwrap().pool, "fast");
        // The same name in another pool is another volume.
        let mut elsewhere = req.clone();
        elsewhere.parameters = params(&[("pool", "default")]);
        expect_code(
            "same name, other pool",
            c.create_volume(elsewhere).await,
            Code::AlreadyExists,
            "pool",
        );

        let snap = snapshot(&mut c, &v.volume_id, "fast-snap").await;
        // No pool parameter: the restore lands in the source's pool.
        let mut restore = create_req("restored", 16 * MIB);
        restore.volume_content_source = from_snapshot(&snap.snapshot_id);
        let r = create(&mut c, restore.clone()).await;
        assert_eq!(r.volume_context["pool"], "fast");
        assert_eq!(env.blockd_volume("restored").await.unwrap().pool, "fast");
        // Another pool for a copy-on-write restore or clone: the source is incompatible.
        for (name, source) in [
            ("restored-default", from_snapshot(&snap.snapshot_id)),
            ("clone-default", from_volume(&v.volume_id)),
        ] {
            let mut req = create_req(name, 16 * MIB);
            req.volume_content_source = source;
            req.parameters = params(&[("pool", "default")]);
            expect_code(
                name,
                c.create_volume(req).await,
                Code::InvalidArgument,
                "pool",
            );
        }

        // Capacity is per pool.
        let fast = capacity(&mut c, params(&[("pool", "fast")])).await;
        let default = capacity(&mut c, HashMap::new()).await;
        assert!(
            fast.maximum_volume_size < default.maximum_volume_size,
            "fast {fast:?}, default {default:?}"
        );
        let pool = env.blockd_pool("fast").await;
        assert_eq!(
            fast.maximum_volume_size,
            Some(4 * pool.capacity_bytes as i64 - (24 * MIB)),
            "ratio 4 times capacity, less the 8 + 16 MiB provisioned"
        );
    });
}
