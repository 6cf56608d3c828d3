//! Device kinds and the per-kind fields of a `[[device]]` table.
//!
//! Most of a virtio device lives in its vhost-user backend; what the frontend must
//! provide is named here: the virtio-fs `tag` and `request_queues` (virtiofsd answers
//! no GET_CONFIG, so the frontend serves the config space, virtio 1.2 spec 5.11.4), the
//! virtio-vsock `guest_cid` (5.10.4; vhost-device-vsock takes it on its own command line
//! too, and the two must agree), and for `kind = "generic"` the device ID, the queue
//! count and optionally the config bytes, for a device type the core has no entry for
//! (as Cloud Hypervisor's `--generic-vhost-user` and QEMU's `vhost-user-device`).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::SpecError;

/// The virtio device kinds a `[[device]]` may name (virtio 1.2 spec, section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// virtio-net, device ID 1.
    Net,
    /// virtio-blk, device ID 2.
    Blk,
    /// virtio-console, device ID 3.
    Console,
    /// virtio-rng, device ID 4.
    Rng,
    /// virtio-vsock, device ID 19.
    Vsock,
    /// virtio-fs, device ID 26.
    Fs,
    /// Any other device: `device_id` and `queues` say what it is.
    Generic,
}

impl DeviceKind {
    /// The virtio device ID (virtio 1.2 spec, section 5); `None` for `generic`, whose
    /// ID is the spec's `device_id`.
    pub fn virtio_id(self) -> Option<u32> {
        match self {
            DeviceKind::Net => Some(1),
            DeviceKind::Blk => Some(2),
            DeviceKind::Console => Some(3),
            DeviceKind::Rng => Some(4),
            DeviceKind::Vsock => Some(19),
            DeviceKind::Fs => Some(26),
            DeviceKind::Generic => None,
        }
    }

    /// The name used in specs and the API.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Net => "net",
            DeviceKind::Blk => "blk",
            DeviceKind::Console => "console",
            DeviceKind::Rng => "rng",
            DeviceKind::Vsock => "vsock",
            DeviceKind::Fs => "fs",
            DeviceKind::Generic => "generic",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes of the virtio-fs `tag` field (virtio 1.2 spec, 5.11.4).
pub const FS_TAG_LEN: usize = 36;
/// The most queues a device may have (the transport's limit).
pub const MAX_DEVICE_QUEUES: u16 = 64;
/// The largest config space a spec may give: the virtio-mmio window from 0x100 to 4 KiB.
pub const MAX_CONFIG_BYTES: usize = 0x1000 - 0x100;
/// Lowest CID a guest may have: 0, 1 and 2 are the hypervisor, loopback and host
/// (virtio 1.2 spec, 5.10.4); `u32::MAX` is VMADDR_CID_ANY.
pub const MIN_GUEST_CID: u64 = 3;

/// The per-kind fields of a `[[device]]` table as written (`DeviceSpec` holds them
/// flat, all optional; which apply depends on `kind`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFields {
    /// fs: the tag the guest mounts (`mount -t virtiofs TAG /mnt`); required.
    pub tag: Option<String>,
    /// fs: request queues besides the high-priority one (default 1).
    pub request_queues: Option<u16>,
    /// vsock: the guest's context ID; required.
    pub guest_cid: Option<u64>,
    /// generic: the virtio device ID; required.
    pub device_id: Option<u32>,
    /// generic: how many queues the backend serves; required.
    pub queues: Option<u16>,
    /// generic: the device config space, served by the core (unset: asked of the
    /// backend with GET_CONFIG).
    pub config: Option<Vec<u8>>,
}

/// What the frontend must know about a device beyond its kind, after validation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceParams {
    /// Nothing: the backend provides features, config and queue count.
    #[default]
    None,
    /// virtio-fs.
    Fs {
        /// The mount tag, 1 to 36 bytes of UTF-8 without NUL.
        tag: String,
        /// Request queues (the device has one more: hiprio).
        request_queues: u16,
    },
    /// virtio-vsock.
    Vsock {
        /// The guest's CID, 3 to 2^32 - 2.
        guest_cid: u64,
    },
    /// A device type the core has no entry for.
    Generic {
        /// The virtio device ID.
        device_id: u32,
        /// The queues the backend serves.
        queues: u16,
        /// The config space, if the core serves it.
        config: Option<Vec<u8>>,
    },
}

