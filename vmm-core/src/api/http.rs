//! HTTP/1.1 framing for the control API: reading a request or response with hard size and
//! time limits, and writing a response.
//!
//! Why `httparse` and not a server crate: the API is two (later a handful of) JSON
//! endpoints on a Unix socket, served by one thread that must never be wedged by a client.
//! `httparse` (the parser under hyper) parses heads with zero copies and no I/O, so the
//! limits, timeouts and shutdown below stay in our hands. hyper and friends need an async
//! runtime; `tiny_http` 0.12 serves Unix sockets but sets no read timeouts (an idle
//! client holds one of its threads forever) and has no body size limit.
//! Only `Content-Length` bodies are taken (RFC 9112 section 6); every response closes the
//! connection, so there is no keep-alive or pipelining to get wrong.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use plexvm_protocol::api::ApiError;
use serde::Serialize;

/// Largest request head (request line + headers) the server reads.
pub(crate) const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Largest request body the server takes.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most headers in one message.
const MAX_HEADERS: usize = 32;

/// A failure to read one HTTP message.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The peer closed the connection before sending anything.
    #[error("connection closed before a message was sent")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed in the middle of a message")]
    Truncated,
    /// Nothing arrived within the time limit.
    #[error("no message within the time limit")]
    Idle,
    /// The message did not arrive whole within the time limit.
    #[error("message not complete within the time limit")]
    Timeout,
    /// The head is over the size limit.
    #[error("message head is larger than {0} bytes")]
    HeadTooLarge(usize),
    /// More than [`MAX_HEADERS`] headers.
    #[error("message has more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    /// The head does not parse as HTTP/1.x.
    #[error("malformed HTTP message: {0}")]
    Malformed(httparse::Error),
    /// A `Content-Length` that is not a number, or several that disagree.
    #[error("invalid Content-Length header")]
    BadContentLength,
    /// `Transfer-Encoding` (chunked bodies) is not supported.
    #[error("Transfer-Encoding is not supported; send the body with Content-Length")]
    LengthRequired,
    /// The body is over the size limit.
    #[error("message body is larger than {0} bytes")]
    BodyTooLarge(usize),
    /// The socket failed.
    #[error("socket I/O failed")]
    Io(#[source] io::Error),
}

impl HttpError {
    /// The status to answer a bad request with, or `None` when there is nobody to answer
    /// (the client has gone or the socket failed).
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            // An idle client gets no answer, like a client that closed.
            HttpError::Closed | HttpError::Idle | HttpError::Truncated | HttpError::Io(_) => None,
            HttpError::Timeout => Some(408),
            HttpError::HeadTooLarge(_) | HttpError::TooManyHeaders => Some(431),
            HttpError::Malformed(_) | HttpError::BadContentLength => Some(400),
            HttpError::LengthRequired => Some(411),
            HttpError::BodyTooLarge(_) => Some(413),
        }
    }
}

