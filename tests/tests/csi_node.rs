//! The CSI Node service on real mounts: a real blockd, a real csi-shim, real mkfs, mount,
//! bind mounts and file I/O. Volumes are created with blockd's API directly.
//!
//! The attacher under test is `BLOCKD_TEST_ATTACH`: `fuse-loop` (the default: csi-fuse-nbd
//! and loop devices, as on nodes without the kernel `nbd` module) or `nbd` (the kernel's
//! `/dev/nbdN` over netlink). `tools/test.sh` runs this file on the host with fuse-loop and
//! again inside a guest kernel (`tests/vm/run.sh`) with `nbd`, where ext4 also grows online.
//!
//! The harness (`Env`, the `Cleanup` guard, capabilities) lives in `blockd_tests::csi_node`.
//! Every test owns its daemon, its csi-shim and its directories; a `Cleanup` guard
//! unmounts everything under the test's directories and detaches their loop devices even
//! when the test fails, so no run leaves mounts or devices behind.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockd_proto::csi;
use blockd_proto::csi::volume_capability::access_mode::Mode;
use blockd_tests::csi_node::*;
use blockd_tests::{have_tool, require_root_and_tools, runtime};
use tonic::Code;

#[test]
fn lifecycle_ext4_files_survive_unstage_and_restage() {
    require_root_and_tools!();
    runtime().block_on(async {
        let mut env = Env::start(&[]).await;
        let id = env.volume("life", "256M");
        let (staging, target) = env.mount(&id, "life", mount_cap("ext4")).await;
        let (source, options) = mount_of(&staging).expect("staging path is mounted");
        assert!(source.starts_with(device_prefix()), "{source}");
        assert!(
            options.split(',').any(|o| o == "noatime"),
            "mount_flags applied: {options}"
        );
        assert!(mount_of(&target).is_some(), "target is bind-mounted");

        let mut files = HashMap::new();
        std::fs::create_dir_all(target.join("dir")).expect("mkdir");
        for (i, len) in [(1u64, 3 * MIB as usize), (2, 4096), (3, 777_777)] {
            let data = content(i, len);
            let name = format!("dir/file-{i}");
            write_synced(&target.join(&name), &data);
            files.insert(name, checksum(&data));
        }
        // The staging mount and the publication are the same file system.
        assert!(staging.join("dir/file-2").exists());

        env.umount(&id, &staging, &target).await;
        env.assert_clean().await;

        // Staged again: the volume holds ext4, so it is mounted, not reformatted.
        let (staging, target) = env.mount(&id, "life", mount_cap("")).await;
        for (name, sum) in &files {
            let data = std::fs::read(target.join(name)).expect("file survives");
            assert_eq!(checksum(&data), *sum, "{name} intact");
        }
        env.umount(&id, &staging, &target).await;
        env.assert_clean().await;
    });
}

#[test]
fn xfs_with_a_read_only_publication_beside_a_writable_one() {
    require_root_and_tools!();
    runtime().block_on(async {
        let mut env = Env::start(&[]).await;
        // mkfs.xfs needs at least 300 MiB.
        let id = env.volume("shared", "512M");
        let cap = mount_cap_mode("xfs", Mode::SingleNodeMultiWriter);
        let staging = env.staging("shared");
        env.stage(&id, &staging, cap.clone())
            .await
            .expect("stage xfs");
        let out = Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "TYPE"])
            .arg(mount_of(&staging).expect("mounted").0)
            .output()
            .expect("blkid");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "xfs");

        let rw = env.target("writer");
        let ro = env.target("reader");
        for _ in 0..2 {
            env.publish(&id, &staging, &rw, cap.clone(), false)
                .await
                .expect("publish rw");
            env.publish(&id, &staging, &ro, cap.clone(), true)
                .await
                .expect("publish ro");
        }
        // Same target, different readonly flag: ALREADY_EXISTS.
        expect_code(
            env.publish(&id, &staging, &ro, cap.clone(), false).await,
            Code::AlreadyExists,
            "republish with another readonly flag",
        );
        write_synced(&rw.join("note"), b"written through the writable target");
        assert_eq!(
            std::fs::read(ro.join("note")).expect("read through the read-only target"),
            b"written through the writable target"
        );
        let err = std::fs::File::create(ro.join("refused")).expect_err("read-only publication");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        assert!(mount_of(&ro)
            .expect("ro mounted")
            .1
            .split(',')
            .any(|o| o == "ro"));

        // Unstage while published is refused; the data stays reachable.
        expect_code(
            env.unstage(&id, &staging).await,
            Code::FailedPrecondition,
            "unstage while published",
        );
        for t in [&rw, &ro] {
            env.unpublish(&id, t).await.expect("unpublish");
        }
        env.unstage(&id, &staging).await.expect("unstage");
        env.assert_clean().await;
    });
}

