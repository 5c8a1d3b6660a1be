//! The worker step of a job: load the spooled series, apply the selection
//! rules, run the engines, write the derived series durably, and move the
//! job to delivery. Runs on a blocking thread (it is CPU and disk work).

use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use std::sync::Arc;

use crate::config::{IncompletePolicy, Settings};
use crate::derive::{DeriveParams, DerivedInstance, derive_series, derive_uncertainty, uncertainty_series_uid};
use crate::dicom::attrs::Attrs;
use crate::dicom::part10;
use crate::egress::output_dir;
use crate::journal::{JobKind, JobState, Journal, JournalError, Outcome, Payload};
use crate::restore::{Engine, run_engines, select, volume};
use crate::spool::{self, Spool};

/// How a restoration attempt ended, before delivery.
pub enum Ending {
    /// `count` instances written, holding `slices` slices (more slices than
    /// instances: multi-frame).
    Restored {
        engine: String,
        model_id: String,
        series_uid: String,
        count: u32,
        slices: usize,
        uncertainty: Option<crate::journal::UncertaintyRecord>,
    },
    Skipped(String),
    Failed(String),
    /// The derived series did not fit on the disk (with the configured
    /// reserve kept free): the job waits for space and is restored again;
    /// its originals are not forwarded in its place.
    NoSpace(String),
}

/// Why a series was not restored (nothing was written).
#[derive(Debug, thiserror::Error)]
pub enum NotRestored {
    /// The selection rules left it out (wrong duration, units, tracer, …).
    #[error("series not restored (selection rules): {0}")]
    Skipped(String),
    /// Loading or an engine failed (the message says which).
    #[error("{0}")]
    Failed(String),
}

impl From<NotRestored> for Ending {
    fn from(e: NotRestored) -> Ending {
        match e {
            NotRestored::Skipped(r) => Ending::Skipped(r),
            NotRestored::Failed(r) => Ending::Failed(r),
        }
    }
}

/// First wait after a job found the disk full; doubled per attempt up to
/// [`SPACE_RETRY_MAX`].
pub const SPACE_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(2);
pub const SPACE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// Everything a restoration needs.
pub struct WorkerCtx {
    /// Replaced by `reload`; each step takes a snapshot.
    pub settings: Arc<crate::config::LiveSettings>,
    pub journal: Journal,
    pub spool: Spool,
    pub engines: Vec<Arc<dyn Engine>>,
}

