//! Tracing setup: `log.format` text or JSON, `log.level` as an `EnvFilter` (overridden by
//! `RUST_LOG`). Access-log lines use the target `access`.
//!
//! Lines are written to stderr by a background thread (`tracing-appender`'s non-blocking
//! writer), so a slow or blocked stderr (a full pipe, a stalled log collector) never blocks
//! a runtime thread in the middle of a request. When more than [`BUFFERED_LINES`] lines are
//! waiting, new lines are dropped rather than stall the proxy; the count is reported when
//! the [`LogGuard`] drops at exit.

use std::io::IsTerminal;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Lines that may wait for the writer thread before new ones are dropped.
pub const BUFFERED_LINES: usize = 128 * 1024;

/// Keeps the log writer thread alive; dropping it flushes the queued lines.
pub struct LogGuard {
    _worker: WorkerGuard,
    dropped: ErrorCounter,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let dropped = self.dropped.dropped_lines();
        if dropped > 0 {
            eprintln!("{dropped} log lines were dropped: stderr could not keep up");
        }
    }
}

/// Installs the global subscriber; keep the returned guard until exit. A second call
/// (tests) installs nothing.
pub fn init(config: &LogConfig) -> LogGuard {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(&config.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    LogGuard {
        _worker: worker,
        dropped,
    }
}
