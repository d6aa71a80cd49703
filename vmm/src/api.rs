//! The control API: line-delimited JSON over a unix socket.
//!
//! Request: `{"command": "status"}` (or `pause`, `resume`, `shutdown`,
//! `dirty-start` with `"source": "kvm-bitmap"`, `dirty-harvest` (with an
//! optional `"expect": PATH` of frames that must be in the harvest),
//! `dirty-stop`, `dirty-stats`, `migrate`, `migrate-status`,
//! `migrate-cancel`, `snapshot`, `memory-digest`). Response: `{"ok": true,
//! "result": ...}` or `{"ok": false, "error": "..."}`. One request per
//! line; a connection may send several. `ApiLimits` bounds a line's
//! length, the connections open at once and how long a connection may
//! stay idle.
//!
//! `migrate` starts the migration on its own thread and answers at once;
//! `migrate-status` shows its state (`running`, `completed`, `failed`,
//! `cancelled`), the last progress, and the report or the error;
//! `migrate-cancel` stops it before the commit with the VM running here.
//! After a completed migration the VMM exits once the status was read
//! (or after `COMPLETED_LINGER`). `ldt-vmm migrate` is this, polled.
//!
//! Whoever may connect to the socket controls the VM and, through
//! `snapshot --to`, writes any file this process may write: the socket is
//! created 0600 (see `unix_socket`), and is as sensitive as the VMM's user.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::dirty::DirtySourceKind;
use crate::migration::digest::memory_digest;
use crate::migration::report::Progress;
use crate::migration::snapshot::{self, SnapshotOptions};
use crate::migration::source::{self, MigrateOptions};
use crate::migration::MigrationError;
use crate::runner::RunState;
use crate::runner::VmControl;

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    Shutdown,
    DirtyStart {
        source: DirtySourceKind,
    },
    /// One round; with `expect`, a file of `FIRST_FRAME COUNT` lines (the
    /// frame in hex or decimal) whose pages must all be in it: the answer
    /// says how many are not (a benchmark's ground truth).
    DirtyHarvest {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect: Option<PathBuf>,
    },
    DirtyStop,
    DirtyStats,
    /// Start a live migration in the background (see `MigrateStatus`); on
    /// success the source VMM exits.
    Migrate(MigrateOptions),
    /// State, progress and outcome of the migration started last.
    MigrateStatus,
    /// Stop the running migration; the VM keeps running here.
    MigrateCancel,
    /// Write a full snapshot, or a diff against `base`.
    Snapshot(SnapshotOptions),
    /// SHA-256 of all guest memory, taken with the vCPUs paused.
    MemoryDigest,
}

/// A response on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn ok(result: Value) -> Self {
        Response {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    fn err(e: impl ToString) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(e.to_string()),
        }
    }
}

/// Largest `expect` file `dirty-harvest` reads (a frame list, not data).
const MAX_EXPECT_BYTES: u64 = 16 << 20;

/// The frames of an `expect` file: `FIRST COUNT` lines, FIRST in hex
/// (`0x`) or decimal; blank lines and `#` comments skipped.
fn read_expected_frames(path: &Path) -> Result<Vec<u64>, String> {
    let what = |e: &dyn std::fmt::Display| format!("expect file {}: {e}", path.display());
    let len = std::fs::metadata(path).map_err(|e| what(&e))?.len();
    if len > MAX_EXPECT_BYTES {
        return Err(what(&format!("{len} bytes, more than {MAX_EXPECT_BYTES}")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| what(&e))?;
    parse_expected_frames(&text).map_err(|e| what(&e))
}

fn parse_expected_frames(text: &str) -> Result<Vec<u64>, String> {
    let number = |w: &str| match w.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => w.parse(),
    };
    let mut frames = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = || format!("line {}: want FIRST_FRAME COUNT, got {line:?}", n + 1);
        let mut w = line.split_whitespace();
        let (Some(first), Some(count), None) = (w.next(), w.next(), w.next()) else {
            return Err(bad());
        };
        let (first, count) = (
            number(first).map_err(|_| bad())?,
            number(count).map_err(|_| bad())?,
        );
        // Frames past 2^40 (addresses past 2^52) are no x86 physical memory.
        if first.checked_add(count).is_none_or(|end| end > 1 << 40) {
            return Err(bad());
        }
        frames.extend(first..first + count);
    }
    Ok(frames)
}

