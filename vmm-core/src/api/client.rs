//! The control API client and the `plexvm ctl` subcommand built on it.
//!
//! Plain HTTP/1.1 over a `UnixStream`: one request per connection with
//! `Connection: close`, the response framed by `Content-Length` or end of stream.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plexvm_protocol::api::{
    ApiError, BackendSwapRequest, DeviceInfo, RequestedState, VmInfo, VmStateRequest,
};
use plexvm_protocol::spec::BackendSource;

use super::http::{self, HttpError};

/// How long one API call may take by default.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body accepted.
const MAX_RESPONSE_BODY: usize = 16 * 1024 * 1024;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the socket (or it cannot be reached).
    #[error("cannot connect to the control API at {}", .path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Sending the request failed.
    #[error("cannot send the request")]
    Send(#[source] io::Error),
    /// The response could not be read or was not HTTP.
    #[error("cannot read the response")]
    Receive(#[source] HttpError),
    /// A success response whose body is not the expected JSON.
    #[error("unexpected response body")]
    BadBody(#[source] serde_json::Error),
    /// The server answered with an error status.
    #[error("API error {status}: {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The server's message ([`ApiError::error`]), or the raw body if it sent no
        /// `ApiError`.
        message: String,
    },
}

/// A client for one VM's control API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client for the API socket at `path`; nothing is connected until a call.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            timeout: DEFAULT_CLIENT_TIMEOUT,
        }
    }

    /// Sets how long one call (connect, send, receive) may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `GET /vm`.
    pub fn get_vm(&self) -> Result<VmInfo, ClientError> {
        let body = self.request("GET", "/vm", None)?;
        serde_json::from_slice(&body).map_err(ClientError::BadBody)
    }

    /// `PUT /vm/state`; returns the VM as it is after the change.
    pub fn set_state(&self, state: RequestedState) -> Result<VmInfo, ClientError> {
        let json = serde_json::to_vec(&VmStateRequest { state }).map_err(ClientError::BadBody)?;
        let body = self.request("PUT", "/vm/state", Some(&json))?;
        if body.is_empty() {
            // A 204 answer carries no VmInfo: ask for it.
            return self.get_vm();
        }
        serde_json::from_slice(&body).map_err(ClientError::BadBody)
    }

    /// `PUT /devices/{id}/backend`: hands device `id` to the backend `source`; returns
    /// the device as it is after the swap.
    pub fn swap_backend(
        &self,
        id: &str,
        source: &BackendSwapRequest,
    ) -> Result<DeviceInfo, ClientError> {
        let json = serde_json::to_vec(source).map_err(ClientError::BadBody)?;
        let body = self.request("PUT", &format!("/devices/{id}/backend"), Some(&json))?;
        serde_json::from_slice(&body).map_err(ClientError::BadBody)
    }

    /// Sends one request and returns the body of a 2xx response; other statuses become
    /// [`ClientError::Api`].
    pub fn request(
        &self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
    ) -> Result<Vec<u8>, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let stream = UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
            path: self.path.clone(),
            source,
        })?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(ClientError::Send)?;
        let mut msg = format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Connection: close\r\n"
        );
        if let Some(body) = body {
            msg.push_str("Content-Type: application/json\r\n");
            msg.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        msg.push_str("\r\n");
        let mut bytes = msg.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        (&stream).write_all(&bytes).map_err(ClientError::Send)?;
        // Half-close: tells the server the request is complete; our read side stays open.
        let _ = stream.shutdown(Shutdown::Write);
        let (status, body) = http::read_response(&stream, deadline, MAX_RESPONSE_BODY)
            .map_err(ClientError::Receive)?;
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            Err(api_error(status, &body))
        }
    }
}

fn api_error(status: u16, body: &[u8]) -> ClientError {
    let message = match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => e.error,
        Err(_) => String::from_utf8_lossy(body).trim().to_owned(),
    };
    ClientError::Api { status, message }
}

/// `plexvm ctl`: talk to a running VM's control API.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// The VM's API socket (the spec's `api_socket`).
    #[arg(long)]
    pub api: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The `plexvm ctl` subcommands.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum CtlCommand {
    /// Print the VM's state and devices as JSON.
    Status,
    /// Pause the vCPUs.
    Pause,
    /// Resume paused vCPUs.
    Resume,
    /// Stop the VM (the `plexvm` process exits).
    Stop,
    /// Hand a device to another backend (the old one is stopped once the new one
    /// serves) and print the device as JSON.
    Swap {
        /// The device id.
        id: String,
        /// Spawn this backend: program and arguments, as a spec's `exec` (the core
        /// appends `--socket`); everything after `--exec` belongs to it.
        #[arg(
            long,
            num_args = 1..,
            allow_hyphen_values = true,
            conflicts_with = "socket",
            required_unless_present = "socket"
        )]
        exec: Option<Vec<String>>,
        /// Attach to the backend listening on this socket.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