/// Restore one job (state `Queued` or `Restoring` after a crash).
pub fn restore_job(ctx: &WorkerCtx, job_id: &str) -> Result<(), JournalError> {
    // The scheduler's list may be older than the job: a job that finished
    // (or moved on) since it was read is not restored again, and a series
    // passed through is forwarded, never restored.
    let destinations = ctx.settings.get().destinations.clone();
    let job = ctx.journal.update(job_id, |j| match (&j.kind, &j.state) {
        (JobKind::Passthrough, JobState::Queued | JobState::Restoring) => {
            let reason = format!("not PET ({}): passed through unchanged", j.modality.clone().unwrap_or_default());
            j.plan_deliveries_to(&destinations);
            j.set_state(JobState::Delivering { payload: Payload::Original, outcome: Outcome::Skipped { reason } });
        }
        (JobKind::Pet, JobState::Queued | JobState::Restoring) => j.set_state(JobState::Restoring),
        _ => {}
    })?;
    if job.kind != JobKind::Pet {
        // PET-class instances may have come under a series that began with
        // another kind: the room ingest held for their outputs is free
        ctx.spool.reservations().release(&job.series_uid);
        return Ok(());
    }
    if job.state != JobState::Restoring {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let ending = if job.output_rebuilds > crate::journal::job::MAX_OUTPUT_REBUILDS {
        // its derived series went missing at delivery every time
        Ending::Failed(format!(
            "the derived series was found incomplete at delivery {} times in a row: not restored again; \
             check {}; `petrestore jobs retry {}` tries once more",
            job.output_rebuilds,
            output_dir(&ctx.settings.get().node.state_dir, &job.id).display(),
            job.id
        ))
    } else if job.interrupted_restores >= crate::journal::job::MAX_INTERRUPTED_RESTORES {
        // the process stopped inside this job's restoration every time: a
        // series that crashes an engine must not crash the box in a loop
        Ending::Failed(format!(
            "restoration was interrupted by {} restarts in a row (the process crashed or was stopped during it each time): \
             not tried again; `petrestore jobs retry {}` tries once more",
            job.interrupted_restores, job.id
        ))
    } else {
        // a panic in an engine or in derive fails this job, not the daemon
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| restore(ctx, &job))).unwrap_or_else(|p| {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "no message".into());
            Ending::Failed(format!("restoration panicked: {what}"))
        })
    };
    // its outputs are written now (or will not be): the room ingest held for
    // them is free; a job waiting for space keeps its share
    if !matches!(ending, Ending::NoSpace(_)) {
        ctx.spool.reservations().release(&job.series_uid);
    }
    let settings = ctx.settings.get();
    let destinations = &settings.destinations;
    let r = &settings.restore;
    if let Ending::NoSpace(reason) = &ending {
        let job = ctx.journal.update(job_id, |j| {
            let wait = SPACE_RETRY_FIRST.saturating_mul(1 << j.space_waits.min(5)).min(SPACE_RETRY_MAX);
            if j.space_waits == 0 {
                j.note(format!("waiting for disk space: {reason}; restoring again every {} s or less", SPACE_RETRY_MAX.as_secs()));
            }
            j.space_waits = j.space_waits.saturating_add(1);
            j.restore_not_before_ms = crate::journal::now_ms() + wait.as_millis() as u64;
            j.interrupted_restores = 0;
            j.set_state(JobState::Queued);
        })?;
        tracing::warn!(job = job_id, waits = job.space_waits, "{reason}: the job waits for disk space");
        return Ok(());
    }
    let job = ctx.journal.update(job_id, |j| {
        j.interrupted_restores = 0;
        if j.space_waits > 0 {
            j.note(format!("disk space available again after {} attempts", j.space_waits));
            j.space_waits = 0;
            j.restore_not_before_ms = 0;
        }
        let (payload, outcome) = match &ending {
            Ending::Restored { engine, model_id, series_uid, count, slices, uncertainty } => {
                j.engine = Some(engine.clone());
                j.model_id = Some(model_id.clone());
                j.output_series_uid = Some(series_uid.clone());
                j.output_count = *count;
                j.note(format!(
                    "restored {} with {engine} ({model_id}) in {:.1} s",
                    slice_count(*slices, *count as usize),
                    started.elapsed().as_secs_f64()
                ));
                if let Some(u) = uncertainty {
                    j.note(u.summary.to_string());
                }
                j.uncertainty = uncertainty.clone();
                (Some(Payload::Derived), Outcome::Done)
            }
            Ending::Skipped(reason) => (r.forward_skipped.then_some(Payload::Original), Outcome::Skipped { reason: reason.clone() }),
            Ending::Failed(reason) => {
                (r.forward_original_on_failure.then_some(Payload::Original), Outcome::Failed { reason: reason.clone() })
            }
            Ending::NoSpace(_) => unreachable!("handled above"),
        };
        match payload {
            Some(payload) if !destinations.is_empty() => {
                j.plan_deliveries_to(destinations);
                j.set_state(JobState::Delivering { payload, outcome });
            }
            // nothing is sent this time: an earlier run's deliveries must
            // not read as this run's (retention keeps an undelivered
            // failure by them)
            _ if j.rerun_requested => {
                j.deliveries.clear();
                j.rerun_requested = false;
                j.set_state(JobState::Queued);
            }
            _ => {
                j.deliveries.clear();
                j.set_state(outcome.into());
            }
        }
    })?;
    tracing::info!(
        job = job_id,
        state = job.state.name(),
        engine = job.engine.as_deref().unwrap_or("none"),
        model = job.model_id.as_deref().unwrap_or("none"),
        "restoration step finished"
    );
    Ok(())
}