/// Reads from a socket with one deadline for the whole message, so a client that
/// trickles bytes cannot hold the server longer than a client that sends nothing.
#[derive(Debug)]
pub(crate) struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl<'a> DeadlineReader<'a> {
    pub(crate) fn new(stream: &'a UnixStream, deadline: Instant) -> Self {
        Self { stream, deadline }
    }

    /// Reads what is there (at least one byte), `Ok(0)` at end of stream.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, HttpError> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HttpError::Timeout);
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(HttpError::Io)?;
            match (&mut &*self.stream).read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(HttpError::Timeout)
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(HttpError::Truncated)
                }
                Err(e) => return Err(HttpError::Io(e)),
            }
        }
    }

    /// Reads until `parse` finds a complete head in the bytes so far; returns the parsed
    /// head and the bytes after it (the start of the body).
    fn read_head<T>(
        &mut self,
        limit: usize,
        parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, HttpError>,
    ) -> Result<(T, Vec<u8>), HttpError> {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            let n = match self.read_some(&mut chunk) {
                Err(HttpError::Timeout) if buf.is_empty() => return Err(HttpError::Idle),
                r => r?,
            };
            if n == 0 {
                return Err(if buf.is_empty() {
                    HttpError::Closed
                } else {
                    HttpError::Truncated
                });
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some((head, len)) = parse(&buf)? {
                return Ok((head, buf.split_off(len)));
            }
            if buf.len() >= limit {
                return Err(HttpError::HeadTooLarge(limit));
            }
        }
    }

    /// Reads until `body` holds `len` bytes (extra bytes, e.g. a pipelined request, are
    /// dropped: every response closes the connection).
    fn read_body_exact(&mut self, body: &mut Vec<u8>, len: usize) -> Result<(), HttpError> {
        let mut chunk = [0u8; 4096];
        while body.len() < len {
            let want = (len - body.len()).min(chunk.len());
            let n = self.read_some(&mut chunk[..want])?;
            if n == 0 {
                return Err(HttpError::Truncated);
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(len);
        Ok(())
    }

    /// Reads until end of stream, at most `limit` bytes in all.
    fn read_body_to_end(&mut self, body: &mut Vec<u8>, limit: usize) -> Result<(), HttpError> {
        let mut chunk = [0u8; 4096];
        loop {
            if body.len() > limit {
                return Err(HttpError::BodyTooLarge(limit));
            }
            match self.read_some(&mut chunk)? {
                0 => return Ok(()),
                n => body.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// One header, name as sent, value as bytes.
pub(crate) type Header = (String, Vec<u8>);

fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<Header> {
    headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect()
}

fn find_header<'h>(headers: &'h [Header], name: &str) -> impl Iterator<Item = &'h [u8]> + 'h {
    let name = name.to_owned();
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(&name))
        .map(|(_, v)| v.as_slice())
}

fn map_parse_error(e: httparse::Error) -> HttpError {
    match e {
        httparse::Error::TooManyHeaders => HttpError::TooManyHeaders,
        e => HttpError::Malformed(e),
    }
}

/// The body length a head announces: `Content-Length` (all copies equal, digits only),
/// 0 without one, `None` for a response that runs to end of stream.
fn content_length(headers: &[Header], limit: usize) -> Result<Option<usize>, HttpError> {
    if find_header(headers, "transfer-encoding").next().is_some() {
        return Err(HttpError::LengthRequired);
    }
    let mut length = None;
    for value in find_header(headers, "content-length") {
        let value = value.trim_ascii();
        if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
            return Err(HttpError::BadContentLength);
        }
        // All digits: a parse failure can only be an overflow, i.e. far too large.
        let n = std::str::from_utf8(value)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or(HttpError::BodyTooLarge(limit))?;
        if length.is_some_and(|l| l != n) {
            return Err(HttpError::BadContentLength);
        }
        length = Some(n);
    }
    match length {
        Some(n) if n > limit => Err(HttpError::BodyTooLarge(limit)),
        l => Ok(l),
    }
}

/// A request as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) method: String,
    /// The request target as sent (origin form, query included).
    pub(crate) target: String,
    pub(crate) headers: Vec<Header>,
    pub(crate) body: Vec<u8>,
}

struct RequestHead {
    method: String,
    target: String,
    headers: Vec<Header>,
}

fn parse_request_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf).map_err(map_parse_error)? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(len) => {
            // A complete parse always has method and path; keep the fallbacks total.
            let head = RequestHead {
                method: req.method.unwrap_or_default().to_owned(),
                target: req.path.unwrap_or_default().to_owned(),
                headers: owned_headers(req.headers),
            };
            Ok(Some((head, len)))
        }
    }
}

/// Reads one request from `stream`, all of it before `deadline`. Answers
/// `Expect: 100-continue` (curl sends it before larger bodies and waits for it).
pub(crate) fn read_request(stream: &UnixStream, deadline: Instant) -> Result<Request, HttpError> {
    let mut reader = DeadlineReader::new(stream, deadline);
    let (head, mut body) = reader.read_head(MAX_HEAD_BYTES, parse_request_head)?;
    let len = content_length(&head.headers, MAX_BODY_BYTES)?.unwrap_or(0);
    let expects_continue = find_header(&head.headers, "expect")
        .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"));
    if body.len() < len && expects_continue {
        (&mut &*stream)
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(HttpError::Io)?;
    }
    reader.read_body_exact(&mut body, len)?;
    Ok(Request {
        method: head.method,
        target: head.target,
        headers: head.headers,
        body,
    })
}

