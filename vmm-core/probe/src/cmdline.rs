//! Parsing the kernel command line the core hands the probe (docs/platform.md).
//!
//! Keys the probe owns start with `probe.`; an unknown `probe.*` key is an error so
//! a typo never silently runs the wrong workload. `virtio_mmio.device=` entries use
//! the Linux format `<size>@<base>:<irq>[:<id>]`. Everything else (`console=` and
//! friends meant for Linux guests) is ignored.

use thiserror::Error;

/// Most virtio-mmio devices the probe keeps track of.
pub const MAX_DEVICES: usize = 16;

/// Bad command line: the probe prints it and exits with status 3.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// A `probe.*` key the probe does not know.
    #[error("unknown key {0:?}")]
    UnknownKey(&'a str),
    /// A `probe.*` token without `=value`.
    #[error("key {0:?} needs a value (key=value)")]
    MissingValue(&'a str),
    /// A value that does not parse for its key.
    #[error("bad value {value:?} for {key}")]
    BadValue {
        /// The key.
        key: &'a str,
        /// The value as given.
        value: &'a str,
    },
    /// `probe.workload=` names no known workload.
    #[error(
        "unknown workload {0:?} (known: blk-verify, blk-abuse, blk-bench, net-echo, rng-read)"
    )]
    UnknownWorkload(&'a str),
    /// `probe.workload=net-echo` without `probe.role=send|echo`.
    #[error("net-echo needs probe.role=send or probe.role=echo")]
    MissingRole,
    /// More than [`MAX_DEVICES`] `virtio_mmio.device=` entries.
    #[error("more than {MAX_DEVICES} virtio_mmio.device entries")]
    TooManyDevices,
}

/// Most config-space bytes `probe.config=` may ask to report.
pub const MAX_CONFIG_BYTES: u8 = 64;

/// What the probe runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Random writes over the whole disk, flush, read back and verify.
    BlkVerify,
    /// Malformed descriptor chains that a block device must reject safely.
    BlkAbuse,
    /// Timed I/O at a fixed queue depth: completions and a latency histogram.
    BlkBench,
    /// Numbered Ethernet frames sent to a peer probe and echoed back.
    NetEcho,
    /// Bytes from an entropy device, summarised.
    RngRead,
}

impl Workload {
    /// The name used on the command line and in result lines.
    pub fn name(self) -> &'static str {
        match self {
            Workload::BlkVerify => "blk-verify",
            Workload::BlkAbuse => "blk-abuse",
            Workload::BlkBench => "blk-bench",
            Workload::NetEcho => "net-echo",
            Workload::RngRead => "rng-read",
        }
    }

    fn from_name(name: &str) -> Option<Workload> {
        [
            Workload::BlkVerify,
            Workload::BlkAbuse,
            Workload::BlkBench,
            Workload::NetEcho,
            Workload::RngRead,
        ]
        .into_iter()
        .find(|w| w.name() == name)
    }
}

/// Most requests blk-bench keeps in flight (`probe.qd=`): 64 three-descriptor chains
/// fit a 256-entry queue.
pub const MAX_QD: u16 = 64;
/// Largest blk-bench request (`probe.bs=`).
pub const MAX_BS: u32 = 128 * 1024;

/// blk-bench access pattern (`probe.rw=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessPattern {
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential reads (wrapping at the end of the disk).
    Read,
    /// Sequential writes.
    Write,
    /// Random, this percentage of them reads, the rest writes.
    Mix(u8),
}

impl AccessPattern {
    fn parse(value: &str) -> Option<AccessPattern> {
        Some(match value {
            "randread" => AccessPattern::RandRead,
            "randwrite" => AccessPattern::RandWrite,
            "read" => AccessPattern::Read,
            "write" => AccessPattern::Write,
            _ => {
                let pct = parse_number(value.strip_prefix("mix:")?)?;
                AccessPattern::Mix(u8::try_from(pct).ok().filter(|&p| p <= 100)?)
            }
        })
    }

    /// Whether offsets are random.
    pub fn random(self) -> bool {
        !matches!(self, AccessPattern::Read | AccessPattern::Write)
    }
}

impl core::fmt::Display for AccessPattern {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AccessPattern::RandRead => f.write_str("randread"),
            AccessPattern::RandWrite => f.write_str("randwrite"),
            AccessPattern::Read => f.write_str("read"),
            AccessPattern::Write => f.write_str("write"),
            AccessPattern::Mix(pct) => write!(f, "mix:{pct}"),
        }
    }
}

