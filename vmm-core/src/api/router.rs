//! Maps a request to its endpoint. To add an endpoint, write a handler and add one line to
//! [`ENDPOINTS`] (path segments written `{name}` are captured into [`Context::params`]),
//! then describe it in `vmm-core/api/openapi.yaml` (a test checks both lists agree).

use std::panic::{self, AssertUnwindSafe};

use plexvm_protocol::api::{BackendSwapRequest, VmStateRequest};
use plexvm_protocol::spec::BackendSource;

use super::http::{Request, Response};
use super::{ControlError, VmController};

/// What a handler gets.
pub(crate) struct Context<'a> {
    pub(crate) controller: &'a dyn VmController,
    /// Captured `{name}` path segments, in pattern order.
    pub(crate) params: Vec<(&'static str, &'a str)>,
    pub(crate) body: &'a [u8],
}

type Handler = fn(&Context<'_>) -> Response;

struct Endpoint {
    method: &'static str,
    path: &'static str,
    handler: Handler,
}

const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        method: "GET",
        path: "/vm",
        handler: get_vm,
    },
    Endpoint {
        method: "PUT",
        path: "/vm/state",
        handler: put_vm_state,
    },
    Endpoint {
        method: "PUT",
        path: "/devices/{id}/backend",
        handler: put_device_backend,
    },
];

/// Every `(method, path pattern)` the server answers, e.g. `("PUT", "/vm/state")`.
pub fn endpoints() -> impl Iterator<Item = (&'static str, &'static str)> {
    ENDPOINTS.iter().map(|e| (e.method, e.path))
}

/// Answers `request`: the endpoint's handler, or 404 / 405 with an `Allow` header.
pub(crate) fn route(request: &Request, controller: &dyn VmController) -> Response {
    // The query string is not used by any endpoint; ignore it rather than 404.
    let path = request.target.split('?').next().unwrap_or_default();
    let mut allowed = Vec::new();
    for endpoint in ENDPOINTS {
        let Some(params) = match_path(endpoint.path, path) else {
            continue;
        };
        if endpoint.method != request.method {
            allowed.push(endpoint.method);
            continue;
        }
        let context = Context {
            controller,
            params,
            body: &request.body,
        };
        return call(endpoint, &context);
    }
    if allowed.is_empty() {
        Response::error(404, format!("no such endpoint: {path}"))
    } else {
        Response::error(
            405,
            format!("method {} is not allowed on {path}", request.method),
        )
        .with_header("Allow", allowed.join(", "))
    }
}

/// Runs a handler; a panic in the controller becomes a 500 instead of ending the API
/// thread (the VM keeps running and stays controllable).
fn call(endpoint: &Endpoint, context: &Context<'_>) -> Response {
    panic::catch_unwind(AssertUnwindSafe(|| (endpoint.handler)(context))).unwrap_or_else(|_| {
        tracing::error!(path = endpoint.path, "API handler panicked");
        Response::error(500, "internal error while handling the request")
    })
}