/// Reads one response (status and body) from `stream`, all of it before `deadline`.
pub(crate) fn read_response(
    stream: &UnixStream,
    deadline: Instant,
    max_body: usize,
) -> Result<(u16, Vec<u8>), HttpError> {
    let mut reader = DeadlineReader::new(stream, deadline);
    let parse = |buf: &[u8]| {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf).map_err(map_parse_error)? {
            httparse::Status::Partial => Ok(None),
            httparse::Status::Complete(len) => {
                let code = resp.code.unwrap_or_default();
                Ok(Some(((code, owned_headers(resp.headers)), len)))
            }
        }
    };
    let ((status, headers), mut body) = reader.read_head(MAX_HEAD_BYTES, parse)?;
    match content_length(&headers, max_body)? {
        // 1xx, 204 and 304 never have a body (RFC 9112 section 6.3).
        _ if status < 200 || status == 204 || status == 304 => body.clear(),
        Some(len) => reader.read_body_exact(&mut body, len)?,
        None => reader.read_body_to_end(&mut body, max_body)?,
    }
    Ok((status, body))
}

/// A response: status, extra headers and a JSON body (or none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Response {
    /// `status` with `value` as the JSON body.
    pub(crate) fn json<T: Serialize>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self {
                status,
                headers: Vec::new(),
                body,
            },
            Err(e) => Self::error(500, format!("cannot encode the response: {e}")),
        }
    }

    /// An error status with an [`ApiError`] body.
    pub(crate) fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(
            status,
            &ApiError {
                error: message.into(),
            },
        )
    }

    /// Adds a header.
    pub(crate) fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The status code.
    pub(crate) fn status(&self) -> u16 {
        self.status
    }

    /// The body bytes.
    #[cfg(test)]
    pub(crate) fn body(&self) -> &[u8] {
        &self.body
    }

    /// The value of the first header called `name`.
    #[cfg(test)]
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Writes the whole response in one buffer; the connection closes after it.
    pub(crate) fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let mut msg = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if !self.body.is_empty() {
            msg.push_str("Content-Type: application/json\r\n");
        }
        msg.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        msg.push_str("Connection: close\r\n");
        for (name, value) in &self.headers {
            msg.push_str(&format!("{name}: {value}\r\n"));
        }
        msg.push_str("\r\n");
        let mut bytes = msg.into_bytes();
        bytes.extend_from_slice(&self.body);
        out.write_all(&bytes)?;
        out.flush()
    }
}

