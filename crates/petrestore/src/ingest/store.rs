//! C-STORE handling: validate a received data set, append it with its
//! journal entry to the arrival log (`spool::arrivals`), fdatasync, and only
//! then answer success; the materializer moves it into the spool and sled
//! in the background. This file is the one place that maps storage errors to
//! DIMSE statuses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::materialize::{Claim, Item, Materializer};
use super::{StoreContext, StoreSink, StoreStatus};
use crate::dicom::attrs::Attrs;
use crate::dicom::dimse::{Command, status};
use crate::dicom::uid::valid_uid;
use crate::dicom::{PET_STORAGE_CLASSES, part10};
use crate::journal::job::MAX_SLICES;
use crate::journal::{Arrival, InstanceRecord, JobKind, Journal, JournalError};
use crate::spool::arrivals::{self, ArrivalLog};
use crate::spool::{self, Spool};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

/// Why an instance was not stored. The doc of each variant is what the
/// sender reads in Error Comment.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot parse data set: {0}")]
    Unparseable(String),
    #[error("{0} missing")]
    Missing(&'static str),
    #[error("invalid {what} {value:?}")]
    BadUid { what: &'static str, value: String },
    #[error("data set {what} {found} differs from the command's {expected}")]
    Mismatch { what: &'static str, found: String, expected: String },
    #[error("pixel data has {found} bytes, expected {expected}")]
    PixelLength { found: usize, expected: usize },
    /// Number of Slices or Image Index outside what a series can hold.
    #[error("{what} {value:?} is outside 1..={max}")]
    OutOfRange { what: &'static str, value: String, max: u32 },
    #[error("disk nearly full: {free_mb} MiB free, {held_mb} MiB held for output")]
    LowDisk { free_mb: u64, held_mb: u64 },
    #[error("spool write failed: {0}")]
    Disk(std::io::Error),
    #[error("journal failed: {0}")]
    Journal(#[from] JournalError),
    /// The spool refused the instances already acknowledged (the
    /// materializer retries them); the reason comes first, for the 64
    /// characters of the Error Comment.
    #[error("{reason} ({free_mb} MiB free): paused, resumes by itself")]
    Stalled { reason: String, free_mb: u64 },
    /// The materializer has stopped: the daemon is shutting down.
    #[error("{0}: the node is stopping, send again later")]
    Stopping(String),
    /// The SOP Instance UID was received before with other content: the
    /// first copy is kept (it may be restored or delivered already), and
    /// the sender is told instead of being answered Success for a copy
    /// that would be dropped. The attribute that differs comes first.
    #[error("{0} differs from the copy stored under this UID")]
    Conflict(&'static str),
    /// Another association is storing the same SOP Instance UID right now
    /// (its copy not durable yet): neither a duplicate nor a conflict yet.
    #[error("another copy of this instance is being received: send it again later")]
    BeingReceived,
    /// The instance is recorded but its file is gone: retention is
    /// removing the series.
    #[error("a removal of this series is under way: send it again later")]
    BeingRemoved,
}

impl StoreError {
    /// The DIMSE status for this error.
    pub fn status(&self) -> u16 {
        match self {
            StoreError::Unparseable(_)
            | StoreError::Missing(_)
            | StoreError::BadUid { .. }
            | StoreError::PixelLength { .. }
            | StoreError::OutOfRange { .. } => status::CANNOT_UNDERSTAND,
            StoreError::Mismatch { .. } => status::DATASET_MISMATCH,
            StoreError::Conflict(_) => status::PROCESSING_FAILURE,
            StoreError::BeingRemoved | StoreError::BeingReceived => status::OUT_OF_RESOURCES,
            StoreError::LowDisk { .. }
            | StoreError::Disk(_)
            | StoreError::Journal(_)
            | StoreError::Stalled { .. }
            | StoreError::Stopping(_) => status::OUT_OF_RESOURCES,
        }
    }
}

/// What happened to an instance that was not refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Durable in the arrival log, on its way into the spool and journal.
    New,
    /// Already received (in the journal, or still in the log).
    Duplicate,
}

/// The daemon's sink: arrival log first, spool and journal behind it.
pub struct SpoolSink {
    pub spool: Spool,
    pub journal: Journal,
    pub log: Arc<ArrivalLog>,
    pub materializer: Arc<Materializer>,
    /// The settings as reloaded: destinations and egress settings (storage
    /// commitment reports, the uncertainty copies) and the disk watermark
    /// (`node.min_free_mb`).
    pub live: Arc<crate::config::LiveSettings>,
    /// Wakes the scheduler when a report changed a job.
    pub wake: Arc<tokio::sync::Notify>,
}

impl SpoolSink {
    fn try_store(&self, ctx: &StoreContext, cmd: &Command, dataset: Vec<u8>) -> Result<Accepted, StoreError> {
        let Checked { obj, kind, sop_class, sop, study, series } = check_instance(&ctx.transfer_syntax, cmd, &dataset)?;

        // Claimed first, in one step with the check: the materializer
        // records in the journal before it clears the mark, so the claim or
        // the journal always sees an earlier copy. A copy on its way is
        // compared with this one as a stored copy would be.
        match self.materializer.claim(&series, &sop, Signature::of(&obj)) {
            Claim::Same => return Ok(Accepted::Duplicate),
            Claim::Different(what) => return Err(StoreError::Conflict(what)),
            Claim::Pending => return Err(StoreError::BeingReceived),
            Claim::New => {}
        }
        // released unless this copy reaches the arrival log
        let mut claim = Claimed { m: &self.materializer, series: series.clone(), sop: sop.clone(), kept: false };
        // Read before the journal: a stall or a start-up replay clears it
        // only after recording what it moved, so a copy that finds it clear
        // also finds those instances in the journal below.
        let stalled = self.materializer.failure();
        if let Some(stored) = self.journal.instance(&series, &sop)? {
            // the same instance again is acknowledged; other content under
            // its UID (a correction sent with the old UIDs) is refused
            let path = self.spool.absolute(&stored.path);
            if !path.exists() {
                // recorded, its file gone: retention is removing the series
                // (a purge a failed unlink holds up); acknowledging would
                // drop this copy, so the sender is asked to come back
                return Err(StoreError::BeingRemoved);
            }
            return match differs(&obj, &path) {
                Some(what) => Err(StoreError::Conflict(what)),
                None => Ok(Accepted::Duplicate),
            };
        }
        if let Some(reason) = stalled {
            let free_mb = spool::free_bytes(self.spool.root()).map(|b| b / (1024 * 1024)).unwrap_or(0);
            return Err(StoreError::Stalled { reason, free_mb });
        }
        // The watermark counts what the daemon will write for what it has
        // taken: instances still on their way into the spool, the derived
        // series of PET series not restored yet, and this instance's own
        // spool copy and derived copies. min_free_mb = 0 turns it off.
        let free = spool::free_bytes(self.spool.root()).map_err(StoreError::Disk)?;
        let own = dataset.len() as u64;
        let (copies, min_free_bytes) = {
            let s = self.live.get();
            let copies = if kind == JobKind::Pet { 1 + u64::from(s.destinations.iter().any(|d| d.uncertainty)) } else { 0 };
            (copies, s.node.min_free_bytes)
        };
        if min_free_bytes > 0 {
            let held = self.spool.reservations().total().saturating_add(self.materializer.backlog_bytes());
            let need = min_free_bytes.saturating_add(held).saturating_add(own.saturating_mul(1 + copies));
            if free < need {
                let mb = |b: u64| b / (1024 * 1024);
                return Err(StoreError::LowDisk { free_mb: mb(free), held_mb: mb(held) });
            }
        }
        let reserve_for = (min_free_bytes > 0 && copies > 0).then(|| (series.clone(), own * copies));

        let rel: PathBuf =
            spool::Spool::relative_path(&study, &series, &sop).ok_or(StoreError::BadUid { what: "UID", value: sop.clone() })?;
        let header = part10::header(&sop_class, &sop, &ctx.transfer_syntax, &ctx.calling_ae).map_err(StoreError::Unparseable)?;
        let arrival = Arrival {
            kind,
            study_uid: study,
            series_uid: series,
            modality: obj.str_of(tags::MODALITY),
            calling_ae: ctx.calling_ae.clone(),
            number_of_slices: obj.i64_of(tags::NUMBER_OF_SLICES).and_then(|n| u32::try_from(n).ok()),
            multiframe: kind == JobKind::Pet && crate::dicom::frames::is_multiframe(&obj),
            record: InstanceRecord {
                sop_instance_uid: sop,
                sop_class_uid: sop_class,
                path: rel,
                transfer_syntax: ctx.transfer_syntax.clone(),
                image_index: obj.i64_of(tags::IMAGE_INDEX).and_then(|n| u32::try_from(n).ok()),
            },
        };
        drop(obj);
        let mut encoded = arrivals::encode(&arrival, &[&header, &dataset]);
        drop(dataset);
        let segment = self.log.append(&mut encoded.bytes).map_err(StoreError::Disk)?;
        claim.kept = true;
        // Durable from here on: a failure to hand it over is reported, but
        // the record is replayed at the next start either way.
        self.materializer.submit(Item { segment, arrival, encoded }).map_err(|e| StoreError::Stopping(e.to_string()))?;
        if let Some((series, bytes)) = reserve_for {
            self.spool.reservations().add(&series, bytes);
        }
        Ok(Accepted::New)
    }
}

/// An instance claimed for the arrival log; unclaimed on drop unless its
/// copy was appended (`kept`).
struct Claimed<'a> {
    m: &'a Materializer,
    series: String,
    sop: String,
    kept: bool,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.m.unclaim(&self.series, &self.sop);
        }
    }
}

/// What [`check_instance`] found in a data set it accepts.
pub struct Checked {
    pub obj: InMemDicomObject,
    pub kind: JobKind,
    pub sop_class: String,
    pub sop: String,
    pub study: String,
    pub series: String,
}

/// Everything checked about an incoming data set before anything is
/// written: it parses in its transfer syntax, its UIDs are present and
/// valid and agree with the C-STORE command, and a PET instance's pixel
/// data has the length its attributes promise. Pure (no I/O): fuzzed with
/// arbitrary bytes in `tests/fuzz.rs`.
pub fn check_instance(transfer_syntax: &str, cmd: &Command, dataset: &[u8]) -> Result<Checked, StoreError> {
    let ts = crate::dicom::transfer_syntax(transfer_syntax)
        .ok_or_else(|| StoreError::Unparseable(format!("transfer syntax {transfer_syntax}")))?;
    // Lengths first: the parser allocates what an element declares.
    crate::dicom::guard::check_lengths(dataset, transfer_syntax != crate::dicom::IMPLICIT_VR_LE).map_err(StoreError::Unparseable)?;
    let obj = InMemDicomObject::read_dataset_with_ts(dataset, ts).map_err(|e| StoreError::Unparseable(e.to_string()))?;
    let sop_class = obj.str_of(tags::SOP_CLASS_UID).ok_or(StoreError::Missing("SOP Class UID"))?;
    let sop = obj.str_of(tags::SOP_INSTANCE_UID).ok_or(StoreError::Missing("SOP Instance UID"))?;
    let study = obj.str_of(tags::STUDY_INSTANCE_UID).ok_or(StoreError::Missing("Study Instance UID"))?;
    let series = obj.str_of(tags::SERIES_INSTANCE_UID).ok_or(StoreError::Missing("Series Instance UID"))?;
    for (what, v) in [("SOP Instance UID", &sop), ("Study Instance UID", &study), ("Series Instance UID", &series)] {
        if !valid_uid(v) {
            return Err(StoreError::BadUid { what, value: v.clone() });
        }
    }
    if sop_class != cmd.affected_sop_class.trim_end_matches('\0') {
        return Err(StoreError::Mismatch { what: "SOP Class UID", found: sop_class, expected: cmd.affected_sop_class.clone() });
    }
    if sop != cmd.affected_sop_instance.trim_end_matches('\0') {
        return Err(StoreError::Mismatch { what: "SOP Instance UID", found: sop, expected: cmd.affected_sop_instance.clone() });
    }
    let kind = if PET_STORAGE_CLASSES.contains(&sop_class.as_str()) { JobKind::Pet } else { JobKind::Passthrough };
    if kind == JobKind::Pet {
        check_pixel_length(&obj)?;
        check_slice_counts(&obj)?;
    }
    Ok(Checked { obj, kind, sop_class, sop, study, series })
}

/// What a re-sent instance must share with the stored copy of its SOP
/// Instance UID to be the same instance: who and what it shows, its
/// place in the series, its quantification and its pixels.
const SAME_INSTANCE: [(dicom_core::Tag, &str); 13] = [
    (tags::PATIENT_NAME, "Patient's Name"),
    (tags::PATIENT_ID, "Patient ID"),
    (tags::PATIENT_BIRTH_DATE, "Patient's Birth Date"),
    (tags::PATIENT_SEX, "Patient's Sex"),
    (tags::ACCESSION_NUMBER, "Accession Number"),
    (tags::STUDY_INSTANCE_UID, "Study Instance UID"),
    (tags::IMAGE_INDEX, "Image Index"),
    (tags::IMAGE_POSITION_PATIENT, "Image Position"),
    (tags::RESCALE_SLOPE, "Rescale Slope"),
    (tags::RESCALE_INTERCEPT, "Rescale Intercept"),
    (tags::UNITS, "Units"),
    (tags::ACTUAL_FRAME_DURATION, "Frame Duration"),
    (tags::NUMBER_OF_FRAMES, "Number of Frames"),
];

/// What [`SAME_INSTANCE`] and the pixels of an instance say, kept while
/// its copy is on its way into the spool: a copy sent again meanwhile is
/// compared with it as with a stored one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    texts: Vec<Option<String>>,
    pixels: u64,
}

