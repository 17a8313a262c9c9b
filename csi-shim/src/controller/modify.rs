//! Mutable parameters (Kubernetes VolumeAttributesClass): `mutable_parameters` of
//! CreateVolume and ControllerModifyVolume, turned into a blockd QoS policy.
//!
//! | key            | value                                 | changes                                  |
//! |----------------|---------------------------------------|------------------------------------------|
//! | `maxIops`      | a positive integer                    | the IOPS limit, or the cap of `iopsPerGB` |
//! | `iopsPerGB`    | a positive integer                    | IOPS per GiB of size, followed on expansion |
//! | `maxBandwidth` | a Kubernetes quantity (`90Mi`, `1e9`) | the bandwidth limit, bytes per second    |
//!
//! The values parse exactly as the StorageClass parameters of the same names
//! ([`crate::params`]). Invariants:
//! - Only the keys given change (the spec: "SPs MUST NOT modify volumes based on the absence
//!   of keys"): `maxIops` alone on an `iopsPerGB` volume sets its cap, `maxBandwidth` alone
//!   leaves the IOPS policy as it is.
//! - Any unknown key or bad value is `INVALID_ARGUMENT` before blockd is asked anything,
//!   so a refused call changes nothing.
//! - blockd keeps the policy (not only the limits), so `iopsPerGB` follows the volume's
//!   size through ControllerExpandVolume, and the new limits reach open NBD connections at
//!   their next request: the QoS of running I/O changes live.

use std::collections::HashMap;

use blockd_proto::csi::{ControllerModifyVolumeRequest, ControllerModifyVolumeResponse};
use blockd_proto::v1;
use tonic::Status;

use super::{require_field, ControllerService};
use crate::blockd::upstream;
use crate::params::{self, VolumeParams};

/// The keys `mutable_parameters` may carry.
pub const MUTABLE_KEYS: &[&str] = &[params::MAX_IOPS, params::IOPS_PER_GB, params::MAX_BANDWIDTH];

/// Validated mutable parameters: each `Some` replaces that part of a QoS policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MutableParams {
    pub max_iops: Option<u64>,
    pub iops_per_gb: Option<u64>,
    pub max_bandwidth_bytes: Option<u64>,
}

impl MutableParams {
    /// Validates a `mutable_parameters` map (`INVALID_ARGUMENT` naming the key).
    pub fn parse(map: &HashMap<String, String>) -> Result<Self, Status> {
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort();
        if let Some(bad) = keys.iter().find(|k| !MUTABLE_KEYS.contains(&k.as_str())) {
            return Err(Status::invalid_argument(format!(
                "mutable_parameters: unknown key {bad:?}; blockd.csi.io can change {} \
                 (a VolumeAttributesClass may hold only these)",
                MUTABLE_KEYS.join(", ")
            )));
        }
        // Every key is one of the StorageClass QoS keys: parse them the same way.
        let parsed = VolumeParams::parse(map)
            .map_err(|err| Status::invalid_argument(format!("mutable_parameters: {err}")))?;
        Ok(MutableParams {
            max_iops: parsed.max_iops,
            iops_per_gb: parsed.iops_per_gb,
            max_bandwidth_bytes: parsed.max_bandwidth_bytes,
        })
    }

    pub fn is_empty(&self) -> bool {
        *self == MutableParams::default()
    }

    /// StorageClass parameters with these mutable parameters laid over them (the
    /// VolumeAttributesClass wins for every key it names).
    pub fn overlay(&self, params: &mut VolumeParams) {
        if self.max_iops.is_some() {
            params.max_iops = self.max_iops;
        }
        if self.iops_per_gb.is_some() {
            params.iops_per_gb = self.iops_per_gb;
        }
        if self.max_bandwidth_bytes.is_some() {
            params.max_bandwidth_bytes = self.max_bandwidth_bytes;
        }
    }

    /// `policy` with the named parts replaced.
    pub fn apply(&self, policy: &v1::QosPolicy) -> v1::QosPolicy {
        v1::QosPolicy {
            max_iops: self.max_iops.unwrap_or(policy.max_iops),
            iops_per_gb: self.iops_per_gb.unwrap_or(policy.iops_per_gb),
            max_bandwidth_bytes: self
                .max_bandwidth_bytes
                .unwrap_or(policy.max_bandwidth_bytes),
        }
    }
}

/// The blockd policy that validated StorageClass parameters ask for.
pub fn policy_of(params: &VolumeParams) -> v1::QosPolicy {
    v1::QosPolicy {
        max_iops: params.max_iops.unwrap_or(0),
        iops_per_gb: params.iops_per_gb.unwrap_or(0),
        max_bandwidth_bytes: params.max_bandwidth_bytes.unwrap_or(0),
    }
}

