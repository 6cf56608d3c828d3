//! Per-port counters, and their two printed forms: one line per port on stderr, and a
//! JSON document (`--stats-file`) for the core's API to report.
//!
//! Counters are kept as the switch sees the port, the convention of Open vSwitch and
//! DPDK's vhost PMD: `rx_*` counts frames the switch received *from* the port (the
//! guest's transmit queue, or read from the tap), `tx_*` frames it sent *to* the port
//! (written into the guest's receive buffers, or to the tap).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Live counters of one port (relaxed atomics: they are statistics, not synchronisation).
#[derive(Debug, Default)]
pub struct PortCounters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped_no_buffer: AtomicU64,
    tx_dropped_error: AtomicU64,
}

/// A point-in-time copy of [`PortCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    /// Frames received from the port and accepted by the switch.
    pub rx_packets: u64,
    /// Their bytes (Ethernet frame, without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames from the port dropped as malformed (bad descriptor chain, bad header,
    /// offload that cannot be carried out).
    pub rx_dropped: u64,
    /// Frames delivered to the port.
    pub tx_packets: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames for the port dropped because it had no (big enough) receive buffer
    /// posted, or the tap's queue was full.
    pub tx_dropped_no_buffer: u64,
    /// Frames for the port dropped for another reason (unusable receive buffers, tap
    /// write error, guest rings not accessible).
    pub tx_dropped_error: u64,
}

impl PortCounters {
    /// A frame of `bytes` bytes came in from the port.
    pub fn received(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A frame from the port was malformed; returns the new count (for rate-limited
    /// logging).
    pub fn rx_malformed(&self) -> u64 {
        self.rx_dropped.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A frame of `bytes` bytes was delivered to the port.
    pub fn sent(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A frame for the port found no buffer; returns the new count.
    pub fn tx_no_buffer(&self) -> u64 {
        self.tx_dropped_no_buffer.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A frame for the port failed otherwise; returns the new count.
    pub fn tx_error(&self) -> u64 {
        self.tx_dropped_error.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The current values.
    pub fn snapshot(&self) -> CounterSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            rx_packets: l(&self.rx_packets),
            rx_bytes: l(&self.rx_bytes),
            rx_dropped: l(&self.rx_dropped),
            tx_packets: l(&self.tx_packets),
            tx_bytes: l(&self.tx_bytes),
            tx_dropped_no_buffer: l(&self.tx_dropped_no_buffer),
            tx_dropped_error: l(&self.tx_dropped_error),
        }
    }
}

/// What kind of port, as printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortKindName {
    /// A vhost-user socket one VM connects to.
    VhostUser,
    /// A host tap device.
    Tap,
}

/// One port's entry in the statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortStats {
    /// Port index (order of `--socket` flags, then `--tap` flags).
    pub index: usize,
    /// Port name (`vm<i>` or the tap's interface name).
    pub name: String,
    /// Port kind.
    pub kind: PortKindName,
    /// Socket path (vhost-user) or interface name (tap).
    pub path: String,
    /// MAC address offered to the guest (vhost-user ports).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Whether a frontend is connected (always true for taps).
    pub connected: bool,
    /// The counters.
    #[serde(flatten)]
    pub counters: CounterSnapshot,
}

/// The whole switch's statistics (the `--stats-file` document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SwitchStats {
    /// Every port, by index.
    pub ports: Vec<PortStats>,
    /// Addresses in the MAC learning table.
    pub mac_table_entries: usize,
}

impl PortStats {
    /// The one-line form printed on SIGUSR1.
    pub fn line(&self) -> String {
        let c = &self.counters;
        format!(
            "port {} {} {:?} {} connected={} rx_packets={} rx_bytes={} rx_dropped={} tx_packets={} tx_bytes={} tx_dropped_no_buffer={} tx_dropped_error={}",
            self.index,
            self.name,
            self.kind,
            self.path,
            self.connected,
            c.rx_packets,
            c.rx_bytes,
            c.rx_dropped,
            c.tx_packets,
            c.tx_bytes,
            c.tx_dropped_no_buffer,
            c.tx_dropped_error
        )
    }
}

impl SwitchStats {
    /// The JSON document.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_snapshot_and_json() {
        let c = PortCounters::default();
        c.received(100);
        c.received(50);
        assert_eq!(c.rx_malformed(), 1);
        c.sent(60);
        assert_eq!(c.tx_no_buffer(), 1);
        assert_eq!(c.tx_no_buffer(), 2);
        assert_eq!(c.tx_error(), 1);
        let snap = c.snapshot();
        assert_eq!(
            snap,
            CounterSnapshot {
                rx_packets: 2,
                rx_bytes: 150,
                rx_dropped: 1,
                tx_packets: 1,
                tx_bytes: 60,
                tx_dropped_no_buffer: 2,
                tx_dropped_error: 1,
            }
        );
        let stats = SwitchStats {
            ports: vec![PortStats {
                index: 0,
                name: "vm0".into(),
                kind: PortKindName::VhostUser,
                path: "/tmp/s".into(),
                mac: Some("02:00:00:00:00:01".into()),
                connected: true,
                counters: snap,
            }],
            mac_table_entries: 3,
        };
        let json: serde_json::Value = serde_json::from_str(&stats.to_json()).unwrap();
        assert_eq!(json["ports"][0]["kind"], "vhost-user");
        assert_eq!(json["ports"][0]["rx_bytes"], 150);
        assert_eq!(json["ports"][0]["tx_dropped_no_buffer"], 2);
        assert_eq!(json["mac_table_entries"], 3);
        let line = stats.ports[0].line();
        assert!(line.starts_with("port 0 vm0 VhostUser /tmp/s connected=true rx_packets=2 "));
    }
}