#[test]
fn block_mode_publishes_the_device_and_data_reaches_blockd() {
    require_root_and_tools!();
    if !have_tool("qemu-io") {
        eprintln!("skipping: qemu-io is not installed (tools/test.sh installs it)");
        return;
    }
    runtime().block_on(async {
        let mut env = Env::start(&[]).await;
        let id = env.volume("raw", "64M");
        let (staging, target) = env.mount(&id, "raw", block_cap()).await;
        assert!(
            mount_of(&staging).is_none(),
            "block volumes are not mounted at staging"
        );
        assert!(
            std::os::unix::fs::FileTypeExt::is_block_device(
                &std::fs::metadata(&target).expect("target").file_type()
            ),
            "the target is a file with the device node bound on it"
        );

        // Write 1 MiB at 8 MiB with dd, direct, then read it back.
        let pattern = env.root.join("pattern");
        std::fs::write(&pattern, vec![0xabu8; MIB as usize]).expect("pattern file");
        let dd = Command::new("dd")
            .arg(format!("if={}", pattern.display()))
            .arg(format!("of={}", target.display()))
            .args([
                "bs=1M",
                "seek=8",
                "count=1",
                "oflag=direct",
                "conv=fsync,notrunc",
            ])
            .output()
            .expect("dd");
        assert!(
            dd.status.success(),
            "dd: {}",
            String::from_utf8_lossy(&dd.stderr)
        );
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&target)
            .expect("open device");
        let mut buf = vec![0u8; 2 * MIB as usize];
        let at = buf.as_ptr().align_offset(4096);
        f.seek(SeekFrom::Start(8 * MIB)).expect("seek");
        f.read_exact(&mut buf[at..at + MIB as usize])
            .expect("read back");
        assert!(buf[at..at + MIB as usize].iter().all(|b| *b == 0xab));
        drop(f);

        let stats = env.stats(&id, &target).await.expect("stats");
        assert_eq!(
            usage(&stats, csi::volume_usage::Unit::Bytes).total,
            (64 * MIB) as i64
        );
        assert!(!stats.volume_condition.expect("condition").abnormal);

        // Block publications cannot be turned into file systems.
        let other = env.target("raw-as-fs");
        expect_code(
            env.publish(&id, &staging, &other, mount_cap("ext4"), false)
                .await,
            Code::FailedPrecondition,
            "publish a block-staged volume as a file system",
        );
        env.umount(&id, &staging, &target).await;
        env.assert_clean().await;

        // The data is in blockd: read it over NBD directly.
        let uri = env.daemon.ctl_ok(&["export", "raw"]).trim().to_string();
        let out = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-r",
                &uri,
                "-c",
                "read -P 0xab 8M 1M",
                "-c",
                "read -P 0 0 8M",
            ])
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !text.contains("fail"), "{text}");
        env.daemon.ctl_ok(&["unexport", "raw"]);
    });
}