/// Parses one request line.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
}

/// Carries out `req` on the VM.
pub fn handle(req: &Request, ctl: &VmControl) -> Response {
    match req {
        Request::Status => {
            let d = ctl.dirty.lock().unwrap();
            Response::ok(json!({
                "state": ctl.state(),
                "vcpus": ctl.vcpu_count,
                "mem_mib": ctl.vm.mem_size() >> 20,
                "mem_backing": ctl.vm.backing,
                "uptime_s": ctl.started.elapsed().as_secs_f64(),
                "dirty_source": d.source.as_ref().map(|s| s.kind()),
            }))
        }
        Request::Pause => Response::ok(json!({ "state": ctl.operator_pause() })),
        // Also the operator's answer to a migration whose outcome is unknown.
        Request::Resume => Response::ok(json!({ "state": ctl.operator_resume() })),
        // The connection handler stops the VM once this answer is sent.
        Request::Shutdown => Response::ok(json!({ "state": "stopping" })),
        Request::DirtyStart { source } => match ctl.dirty_start(*source) {
            Ok(()) => Response::ok(json!({ "source": source })),
            Err(e) => Response::err(e),
        },
        Request::DirtyHarvest { expect } => {
            // Read first: a bad file must not cost a round.
            let expected = match expect.as_deref().map(read_expected_frames).transpose() {
                Ok(e) => e,
                Err(e) => return Response::err(e),
            };
            let t0 = Instant::now();
            match ctl.dirty_harvest() {
                Ok(b) => {
                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                    let mut r = json!({ "pages": b.count(), "ranges": b.ranges().len(), "ms": ms });
                    if let Some(frames) = expected {
                        let missed: Vec<u64> = frames
                            .iter()
                            .map(|f| f << 12)
                            .filter(|gpa| !b.is_dirty(*gpa))
                            .collect();
                        r["expected"] = json!(frames.len());
                        r["missed"] = json!(missed.len());
                        r["first_missed"] = json!(missed.first().map(|g| format!("{g:#x}")));
                    }
                    Response::ok(r)
                }
                Err(e) => Response::err(e),
            }
        }
        Request::DirtyStop => match ctl.dirty_stop() {
            Ok(()) => Response::ok(json!({})),
            Err(e) => Response::err(e),
        },
        Request::Migrate(_) | Request::MigrateStatus | Request::MigrateCancel => {
            Response::err("migrations are served by the API server")
        }
        Request::Snapshot(opts) => match snapshot::take(ctl, opts) {
            Ok(r) => Response::ok(serde_json::to_value(r).expect("report serializes")),
            Err(e) => Response::err(format!("snapshot failed, the VM is as it was: {e}")),
        },
        Request::MemoryDigest => {
            let was_running = ctl.state() == RunState::Running;
            if ctl.pause() != RunState::Paused {
                return Response::err("the VM is stopping");
            }
            let d = memory_digest(&ctl.vm);
            if was_running {
                ctl.resume();
            }
            match d {
                Ok(d) => Response::ok(json!({ "digest": d })),
                Err(e) => Response::err(e),
            }
        }
        Request::DirtyStats => {
            let d = ctl.dirty.lock().unwrap();
            Response::ok(json!({
                "source": d.source.as_ref().map(|s| s.kind()),
                "rounds": d.rounds,
                "pages_total": d.pages_total,
                "last_round_pages": d.last_round_pages,
                "ring_entries_total": ctl.ring.as_ref().map(|r| r.entries_total()),
            }))
        }
    }
}

fn send_line<T: Serialize>(out: &mut UnixStream, value: &T) -> std::io::Result<()> {
    let mut text = serde_json::to_string(value).expect("API messages serialize");
    text.push('\n');
    out.write_all(text.as_bytes())
}

