//! Wiring: the one place where ingest, journal, pipeline, egress and the
//! control socket are put together, and where the lifecycle lives.
//!
//! Shutdown order (STYLE.md): stop accepting → let open associations finish
//! → finish the running study (deliveries stop between instances and resume
//! at the next start) → flush the journal → exit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{LiveSettings, NonPetPolicy, Settings};
use crate::ingest::materialize::{self, Materializer};
use crate::ingest::{self, ScpConfig, store::SpoolSink};
use crate::journal::{Journal, JournalError};
use crate::pipeline::{Pipeline, worker::WorkerCtx};
use crate::spool::Spool;
use crate::spool::arrivals::ArrivalLog;
use crate::telemetry::{self, Telemetry};
use crate::{control, dicom, restore};

/// How long open associations may take to finish after a stop request;
/// then they are aborted. With [`TASK_DRAIN`], 1 s for the control
/// socket, 5 s for telemetry and the runtime's 2 s shutdown (`main.rs`; a
/// restoration still running ends the process with `_exit` instead) the
/// stop takes at most about 49 s, inside the unit's TimeoutStopSec (60 s).
const ASSOCIATION_DRAIN: Duration = Duration::from_secs(15);
/// How long a running restoration may take to finish after a stop request
/// (it resumes from the journal at the next start otherwise).
const TASK_DRAIN: Duration = Duration::from_secs(25);