#[test]
fn stats_follow_writes_and_report_a_dead_attachment() {
    require_root_and_tools!();
    runtime().block_on(async {
        let mut env = Env::start(&[]).await;
        let id = env.volume("stats", "256M");
        let (staging, target) = env.mount(&id, "stats", mount_cap("ext4")).await;
        let before = env.stats(&id, &target).await.expect("stats");
        assert!(
            !before
                .volume_condition
                .as_ref()
                .expect("condition")
                .abnormal,
            "{before:?}"
        );
        let bytes0 = usage(&before, csi::volume_usage::Unit::Bytes);
        let inodes0 = usage(&before, csi::volume_usage::Unit::Inodes);
        let st = statvfs(&target);
        assert_eq!(bytes0.total as u64, st.f_blocks * st.f_frsize);
        assert!(bytes0.total > (200 * MIB) as i64, "{bytes0:?}");

        for i in 0..10 {
            write_synced(&target.join(format!("f{i}")), &content(i, 2 * MIB as usize));
        }
        let after = env
            .stats(&id, &staging)
            .await
            .expect("stats at the staging path");
        let bytes1 = usage(&after, csi::volume_usage::Unit::Bytes);
        let inodes1 = usage(&after, csi::volume_usage::Unit::Inodes);
        assert!(
            bytes1.used >= bytes0.used + (20 * MIB) as i64,
            "{bytes0:?} -> {bytes1:?}"
        );
        assert!(bytes1.available < bytes0.available);
        assert_eq!(
            inodes1.used,
            inodes0.used + 10,
            "{inodes0:?} -> {inodes1:?}"
        );

        // Unknown path: NOT_FOUND.
        expect_code(
            env.stats(&id, &env.root.join("nowhere")).await,
            Code::NotFound,
            "stats on a path the volume is not at",
        );

        if ublk() {
            // ublk has no helper: blockd serves the device. With blockd gone the device
            // holds its I/O, so the probe read times out and the volume is abnormal;
            // blockd started again recovers the device and the volume is healthy.
            env.daemon.kill();
            let deadline = Instant::now() + Duration::from_secs(30);
            let condition = loop {
                let stats = env.stats(&id, &target).await.expect("stats, blockd down");
                let condition = stats.volume_condition.expect("condition");
                if condition.abnormal || Instant::now() > deadline {
                    break condition;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            assert!(condition.abnormal, "{condition:?}");
            env.daemon.restart();
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let stats = env.stats(&id, &target).await.expect("stats after restart");
                let condition = stats.volume_condition.expect("condition");
                if !condition.abnormal {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the ublk device was not recovered: {condition:?}\n{}",
                    env.daemon.log()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            write_synced(&target.join("after-recovery"), &content(9, MIB as usize));
            env.umount(&id, &staging, &target).await;
            env.assert_clean().await;
            return;
        }
        // The helper serving the device dies (the FUSE server, or the proxy the kernel's
        // socket leads to): the volume is abnormal, and unstage still cleans up.
        let helper = if kernel_nbd() {
            "proxy.pid"
        } else {
            "fuse.pid"
        };
        let pidfile = std::fs::read_dir(env.shim.state_dir().join("attach"))
            .expect("attach dir")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join(helper))
            .find(|p| p.exists())
            .expect("helper pid file");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid")
            .trim()
            .parse()
            .expect("pid number");
        // SAFETY: kill(2) on the FUSE server pid read from the attachment's pid file.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let condition = loop {
            let stats = env
                .stats(&id, &target)
                .await
                .expect("stats of a broken volume");
            let condition = stats.volume_condition.expect("condition");
            if condition.abnormal || Instant::now() > deadline {
                break condition;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(condition.abnormal, "{condition:?}");
        // Either the dead helper or the failed read is named, whichever is seen first.
        assert!(
            ["FUSE server", "csi-nbd-proxy", device_prefix()]
                .iter()
                .any(|m| condition.message.contains(m)),
            "{}",
            condition.message
        );
        if kernel_nbd() {
            // /dev/nbdN outlives its proxy, with the file system mounted on it: a restarted
            // csi-shim gives it a new proxy (NBD_CMD_RECONFIGURE) and I/O carries on.
            env.shim.stop_with(libc::SIGKILL);
            env.shim.restart();
            env.reconnect().await;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let stats = env.stats(&id, &target).await.expect("stats after restart");
                let condition = stats.volume_condition.expect("condition");
                if !condition.abnormal {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the volume was not reconnected: {condition:?}\n{}",
                    env.shim.log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            write_synced(&target.join("after-reconnect"), &content(9, MIB as usize));
        }

        env.umount(&id, &staging, &target).await;
        env.assert_clean().await;
    });
}

#[test]
fn online_expansion_shows_in_df() {
    require_root_and_tools!();
    runtime().block_on(async {
        let mut env = Env::start(&[]).await;
        // XFS (at least 300 MiB): grown with xfs_growfs while published and written.
        let id = env.volume("grow", "320M");
        let (staging, target) = env.mount(&id, "grow", mount_cap("xfs")).await;
        write_synced(&target.join("before"), &content(7, MIB as usize));
        let small = df_bytes(&target);
        assert!(small < 320 * MIB, "{small}");

        env.daemon
            .ctl_ok(&["volume", "resize", "grow", "--size", "640M"]);
        let ublk_status = env.daemon.ctl_json(&["status"])["ublk"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if ublk() && ublk_status.contains("no online resize") {
            // This kernel cannot resize a live ublk device (UBLK_F_UPDATE_SIZE is Linux
            // 6.16+): NodeExpandVolume says so, and a restage shows the new size.
            let msg = expect_code(
                env.expand(&id, &target, 640 * MIB).await,
                Code::FailedPrecondition,
                "online growth of a ublk device without UBLK_F_UPDATE_SIZE",
            );
            assert!(msg.contains("UBLK_F_UPDATE_SIZE"), "{msg}");
            env.umount(&id, &staging, &target).await;
            let (staging, target) = env.mount(&id, "grow", mount_cap("xfs")).await;
            let big = df_bytes(&target);
            assert!(big > 550 * MIB, "df after restaging: {big}");
            assert_eq!(
                checksum(&std::fs::read(target.join("before")).expect("data kept")),
                checksum(&content(7, MIB as usize))
            );
            env.umount(&id, &staging, &target).await;
            env.assert_clean().await;
            return;
        }
        for _ in 0..2 {
            let grown = env
                .expand(&id, &target, 640 * MIB)
                .await
                .unwrap_or_else(|s| panic!("NodeExpandVolume: {s}\n{}", env.shim.log()));
            assert_eq!(grown.capacity_bytes, (640 * MIB) as i64);
        }
        let big = df_bytes(&target);
        assert!(big > 550 * MIB, "df after expansion: {big}");
        assert_eq!(
            checksum(&std::fs::read(target.join("before")).expect("data kept")),
            checksum(&content(7, MIB as usize))
        );
        // Fill past the old end of the volume (the file system had 320 MiB).
        for i in 0..5 {
            write_synced(
                &target.join(format!("after-{i}")),
                &content(100 + i, 80 * MIB as usize),
            );
        }
        // More than blockd holds: OUT_OF_RANGE.
        expect_code(
            env.expand(&id, &target, 1 << 30).await,
            Code::OutOfRange,
            "expand past the blockd volume",
        );
        env.umount(&id, &staging, &target).await;

        // ext4 grows online only with CAP_SYS_RESOURCE; without it the call says so.
        let id = env.volume("grow4", "128M");
        let (staging, target) = env.mount(&id, "grow4", mount_cap("ext4")).await;
        // Through the CSI controller, as external-resizer does it.
        let grown = env.controller_expand(&id, 384 * MIB).await;
        assert_eq!(grown.capacity_bytes, (384 * MIB) as i64);
        assert!(grown.node_expansion_required);
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            .expect("CapEff");
        if cap_eff & (1 << 24) != 0 {
            write_synced(&target.join("before"), &content(8, MIB as usize));
            env.expand(&id, &target, 384 * MIB)
                .await
                .unwrap_or_else(|s| panic!("grow ext4: {s}\n{}", env.shim.log()));
            // 128 MiB of ext4 offered about 110 MiB; 384 MiB offers about 340 MiB.
            assert!(df_bytes(&target) > 300 * MIB, "{}", df_bytes(&target));
            // Written past the old end, and read back after a restage.
            for i in 0..3 {
                write_synced(
                    &target.join(format!("after-{i}")),
                    &content(200 + i, 60 * MIB as usize),
                );
            }
            env.umount(&id, &staging, &target).await;
            let (s2, t2) = env.mount(&id, "grow4", mount_cap("ext4")).await;
            for i in 0..3 {
                assert_eq!(
                    checksum(&std::fs::read(t2.join(format!("after-{i}"))).expect("kept")),
                    checksum(&content(200 + i, 60 * MIB as usize))
                );
            }
            env.umount(&id, &s2, &t2).await;
            assert_fsck_clean(&env, "grow4", "ext4");
            env.assert_clean().await;
            return;
        } else {
            eprintln!("no CAP_SYS_RESOURCE here: checking that ext4 growth explains why");
            let msg = expect_code(
                env.expand(&id, &target, 384 * MIB).await,
                Code::FailedPrecondition,
                "ext4 growth without CAP_SYS_RESOURCE",
            );
            assert!(msg.contains("CAP_SYS_RESOURCE"), "{msg}");
        }
        env.umount(&id, &staging, &target).await;
        env.assert_clean().await;
    });
}

#[test]
fn spec_error_codes() {
    require_root_and_tools!();
    runtime().block_on(async {
        let mut env = Env::start(&["--max-volumes", "17"]).await;
        let id = env.volume("errs", "64M");
        let staging = env.staging("errs");
        let target = env.target("errs");
        let ext4 = mount_cap("ext4");

        // NodeGetInfo and NodeGetCapabilities.
        let info = env
            .node
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo")
            .into_inner();
        assert_eq!(info.node_id, NODE);
        assert_eq!(info.max_volumes_per_node, 17);
        assert_eq!(
            info.accessible_topology.expect("topology").segments["topology.blockd.io/node"],
            NODE
        );
        let caps = env
            .node
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await
            .expect("NodeGetCapabilities")
            .into_inner();
        use csi::node_service_capability::rpc::Type;
        let got: Vec<i32> = caps
            .capabilities
            .iter()
            .filter_map(|c| {
                c.r#type
                    .map(|csi::node_service_capability::Type::Rpc(r)| r.r#type)
            })
            .collect();
        for t in [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::ExpandVolume,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
        ] {
            assert!(got.contains(&(t as i32)), "{t:?} missing from {got:?}");
        }

        // Missing fields: INVALID_ARGUMENT, naming the field.
        let msg = expect_code(
            env.stage("", &staging, ext4.clone()).await,
            Code::InvalidArgument,
            "stage without id",
        );
        assert!(msg.contains("volume_id"), "{msg}");
        let msg = expect_code(
            env.stage(&id, Path::new(""), ext4.clone()).await,
            Code::InvalidArgument,
            "stage without staging path",
        );
        assert!(msg.contains("staging_target_path"), "{msg}");
        let no_cap = env
            .node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: None,
                ..Default::default()
            })
            .await;
        let msg = expect_code(no_cap, Code::InvalidArgument, "stage without capability");
        assert!(msg.contains("volume_capability"), "{msg}");
        let mut typeless = ext4.clone();
        typeless.access_type = None;
        expect_code(
            env.stage(&id, &staging, typeless).await,
            Code::InvalidArgument,
            "no access type",
        );
        expect_code(
            env.stage(&id, &staging, mount_cap("ntfs")).await,
            Code::InvalidArgument,
            "unsupported fs type",
        );
        expect_code(
            env.stage(
                &id,
                &staging,
                mount_cap_mode("ext4", Mode::MultiNodeMultiWriter),
            )
            .await,
            Code::FailedPrecondition,
            "multi-node access mode",
        );
        expect_code(
            env.unstage("", &staging).await,
            Code::InvalidArgument,
            "unstage without id",
        );
        expect_code(
            env.unstage(&id, Path::new("")).await,
            Code::InvalidArgument,
            "unstage without path",
        );
        expect_code(
            env.publish(&id, &staging, Path::new(""), ext4.clone(), false)
                .await,
            Code::InvalidArgument,
            "publish without target",
        );
        let no_cap = env
            .node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                ..Default::default()
            })
            .await;
        expect_code(no_cap, Code::InvalidArgument, "publish without capability");
        expect_code(
            env.unpublish("", &target).await,
            Code::InvalidArgument,
            "unpublish without id",
        );
        expect_code(
            env.unpublish(&id, Path::new("")).await,
            Code::InvalidArgument,
            "unpublish without target",
        );
        expect_code(
            env.stats("", &target).await,
            Code::InvalidArgument,
            "stats without id",
        );
        expect_code(
            env.stats(&id, Path::new("")).await,
            Code::InvalidArgument,
            "stats without path",
        );
        expect_code(
            env.expand("", &target, 0).await,
            Code::InvalidArgument,
            "expand without id",
        );
        expect_code(
            env.expand(&id, Path::new(""), 0).await,
            Code::InvalidArgument,
            "expand without path",
        );

        // Volumes that do not exist, or live elsewhere: NOT_FOUND.
        let missing = format!("{NODE}/no-such-volume");
        expect_code(
            env.stage(&missing, &staging, ext4.clone()).await,
            Code::NotFound,
            "stage missing",
        );
        expect_code(
            env.publish(&missing, &staging, &target, ext4.clone(), false)
                .await,
            Code::NotFound,
            "publish missing",
        );
        expect_code(
            env.stats(&missing, &staging).await,
            Code::NotFound,
            "stats missing",
        );
        expect_code(
            env.expand(&missing, &staging, 0).await,
            Code::NotFound,
            "expand missing",
        );
        let msg = expect_code(
            env.stage("node-b/errs", &staging, ext4.clone()).await,
            Code::NotFound,
            "stage a volume of another node",
        );
        assert!(msg.contains("node-b") && msg.contains(NODE), "{msg}");
        expect_code(
            env.stage("garbage", &staging, ext4.clone()).await,
            Code::NotFound,
            "malformed id",
        );

        // Publish before stage: FAILED_PRECONDITION; without a staging path too.
        expect_code(
            env.publish(&id, &staging, &target, ext4.clone(), false)
                .await,
            Code::FailedPrecondition,
            "publish before stage",
        );
        expect_code(
            env.publish(&id, Path::new(""), &target, ext4.clone(), false)
                .await,
            Code::FailedPrecondition,
            "publish without staging path",
        );
        // Unstage/unpublish of what is not there: OK.
        env.unpublish(&id, &target)
            .await
            .expect("unpublish of nothing");
        env.unstage(&id, &staging)
            .await
            .expect("unstage of nothing");

        // Staged: an incompatible capability is ALREADY_EXISTS, so is another path.
        env.stage(&id, &staging, ext4.clone()).await.expect("stage");
        env.stage(&id, &staging, ext4.clone())
            .await
            .expect("stage again");
        expect_code(
            env.stage(&id, &staging, mount_cap("xfs")).await,
            Code::AlreadyExists,
            "restage as xfs",
        );
        expect_code(
            env.stage(&id, &staging, block_cap()).await,
            Code::AlreadyExists,
            "restage as block",
        );
        let other_staging = env.staging("errs-2");
        expect_code(
            env.stage(&id, &other_staging, ext4.clone()).await,
            Code::AlreadyExists,
            "stage at a second path",
        );
        // Publish with a different staging path or access type: FAILED_PRECONDITION.
        expect_code(
            env.publish(&id, &other_staging, &target, ext4.clone(), false)
                .await,
            Code::FailedPrecondition,
            "publish from the wrong staging path",
        );
        expect_code(
            env.publish(&id, &staging, &target, block_cap(), false)
                .await,
            Code::FailedPrecondition,
            "publish a file system as block",
        );
        // SINGLE_NODE_WRITER: a second target is FAILED_PRECONDITION.
        env.publish(&id, &staging, &target, ext4.clone(), false)
            .await
            .expect("publish");
        env.publish(&id, &staging, &target, ext4.clone(), false)
            .await
            .expect("publish again");
        let second = env.target("errs-second");
        expect_code(
            env.publish(&id, &staging, &second, ext4.clone(), false)
                .await,
            Code::FailedPrecondition,
            "second target of a single-writer volume",
        );
        // Expand to more than blockd has: OUT_OF_RANGE; an unknown path: NOT_FOUND.
        expect_code(
            env.expand(&id, &target, 1 << 40).await,
            Code::OutOfRange,
            "expand too far",
        );
        expect_code(
            env.expand(&id, &second, 0).await,
            Code::NotFound,
            "expand at an unknown path",
        );

        env.umount(&id, &staging, &target).await;
        env.assert_clean().await;
    });
}

#[test]
fn concurrent_stage_of_one_volume_is_aborted_or_ok() {
    require_root_and_tools!();
    runtime().block_on(async {
        let mut env = Env::start(&[]).await;
        let id = env.volume("race", "256M");
        let staging = env.staging("race");
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let mut node = env.node.clone();
                let req = csi::NodeStageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: staging.display().to_string(),
                    volume_capability: Some(mount_cap("ext4")),
                    ..Default::default()
                };
                tokio::spawn(async move { node.node_stage_volume(req).await.map(|_| ()) })
            })
            .collect();
        let mut ok = 0;
        for call in calls {
            match call.await.expect("join") {
                Ok(()) => ok += 1,
                Err(status) => assert_eq!(status.code(), Code::Aborted, "{status}"),
            }
        }
        assert!(ok >= 1, "one of the concurrent stages succeeds");
        env.stage(&id, &staging, mount_cap("ext4"))
            .await
            .expect("stage after the race");
        assert_eq!(
            env.attached_devices().len(),
            1,
            "exactly one attachment for the volume"
        );
        env.unstage(&id, &staging).await.expect("unstage");
        env.assert_clean().await;
    });
}

