//! Logging that never blocks the daemon.
//!
//! Log lines go to stderr through `tracing-appender`'s non-blocking writer: a bounded
//! queue drained by a thread of its own. When stderr stops draining (a stalled pipe, a
//! full journal), the queue fills and further lines are dropped and counted
//! (`mailcall_log_lines_dropped_total`) instead of stopping SMTP and calls. The queue is
//! bounded in lines and every line is capped in bytes, so it is bounded in bytes too.

use std::io::{IsTerminal, Write};

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;

/// The longest log line written; longer ones are cut and marked.
pub const MAX_LINE: usize = 8 * 1024;
/// Lines waiting for stderr, at most (so at most 16 MiB).
pub const MAX_QUEUED_LINES: usize = 2048;

/// Keeps the log thread. Dropping it flushes what is queued, waiting at most a second:
/// `tracing-appender`'s own flush can block for good when the log pipe is stalled (it
/// then prints to stdout, which under systemd is the same stalled journal stream), so
/// it runs on a thread of its own and is abandoned when it does not come back.
#[derive(Debug)]
pub struct Logs {
    guard: Option<WorkerGuard>,
    /// Lines dropped so far because stderr did not keep up.
    pub dropped: ErrorCounter,
}

impl Drop for Logs {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        let (done, flushed) = std::sync::mpsc::channel();
        let flushing = std::thread::Builder::new()
            .name("mailcall-log-flush".into())
            .spawn(move || {
                drop(guard);
                let _ = done.send(());
            });
        if flushing.is_ok() {
            let _ = flushed.recv_timeout(std::time::Duration::from_secs(1));
        }
    }
}

/// Sets up the global subscriber: the level from `RUST_LOG` (default `info`), human or
/// JSON lines on stderr.
pub fn init(json: bool) -> Logs {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(MAX_QUEUED_LINES)
        .thread_name("mailcall-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Capped(writer))
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    Logs {
        guard: Some(guard),
        dropped,
    }
}

/// Makes writers that cap each line at [`MAX_LINE`] bytes.
struct Capped<W>(W);

impl<'a> MakeWriter<'a> for Capped<NonBlocking> {
    type Writer = CappedLine<NonBlocking>;

    fn make_writer(&'a self) -> Self::Writer {
        CappedLine(self.0.clone())
    }
}

/// A writer that passes each write (one formatted line) on, cut to [`MAX_LINE`].
struct CappedLine<W>(W);

impl<W: Write> Write for CappedLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() <= MAX_LINE {
            return self.0.write(buf);
        }
        const MARK: &[u8] = b"... [line cut]\n";
        let mut line = Vec::with_capacity(MAX_LINE);
        line.extend_from_slice(&buf[..MAX_LINE - MARK.len()]);
        line.extend_from_slice(MARK);
        self.0.write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_cut_and_marked_short_ones_pass() {
        let mut out = CappedLine(Vec::new());
        assert_eq!(out.write(b"short\n").unwrap(), 6);
        let long = vec![b'x'; MAX_LINE * 3];
        assert_eq!(out.write(&long).unwrap(), long.len());
        assert_eq!(out.0.len(), 6 + MAX_LINE);
        assert!(out.0.ends_with(b"... [line cut]\n"));
    }
}