impl Signature {
    pub fn of(o: &InMemDicomObject) -> Signature {
        let texts = SAME_INSTANCE.iter().map(|(t, _)| text_of(o, *t)).collect();
        // A CRC-32 of the pixels, in place (a multi-frame Pixel Data can be
        // hundreds of MB), with their length: on the acknowledgement's path,
        // so a checksum at memory speed rather than a keyed hash (two
        // different reconstructions of one slice agreeing in length and
        // CRC: 1 in 2^32).
        use dicom_core::value::{PrimitiveValue as P, Value};
        fn bytes<T: Copy>(v: &[T]) -> &[u8] {
            // SAFETY: integer and float slices are plain bytes, initialised,
            // with no padding; the view lives as long as `v`.
            unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
        }
        let mut crc = crc32fast::Hasher::new();
        let mut len = 0usize;
        let mut feed = |b: &[u8]| {
            crc.update(b);
            len += b.len();
        };
        match o.get(tags::PIXEL_DATA).map(|e| e.value()) {
            Some(Value::Primitive(P::U8(v))) => feed(v),
            Some(Value::Primitive(P::U16(v))) => feed(bytes(v)),
            Some(Value::Primitive(P::I16(v))) => feed(bytes(v)),
            Some(Value::Primitive(P::U32(v))) => feed(bytes(v)),
            Some(Value::Primitive(P::F32(v))) => feed(bytes(v)),
            Some(other) => feed(&other.to_bytes().unwrap_or_default()),
            None => {}
        }
        Signature { texts, pixels: (u64::from(crc.finalize()) << 32) ^ len as u64 }
    }