/// Writes numbered files into `dir` until told to stop; returns how many it wrote.
fn spawn_writer(
    dir: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Result<u64, String>> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let path = dir.join(format!("w{n}"));
            let mut f = std::fs::File::create(&path).map_err(|e| format!("create {n}: {e}"))?;
            f.write_all(&content(n, 64 * 1024))
                .map_err(|e| format!("write {n}: {e}"))?;
            f.sync_all().map_err(|e| format!("fsync {n}: {e}"))?;
            n += 1;
        }
        Ok(n)
    })
}

fn verify_written(dir: &Path, count: u64) {
    for n in 0..count {
        let data = std::fs::read(dir.join(format!("w{n}"))).unwrap_or_else(|e| panic!("w{n}: {e}"));
        assert_eq!(
            checksum(&data),
            checksum(&content(n, 64 * 1024)),
            "w{n} intact"
        );
    }
}

/// A fio job that writes `dir/fio.dat` with crc32c headers for `seconds`, verifying what it
/// wrote as it goes (`verify_backlog`) and once more at the end; O_DIRECT, an fsync every
/// 8 writes. Its exit status is non-zero on any I/O error or verification failure.
fn spawn_fio(dir: &Path, seconds: u32) -> std::process::Child {
    Command::new("fio")
        .arg("--name=verify")
        .arg(format!("--filename={}", dir.join("fio.dat").display()))
        .args([
            "--size=48M",
            "--bs=64k",
            "--rw=randwrite",
            "--ioengine=psync",
            "--direct=1",
            "--fsync=8",
            "--verify=crc32c",
            "--verify_backlog=16",
            "--verify_fatal=1",
            "--time_based",
        ])
        .arg(format!("--runtime={seconds}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn fio")
}

fn finish_fio(child: std::process::Child) {
    let out = child.wait_with_output().expect("fio");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("err= 0"),
        "fio verify failed ({}):\n{text}",
        out.status
    );
}