/// How long a completed migration's source waits for its status to be read
/// before the VMM exits.
pub const COMPLETED_LINGER: Duration = Duration::from_secs(10);

/// Where a migration started through the API is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    Running,
    Completed,
    Failed,
    Cancelled,
}

/// What `migrate-status` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub state: MigrationState,
    pub elapsed_ms: f64,
    pub progress: Option<Progress>,
    /// The report, once completed.
    pub report: Option<Value>,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
}

/// A migration running on its own thread.
struct MigrationJob {
    status: Mutex<(MigrationStatus, bool)>,
    /// Signalled when the final status has been read.
    read: Condvar,
    cancel: AtomicBool,
    started: std::time::Instant,
}

impl MigrationJob {
    fn new(state: MigrationState) -> Self {
        MigrationJob {
            status: Mutex::new((
                MigrationStatus {
                    state,
                    elapsed_ms: 0.0,
                    progress: None,
                    report: None,
                    error: None,
                },
                false,
            )),
            read: Condvar::new(),
            cancel: AtomicBool::new(false),
            started: std::time::Instant::now(),
        }
    }
}

/// The API server's migrations: the last one started.
#[derive(Default)]
struct Jobs {
    current: Mutex<Option<Arc<MigrationJob>>>,
}

/// The line a failed migration reports.
fn migration_error(e: &MigrationError, ctl: &VmControl) -> String {
    match e {
        MigrationError::OutcomeUnknown(_) => format!("migration failed: {e}"),
        MigrationError::Cancelled => format!("migration {e}, the VM keeps running here"),
        _ if ctl.held() => {
            format!("migration failed, the VM stays here, paused by the operator: {e}")
        }
        _ => format!("migration failed, the VM keeps running here: {e}"),
    }
}

impl Jobs {
    /// Starts a migration thread, unless one is running.
    fn start(&self, opts: MigrateOptions, ctl: Arc<VmControl>) -> Response {
        let mut current = self.current.lock().unwrap();
        if let Some(j) = current.as_ref() {
            if j.status.lock().unwrap().0.state == MigrationState::Running {
                return Response::err("a migration is already in progress");
            }
        }
        let job = Arc::new(MigrationJob::new(MigrationState::Running));
        let j = job.clone();
        let spawned = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || run_job(&j, &opts, &ctl));
        match spawned {
            Ok(_) => {
                *current = Some(job);
                Response::ok(json!({ "state": MigrationState::Running }))
            }
            Err(e) => Response::err(format!("cannot start the migration thread: {e}")),
        }
    }

    /// The current status, and the job if that status is final: the caller
    /// passes it to `final_status_sent` once the answer is on the socket.
    fn status(&self) -> (Response, Option<Arc<MigrationJob>>) {
        let current = self.current.lock().unwrap();
        let Some(job) = current.as_ref() else {
            return (Response::err("no migration was started"), None);
        };
        let mut st = job.status.lock().unwrap();
        st.0.elapsed_ms = job.started.elapsed().as_secs_f64() * 1e3;
        let done = (st.0.state != MigrationState::Running).then(|| job.clone());
        let resp = Response::ok(serde_json::to_value(&st.0).expect("status serializes"));
        (resp, done)
    }

    /// A final status has been written to a client: a completed source may
    /// now end (not before, or the process could exit before the answer
    /// leaves, and `migrate` would report a successful migration as lost).
    fn final_status_sent(job: &MigrationJob) {
        job.status.lock().unwrap().1 = true;
        job.read.notify_all();
    }

    fn cancel(&self) -> Response {
        let current = self.current.lock().unwrap();
        match current.as_ref() {
            Some(job) if job.status.lock().unwrap().0.state == MigrationState::Running => {
                job.cancel.store(true, Ordering::Relaxed);
                Response::ok(json!({ "state": "cancelling" }))
            }
            _ => Response::err("no migration in progress"),
        }
    }
}

