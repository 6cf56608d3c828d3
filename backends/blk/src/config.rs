//! Command-line flags and the validated configuration built from them.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::io_pool::MAX_IO_THREADS;

/// Longest serial number a GET_ID request can return (virtio 1.2, 5.2.6: 20 bytes, not
/// NUL-terminated when all 20 are used).
pub const MAX_SERIAL_LEN: usize = 20;

/// Most queues the backend serves: `queues_per_thread` masks are 64 bits wide and the
/// config space field `num_queues` is 16 bits; 64 threads is already far beyond useful.
pub const MAX_QUEUES: u16 = 64;

/// Largest split virtqueue the virtio spec allows (2.7: "Queue Size ... maximum 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Longest busy-poll window `--poll-us` accepts: polling longer than a millisecond only
/// burns a core; a sleeping worker's wake-up costs tens of µs, not milliseconds.
pub const MAX_POLL_US: u32 = 1000;

/// Default `--poll-us` (README.md says how it was chosen).
pub const DEFAULT_POLL_US: u32 = 50;

/// Default `--io-threads`, the most I/O threads a connection starts (README.md says how
/// it was chosen: below 16, QD32 on a disk leaves the device idle; above, every request
/// pays a thread wake-up).
pub const DEFAULT_IO_THREADS: u16 = 16;

/// Errors in the command-line flags.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--queues` out of range.
    #[error("--queues must be between 1 and {MAX_QUEUES}, got {0}")]
    Queues(u16),
    /// `--queue-size` not a power of two or out of range.
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, got {0}")]
    QueueSize(u16),
    /// `--serial` longer than the GET_ID buffer.
    #[error("--serial must be at most {MAX_SERIAL_LEN} bytes, got {0}")]
    SerialTooLong(usize),
    /// `--poll-us` out of range.
    #[error("--poll-us must be at most {MAX_POLL_US}, got {0}")]
    PollUs(u32),
    /// `--io-threads` out of range.
    #[error("--io-threads must be at most {MAX_IO_THREADS}, got {0}")]
    IoThreads(u16),
}

/// Flags of the `plexvm-blk` binary (see README.md for the man page).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "plexvm-blk",
    version,
    about = "vhost-user-blk backend serving a raw image file"
)]
pub struct Args {
    /// Unix socket to listen on; a stale socket file there is removed first.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Raw disk image file (or block device) to serve.
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO.
    #[arg(long)]
    pub readonly: bool,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// Number of virtqueues (one worker thread each).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u16,
    /// Maximum size of each virtqueue (power of two).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    /// Serial number returned by GET_ID (at most 20 bytes).
    #[arg(long, value_name = "ID", default_value = "")]
    pub serial: String,
    /// Longest busy-poll of a queue's ring after draining it, in µs (0: never poll).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_POLL_US)]
    pub poll_us: u32,
    /// Most threads that execute long requests side by side, started as needed (0: every
    /// request in its queue's worker).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_IO_THREADS)]
    pub io_threads: u16,
}

/// Validated configuration of one backend process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Socket path the backend listens on.
    pub socket: PathBuf,
    /// Image path.
    pub image: PathBuf,
    /// Serve the image read-only.
    pub readonly: bool,
    /// Use O_DIRECT on the image.
    pub direct: bool,
    /// Number of virtqueues, 1..=MAX_QUEUES.
    pub queues: u16,
    /// Maximum queue size, a power of two.
    pub queue_size: u16,
    /// GET_ID answer, zero-padded to 20 bytes.
    pub serial: [u8; MAX_SERIAL_LEN],
    /// Longest busy-poll window of a queue worker (zero: never poll).
    pub poll_max: Duration,
    /// Most threads of the I/O pool (zero: no pool).
    pub io_threads: u16,
}

