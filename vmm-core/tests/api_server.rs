//! The control API server against a fake VM: through `ApiClient`, `plexvm ctl`, raw
//! bytes on the socket (bad requests, slow clients) and `curl --unix-socket`.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plexvm::api::{
    run_ctl, ApiClient, ApiServer, ApiServerHandle, ClientError, ControlError, CtlArgs, CtlCommand,
    ServerError, VmController,
};
use plexvm_protocol::api::{ApiError, RequestedState, VmInfo, VmState};

/// A VM that allows the transitions a real one does: pause only when running, resume
/// only when paused, stop unless stopped.
struct FakeVm {
    info: Mutex<VmInfo>,
}

impl FakeVm {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            info: Mutex::new(VmInfo {
                name: "vm0".into(),
                state: VmState::Running,
                vcpus: 2,
                memory_mib: 256,
                pid: std::process::id(),
                devices: Vec::new(),
            }),
        })
    }
}

impl VmController for FakeVm {
    fn info(&self) -> VmInfo {
        self.info.lock().unwrap().clone()
    }

    fn set_state(&self, requested: RequestedState) -> Result<VmInfo, ControlError> {
        let mut info = self.info.lock().unwrap();
        let next = match (info.state, requested) {
            (VmState::Running, RequestedState::Paused) => VmState::Paused,
            (VmState::Paused, RequestedState::Running) => VmState::Running,
            (VmState::Stopped, RequestedState::Stopped) => {
                return Err(ControlError::Conflict("VM is already stopped".into()))
            }
            (_, RequestedState::Stopped) => VmState::Stopped,
            (state, _) => {
                return Err(ControlError::Conflict(format!(
                    "cannot go to {requested:?} from {state:?}"
                )))
            }
        };
        info.state = next;
        Ok(info.clone())
    }
}

/// A VM whose state changes fail inside the VM.
struct BrokenVm;

impl VmController for BrokenVm {
    fn info(&self) -> VmInfo {
        FakeVm::new().info()
    }

    fn set_state(&self, requested: RequestedState) -> Result<VmInfo, ControlError> {
        match requested {
            RequestedState::Stopped => panic!("bug in the VM"),
            _ => Err(ControlError::Internal("vCPU thread is gone".into())),
        }
    }
}

/// A server on a socket in its own temporary directory; dropping it stops the server
/// before the directory goes.
struct Fixture {
    server: Option<ApiServerHandle>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn start(controller: Arc<dyn VmController>) -> Self {
        Self::start_with_timeout(controller, Duration::from_secs(5))
    }

    fn start_with_timeout(controller: Arc<dyn VmController>, timeout: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let server = ApiServer::start_with_timeout(&path, controller, timeout).unwrap();
        Self {
            server: Some(server),
            path,
            _dir: dir,
        }
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(&self.path)
    }

    fn stop(&mut self) {
        self.server.take();
    }
}

/// A parsed raw response.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn error(&self) -> String {
        serde_json::from_slice::<ApiError>(&self.body)
            .unwrap_or_else(|e| panic!("body is not an ApiError ({e}): {:?}", self.body))
            .error
    }
}

fn parse_raw(bytes: &[u8]) -> Raw {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        other => panic!("not a complete response ({other:?}): {bytes:?}"),
    };
    Raw {
        status: resp.code.unwrap(),
        headers: resp
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into()))
            .collect(),
        body: bytes[len..].to_vec(),
    }
}

/// Reads until the server closes (a reset after its answer counts as closed).
fn read_all(stream: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return out,
        }
    }
}

/// Sends `bytes` as they are and returns the parsed answer. Write errors are ignored:
/// the server may refuse and close before it has read everything.
fn raw(path: &Path, bytes: &[u8]) -> Raw {
    let mut stream = UnixStream::connect(path).unwrap();
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let bytes = bytes.to_vec();
        std::thread::spawn(move || {
            let _ = stream.write_all(&bytes);
            let _ = stream.shutdown(Shutdown::Write);
        })
    };
    let answer = read_all(&mut stream);
    writer.join().unwrap();
    parse_raw(&answer)
}

