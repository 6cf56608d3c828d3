//! Control API: HTTP/1.1 + JSON on the VM's Unix socket (the spec's `api_socket`).
//!
//! The server ([`ApiServer`]) runs on its own thread and talks to the VM only through
//! the [`VmController`] trait, so a slow or broken client can never block a vCPU.
//! The messages are the types in [`plexvm_protocol::api`]; the endpoints and schemas are
//! described in `vmm-core/api/openapi.yaml`, which `tests/api_openapi.rs` keeps in step
//! with [`endpoints`] and those types.
//!
//! ```text
//! GET /vm                            -> 200 VmInfo
//! PUT /vm/state {"state"}            -> 200 VmInfo | 400 | 409 ApiError
//! PUT /devices/{id}/backend {"exec"|"socket"}
//!                                    -> 200 DeviceInfo | 400 | 404 | 409 ApiError
//! ```
//!
//! The client side ([`ApiClient`], and `plexvm ctl` through [`CtlArgs`] / [`run_ctl`])
//! speaks the same plain HTTP/1.1 over a `UnixStream`.

pub mod client;
mod http;
mod router;
pub mod server;

use plexvm_protocol::api::{BackendSwapRequest, DeviceInfo, RequestedState, VmInfo};

pub use client::{run_ctl, ApiClient, ClientError, CtlArgs, CtlCommand};
pub use http::HttpError;
pub use router::endpoints;
pub use server::{ApiServer, ApiServerHandle, ServerError};

/// What the API server needs from the VM. The core's VM implements it; the server calls
/// it from the API thread, so implementations must not wait on that thread.
pub trait VmController: Send + Sync {
    /// A snapshot of the VM for `GET /vm`.
    fn info(&self) -> VmInfo;

    /// Moves the VM to `requested` (`PUT /vm/state`) and returns the VM as it is then.
    /// The controller decides which transitions are allowed. For `Stopped` it should
    /// start the stop and return, so that the client gets its answer before the
    /// process exits.
    fn set_state(&self, requested: RequestedState) -> Result<VmInfo, ControlError>;

    /// Hands device `device` to the backend `source` (`PUT /devices/{id}/backend`):
    /// the new backend is started, the old one quiesced and stopped once the new one
    /// serves. Returns the device as it is then. Blocks the API thread for as long as
    /// the swap takes (a backend start, a few vhost-user round trips).
    fn swap_backend(
        &self,
        device: &str,
        source: BackendSwapRequest,
    ) -> Result<DeviceInfo, ControlError> {
        let _ = source;
        Err(ControlError::NotFound(format!("no device {device:?}")))
    }
}

/// Why a [`VmController`] refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The request is valid but not allowed in the VM's current state (HTTP 409),
    /// e.g. resuming a VM that is not paused.
    #[error("{0}")]
    Conflict(String),
    /// The VM failed to carry out the request (HTTP 500).
    #[error("{0}")]
    Internal(String),
    /// What the request names does not exist (HTTP 404), e.g. an unknown device id.
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but unusable (HTTP 400), e.g. a backend program that
    /// cannot be started.
    #[error("{0}")]
    BadRequest(String),
}

/// Reads `bytes` as one request arriving on an API connection, routes it to
/// `controller` and returns the response's status code, or `None` when the bytes end
/// before a whole request (the server then closes without answering). The server's own
/// reader and router, over a socket pair; for the fuzz target (fuzz/) and tests.
#[doc(hidden)]
pub fn answer_raw_request(bytes: &[u8], controller: &dyn VmController) -> Option<u16> {
    use std::io::Write;
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    let (mut client, server) = UnixStream::pair().ok()?;
    // The reader stops at its own size limits; a writer thread keeps a large input
    // from filling the socket buffer before anything reads it.
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = client.write_all(&input);
        let _ = client.shutdown(Shutdown::Write);
        client
    });
    let response = match http::read_request(&server, Instant::now() + Duration::from_secs(1)) {
        Ok(request) => Some(router::route(&request, controller).status()),
        Err(e) => e.status(),
    };
    drop(server);
    let _ = writer.join();
    response
}

#[cfg(test)]
mod raw_tests {
    use super::*;
    use plexvm_protocol::api::VmState;

    struct Idle;

    impl VmController for Idle {
        fn info(&self) -> VmInfo {
            VmInfo {
                name: "vm".into(),
                state: VmState::Running,
                vcpus: 1,
                memory_mib: 64,
                pid: 1,
                devices: Vec::new(),
            }
        }

        fn set_state(&self, _: RequestedState) -> Result<VmInfo, ControlError> {
            Err(ControlError::Conflict("no".into()))
        }
    }

    #[test]
    fn raw_requests_get_the_servers_answers() {
        let get = b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(answer_raw_request(get, &Idle), Some(200));
        let put = b"PUT /vm/state HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\":\"paused\"}\n";
        assert_eq!(answer_raw_request(put, &Idle), Some(409));
        assert_eq!(
            answer_raw_request(b"\x00\xff garbage\r\n\r\n", &Idle),
            Some(400)
        );
        assert_eq!(answer_raw_request(b"GET /vm HTTP/1.1\r\n", &Idle), None);
        let huge = vec![b'a'; 1 << 20];
        assert!(answer_raw_request(&huge, &Idle).is_some_and(|s| s >= 400));
    }
}
