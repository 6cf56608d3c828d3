//! Address-range dispatch of vCPU exits to devices.
//!
//! A `Bus` maps non-overlapping `[base, base + len)` ranges to devices; a vCPU thread
//! looks up the range an access falls in and calls the device with the offset into it.
//! Accesses that hit no device are counted, not logged one by one (the guest controls
//! how many there are).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Errors adding a device to a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps one already on the bus, or is empty / wraps around.
    #[error("range {base:#x}+{len:#x} overlaps another device or is empty")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// A bus of devices of type `D` (`dyn MmioDevice` or `dyn PioDevice`).
pub struct Bus<D: ?Sized> {
    ranges: BTreeMap<u64, (u64, Arc<Mutex<D>>)>,
    unhandled: AtomicU64,
}

impl<D: ?Sized> std::fmt::Debug for Bus<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field(
                "ranges",
                &self
                    .ranges
                    .iter()
                    .map(|(b, (l, _))| (b, l))
                    .collect::<Vec<_>>(),
            )
            .field("unhandled", &self.unhandled)
            .finish()
    }
}

impl<D: ?Sized> Default for Bus<D> {
    fn default() -> Self {
        Bus {
            ranges: BTreeMap::new(),
            unhandled: AtomicU64::new(0),
        }
    }
}

impl<D: ?Sized> Bus<D> {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<D>>) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        let before = self.ranges.range(..end).next_back();
        if before.is_some_and(|(b, (l, _))| b + l > base) {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` in it.
    pub fn resolve(&self, addr: u64) -> Option<(&Arc<Mutex<D>>, u64)> {
        let (base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < *len).then_some((dev, offset))
    }

    /// Calls `f` with the device at `addr`; counts the access if there is none.
    pub fn with_device<R>(&self, addr: u64, f: impl FnOnce(&mut D, u64) -> R) -> Option<R> {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                // A device that panicked while locked has poisoned its mutex; the
                // state inside is still the device's own, so keep serving it.
                let mut guard = dev.lock().unwrap_or_else(|e| e.into_inner());
                Some(f(&mut guard, offset))
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// How many accesses hit no device.
    pub fn unhandled_accesses(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_and_never_overlap() {
        let mut bus: Bus<u32> = Bus::new();
        bus.insert(0x1000, 0x100, Arc::new(Mutex::new(1))).unwrap();
        bus.insert(0x1100, 0x100, Arc::new(Mutex::new(2))).unwrap();
        assert!(bus.insert(0x10ff, 2, Arc::new(Mutex::new(3))).is_err());
        assert!(bus.insert(0x0fff, 2, Arc::new(Mutex::new(3))).is_err());
        assert!(bus.insert(0x5000, 0, Arc::new(Mutex::new(3))).is_err());
        assert!(bus.insert(u64::MAX, 2, Arc::new(Mutex::new(3))).is_err());
        assert_eq!(bus.with_device(0x1000, |d, o| (*d, o)), Some((1, 0)));
        assert_eq!(bus.with_device(0x11ff, |d, o| (*d, o)), Some((2, 0xff)));
        assert_eq!(bus.with_device(0x1200, |d, o| (*d, o)), None);
        assert_eq!(bus.with_device(0, |d, o| (*d, o)), None);
        assert_eq!(bus.unhandled_accesses(), 2);
    }
}