/// A running daemon.
pub struct Daemon {
    /// The address the DICOM SCP listens on (useful with port 0).
    pub dicom_addr: SocketAddr,
    pub shutdown: CancellationToken,
    journal: Journal,
    associations: TaskTracker,
    /// Aborts the open associations once their drain budget is spent.
    close_associations: CancellationToken,
    /// The stage tasks, by name (finished = dead while the daemon runs).
    stages: Vec<(&'static str, tokio::task::AbortHandle)>,
    /// The scheduler's last pass (ms since the epoch).
    last_pass: Arc<std::sync::atomic::AtomicU64>,
    /// The scheduler's last pass failed on the journal's storage.
    journal_io: Arc<std::sync::atomic::AtomicBool>,
    /// Moves acknowledged instances from the arrival log into the spool.
    materializer: Arc<Materializer>,
    tasks: TaskTracker,
    main: tokio::task::JoinHandle<()>,
    telemetry_stop: CancellationToken,
    telemetry_task: Option<tokio::task::JoinHandle<()>>,
    /// Drain and stop, as the control socket and telemetry show them.
    modes: control::Modes,
    /// Tells telemetry to publish the status again.
    state_changed: Arc<Notify>,
    /// The control socket answers until the stop's last journal write.
    control_stop: CancellationToken,
    control_task: tokio::task::JoinHandle<()>,
    /// For SIGHUP reloads.
    live: Arc<LiveSettings>,
    wake: Arc<Notify>,
}

/// Free space the state folder needs before a journal that refuses writes
/// is reopened by a restart (beside `node.min_free_mb`).
const JOURNAL_REOPEN_ROOM: u64 = 256 << 20;

/// Open the journal with a message that says what to do when it is locked.
pub fn open_journal(settings: &Settings) -> Result<Journal> {
    let dir = settings.node.state_dir.join("journal");
    Journal::open(&dir).map_err(|e| match e {
        JournalError::Locked { .. } => anyhow::anyhow!(
            "{e}: another petrestore process uses {}; stop it or choose another node.state_dir",
            settings.node.state_dir.display()
        ),
        e => anyhow::anyhow!(
            "cannot open the journal in {}: {e}; the spool still holds every received instance: stop the daemon and run `petrestore journal rebuild` (with the same --config) to rebuild the journal from it",
            dir.display()
        ),
    })
}

/// Open the journal the repair just rebuilt. The rebuild's own handle is
/// dropped, but sled releases the folder's lock from its background thread a
/// moment later, so a lock still held is waited for (up to 5 s).
fn reopen_after_repair(settings: &Settings) -> Result<Journal> {
    match Journal::open_waiting(&settings.node.state_dir.join("journal"), std::time::Duration::from_secs(5)) {
        Ok(j) => Ok(j),
        Err(_) => open_journal(settings),
    }
}

/// Rebuild a damaged journal from the spool and the outcome log, keeping the
/// damaged copy aside; say what was found and what was done.
fn repair_journal(settings: &Settings, spool_root: &std::path::Path, problems: &[String]) -> Result<()> {
    let dir = settings.node.state_dir.join("journal");
    tracing::error!(problems = %problems.join("; "), "the journal disagrees with the spool and the outcome log: repairing it");
    let r = crate::journal::integrity::repair(&dir, spool_root).map_err(|e| {
        anyhow::anyhow!(
            "the journal in {} is damaged ({}) and could not be rebuilt: {e}; the spool still holds every received instance: \
             run `petrestore journal rebuild` (with the same --config) once the cause is fixed",
            dir.display(),
            problems.join("; ")
        )
    })?;
    tracing::warn!(
        damaged_copy = %r.damaged_copy.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        instances = r.instances,
        jobs = r.jobs,
        finished = r.finished,
        "journal repaired: rebuilt from the spool, finished jobs restored from the outcome log, unfinished ones resume"
    );
    Ok(())
}

/// How often a long start-up step extends systemd's start timeout, by
/// twice this each time.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(30);
/// Beyond this a start-up step is taken for hung: the extensions stop and
/// the unit's own timeout ends the start.
const KEEP_ALIVE_MAX: Duration = Duration::from_secs(30 * 60);

/// While alive, sends `EXTEND_TIMEOUT_USEC` (twice `every`) and a status
/// line every `every`, for at most `max`; dropped, it stops and clears
/// the status.
struct KeepStartAlive {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KeepStartAlive {
    fn start(
        status: &'static str,
        every: Duration,
        max: Duration,
        send: impl Fn(&[sd_notify::NotifyState]) + Send + 'static,
    ) -> KeepStartAlive {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let extend = u32::try_from(every.as_micros() * 2).unwrap_or(u32::MAX);
        let thread = std::thread::Builder::new()
            .name("start-keepalive".into())
            .spawn(move || {
                let t0 = std::time::Instant::now();
                send(&[sd_notify::NotifyState::Status(status)]);
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                    if t0.elapsed() >= max {
                        tracing::error!(?max, "{status}: still not done; no longer extending the start timeout");
                        return;
                    }
                    send(&[sd_notify::NotifyState::ExtendTimeoutUsec(extend), sd_notify::NotifyState::Status(status)]);
                }
                send(&[sd_notify::NotifyState::Status("starting")]);
            })
            .ok();
        KeepStartAlive { stop: Some(tx), thread }
    }
}

impl Drop for KeepStartAlive {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start every stage; returns once the DICOM listener is bound.
pub async fn start(settings: Settings) -> Result<Daemon> {
    let live = Arc::new(LiveSettings::new(settings.clone()));
    let settings = Arc::new(settings);
    let state = &settings.node.state_dir;
    crate::spool::create_dir_durable(state)
        .with_context(|| format!("cannot create node.state_dir {}: check the path and permissions", state.display()))?;
    let spool = Spool::new(state.join("spool")).context("cannot create the spool folder")?;
    let journal_dir = settings.node.state_dir.join("journal");
    // A journal sled cannot open at all (damage at its head) is repaired
    // like any other damage below; a locked one is another daemon's.
    let mut journal = match open_journal(&settings) {
        Ok(j) => j,
        Err(e) if journal_dir.exists() && !e.to_string().contains("locked") => {
            tracing::error!(error = %e, "the journal cannot be opened: rebuilding it from the spool");
            repair_journal(&settings, spool.root(), &[format!("cannot open: {e}")])?;
            open_journal(&settings)?
        }
        Err(e) => return Err(e),
    };
    // Only once the journal is ours: a second `serve` on the same folder
    // stops at the journal's lock above, before touching the running
    // daemon's temporaries.
    let stale = spool.remove_stale_temporaries().context("cannot clean the spool")?;
    if stale > 0 {
        tracing::info!(stale, "removed unacknowledged temporaries left by a crash");
    }
    // Instances acknowledged before a crash but not yet in the spool and the
    // journal are in the arrival log: record them before anything else.
    let log = Arc::new(ArrivalLog::open(&spool.root().join("arrivals")).context("cannot open the arrival log in the spool folder")?);
    // Pre-written spare segments make each acknowledgement's sync cheaper
    // (no file-size change to commit); made once per node, then recycled.
    // After the replay, which needs the space first, and never into the
    // room node.min_free_mb keeps.
    let spares = {
        let log = log.clone();
        let keep_free = settings.node.min_free_bytes;
        move || {
            let spawned = std::thread::Builder::new().name("arrival-spares".into()).spawn(move || {
                if let Err(e) = log.prepare_spares(keep_free) {
                    tracing::warn!(error = %e, "cannot prepare spare arrival log segments; appending to new files instead");
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a thread to prepare spare arrival log segments");
            }
        }
    };
    // A disk with no room for the replay (a restart on a full disk) does
    // not keep the daemon down: it starts with ingest refused (0xA700,
    // "disk full"), restores and delivers what the spool holds, which
    // frees room as retention removes delivered series, and the
    // materializer replays the log when there is room.
    let mut pending_replay = None;
    let mut in_log = std::collections::HashSet::new();
    match materialize::replay(&log, &spool, &journal) {
        Ok(replayed) => {
            if replayed.segments > 0 {
                replayed.log("arrival log replayed");
            }
            spares();
        }
        Err(e) if e.short_reason() == "disk full" || e.is_journal_io() => {
            tracing::error!(
                error = %e,
                log = %log.dir().display(),
                "cannot replay the arrival log: the received instances stay in it and are moved into the spool when there is room; \
                 new instances are refused meanwhile"
            );
            let journal_io = e.is_journal_io();
            let paths = materialize::logged_paths(&log).context("cannot read the arrival log in the spool folder")?;
            // <study>/<series>/<sop>.dcm
            let series = paths.iter().filter_map(|p| p.iter().nth(1)?.to_str().map(str::to_owned)).collect();
            in_log = paths;
            pending_replay = Some(materialize::PendingReplay { reason: e.short_reason(), journal_io, series, then: Box::new(spares) });
        }
        Err(e) => {
            return Err(anyhow::anyhow!(
                "cannot replay the arrival log ({e}); the received instances stay in {} until this is fixed",
                log.dir().display()
            ));
        }
    }
    // The journal against the evidence (the spool, the outcome log): any
    // disagreement is damage, repaired before anything acts on the journal.
    let problems = crate::journal::integrity::check_beside_log(&journal, spool.root(), &|rel| in_log.contains(rel));
    if !problems.is_empty() {
        drop(journal);
        repair_journal(&settings, spool.root(), &problems)?;
        journal = reopen_after_repair(&settings)?;
    }
    // purges a stop cut short, finished before any instance can arrive
    crate::pipeline::retention::finish_interrupted(&settings, &journal, &spool).context("cannot finish an interrupted purge")?;
    let restore::Engines { engines, reports } = {
        // A first TensorRT build (an empty cache, a new model or runtime)
        // can take longer than the unit's start timeout: tell systemd the
        // start is alive meanwhile, for up to KEEP_ALIVE_MAX.
        let _alive = KeepStartAlive::start(
            "building the restoration engines (a TensorRT build can take minutes)",
            KEEP_ALIVE_EVERY,
            KEEP_ALIVE_MAX,
            |s| {
                let _ = sd_notify::notify(s);
            },
        );
        restore::engines_from_settings(&settings).map_err(anyhow::Error::msg)?
    };
    tracing::info!(engines = ?engines.iter().map(|e| e.label()).collect::<Vec<_>>(), "restoration engines ready");

    let wake = Arc::new(Notify::new());
    let pipeline =
        Pipeline::new(WorkerCtx { settings: live.clone(), journal: journal.clone(), spool: spool.clone(), engines }, wake.clone());
    let active = pipeline.recover().context("cannot read the journal")?;
    if active > 0 {
        tracing::info!(active, "resuming unfinished jobs from the journal");
    }

    let listener = TcpListener::bind(settings.dicom.listen)
        .await
        .with_context(|| format!("cannot listen on {} (dicom.listen): is another DICOM service using the port?", settings.dicom.listen))?;
    let dicom_addr = listener.local_addr()?;
    let tls_listener = match &settings.dicom.tls {
        None => None,
        Some(t) => {
            let config = ingest::tls_config(t).map_err(anyhow::Error::msg)?;
            let l = TcpListener::bind(t.listen)
                .await
                .with_context(|| format!("cannot listen on {} (dicom.tls.listen): is another service using the port?", t.listen))?;
            tracing::info!(address = %l.local_addr()?, mutual = t.client_ca.is_some(), "DICOM TLS listener");
            Some((l, config))
        }
    };
    let control = control::bind(state).context("cannot create the control socket in node.state_dir")?;

    let modes = control::Modes::default();
    let draining = modes.draining.clone();
    let state_changed = Arc::new(Notify::new());
    let close_associations = CancellationToken::new();
    let mut abstract_syntaxes: Vec<String> = dicom::PET_STORAGE_CLASSES.iter().map(|s| s.to_string()).collect();
    if settings.dicom.non_pet == NonPetPolicy::Passthrough {
        abstract_syntaxes.extend(dicom::PASSTHROUGH_STORAGE_CLASSES.iter().map(|s| s.to_string()));
    }
    abstract_syntaxes.push(dicom::VERIFICATION.to_string());
    // archives reporting storage commitment (`commitment = true` destinations)
    abstract_syntaxes.push(dicom::commitment::PUSH_MODEL.to_string());
    let scp = Arc::new(ScpConfig {
        ae_title: settings.dicom.ae_title.clone(),
        allowed_callers: Some(settings.dicom.allowed_callers.clone()),
        abstract_syntaxes,
        max_associations: settings.dicom.max_associations,
        max_associations_per_peer: settings.dicom.max_associations_per_peer,
        artim_timeout: settings.dicom.artim_timeout,
        max_pdu_length: settings.dicom.max_pdu_length,
        max_buffered_bytes: settings.dicom.max_buffered_mb << 20,
        idle_timeout: settings.dicom.idle_timeout,
        draining: draining.clone(),
        close: close_associations.clone(),
        live: Some(live.clone()),
        shared: Default::default(),
    });
    let materializer = Arc::new(
        match pending_replay {
            None => Materializer::start(log.clone(), spool.clone(), journal.clone(), wake.clone()),
            Some(p) => Materializer::start_after_replay(log.clone(), spool.clone(), journal.clone(), wake.clone(), p),
        }
        .context("cannot start the materializer thread")?,
    );
    let _ = pipeline.ingest.set(materializer.clone());
    let sink = Arc::new(SpoolSink {
        spool,
        journal: journal.clone(),
        log,
        materializer: materializer.clone(),
        live: live.clone(),
        wake: wake.clone(),
    });

    let shutdown = CancellationToken::new();
    let associations = TaskTracker::new();
    let tasks = TaskTracker::new();
    let tls_task = tls_listener.map(|(l, config)| {
        tokio::spawn(ingest::serve_with(l, scp.clone(), sink.clone(), shutdown.clone(), associations.clone(), Some(config)))
    });
    let ingest_task = tokio::spawn(ingest::serve(listener, scp, sink, shutdown.clone(), associations.clone()));
    let last_pass = pipeline.last_pass_ms.clone();
    let journal_io = pipeline.journal_io.clone();
    let sched_task = tokio::spawn(pipeline.clone().run(shutdown.clone(), tasks.clone()));
    // Telemetry: job events from the journal, commands and health through
    // DaemonControl. It has its own stop token: it says `offline` last.
    let telemetry_stop = CancellationToken::new();
    let telemetry_task = match settings.mqtt.clone() {
        None => None,
        Some(m) => {
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            let t = Telemetry::new(tx, &settings.node.device_id, m.include_uids);
            let ctl = Arc::new(DaemonControl {
                settings: live.clone(),
                materializer: materializer.clone(),
                pipeline: pipeline.clone(),
                modes: modes.clone(),
                engines: reports.clone(),
                started: std::time::Instant::now(),
                since_ms: AtomicU64::new(crate::journal::now_ms()),
                finished: Default::default(),
                done_recently: Default::default(),
                last_error: Default::default(),
            });
            let (t2, c2) = (t.clone(), ctl.clone());
            journal.set_observer(Box::new(move |job| {
                c2.observe(job);
                t2.job_event(job);
            }));
            Some(tokio::spawn(telemetry::mqtt::run(
                m,
                settings.node.device_id.clone(),
                rx,
                t.dropped.clone(),
                ctl,
                state_changed.clone(),
                telemetry_stop.clone(),
            )))
        }
    };
    let status = control::StaticStatus {
        device_id: settings.node.device_id.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ae_title: settings.dicom.ae_title.clone(),
        listen: dicom_addr.to_string(),
        engines: reports,
    };
    let control_stop = CancellationToken::new();
    let control_task = tokio::spawn(control::serve(control, pipeline, status, materializer.clone(), modes.clone(), control_stop.clone()));
    // What the watchdog watches: every stage task and the scheduler's pace.
    let mut stages = vec![
        ("DICOM listener", ingest_task.abort_handle()),
        ("scheduler", sched_task.abort_handle()),
        ("control socket", control_task.abort_handle()),
    ];
    if let Some(t) = &tls_task {
        stages.push(("DICOM TLS listener", t.abort_handle()));
    }
    let main = tokio::spawn(async move {
        if let Some(t) = tls_task {
            let _ = t.await;
        }
        let _ = tokio::join!(ingest_task, sched_task);
    });
    tracing::info!(listen = %dicom_addr, ae = %settings.dicom.ae_title, state_dir = %state.display(), "petrestore ready");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("ready: receiving and restoring")]);
    Ok(Daemon {
        dicom_addr,
        shutdown,
        journal,
        associations,
        close_associations,
        materializer,
        stages,
        last_pass,
        journal_io,
        tasks,
        main,
        telemetry_stop,
        telemetry_task,
        modes,
        state_changed,
        control_stop,
        control_task,
        live,
        wake,
    })
}

/// What telemetry may ask of and tell the daemon.
struct DaemonControl {
    settings: Arc<LiveSettings>,
    materializer: Arc<Materializer>,
    pipeline: Arc<Pipeline>,
    modes: control::Modes,
    engines: Vec<restore::EngineReport>,
    started: std::time::Instant,
    /// When the announced state last changed.
    since_ms: AtomicU64,
    /// Terminal jobs since start, per state.
    finished: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Jobs done in the last hour: (done at ms, slices, turnaround ms).
    done_recently: std::sync::Mutex<std::collections::VecDeque<(u64, u32, u64)>>,
    last_error: std::sync::Mutex<Option<String>>,
}

impl DaemonControl {
    fn observe(&self, job: &crate::journal::Job) {
        if job.state.is_terminal() {
            *self.finished.lock().expect("counter lock").entry(job.state.name().to_string()).or_insert(0) += 1;
        }
        if job.state == crate::journal::JobState::Done {
            let mut done = self.done_recently.lock().expect("throughput lock");
            done.push_back((job.updated_ms, job.received, job.updated_ms.saturating_sub(job.last_received_ms)));
            while done.front().is_some_and(|(at, ..)| job.updated_ms.saturating_sub(*at) > telemetry::Throughput::WINDOW_S * 1000) {
                done.pop_front();
            }
        }
        if let crate::journal::JobState::Failed { reason } = &job.state {
            *self.last_error.lock().expect("error lock") = Some(format!("job {}: {reason}", job.id));
        }
    }