    /// The first attribute in which `other` differs, or its pixels.
    pub fn first_difference(&self, other: &Signature) -> Option<&'static str> {
        if let Some(i) = (0..SAME_INSTANCE.len()).find(|&i| self.texts.get(i) != other.texts.get(i)) {
            return Some(SAME_INSTANCE[i].1);
        }
        (self.pixels != other.pixels).then_some("Pixel Data")
    }
}

fn text_of(o: &InMemDicomObject, t: dicom_core::Tag) -> Option<String> {
    o.get(t).and_then(|e| e.to_str().ok()).map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
}

/// The first attribute in which `new` differs from the stored copy at
/// `stored`, or its pixels; `None` when they agree (or the stored copy
/// cannot be read: the start-up check and the restoration report that).
/// Values are compared as read, so a re-send in another transfer syntax
/// is still the same instance.
fn differs(new: &InMemDicomObject, stored: &Path) -> Option<&'static str> {
    let old = part10::open(stored).ok()?.into_inner();
    if let Some((_, what)) = SAME_INSTANCE.iter().find(|(t, _)| text_of(new, *t) != text_of(&old, *t)) {
        return Some(what);
    }
    fn pixels(o: &InMemDicomObject) -> Option<std::borrow::Cow<'_, [u8]>> {
        o.get(tags::PIXEL_DATA).and_then(|e| e.to_bytes().ok())
    }
    (pixels(new) != pixels(&old)).then_some("Pixel Data")
}

