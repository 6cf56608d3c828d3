//! Command-line flags and the validated configuration built from them.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::mac_table::{MacAddr, ParseMacError};
use crate::tap::valid_ifname;

/// Most queue pairs per port: vhost-user-backend's `queues_per_thread` masks are 64 bits
/// wide and each pair takes two bits.
pub const MAX_QUEUE_PAIRS: u16 = 32;

/// Largest split virtqueue the virtio spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Smallest MTU a guest may be given (IPv4's minimum, RFC 791).
pub const MIN_MTU: u16 = 68;

/// Errors in the command-line flags.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// No `--socket` at all.
    #[error("at least one --socket is needed")]
    NoSocket,
    /// More `--mac` than `--socket` flags.
    #[error("{macs} --mac flags for {sockets} --socket flags")]
    TooManyMacs {
        /// `--mac` count.
        macs: usize,
        /// `--socket` count.
        sockets: usize,
    },
    /// A `--mac` that is not a unicast address.
    #[error("--mac {0} is a multicast or zero address")]
    NotUnicast(MacAddr),
    /// A `--mac` that does not parse.
    #[error(transparent)]
    BadMac(#[from] ParseMacError),
    /// The same socket twice.
    #[error("--socket {0} is given twice")]
    DuplicateSocket(PathBuf),
    /// A bad or repeated tap name.
    #[error("--tap {0:?} is not a usable interface name (1 to 15 bytes, no '/', ':' or whitespace, each once)")]
    BadTap(String),
    /// `--queues` out of range.
    #[error("--queues must be between 1 and {MAX_QUEUE_PAIRS}, got {0}")]
    Queues(u16),
    /// `--queue-size` not a power of two or out of range.
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, got {0}")]
    QueueSize(u16),
    /// `--mtu` too small.
    #[error("--mtu must be at least {MIN_MTU}, got {0}")]
    Mtu(u16),
    /// `--mac-ageing` of zero.
    #[error("--mac-ageing must be at least 1 second")]
    Ageing,
}

/// Flags of the `plexvm-net` binary (see README.md for the man page).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "plexvm-net",
    version,
    about = "vhost-user-net backend: a learning L2 switch between VMs, with tap uplinks"
)]
pub struct Args {
    /// Unix socket of one VM port (repeatable: one port per socket).
    #[arg(long = "socket", value_name = "PATH")]
    pub sockets: Vec<PathBuf>,
    /// Host tap device to attach as a further port, created if missing (repeatable).
    #[arg(long = "tap", value_name = "NAME")]
    pub taps: Vec<String>,
    /// MAC address of the n-th socket's device (repeatable, in socket order).
    #[arg(long = "mac", value_name = "MAC")]
    pub macs: Vec<String>,
    /// Queue pairs per VM port (VIRTIO_NET_F_MQ when more than 1).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u16,
    /// Largest virtqueue a frontend may set up (power of two).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub queue_size: u16,
    /// MTU offered to the guests (VIRTIO_NET_F_MTU).
    #[arg(long, value_name = "BYTES")]
    pub mtu: Option<u16>,
    /// Seconds after which an unrefreshed MAC table entry expires.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub mac_ageing: u64,
    /// Write the counters as JSON to this file on SIGUSR1 and at exit.
    #[arg(long, value_name = "PATH")]
    pub stats_file: Option<PathBuf>,
}

/// Validated configuration of one switch process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// VM ports: socket and MAC, in port order.
    pub sockets: Vec<(PathBuf, MacAddr)>,
    /// Tap ports, after the VM ports.
    pub taps: Vec<String>,
    /// Queue pairs per VM port.
    pub queue_pairs: u16,
    /// Largest queue size.
    pub queue_size: u16,
    /// MTU offered, if any.
    pub mtu: Option<u16>,
    /// MAC ageing time.
    pub ageing: Duration,
    /// Statistics file.
    pub stats_file: Option<PathBuf>,
}

/// The default MAC of a port: locally administered, derived from its socket path so a
/// VM keeps its address across restarts of the switch (FNV-1a of the path).
pub fn default_mac(socket: &std::path::Path) -> MacAddr {
    let mut h: u32 = 0x811c_9dc5;
    for b in socket.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    MacAddr::local(h)
}