fn restore(ctx: &WorkerCtx, job: &crate::journal::Job) -> Ending {
    let s = &*ctx.settings.get();
    if let Some(missing) = job.missing_indexes().filter(|m| !m.is_empty()) {
        let shown: Vec<String> = missing.iter().take(10).map(|i| i.to_string()).collect();
        let what = format!(
            "series incomplete: {} of {} slices arrived (missing Image Index {}{})",
            job.received,
            job.expected_slices.unwrap_or(0),
            shown.join(", "),
            if missing.len() > 10 { ", ..." } else { "" }
        );
        if s.series.incomplete_policy == IncompletePolicy::Fail {
            return Ending::Failed(what);
        }
        tracing::warn!(job = %job.id, "{what}; processing what arrived (series.incomplete_policy = \"process\")");
    }
    let records = match ctx.journal.instances(&job.id) {
        Ok(r) => r,
        Err(e) => return Ending::Failed(e.to_string()),
    };
    let paths: Vec<PathBuf> = records.iter().map(|r| ctx.spool.absolute(&r.path)).collect();
    let want_uncertainty = s.destinations.iter().any(|d| d.uncertainty);
    // known complete only by Image Index against Number of Slices: a
    // multi-frame series (no index) may be reopened by another instance,
    // so its UIDs name the instances read too
    let partial = job.missing_indexes().is_none_or(|m| !m.is_empty());
    let restored = match restore_paths_with(s, &ctx.engines, &paths, want_uncertainty, partial) {
        Ok(r) => r,
        Err(e) => return e.into(),
    };
    let dir = output_dir(&s.node.state_dir, &job.id);
    for f in &restored.fallbacks {
        let _ = ctx.journal.update(&job.id, |j| j.note(format!("engine fallback: {f}")));
    }
    for a in &restored.assumed {
        let _ = ctx.journal.update(&job.id, |j| j.note(a.clone()));
    }
    let (summary, sigma_series) = match restored.uncertainty {
        Some(u) => (Some((u.summary, u.series_uid)), u.instances),
        None => (None, Vec::new()),
    };
    match write_outputs(&dir, restored.instances, sigma_series, s.node.min_free_bytes) {
        Ok((count, sigma_count)) => Ending::Restored {
            engine: restored.engine,
            model_id: restored.model_id,
            series_uid: restored.series_uid,
            count,
            slices: restored.slices,
            uncertainty: summary.map(|(summary, uid)| crate::journal::UncertaintyRecord {
                summary,
                series_uid: (sigma_count > 0).then_some(uid),
                count: sigma_count,
            }),
        },
        Err(WriteError::NoSpace(e)) => Ending::NoSpace(e),
        Err(WriteError::Other(e)) => Ending::Failed(e),
    }
}

/// A restored series, not yet written.
pub struct Restored {
    /// Attribute values assumed by operator settings.
    pub assumed: Vec<String>,
    /// Engines that failed on this series before `engine` succeeded.
    pub fallbacks: Vec<String>,
    pub engine: String,
    pub model_id: String,
    pub series_uid: String,
    /// Slices restored (the instances may be multi-frame).
    pub slices: usize,
    pub instances: Vec<DerivedInstance>,
    /// When the engine's model is calibrated for it.
    pub uncertainty: Option<RestoredUncertainty>,
}

/// The σ of a restored series: its summary, and its instances when asked for.
pub struct RestoredUncertainty {
    pub summary: crate::restore::uncertainty::Summary,
    pub series_uid: String,
    pub instances: Vec<DerivedInstance>,
}

/// Share of the restored value above which a body voxel's σ counts as
/// uncertain in the job summary.
pub const UNCERTAIN_FRACTION: f64 = 0.25;

/// "12 slices", or "268 slices in 1 multi-frame instance".
pub fn slice_count(slices: usize, instances: usize) -> String {
    if slices == instances {
        format!("{slices} slices")
    } else {
        format!("{slices} slices in {instances} multi-frame instance{}", if instances == 1 { "" } else { "s" })
    }
}

/// Load, select, restore and derive one series from its files. Shared by
/// the daemon's worker and the offline `restore` command.
pub fn restore_paths(s: &Settings, engines: &[Arc<dyn Engine>], paths: &[PathBuf]) -> Result<Restored, NotRestored> {
    restore_paths_with(s, engines, paths, false, false)
}

