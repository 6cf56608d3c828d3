//! MAC addresses and the switch's learning table.
//!
//! The table maps a unicast source address to the port it was last seen on, as an
//! IEEE 802.1D learning bridge does: entries are refreshed by every frame from that
//! address, move when the address shows up on another port, and age out after a quiet
//! period. It is bounded, so a guest sending from random source addresses cannot grow
//! it without limit: when it is full, expired entries are purged and, if it is still
//! full, the new address is not learned (its frames are still forwarded, and replies to
//! it are flooded).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Whether the group bit (I/G, bit 0 of the first octet) is set: broadcast and
    /// multicast addresses.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// Whether this is 00:00:00:00:00:00.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// The destination address of an Ethernet frame (its first 6 bytes).
    pub fn destination_of(frame: &[u8]) -> Option<MacAddr> {
        frame.get(0..6)?.try_into().ok().map(MacAddr)
    }

    /// The source address of an Ethernet frame (bytes 6..12).
    pub fn source_of(frame: &[u8]) -> Option<MacAddr> {
        frame.get(6..12)?.try_into().ok().map(MacAddr)
    }

    /// A locally administered unicast address derived from `seed` (52:54:00 is QEMU's
    /// prefix; ours is 02:70:78, "pxv" with the local bit set).
    pub fn local(seed: u32) -> MacAddr {
        let b = seed.to_be_bytes();
        MacAddr([0x02, 0x70, 0x78, b[1], b[2], b[3]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a MAC address string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (six hex octets separated by ':')")]
pub struct ParseMacError(pub String);

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            if part.is_empty() || part.len() > 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

/// Index of a switch port.
pub type PortId = usize;

#[derive(Debug, Clone, Copy)]
struct Entry {
    port: PortId,
    last_seen: Instant,
}

/// The learning table: unicast MAC → port, with ageing.
#[derive(Debug)]
pub struct MacTable {
    entries: HashMap<MacAddr, Entry>,
    ageing: Duration,
    capacity: usize,
}

/// What [`MacTable::learn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// A new entry.
    New,
    /// The address was known on the same port (timestamp refreshed).
    Refreshed,
    /// The address moved from the given port.
    Moved(PortId),
    /// Not learned: a group or zero address, or the table is full.
    Ignored,
}

impl MacTable {
    /// An empty table whose entries expire `ageing` after they were last refreshed and
    /// which holds at most `capacity` addresses.
    pub fn new(ageing: Duration, capacity: usize) -> MacTable {
        MacTable {
            entries: HashMap::new(),
            ageing,
            capacity,
        }
    }

    /// Records that `mac` was seen as a source address on `port` at `now`.
    pub fn learn(&mut self, mac: MacAddr, port: PortId, now: Instant) -> Learned {
        if mac.is_multicast() || mac.is_zero() {
            return Learned::Ignored;
        }
        if let Some(entry) = self.entries.get_mut(&mac) {
            let old = entry.port;
            *entry = Entry {
                port,
                last_seen: now,
            };
            return if old == port {
                Learned::Refreshed
            } else {
                Learned::Moved(old)
            };
        }
        if self.entries.len() >= self.capacity {
            self.purge_expired(now);
            if self.entries.len() >= self.capacity {
                return Learned::Ignored;
            }
        }
        self.entries.insert(
            mac,
            Entry {
                port,
                last_seen: now,
            },
        );
        Learned::New
    }

    /// The port `mac` was last seen on, unless that entry has aged out.
    pub fn lookup(&self, mac: MacAddr, now: Instant) -> Option<PortId> {
        let entry = self.entries.get(&mac)?;
        (now.saturating_duration_since(entry.last_seen) < self.ageing).then_some(entry.port)
    }

    /// Removes entries not refreshed within the ageing time.
    pub fn purge_expired(&mut self, now: Instant) {
        let ageing = self.ageing;
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.last_seen) < ageing);
    }

    /// Forgets every address learned on `port` (its link went down).
    pub fn forget_port(&mut self, port: PortId) {
        self.entries.retain(|_, e| e.port != port);
    }

    /// Number of entries (expired ones not yet purged included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xa]);
    const B: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xb]);
    const C: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xc]);

    #[test]
    fn parse_and_display_round_trip() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "5254:00:ab:cd:0f:1",
            "zz:54:00:ab:cd:0f",
            "52::00:ab:cd:0f",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn group_and_local_addresses() {
        assert!(MacAddr::BROADCAST.is_multicast());
        assert!(MacAddr([0x01, 0x00, 0x5e, 0, 0, 1]).is_multicast());
        assert!(!A.is_multicast());
        let local = MacAddr::local(7);
        assert!(!local.is_multicast());
        assert_eq!(local.0[0] & 2, 2, "locally administered");
        assert_ne!(MacAddr::local(1), MacAddr::local(2));
    }

    #[test]
    fn learns_refreshes_and_moves() {
        let now = Instant::now();
        let mut t = MacTable::new(Duration::from_secs(300), 16);
        assert_eq!(t.learn(A, 1, now), Learned::New);
        assert_eq!(t.learn(A, 1, now), Learned::Refreshed);
        assert_eq!(t.lookup(A, now), Some(1));
        assert_eq!(t.learn(A, 2, now), Learned::Moved(1));
        assert_eq!(t.lookup(A, now), Some(2));
        assert_eq!(t.lookup(B, now), None);
        assert_eq!(t.learn(MacAddr::BROADCAST, 0, now), Learned::Ignored);
        assert_eq!(t.learn(MacAddr::default(), 0, now), Learned::Ignored);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn entries_age_out_unless_refreshed() {
        let start = Instant::now();
        let ageing = Duration::from_secs(10);
        let mut t = MacTable::new(ageing, 16);
        t.learn(A, 1, start);
        t.learn(B, 2, start);
        let later = start + Duration::from_secs(6);
        t.learn(B, 2, later);
        let expired = start + ageing;
        assert_eq!(t.lookup(A, expired), None, "A aged out");
        assert_eq!(t.lookup(B, expired), Some(2), "B was refreshed");
        t.purge_expired(expired);
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(B, later + ageing), None);
    }

    #[test]
    fn full_table_purges_then_ignores() {
        let start = Instant::now();
        let mut t = MacTable::new(Duration::from_secs(10), 2);
        t.learn(A, 1, start);
        t.learn(B, 1, start);
        assert_eq!(t.learn(C, 1, start), Learned::Ignored);
        assert_eq!(t.lookup(C, start), None);
        // Known addresses still refresh while full.
        assert_eq!(t.learn(A, 3, start), Learned::Moved(1));
        let later = start + Duration::from_secs(11);
        assert_eq!(
            t.learn(C, 2, later),
            Learned::New,
            "expired entries made room"
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn forgetting_a_port() {
        let now = Instant::now();
        let mut t = MacTable::new(Duration::from_secs(10), 8);
        t.learn(A, 1, now);
        t.learn(B, 2, now);
        t.forget_port(1);
        assert_eq!(t.lookup(A, now), None);
        assert_eq!(t.lookup(B, now), Some(2));
    }
}