/// The kernel log's lines, or `None` where it cannot be read.
fn kernel_log() -> Option<Vec<String>> {
    let out = Command::new("dmesg").output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    })
}

/// Asserts that the kernel logged no error for `device` after line `mark` of its log.
fn assert_no_kernel_errors(mark: Option<usize>, device: &str) {
    let (Some(mark), Some(log)) = (mark, kernel_log()) else {
        if kernel_device() {
            panic!("the kernel log cannot be read in the guest");
        }
        eprintln!("the kernel log cannot be read here; not checked for {device}");
        return;
    };
    let name = device.trim_start_matches("/dev/");
    let errors: Vec<_> = log
        .iter()
        .skip(mark)
        .filter(|l| l.contains(name) && l.to_ascii_lowercase().contains("error"))
        .collect();
    assert!(
        errors.is_empty(),
        "the kernel logged errors for {device}: {errors:#?}"
    );
}

/// Copies blockd volume `name` out over NBD (nbdcopy) and checks its file system with
/// `e2fsck -fn` / `xfs_repair -n`: the volume must be unstaged.
fn assert_fsck_clean(env: &Env, name: &str, fs: &str) {
    let uri = env.daemon.ctl_ok(&["export", name]).trim().to_string();
    let image = env.root.join(format!("{name}.img"));
    let copy = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&image)
        .output()
        .expect("nbdcopy");
    assert!(
        copy.status.success(),
        "nbdcopy: {}",
        String::from_utf8_lossy(&copy.stderr)
    );
    env.daemon.ctl_ok(&["unexport", name]);
    let out = match fs {
        "xfs" => Command::new("xfs_repair")
            .arg("-n")
            .arg("-f")
            .arg(&image)
            .output(),
        _ => Command::new("e2fsck")
            .arg("-f")
            .arg("-n")
            .arg(&image)
            .output(),
    }
    .expect("fsck");
    assert!(
        out.status.success(),
        "fsck of {name} ({fs}) is not clean:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&image).expect("remove the image");
}

