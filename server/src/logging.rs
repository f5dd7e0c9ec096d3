//! tracing setup: text or JSON lines on stderr, level from `RUST_LOG` or the config.

use std::io::{self, Write};

use tracing_subscriber::{fmt, EnvFilter};

use ferry_server::config::LogFormat;

pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(|| OneLine(io::stderr()))
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Writes each event on one line: a value that holds line breaks (an engine's error text, a
/// process's output) has them written as `\n`, so every line of the log is an event that
/// `grep` and log shippers see whole. The formatter hands over each event in one write.
struct OneLine<W>(W);

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        if !body.contains(&b'\n') {
            return self.0.write(buf);
        }
        let mut line = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => line.extend_from_slice(b"\\n"),
                b'\r' => line.extend_from_slice(b"\\r"),
                _ => line.push(b),
            }
        }
        line.extend_from_slice(&buf[body.len()..]);
        self.0.write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_with_line_breaks_in_its_values_is_one_line() {
        let mut out = OneLine(Vec::new());
        out.write_all(b"WARN pull failed error=denied:\nrate limit\r\n reached\n")
            .unwrap();
        out.write_all(b"INFO served\n").unwrap();
        assert_eq!(
            String::from_utf8(out.0).unwrap(),
            "WARN pull failed error=denied:\\nrate limit\\r\\n reached\nINFO served\n"
        );
    }
}
