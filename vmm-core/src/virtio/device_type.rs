//! Device types as data: what the frontend must know about each virtio device type,
//! since everything else (the rings, most features and config) is the backend's.
//!
//! Adding a type is a [`TABLE`] entry plus tests; `kind = "generic"` describes a type
//! the table does not have, from the spec (`device_id`, `queues`, `config`).

use plexvm_protocol::spec::{DeviceConfig, DeviceKind, DeviceParams};

/// How many queues a type's backend serves when it does not offer
/// VHOST_USER_PROTOCOL_F_MQ (with MQ, GET_QUEUE_NUM says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueRule {
    /// Always this many.
    Fixed(usize),
    /// virtio-fs: hiprio plus the spec's `request_queues` (virtio 1.2 spec, 5.11.2).
    FsRequestQueues,
    /// generic: the spec's `queues`.
    FromSpec,
}

/// One row of [`TABLE`].
#[derive(Debug, Clone, Copy)]
struct TypeEntry {
    kind: DeviceKind,
    /// Virtio device ID (virtio 1.2 spec, section 5); 0 for generic (from the spec).
    device_id: u32,
    queues: QueueRule,
    /// Queues after the backend's that belong to the frontend: the guest sees them, the
    /// backend never does.
    frontend_queues: usize,
    /// Feature bits taken off what the backend offers, because the queue rule above
    /// does not count the queues they add (or the frontend does not do their part).
    masked_features: u64,
}

/// virtio-fs VIRTIO_FS_F_NOTIFICATION (5.11.3): adds a notification queue the queue
/// rule does not count; Linux does not use it and virtiofsd does not offer it.
const FS_F_NOTIFICATION: u64 = 1 << 0;

/// The device types the core knows. The queues are the ones the vhost-user backend
/// itself handles, as QEMU's vhost-user-* devices count them: net rx/tx, console port 0
/// rx/tx, vsock rx/tx (its event queue, 5.10.2, is the frontend's: it only carries
/// transport-reset events, which a frontend that does not migrate never sends), fs
/// hiprio plus request queues.
const TABLE: &[TypeEntry] = &[
    entry(DeviceKind::Net, 1, QueueRule::Fixed(2), 0, 0),
    entry(DeviceKind::Blk, 2, QueueRule::Fixed(1), 0, 0),
    entry(DeviceKind::Console, 3, QueueRule::Fixed(2), 0, 0),
    entry(DeviceKind::Rng, 4, QueueRule::Fixed(1), 0, 0),
    entry(DeviceKind::Vsock, 19, QueueRule::Fixed(2), 1, 0),
    entry(
        DeviceKind::Fs,
        26,
        QueueRule::FsRequestQueues,
        0,
        FS_F_NOTIFICATION,
    ),
    entry(DeviceKind::Generic, 0, QueueRule::FromSpec, 0, 0),
];

const fn entry(
    kind: DeviceKind,
    device_id: u32,
    queues: QueueRule,
    frontend_queues: usize,
    masked_features: u64,
) -> TypeEntry {
    TypeEntry {
        kind,
        device_id,
        queues,
        frontend_queues,
        masked_features,
    }
}

/// What the frontend provides for one device, from its type and its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceType {
    /// The virtio device ID the transport reports.
    pub device_id: u32,
    /// Queues the backend serves when it does not offer MQ.
    pub backend_queues: usize,
    /// Queues after the backend's that the frontend serves itself (vsock's event
    /// queue).
    pub frontend_queues: usize,
    /// Feature bits masked off what the backend offers.
    pub masked_features: u64,
    /// The config space the frontend serves itself (virtiofsd answers no GET_CONFIG);
    /// `None`: asked of the backend.
    pub config: Option<Vec<u8>>,
}

impl DeviceType {
    /// The type of `device`.
    pub fn of(device: &DeviceConfig) -> DeviceType {
        DeviceType::new(device.kind, &device.params)
    }

    /// The type of a device of `kind` with (validated) `params`.
    pub fn new(kind: DeviceKind, params: &DeviceParams) -> DeviceType {
        let row = TABLE
            .iter()
            .find(|e| e.kind == kind)
            .copied()
            .unwrap_or(TABLE[0]);
        let (device_id, backend_queues) = match (row.queues, params) {
            (QueueRule::FsRequestQueues, DeviceParams::Fs { request_queues, .. }) => {
                (row.device_id, 1 + usize::from(*request_queues))
            }
            (
                QueueRule::FromSpec,
                DeviceParams::Generic {
                    device_id, queues, ..
                },
            ) => (*device_id, usize::from(*queues)),
            (QueueRule::Fixed(n), _) => (row.device_id, n),
            // Without its spec: hiprio and the one request queue `request_queues`
            // defaults to.
            (QueueRule::FsRequestQueues, _) => (row.device_id, 2),
            // Params that do not match the kind cannot pass the spec's validation;
            // the smallest device is the safe reading.
            _ => (row.device_id, 1),
        };
        DeviceType {
            device_id,
            backend_queues,
            frontend_queues: row.frontend_queues,
            masked_features: row.masked_features,
            config: frontend_config(params),
        }
    }
}