/// What one client may hold of the server: a request line is at most
/// `max_line` bytes, at most `max_connections` are open at once, and a
/// connection that sends no complete request for `idle` is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    pub max_line: usize,
    pub max_connections: usize,
    pub idle: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            // The largest request (migrate, snapshot) is a few hundred bytes.
            max_line: 64 << 10,
            max_connections: 16,
            idle: Duration::from_secs(60),
        }
    }
}

fn run_job(job: &MigrationJob, opts: &MigrateOptions, ctl: &VmControl) {
    let mut progress = |p: &Progress| job.status.lock().unwrap().0.progress = Some(p.clone());
    let result = source::migrate_cancellable(ctl, opts, &mut progress, &job.cancel);
    let mut st = job.status.lock().unwrap();
    match &result {
        Ok(report) => {
            st.0.state = MigrationState::Completed;
            st.0.report = Some(serde_json::to_value(report).expect("report serializes"));
        }
        Err(e) => {
            st.0.state = match e {
                MigrationError::Cancelled => MigrationState::Cancelled,
                _ => MigrationState::Failed,
            };
            st.0.error = Some(migration_error(e, ctl));
        }
    }
    if result.is_ok() {
        // The VM now runs on the destination: end here once the operator
        // (or `ldt-vmm migrate`) has read the outcome.
        let (st, _) = job
            .read
            .wait_timeout_while(st, COMPLETED_LINGER, |s| !s.1)
            .unwrap();
        drop(st);
        ctl.stop(0);
    }
}