/// Reason phrases of the statuses the API uses (RFC 9110 section 15).
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn deadline() -> Instant {
        // Generous: the tests below never rely on it expiring except where noted.
        Instant::now() + Duration::from_secs(30)
    }

    /// Sends `bytes` (then closes the sending side) and reads a request from the other end.
    fn request_from(bytes: &[u8]) -> Result<Request, HttpError> {
        let (client, server) = UnixStream::pair().unwrap();
        let bytes = bytes.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = (&client).write_all(&bytes);
            let _ = client.shutdown(std::net::Shutdown::Write);
            client
        });
        let result = read_request(&server, deadline());
        drop(writer.join().unwrap());
        result
    }

    #[test]
    fn parses_request_with_body() {
        let req = request_from(
            b"PUT /vm/state HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\n{\"state\":\"paused\"}",
        )
        .unwrap();
        assert_eq!(req.method, "PUT");
        assert_eq!(req.target, "/vm/state");
        assert_eq!(req.body, b"{\"state\":\"paused\"}");
        assert_eq!(req.headers.len(), 2);
    }

    #[test]
    fn request_without_length_has_empty_body() {
        let req = request_from(b"GET /vm HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(req.method, "GET");
        assert!(req.body.is_empty());
    }

    #[test]
    fn extra_bytes_after_body_are_dropped() {
        let req =
            request_from(b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\n\r\nabGET / HTTP/1.1").unwrap();
        assert_eq!(req.body, b"ab");
    }

    #[test]
    fn bad_requests_get_the_right_status() {
        let cases: &[(&[u8], Option<u16>)] = &[
            (b"", None),
            (b"GET /vm HTTP/1.1\r\nHost:", None),
            (b"GET /vm HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", None),
            (b"\x00\x01garbage\r\n\r\n", Some(400)),
            (b"GET /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n", Some(400)),
            (b"GET /vm HTTP/1.1\r\nContent-Length: +1\r\n\r\n", Some(400)),
            (
                b"GET /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                Some(400),
            ),
            (
                b"GET /vm HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                Some(413),
            ),
            (
                b"PUT /vm HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
                Some(413),
            ),
            (
                b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                Some(411),
            ),
        ];
        for (bytes, status) in cases {
            let err = request_from(bytes).unwrap_err();
            assert_eq!(err.status(), *status, "{err} for {bytes:?}");
        }
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut bytes = b"GET /vm HTTP/1.1\r\nX-Pad: ".to_vec();
        bytes.resize(MAX_HEAD_BYTES * 2, b'a');
        let err = request_from(&bytes).unwrap_err();
        assert_eq!(err.status(), Some(431));
    }

    #[test]
    fn too_many_headers_is_refused() {
        let mut bytes = b"GET /vm HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            bytes.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        bytes.extend_from_slice(b"\r\n");
        let err = request_from(&bytes).unwrap_err();
        assert!(matches!(err, HttpError::TooManyHeaders), "{err}");
    }

    #[test]
    fn expired_deadline_is_idle_or_a_timeout() {
        let (client, server) = UnixStream::pair().unwrap();
        let err = read_request(&server, Instant::now()).unwrap_err();
        assert!(matches!(err, HttpError::Idle), "{err}");
        assert_eq!(err.status(), None);
        (&client).write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
        let err = read_request(&server, Instant::now() + Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.status(), Some(408));
    }

    /// A cheap stand-in for a fuzz target: mutated requests give a request or an error,
    /// never a panic or a hang (every input ends with end of stream).
    #[test]
    fn mutated_requests_never_panic() {
        let valid = b"PUT /vm/state HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\n{\"state\":\"paused\"}";
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            // xorshift64: deterministic, so a failure reproduces.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..500 {
            let mut bytes = valid.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() % bytes.len() as u64) as usize;
                let byte = next() as u8;
                match next() % 3 {
                    0 => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ => {
                        bytes.remove(at);
                    }
                }
            }
            match request_from(&bytes) {
                Ok(req) => assert!(req.body.len() <= MAX_BODY_BYTES),
                Err(e) => assert_ne!(e.status(), Some(408), "{e} for {bytes:?}"),
            }
        }
    }

    #[test]
    fn response_round_trips_through_read_response() {
        let (client, server) = UnixStream::pair().unwrap();
        Response::error(409, "not paused")
            .with_header("Allow", "GET".into())
            .write_to(&mut &server)
            .unwrap();
        drop(server);
        let (status, body) = read_response(&client, deadline(), 1024).unwrap();
        assert_eq!(status, 409);
        let err: ApiError = serde_json::from_slice(&body).unwrap();
        assert_eq!(err.error, "not paused");
    }

    #[test]
    fn response_without_length_runs_to_end_of_stream() {
        let (client, server) = UnixStream::pair().unwrap();
        (&server)
            .write_all(b"HTTP/1.1 200 OK\r\n\r\n{\"a\":1}")
            .unwrap();
        drop(server);
        let (status, body) = read_response(&client, deadline(), 1024).unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"{\"a\":1}"[..]));
    }

    #[test]
    fn response_body_over_limit_is_refused() {
        let (client, server) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = (&server).write_all(b"HTTP/1.1 200 OK\r\n\r\n");
            let _ = (&server).write_all(&[b'x'; 5000]);
        });
        let err = read_response(&client, deadline(), 1000).unwrap_err();
        writer.join().unwrap();
        assert!(matches!(err, HttpError::BodyTooLarge(1000)), "{err}");
    }
}
