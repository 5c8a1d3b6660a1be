//! Local control socket (`<state_dir>/control.sock`): lets `petrestore jobs`
//! read and steer the journal while the daemon holds sled's exclusive lock.
//! One JSON request per line, one JSON answer per line:
//! `{"cmd":"list"}`, `{"cmd":"show","id":"…"}`, `{"cmd":"retry","id":"…"}`.
//! Only local users with access to the state directory can reach it, and no
//! command deletes anything.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::ingest::materialize::Materializer;
use crate::journal::Job;
use crate::pipeline::Pipeline;

/// A request on the control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    List,
    Show {
        id: String,
    },
    Retry {
        id: String,
    },
    /// Read the configuration file again (as SIGHUP does) and answer what
    /// changed, or why nothing was applied. `config`: the file the operator
    /// named, refused unless it is the one the daemon reads (a reload never
    /// switches files).
    Reload {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config: Option<std::path::PathBuf>,
    },
}

/// Why a reload naming `asked` would not read it: the daemon reads
/// `source` (or runs on built-in defaults). The same file reached by
/// another path (a link) is the same file.
fn other_file(asked: &std::path::Path, source: Option<&std::path::Path>) -> Option<String> {
    let same = |a: &std::path::Path, b: &std::path::Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    match source {
        Some(s) if same(asked, s) => None,
        Some(s) => Some(format!(
            "the daemon reads {}, not {}: edit that file and reload, or restart the daemon with --config {}",
            s.display(),
            asked.display(),
            asked.display()
        )),
        None => {
            Some(format!("the daemon runs on built-in defaults, not {}: restart it with --config {}", asked.display(), asked.display()))
        }
    }
}

/// The answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<Job>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// What a reload changed (its keys); empty when nothing did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
}

/// What does not change while the daemon runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StaticStatus {
    pub device_id: String,
    pub version: String,
    pub ae_title: String,
    pub listen: String,
    /// Every configured engine: in use or why not (explicit fallback).
    pub engines: Vec<crate::restore::EngineReport>,
}

/// `petrestore status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    #[serde(flatten)]
    pub fixed: StaticStatus,
    /// Non-terminal jobs per state.
    pub active: std::collections::BTreeMap<String, usize>,
    /// Instances acknowledged but still only in the arrival log.
    #[serde(default)]
    pub ingest_backlog: usize,
    /// Why ingest refuses new instances, if it does: until the spool takes
    /// instances again, when ingest resumes by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest_stalled: Option<String>,
    /// `online`, `paused` (no restoration starts) or `draining` (new
    /// associations refused), as the fleet's commands left it (both last
    /// until `resume` or a restart); `stopping` from the stop request
    /// until the process exits.
    #[serde(default)]
    pub state: String,
}

/// The node's state as operators see it (control socket, MQTT status and
/// health): a stop outranks a drain, a drain a pause.
pub fn node_state(stopping: bool, draining: bool, paused: bool) -> &'static str {
    if stopping {
        "stopping"
    } else if draining {
        "draining"
    } else if paused {
        "paused"
    } else {
        "online"
    }
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

fn answer(p: &Pipeline, fixed: &StaticStatus, ingest: &Materializer, modes: &Modes, req: Request) -> Response {
    let journal = &p.worker.journal;
    if let Request::Status = req {
        return match journal.active_jobs() {
            Ok(jobs) => {
                let mut active = std::collections::BTreeMap::new();
                for j in jobs {
                    *active.entry(j.state.name().to_string()).or_insert(0) += 1;
                }
                let state = node_state(
                    modes.stopping.load(Ordering::Relaxed) != 0,
                    modes.draining.load(Ordering::Relaxed),
                    p.paused.load(Ordering::Relaxed),
                );
                let status = Status {
                    fixed: fixed.clone(),
                    active,
                    ingest_backlog: ingest.backlog(),
                    ingest_stalled: ingest.failure(),
                    state: state.into(),
                };
                Response { ok: true, error: None, jobs: vec![], status: Some(status), changed: vec![] }
            }
            Err(e) => Response { ok: false, error: Some(e.to_string()), jobs: vec![], status: None, changed: vec![] },
        };
    }
    if let Request::Reload { config } = &req {
        if let Some(e) = config.as_deref().and_then(|c| other_file(c, p.worker.settings.get().source.as_deref())) {
            return Response { ok: false, error: Some(e), jobs: vec![], status: None, changed: vec![] };
        }
        return match p.worker.settings.reload() {
            Ok(changed) => {
                tracing::info!(?changed, "configuration reloaded (control socket)");
                p.wake.notify_one();
                Response { ok: true, error: None, jobs: vec![], status: None, changed: changed.into_iter().map(String::from).collect() }
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration not reloaded (control socket)");
                Response { ok: false, error: Some(e), jobs: vec![], status: None, changed: vec![] }
            }
        };
    }
    let r: Result<Vec<Job>, String> = match req {
        Request::Status | Request::Reload { .. } => unreachable!("answered above"),
        Request::List => journal.all_jobs().map_err(|e| e.to_string()),
        Request::Show { id } => match journal.get(&id) {
            Ok(Some(j)) => Ok(vec![j]),
            Ok(None) => Err(format!("no job {id}; `petrestore jobs list` shows the known jobs")),
            Err(e) => Err(e.to_string()),
        },
        Request::Retry { id } => p.retry(&id).map(|j| vec![j]),
    };
    match r {
        Ok(jobs) => Response { ok: true, error: None, jobs, status: None, changed: vec![] },
        Err(e) => Response { ok: false, error: Some(e), jobs: vec![], status: None, changed: vec![] },
    }
}

