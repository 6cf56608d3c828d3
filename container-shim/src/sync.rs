//! The runtime ↔ child channel used during `create` and `exec`.
//!
//! A socketpair carries newline-delimited JSON messages. Both ends survive
//! `fork` (the buffered reader state is copied with the process), and the
//! child's end is close-on-exec, so a successful `execve` shows up as EOF.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};

/// Errors on the channel.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// socketpair(2) failed.
    #[error("cannot create the sync socketpair")]
    Pair(#[source] std::io::Error),
    /// Reading or writing failed.
    #[error("sync channel I/O failed")]
    Io(#[source] std::io::Error),
    /// The peer closed the channel without a message.
    #[error("the container process exited during set-up")]
    Eof,
    /// The peer sent something unexpected.
    #[error("unexpected sync message: {0}")]
    Unexpected(String),
    /// The peer reported a failure.
    #[error("{0}")]
    Child(String),
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Message {
    /// Go on (runtime → child after it did its part).
    Continue,
    /// The child unshared its user namespace: write the id maps.
    IdMapsNeeded,
    /// Host pid of the container's init (or the exec'd process).
    Pid {
        /// The pid.
        pid: i32,
    },
    /// Init is ready for the createRuntime/prestart hooks (runtime namespace).
    RuntimeHooks,
    /// Set-up done; init waits for `start`.
    Ready,
    /// Set-up failed.
    Error {
        /// Error chain as text.
        msg: String,
    },
}

/// One end of the channel.
#[derive(Debug)]
pub struct Channel {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Channel {
    /// A connected pair: (runtime end, child end).
    pub fn pair() -> Result<(Channel, Channel), SyncError> {
        let (a, b) = UnixStream::pair().map_err(SyncError::Pair)?;
        Ok((Channel::new(a)?, Channel::new(b)?))
    }

    fn new(stream: UnixStream) -> Result<Channel, SyncError> {
        let writer = stream.try_clone().map_err(SyncError::Io)?;
        Ok(Channel {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &Message) -> Result<(), SyncError> {
        let mut line = serde_json::to_vec(msg).map_err(|e| SyncError::Io(e.into()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(SyncError::Io)
    }

    /// Receives one message; `Error` from the peer becomes `SyncError::Child`.
    pub fn recv(&mut self) -> Result<Message, SyncError> {
        match self.recv_or_eof()? {
            Some(Message::Error { msg }) => Err(SyncError::Child(msg)),
            Some(m) => Ok(m),
            None => Err(SyncError::Eof),
        }
    }

    /// Receives one message or `None` on EOF.
    pub fn recv_or_eof(&mut self) -> Result<Option<Message>, SyncError> {
        let mut line = String::new();
        loop {
            match self.reader.read_line(&mut line) {
                Ok(0) => return Ok(None),
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SyncError::Io(e)),
            }
        }
        serde_json::from_str(line.trim_end())
            .map(Some)
            .map_err(|_| SyncError::Unexpected(line.trim_end().to_string()))
    }

    /// Receives and checks that it is `expected`.
    pub fn expect(&mut self, expected: &Message) -> Result<(), SyncError> {
        let got = self.recv()?;
        if &got == expected {
            Ok(())
        } else {
            Err(SyncError::Unexpected(format!("{got:?}")))
        }
    }

    /// Reports an error to the peer (best effort: the peer may be gone).
    pub fn send_error(&mut self, err: &dyn std::error::Error) {
        let _ = self.send(&Message::Error {
            msg: error_chain(err),
        });
    }

    /// The fds of this end (to keep them out of the fd clean-up before exec).
    pub fn raw_fds(&self) -> [RawFd; 2] {
        [self.reader.get_ref().as_raw_fd(), self.writer.as_raw_fd()]
    }
}

/// "a: b: c" from an error and its sources.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_eof_is_reported() {
        let (mut a, mut b) = Channel::pair().unwrap();
        a.send(&Message::Pid { pid: 42 }).unwrap();
        a.send(&Message::Ready).unwrap();
        assert_eq!(b.recv().unwrap(), Message::Pid { pid: 42 });
        b.expect(&Message::Ready).unwrap();
        a.send(&Message::Error { msg: "x: y".into() }).unwrap();
        assert!(matches!(b.recv(), Err(SyncError::Child(m)) if m == "x: y"));
        drop(a);
        assert!(matches!(b.recv(), Err(SyncError::Eof)));
    }

    #[test]
    fn garbage_is_unexpected_not_a_panic() {
        let (a, mut b) = UnixStream::pair()
            .map(|(x, y)| (x, Channel::new(y).unwrap()))
            .unwrap();
        (&a).write_all(b"{not json\n").unwrap();
        assert!(matches!(b.recv(), Err(SyncError::Unexpected(_))));
    }
}
