//! Logging: journald's native protocol when systemd connected stderr to the
//! journal, plain text on stderr otherwise.
//!
//! Under systemd every event becomes one journal entry whose fields are the
//! event's own (`JOB`, `STATE`, `ENGINE`, `CALLING`, `DESTINATION`, ...), so
//! `journalctl -u petrestore JOB=242c8cec60849ca1` finds a job's whole
//! story and `-o json` gives it to a log collector. The entry's MESSAGE
//! repeats the fields after the text (`delivered job=242c… destination=pacs`),
//! so the default `journalctl` view is as readable as the stderr log. Fields
//! carry identifiers only (job id, a hash of the series UID; AE titles;
//! destination names), never patient data.
//!
//! The native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL): one datagram per
//! entry to /run/systemd/journal/socket, `KEY=value\n` per field, or
//! `KEY\n<u64 LE length><bytes>\n` for values with a newline. Values are cut
//! at 16 KiB so an entry always fits one datagram.

use std::fmt;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// Where journald listens for native entries.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// Longest value sent (bytes); the rest is replaced by "…".
const MAX_VALUE: usize = 16 * 1024;

/// Fields the layer sets itself; an event field of the same name gets `F_`.
const RESERVED: &[&str] = &["MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "TARGET", "CODE_FILE", "CODE_LINE", "CODE_FUNC"];

/// Whether stderr is the journal stream systemd set up: JOURNAL_STREAM holds
/// `device:inode` of that stream, and it must be stderr's (a child whose
/// stderr was redirected inherits the variable but not the stream).
pub fn stderr_is_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").and_then(|v| v.to_str().map(|v| is_stream(v, 2))).unwrap_or(false)
}

/// Whether `stream` (`device:inode`) names the file open as `fd`.
fn is_stream(stream: &str, fd: i32) -> bool {
    let Some((dev, ino)) = stream.split_once(':') else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    // SAFETY: fstat into a zeroed stat buffer; a bad fd only returns -1.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// A `tracing` layer that writes native journal entries.
pub struct Journald {
    socket: UnixDatagram,
    identifier: String,
}

impl Journald {
    /// Connect to the system journal.
    pub fn connect() -> io::Result<Journald> {
        Self::connect_to(Path::new(JOURNAL_SOCKET))
    }

    /// Connect to a journal socket at `path` (tests).
    pub fn connect_to(path: &Path) -> io::Result<Journald> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(path)?;
        let identifier = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "petrestore".into());
        Ok(Journald { socket, identifier })
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for Journald {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let entry = encode(&fields, *meta.level(), meta.target(), meta.file(), meta.line(), &self.identifier);
        // Nowhere to report a failure to log; journald being away must not
        // stop the daemon.
        let _ = self.socket.send(&entry);
    }
}

/// An event's message and fields, in the order recorded.
#[derive(Default, Debug)]
pub struct Fields {
    pub message: String,
    pub fields: Vec<(String, String)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = value;
        } else {
            self.fields.push((field.name().to_string(), value));
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

/// A journal field name: ASCII upper-case letters, digits and `_`, not
/// starting with `_` (trusted fields) or a digit, at most 64 bytes.
pub fn field_name(name: &str) -> String {
    let mut out: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).take(64).collect();
    if out.is_empty() || out.starts_with(|c: char| c == '_' || c.is_ascii_digit()) || RESERVED.contains(&out.as_str()) {
        out = format!("F_{out}");
        out.truncate(64);
    }
    out
}

fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// One native-protocol entry.
pub fn encode(f: &Fields, level: Level, target: &str, file: Option<&str>, line: Option<u32>, identifier: &str) -> Vec<u8> {
    let mut message = f.message.clone();
    for (k, v) in &f.fields {
        if v.contains(char::is_whitespace) || v.is_empty() {
            message.push_str(&format!(" {k}={v:?}"));
        } else {
            message.push_str(&format!(" {k}={v}"));
        }
    }
    let mut buf = Vec::with_capacity(256 + message.len());
    put(&mut buf, "MESSAGE", &message);
    put(&mut buf, "PRIORITY", &priority(level).to_string());
    put(&mut buf, "SYSLOG_IDENTIFIER", identifier);
    put(&mut buf, "TARGET", target);
    if let Some(file) = file {
        put(&mut buf, "CODE_FILE", file);
    }
    if let Some(line) = line {
        put(&mut buf, "CODE_LINE", &line.to_string());
    }
    for (k, v) in &f.fields {
        put(&mut buf, &field_name(k), v);
    }
    buf
}