impl TryFrom<Args> for BlockConfig {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        if args.queues == 0 || args.queues > MAX_QUEUES {
            return Err(ConfigError::Queues(args.queues));
        }
        if !args.queue_size.is_power_of_two()
            || args.queue_size < 2
            || args.queue_size > MAX_QUEUE_SIZE
        {
            return Err(ConfigError::QueueSize(args.queue_size));
        }
        let serial_bytes = args.serial.as_bytes();
        if serial_bytes.len() > MAX_SERIAL_LEN {
            return Err(ConfigError::SerialTooLong(serial_bytes.len()));
        }
        if args.poll_us > MAX_POLL_US {
            return Err(ConfigError::PollUs(args.poll_us));
        }
        if args.io_threads > MAX_IO_THREADS {
            return Err(ConfigError::IoThreads(args.io_threads));
        }
        let mut serial = [0u8; MAX_SERIAL_LEN];
        serial[..serial_bytes.len()].copy_from_slice(serial_bytes);
        Ok(BlockConfig {
            socket: args.socket,
            image: args.image,
            readonly: args.readonly,
            direct: args.direct,
            queues: args.queues,
            queue_size: args.queue_size,
            serial,
            poll_max: Duration::from_micros(u64::from(args.poll_us)),
            io_threads: args.io_threads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<BlockConfig, ConfigError> {
        let mut argv = vec!["plexvm-blk", "--socket", "/tmp/s", "--image", "/tmp/i"];
        argv.extend_from_slice(extra);
        BlockConfig::try_from(Args::try_parse_from(argv).expect("flags parse"))
    }

    #[test]
    fn defaults() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.queues, 1);
        assert_eq!(config.queue_size, 256);
        assert!(!config.readonly && !config.direct);
        assert_eq!(config.serial, [0u8; 20]);
        assert_eq!(
            config.poll_max,
            Duration::from_micros(u64::from(DEFAULT_POLL_US))
        );
        assert_eq!(config.io_threads, DEFAULT_IO_THREADS);
    }

    #[test]
    fn all_flags() {
        let config = parse(&[
            "--readonly",
            "--direct",
            "--queues",
            "4",
            "--queue-size",
            "1024",
            "--serial",
            "disk-0",
            "--poll-us",
            "0",
            "--io-threads",
            "0",
        ])
        .unwrap();
        assert!(config.readonly && config.direct);
        assert_eq!((config.queues, config.queue_size), (4, 1024));
        assert_eq!(&config.serial[..6], b"disk-0");
        assert_eq!(config.serial[6..], [0u8; 14]);
        assert_eq!((config.poll_max, config.io_threads), (Duration::ZERO, 0));
        assert_eq!(
            parse(&["--poll-us", "1000"]).unwrap().poll_max,
            Duration::from_millis(1)
        );
    }

    #[test]
    fn rejects_bad_values() {
        assert_eq!(parse(&["--queues", "0"]), Err(ConfigError::Queues(0)));
        assert_eq!(parse(&["--queues", "65"]), Err(ConfigError::Queues(65)));
        assert_eq!(
            parse(&["--queue-size", "100"]),
            Err(ConfigError::QueueSize(100))
        );
        assert_eq!(
            parse(&["--queue-size", "1"]),
            Err(ConfigError::QueueSize(1))
        );
        assert_eq!(
            parse(&["--serial", "123456789012345678901"]),
            Err(ConfigError::SerialTooLong(21))
        );
        assert_eq!(
            parse(&["--poll-us", "1001"]),
            Err(ConfigError::PollUs(1001))
        );
        assert_eq!(
            parse(&["--io-threads", "65"]),
            Err(ConfigError::IoThreads(65))
        );
        assert!(Args::try_parse_from([
            "plexvm-blk",
            "--socket",
            "/s",
            "--image",
            "/i",
            "--poll-us",
            "-1"
        ])
        .is_err());
        let exact = "12345678901234567890";
        assert_eq!(
            &parse(&["--serial", exact]).unwrap().serial,
            exact.as_bytes()
        );
    }

    #[test]
    fn missing_required_flag_is_an_error() {
        assert!(Args::try_parse_from(["plexvm-blk", "--socket", "/tmp/s"]).is_err());
        assert!(Args::try_parse_from(["plexvm-blk", "--image", "/tmp/i"]).is_err());
    }
}