fn put_state(body: &str) -> Vec<u8> {
    format!(
        "PUT /vm/state HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn get_vm_returns_the_controllers_info() {
    let vm = FakeVm::new();
    let fixture = Fixture::start(vm.clone());
    assert_eq!(fixture.client().get_vm().unwrap(), vm.info());
}

#[test]
fn state_changes_follow_the_controller() {
    let fixture = Fixture::start(FakeVm::new());
    let client = fixture.client();
    let state = |s| client.set_state(s).map(|info| info.state);
    let status = |r: Result<VmState, ClientError>| match r {
        Err(ClientError::Api { status, .. }) => status,
        other => panic!("expected an API error, got {other:?}"),
    };
    assert_eq!(status(state(RequestedState::Running)), 409);
    assert_eq!(state(RequestedState::Paused).unwrap(), VmState::Paused);
    assert_eq!(status(state(RequestedState::Paused)), 409);
    assert_eq!(client.get_vm().unwrap().state, VmState::Paused);
    assert_eq!(state(RequestedState::Running).unwrap(), VmState::Running);
    assert_eq!(state(RequestedState::Stopped).unwrap(), VmState::Stopped);
    assert_eq!(status(state(RequestedState::Stopped)), 409);
    assert_eq!(client.get_vm().unwrap().state, VmState::Stopped);
}

#[test]
fn ctl_prints_status_json_and_new_states() {
    let fixture = Fixture::start(FakeVm::new());
    let ctl = |command| {
        run_ctl(&CtlArgs {
            api: fixture.path.clone(),
            command,
        })
    };
    let status: VmInfo = serde_json::from_str(&ctl(CtlCommand::Status).unwrap()).unwrap();
    assert_eq!(status.state, VmState::Running);
    assert_eq!(ctl(CtlCommand::Pause).unwrap(), "vm0: paused");
    assert_eq!(ctl(CtlCommand::Resume).unwrap(), "vm0: running");
    let err = ctl(CtlCommand::Resume).unwrap_err();
    assert!(err.to_string().starts_with("API error 409"), "{err}");
    assert_eq!(ctl(CtlCommand::Stop).unwrap(), "vm0: stopped");
}

#[test]
fn bad_bodies_are_400_with_an_api_error() {
    let fixture = Fixture::start(FakeVm::new());
    for body in [
        "{\"state\":",
        "not json",
        "",
        r#"{"state":"paused","force":true}"#,
        r#"{"state":"sleeping"}"#,
        r#"{"state":1}"#,
    ] {
        let answer = raw(&fixture.path, &put_state(body));
        assert_eq!(answer.status, 400, "body {body:?}");
        assert_eq!(answer.header("content-type"), Some("application/json"));
        assert!(
            answer.error().starts_with("invalid request body"),
            "{}",
            answer.error()
        );
    }
    // Nothing changed.
    assert_eq!(fixture.client().get_vm().unwrap().state, VmState::Running);
}

#[test]
fn unknown_path_is_404_and_wrong_method_is_405() {
    let fixture = Fixture::start(FakeVm::new());
    let answer = raw(&fixture.path, b"GET /vms HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(answer.status, 404);
    assert!(answer.error().contains("/vms"));
    let answer = raw(&fixture.path, b"DELETE /vm HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(answer.status, 405);
    assert_eq!(answer.header("allow"), Some("GET"));
    let answer = raw(&fixture.path, b"GET /vm/state HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(answer.status, 405);
    assert_eq!(answer.header("allow"), Some("PUT"));
    let err = fixture.client().request("POST", "/vm", None).unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 405, .. }), "{err}");
}

#[test]
fn huge_bodies_and_heads_are_refused() {
    let fixture = Fixture::start(FakeVm::new());
    let mut body = String::from(r#"{"state":"paused","pad":""#);
    body.push_str(&"x".repeat(200 * 1024));
    body.push_str("\"}");
    let answer = raw(&fixture.path, &put_state(&body));
    assert_eq!(answer.status, 413);
    assert!(answer.error().contains("larger than"));

    let mut head = b"GET /vm HTTP/1.1\r\nX-Pad: ".to_vec();
    head.resize(64 * 1024, b'a');
    assert_eq!(raw(&fixture.path, &head).status, 431);
    // Still serving, and nothing changed.
    assert_eq!(fixture.client().get_vm().unwrap().state, VmState::Running);
}

#[test]
fn garbage_is_400() {
    let fixture = Fixture::start(FakeVm::new());
    let answer = raw(
        &fixture.path,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    );
    assert_eq!(answer.status, 400);
    let answer = raw(
        &fixture.path,
        b"PUT /vm/state HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert_eq!(answer.status, 411);
    assert_eq!(fixture.client().get_vm().unwrap().state, VmState::Running);
}

#[test]
fn silent_and_slow_clients_do_not_wedge_the_server() {
    let fixture = Fixture::start_with_timeout(FakeVm::new(), Duration::from_millis(300));
    // Connects and sends nothing: dropped without an answer when its time is up.
    let mut silent = UnixStream::connect(&fixture.path).unwrap();
    // Sends half a head and stalls: gets 408.
    let mut slow = UnixStream::connect(&fixture.path).unwrap();
    slow.write_all(b"GET /vm HTTP/1.1\r\nHost:").unwrap();
    // Queued behind both, and still served.
    assert_eq!(fixture.client().get_vm().unwrap().name, "vm0");
    assert!(read_all(&mut silent).is_empty());
    let answer = parse_raw(&read_all(&mut slow));
    assert_eq!(answer.status, 408);
}

#[test]
fn many_clients_at_once_are_all_served() {
    let fixture = Fixture::start(FakeVm::new());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let client = fixture.client();
            std::thread::spawn(move || client.get_vm())
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap().name, "vm0");
    }
}

#[test]
fn controller_failures_are_500_and_the_server_survives_a_panic() {
    let fixture = Fixture::start(Arc::new(BrokenVm));
    let client = fixture.client();
    let err = client.set_state(RequestedState::Paused).unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 500, message } if message == "vCPU thread is gone"),
        "{err}"
    );
    let err = client.set_state(RequestedState::Stopped).unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 500, .. }), "{err}");
    assert_eq!(client.get_vm().unwrap().name, "vm0");
}