/// Bind the control socket (replacing a stale one left by a crash).
pub fn bind(state_dir: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(state_dir);
    if path.exists() {
        std::fs::remove_file(&path)?;
    }
    let l = UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// What the fleet's commands and a stop request set: shown in `state`.
#[derive(Clone, Default)]
pub struct Modes {
    /// New associations are refused (MQTT `drain`).
    pub draining: Arc<AtomicBool>,
    /// When the stop request came (ms since the epoch); 0 while running.
    pub stopping: Arc<std::sync::atomic::AtomicU64>,
}

/// Serve requests until `shutdown` (given after the stop's last journal
/// write, so a stop in progress answers `state: stopping`).
pub async fn serve(
    listener: UnixListener,
    pipeline: Arc<Pipeline>,
    fixed: StaticStatus,
    ingest: Arc<Materializer>,
    modes: Modes,
    shutdown: CancellationToken,
) {
    let fixed = Arc::new(fixed);
    let mut backoff = std::time::Duration::from_millis(10);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => { backoff = std::time::Duration::from_millis(10); s }
                Err(e) => {
                    // EMFILE and friends: wait and retry rather than spin (as ingest does)
                    tracing::warn!(error = %e, "control socket accept failed; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let p = pipeline.clone();
        let fixed = fixed.clone();
        let ingest = ingest.clone();
        let modes = modes.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut reader = BufReader::new(rd);
            loop {
                let line = match read_request(&mut reader).await {
                    Ok(Some(line)) => line,
                    Ok(None) => break,
                    Err(why) => {
                        let resp = Response { ok: false, error: Some(why), jobs: vec![], status: None, changed: vec![] };
                        let mut out = serde_json::to_vec(&resp).expect("responses serialize");
                        out.push(b'\n');
                        let _ = wr.write_all(&out).await;
                        break;
                    }
                };
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => {
                        let (p, f, i, m) = (p.clone(), fixed.clone(), ingest.clone(), modes.clone());
                        tokio::task::spawn_blocking(move || answer(&p, &f, &i, &m, req)).await.unwrap_or_else(|e| Response {
                            ok: false,
                            error: Some(e.to_string()),
                            jobs: vec![],
                            status: None,
                            changed: vec![],
                        })
                    }
                    Err(e) => Response { ok: false, error: Some(format!("bad request: {e}")), jobs: vec![], status: None, changed: vec![] },
                };
                let mut out = serde_json::to_vec(&resp).expect("responses serialize");
                out.push(b'\n');
                if wr.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// The longest request line: requests are a few dozen bytes.
const MAX_REQUEST: usize = 64 * 1024;
/// A connection that sends nothing for this long is closed.
const IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// One request line: `Ok(None)` at the end of the stream (or after `IDLE`
/// without a byte); an error for a line longer than `MAX_REQUEST` or not
/// UTF-8, which is answered and ends the connection, so a client cannot
/// make the daemon buffer without bound.
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Result<Option<String>, String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(IDLE, (&mut *reader).take(MAX_REQUEST as u64 + 1).read_until(b'\n', &mut buf)).await;
    match read {
        Err(_) | Ok(Err(_)) | Ok(Ok(0)) => return Ok(None),
        Ok(Ok(_)) => {}
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_REQUEST {
        return Err(format!("bad request: longer than {MAX_REQUEST} bytes"));
    }
    String::from_utf8(buf).map(Some).map_err(|_| "bad request: not UTF-8 (one JSON object per line expected)".to_string())
}

/// Client side: `Ok(None)` when no daemon is listening.
pub async fn request(state_dir: &Path, req: &Request) -> Result<Option<Response>, String> {
    let path = socket_path(state_dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(format!(
                "cannot reach the daemon at {}: {e}; the socket is its user's alone: run this as root or as that user \
                 (e.g. `sudo -u petrestore petrestore …`)",
                path.display()
            ));
        }
        Err(e) => return Err(format!("cannot reach the daemon at {}: {e}", path.display())),
    };
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_vec(req).expect("requests serialize");
    line.push(b'\n');
    wr.write_all(&line).await.map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(rd).lines();
    let resp = lines.next_line().await.map_err(|e| e.to_string())?.ok_or("daemon closed the control socket")?;
    serde_json::from_str(&resp).map(Some).map_err(|e| format!("bad answer from daemon: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_lines_are_bounded_and_checked() {
        let mut ok: &[u8] = b"{\"op\":\"list\"}\nrest";
        assert_eq!(read_request(&mut ok).await.unwrap().as_deref(), Some("{\"op\":\"list\"}"));
        let long = vec![b'x'; MAX_REQUEST + 10];
        let err = read_request(&mut &long[..]).await.unwrap_err();
        assert!(err.contains("longer than"), "{err}");
        let bad: &[u8] = b"\xff\xfe\n";
        assert!(read_request(&mut &bad[..]).await.unwrap_err().contains("not UTF-8"));
        let empty: &[u8] = b"";
        assert_eq!(read_request(&mut &empty[..]).await.unwrap(), None);
        // a last line without its newline is still a request
        let last: &[u8] = b"{}";
        assert_eq!(read_request(&mut &last[..]).await.unwrap().as_deref(), Some("{}"));
    }
}
