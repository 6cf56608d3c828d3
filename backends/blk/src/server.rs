//! The block device served on the kit's loop (`plexvm_backend_support::server`): one
//! daemon per connection behind an interposer that answers GET/SET_INFLIGHT_FD, and
//! after each connection the image is flushed, as qemu-storage-daemon does.

use std::io;
use std::path::Path;
use std::sync::Arc;

use plexvm_backend_support::interposer::InflightMessages;
use plexvm_backend_support::server::{
    handle_signals, serve_connection, BoundSocket, Connection, ServeError,
};

pub use plexvm_backend_support::server::Shutdown;

use crate::config::BlockConfig;
use crate::disk::{Disk, DiskError, DiskOptions};
use crate::request::BlockDevice;
use crate::vhu_blk::{QueueLayout, VhostUserBlk, VhostUserBlkError, WorkerOptions};

/// Errors that end the backend.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The image cannot be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The socket, the serving loop or signal handling failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The per-connection backend cannot be created.
    #[error("cannot create the connection's backend")]
    Backend(#[from] VhostUserBlkError),
    /// The final flush of the image failed.
    #[error("cannot flush the image")]
    Flush(#[source] io::Error),
}

/// A bound socket serving one block device to one frontend at a time.
#[derive(Debug)]
pub struct BlockServer {
    socket: BoundSocket,
    device: Arc<BlockDevice>,
    layout: QueueLayout,
    options: WorkerOptions,
}

impl BlockServer {
    /// Opens the image and binds the socket described by `config`.
    pub fn new(config: &BlockConfig) -> Result<BlockServer, ServerError> {
        let options = DiskOptions {
            readonly: config.readonly,
            direct: config.direct,
        };
        let disk = Disk::open(&config.image, options)?;
        let device = Arc::new(BlockDevice::new(disk, config.serial));
        let layout = QueueLayout {
            queues: config.queues,
            queue_size: config.queue_size,
        };
        let mut server = BlockServer::bind(&config.socket, device, layout)?;
        server.set_worker_options(WorkerOptions {
            poll_max: config.poll_max,
            io_threads: config.io_threads,
            ..WorkerOptions::default()
        });
        Ok(server)
    }

    /// Binds `socket` (removing a stale socket file there first) for `device`.
    pub fn bind(
        socket: &Path,
        device: Arc<BlockDevice>,
        layout: QueueLayout,
    ) -> Result<BlockServer, ServerError> {
        Ok(BlockServer {
            socket: BoundSocket::bind(socket)?,
            device,
            layout,
            options: WorkerOptions::default(),
        })
    }

    /// How queue workers serve their rings (the default of [`BlockServer::bind`]: no
    /// polling, no I/O threads); applies from the next connection.
    pub fn set_worker_options(&mut self, options: WorkerOptions) {
        self.options = options;
    }

    /// The device served.
    pub fn device(&self) -> &Arc<BlockDevice> {
        &self.device
    }

    /// Serves connections one after another until `shutdown` is triggered, then flushes
    /// the image. A connection that ends with a protocol error is logged, not fatal.
    pub fn serve(&mut self, shutdown: &Shutdown) -> Result<(), ServerError> {
        self.socket.serve_each(shutdown, |stream| {
            let backend = Arc::new(VhostUserBlk::new(
                self.device.clone(),
                self.layout,
                self.options,
            )?);
            let connection = Connection {
                name: "plexvm-blk",
                slot: 0,
                hook: InflightMessages(backend.clone()),
                shutdown,
            };
            serve_connection(backend, stream, connection, || {}, || {})?;
            if let Err(e) = self.device.disk().flush() {
                plexvm_backend_support::host_error!("cannot flush the image after disconnect: {e}");
            }
            Ok::<(), ServerError>(())
        })?;
        self.device.disk().flush().map_err(ServerError::Flush)
    }
}

/// Runs the backend described by `config` until SIGTERM or SIGINT.
pub fn run(config: BlockConfig) -> Result<(), ServerError> {
    let shutdown = Shutdown::new().map_err(ServeError::Threads)?;
    handle_signals(shutdown.clone(), &[], |_| {})?;
    let mut server = BlockServer::new(&config)?;
    tracing::info!(
        socket = %config.socket.display(),
        image = %config.image.display(),
        sectors = server.device().disk().capacity_sectors(),
        "serving"
    );
    server.serve(&shutdown)
}
