//! Request text in logs. Names, IDs and paths come from clients and reach the log before (or
//! without) validation; written raw, a `\n` in a name forges a log line, a NUL corrupts the
//! file, and a 10 000-character name makes 10 KB lines. Two defences:
//!
//! - [`text`] wraps a request field for a span or event: control characters are escaped
//!   (`\n`, `\0`, `\u{1b}`...) and the text is cut at [`FIELD_MAX`] characters, saying how much
//!   was cut;
//! - [`Stderr`] is the log writer: whatever a field holds (an error message quoting a path, a
//!   path with a newline), one event stays one line, with control characters escaped, and no
//!   line exceeds [`LINE_MAX`] bytes.

use std::fmt;
use std::io::{self, Write};

/// The most characters of one request field a log line carries.
pub const FIELD_MAX: usize = 256;
/// The longest log line, in bytes.
pub const LINE_MAX: usize = 16 * 1024;

/// A request field, made safe for a log line (see the module doc).
pub struct Text<'a>(&'a str);

pub fn text(s: &str) -> Text<'_> {
    Text(s)
}

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.char_indices();
        for (n, (_, c)) in chars.by_ref().enumerate() {
            if n == FIELD_MAX {
                let rest =
                    self.0.len() - self.0.char_indices().nth(FIELD_MAX).map_or(0, |(i, _)| i);
                return write!(f, "…(+{rest} bytes)");
            }
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_str(c.encode_utf8(&mut [0; 4]))?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Escape one formatted event so it is exactly one line: every control byte but its final
/// newline (and tabs, and escape sequences when colouring a terminal) is written as `\n`,
/// `\r`, `\0` or `\xNN`; a line longer than [`LINE_MAX`] is cut.
pub fn one_line(event: &[u8], ansi: bool) -> Vec<u8> {
    let body = event.strip_suffix(b"\n").unwrap_or(event);
    let mut out = Vec::with_capacity(body.len().min(LINE_MAX) + 32);
    for (i, &b) in body.iter().enumerate() {
        if out.len() >= LINE_MAX {
            let _ = write!(out, "…(+{} bytes)", body.len() - i);
            break;
        }
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0 => out.extend_from_slice(b"\\0"),
            b'\t' => out.push(b),
            0x1b if ansi => out.push(b),
            b if b < 0x20 || b == 0x7f => {
                let _ = write!(out, "\\x{b:02x}");
            }
            b => out.push(b),
        }
    }
    out.push(b'\n');
    out
}

/// The log writer: each event is collected, made [`one_line`], and written to stderr whole.
#[derive(Clone, Copy)]
pub struct Stderr {
    pub ansi: bool,
}

pub struct EventWriter {
    buf: Vec<u8>,
    ansi: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            buf: Vec::new(),
            ansi: self.ansi,
        }
    }
}

impl Write for EventWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            let _ = io::stderr()
                .lock()
                .write_all(&one_line(&self.buf, self.ansi));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_escaped_and_capped() {
        assert_eq!(text("plain-name.1").to_string(), "plain-name.1");
        assert_eq!(
            text("a\nb\0c\u{1b}[31m").to_string(),
            "a\\nb\\u{0}c\\u{1b}[31m"
        );
        let long = "x".repeat(10_000);
        let shown = text(&long).to_string();
        assert!(shown.starts_with(&"x".repeat(FIELD_MAX)), "{shown}");
        assert!(shown.ends_with("…(+9744 bytes)"), "{shown}");
        assert_eq!(text("☃").to_string(), "☃");
    }

    #[test]
    fn an_event_stays_one_line() {
        assert_eq!(
            one_line(b"a\nforged line\r\0\x07\n", false),
            b"a\\nforged line\\r\\0\\x07\n"
        );
        assert_eq!(
            one_line(b"\x1b[1mbold\x1b[0m\n", true),
            b"\x1b[1mbold\x1b[0m\n"
        );
        assert_eq!(one_line(b"\x1b[1m\n", false), b"\\x1b[1m\n");
        let long = vec![b'y'; 3 * LINE_MAX];
        let l = one_line(&long, false);
        assert!(l.len() < LINE_MAX + 64 && l.ends_with(b"bytes)\n"));
    }
}