#[test]
fn csi_shim_sigkill_and_restart_keep_the_mount_working() {
    require_root_and_tools!();
    runtime().block_on(async {
        let mut env = Env::start(&[]).await;
        let id = env.volume("survivor", "256M");
        let (staging, target) = env.mount(&id, "survivor", mount_cap("ext4")).await;
        let device = mount_of(&staging).expect("mounted").0;
        let mark = kernel_log().map(|l| l.len());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = spawn_writer(target.clone(), stop.clone());
        let fio = spawn_fio(&target, 6);
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let status = env.shim.stop_with(libc::SIGKILL);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        env.shim.restart();
        env.reconnect().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        finish_fio(fio);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = writer
            .join()
            .expect("writer thread")
            .expect("writes never fail");
        assert!(written > 0);
        verify_written(&target, written);
        assert_no_kernel_errors(mark, &device);

        // The restarted service knows the volume: stats, idempotent stage and publish.
        let stats = env.stats(&id, &target).await.expect("stats after restart");
        assert!(!stats.volume_condition.expect("condition").abnormal);
        env.stage(&id, &staging, mount_cap("ext4"))
            .await
            .expect("stage after restart");
        env.publish(&id, &staging, &target, mount_cap("ext4"), false)
            .await
            .expect("publish after restart");
        env.umount(&id, &staging, &target).await;
        assert_fsck_clean(&env, "survivor", "ext4");
        env.assert_clean().await;
    });
}

