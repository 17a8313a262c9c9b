//! blockctl for group snapshots and QoS policies, against a real daemon: `snapshot
//! create-group | list-groups | show-group | delete-group`, the group column of `snapshot
//! list`, and `volume set-qos --iops-per-gb` following `volume resize`.

use blockd_tests::Daemon;

#[test]
fn group_snapshot_commands() {
    let d = Daemon::start();
    for v in ["db", "wal"] {
        d.ctl_ok(&["volume", "create", v, "--size", "16M"]);
    }
    let out = d.ctl_ok(&["snapshot", "create-group", "nightly", "wal", "db"]);
    assert!(
        out.contains("created group snapshot \"nightly\"") && out.contains("nightly-db"),
        "{out}"
    );
    let again = d.ctl_ok(&["snapshot", "create-group", "nightly", "db", "wal"]);
    assert!(again.contains("already exists"), "{again}");
    let err = d.ctl_err(&["snapshot", "create-group", "nightly", "db"]);
    assert!(err.contains("nightly"), "{err}");
    let err = d.ctl_err(&["snapshot", "create-group", "g2", "db", "missing"]);
    assert!(err.contains("missing"), "{err}");

    let g = d.ctl_json(&["snapshot", "show-group", "nightly"]);
    assert_eq!(g["name"], "nightly");
    let members: Vec<(&str, &str)> = g["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["volume"].as_str().unwrap(), s["name"].as_str().unwrap()))
        .collect();
    assert_eq!(members, [("db", "nightly-db"), ("wal", "nightly-wal")]);
    let groups = d.ctl_json(&["snapshot", "list-groups"]);
    assert_eq!(groups.as_array().unwrap().len(), 1);
    let snaps = d.ctl_json(&["snapshot", "list"]);
    assert!(snaps
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["group"] == "nightly"));
    let table = d.ctl_ok(&["snapshot", "list"]);
    assert!(
        table.contains("GROUP") && table.contains("nightly"),
        "{table}"
    );

    // Members go with their group only.
    let err = d.ctl_err(&["snapshot", "delete", "nightly-db"]);
    assert!(err.contains("delete-group"), "{err}");
    d.ctl_ok(&["snapshot", "delete-group", "nightly"]);
    assert_eq!(d.ctl_json(&["snapshot", "list"]), serde_json::json!([]));
    let err = d.ctl_err(&["snapshot", "show-group", "nightly"]);
    assert!(err.contains("not found"), "{err}");
    let r = d.ctl_ok(&["fsck"]);
    assert!(!r.is_empty());
}

#[test]
fn iops_per_gb_follows_resize() {
    let d = Daemon::start();
    d.ctl_ok(&["volume", "create", "v", "--size", "512M"]);
    let v = d.ctl_json(&[
        "volume",
        "set-qos",
        "v",
        "--iops-per-gb",
        "20",
        "--max-iops",
        "30",
    ]);
    assert_eq!(v["max_iops"], 10, "20 per GiB of 0.5 GiB");
    assert_eq!(v["iops_per_gb"], 20);
    let v = d.ctl_json(&["volume", "resize", "v", "--size", "1G"]);
    assert_eq!(v["max_iops"], 20);
    let v = d.ctl_json(&["volume", "resize", "v", "--size", "1792M"]);
    assert_eq!(v["max_iops"], 30, "capped by --max-iops");
    let shown = d.ctl_ok(&["volume", "show", "v"]);
    assert!(shown.contains("30 IOPS (20/GiB)"), "{shown}");
    // Fixed limits replace the policy.
    let v = d.ctl_json(&["volume", "set-qos", "v", "--max-iops", "7"]);
    assert_eq!(
        (v["max_iops"].as_u64(), v["iops_per_gb"].as_u64()),
        (Some(7), Some(0))
    );
    let v = d.ctl_json(&[
        "volume",
        "create",
        "scaled",
        "--size",
        "256M",
        "--iops-per-gb",
        "8",
    ]);
    assert_eq!(v["max_iops"], 2, "8 per GiB of 0.25 GiB");
}