    fn state(&self) -> &'static str {
        control::node_state(
            self.modes.stopping.load(Ordering::Relaxed) != 0,
            self.modes.draining.load(Ordering::Relaxed),
            self.pipeline.paused.load(Ordering::Relaxed),
        )
    }
}

impl telemetry::mqtt::Control for DaemonControl {
    fn command(&self, name: &str, msg: &telemetry::CommandMsg) -> Result<serde_json::Value, String> {
        let changed = |me: &Self| me.since_ms.store(crate::journal::now_ms(), Ordering::Relaxed);
        if matches!(name, "pause" | "resume" | "drain") && self.modes.stopping.load(Ordering::Relaxed) != 0 {
            return Err(format!("the daemon is stopping: {name} applies to a running daemon"));
        }
        match name {
            "pause" => {
                self.pipeline.paused.store(true, Ordering::Relaxed);
                changed(self);
                Ok(serde_json::json!({"state": self.state()}))
            }
            "resume" => {
                self.pipeline.paused.store(false, Ordering::Relaxed);
                self.modes.draining.store(false, Ordering::Relaxed);
                self.pipeline.wake.notify_one();
                changed(self);
                Ok(serde_json::json!({"state": self.state()}))
            }
            "drain" => {
                self.modes.draining.store(true, Ordering::Relaxed);
                changed(self);
                Ok(serde_json::json!({"state": self.state(), "note": "new associations are rejected; jobs in progress finish"}))
            }
            "retry" => {
                let id = msg.job_id.as_deref().ok_or("retry needs \"job_id\" in the payload")?;
                // a journal update (fsync), called from the MQTT task
                let job = tokio::task::block_in_place(|| self.pipeline.retry(id))?;
                Ok(serde_json::json!({"job_id": job.id, "state": job.state.name()}))
            }
            "reload" => {
                let changed = self.settings.reload()?;
                tracing::info!(?changed, "configuration reloaded (MQTT command)");
                self.pipeline.wake.notify_one();
                Ok(serde_json::json!({"reloaded": true, "changed": changed}))
            }
            other => Err(format!("unknown command {other:?}; known: pause, resume, drain, retry, reload")),
        }
    }

