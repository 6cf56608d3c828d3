//! The learning L2 switch: ports, the MAC table, and forwarding.
//!
//! [`Switch::forward`] runs in the thread that read the frame — a guest port's transmit
//! worker or a tap's reader — and copies the frame straight into each destination:
//! guest memory to guest memory for two VM ports, never through a tap. The source
//! address is learned; a known unicast destination gets the frame on its port only
//! (frames for the port they came from are filtered); broadcast, multicast and unknown
//! unicast are flooded to every other port. A destination without receive buffers
//! drops the frame and counts it; no sender ever waits for a receiver.
//!
//! Offloads: a frame keeps its virtio-net header (partial checksum, TCP segmentation)
//! when the receiver takes it as it is ([`RxCaps`]); otherwise the switch completes the
//! checksum or segments the frame in software once, and every such receiver gets the
//! result. So every port may be offered every offload, whatever its peers negotiate.

use plexvm_backend_support::guest_warn;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::frame::{Packet, ETH_HLEN};
use crate::mac_table::{Learned, MacAddr, MacTable, PortId};
use crate::offload::resolve_offloads;
use crate::port::{GuestPort, PendingSignals, RxCaps};
use crate::rx::{RxOutcome, RxScratch};
use crate::stats::{PortCounters, PortKindName, PortStats, SwitchStats};
use crate::tap::Tap;

/// Default MAC ageing time (IEEE 802.1D's default).
pub const DEFAULT_AGEING: Duration = Duration::from_secs(300);

/// Most MAC addresses the table holds.
pub const MAC_TABLE_CAPACITY: usize = 4096;

/// What a port leads to.
#[derive(Debug)]
pub enum PortKind {
    /// A VM, over vhost-user.
    Guest(GuestPort),
    /// A host tap device.
    Tap(Tap),
}

/// One switch port.
#[derive(Debug)]
pub struct Port {
    /// Name used in statistics and logs.
    pub name: String,
    /// Where it leads.
    pub kind: PortKind,
    /// Its counters.
    pub counters: PortCounters,
}

impl Port {
    /// A port named `name`.
    pub fn new(name: &str, kind: PortKind) -> Port {
        Port {
            name: name.to_string(),
            kind,
            counters: PortCounters::default(),
        }
    }

    /// The guest port, if this is one.
    pub fn guest(&self) -> Option<&GuestPort> {
        match &self.kind {
            PortKind::Guest(g) => Some(g),
            PortKind::Tap(_) => None,
        }
    }
}

/// Per-thread state of a forwarding thread, reused between frames.
#[derive(Debug, Default)]
pub struct ForwardCtx {
    scratch: RxScratch,
    resolved: Vec<Packet>,
    /// Receive queues to signal at the end of the current burst.
    pub signals: PendingSignals,
}

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// One known port.
    Port(PortId),
    /// Every port but the source.
    Flood,
    /// Nowhere (the destination is on the source port).
    Filtered,
}

/// The switch: its ports and the MAC learning table.
#[derive(Debug)]
pub struct Switch {
    ports: Vec<Port>,
    table: Mutex<MacTable>,
}

impl Switch {
    /// A switch over `ports` with MAC ageing time `ageing`.
    pub fn new(ports: Vec<Port>, ageing: Duration) -> Switch {
        Switch {
            ports,
            table: Mutex::new(MacTable::new(ageing, MAC_TABLE_CAPACITY)),
        }
    }

    /// The ports, by index.
    pub fn ports(&self) -> &[Port] {
        &self.ports
    }

    fn table(&self) -> std::sync::MutexGuard<'_, MacTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Learns the source of `frame` (from port `src`) and decides where it goes.
    pub fn destination(&self, src: PortId, frame: &[u8], now: Instant) -> Destination {
        let (Some(dst_mac), Some(src_mac)) =
            (MacAddr::destination_of(frame), MacAddr::source_of(frame))
        else {
            return Destination::Filtered;
        };
        let mut table = self.table();
        if let Learned::Moved(from) = table.learn(src_mac, src, now) {
            tracing::debug!("{src_mac} moved from port {from} to port {src}");
        }
        if dst_mac.is_multicast() {
            return Destination::Flood;
        }
        match table.lookup(dst_mac, now) {
            Some(port) if port == src => Destination::Filtered,
            Some(port) => Destination::Port(port),
            None => Destination::Flood,
        }
    }

    /// Forgets the addresses learned on `port` (its VM disconnected).
    pub fn port_down(&self, port: PortId) {
        self.table().forget_port(port);
    }

    /// Counts a malformed frame from `src`, logging at powers of two.
    pub fn malformed(&self, src: PortId, what: &dyn std::fmt::Display) {
        if let Some(port) = self.ports.get(src) {
            let count = port.counters.rx_malformed();
            guest_warn!(count = count; port = %port.name, "dropped malformed frame: {what}");
        }
    }