/// The config space the frontend serves for `params`, little-endian as virtio 1.x
/// specifies.
fn frontend_config(params: &DeviceParams) -> Option<Vec<u8>> {
    match params {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; } (5.11.4);
        // a tag shorter than 36 bytes is NUL-padded.
        DeviceParams::Fs {
            tag,
            request_queues,
        } => {
            let mut config = vec![0u8; plexvm_protocol::device::FS_TAG_LEN + 4];
            config[..tag.len()].copy_from_slice(tag.as_bytes());
            config[36..].copy_from_slice(&u32::from(*request_queues).to_le_bytes());
            Some(config)
        }
        // struct virtio_vsock_config { le64 guest_cid; } (5.10.4).
        DeviceParams::Vsock { guest_cid } => Some(guest_cid.to_le_bytes().to_vec()),
        DeviceParams::Generic { config, .. } => config.clone(),
        DeviceParams::None => None,
    }
}

/// The number of queues a backend of `kind` serves when it does not offer
/// VHOST_USER_PROTOCOL_F_MQ, for a device without per-device parameters (use
/// [`DeviceType::of`] where the device's spec is at hand: fs and generic depend on it).
pub fn default_queue_count(kind: DeviceKind) -> usize {
    DeviceType::new(kind, &DeviceParams::None).backend_queues
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_row_and_known_kinds_their_virtio_id() {
        for kind in [
            DeviceKind::Net,
            DeviceKind::Blk,
            DeviceKind::Console,
            DeviceKind::Rng,
            DeviceKind::Vsock,
            DeviceKind::Fs,
            DeviceKind::Generic,
        ] {
            assert_eq!(TABLE.iter().filter(|e| e.kind == kind).count(), 1, "{kind}");
            if let Some(id) = kind.virtio_id() {
                assert_eq!(DeviceType::new(kind, &DeviceParams::None).device_id, id);
            }
        }
    }

    #[test]
    fn fs_config_is_the_padded_tag_and_the_request_queue_count() {
        let params = DeviceParams::Fs {
            tag: "share".into(),
            request_queues: 2,
        };
        let t = DeviceType::new(DeviceKind::Fs, &params);
        assert_eq!((t.device_id, t.backend_queues), (26, 3));
        assert_eq!(t.masked_features, FS_F_NOTIFICATION);
        let config = t.config.unwrap();
        assert_eq!(config.len(), 40);
        assert_eq!(&config[..5], b"share");
        assert!(config[5..36].iter().all(|&b| b == 0));
        assert_eq!(config[36..], 2u32.to_le_bytes());
    }

    #[test]
    fn vsock_serves_its_event_queue_and_its_cid() {
        let t = DeviceType::new(DeviceKind::Vsock, &DeviceParams::Vsock { guest_cid: 42 });
        assert_eq!(
            (t.device_id, t.backend_queues, t.frontend_queues),
            (19, 2, 1)
        );
        assert_eq!(t.config, Some(42u64.to_le_bytes().to_vec()));
    }

    #[test]
    fn generic_takes_everything_from_the_spec() {
        let params = DeviceParams::Generic {
            device_id: 8,
            queues: 3,
            config: Some(vec![7; 12]),
        };
        let t = DeviceType::new(DeviceKind::Generic, &params);
        assert_eq!(
            (t.device_id, t.backend_queues, t.frontend_queues),
            (8, 3, 0)
        );
        assert_eq!(t.config, Some(vec![7; 12]));
        let asked = DeviceParams::Generic {
            device_id: 8,
            queues: 1,
            config: None,
        };
        assert_eq!(DeviceType::new(DeviceKind::Generic, &asked).config, None);
    }

    #[test]
    fn defaults_match_what_backends_serve_without_mq() {
        assert_eq!(default_queue_count(DeviceKind::Blk), 1);
        assert_eq!(default_queue_count(DeviceKind::Rng), 1);
        assert_eq!(default_queue_count(DeviceKind::Net), 2);
        assert_eq!(default_queue_count(DeviceKind::Console), 2);
        assert_eq!(default_queue_count(DeviceKind::Vsock), 2);
        assert_eq!(default_queue_count(DeviceKind::Fs), 2);
        assert_eq!(
            DeviceType::new(DeviceKind::Rng, &DeviceParams::None).config,
            None
        );
    }
}