    fn health(&self) -> telemetry::HealthMsg {
        let mut jobs = BTreeMap::new();
        if let Ok(active) = self.pipeline.worker.journal.active_jobs() {
            for j in active {
                *jobs.entry(j.state.name().to_string()).or_insert(0usize) += 1;
            }
        }
        telemetry::HealthMsg {
            schema_version: telemetry::SCHEMA_VERSION,
            device_id: self.settings.get().node.device_id.clone(),
            at_ms: crate::journal::now_ms(),
            uptime_s: self.started.elapsed().as_secs(),
            state: self.state().into(),
            queue_depth: jobs.get("queued").copied().unwrap_or(0),
            jobs,
            jobs_finished: self.finished.lock().expect("counter lock").clone(),
            disk_free_mb: crate::spool::free_bytes(&self.settings.get().node.state_dir).ok().map(|b| b / (1024 * 1024)),
            engines: self
                .engines
                .iter()
                .map(|e| telemetry::EngineHealth { engine: e.engine.clone(), ok: e.ok, detail: e.detail.clone() })
                .collect(),
            ingest_backlog: self.materializer.backlog(),
            // A stalled ingest outranks a failed job: nothing new is accepted.
            last_error: match self.materializer.failure() {
                Some(e) => Some(format!("ingest paused, new instances refused while the spool cannot take them: {e}")),
                None => self.last_error.lock().expect("error lock").clone(),
            },
            events_dropped: 0,
            throughput: {
                let mut done = self.done_recently.lock().expect("throughput lock");
                telemetry::Throughput::of(done.make_contiguous(), crate::journal::now_ms())
            },
        }
    }