    /// Forwards one valid frame received on `src`. Receive queues that need an
    /// interrupt are collected in `ctx.signals`; flush them after the burst.
    pub fn forward(&self, src: PortId, pkt: &Packet, ctx: &mut ForwardCtx) {
        let frame = pkt.frame();
        let Some(source) = self.ports.get(src) else {
            return;
        };
        source.counters.received(frame.len());
        ctx.resolved.clear();
        let mut resolve_failed = false;
        match self.destination(src, frame, Instant::now()) {
            Destination::Filtered => {}
            Destination::Port(dst) => self.deliver(dst, pkt, ctx, &mut resolve_failed),
            Destination::Flood => {
                for dst in (0..self.ports.len()).filter(|&d| d != src) {
                    self.deliver(dst, pkt, ctx, &mut resolve_failed);
                }
            }
        }
        if resolve_failed {
            self.malformed(src, &"offload request cannot be carried out");
        }
    }

    /// Delivers `pkt` to port `dst` as it is or, for a receiver that does not take its
    /// offloads, as resolved frames (computed once per forwarded frame).
    fn deliver(&self, dst: PortId, pkt: &Packet, ctx: &mut ForwardCtx, failed: &mut bool) {
        let Some(port) = self.ports.get(dst) else {
            return;
        };
        let caps = match &port.kind {
            PortKind::Tap(_) => RxCaps::ALL,
            PortKind::Guest(g) => match g.link() {
                Some(link) => link.caps(),
                None => return, // nobody connected: link down, nothing to count
            },
        };
        if caps.accepts(&pkt.hdr) {
            let hdr = caps.header_for(&pkt.hdr);
            self.deliver_one(port, &hdr, pkt.frame(), ctx);
            return;
        }
        if *failed {
            return;
        }
        if ctx.resolved.is_empty() {
            if let Err(e) = resolve_offloads(pkt, &mut ctx.resolved) {
                tracing::debug!("cannot resolve offloads: {e}");
                *failed = true;
                return;
            }
        }
        let resolved = std::mem::take(&mut ctx.resolved);
        for p in &resolved {
            self.deliver_one(port, &p.hdr, p.frame(), ctx);
        }
        ctx.resolved = resolved;
    }

    fn deliver_one(
        &self,
        port: &Port,
        hdr: &crate::frame::VnetHdr,
        frame: &[u8],
        ctx: &mut ForwardCtx,
    ) {
        match &port.kind {
            PortKind::Tap(tap) => match tap.write_frame(hdr, frame) {
                Ok(()) => port.counters.sent(frame.len()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    port.counters.tx_no_buffer();
                }
                Err(e) => {
                    let count = port.counters.tx_error();
                    guest_warn!(count = count; port = %port.name, "tap write failed: {e}");
                }
            },
            PortKind::Guest(g) => {
                let Some(link) = g.link() else { return };
                let flow = flow_hash(frame);
                let report = link.deliver(hdr, frame, flow, &mut ctx.scratch, &mut ctx.signals);
                for _ in 0..report.bad_buffers {
                    port.counters.tx_error();
                }
                match report.outcome {
                    RxOutcome::Delivered { .. } => port.counters.sent(frame.len()),
                    RxOutcome::NoBuffers | RxOutcome::TooSmall => {
                        port.counters.tx_no_buffer();
                    }
                    RxOutcome::RingError => {
                        let count = port.counters.tx_error();
                        guest_warn!(count = count; port = %port.name, "receive ring not accessible");
                    }
                }
            }
        }
    }

    /// Statistics of every port.
    pub fn stats(&self) -> SwitchStats {
        let ports = self
            .ports
            .iter()
            .enumerate()
            .map(|(index, port)| {
                let (kind, path, mac, connected) = match &port.kind {
                    PortKind::Guest(g) => (
                        PortKindName::VhostUser,
                        g.socket.display().to_string(),
                        Some(g.mac.to_string()),
                        g.link().is_some(),
                    ),
                    PortKind::Tap(t) => (PortKindName::Tap, t.name().to_string(), None, true),
                };
                PortStats {
                    index,
                    name: port.name.clone(),
                    kind,
                    path,
                    mac,
                    connected,
                    counters: port.counters.snapshot(),
                }
            })
            .collect();
        SwitchStats {
            ports,
            mac_table_entries: self.table().len(),
        }
    }
}

/// A hash of the frame's addresses (and, for IPv4/IPv6 TCP or UDP, its ports) that picks
/// the receive queue, so one flow stays on one queue and in order (FNV-1a).
pub fn flow_hash(frame: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    };
    eat(frame.get(..12).unwrap_or(frame));
    let ethertype = frame.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]]));
    let l3 = ETH_HLEN;
    let l4 = match ethertype {
        Some(0x0800) => frame.get(l3..l3 + 20).map(|ip| {
            eat(&ip[12..20]);
            (ip[9], l3 + usize::from(ip[0] & 0xf) * 4)
        }),
        Some(0x86dd) => frame.get(l3..l3 + 40).map(|ip| {
            eat(&ip[8..40]);
            (ip[6], l3 + 40)
        }),
        _ => None,
    };
    if let Some((6 | 17, at)) = l4 {
        eat(frame.get(at..at + 4).unwrap_or(&[]));
    }
    h
}

#[cfg(test)]
#[path = "switch_tests.rs"]
mod tests;