/// Number of Slices (0054,0081) and Image Index (0054,1330), when present,
/// must lie in 1..=[`MAX_SLICES`]: the journal tracks completeness per
/// index, and a sender's 4,294,967,295 must not become a series the daemon
/// waits for (or allocates for) forever.
fn check_slice_counts(obj: &InMemDicomObject) -> Result<(), StoreError> {
    for (tag, what) in [(tags::NUMBER_OF_SLICES, "Number of Slices"), (tags::IMAGE_INDEX, "Image Index")] {
        if obj.get(tag).is_none() {
            continue;
        }
        let raw = obj.str_of(tag).unwrap_or_default();
        match obj.i64_of(tag) {
            Some(n) if (1..=i64::from(MAX_SLICES)).contains(&n) => {}
            _ if raw.trim().is_empty() => {}
            _ => return Err(StoreError::OutOfRange { what, value: raw, max: MAX_SLICES }),
        }
    }
    Ok(())
}

/// A truncated Pixel Data element is the commonest broken instance.
fn check_pixel_length(obj: &InMemDicomObject) -> Result<(), StoreError> {
    let Some(px) = obj.get(tags::PIXEL_DATA) else { return Err(StoreError::Missing("Pixel Data")) };
    let Ok(bytes) = px.to_bytes() else { return Ok(()) }; // encapsulated: not ours to check
    let rows = obj.u16_of(tags::ROWS).ok_or(StoreError::Missing("Rows"))? as usize;
    let cols = obj.u16_of(tags::COLUMNS).ok_or(StoreError::Missing("Columns"))? as usize;
    let bits = obj.u16_of(tags::BITS_ALLOCATED).ok_or(StoreError::Missing("Bits Allocated"))? as usize;
    let frames = obj.str_of(tags::NUMBER_OF_FRAMES).and_then(|s| s.parse::<usize>().ok()).unwrap_or(1);
    // saturating: Number of Frames comes from the sender and may be absurd
    let expected = rows.saturating_mul(cols).saturating_mul(frames).saturating_mul(bits.div_ceil(8));
    // Odd lengths are padded to even.
    if bytes.len() != expected && bytes.len() != expected.saturating_add(expected & 1) {
        return Err(StoreError::PixelLength { found: bytes.len(), expected });
    }
    Ok(())
}