    fn status(&self) -> telemetry::StatusMsg {
        let first = self.pipeline.worker.engines.first();
        telemetry::StatusMsg {
            schema_version: telemetry::SCHEMA_VERSION,
            state: self.state().into(),
            version: env!("CARGO_PKG_VERSION").into(),
            device_id: self.settings.get().node.device_id.clone(),
            model: first.map(|e| e.model_id()),
            engine: first.map(|e| e.label()),
            since_ms: match self.modes.stopping.load(Ordering::Relaxed) {
                0 => self.since_ms.load(Ordering::Relaxed),
                at => at,
            },
        }
    }
}

impl Daemon {
    /// The daemon's journal (for the demo's summary).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Stop in order and flush the journal.
    /// Why the daemon is not healthy, if it is not: a stage task ended, the
    /// materializer thread stopped, or the scheduler has not made a pass
    /// within `max_age`. The systemd watchdog is pinged only while healthy,
    /// so a wedged stage gets the daemon restarted.
    pub fn unhealthy(&self, max_age: Duration) -> Option<String> {
        if let Some((name, _)) = self.stages.iter().find(|(_, h)| h.is_finished()) {
            return Some(format!("the {name} task has ended"));
        }
        if !self.materializer.alive() {
            return Some("the materializer thread has ended".into());
        }
        if self.materializer.journal_unwritable() || self.journal_io.load(Ordering::Relaxed) {
            // sled refuses every write after a storage error until it is
            // opened again. While the disk is still full a restart could not
            // replay the arrival log either: ingest answers 0xA700 meanwhile
            // and the restart waits for room.
            let settings = self.live.get();
            let room = settings.node.min_free_bytes.max(JOURNAL_REOPEN_ROOM);
            if crate::spool::free_bytes(&settings.node.state_dir).is_ok_and(|free| free >= room) {
                return Some(
                    "the journal refuses writes since a storage error, and the disk has room again: \
                    a restart opens it again"
                        .into(),
                );
            }
        }
        let age = crate::pipeline::monotonic_ms().saturating_sub(self.last_pass.load(Ordering::Relaxed));
        (age > max_age.as_millis() as u64).then(|| format!("the scheduler made no pass for {:.1} s", age as f64 / 1000.0))
    }