/// blk-bench parameters (`probe.qd=`, `probe.bs=`, `probe.rw=`, `probe.warmup=`,
/// `probe.irq=`; the measured time is `probe.seconds=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchParams {
    /// Requests in flight, 1..=[`MAX_QD`].
    pub qd: u16,
    /// Bytes per request: a multiple of 512, 512..=[`MAX_BS`].
    pub bs: u32,
    /// Access pattern.
    pub rw: AccessPattern,
    /// Seconds of unrecorded warm-up before the measured time.
    pub warmup: u64,
    /// Ask the device for used-buffer notifications (the probe polls either way).
    pub irq: bool,
}

impl Default for BenchParams {
    fn default() -> Self {
        BenchParams {
            qd: 1,
            bs: 4096,
            rw: AccessPattern::RandRead,
            warmup: 1,
            irq: false,
        }
    }
}

/// Smallest net-echo frame (`probe.size=`): the Ethernet minimum without FCS.
pub const MIN_FRAME: u16 = 60;
/// Largest net-echo frame: a 1500-byte MTU plus the 14-byte Ethernet header.
pub const MAX_FRAME: u16 = 1514;
/// Most frames net-echo's sender keeps outstanding (`probe.window=`).
pub const MAX_WINDOW: u16 = 64;

/// Which side of a net-echo pair this probe is (`probe.role=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends numbered frames and checks what comes back.
    Send,
    /// Returns every frame to its sender.
    Echo,
}

impl Role {
    /// The name used on the command line and in result lines.
    pub fn name(self) -> &'static str {
        match self {
            Role::Send => "send",
            Role::Echo => "echo",
        }
    }
}

/// net-echo parameters (`probe.role=`, `probe.size=`, `probe.window=`,
/// `probe.timeout=`; the warm-up is `probe.warmup=`, the time `probe.seconds=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetParams {
    /// Sender or echo; required with `probe.workload=net-echo`.
    pub role: Option<Role>,
    /// Ethernet frame bytes (no virtio-net header), [`MIN_FRAME`]..=[`MAX_FRAME`].
    pub size: u16,
    /// Frames outstanding at once, 1..=[`MAX_WINDOW`].
    pub window: u16,
    /// Milliseconds after which an unanswered frame counts as lost, 1..=60000.
    pub timeout_ms: u64,
}

impl Default for NetParams {
    fn default() -> Self {
        NetParams {
            role: None,
            size: 64,
            window: 1,
            timeout_ms: 100,
        }
    }
}

/// One `virtio_mmio.device=<size>@<base>:<irq>` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Size of the window in bytes.
    pub size: u64,
    /// Interrupt line.
    pub irq: u32,
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `probe.workload=`, default blk-verify.
    pub workload: Workload,
    /// `probe.seed=`, default 1.
    pub seed: u64,
    /// `probe.seconds=`, default 0 = one pass (blk-bench: 0 means 5 s).
    pub seconds: u64,
    /// blk-bench parameters (`warmup` also for net-echo).
    pub bench: BenchParams,
    /// net-echo parameters.
    pub net: NetParams,
    /// `probe.config=N`: rng-read also reports the first N bytes of the device's config
    /// space (a multiple of 4, at most [`MAX_CONFIG_BYTES`]; default 0).
    pub config_bytes: u8,
    /// `pci=off` (the core says so when no device is on PCI): do not scan the bus.
    pub pci_off: bool,
    devices: [Option<MmioDevice>; MAX_DEVICES],
    device_count: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workload: Workload::BlkVerify,
            seed: 1,
            seconds: 0,
            bench: BenchParams::default(),
            net: NetParams::default(),
            config_bytes: 0,
            pci_off: false,
            devices: [None; MAX_DEVICES],
            device_count: 0,
        }
    }
}

impl Config {
    /// The virtio-mmio devices, in command-line order.
    pub fn devices(&self) -> impl Iterator<Item = MmioDevice> + '_ {
        self.devices[..self.device_count].iter().flatten().copied()
    }

    fn push_device(&mut self, device: MmioDevice) -> Result<(), CmdlineError<'static>> {
        let slot = self
            .devices
            .get_mut(self.device_count)
            .ok_or(CmdlineError::TooManyDevices)?;
        *slot = Some(device);
        self.device_count += 1;
        Ok(())
    }
}

/// Parses a whole command line.
pub fn parse(cmdline: &str) -> Result<Config, CmdlineError<'_>> {
    let mut config = Config::default();
    for token in cmdline.split_ascii_whitespace() {
        if let Some(rest) = token.strip_prefix("probe.") {
            let (key, value) = rest
                .split_once('=')
                .ok_or(CmdlineError::MissingValue(token))?;
            apply_probe_key(&mut config, key, value)?;
        } else if let Some(value) = token.strip_prefix("virtio_mmio.device=") {
            let device = parse_device(value).ok_or(CmdlineError::BadValue {
                key: "virtio_mmio.device",
                value,
            })?;
            config.push_device(device)?;
        } else if token == "pci=off" {
            config.pci_off = true;
        }
    }
    if config.workload == Workload::NetEcho && config.net.role.is_none() {
        return Err(CmdlineError::MissingRole);
    }
    Ok(config)
}

