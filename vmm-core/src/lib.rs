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
pub mod probe;
pub mod runner;
pub mod supervisor;
pub mod vcpu;
pub mod vhost_user;
pub mod virtio;
pub mod virtio_devices;
pub mod vm;