impl TryFrom<Args> for NetConfig {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        if args.sockets.is_empty() {
            return Err(ConfigError::NoSocket);
        }
        if args.macs.len() > args.sockets.len() {
            return Err(ConfigError::TooManyMacs {
                macs: args.macs.len(),
                sockets: args.sockets.len(),
            });
        }
        let mut sockets = Vec::new();
        for (i, socket) in args.sockets.iter().enumerate() {
            if args.sockets[..i].contains(socket) {
                return Err(ConfigError::DuplicateSocket(socket.clone()));
            }
            let mac = match args.macs.get(i) {
                Some(text) => text.parse::<MacAddr>()?,
                None => default_mac(socket),
            };
            if mac.is_multicast() || mac.is_zero() {
                return Err(ConfigError::NotUnicast(mac));
            }
            sockets.push((socket.clone(), mac));
        }
        for (i, tap) in args.taps.iter().enumerate() {
            if !valid_ifname(tap) || args.taps[..i].contains(tap) {
                return Err(ConfigError::BadTap(tap.clone()));
            }
        }
        if args.queues == 0 || args.queues > MAX_QUEUE_PAIRS {
            return Err(ConfigError::Queues(args.queues));
        }
        let qs = args.queue_size;
        if !qs.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&qs) {
            return Err(ConfigError::QueueSize(qs));
        }
        if let Some(mtu) = args.mtu.filter(|&m| m < MIN_MTU) {
            return Err(ConfigError::Mtu(mtu));
        }
        if args.mac_ageing == 0 {
            return Err(ConfigError::Ageing);
        }
        Ok(NetConfig {
            sockets,
            taps: args.taps,
            queue_pairs: args.queues,
            queue_size: qs,
            mtu: args.mtu,
            ageing: Duration::from_secs(args.mac_ageing),
            stats_file: args.stats_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<NetConfig, ConfigError> {
        let mut full = vec!["plexvm-net"];
        full.extend_from_slice(argv);
        NetConfig::try_from(Args::try_parse_from(full).expect("flags parse"))
    }

    #[test]
    fn defaults_and_derived_macs() {
        let c = parse(&["--socket", "/tmp/a", "--socket", "/tmp/b"]).unwrap();
        assert_eq!(c.sockets.len(), 2);
        assert_ne!(c.sockets[0].1, c.sockets[1].1);
        assert_eq!(c.sockets[0].1, default_mac(std::path::Path::new("/tmp/a")));
        assert!(!c.sockets[0].1.is_multicast());
        assert_eq!((c.queue_pairs, c.queue_size, c.mtu), (1, 1024, None));
        assert_eq!(c.ageing, Duration::from_secs(300));
        assert!(c.taps.is_empty() && c.stats_file.is_none());
    }

    #[test]
    fn all_flags() {
        let c = parse(&[
            "--socket",
            "/s0",
            "--socket",
            "/s1",
            "--mac",
            "52:54:00:00:00:01",
            "--tap",
            "up0",
            "--tap",
            "up1",
            "--queues",
            "4",
            "--queue-size",
            "256",
            "--mtu",
            "9000",
            "--mac-ageing",
            "10",
            "--stats-file",
            "/tmp/stats.json",
        ])
        .unwrap();
        assert_eq!(c.sockets[0].1.to_string(), "52:54:00:00:00:01");
        assert_eq!(c.taps, ["up0", "up1"]);
        assert_eq!((c.queue_pairs, c.queue_size, c.mtu), (4, 256, Some(9000)));
        assert_eq!(c.ageing, Duration::from_secs(10));
        assert_eq!(c.stats_file, Some(PathBuf::from("/tmp/stats.json")));
    }

    #[test]
    fn rejects_bad_values() {
        assert_eq!(parse(&[]), Err(ConfigError::NoSocket));
        assert_eq!(parse(&["--tap", "t0"]), Err(ConfigError::NoSocket));
        let s = ["--socket", "/s"];
        let with = |extra: &[&str]| {
            let mut v = s.to_vec();
            v.extend_from_slice(extra);
            parse(&v)
        };
        assert!(matches!(
            with(&["--mac", "1:2:3",]),
            Err(ConfigError::BadMac(_))
        ));
        assert!(matches!(
            with(&["--mac", "01:00:5e:00:00:01"]),
            Err(ConfigError::NotUnicast(_))
        ));
        assert!(matches!(
            with(&["--mac", "02:00:00:00:00:01", "--mac", "02:00:00:00:00:02"]),
            Err(ConfigError::TooManyMacs {
                macs: 2,
                sockets: 1
            })
        ));
        assert!(matches!(
            with(&["--socket", "/s"]),
            Err(ConfigError::DuplicateSocket(_))
        ));
        assert!(matches!(
            with(&["--tap", "a/b"]),
            Err(ConfigError::BadTap(_))
        ));
        assert!(matches!(
            with(&["--tap", "t", "--tap", "t"]),
            Err(ConfigError::BadTap(_))
        ));
        assert_eq!(with(&["--queues", "0"]), Err(ConfigError::Queues(0)));
        assert_eq!(with(&["--queues", "33"]), Err(ConfigError::Queues(33)));
        assert_eq!(
            with(&["--queue-size", "100"]),
            Err(ConfigError::QueueSize(100))
        );
        assert_eq!(with(&["--mtu", "67"]), Err(ConfigError::Mtu(67)));
        assert_eq!(with(&["--mac-ageing", "0"]), Err(ConfigError::Ageing));
    }
}
