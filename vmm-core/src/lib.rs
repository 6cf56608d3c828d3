//! plexvm's core: the KVM VM, its vCPUs and guest memory, a few platform devices, the
//! virtio-mmio transports and vhost-user frontends that connect guest drivers to
//! device backends running as separate processes, backend supervision, and the
//! control API. Device logic lives in the backends, never here.

pub mod acpi;
pub mod api;
pub mod backend;
pub mod boot;
pub mod cpuid;
pub mod demo;
pub mod devices;
pub mod memory;
pub mod pci;
pub mod probe;
pub mod runner;
pub mod runtime_dir;
pub mod stall;
pub mod supervisor;
pub mod vcpu;
pub mod vhost_user;
pub mod virtio;
pub mod virtio_devices;
pub mod vm;

/// An error and its causes on one line, `outer: cause: root cause`; a cause whose text
/// the message already ends with (some library errors print their source) is not
/// repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}
