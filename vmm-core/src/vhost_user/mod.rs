//! The vhost-user frontend: how the core drives a device backend process.
//!
//! One [`VhostUserFrontend`] per device wraps `vhost::vhost_user::Frontend` on the Unix
//! socket to the backend and sends the messages of the vhost-user protocol (QEMU
//! docs/interop/vhost-user.rst) in the order a real frontend does (DESIGN.md, "Known
//! pitfalls"). It keeps no vring state of its own: that lives in the transport
//! ([`crate::virtio::DeviceState`]) so it can be replayed to a reconnected backend.

mod deadline;
mod frontend;

pub use deadline::DEFAULT_REPLY_TIMEOUT;

pub use frontend::{
    check_rings, FrontendError, InflightBuffer, VhostUserFrontend, SUPPORTED_PROTOCOL_FEATURES,
};
