//! plexvm-net: a vhost-user-net backend with a built-in learning L2 switch.
//!
//! One process is one switch. Each `--socket` is a port one VM connects to over
//! vhost-user; each `--tap` attaches a host tap device as a further port. Frames between
//! two VM ports are copied from one guest's transmit buffers straight into the other's
//! receive buffers, without a tap or the host stack in between.
//!
//! Layout:
//! - [`config`]: flags and their validation;
//! - [`frame`]: the virtio-net header and frames inside the switch;
//! - [`mac_table`]: MAC addresses and the learning table with ageing;
//! - [`offload`]: software checksum completion and TCP segmentation;
//! - [`rx`] / [`tx`]: writing frames into receive queues, reading transmit chains;
//! - [`port`]: guest ports and their per-connection state;
//! - [`switch`]: forwarding between ports;
//! - [`tap`]: tap devices;
//! - [`stats`]: per-port counters and their printed forms;
//! - [`vhu_net`]: the `VhostUserBackend` of one guest connection;
//! - [`server`]: listeners, tap readers, signals and shutdown, on the kit's serving
//!   loop (`plexvm-backend-support`), whose interposer makes QEMU and the `vhost`
//!   crate agree.

pub mod config;
pub mod frame;
pub mod mac_table;
pub mod offload;
pub mod port;
pub mod rx;
pub mod server;
pub mod stats;
pub mod switch;
pub mod tap;
pub mod tx;
pub mod vhu_net;

pub use config::{Args, NetConfig};
pub use server::{run, ServerError};