fn apply_probe_key<'a>(
    config: &mut Config,
    key: &'a str,
    value: &'a str,
) -> Result<(), CmdlineError<'a>> {
    let bad = || CmdlineError::BadValue { key, value };
    match key {
        "workload" => {
            config.workload =
                Workload::from_name(value).ok_or(CmdlineError::UnknownWorkload(value))?
        }
        "seed" => config.seed = parse_number(value).ok_or_else(bad)?,
        "seconds" => config.seconds = parse_number(value).ok_or_else(bad)?,
        "qd" => {
            config.bench.qd = parse_number(value)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| (1..=MAX_QD).contains(n))
                .ok_or_else(bad)?
        }
        "bs" => {
            config.bench.bs = parse_size(value)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| n % 512 == 0 && (512..=MAX_BS).contains(n))
                .ok_or_else(bad)?
        }
        "rw" => config.bench.rw = AccessPattern::parse(value).ok_or_else(bad)?,
        "warmup" => config.bench.warmup = parse_number(value).ok_or_else(bad)?,
        "irq" => {
            config.bench.irq = match value {
                "on" => true,
                "off" => false,
                _ => return Err(bad()),
            }
        }
        "role" => {
            config.net.role = Some(match value {
                "send" => Role::Send,
                "echo" => Role::Echo,
                _ => return Err(bad()),
            })
        }
        "size" => {
            config.net.size = parse_number(value)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| (MIN_FRAME..=MAX_FRAME).contains(n))
                .ok_or_else(bad)?
        }
        "window" => {
            config.net.window = parse_number(value)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| (1..=MAX_WINDOW).contains(n))
                .ok_or_else(bad)?
        }
        "timeout" => {
            config.net.timeout_ms = parse_number(value)
                .filter(|n| (1..=60_000).contains(n))
                .ok_or_else(bad)?
        }
        "config" => {
            config.config_bytes = parse_number(value)
                .and_then(|n| u8::try_from(n).ok())
                .filter(|n| n % 4 == 0 && *n <= MAX_CONFIG_BYTES)
                .ok_or_else(bad)?
        }
        _ => return Err(CmdlineError::UnknownKey(key)),
    }
    Ok(())
}

/// `<size>@<base>:<irq>[:<id>]` as Linux's virtio_mmio driver reads it.
fn parse_device(value: &str) -> Option<MmioDevice> {
    let (size, rest) = value.split_once('@')?;
    let (base, rest) = rest.split_once(':')?;
    let irq = rest.split(':').next()?;
    let size = parse_size(size)?;
    if size == 0 {
        return None;
    }
    Some(MmioDevice {
        base: parse_number(base)?,
        size,
        irq: u32::try_from(parse_number(irq)?).ok()?,
    })
}

/// A number with an optional `K`/`M`/`G` suffix (Linux `memparse`).
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    parse_number(digits)?.checked_mul(1u64 << shift)
}