#[test]
fn attach_nbd_needs_the_kernel_module_and_auto_prefers_it() {
    require_root_and_tools!();
    runtime().block_on(async {
        let module = Path::new("/sys/module/nbd").exists();
        let ublk_here = Path::new("/dev/ublk-control").exists();
        {
            // One connection per device here; the rest of the suite uses the default
            // (one per CPU, up to 4, as blockd advertises multi-conn).
            let mut env = Env::start_exactly(&["--attach", "nbd", "--nbd-connections", "1"]).await;
            let id = env.volume("kernel", "64M");
            let staging = env.staging("kernel");
            if module {
                env.stage(&id, &staging, mount_cap("ext4"))
                    .await
                    .expect("stage via kernel nbd");
                let (source, _) = mount_of(&staging).expect("mounted");
                assert!(source.starts_with("/dev/nbd"), "{source}");
                write_synced(&staging.join("one"), &content(5, MIB as usize));
                env.unstage(&id, &staging).await.expect("unstage");
                env.stage(&id, &staging, mount_cap("ext4"))
                    .await
                    .expect("restage via kernel nbd");
                assert_eq!(
                    checksum(&std::fs::read(staging.join("one")).expect("kept")),
                    checksum(&content(5, MIB as usize))
                );
                env.unstage(&id, &staging).await.expect("unstage");
            } else {
                // Without the module, --attach nbd must refuse with a reason and a way out.
                let msg = expect_code(
                    env.stage(&id, &staging, mount_cap("ext4")).await,
                    Code::FailedPrecondition,
                    "--attach nbd without the module",
                );
                assert!(
                    msg.contains("nbd module") && msg.contains("fuse-loop"),
                    "{msg}"
                );
            }
            env.assert_clean().await;
        }
        // auto: ublk where the kernel has it, else kernel NBD where the module is, else
        // fuse-loop.
        let mut env = Env::start_exactly(&["--attach", "auto"]).await;
        let id = env.volume("auto", "64M");
        let staging = env.staging("auto");
        env.stage(&id, &staging, block_cap())
            .await
            .expect("stage with --attach auto");
        let devices = env.attached_devices();
        assert_eq!(devices.len(), 1, "{devices:?}");
        let want = if ublk_here {
            "/dev/ublkb"
        } else if module {
            "/dev/nbd"
        } else {
            "/dev/loop"
        };
        assert!(
            devices[0].display().to_string().starts_with(want),
            "auto picked {devices:?}, expected {want}*"
        );
        env.unstage(&id, &staging).await.expect("unstage");
        env.assert_clean().await;
    });
}

