//! Line buffering between COM1 and its sink (stdout, a file).
//!
//! The 16550 model (vm-superio) writes and flushes its sink once per guest byte, which
//! cost one write(2) of 20-50 µs per byte here (perf/results/NOTES.md). [`LineBuffered`]
//! collects the bytes and writes a whole line at once: on '\n', when [`LINE_CAP`] bytes
//! gathered without one, and — so that a prompt without a newline is not held back —
//! [`IDLE_FLUSH`] after the first byte of a partial line, from a small flusher thread.
//! [`SerialFlusher`] lets the VM owner push out a partial line when the vCPUs pause
//! and at the VM's end, so nothing the guest wrote is held back or lost.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A partial line longer than this is written out without waiting for its newline.
pub const LINE_CAP: usize = 4096;
/// The longest a partial line waits for its newline before it is written out.
pub const IDLE_FLUSH: Duration = Duration::from_millis(20);
/// The flusher thread only copies bytes to the sink.
const FLUSHER_STACK: usize = 64 * 1024;

/// Errors setting the buffer up.
#[derive(Debug, thiserror::Error)]
pub enum SerialBufferError {
    /// The flusher thread could not start.
    #[error("cannot start the serial flusher thread")]
    Thread(#[source] std::io::Error),
}

#[derive(Debug)]
struct Pending<W> {
    out: W,
    /// Bytes of the current line; never holds a '\n' between calls.
    line: Vec<u8>,
    /// When the first byte of `line` arrived.
    since: Option<Instant>,
    /// The flusher thread is gone: every write goes straight to the sink.
    closed: bool,
}

impl<W: Write> Pending<W> {
    /// Writes the first `n` bytes of the line to the sink with one write. The bytes are
    /// dropped even if the sink fails: a broken sink must not grow the buffer.
    fn emit(&mut self, n: usize) -> std::io::Result<()> {
        let result = self
            .out
            .write_all(&self.line[..n])
            .and_then(|()| self.out.flush());
        self.line.drain(..n);
        self.since = if self.line.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        result
    }

    fn emit_all(&mut self) -> std::io::Result<()> {
        if self.line.is_empty() {
            return Ok(());
        }
        self.emit(self.line.len())
    }
}

#[derive(Debug)]
struct Shared<W> {
    pending: Mutex<Pending<W>>,
    /// Wakes the flusher: a partial line started, or the buffer closed.
    wake: Condvar,
    /// How long a partial line may wait ([`IDLE_FLUSH`]; longer in tests).
    idle: Duration,
}

impl<W> Shared<W> {
    fn lock(&self) -> MutexGuard<'_, Pending<W>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sink side of COM1: buffers the guest's output per line. Its `flush` does nothing
/// (the 16550 model calls it after every byte); the buffer decides when to write.
#[derive(Debug)]
pub struct LineBuffered<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
}

/// Flushes a [`LineBuffered`] from outside, and stops its flusher thread when dropped
/// (after writing what is left).
#[derive(Debug)]
pub struct SerialFlusher<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
}

/// Wraps `out` in a line buffer with its flusher thread.
pub fn line_buffered<W: Write + Send + 'static>(
    out: W,
) -> Result<(LineBuffered<W>, SerialFlusher<W>), SerialBufferError> {
    line_buffered_with(out, IDLE_FLUSH)
}

fn line_buffered_with<W: Write + Send + 'static>(
    out: W,
    idle: Duration,
) -> Result<(LineBuffered<W>, SerialFlusher<W>), SerialBufferError> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending {
            out,
            line: Vec::new(),
            since: None,
            closed: false,
        }),
        wake: Condvar::new(),
        idle,
    });
    let for_thread = shared.clone();
    std::thread::Builder::new()
        .name("serial-flush".into())
        .stack_size(FLUSHER_STACK)
        .spawn(move || flush_when_idle(&for_thread))
        .map_err(SerialBufferError::Thread)?;
    Ok((
        LineBuffered {
            shared: shared.clone(),
        },
        SerialFlusher { shared },
    ))
}