/// Why a request line could not be read.
#[derive(Debug, thiserror::Error)]
enum LineError {
    #[error("request line longer than {0} bytes: closing the connection")]
    TooLong(usize),
    #[error("no request within {0:?}: closing the connection")]
    Idle(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads request lines of at most `limits.max_line` bytes, each within
/// `limits.idle` of the previous one (however slowly its bytes trickle in).
struct LineReader {
    stream: UnixStream,
    buf: Vec<u8>,
    limits: ApiLimits,
}

impl LineReader {
    /// The next line without its newline; `None` at end of stream.
    fn next_line(&mut self) -> Result<Option<String>, LineError> {
        let deadline = Instant::now() + self.limits.idle;
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).take(i).collect();
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            if self.buf.len() > self.limits.max_line {
                return Err(LineError::TooLong(self.limits.max_line));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LineError::Idle(self.limits.idle));
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Ends a connection refused mid-request (its slot already free) so
    /// that the client reads the answer and then end of stream. A unix
    /// socket closed with unread data makes the peer's next read fail with
    /// ECONNRESET, even after the answer (the error comes before end of
    /// stream): so say end of stream first, then take what the client
    /// still sends (at most 1 s, and until 100 ms pass without any).
    fn close_after_answer(&mut self, out: &UnixStream) {
        let _ = out.shutdown(std::net::Shutdown::Write);
        let until = Instant::now() + Duration::from_secs(1);
        let _ = self
            .stream
            .set_read_timeout(Some(Duration::from_millis(100)));
        let mut sink = [0u8; 65536];
        while Instant::now() < until {
            match self.stream.read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

/// Serves requests until the client ends the connection; a connection
/// refused mid-request (a line too long, idle) comes back to be closed
/// with `close_after_answer`.
fn serve_connection(
    stream: UnixStream,
    ctl: &Arc<VmControl>,
    jobs: &Jobs,
    limits: ApiLimits,
) -> Option<(LineReader, UnixStream)> {
    let mut out = stream.try_clone().ok()?;
    // A client that stops reading cannot hold this thread forever either.
    let _ = out.set_write_timeout(Some(limits.idle));
    let mut lines = LineReader {
        stream,
        buf: Vec::new(),
        limits,
    };
    loop {
        let line = match lines.next_line() {
            Ok(Some(line)) => line,
            Ok(None) | Err(LineError::Io(_)) => return None,
            Err(e) => {
                let _ = send_line(&mut out, &Response::err(e));
                return Some((lines, out));
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let mut final_status = None;
        let resp = match parse_request(&line) {
            Ok(Request::Migrate(opts)) => jobs.start(opts, ctl.clone()),
            Ok(Request::MigrateStatus) => {
                let (resp, job) = jobs.status();
                final_status = job;
                resp
            }
            Ok(Request::MigrateCancel) => jobs.cancel(),
            Ok(Request::Shutdown) => {
                // Answer first: the process exits soon after the stop.
                let _ = send_line(&mut out, &handle(&Request::Shutdown, ctl));
                ctl.stop(0);
                continue;
            }
            Ok(req) => handle(&req, ctl),
            Err(e) => Response::err(e),
        };
        if send_line(&mut out, &resp).is_err() {
            return None;
        }
        if let Some(job) = final_status {
            Jobs::final_status_sent(&job);
        }
    }
}

/// The listening socket; removes its path when dropped.
pub struct ApiServer {
    path: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves the API on `path` from a background thread, with the default
/// limits.
pub fn serve(path: &Path, ctl: Arc<VmControl>) -> std::io::Result<ApiServer> {
    serve_with(path, ctl, ApiLimits::default())
}

/// Counts a connection while it is open.
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves the API on `path` from a background thread.
pub fn serve_with(
    path: &Path,
    ctl: Arc<VmControl>,
    limits: ApiLimits,
) -> std::io::Result<ApiServer> {
    let listener = crate::unix_socket::bind_private(path)?;
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            let jobs = Arc::new(Jobs::default());
            for mut conn in listener.incoming().flatten() {
                if open.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
                    open.fetch_sub(1, Ordering::SeqCst);
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = send_line(
                        &mut conn,
                        &Response::err(format!(
                            "too many API connections (at most {}): try again later",
                            limits.max_connections
                        )),
                    );
                    continue;
                }
                let slot = ConnectionSlot(open.clone());
                let c = ctl.clone();
                let j = jobs.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || {
                        // The slot is released before the peer can see the
                        // connection close (`last` keeps the socket open
                        // until then), so a client that saw EOF may connect
                        // again at once and count on a free slot.
                        let last = conn.try_clone();
                        let slot = slot;
                        let refused = serve_connection(conn, &c, &j, limits);
                        drop(slot);
                        if let Some((mut lines, out)) = refused {
                            lines.close_after_answer(&out);
                        }
                        drop(last);
                    });
            }
        })?;
    Ok(ApiServer {
        path: path.to_path_buf(),
    })
}

/// Sends one request and returns the response (the client side); lines
/// before it (migration progress) go to `on_progress`.
pub fn call_with_progress(
    path: &Path,
    req: &Request,
    on_progress: &mut dyn FnMut(&Value),
) -> anyhow::Result<Response> {
    let mut stream = UnixStream::connect(path)
        .map_err(|e| anyhow::anyhow!("cannot connect to the API socket {}: {e}", path.display()))?;
    let mut text = serde_json::to_string(req)?;
    text.push('\n');
    stream.write_all(text.as_bytes())?;
    let mut lines = BufReader::new(stream).lines();
    loop {
        let Some(line) = lines.next() else {
            anyhow::bail!("the VMM closed the API connection without answering");
        };
        let v: Value = serde_json::from_str(&line?)?;
        match v.get("progress") {
            Some(p) => on_progress(p),
            None => return Ok(serde_json::from_value(v)?),
        }
    }
}

/// `migrate`, synchronously: starts it, polls `migrate-status` every
/// `POLL`, hands each new progress to `on_progress`, and returns the
/// outcome as one response (the report on success).
pub fn migrate_and_wait(
    path: &Path,
    opts: &MigrateOptions,
    on_progress: &mut dyn FnMut(&Progress),
) -> anyhow::Result<Response> {
    const POLL: Duration = Duration::from_millis(50);
    let started = call(path, &Request::Migrate(opts.clone()))?;
    if !started.ok {
        return Ok(started);
    }
    let mut last_round = None;
    loop {
        std::thread::sleep(POLL);
        let resp = call(path, &Request::MigrateStatus)?;
        let status: MigrationStatus = match (resp.ok, resp.result) {
            (true, Some(v)) => serde_json::from_value(v)?,
            _ => anyhow::bail!("migrate-status: {}", resp.error.unwrap_or_default()),
        };
        if let Some(p) = &status.progress {
            if last_round != Some(p.round) {
                last_round = Some(p.round);
                on_progress(p);
            }
        }
        match status.state {
            MigrationState::Running => {}
            MigrationState::Completed => {
                return Ok(Response::ok(status.report.unwrap_or_default()))
            }
            _ => return Ok(Response::err(status.error.unwrap_or_default())),
        }
    }
}

/// Sends one request and returns the response (the client side).
pub fn call(path: &Path, req: &Request) -> anyhow::Result<Response> {
    call_with_progress(path, req, &mut |_| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_final_status_counts_as_read_only_once_it_was_sent() {
        let jobs = Jobs::default();
        let job = Arc::new(MigrationJob::new(MigrationState::Completed));
        *jobs.current.lock().unwrap() = Some(job.clone());
        let (resp, done) = jobs.status();
        assert!(resp.ok);
        // Answered but not yet written: the source must not end yet.
        assert!(!job.status.lock().unwrap().1);
        let done = done.expect("a completed migration's status is final");
        Jobs::final_status_sent(&done);
        assert!(job.status.lock().unwrap().1);
    }

    #[test]
    fn a_running_status_is_not_final() {
        let jobs = Jobs::default();
        *jobs.current.lock().unwrap() = Some(Arc::new(MigrationJob::new(MigrationState::Running)));
        assert!(jobs.status().1.is_none());
    }

    #[test]
    fn a_harvest_takes_an_optional_frame_list() {
        assert_eq!(
            parse_request(r#"{"command":"dirty-harvest"}"#).unwrap(),
            Request::DirtyHarvest { expect: None }
        );
        assert_eq!(
            parse_request(r#"{"command":"dirty-harvest","expect":"/tmp/f"}"#).unwrap(),
            Request::DirtyHarvest {
                expect: Some("/tmp/f".into())
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::DirtyHarvest { expect: None }).unwrap(),
            r#"{"command":"dirty-harvest"}"#
        );
    }

    #[test]
    fn frame_lists_parse_and_bad_ones_say_where() {
        assert_eq!(
            parse_expected_frames("# frames\n0x10 3\n\n  200 1  # one\n").unwrap(),
            vec![0x10, 0x11, 0x12, 200]
        );
        assert_eq!(parse_expected_frames("").unwrap(), Vec::<u64>::new());
        for bad in [
            "0x10",
            "0x10 2 3",
            "zz 1",
            "0x10 -1",
            "0xffffffffff 2",
            "1 18446744073709551615",
        ] {
            let e = parse_expected_frames(&format!("5 1\n{bad}\n")).unwrap_err();
            assert!(e.starts_with("line 2: "), "{bad}: {e}");
        }
        let dir = std::env::temp_dir().join(format!("ldt-expect-{}", std::process::id()));
        assert!(read_expected_frames(&dir)
            .unwrap_err()
            .contains("expect file"));
    }

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let r = parse_request(r#"{"command":"dirty-start","source":"kvm-ring"}"#).unwrap();
        assert_eq!(
            r,
            Request::DirtyStart {
                source: DirtySourceKind::KvmRing
            }
        );
        assert_eq!(
            parse_request(r#"{"command":"status"}"#).unwrap(),
            Request::Status
        );
        let text = serde_json::to_string(&Request::DirtyStats).unwrap();
        assert_eq!(text, r#"{"command":"dirty-stats"}"#);
    }

    #[test]
    fn bad_requests_are_rejected_with_a_message() {
        assert!(parse_request("{").unwrap_err().contains("bad request"));
        assert!(parse_request(r#"{"command":"reboot"}"#).is_err());
        assert!(parse_request(r#"{"command":"dirty-start","source":"nope"}"#).is_err());
    }

    #[test]
    fn responses_omit_empty_fields() {
        let t = serde_json::to_string(&Response::err("boom")).unwrap();
        assert_eq!(t, r#"{"ok":false,"error":"boom"}"#);
    }
}
