//! Concurrent creates: 50 at once, with distinct names and with one shared name. No
//! duplicates, no lost volumes, exactly one "created" per name.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Child;

use blockd_proto::v1;
use blockd_tests::{ctl_command, runtime, Daemon};
use tonic::Code;

const N: usize = 50;

fn volume_names(d: &Daemon) -> Vec<String> {
    d.ctl_json(&["volume", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// 50 `blockctl volume create` processes at once, each with its own name.
#[test]
fn fifty_concurrent_creates_with_distinct_names() {
    let d = Daemon::start();
    let children: Vec<(String, Child)> = (0..N)
        .map(|i| {
            let name = format!("vol-{i:02}");
            let child = ctl_command(&d.api_socket())
                .args(["volume", "create", &name, "--size", "16M"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn blockctl");
            (name, child)
        })
        .collect();
    for (name, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "create {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("created volume"), "{name}: {stdout}");
    }
    let names = volume_names(&d);
    let expected: Vec<String> = (0..N).map(|i| format!("vol-{i:02}")).collect();
    assert_eq!(names, expected);
    let pool = d.ctl_json(&["pool", "show", "default"]);
    assert_eq!(
        pool["provisioned_bytes"].as_u64().unwrap(),
        N as u64 * (16 << 20)
    );
    assert_eq!(pool["volume_count"], N as u64);
}

/// CreateVolume of `name` (`size` bytes) over a connection of its own to the API at `api`,
/// so that concurrent creates really race in the daemon.
async fn create_on_own_connection(
    api: PathBuf,
    name: &'static str,
    size: u64,
) -> Result<tonic::Response<v1::CreateVolumeResponse>, tonic::Status> {
    let channel = blockd_proto::connect_unix(api).await.unwrap();
    v1::volume_service_client::VolumeServiceClient::new(channel)
        .create_volume(v1::CreateVolumeRequest {
            name: name.into(),
            size_bytes: Some(size),
            ..Default::default()
        })
        .await
}

/// 50 gRPC creates of one name at once: exactly one creates it, the rest get the same
/// volume back; with differing sizes, the losers get ALREADY_EXISTS.
#[test]
fn fifty_concurrent_creates_with_identical_names() {
    let d = Daemon::start();
    let rt = runtime();
    rt.block_on(async {
        // Separate connections, so the requests really race in the daemon.
        let mut tasks = Vec::new();
        for _ in 0..N {
            tasks.push(tokio::spawn(create_on_own_connection(
                d.api_socket(),
                "same",
                32 << 20,
            )));
        }
        let mut created = 0;
        for task in tasks {
            let resp = task
                .await
                .unwrap()
                .expect("identical create succeeds")
                .into_inner();
            let volume = resp.volume.unwrap();
            assert_eq!(volume.name, "same");
            assert_eq!(volume.size_bytes, 32 << 20);
            if resp.created {
                created += 1;
            }
        }
        assert_eq!(created, 1, "exactly one request creates the volume");

        // Same name, different sizes: one wins, every other one either matches the
        // winner's size (idempotent success) or is ALREADY_EXISTS.
        let mut tasks = Vec::new();
        for i in 0..N {
            let size = (1 + (i as u64 % 5)) << 20;
            let create = create_on_own_connection(d.api_socket(), "contested", size);
            tasks.push(tokio::spawn(async move { (size, create.await) }));
        }
        let mut winners = BTreeSet::new();
        let mut created = 0;
        for task in tasks {
            let (size, resp) = task.await.unwrap();
            match resp {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    assert_eq!(resp.volume.unwrap().size_bytes, size);
                    winners.insert(size);
                    created += usize::from(resp.created);
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::AlreadyExists, "{}", status.message());
                    assert!(status.message().contains("\"contested\""));
                }
            }
        }
        assert_eq!(created, 1);
        assert_eq!(
            winners.len(),
            1,
            "only the winner's size succeeds: {winners:?}"
        );
    });
    assert_eq!(volume_names(&d), ["contested", "same"]);
    assert!(d.ctl(&["fsck"]).success());
}