/// The flusher thread: writes a partial line out `idle` after it started.
fn flush_when_idle<W: Write>(shared: &Shared<W>) {
    let mut p = shared.lock();
    loop {
        if p.closed {
            return;
        }
        match p.since {
            None => p = shared.wake.wait(p).unwrap_or_else(|e| e.into_inner()),
            Some(since) => {
                let due = since + shared.idle;
                let now = Instant::now();
                if now >= due {
                    // Nobody to report a sink error to; the next write sees it again.
                    let _ = p.emit_all();
                } else {
                    p = shared
                        .wake
                        .wait_timeout(p, due - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}

impl<W: Write + Send + 'static> Write for LineBuffered<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut p = self.shared.lock();
        p.line.extend_from_slice(data);
        if p.closed {
            p.emit_all()?;
            return Ok(data.len());
        }
        // The line held no '\n' before, so the last one is in `data`.
        if let Some(at) = data.iter().rposition(|b| *b == b'\n') {
            let end = p.line.len() - (data.len() - at - 1);
            p.emit(end)?;
        }
        if p.line.len() >= LINE_CAP {
            p.emit_all()?;
        }
        if !p.line.is_empty() && p.since.is_none() {
            p.since = Some(Instant::now());
            self.shared.wake.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write + Send + 'static> SerialFlusher<W> {
    /// Writes out a partial line now (the vCPUs paused or stopped).
    pub fn flush(&self) -> std::io::Result<()> {
        self.shared.lock().emit_all()
    }
}

impl<W: Write + Send + 'static> Drop for SerialFlusher<W> {
    fn drop(&mut self) {
        let mut p = self.shared.lock();
        let _ = p.emit_all();
        p.closed = true;
        self.shared.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records each write as one chunk.
    #[derive(Debug, Clone, Default)]
    struct Chunks(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Chunks {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Chunks {
        fn take(&self) -> Vec<Vec<u8>> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn put(out: &mut impl Write, text: &[u8]) {
        // Byte by byte, flushing after each, as the 16550 model does.
        for b in text {
            out.write_all(&[*b]).unwrap();
            out.flush().unwrap();
        }
    }

    /// Long enough that the flusher thread never fires during a test.
    const NEVER: Duration = Duration::from_secs(3600);

    #[test]
    fn one_write_per_line_and_partial_lines_on_flush() {
        let sink = Chunks::default();
        let (mut out, flusher) = line_buffered_with(sink.clone(), NEVER).unwrap();
        put(&mut out, b"first line\nsecond\n");
        assert_eq!(
            sink.take(),
            [b"first line\n".to_vec(), b"second\n".to_vec()]
        );
        put(&mut out, b"prompt> ");
        assert!(sink.take().is_empty());
        flusher.flush().unwrap();
        assert_eq!(sink.take(), [b"prompt> ".to_vec()]);
        // Several lines in one write are still one write.
        out.write_all(b"a\nb\nc").unwrap();
        assert_eq!(sink.take(), [b"a\nb\n".to_vec()]);
        drop(flusher);
        assert_eq!(sink.take(), [b"c".to_vec()]);
        // After the flusher is gone nothing waits in the buffer.
        put(&mut out, b"late");
        assert_eq!(sink.take().concat(), b"late");
    }

    #[test]
    fn a_partial_line_reaches_the_sink_without_a_newline() {
        let sink = Chunks::default();
        let (mut out, _flusher) = line_buffered(sink.clone()).unwrap();
        out.write_all(b"login: ").unwrap();
        // Bounded by IDLE_FLUSH; the generous wait only keeps a loaded machine from
        // failing the test, it does not time anything.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            got = sink.take();
        }
        assert_eq!(got, [b"login: ".to_vec()]);
    }

    #[test]
    fn a_long_line_is_written_in_pieces_of_the_cap() {
        let sink = Chunks::default();
        let (mut out, flusher) = line_buffered_with(sink.clone(), NEVER).unwrap();
        let long = vec![b'x'; LINE_CAP + 10];
        put(&mut out, &long);
        assert_eq!(sink.take(), [vec![b'x'; LINE_CAP]]);
        drop(flusher);
        assert_eq!(sink.take(), [vec![b'x'; 10]]);
    }
}