/// The backend a `swap` command names (a relative socket path is taken from the
/// current directory).
fn swap_source(exec: &Option<Vec<String>>, socket: &Option<PathBuf>) -> BackendSource {
    match (exec, socket) {
        (Some(argv), _) => BackendSource::Exec(argv.clone()),
        (None, Some(path)) => {
            BackendSource::Socket(std::path::absolute(path).unwrap_or_else(|_| path.clone()))
        }
        (None, None) => BackendSource::Exec(Vec::new()),
    }
}

/// Runs a `plexvm ctl` command and returns what to print: the pretty JSON of the VM for
/// `status`, one line with the new state for the others.
pub fn run_ctl(args: &CtlArgs) -> Result<String, ClientError> {
    let client = ApiClient::new(&args.api);
    let requested = match &args.command {
        CtlCommand::Status => {
            let info = client.get_vm()?;
            return serde_json::to_string_pretty(&info).map_err(ClientError::BadBody);
        }
        CtlCommand::Swap { id, exec, socket } => {
            let info = client.swap_backend(id, &swap_source(exec, socket))?;
            return serde_json::to_string_pretty(&info).map_err(ClientError::BadBody);
        }
        CtlCommand::Pause => RequestedState::Paused,
        CtlCommand::Resume => RequestedState::Running,
        CtlCommand::Stop => RequestedState::Stopped,
    };
    let info = client.set_state(requested)?;
    let state = serde_json::to_value(info.state).map_err(ClientError::BadBody)?;
    Ok(format!(
        "{}: {}",
        info.name,
        state.as_str().unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    #[test]
    fn parses_ctl_command_lines() {
        let cli = Cli::try_parse_from(["ctl", "--api", "/run/x.sock", "pause"]).unwrap();
        assert_eq!(cli.ctl.api, PathBuf::from("/run/x.sock"));
        assert_eq!(cli.ctl.command, CtlCommand::Pause);
        for (word, command) in [
            ("status", CtlCommand::Status),
            ("resume", CtlCommand::Resume),
            ("stop", CtlCommand::Stop),
        ] {
            let cli = Cli::try_parse_from(["ctl", "--api", "s", word]).unwrap();
            assert_eq!(cli.ctl.command, command);
        }
        assert!(Cli::try_parse_from(["ctl", "pause"]).is_err());
        let cli = Cli::try_parse_from([
            "ctl",
            "--api",
            "s",
            "swap",
            "disk0",
            "--exec",
            "plexvm-blk",
            "--image",
            "d.raw",
        ])
        .unwrap();
        let CtlCommand::Swap { id, exec, socket } = &cli.ctl.command else {
            panic!("not a swap: {:?}", cli.ctl.command);
        };
        assert_eq!(id, "disk0");
        assert_eq!(
            swap_source(exec, socket),
            BackendSource::Exec(vec!["plexvm-blk".into(), "--image".into(), "d.raw".into()])
        );
        let cli =
            Cli::try_parse_from(["ctl", "--api", "s", "swap", "d", "--socket", "/q.sock"]).unwrap();
        let CtlCommand::Swap { exec, socket, .. } = &cli.ctl.command else {
            panic!("not a swap");
        };
        assert_eq!(
            swap_source(exec, socket),
            BackendSource::Socket("/q.sock".into())
        );
        assert!(Cli::try_parse_from(["ctl", "--api", "s", "swap", "d"]).is_err());
        assert!(Cli::try_parse_from(["ctl", "--api", "s", "swap", "d", "--exec"]).is_err());
        assert!(Cli::try_parse_from(["ctl", "--api", "s", "fly"]).is_err());
    }

    #[test]
    fn error_bodies_become_api_errors() {
        let e = api_error(409, br#"{"error":"VM is not paused"}"#);
        assert!(
            matches!(e, ClientError::Api { status: 409, ref message } if message == "VM is not paused")
        );
        let e = api_error(502, b"  bad gateway\n");
        assert!(
            matches!(e, ClientError::Api { status: 502, ref message } if message == "bad gateway")
        );
    }

    #[test]
    fn missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = ApiClient::new(dir.path().join("none.sock"))
            .get_vm()
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }
}