#[test]
fn blockd_restart_while_mounted_and_written_is_invisible() {
    require_root_and_tools!();
    runtime().block_on(async {
        let mut env = Env::start(&[]).await;
        let id = env.volume("steady", "256M");
        let (staging, target) = env.mount(&id, "steady", mount_cap("ext4")).await;
        if !ublk() {
            // The attachment goes through csi-nbd-proxy, which outlives blockd restarts.
            // (ublk needs none: the kernel holds the device, blockd recovers it.)
            let work = std::fs::read_dir(env.shim.state_dir().join("attach"))
                .expect("attach dir")
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .next()
                .expect("a work directory");
            assert!(
                work.join("proxy.sock").exists(),
                "the FUSE server connects through csi-nbd-proxy: {:?}",
                std::fs::read_dir(&work).map(|d| d.count())
            );
        }

        let device = mount_of(&staging).expect("mounted").0;
        let mark = kernel_log().map(|l| l.len());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = spawn_writer(target.clone(), stop.clone());
        let fio = spawn_fio(&target, 8);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        env.daemon.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        env.daemon.restart();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // A second kill, while fio's verification reads are in flight too.
        env.daemon.kill();
        env.daemon.restart();
        finish_fio(fio);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = writer
            .join()
            .expect("writer thread")
            .unwrap_or_else(|e| panic!("I/O failed across the blockd restart: {e}"));
        assert!(written > 0);
        verify_written(&target, written);
        assert_no_kernel_errors(mark, &device);
        let stats = env.stats(&id, &target).await.expect("stats");
        assert!(
            !stats.volume_condition.expect("condition").abnormal,
            "the volume is healthy after blockd restarted"
        );
        env.umount(&id, &staging, &target).await;
        assert_fsck_clean(&env, "steady", "ext4");
        env.assert_clean().await;
    });
}

#[test]
fn stage_grows_a_file_system_smaller_than_its_volume() {
    require_root_and_tools!();
    runtime().block_on(async {
        let mut env = Env::start(&[]).await;
        // As after a restore or clone into a larger volume, or a ControllerExpandVolume
        // while unstaged: the file system is smaller than the volume at the next stage.
        for (name, fs, small, big) in [
            ("off4", "ext4", "128M", "384M"),
            ("offx", "xfs", "320M", "640M"),
        ] {
            let id = env.volume(name, small);
            let (staging, target) = env.mount(&id, name, mount_cap(fs)).await;
            write_synced(&target.join("kept"), &content(3, MIB as usize));
            let before = df_bytes(&target);
            env.umount(&id, &staging, &target).await;
            env.daemon
                .ctl_ok(&["volume", "resize", name, "--size", big]);
            let (staging, target) = env.mount(&id, name, mount_cap(fs)).await;
            let after = df_bytes(&target);
            assert!(
                after > before + 200 * MIB,
                "{fs}: stage grows the file system to the volume: {before} -> {after}"
            );
            assert_eq!(
                checksum(&std::fs::read(target.join("kept")).expect("data kept")),
                checksum(&content(3, MIB as usize))
            );
            env.umount(&id, &staging, &target).await;
        }
        env.assert_clean().await;
    });
}