/// Decimal, or hexadecimal with a `0x` prefix.
pub fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && !hex.starts_with('+') => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if !text.is_empty() && !text.starts_with('+') => text.parse().ok(),
        None => None,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn config_bytes_are_words_up_to_64() {
        assert_eq!(parse("probe.config=8").unwrap().config_bytes, 8);
        assert_eq!(parse("").unwrap().config_bytes, 0);
        for bad in ["probe.config=6", "probe.config=68", "probe.config=x"] {
            assert!(
                matches!(parse(bad), Err(CmdlineError::BadValue { .. })),
                "{bad}"
            );
        }
    }

    use super::*;

    #[test]
    fn defaults_when_nothing_given() {
        let config = parse("console=ttyS0 quiet").unwrap();
        assert_eq!(config.workload, Workload::BlkVerify);
        assert_eq!(config.seed, 1);
        assert_eq!(config.seconds, 0);
        assert_eq!(config.devices().count(), 0);
    }

    #[test]
    fn full_line_as_the_core_builds_it() {
        let line = "probe.workload=blk-abuse probe.seed=0x2a probe.seconds=5 \
                    virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=0x1000@0xd0001000:6:3";
        let config = parse(line).unwrap();
        assert_eq!(config.workload, Workload::BlkAbuse);
        assert_eq!(config.seed, 42);
        assert_eq!(config.seconds, 5);
        let devices: Vec<_> = config.devices().collect();
        assert_eq!(
            devices,
            [
                MmioDevice {
                    base: 0xd000_0000,
                    size: 4096,
                    irq: 5
                },
                MmioDevice {
                    base: 0xd000_1000,
                    size: 4096,
                    irq: 6
                },
            ]
        );
    }

    #[test]
    fn unknown_probe_key_is_an_error() {
        assert_eq!(parse("probe.sede=3"), Err(CmdlineError::UnknownKey("sede")));
        assert_eq!(
            parse("probe.seed"),
            Err(CmdlineError::MissingValue("probe.seed"))
        );
        assert_eq!(
            parse("probe.workload=blk-verfy"),
            Err(CmdlineError::UnknownWorkload("blk-verfy"))
        );
    }

    #[test]
    fn bad_values_are_errors() {
        for line in [
            "probe.seed=",
            "probe.seed=12x",
            "probe.seed=-1",
            "probe.seed=+1",
            "probe.seconds=0x",
            "probe.seed=99999999999999999999",
            "virtio_mmio.device=4K",
            "virtio_mmio.device=4K@0xd0000000",
            "virtio_mmio.device=0@0xd0000000:5",
            "virtio_mmio.device=4K@zz:5",
            "virtio_mmio.device=4K@0xd0000000:99999999999",
            "virtio_mmio.device=99999999999G@0x0:5",
        ] {
            assert!(
                matches!(parse(line), Err(CmdlineError::BadValue { .. })),
                "{line} should be rejected"
            );
        }
    }

    #[test]
    fn too_many_devices() {
        let mut line = String::new();
        for i in 0..=MAX_DEVICES {
            line += &format!(
                " virtio_mmio.device=4K@0x{:x}:{}",
                0xd000_0000 + i * 0x1000,
                5 + i
            );
        }
        assert_eq!(parse(&line), Err(CmdlineError::TooManyDevices));
    }

    #[test]
    fn sizes_and_numbers() {
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("0x200"), Some(512));
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_number("0XfF"), Some(255));
        assert_eq!(parse_number("0x+1"), None);
    }

    #[test]
    fn bench_keys() {
        let config = parse(
            "probe.workload=blk-bench probe.qd=32 probe.bs=128K probe.rw=mix:70 \
             probe.warmup=0 probe.irq=on probe.seconds=2",
        )
        .unwrap();
        assert_eq!(config.workload, Workload::BlkBench);
        assert_eq!(
            config.bench,
            BenchParams {
                qd: 32,
                bs: 128 * 1024,
                rw: AccessPattern::Mix(70),
                warmup: 0,
                irq: true
            }
        );
        assert_eq!(parse("").unwrap().bench, BenchParams::default());
        for (rw, pattern) in [
            ("randread", AccessPattern::RandRead),
            ("randwrite", AccessPattern::RandWrite),
            ("read", AccessPattern::Read),
            ("write", AccessPattern::Write),
            ("mix:0", AccessPattern::Mix(0)),
        ] {
            let config = parse(&format!("probe.rw={rw}")).unwrap();
            assert_eq!(config.bench.rw, pattern);
            assert_eq!(pattern.to_string(), rw);
        }
        for line in [
            "probe.qd=0",
            "probe.qd=65",
            "probe.bs=100",
            "probe.bs=256K",
            "probe.bs=0",
            "probe.rw=random",
            "probe.rw=mix:101",
            "probe.rw=mix:",
            "probe.irq=yes",
            "probe.warmup=x",
        ] {
            assert!(
                matches!(parse(line), Err(CmdlineError::BadValue { .. })),
                "{line} should be rejected"
            );
        }
    }

    #[test]
    fn net_keys() {
        let config = parse(
            "probe.workload=net-echo probe.role=send probe.size=1514 probe.window=32 \
             probe.timeout=500 probe.warmup=2 probe.seconds=3",
        )
        .unwrap();
        assert_eq!(config.workload, Workload::NetEcho);
        assert_eq!(
            config.net,
            NetParams {
                role: Some(Role::Send),
                size: 1514,
                window: 32,
                timeout_ms: 500
            }
        );
        assert_eq!(config.bench.warmup, 2);
        assert_eq!(config.seconds, 3);
        let echo = parse("probe.workload=net-echo probe.role=echo").unwrap();
        assert_eq!(echo.net.role, Some(Role::Echo));
        assert_eq!((echo.net.size, echo.net.window), (64, 1));
        assert_eq!(
            parse("probe.workload=net-echo"),
            Err(CmdlineError::MissingRole)
        );
        for line in [
            "probe.role=sender",
            "probe.role=",
            "probe.size=59",
            "probe.size=1515",
            "probe.size=0x",
            "probe.size=65596",
            "probe.window=0",
            "probe.window=65",
            "probe.timeout=0",
            "probe.timeout=60001",
        ] {
            assert!(
                matches!(parse(line), Err(CmdlineError::BadValue { .. })),
                "{line} should be rejected"
            );
        }
    }

    #[test]
    fn later_keys_win() {
        assert_eq!(parse("probe.seed=3 probe.seed=4").unwrap().seed, 4);
    }
}
