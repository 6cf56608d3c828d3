//! The `--log FILE` / `--log-format text|json` logger.
//!
//! containerd's runc shim reads the last `{"level":"error","msg":...}` line of
//! the log file to report why a runtime command failed, so errors are written
//! there in runc's JSON shape. Without `--log` only stderr is used (by main).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cli::LogFormat;

struct Logger {
    file: Mutex<File>,
    format: LogFormat,
    debug: bool,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Debug detail (only with `--debug`).
    Debug,
    /// Something was skipped or ignored.
    Warn,
    /// The command failed.
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Warn => "warning",
            Level::Error => "error",
        }
    }
}

/// Opens the log file (append). Only the first call has an effect.
pub fn init(path: &Path, format: LogFormat, debug: bool) -> std::io::Result<()> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let _ = LOGGER.set(Logger {
        file: Mutex::new(file),
        format,
        debug,
    });
    Ok(())
}

/// Writes one line to the log file, if there is one.
pub fn log(level: Level, msg: &str) {
    let Some(logger) = LOGGER.get() else {
        return;
    };
    if level == Level::Debug && !logger.debug {
        return;
    }
    let line = format_line(logger.format, level, msg, &rfc3339_now());
    if let Ok(mut file) = logger.file.lock() {
        // A failing log write must not fail the command itself.
        let _ = file.write_all(line.as_bytes());
    }
}

/// Logs at warning level (and to stderr when no log file is set).
pub fn warn(msg: &str) {
    if LOGGER.get().is_none() {
        eprintln!("plexvm-shim: warning: {msg}");
    }
    log(Level::Warn, msg);
}

fn format_line(format: LogFormat, level: Level, msg: &str, time: &str) -> String {
    match format {
        LogFormat::Json => {
            let obj = serde_json::json!({"level": level.as_str(), "msg": msg, "time": time});
            format!("{obj}\n")
        }
        LogFormat::Text => format!("{time} {} {msg}\n", level.as_str()),
    }
}

/// The current time as RFC 3339 in UTC with nanoseconds, the format of the
/// runtime-spec `created` field that runc writes.
pub fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs(), now.subsec_nanos())
}

/// Formats seconds since the epoch (UTC) as RFC 3339.
pub fn rfc3339(secs: u64, nanos: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(rfc3339(1_700_000_000, 0), "2023-11-14T22:13:20.000000000Z");
    }

    #[test]
    fn json_line_has_runc_shape() {
        let line = format_line(LogFormat::Json, Level::Error, "boom \"x\"", "t");
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "boom \"x\"");
        assert!(line.ends_with('\n'));
    }
}