impl ControllerService {
    pub(super) async fn modify(
        &self,
        req: ControllerModifyVolumeRequest,
    ) -> Result<ControllerModifyVolumeResponse, Status> {
        require_field(req.volume_id.is_empty(), "volume_id")?;
        if req.mutable_parameters.is_empty() {
            return Err(Status::invalid_argument(format!(
                "mutable_parameters is required: name what to change ({})",
                MUTABLE_KEYS.join(", ")
            )));
        }
        let changes = MutableParams::parse(&req.mutable_parameters)?;
        let vid = self.local_volume("volume", &req.volume_id)?;
        let _guard = self.driver.locks.try_lock(&vid.to_string())?;
        let volume = self.blockd_volume(&vid.volume).await?.ok_or_else(|| {
            Status::not_found(format!("volume {:?} does not exist", req.volume_id))
        })?;
        let current = volume.qos_policy.unwrap_or_else(|| {
            // A blockd without policies: its fixed limits are the policy.
            let qos = volume.qos.unwrap_or_default();
            v1::QosPolicy {
                max_iops: qos.max_iops,
                iops_per_gb: 0,
                max_bandwidth_bytes: qos.max_bandwidth_bytes,
            }
        });
        let wanted = changes.apply(&current);
        if wanted == current {
            tracing::info!(volume = %vid, "QoS policy already as asked");
            return Ok(ControllerModifyVolumeResponse {});
        }
        let updated = self
            .driver
            .blockd
            .volumes()
            .set_volume_qos_policy(v1::SetVolumeQosPolicyRequest {
                name: vid.volume.clone(),
                policy: Some(wanted),
            })
            .await
            .map_err(|status| {
                upstream(
                    &format!("changing the QoS of volume {:?}", vid.volume),
                    status,
                )
            })?
            .into_inner();
        let qos = updated.qos.unwrap_or_default();
        tracing::info!(
            volume = %vid,
            max_iops = qos.max_iops,
            max_bandwidth_bytes = qos.max_bandwidth_bytes,
            iops_per_gb = wanted.iops_per_gb,
            "modified volume QoS"
        );
        Ok(ControllerModifyVolumeResponse {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::string_map as map;

    #[test]
    fn parses_the_qos_keys_like_a_storage_class() {
        let p = MutableParams::parse(&map(&[
            ("maxIops", "500"),
            ("iopsPerGB", "10"),
            ("maxBandwidth", "90Mi"),
        ]))
        .unwrap();
        assert_eq!(
            p,
            MutableParams {
                max_iops: Some(500),
                iops_per_gb: Some(10),
                max_bandwidth_bytes: Some(90 << 20),
            }
        );
    }

    #[test]
    fn refuses_other_keys_and_bad_values() {
        for (pairs, needle) in [
            (vec![("pool", "fast")], "unknown key \"pool\""),
            (vec![("csi.storage.k8s.io/fstype", "xfs")], "unknown key"),
            (vec![("maxIOPS", "5")], "unknown key"),
            (vec![("maxIops", "0")], "maxIops"),
            (vec![("maxIops", "-1")], "maxIops"),
            (vec![("maxBandwidth", "10GB")], "maxBandwidth"),
            (vec![("maxIops", "5"), ("bogus", "1")], "bogus"),
        ] {
            let err = MutableParams::parse(&map(&pairs)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{pairs:?}");
            assert!(
                err.message().contains(needle),
                "{pairs:?}: {}",
                err.message()
            );
            assert!(
                err.message().starts_with("mutable_parameters"),
                "{}",
                err.message()
            );
        }
    }

    #[test]
    fn only_named_keys_change_the_policy() {
        let policy = v1::QosPolicy {
            max_iops: 1000,
            iops_per_gb: 20,
            max_bandwidth_bytes: 1 << 20,
        };
        let cap = MutableParams::parse(&map(&[("maxIops", "300")])).unwrap();
        assert_eq!(
            cap.apply(&policy),
            v1::QosPolicy {
                max_iops: 300,
                ..policy
            }
        );
        let bw = MutableParams::parse(&map(&[("maxBandwidth", "1Gi")])).unwrap();
        assert_eq!(
            bw.apply(&policy),
            v1::QosPolicy {
                max_bandwidth_bytes: 1 << 30,
                ..policy
            }
        );
    }

    #[test]
    fn overlay_lets_the_attributes_class_win() {
        let mut params = VolumeParams::parse(&map(&[
            ("pool", "default"),
            ("iopsPerGB", "20"),
            ("maxBandwidth", "1Mi"),
        ]))
        .unwrap();
        MutableParams::parse(&map(&[("maxIops", "50"), ("maxBandwidth", "2Mi")]))
            .unwrap()
            .overlay(&mut params);
        assert_eq!(
            policy_of(&params),
            v1::QosPolicy {
                max_iops: 50,
                iops_per_gb: 20,
                max_bandwidth_bytes: 2 << 20,
            }
        );
        assert_eq!(params.pool.as_deref(), Some("default"));
    }
}