/// Checks `fields` for a device of `kind`; `field` turns a field name into the dotted
/// name errors use (`device[0].tag`).
pub fn resolve_params(
    kind: DeviceKind,
    fields: DeviceFields,
    field: &dyn Fn(&str) -> String,
) -> Result<DeviceParams, SpecError> {
    let invalid = |name: &str, message: String| SpecError::Invalid {
        field: field(name),
        message,
    };
    let only = |name: &str, kinds: &str| invalid(name, format!("only applies to kind = {kinds}"));
    let DeviceFields {
        tag,
        request_queues,
        guest_cid,
        device_id,
        queues,
        config,
    } = fields;
    if kind != DeviceKind::Fs {
        if tag.is_some() {
            return Err(only("tag", "\"fs\""));
        }
        if request_queues.is_some() {
            return Err(only("request_queues", "\"fs\""));
        }
    }
    if kind != DeviceKind::Vsock && guest_cid.is_some() {
        return Err(only("guest_cid", "\"vsock\""));
    }
    if kind != DeviceKind::Generic {
        for (name, set) in [
            ("device_id", device_id.is_some()),
            ("queues", queues.is_some()),
            ("config", config.is_some()),
        ] {
            if set {
                return Err(only(name, "\"generic\""));
            }
        }
    }
    match kind {
        DeviceKind::Fs => fs_params(tag, request_queues, &invalid),
        DeviceKind::Vsock => {
            let guest_cid = guest_cid
                .ok_or_else(|| invalid("guest_cid", "is required for kind = \"vsock\"".into()))?;
            if !(MIN_GUEST_CID..u64::from(u32::MAX)).contains(&guest_cid) {
                return Err(invalid(
                    "guest_cid",
                    format!("must be between 3 and 4294967294, got {guest_cid}"),
                ));
            }
            Ok(DeviceParams::Vsock { guest_cid })
        }
        DeviceKind::Generic => generic_params(device_id, queues, config, &invalid),
        _ => Ok(DeviceParams::None),
    }
}

type Invalid<'a> = &'a dyn Fn(&str, String) -> SpecError;

fn fs_params(
    tag: Option<String>,
    request_queues: Option<u16>,
    invalid: Invalid<'_>,
) -> Result<DeviceParams, SpecError> {
    let tag = tag.ok_or_else(|| {
        invalid(
            "tag",
            "is required for kind = \"fs\" (the name the guest mounts)".into(),
        )
    })?;
    if tag.is_empty() || tag.len() > FS_TAG_LEN || tag.contains('\0') {
        return Err(invalid(
            "tag",
            format!("must be 1 to {FS_TAG_LEN} bytes without NUL, got {tag:?}"),
        ));
    }
    let request_queues = request_queues.unwrap_or(1);
    if request_queues == 0 || request_queues >= MAX_DEVICE_QUEUES {
        return Err(invalid(
            "request_queues",
            format!(
                "must be between 1 and {}, got {request_queues}",
                MAX_DEVICE_QUEUES - 1
            ),
        ));
    }
    Ok(DeviceParams::Fs {
        tag,
        request_queues,
    })
}