impl StoreSink for SpoolSink {
    fn commitment_report(&self, ctx: &StoreContext, report: crate::dicom::commitment::Report) -> StoreStatus {
        use crate::egress::ReportEffect;
        let s = self.live.get();
        match crate::egress::apply_commitment_report(&self.journal, &report, &ctx.calling_ae, &s.destinations, &s.egress) {
            Ok(effect) => {
                match &effect {
                    ReportEffect::Committed { job, destination } => {
                        tracing::info!(job = %job, destination = %destination, "storage commitment confirmed")
                    }
                    ReportEffect::NotCommitted { job, destination, reason } => {
                        tracing::warn!(job = %job, destination = %destination, "{reason}: sending again")
                    }
                    ReportEffect::Unknown => tracing::warn!(transaction = %report.transaction_uid, calling = %ctx.calling_ae,
                        "storage commitment report for no pending request: acknowledged, ignored"),
                }
                self.wake.notify_one();
                StoreStatus { status: status::SUCCESS, comment: None }
            }
            // The archive keeps the report and may send it again.
            Err(e) => StoreStatus { status: status::PROCESSING_FAILURE, comment: Some(format!("journal: {e}")) },
        }
    }

    fn store(&self, ctx: &StoreContext, cmd: &Command, dataset: Vec<u8>) -> StoreStatus {
        match self.try_store(ctx, cmd, dataset) {
            Ok(Accepted::Duplicate) => {
                tracing::info!(sop = %cmd.affected_sop_instance, "duplicate instance acknowledged, not stored again");
                StoreStatus { status: status::SUCCESS, comment: None }
            }
            Ok(Accepted::New) => StoreStatus { status: status::SUCCESS, comment: None },
            Err(e) => {
                tracing::warn!(calling = %ctx.calling_ae, sop = %cmd.affected_sop_instance, error = %e, "C-STORE refused");
                StoreStatus { status: e.status(), comment: Some(e.to_string()) }
            }
        }
    }
}

/// The demo's (and tests') receiving sink: every instance becomes a file
/// `<dir>/<SOP Instance UID>.dcm`, written durably.
pub struct FolderSink {
    pub dir: PathBuf,
}

impl StoreSink for FolderSink {
    fn store(&self, ctx: &StoreContext, cmd: &Command, dataset: Vec<u8>) -> StoreStatus {
        let sop = cmd.affected_sop_instance.trim_end_matches('\0');
        if !valid_uid(sop) {
            return StoreStatus { status: status::CANNOT_UNDERSTAND, comment: Some(format!("invalid SOP Instance UID {sop:?}")) };
        }
        let r = part10::header(cmd.affected_sop_class.trim_end_matches('\0'), sop, &ctx.transfer_syntax, &ctx.calling_ae)
            .map_err(std::io::Error::other)
            .and_then(|h| spool::write_durable(&self.dir.join(format!("{sop}.dcm")), &[&h, &dataset], true));
        match r {
            Ok(_) => StoreStatus { status: status::SUCCESS, comment: None },
            Err(e) => StoreStatus { status: status::OUT_OF_RESOURCES, comment: Some(e.to_string()) },
        }
    }
}