/// [`restore_paths`]; with a calibrated model the σ summary is always made,
/// and with `uncertainty_series` also the uncertainty series. `partial`:
/// the series is not known complete, and its derived UIDs are salted by
/// the instances read ([`crate::derive::inputs_id`]).
/// Whether single-frame slices are a whole series by Image Index: Number
/// of Slices N is known (at most the journal's limit) and indexes 1..=N
/// each arrived ([`crate::journal::Job::is_complete`]'s rule). A
/// multi-frame series is never known complete this way.
fn complete_by_index(slices: &[volume::SourceSlice]) -> bool {
    let Some(n) = slices.first().and_then(|s| s.dataset.i64_of(tags::NUMBER_OF_SLICES)) else { return false };
    if !(1..=crate::journal::job::MAX_SLICES as i64).contains(&n) || slices.iter().any(|s| s.frame.is_some()) {
        return false;
    }
    let got: std::collections::BTreeSet<i64> = slices.iter().filter_map(|s| s.dataset.i64_of(tags::IMAGE_INDEX)).collect();
    got.len() as i64 == n && got.iter().all(|i| (1..=n).contains(i))
}

pub fn restore_paths_with(
    s: &Settings,
    engines: &[Arc<dyn Engine>],
    paths: &[PathBuf],
    uncertainty_series: bool,
    partial: bool,
) -> Result<Restored, NotRestored> {
    let loaded = volume::load_bounded(paths, s.restore.max_voxels).map_err(|e| match e {
        // too large for this box: forwarded unchanged like any series the rules skip
        volume::VolumeError::TooLarge { .. } => NotRestored::Skipped(e.to_string()),
        e => NotRestored::Failed(format!("cannot build a volume: {e}")),
    })?;
    // the journal's rule, on the files themselves (an offline restore has
    // no journal): a series not known complete by Image Index is salted as
    // partial, so it never takes the complete series' UIDs
    let partial = partial || !complete_by_index(&loaded.slices);
    let mut selected =
        select::check(&loaded.slices, loaded.volume.ny, loaded.volume.nx, &s.restore).map_err(|e| NotRestored::Skipped(e.to_string()))?;
    // A model restores only the tracers it was trained for; the first
    // engine with a model decides (a fallback must not take what the
    // model refused).
    if let Some(allowed) = engines.iter().find_map(|e| e.tracers()) {
        let assumed = select::check_tracer(&loaded.slices, &allowed, &s.restore).map_err(|e| NotRestored::Skipped(e.to_string()))?;
        selected.assumed.extend(assumed);
    }
    // So do its frame durations: a frame the model refuses is skipped (and
    // forwarded unchanged if configured), not filtered by the Gaussian.
    if let Some([lo, hi]) = engines.iter().find_map(|e| e.frame_durations()) {
        let secs = selected.frame_duration_s;
        if !(lo..=hi).contains(&secs) {
            return Err(NotRestored::Skipped(select::NotSelected::ModelDuration { secs, lo, hi }.to_string()));
        }
    }
    // And its pixel sizes (0.5 % for rounding in the header).
    if let Some([lo, hi]) = engines.iter().find_map(|e| e.pixel_mm()) {
        let sp = &loaded.volume.spacing;
        if let Some(&mm) = sp[..2].iter().find(|&&mm| mm < lo * 0.995 || mm > hi * 1.005) {
            return Err(NotRestored::Skipped(select::NotSelected::ModelPixel { mm, lo, hi }.to_string()));
        }
    }
    // And enough slices for its context (a series of fewer would be read
    // from repeated edge slices).
    if let Some(need) = engines.iter().find_map(|e| e.context_slices()) {
        let slices = loaded.volume.nz;
        if slices < need {
            return Err(NotRestored::Skipped(select::NotSelected::TooFewSlices { slices, need }.to_string()));
        }
    }
    let mut input = loaded.volume;
    input.frame_duration_s = Some(selected.frame_duration_s);
    let (restored, variance, engine, fallbacks) =
        run_engines(engines, &input).map_err(|e| NotRestored::Failed(format!("restoration failed: {e}")))?;
    let calibration = engine.uncertainty();
    let source_sops: Vec<String> = loaded.slices.iter().filter_map(|sl| sl.dataset.str_of(tags::SOP_INSTANCE_UID)).collect();
    let params = DeriveParams {
        inputs_id: crate::derive::inputs_id(&engine.label(), partial.then_some(&source_sops[..]), &selected.assumed_values),
        engine: engine.label(),
        notice: {
            let mut n: Vec<String> = engine.notice().into_iter().collect();
            n.extend(selected.assumed.iter().cloned());
            (!n.is_empty()).then(|| n.join(" "))
        },
        research: engine.notice().is_some(),
        model_id: engine.model_id(),
        uncertainty_id: calibration.as_ref().map(|c| c.id()),
        series_description_suffix: s.restore.series_description_suffix.clone(),
        series_number_offset: s.restore.series_number_offset,
        device_id: s.node.device_id.clone(),
    };
    let source_series = loaded.slices[0].dataset.str_of(tags::SERIES_INSTANCE_UID).unwrap_or_default();
    let uncertainty = match calibration {
        None => None,
        Some(cal) => {
            let sigma = cal.sigma(&input, &restored, variance.as_ref()).map_err(|e| NotRestored::Failed(format!("uncertainty: {e}")))?;
            Some(RestoredUncertainty {
                summary: crate::restore::uncertainty::summarise(&restored, &sigma, UNCERTAIN_FRACTION),
                series_uid: uncertainty_series_uid(&source_series, &params),
                instances: if uncertainty_series { derive_uncertainty(&loaded.slices, &sigma, &params) } else { Vec::new() },
            })
        }
    };
    let instances = derive_series(&loaded.slices, &restored, &params);
    let slices = loaded.slices.len();
    Ok(Restored {
        assumed: selected.assumed,
        fallbacks,
        series_uid: crate::derive::restored_series_uid(&source_series, &params),
        engine: params.engine,
        model_id: params.model_id,
        slices,
        instances,
        uncertainty,
    })
}