fn put(buf: &mut Vec<u8>, key: &str, value: &str) {
    let value = if value.len() > MAX_VALUE {
        let mut end = MAX_VALUE;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &value[..end])
    } else {
        value.to_string()
    };
    buf.extend_from_slice(key.as_bytes());
    if value.contains('\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
        buf.extend_from_slice(value.as_bytes());
    } else {
        buf.push(b'=');
        buf.extend_from_slice(value.as_bytes());
    }
    buf.push(b'\n');
}

/// Parse a native-protocol entry (tests, and anyone checking what is sent).
pub fn decode(mut b: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let nl = b.iter().position(|&c| c == b'\n').ok_or("field without newline")?;
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.push((String::from_utf8_lossy(&line[..eq]).into_owned(), String::from_utf8_lossy(&line[eq + 1..]).into_owned()));
            b = &b[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &b[nl + 1..];
            let len = u64::from_le_bytes(rest.get(..8).ok_or("short length")?.try_into().map_err(|_| "length")?) as usize;
            let value = rest.get(8..8 + len).ok_or("short value")?;
            out.push((key, String::from_utf8_lossy(value).into_owned()));
            if rest.get(8 + len) != Some(&b'\n') {
                return Err("binary field not closed by a newline".into());
            }
            b = &rest[9 + len..];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    #[test]
    fn field_names_follow_the_journal_rules() {
        assert_eq!(field_name("job"), "JOB");
        assert_eq!(field_name("calling.ae"), "CALLING_AE");
        assert_eq!(field_name("_secret"), "F__SECRET");
        assert_eq!(field_name("1st"), "F_1ST");
        assert_eq!(field_name("message_id"), "MESSAGE_ID");
        assert_eq!(field_name("priority"), "F_PRIORITY");
        assert_eq!(field_name(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn an_event_becomes_one_entry_with_its_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let journal = UnixDatagram::bind(&path).unwrap();
        let layer = Journald::connect_to(&path).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(job = "242c8cec60849ca1", destination = %"pacs one", attempt = 2, "delivery failed");
            tracing::info!(error = "line one\nline two", "two lines");
        });
        let mut buf = vec![0u8; 65536];
        let n = journal.recv(&mut buf).unwrap();
        let e = decode(&buf[..n]).unwrap();
        let get = |k: &str| e.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("MESSAGE"), Some("delivery failed job=242c8cec60849ca1 destination=\"pacs one\" attempt=2"));
        assert_eq!(get("PRIORITY"), Some("4"));
        assert_eq!(get("JOB"), Some("242c8cec60849ca1"));
        assert_eq!(get("DESTINATION"), Some("pacs one"));
        assert_eq!(get("ATTEMPT"), Some("2"));
        assert!(get("CODE_FILE").is_some_and(|f| f.ends_with("logging.rs")));
        let n = journal.recv(&mut buf).unwrap();
        let e = decode(&buf[..n]).unwrap();
        assert!(e.contains(&("ERROR".to_string(), "line one\nline two".to_string())), "{e:?}");
        assert_eq!(e.iter().find(|(k, _)| k == "PRIORITY").unwrap().1, "6");
    }

    #[test]
    fn long_values_are_cut_to_fit_one_datagram() {
        let f = Fields { message: "x".repeat(100_000), fields: vec![] };
        let e = encode(&f, Level::INFO, "t", None, None, "petrestore");
        assert!(e.len() < 20_000);
        let d = decode(&e).unwrap();
        assert!(d[0].1.ends_with('…'));
    }

    #[test]
    fn the_journal_stream_must_be_the_file_itself() {
        use std::os::unix::fs::MetadataExt;
        use std::os::unix::io::AsRawFd;
        let f = tempfile::tempfile().unwrap();
        let m = f.metadata().unwrap();
        assert!(is_stream(&format!("{}:{}", m.dev(), m.ino()), f.as_raw_fd()));
        assert!(!is_stream(&format!("{}:{}", m.dev(), m.ino() + 1), f.as_raw_fd()));
        assert!(!is_stream("garbage", f.as_raw_fd()));
    }
}