fn generic_params(
    device_id: Option<u32>,
    queues: Option<u16>,
    config: Option<Vec<u8>>,
    invalid: Invalid<'_>,
) -> Result<DeviceParams, SpecError> {
    let device_id = device_id.ok_or_else(|| {
        invalid(
            "device_id",
            "is required for kind = \"generic\" (the virtio device ID)".into(),
        )
    })?;
    if device_id == 0 {
        return Err(invalid(
            "device_id",
            "must not be 0 (virtio-mmio reads 0 as \"no device\")".into(),
        ));
    }
    let queues =
        queues.ok_or_else(|| invalid("queues", "is required for kind = \"generic\"".into()))?;
    if queues == 0 || queues > MAX_DEVICE_QUEUES {
        return Err(invalid(
            "queues",
            format!("must be between 1 and {MAX_DEVICE_QUEUES}, got {queues}"),
        ));
    }
    if let Some(bytes) = &config {
        if bytes.is_empty() || bytes.len() > MAX_CONFIG_BYTES {
            return Err(invalid(
                "config",
                format!(
                    "must hold 1 to {MAX_CONFIG_BYTES} bytes, got {}",
                    bytes.len()
                ),
            ));
        }
    }
    Ok(DeviceParams::Generic {
        device_id,
        queues,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kind: DeviceKind, fields: DeviceFields) -> Result<DeviceParams, String> {
        resolve_params(kind, fields, &|n| format!("device[0].{n}")).map_err(|e| e.to_string())
    }

    #[test]
    fn fs_needs_a_tag_that_fits_and_defaults_to_one_request_queue() {
        let tag = |t: &str| DeviceFields {
            tag: Some(t.into()),
            ..DeviceFields::default()
        };
        assert_eq!(
            check(DeviceKind::Fs, tag("share")),
            Ok(DeviceParams::Fs {
                tag: "share".into(),
                request_queues: 1
            })
        );
        let missing = check(DeviceKind::Fs, DeviceFields::default()).unwrap_err();
        assert!(
            missing.starts_with("device[0].tag: is required"),
            "{missing}"
        );
        for bad in ["", "a\0b", &"x".repeat(37)] {
            let e = check(DeviceKind::Fs, tag(bad)).unwrap_err();
            assert!(e.starts_with("device[0].tag: must be 1 to 36 bytes"), "{e}");
        }
        assert!(check(DeviceKind::Fs, tag(&"x".repeat(36))).is_ok());
        let queues = |n| DeviceFields {
            request_queues: Some(n),
            ..tag("share")
        };
        assert!(check(DeviceKind::Fs, queues(0)).is_err());
        assert!(check(DeviceKind::Fs, queues(64)).is_err());
        assert!(check(DeviceKind::Fs, queues(63)).is_ok());
    }

    #[test]
    fn vsock_needs_a_guest_cid_in_range() {
        let cid = |c| DeviceFields {
            guest_cid: Some(c),
            ..DeviceFields::default()
        };
        assert_eq!(
            check(DeviceKind::Vsock, cid(3)),
            Ok(DeviceParams::Vsock { guest_cid: 3 })
        );
        for bad in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
            let e = check(DeviceKind::Vsock, cid(bad)).unwrap_err();
            assert!(e.starts_with("device[0].guest_cid: must be between"), "{e}");
        }
        assert!(check(DeviceKind::Vsock, DeviceFields::default())
            .unwrap_err()
            .contains("is required"));
    }

    #[test]
    fn generic_needs_an_id_and_queues_and_bounded_config() {
        let generic = |id, queues, config: Option<Vec<u8>>| DeviceFields {
            device_id: id,
            queues,
            config,
            ..DeviceFields::default()
        };
        assert_eq!(
            check(
                DeviceKind::Generic,
                generic(Some(41), Some(2), Some(vec![1, 2]))
            ),
            Ok(DeviceParams::Generic {
                device_id: 41,
                queues: 2,
                config: Some(vec![1, 2])
            })
        );
        let e = |f| check(DeviceKind::Generic, f).unwrap_err();
        assert!(e(generic(None, Some(1), None)).starts_with("device[0].device_id: is required"));
        assert!(e(generic(Some(0), Some(1), None)).starts_with("device[0].device_id: must not"));
        assert!(e(generic(Some(8), None, None)).starts_with("device[0].queues: is required"));
        assert!(e(generic(Some(8), Some(0), None)).starts_with("device[0].queues: must be"));
        assert!(e(generic(Some(8), Some(65), None)).starts_with("device[0].queues: must be"));
        assert!(e(generic(Some(8), Some(1), Some(vec![]))).starts_with("device[0].config:"));
        let big = Some(vec![0; MAX_CONFIG_BYTES + 1]);
        assert!(e(generic(Some(8), Some(1), big)).starts_with("device[0].config:"));
    }

    #[test]
    fn fields_of_another_kind_are_refused_by_name() {
        let cases = [
            (DeviceKind::Blk, "tag", "\"fs\""),
            (DeviceKind::Rng, "guest_cid", "\"vsock\""),
            (DeviceKind::Fs, "device_id", "\"generic\""),
            (DeviceKind::Net, "queues", "\"generic\""),
            (DeviceKind::Console, "config", "\"generic\""),
            (DeviceKind::Vsock, "request_queues", "\"fs\""),
        ];
        for (kind, name, owner) in cases {
            let mut f = DeviceFields {
                tag: Some("t".into()),
                guest_cid: Some(3),
                ..DeviceFields::default()
            };
            match name {
                "device_id" => f.device_id = Some(1),
                "queues" => f.queues = Some(1),
                "config" => f.config = Some(vec![1]),
                "request_queues" => f.request_queues = Some(1),
                _ => {}
            }
            if kind == DeviceKind::Fs {
                f.guest_cid = None;
            }
            if kind == DeviceKind::Vsock {
                f.tag = None;
            }
            if name != "tag" && kind != DeviceKind::Fs {
                f.tag = None;
            }
            if name != "guest_cid" && kind != DeviceKind::Vsock {
                f.guest_cid = None;
            }
            let e = check(kind, f).unwrap_err();
            assert_eq!(
                e,
                format!("device[0].{name}: only applies to kind = {owner}")
            );
        }
    }

    #[test]
    fn kinds_without_fields_need_none() {
        for kind in [
            DeviceKind::Blk,
            DeviceKind::Net,
            DeviceKind::Rng,
            DeviceKind::Console,
        ] {
            assert_eq!(check(kind, DeviceFields::default()), Ok(DeviceParams::None));
        }
    }
}