    pub async fn stop(self) -> Result<()> {
        // seen at once by `petrestore status`, MQTT status and health
        self.modes.stopping.store(crate::journal::now_ms().max(1), Ordering::Relaxed);
        self.state_changed.notify_one();
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping: finishing open associations and the running restoration"),
        ]);
        self.shutdown.cancel();
        let _ = self.main.await;
        self.associations.close();
        if tokio::time::timeout(ASSOCIATION_DRAIN, self.associations.wait()).await.is_err() {
            tracing::warn!("associations still open after {ASSOCIATION_DRAIN:?}: aborting them");
            self.close_associations.cancel();
            if tokio::time::timeout(Duration::from_secs(1), self.associations.wait()).await.is_err() {
                tracing::warn!("an association did not end after its abort; exiting without it");
            }
        }
        // Everything acknowledged goes into the spool and the journal now
        // (whatever is left would be replayed at the next start anyway).
        let m = self.materializer.clone();
        let _ = tokio::task::spawn_blocking(move || m.stop()).await;
        self.tasks.close();
        let left_running = tokio::time::timeout(TASK_DRAIN, self.tasks.wait()).await.is_err();
        if left_running {
            // The restoration cannot be interrupted; the process exits
            // without it (`_exit` at the end of the stop).
            // Its job goes back to the queue as a stop, not a crash, so it
            // does not count toward the interrupted-restoration limit.
            // (an error here is logged: the stop goes on to the final flush)
            let mut requeued = 0;
            match self.journal.active_jobs() {
                Err(e) => tracing::error!(error = %e, "cannot read the journal at stop to requeue a running restoration"),
                Ok(jobs) => {
                    for job in jobs.iter().filter(|j| j.state == crate::journal::JobState::Restoring) {
                        requeued += 1;
                        let r = self.journal.update(&job.id, |j| {
                            if j.state == crate::journal::JobState::Restoring {
                                j.note("the daemon stopped during restoration: restored again at the next start");
                                j.set_state(crate::journal::JobState::Queued);
                            }
                        });
                        if let Err(e) = r {
                            tracing::error!(job = %job.id, error = %e, "cannot requeue a running restoration at stop");
                        }
                    }
                }
            }
            if requeued > 0 {
                tracing::warn!("a restoration was still running after {TASK_DRAIN:?}; it resumes at the next start");
            } else {
                tracing::warn!("a task was still running after {TASK_DRAIN:?}; its work resumes at the next start");
            }
        }
        // telemetry still says offline when the flush fails
        let flushed = self.journal.flush().map(drop).context("final journal flush failed");
        self.control_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.control_task).await;
        self.telemetry_stop.cancel();
        if let Some(t) = self.telemetry_task {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        tracing::info!("petrestore stopped");
        if left_running {
            if let Err(e) = &flushed {
                tracing::error!(error = %format!("{e:#}"), "the stop did not complete");
            }
            // A normal exit runs the engine libraries' static destructors
            // (ONNX Runtime, CUDA) while their thread is still inside a
            // restoration, which can hang or crash the exit past systemd's
            // stop timeout. Everything is written: end the process here.
            // SAFETY: ends the process; touches no memory of ours.
            // (2: the status `main` gives any other error)
            unsafe { libc::_exit(if flushed.is_err() { 2 } else { 0 }) }
        }
        flushed
    }
}