/// Matches `path` against `pattern` segment by segment; `{name}` matches one non-empty
/// segment.
fn match_path<'p>(pattern: &'static str, path: &'p str) -> Option<Vec<(&'static str, &'p str)>> {
    let mut params = Vec::new();
    let mut want = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return Some(params),
            (Some(w), Some(g)) => {
                if let Some(name) = w.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                    if g.is_empty() {
                        return None;
                    }
                    params.push((name, g));
                } else if w != g {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

fn control_error(e: ControlError) -> Response {
    match e {
        ControlError::Conflict(m) => Response::error(409, m),
        ControlError::Internal(m) => Response::error(500, m),
        ControlError::NotFound(m) => Response::error(404, m),
        ControlError::BadRequest(m) => Response::error(400, m),
    }
}

fn get_vm(context: &Context<'_>) -> Response {
    Response::json(200, &context.controller.info())
}

fn put_vm_state(context: &Context<'_>) -> Response {
    let request: VmStateRequest = match serde_json::from_slice(context.body) {
        Ok(r) => r,
        Err(e) => return Response::error(400, format!("invalid request body: {e}")),
    };
    match context.controller.set_state(request.state) {
        Ok(info) => Response::json(200, &info),
        Err(e) => control_error(e),
    }
}

fn put_device_backend(context: &Context<'_>) -> Response {
    let Some(&(_, id)) = context.params.iter().find(|(name, _)| *name == "id") else {
        return Response::error(404, "no device id in the path");
    };
    let request: BackendSwapRequest = match serde_json::from_slice(context.body) {
        Ok(r) => r,
        Err(e) => return Response::error(400, format!("invalid request body: {e}")),
    };
    let empty = match &request {
        BackendSource::Exec(argv) => argv.first().is_none_or(|p| p.is_empty()),
        BackendSource::Socket(path) => path.as_os_str().is_empty(),
    };
    if empty {
        return Response::error(
            400,
            "invalid request body: `exec` must name a program, `socket` a path",
        );
    }
    match context.controller.swap_backend(id, request) {
        Ok(info) => Response::json(200, &info),
        Err(e) => control_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexvm_protocol::api::{
        ApiError, BackendState, DeviceInfo, RequestedState, VmInfo, VmState,
    };
    use plexvm_protocol::spec::DeviceKind;

    struct Fixed;

    impl VmController for Fixed {
        fn info(&self) -> VmInfo {
            VmInfo {
                name: "t".into(),
                state: VmState::Running,
                vcpus: 1,
                memory_mib: 64,
                pid: 1,
                devices: Vec::new(),
            }
        }

        fn set_state(&self, requested: RequestedState) -> Result<VmInfo, ControlError> {
            match requested {
                RequestedState::Paused => Ok(self.info()),
                RequestedState::Running => Err(ControlError::Conflict("not paused".into())),
                RequestedState::Stopped => panic!("controller bug"),
            }
        }

        fn swap_backend(
            &self,
            device: &str,
            source: BackendSwapRequest,
        ) -> Result<DeviceInfo, ControlError> {
            if device != "disk0" {
                return Err(ControlError::NotFound(format!("no device {device:?}")));
            }
            let socket = match source {
                BackendSource::Socket(p) => p,
                BackendSource::Exec(_) => return Err(ControlError::BadRequest("no".into())),
            };
            Ok(DeviceInfo {
                id: device.into(),
                kind: DeviceKind::Blk,
                mmio_base: 0,
                irq: 5,
                socket,
                backend_pid: None,
                state: BackendState::Up,
                activated: true,
                restarts: 0,
                failed_restarts: 0,
                last_exit: None,
                down_ms: 0,
                last_stall_ms: None,
                stalled_ms: None,
                inflight_tracking: false,
                inflight_state_known: true,
            })
        }
    }

    fn request(method: &str, target: &str, body: &str) -> Response {
        let req = Request {
            method: method.into(),
            target: target.into(),
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        };
        route(&req, &Fixed)
    }

    fn message(resp: &Response) -> String {
        serde_json::from_slice::<ApiError>(resp.body())
            .unwrap()
            .error
    }

    #[test]
    fn matches_literal_and_parameter_segments() {
        assert_eq!(match_path("/vm", "/vm"), Some(vec![]));
        assert_eq!(match_path("/vm", "/vm/"), None);
        assert_eq!(match_path("/vm", "/vmx"), None);
        assert_eq!(match_path("/vm/state", "/vm"), None);
        assert_eq!(
            match_path("/devices/{id}/backend", "/devices/blk0/backend"),
            Some(vec![("id", "blk0")])
        );
        assert_eq!(
            match_path("/devices/{id}/backend", "/devices//backend"),
            None
        );
    }

    #[test]
    fn routes_by_method_and_path() {
        assert_eq!(request("GET", "/vm", "").status(), 200);
        assert_eq!(request("GET", "/vm?pretty", "").status(), 200);
        assert_eq!(
            request("PUT", "/vm/state", r#"{"state":"paused"}"#).status(),
            200
        );
    }

    #[test]
    fn unknown_path_is_404_and_wrong_method_is_405_with_allow() {
        let resp = request("GET", "/nope", "");
        assert_eq!(resp.status(), 404);
        assert!(message(&resp).contains("/nope"));
        let resp = request("POST", "/vm/state", "");
        assert_eq!(resp.status(), 405);
        assert_eq!(resp.header("allow"), Some("PUT"));
    }

    #[test]
    fn bad_bodies_are_400() {
        for body in [
            "",
            "{",
            r#"{"state":"flying"}"#,
            r#"{"state":"paused","x":1}"#,
            r#"{"State":"paused"}"#,
            "[]",
        ] {
            let resp = request("PUT", "/vm/state", body);
            assert_eq!(resp.status(), 400, "{body}");
            assert!(message(&resp).starts_with("invalid request body"));
        }
    }

    #[test]
    fn backend_swap_takes_exec_or_socket_and_names_the_device() {
        let resp = request(
            "PUT",
            "/devices/disk0/backend",
            r#"{"socket":"/run/q.sock"}"#,
        );
        assert_eq!(resp.status(), 200);
        let info: DeviceInfo = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(info.socket, std::path::PathBuf::from("/run/q.sock"));
        let resp = request("PUT", "/devices/disk9/backend", r#"{"socket":"/s"}"#);
        assert_eq!(resp.status(), 404);
        assert!(message(&resp).contains("disk9"));
        let resp = request(
            "PUT",
            "/devices/disk0/backend",
            r#"{"exec":["plexvm-blk"]}"#,
        );
        assert_eq!(resp.status(), 400);
        for body in [
            "",
            "{}",
            r#"{"exec":[]}"#,
            r#"{"exec":[""]}"#,
            r#"{"socket":""}"#,
            r#"{"socket":"a","exec":["b"]}"#,
            r#"{"tcp":"x"}"#,
            r#"{"socket":1}"#,
        ] {
            let resp = request("PUT", "/devices/disk0/backend", body);
            assert_eq!(resp.status(), 400, "{body}");
            assert!(message(&resp).starts_with("invalid request body"), "{body}");
        }
        assert_eq!(request("GET", "/devices/disk0/backend", "").status(), 405);
    }

    #[test]
    fn controller_errors_map_to_409_and_panics_to_500() {
        let resp = request("PUT", "/vm/state", r#"{"state":"running"}"#);
        assert_eq!(
            (resp.status(), message(&resp).as_str()),
            (409, "not paused")
        );
        let resp = request("PUT", "/vm/state", r#"{"state":"stopped"}"#);
        assert_eq!(resp.status(), 500);
    }
}
