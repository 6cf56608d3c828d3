//! Control-API messages (HTTP/1.1 + JSON on the VM's `api_socket`).
//!
//! The OpenAPI description in `vmm-core/api/openapi.yaml` documents these types; a test
//! keeps the two in step.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::{BackendSource, DeviceKind};

/// The lifecycle state of a VM (the vCPU state machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// vCPUs are being created, backends started.
    Starting,
    /// vCPUs run guest code.
    Running,
    /// vCPUs are stopped outside KVM_RUN; devices keep their state.
    Paused,
    /// The guest has ended or was stopped.
    Stopped,
}

/// Body of `PUT /vm/state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateRequest {
    /// The state wanted.
    pub state: RequestedState,
}

/// States a client may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestedState {
    /// Resume vCPUs.
    Running,
    /// Stop vCPUs outside KVM_RUN.
    Paused,
    /// End the VM (the `plexvm` process exits).
    Stopped,
}

/// State of a device's backend connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Connected and serving.
    Up,
    /// Gone; the device's queues stall.
    Down,
    /// Being restarted or reconnected.
    Reconnecting,
    /// The backend process lives but does not serve: the guest's notifications stay
    /// unread and no request completes for `stall_ms`, or it missed a round-trip
    /// deadline. `stalled_ms` says for how long; `on_stall` says what happens next.
    Stalled,
    /// Down for good: the restart policy is `never`, or `restart_max` restarts in a
    /// row failed. The device's queues stall; a swap (`PUT /devices/{id}/backend`)
    /// can still bring it back.
    Failed,
}

/// One device as `GET /vm` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device id from the spec.
    pub id: String,
    /// Virtio device kind.
    pub kind: DeviceKind,
    /// Guest-physical base of its virtio-mmio window.
    pub mmio_base: u64,
    /// Its interrupt line (GSI).
    pub irq: u32,
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Backend process id when the core spawned it.
    pub backend_pid: Option<u32>,
    /// Backend connection state.
    pub state: BackendState,
    /// Whether the guest driver has set DRIVER_OK.
    pub activated: bool,
    /// How many times the backend was restarted or reconnected after it went away
    /// (swaps not counted).
    #[serde(default)]
    pub restarts: u64,
    /// Restart or reconnect attempts that failed.
    #[serde(default)]
    pub failed_restarts: u64,
    /// Why the backend last went down or why the last restart failed: exit code or
    /// signal, and its last stderr lines.
    #[serde(default)]
    pub last_exit: Option<String>,
    /// Milliseconds the device has spent with its backend down, in all.
    #[serde(default)]
    pub down_ms: u64,
    /// Milliseconds the last down period lasted (from noticing the backend gone to the
    /// device serving again), when there was one.
    #[serde(default)]
    pub last_stall_ms: Option<u64>,
    /// While the device is `stalled`: milliseconds since its last progress.
    #[serde(default)]
    pub stalled_ms: Option<u64>,
    /// Whether the current backend tracks in-flight requests
    /// (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), so a crash loses none.
    #[serde(default)]
    pub inflight_tracking: bool,
    /// False after a backend without in-flight tracking was reconnected following a
    /// crash: requests it had taken were replayed from the used index, but whether
    /// any were lost is unknown ("reconnected, in-flight state unknown").
    #[serde(default = "yes")]
    pub inflight_state_known: bool,
}

fn yes() -> bool {
    true
}

/// Body of `PUT /devices/{id}/backend`: the backend to hand the device to, written as
/// in a spec's `[[device]]`: `{"exec": ["plexvm-blk", "--image", "disk.raw"]}` (the core
/// appends `--socket`) or `{"socket": "/run/x.sock"}`. Relative paths resolve against the
/// spec's folder.
pub type BackendSwapRequest = BackendSource;

/// Body of `GET /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// VM name.
    pub name: String,
    /// Lifecycle state.
    pub state: VmState,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The core's process id.
    pub pid: u32,
    /// Devices in guest order.
    pub devices: Vec<DeviceInfo>,
}

/// Body of every error response (4xx/5xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// One sentence saying what was wrong.
    pub error: String,
}