/// `petrestore serve`: run until SIGTERM or SIGINT.
pub async fn serve(settings: Settings) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // SIGHUP's default action ends the process: its handler comes before
    // the start (engine builds can take minutes), and a reload asked for
    // meanwhile is made once the daemon is up. SIGTERM keeps its default
    // until then: a stop during the start ends it at once, as a crash
    // would, which the start-up replay and checks are made for.
    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    tracing::info!("starting");
    let daemon = start(settings).await?;
    // systemd watchdog: ping at half the interval from the main loop, on
    // one interval for the whole run: a sleep made anew on each pass would
    // start over at every SIGHUP, and reloads more frequent than the pings
    // would stop them.
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut pings = watchdog.map(|d| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    loop {
        let tick = async {
            match pings.as_mut() {
                Some(i) => _ = i.tick().await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = hup.recv() => match daemon.live.reload() {
                Ok(changed) => { tracing::info!(?changed, "SIGHUP: configuration reloaded"); daemon.wake.notify_one(); }
                Err(e) => tracing::error!(error = %e, "SIGHUP: configuration not reloaded"),
            },
            _ = tick => {
                // Ping only while every stage lives and the scheduler keeps
                // its pace; otherwise systemd restarts the daemon.
                let max_age = watchdog.map(|d| d * 2).unwrap_or_default();
                match daemon.unhealthy(max_age) {
                    None => { let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]); }
                    Some(why) => tracing::error!(%why, "not pinging the systemd watchdog: systemd will restart the daemon"),
                }
            }
        }
    }
    daemon.stop().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_long_start_step_extends_the_timeout_until_done_and_no_longer_than_its_maximum() {
        let sent = Arc::new(Mutex::new(Vec::<String>::new()));
        let record = |sent: &Arc<Mutex<Vec<String>>>| {
            let sent = sent.clone();
            move |s: &[sd_notify::NotifyState]| sent.lock().unwrap().push(s.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","))
        };
        let every = Duration::from_millis(20);
        let alive = KeepStartAlive::start("building", every, Duration::from_secs(60), record(&sent));
        std::thread::sleep(every * 5);
        drop(alive);
        let got = sent.lock().unwrap().clone();
        assert_eq!(got.first().map(String::as_str), Some("STATUS=building"));
        assert_eq!(got.last().map(String::as_str), Some("STATUS=starting"));
        assert!(got.iter().any(|m| m == "EXTEND_TIMEOUT_USEC=40000,STATUS=building"), "{got:?}");
        // a step that never ends: the extensions stop at the maximum
        let sent = Arc::new(Mutex::new(Vec::<String>::new()));
        let alive = KeepStartAlive::start("hung", every, every * 3, record(&sent));
        std::thread::sleep(every * 10);
        let n = sent.lock().unwrap().len();
        assert!(n <= 4, "{:?}", sent.lock().unwrap());
        drop(alive);
    }
}