#[test]
fn drop_stops_the_server_and_removes_the_socket() {
    let mut fixture = Fixture::start(FakeVm::new());
    // A connected, silent client must not hold up the stop (request timeout is 5 s; the
    // stop cuts the connection instead of waiting for it).
    let mut idle = UnixStream::connect(&fixture.path).unwrap();
    assert!(fixture.path.exists());
    fixture.stop();
    assert!(!fixture.path.exists());
    assert!(read_all(&mut idle).is_empty());
    let err = fixture.client().get_vm().unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
}

#[test]
fn stale_socket_is_replaced_live_one_and_other_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    // Stale: a socket file nobody listens on any more.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = ApiServer::start(&path, FakeVm::new()).unwrap();
    assert_eq!(ApiClient::new(&path).get_vm().unwrap().name, "vm0");

    // Live: refused, and the running server is untouched.
    let err = ApiServer::start(&path, FakeVm::new()).unwrap_err();
    assert!(matches!(err, ServerError::InUse(_)), "{err}");
    assert_eq!(ApiClient::new(&path).get_vm().unwrap().name, "vm0");
    drop(server);

    // Not a socket: refused and left alone.
    std::fs::write(&path, b"precious").unwrap();
    let err = ApiServer::start(&path, FakeVm::new()).unwrap_err();
    assert!(matches!(err, ServerError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

/// Runs curl against the socket: (HTTP status, body). Fails the test without curl.
fn curl(path: &Path, args: &[&str]) -> (String, String) {
    let output = match Command::new("curl")
        .args(["-sS", "--max-time", "20", "--unix-socket"])
        .arg(path)
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .output()
    {
        Ok(output) => output,
        Err(e) => panic!("cannot run curl (tests/run.sh installs it): {e}"),
    };
    assert!(output.status.success(), "curl failed: {output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let (body, code) = stdout.rsplit_once('\n').unwrap();
    (code.to_owned(), body.to_owned())
}

#[test]
fn curl_can_drive_the_api() {
    let fixture = Fixture::start(FakeVm::new());
    let (code, body) = curl(&fixture.path, &["http://localhost/vm"]);
    assert_eq!(code, "200");
    let info: VmInfo = serde_json::from_str(&body).unwrap();
    assert_eq!(info.state, VmState::Running);

    let put = ["-X", "PUT", "-H", "Content-Type: application/json", "-d"];
    let args: Vec<&str> = put
        .iter()
        .copied()
        .chain([r#"{"state":"paused"}"#, "http://localhost/vm/state"])
        .collect();
    let (code, body) = curl(&fixture.path, &args);
    assert_eq!(code, "200");
    assert_eq!(
        serde_json::from_str::<VmInfo>(&body).unwrap().state,
        VmState::Paused
    );

    let (code, body) = curl(&fixture.path, &args);
    assert_eq!(code, "409");
    assert!(serde_json::from_str::<ApiError>(&body).is_ok(), "{body}");

    let (code, _) = curl(&fixture.path, &["http://localhost/nowhere"]);
    assert_eq!(code, "404");

    // A body large enough that curl asks `Expect: 100-continue` first.
    let big = format!(r#"{{"state":"running","pad":"{}"}}"#, "x".repeat(4000));
    let args: Vec<&str> = put
        .iter()
        .copied()
        .chain([big.as_str(), "http://localhost/vm/state"])
        .collect();
    let (code, body) = curl(&fixture.path, &args);
    assert_eq!(code, "400", "{body}");
    assert!(body.contains("unknown field"), "{body}");
}

/// Where a [`StoppingVm`] drops its API server when asked to stop.
#[derive(Clone, Copy)]
enum DropOn {
    /// On the API thread, inside the handler.
    ApiThread,
    /// On another thread, the way the core's main thread tears the VM down while the
    /// API thread is still answering.
    OtherThread,
}

/// A VM that owns its API server and drops it when it is asked to stop.
struct StoppingVm {
    vm: Arc<FakeVm>,
    server: Mutex<Option<ApiServerHandle>>,
    drop_on: DropOn,
}

impl StoppingVm {
    /// Serves `path` with a new stopping VM; returns a client for it.
    fn serve(path: &Path, drop_on: DropOn) -> ApiClient {
        let vm = Arc::new(StoppingVm {
            vm: FakeVm::new(),
            server: Mutex::new(None),
            drop_on,
        });
        let server = ApiServer::start(path, vm.clone()).unwrap();
        *vm.server.lock().unwrap() = Some(server);
        ApiClient::new(path)
    }
}

impl VmController for StoppingVm {
    fn info(&self) -> VmInfo {
        self.vm.info()
    }

    fn set_state(&self, requested: RequestedState) -> Result<VmInfo, ControlError> {
        let info = self.vm.set_state(requested)?;
        if requested == RequestedState::Stopped {
            let server = self.server.lock().unwrap().take();
            match self.drop_on {
                DropOn::ApiThread => drop(server),
                DropOn::OtherThread => {
                    std::thread::spawn(move || drop(server));
                    // Give the other thread time to be inside Drop before we answer.
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Ok(info)
    }
}

#[test]
fn a_controller_may_drop_the_server_while_answering() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let client = StoppingVm::serve(&path, DropOn::ApiThread);
    // The stop is answered although the server is dropped while handling it.
    assert_eq!(
        client.set_state(RequestedState::Stopped).unwrap().state,
        VmState::Stopped
    );
    assert!(!path.exists());
    assert!(matches!(client.get_vm(), Err(ClientError::Connect { .. })));
}

#[test]
fn a_stop_request_is_answered_when_another_thread_drops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let client = StoppingVm::serve(&path, DropOn::OtherThread);
    assert_eq!(
        client.set_state(RequestedState::Stopped).unwrap().state,
        VmState::Stopped
    );
    assert!(wait_gone(&path), "API socket left behind");
}

fn wait_gone(path: &Path) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while path.exists() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}
