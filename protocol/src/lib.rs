//! Types shared by plexvm's processes: the VM spec (TOML), control-API messages
//! (JSON), and where per-VM sockets live. No I/O beyond (de)serialising and checking
//! that files named in a spec exist.

pub mod api;
pub mod device;
pub mod paths;
pub mod probe;
pub mod spec;

pub use spec::{SpecError, VmSpec};