/// Why derived instances were not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Not enough room (checked before writing, or ENOSPC while writing):
    /// worth trying again once space returns.
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Other(String),
}

/// Write derived instances durably into `dir` (cleared first: the folder
/// holds only our own output). The whole series is encoded first and
/// written only if it fits with `reserve` bytes left free on the disk, so a
/// full disk is found before any file is written and ingest keeps its
/// watermark. Returns how many were written.
pub fn write_instances(dir: &Path, instances: Vec<DerivedInstance>, reserve: u64) -> Result<u32, WriteError> {
    write_outputs(dir, instances, Vec::new(), reserve).map(|(n, _)| n)
}

/// Folder (inside a job's output folder) of its uncertainty series.
pub const UNCERTAINTY_DIR: &str = "uncertainty";

/// [`write_instances`] for the restored series and its uncertainty series
/// (in [`UNCERTAINTY_DIR`]), checked for space together. Returns both counts.
pub fn write_outputs(
    dir: &Path,
    instances: Vec<DerivedInstance>,
    sigma: Vec<DerivedInstance>,
    reserve: u64,
) -> Result<(u32, u32), WriteError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| WriteError::Other(format!("cannot clear {}: {e}", dir.display())))?;
    }
    let (count, sigma_count) = (instances.len() as u32, sigma.len() as u32);
    let mut encoded = Vec::with_capacity(instances.len() + sigma.len());
    let sigma_dir = dir.join(UNCERTAINTY_DIR);
    for (folder, inst) in instances.into_iter().map(|i| (dir, i)).chain(sigma.into_iter().map(|i| (sigma_dir.as_path(), i))) {
        let bytes = part10::encode(inst.dataset).map_err(|e| WriteError::Other(format!("cannot encode derived instance: {e}")))?;
        encoded.push((folder.join(format!("{}.dcm", inst.sop_instance_uid)), bytes));
    }
    let need: u64 = encoded.iter().map(|(_, b)| b.len() as u64).sum();
    let mb = |b: u64| b.div_ceil(1024 * 1024);
    // the nearest folder that exists (the output folder is made by the first
    // write; a relative path's last ancestor is "", the working folder)
    let probe = dir.ancestors().find(|p| !p.as_os_str().is_empty() && p.exists()).unwrap_or(Path::new("."));
    let free = spool::free_bytes(probe).map_err(|e| WriteError::Other(format!("cannot read free space of {}: {e}", probe.display())))?;
    if free < need.saturating_add(reserve) {
        return Err(WriteError::NoSpace(format!(
            "disk full: the derived series needs {} MiB and node.min_free_mb keeps {} MiB free; {} MiB free",
            mb(need),
            mb(reserve),
            free / (1024 * 1024)
        )));
    }
    for (path, bytes) in encoded {
        if let Err(e) = spool::write_durable(&path, &[&bytes], true) {
            let full = matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded);
            let what = format!("cannot write {}: {e}", path.display());
            if full {
                // nothing of a half-written series is kept
                let _ = std::fs::remove_dir_all(dir);
                return Err(WriteError::NoSpace(format!("disk full: {what}")));
            }
            return Err(WriteError::Other(what));
        }
    }
    Ok((count, sigma_count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::tests::arrival;

    fn ctx(dir: &Path) -> (WorkerCtx, String) {
        let journal = Journal::open(&dir.join("journal")).unwrap();
        let spool = Spool::new(dir.join("spool")).unwrap();
        let id = match journal.record(&arrival("1.2.3", "9.1", 1, 1)).unwrap() {
            crate::journal::Recorded::New { job_id, complete: true } => job_id,
            r => panic!("{r:?}"),
        };
        let settings = Arc::new(crate::config::LiveSettings::new(Settings::defaults()));
        (WorkerCtx { settings, journal, spool, engines: Vec::new() }, id)
    }

    #[test]
    fn a_job_that_moved_on_since_the_scheduler_read_it_is_not_restored_again() {
        let d = tempfile::tempdir().unwrap();
        let (ctx, id) = ctx(d.path());
        ctx.journal.update(&id, |j| j.set_state(JobState::Done)).unwrap();
        restore_job(&ctx, &id).unwrap();
        let job = ctx.journal.get(&id).unwrap().unwrap();
        assert_eq!(job.state, JobState::Done, "{:?}", job.history);
    }

    #[test]
    fn a_series_passed_through_is_forwarded_not_restored() {
        let d = tempfile::tempdir().unwrap();
        let (ctx, id) = ctx(d.path());
        // PET-class instances under a series that began as another kind:
        // ingest held room for outputs that will never be written
        let series = ctx.journal.get(&id).unwrap().unwrap().series_uid;
        ctx.spool.reservations().add(&series, 1 << 20);
        ctx.journal
            .update(&id, |j| {
                j.kind = JobKind::Passthrough;
                j.modality = Some("CT".into());
                j.set_state(JobState::Queued);
            })
            .unwrap();
        restore_job(&ctx, &id).unwrap();
        let job = ctx.journal.get(&id).unwrap().unwrap();
        let JobState::Delivering { payload: Payload::Original, outcome: Outcome::Skipped { reason } } = &job.state else {
            panic!("{:?}", job.state)
        };
        assert!(reason.contains("not PET (CT)"), "{reason}");
        assert_eq!(ctx.spool.reservations().total(), 0, "the room held for outputs is free again");
    }

    #[test]
    fn a_derived_series_that_keeps_going_missing_fails_the_job() {
        let d = tempfile::tempdir().unwrap();
        let (ctx, id) = ctx(d.path());
        ctx.journal.update(&id, |j| j.output_rebuilds = crate::journal::job::MAX_OUTPUT_REBUILDS + 1).unwrap();
        restore_job(&ctx, &id).unwrap();
        let job = ctx.journal.get(&id).unwrap().unwrap();
        let reason = match &job.state {
            JobState::Failed { reason } => reason.clone(),
            JobState::Delivering { outcome: Outcome::Failed { reason }, .. } => reason.clone(),
            s => panic!("{s:?}"),
        };
        assert!(reason.contains("found incomplete at delivery 4 times"), "{reason}");
    }

    /// An earlier run delivered everything; this run fails with nothing to
    /// send (no destination): its record must not read as delivered, or
    /// retention would remove an undelivered failure's instances.
    #[test]
    fn a_run_that_sends_nothing_leaves_no_earlier_deliveries_behind() {
        let d = tempfile::tempdir().unwrap();
        let (ctx, id) = ctx(d.path());
        assert!(ctx.settings.get().destinations.is_empty());
        ctx.journal
            .update(&id, |j| {
                j.plan_deliveries(&["pacs".into()]);
                j.deliveries[0].delivered = true;
                j.output_rebuilds = crate::journal::job::MAX_OUTPUT_REBUILDS + 1;
            })
            .unwrap();
        restore_job(&ctx, &id).unwrap();
        let job = ctx.journal.get(&id).unwrap().unwrap();
        assert!(matches!(job.state, JobState::Failed { .. }), "{:?}", job.state);
        assert!(job.deliveries.is_empty(), "{:?}", job.deliveries);
    }
}
