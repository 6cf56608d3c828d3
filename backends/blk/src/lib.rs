//! plexvm-blk: a vhost-user-blk backend serving a raw image file.
//!
//! One process serves one image on one Unix socket. It keeps the listening socket for its
//! whole life and creates a fresh vhost-user daemon for every accepted connection, so a
//! frontend (the plexvm core, QEMU, ...) can disconnect and reconnect at will; between
//! connections the image is flushed. SIGTERM and SIGINT flush and end the process.
//!
//! Layout:
//! - [`config`]: flags and their validation;
//! - [`disk`]: the image file and its I/O primitives;
//! - [`request`]: virtio-blk request parsing and execution (no sockets, unit-tested);
//! - [`vhu_blk`]: the `VhostUserBackend` implementation (features, config space, queues);
//! - [`io_pool`]: threads that let long requests of one queue overlap (`--io-threads`);
//! - [`poll`]: the adaptive busy-poll window of the queue workers (`--poll-us`);
//! - [`inflight`]: the in-flight region (INFLIGHT_SHMFD) that lets a restarted backend
//!   resubmit the requests its predecessor died with; [`chain`] reads their chains;
//! - [`server`]: the device on the kit's serving loop (`plexvm-backend-support`), whose
//!   interposer answers GET/SET_INFLIGHT_FD in front of vhost-user-backend.

pub mod chain;
pub mod config;
pub mod disk;
pub mod inflight;
pub mod io_pool;
pub mod poll;
pub mod request;
pub mod server;
pub mod vhu_blk;

pub use config::{Args, BlockConfig};
pub use server::{run, ServerError};
